"""What only the CUDA backend ("cuda", csrc/cuda/) has: launch layouts, streams, graphs, 64-bit offsets.

Skipped without a CUDA device or without an extension built with CUDA (the
reason says which). On a machine without a GPU, .ci/cuda_build_check.sh proves
the kernels compile and runs their code on a CPU emulator; these tests, with
the backend suite, are the real-device half.

Its parity with the reference -- every scheme, dtype, mode, shape family and
edge case, op by op and end to end -- is the backend suite's
(tests/test_backends.py, tests/test_backend_ops.py), which runs it like every
registered backend. Here: the row lengths that land in each launch layout
(with misaligned and strided rows, masked and NaN rows and bad targets at
each), the kernels a training step launches, bitwise determinism at sizes
that spread over many blocks, side streams, a second device, CUDA graphs,
torch.compile, opcheck of the ops, and a case with N * C past 2^31 elements
(when the device has the memory).
Comparisons and tolerances are the suite's (tests/_cases.py).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch

import robustloss_fast as rf
from robustloss_fast import backends, reference
from robustloss_fast._common import STAT_COLS, Kernel, StatCol
from robustloss_fast.backends.compiled import BUILT_WITH_CUDA
from robustloss_fast.schemes import APL, CCE, DM, GCE, NCE, NFL

from _backends import OnDevice
from _cases import (
    DTYPES,
    IGNORE,
    Loss,
    Problem,
    acc_of,
    assert_grad,
    assert_value,
    check_loss,
    dtype_id,
    make_problem,
)
from conftest import requires_cuda

_REASON = backends.unavailable_reason("cuda")
pytestmark = [
    pytest.mark.cuda,
    requires_cuda,
    pytest.mark.skipif(_REASON is not None, reason=f"the CUDA backend is unavailable: {_REASON}"),
]

DEV = "cuda"
CUDA = OnDevice("cuda", DEV)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DM, _LS, _NCE, _NFL = int(Kernel.DM), int(Kernel.CCE_LS), int(Kernel.NCE), int(Kernel.NFL)


def make_inputs(n, c, dtype, *, weighted=True, ignore_frac=0.15, scale=3.0):
    """Big batches drawn on the device (the suite's make_problem draws on the CPU, too slow for these):
    logits N(0, scale^2) with half the targets boosted by 6, ignored rows, class and signed sample weights."""
    base = torch.randn(n, c, dtype=torch.float64, device=DEV) * scale
    target = torch.randint(0, c, (n,), device=DEV)
    easy = torch.rand(n, device=DEV) < 0.5
    base[torch.arange(n, device=DEV), target] += 6.0 * easy
    if n > 2 and ignore_frac > 0:
        target[torch.rand(n, device=DEV) < ignore_frac] = IGNORE
    acc = acc_of(dtype)
    weight = torch.rand(c, dtype=acc, device=DEV) + 0.5 if weighted else None
    sw = torch.randn(n, dtype=acc, device=DEV) if weighted else None
    return base.to(dtype), target, weight, sw


def _value_and_grad(logits, target, scheme, weight, sw, reduction, normalize, **kw):
    """(value, gradient) of the CUDA backend for an upstream gradient of ones."""
    x = logits.detach().clone().requires_grad_(True)
    v = rf.robust_cross_entropy(x, target, scheme, weight=weight, sample_weight=sw, reduction=reduction,
                                normalize=normalize, backend="cuda", **kw)  # fmt: skip
    v.backward(torch.ones_like(v))
    return v.detach(), x.grad


# ---------------------------------------------------------------------------
# launch layouts

# Row lengths that land in each launch layout for each dtype (4 lanes, a warp,
# a 128- and a 512-thread block per row), plus C = 1, 2, 3 and a GPT-2 vocabulary.
SHAPES = [(64, 1), (64, 2), (64, 3), (300, 10), (33, 37), (17, 600), (9, 2001), (8, 9000), (5, 20001), (4, 50257)]

# Per layout: one-term schemes, the two-term ones (label smoothing through CCE's eps), NFL and APL with NFL.
LAYOUT_CASES = [
    (Loss(DM()), "mean"), (Loss(CCE()), "none"), (Loss(GCE()), "sum"),
    (Loss(NCE()), "mean"), (Loss(APL()), "none"), (Loss(APL(passive="mae", alpha=10.0, beta=1.0)), "sum"),
    (Loss(CCE(), 0.1), "mean"),
    (Loss(NFL()), "mean"), (Loss(NFL(gamma=2.0)), "none"), (Loss(NFL(gamma=0.0)), "sum"),
    (Loss(APL(active="nfl", alpha=10.0, beta=1.0)), "mean"),
    (Loss(APL(active="nfl", passive="mae", alpha=1.0, beta=0.4, gamma=2.0)), "none"),
]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("n,c", SHAPES, ids=str)
def test_layouts(n, c, dtype):
    """Every layout end to end (value and gradient), and its row pass op by op."""
    for loss, reduction in LAYOUT_CASES:
        problem = make_problem((n, c), dtype, DEV)
        check_loss(CUDA, problem, loss, reduction, None, f"layout ({n}, {c})")
    # The row pass as the fused linear layer and the distributed paths call it, column by column relative
    # to the column's size: log w is a logarithm (its error is absolute), and two-term coefficients cancel.
    # NFL's cancel entirely where it saturates (C = 2, 3: a confidently wrong row): from C = 10 on.
    rtol = 1e-10 if dtype == torch.float64 else 3e-5
    for loss in (Loss(DM()), Loss(CCE(), 0.1)) + ((Loss(NFL()),) if 10 <= c <= 9000 else ()):
        problem = make_problem((n, c), dtype, DEV)
        spec = loss.spec("mean")
        rows = CUDA.impl.rows(problem.logits, problem.target, spec, problem.weight)
        expected = reference.rows(problem.logits, problem.target, spec, spec.smooth_weight(problem.weight))
        valid = problem.target != IGNORE
        assert rows.shape == expected.shape and rows.dtype == acc_of(dtype)
        for col in range(expected.shape[1]):
            assert_value(rows[valid, col], expected[valid, col], dtype, rtol=rtol, what=f"{loss} rows column {col}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("offset,pad", [(1, 0), (3, 5), (0, 7)], ids=str)
@pytest.mark.parametrize("c", [10, 601, 20001], ids=str)
def test_misaligned_and_strided_rows(c, offset, pad, dtype):
    """Rows that start off a 16-byte boundary, and rows further apart than C (the input and output rows are
    then aligned differently), in the vectorised layouts."""
    losses = [(Loss(DM()), "mean"), (Loss(CCE()), "none")]
    if (offset, pad) != (0, 7) and dtype != torch.float16:
        losses += [(Loss(CCE(), 0.1), "mean"), (Loss(APL()), "none"), (Loss(NFL()), "sum")]
    for loss, reduction in losses:
        problem = make_problem((12, c), dtype, DEV, layout=("offset", offset, pad))
        assert problem.logits.stride(0) == c + offset + pad
        check_loss(CUDA, problem, loss, reduction, None, "strided")


def _masked_and_bad_rows(c):
    """Six rows of c classes: 0 half masked, 1 masked but for its target, 2 a NaN, 3 a +inf, 4 a +inf target, 5 plain."""
    x = torch.randn(6, c)
    t = torch.randint(0, c, (6,))
    x[0, : c // 2] = -math.inf
    x[0, t[0]] = 1.0
    x[1] = -math.inf
    x[1, t[1]] = 0.5
    x[2, (t[2] + 1) % c] = math.nan
    x[3, (t[3] + 1) % c] = math.inf
    x[4, t[4]] = math.inf
    return Problem(x.to(DEV), t.to(DEV))


MASKED_LOSSES = [Loss(CCE()), Loss(NCE()), Loss(APL()), Loss(APL(passive="mae", alpha=10.0, beta=1.0)),
                 Loss(CCE(), 0.1), Loss(NFL()), Loss(APL(active="nfl", passive="mae", alpha=1.0, beta=0.4, gamma=2.0))]  # fmt: skip


@pytest.mark.parametrize("c", [6, 300, 3000, 50257], ids=str)
def test_masked_classes_and_nan_rows(c):
    """-inf logits are masks and a row masked but for its target has no one-term gradient; a masked class makes
    Lambda infinite (smoothed value +inf, NCE 0) unless its smoothing weight is 0; NaN or +inf in a row makes
    that row NaN and leaves the others alone -- in each vectorised layout."""
    problem = _masked_and_bad_rows(c)
    w = torch.rand(c) + 0.5
    w[: c // 2] = 0.0
    w[problem.target[2:5].cpu()] = 1.0
    for loss in MASKED_LOSSES:
        for weight in (None, w.to(DEV)) if loss.two_term else (None,):
            problem.weight = weight
            v, g, _, _ = check_loss(CUDA, problem, loss, "none", None, f"masked C={c}", require_finite=False)
            assert torch.isnan(v[2:5]).all() and torch.isnan(g[2:5]).all()
            assert torch.isfinite(g[[0, 1, 5]]).all()
            if not loss.two_term:
                assert torch.isfinite(v[[0, 1, 5]]).all() and (g[1] == 0).all()


def _in_child(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python process (a device-side assertion ends a process's use of the device)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([_ROOT, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


_BAD_TARGET_CHILD = """
import torch, robustloss_fast as rf
from robustloss_fast.schemes import CCE, DM, NFL
c, bad, backend, what = {c}, {bad}, {backend!r}, {what!r}
x = torch.randn(10, c, device="cuda")
t = torch.randint(0, c, (10,), device="cuda")
t[6] = bad
torch.cuda.synchronize()
if what == "rows":
    from robustloss_fast._common import STAT_COLS, Kernel, StatCol
    torch.ops.robustloss.robust_ce_rows(x, t, int(Kernel.DM), 1.0, 8.0, None, -100, True)
else:
    scheme, kw = {{"dm": (DM(), {{}}), "ls": (CCE(), {{"label_smoothing": 0.1}}), "nfl": (NFL(), {{}})}}[what]
    rf.robust_cross_entropy(x, t, scheme, backend=backend, **kw)
torch.cuda.synchronize()
print("NO ASSERTION")
"""


@pytest.mark.parametrize(
    "c,backend,what",
    [(3, "cuda", "dm"), (100, "cuda", "ls"), (3000, "cuda", "nfl"), (50257, "cuda", "dm"), (50257, "cuda", "rows"),
     (100, "triton", "dm"), (100, "triton", "ls"), (100, "torch", "dm")],
    ids=str,
)  # fmt: skip
def test_bad_target_stops_with_a_device_side_assertion(c, backend, what):
    """SPEC §6.4 on a GPU: a bad target stops the stream with a device-side assertion (no host sync to find
    it), in every layout and pass; the process then reports it at its next synchronisation."""
    if backends.unavailable_reason(backend) is not None:
        pytest.skip(f"backend {backend!r} is unavailable: {backends.unavailable_reason(backend)}")
    child = _in_child(_BAD_TARGET_CHILD.format(c=c, bad=c + 3, backend=backend, what=what))
    out = child.stdout + child.stderr
    assert child.returncode != 0 and "NO ASSERTION" not in out, out[-2000:]
    assert "device-side assert" in out or "Assertion" in out, out[-2000:]
    if backend == "cuda":  # our kernel's own words (printed by the device)
        assert "target out of bounds" in out, out[-2000:]


@pytest.mark.parametrize("c", [3, 100, 3000, 50257], ids=str)
def test_bad_target_validation_and_backward_op(c):
    """With set_validate_targets(True) the host names the value and its position before any kernel runs, in
    every layout; the backward op, which never synchronises, leaves the bad rows NaN and touches nothing out
    of bounds (SPEC §6.4). The context stays healthy throughout."""
    logits, target, _, _ = make_inputs(10, c, torch.float32, weighted=False, ignore_frac=0)
    previous = rf.set_validate_targets(True)
    try:
        for bad in (c, -1, -7, 10**12):
            t = target.clone()
            t[6] = bad
            t[8] = c + 5
            for scheme, kw in ((DM(), {}), (CCE(), {"label_smoothing": 0.1}), (NFL(), {})):
                with pytest.raises(IndexError, match=rf"target value {bad} \(at flat position 6\)"):
                    rf.robust_cross_entropy(logits, t, scheme, backend="cuda", **kw)
            st = torch.zeros(10, STAT_COLS, device=DEV)
            st[:, StatCol.M] = logits.amax(1)  # NFL's P_j = exp(z_j - m - ls) of a good row are at most 1
            st[:, StatCol.LS] = torch.logsumexp(logits - st[:, StatCol.M, None], 1)
            for u, kid, a in ((None, int(Kernel.CCE), 0.0), (torch.ones(c, device=DEV), _LS, 0.1), (None, _NFL, 0.5)):
                g = torch.ops.robustloss.robust_ce_backward(torch.ones((), device=DEV), logits, t, st, u, IGNORE, kid, a)
                assert torch.isnan(g[[6, 8]]).all() and torch.isfinite(g[:6]).all()
    finally:
        rf.set_validate_targets(previous)
    torch.cuda.synchronize()
    problem = Problem(logits, target)
    check_loss(CUDA, problem, Loss(DM()), "mean", None, "after bad targets")


@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_training_step_never_synchronises(backend, reduction):
    """A forward and backward issue no device-to-host synchronisation (torch.cuda.set_sync_debug_mode turns
    one into an error): no target read-back, no .item(), in every scheme family."""
    if backends.unavailable_reason(backend) is not None:
        pytest.skip(f"backend {backend!r} is unavailable: {backends.unavailable_reason(backend)}")
    logits, target, w, sw = make_inputs(64, 1000, torch.float32)
    cases = [(DM(), {}, None), (CCE(), {"label_smoothing": 0.1}, False), (NFL(), {}, False), (APL(), {}, None)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for scheme, kw, normalize in cases:
            x = logits.detach().clone().requires_grad_(True)
            v = rf.robust_cross_entropy(x, target, scheme, weight=w, sample_weight=sw, reduction=reduction,
                                        normalize=normalize, backend=backend, **kw)  # fmt: skip
            v.backward(torch.ones_like(v))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("n,cross_row", [(100, ["one_block_kernel"]), (1024, ["one_block_kernel"]),
                                         (1025, ["partials_kernel", "apply_kernel"])])
def test_training_step_launches(n, cross_row):
    """A training step is the row pass, the cross-row step (one launch up to 1024 rows, two above) and
    backward; besides ours, the device runs only the fill of backward's seed gradient."""
    logits, target, w, sw = make_inputs(n, 10, torch.float32)
    x = logits.detach().clone().requires_grad_(True)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        rf.robust_cross_entropy(x, target, DM(), weight=w, sample_weight=sw, backend="cuda").backward()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]
    ours = [re.search(r"(\w+_kernel)<", k).group(1) for k in kernels if "robustloss" in k]
    assert ours == ["rows_kernel", *cross_row, "backward_kernel"], kernels
    others = [k for k in kernels if "robustloss" not in k]
    assert len(others) <= 1 and all("Fill" in k for k in others), kernels


# ---------------------------------------------------------------------------
# determinism, streams, graphs, compile


@pytest.mark.parametrize(
    "n,c,dtype", [(4096, 32000, torch.bfloat16), (65536, 10, torch.float32), (3000, 2001, torch.float16)], ids=str
)
def test_bitwise_deterministic(n, c, dtype):
    """Across many blocks, the cross-row sums are still the same bits every time (SPEC §6.3)."""
    logits, target, w, sw = make_inputs(n, c, dtype)
    for scheme, eps in ((DM(), 0.0), (CCE(), 0.1), (APL(), 0.0), (NFL(), 0.0)):
        normalize = None if eps == 0.0 and not scheme.two_term else False
        first = _value_and_grad(logits, target, scheme, w, sw, "mean", normalize, label_smoothing=eps)
        for _ in range(3):
            again = _value_and_grad(logits, target, scheme, w, sw, "mean", normalize, label_smoothing=eps)
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_side_stream_and_second_device():
    logits, target, w, sw = make_inputs(64, 1000, torch.float32)
    v0, g0 = _value_and_grad(logits, target, DM(), w, sw, "mean", None)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        v1, g1 = _value_and_grad(logits, target, DM(), w, sw, "mean", None)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(v0, v1) and torch.equal(g0, g1)
    if torch.cuda.device_count() > 1:  # the device guard: inputs on cuda:1, current device cuda:0
        moved = [t.to("cuda:1") for t in (logits, target, w, sw)]
        v2, g2 = _value_and_grad(*moved[:2], DM(), moved[2], moved[3], "mean", None)
        assert v2.device.index == 1 and torch.equal(v2.cpu(), v0.cpu()) and torch.equal(g2.cpu(), g0.cpu())


def test_cuda_graph_capture_and_replay():
    """Capture needs no special case: the forward never reads anything back (a sync is illegal there)."""
    logits, target, w, sw = make_inputs(128, 500, torch.float32)
    x = logits.detach().clone().requires_grad_()

    def step():
        v = rf.robust_cross_entropy(x, target, DM(), weight=w, sample_weight=sw, backend="cuda")
        (g,) = torch.autograd.grad(v, x)
        return v, g

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            eager = step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        x.copy_(logits * 1.5)
    graph.replay()
    torch.cuda.synchronize()
    expected = _value_and_grad(logits * 1.5, target, DM(), w, sw, "mean", None)
    assert torch.equal(captured[0], expected[0]) and torch.equal(captured[1], expected[1])
    assert not torch.equal(captured[0], eager[0])


def test_opcheck():
    ops = torch.ops.robustloss
    for n, c, dtype, kid, a, b, red, norm in (
        (8, 5, torch.float32, _DM, 1.0, 8.0, 1, True),
        (8, 700, torch.bfloat16, int(Kernel.CCE), 0.0, 0.0, 0, False),
        (6, 7, torch.float64, int(Kernel.GCE), 0.7, 0.0, 2, False),
        (0, 4, torch.float32, _DM, 0.5, 12.0, 1, True),
        (8, 700, torch.float32, _LS, 0.1, 0.0, 1, False),
        (6, 9, torch.float64, _NCE, 1.0, 4.0, 0, False),
        (8, 700, torch.float32, _NFL, 0.5, 0.4, 1, False),
        (6, 9, torch.float64, _NFL, 2.0, 0.0, 0, False),
    ):
        logits, target, w, sw = make_inputs(n, c, dtype)
        x = logits.detach().clone().requires_grad_(dtype != torch.bfloat16)
        torch.library.opcheck(ops.robust_ce_forward.default, (x, target, kid, a, b, w, sw, IGNORE, red, norm))
        _, st = ops.robust_ce_forward(logits, target, kid, a, b, w, sw, IGNORE, red, norm)
        grad = torch.ones((), dtype=st.dtype, device=DEV)
        u = w if Kernel(kid).weight_in_rows else None
        torch.library.opcheck(ops.robust_ce_backward.default, (grad, logits, target, st, u, IGNORE, kid, a))
        torch.library.opcheck(ops.robust_ce_rows.default, (logits, target, kid, a, b, u, IGNORE, red == 1 and norm))


def _losses(x, t, w, sw):
    a = rf.robust_cross_entropy(x, t, DM(lam=0.5, beta=12.0), weight=w, sample_weight=sw, backend="cuda")
    b = rf.robust_cross_entropy(x, t, GCE(), reduction="none", backend="cuda")
    c = rf.robust_cross_entropy(x, t, CCE(), reduction="sum", backend="cuda")
    return a + (b * torch.arange(b.shape[0], dtype=b.dtype, device=b.device)).sum() / 10 + c


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    compiled = torch.compile(_losses, fullgraph=True)
    for dtype in (torch.float32, torch.bfloat16):
        logits, target, w, sw = make_inputs(256, 1000, dtype)
        x = logits.detach().clone().requires_grad_(True)
        value = compiled(x, target, w, sw)
        (grad,) = torch.autograd.grad(value, x)
        x_eager = logits.detach().clone().requires_grad_(True)
        expected = _losses(x_eager, target, w, sw)
        (expected_grad,) = torch.autograd.grad(expected, x_eager)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
        # Inductor may add the three losses' bfloat16 gradients in another order: a bfloat16 ulp of the largest.
        atol = 1e-6 if dtype == torch.float32 else 2**-7 * float(expected_grad.abs().max())
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5 if dtype == torch.float32 else 1.6e-2, atol=atol)
        ignored = target == IGNORE
        assert (grad[ignored] == 0).all()
    # A bad target inside the compiled graph stops the stream with the kernel's device-side assertion
    # (test_bad_target_stops_with_a_device_side_assertion shows it in a child process; here it would end
    # this process's use of the device).


# ---------------------------------------------------------------------------
# 64-bit offsets


def test_offsets_past_2_31_elements():
    """N * C > 2^31: the last rows (whose offsets overflow int32) match the reference."""
    c = 50257
    n = (2**31) // c + 64
    need = n * c * 2 * 2 + (1 << 30)  # bf16 logits + bf16 gradient + slack
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free device memory, {free / 2**30:.1f} GiB free")
    assert n * c > 2**31
    logits = torch.empty(n, c, dtype=torch.bfloat16, device=DEV).normal_(0.0, 3.0)
    target = torch.randint(0, c, (n,), device=DEV)
    tail = slice(n - 8, n)
    loss = Loss(DM())
    spec = loss.spec("none")
    v, st = torch.ops.robustloss.robust_ce_forward(logits, target, _DM, 1.0, 8.0, None, None, IGNORE, 0, False)
    gl = torch.ops.robustloss.robust_ce_backward(torch.ones(n, device=DEV), logits, target, st, None, IGNORE, _DM, 1.0)
    v_ref, st_ref = reference.forward(logits[tail].double(), target[tail], spec)
    g_ref = reference.backward(torch.ones(8, device=DEV, dtype=torch.float64), logits[tail].double(), target[tail],
                               st_ref, spec)  # fmt: skip
    assert_value(v[tail], v_ref, torch.bfloat16, c, what="tail value")
    assert_grad(gl[tail], g_ref, c, what="tail grad")


def test_built_with_cuda():
    assert BUILT_WITH_CUDA
    for op in ("robust_ce_forward", "robust_ce_backward", "robust_ce_rows"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"robustloss::{op}", "CUDA")
