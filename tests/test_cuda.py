"""The fused CUDA backend ("cuda", csrc/cuda/) against the reference, on a GPU.

Skipped without a CUDA device or without an extension built with CUDA (the
reason says which). On a machine without a GPU, .ci/cuda_build_check.sh proves
the kernels compile and runs their code on a CPU emulator; these tests are the
real-device half.

What is compared: ``backend="cuda"`` end to end (value and gradient through
autograd) with the pure-PyTorch reference evaluated in float64 on the same,
already rounded, logits -- every scheme x reduction x normalize x dtype, the
two-term schemes (label smoothing, also against F.cross_entropy; NCE/APL; NFL
and APL with NFL, also against autograd of NFL's formula); row
lengths that hit every launch layout (C = 1, 2, 3, odd, 50257), misaligned and
strided rows, extreme margins, |beta| = 1000, bad targets, NaN/inf rows,
bitwise determinism, CUDA graphs, side streams, torch.compile, opcheck, and
a case with N * C past 2^31 elements (when the device has the memory).

Tolerances: float64 1e-10 relative; float32 accumulation ~2e-5 relative;
float16/bfloat16 gradients 2 ulps of the output dtype, plus an absolute floor
of 1e-5 of the row's largest entry for tiny entries.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import robustloss_fast as rf
from robustloss_fast import _finalize, backends, reference
from robustloss_fast._common import Kernel, KernelSpec, Reduction
from robustloss_fast.backends.compiled import BUILT_WITH_CUDA
from robustloss_fast.schemes import APL, CCE, DM, GCE, IMAE, MAE, MSE, NCE, NFL, DMBeta, DMExponential, DMNormal

from conftest import requires_cuda

_REASON = backends.unavailable_reason("cuda")
pytestmark = [
    pytest.mark.cuda,
    requires_cuda,
    pytest.mark.skipif(_REASON is not None, reason=f"the CUDA backend is unavailable: {_REASON}"),
]

from _cases import SCHEMES  # noqa: E402
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
MODES = [("none", None), ("mean", None), ("mean", True), ("mean", False), ("sum", None)]
IGNORE = -100
DEV = "cuda"
_DM, _LS, _NCE, _NFL = int(Kernel.DM), int(Kernel.CCE_LS), int(Kernel.NCE), int(Kernel.NFL)


def _id(x):
    return str(x).replace("torch.", "") if isinstance(x, torch.dtype) else repr(x)


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_inputs(n, c, dtype, *, weighted=True, ignore_frac=0.15, scale=3.0, offset=0, pad=0):
    """Logits N(0, scale^2) with half the targets boosted by 6; rows start `offset`
    elements into a wider buffer whose rows are c + offset + pad long."""
    base = torch.randn(n, c + offset + pad, dtype=torch.float64, device=DEV) * scale
    target = torch.randint(0, c, (n,), device=DEV)
    easy = torch.rand(n, device=DEV) < 0.5
    base[torch.arange(n, device=DEV), target + offset] += 6.0 * easy
    if n > 2 and ignore_frac > 0:
        target[torch.rand(n, device=DEV) < ignore_frac] = IGNORE
    logits = base.to(dtype)[:, offset : offset + c]
    acc = acc_of(dtype)
    weight = torch.rand(c, dtype=acc, device=DEV) + 0.5 if weighted else None
    sw = torch.randn(n, dtype=acc, device=DEV) if weighted else None
    return logits, target, weight, sw


def spec_of(kid, a, b, reduction=0, normalize=False):
    return KernelSpec(Kernel(kid), a, b, 1.0, Reduction(reduction), normalize, IGNORE)


def run(backend, logits, target, scheme, weight, sw, reduction, normalize, upstream=None, **kw):
    """(value, grad_logits) through autograd; kw: label_smoothing."""
    x = logits.detach().clone().requires_grad_(True)
    v = rf.robust_cross_entropy(
        x, target, scheme, weight=weight, sample_weight=sw, reduction=reduction, normalize=normalize, backend=backend,
        **kw,
    )
    g = upstream if upstream is not None else torch.ones_like(v)
    v.backward(g)
    return v.detach(), x.grad


def reference64(logits, target, scheme, weight, sw, reduction, normalize, upstream=None, **kw):
    """The reference in float64 on the same rounded logits."""
    w = weight.double() if weight is not None else None
    s = sw.double() if sw is not None else None
    up = upstream.double() if upstream is not None else None
    return run("torch", logits.double(), target, scheme, w, s, reduction, normalize, up, **kw)


def assert_value(actual, expected, dtype, what="", scale=None, rtol=None):
    """Relative to `scale` (the same reduction with |sample_weight|: signed sample
    weights can cancel in the sum, leaving a result much smaller than its terms)."""
    rtol = rtol or (1e-10 if dtype == torch.float64 else 2e-5)
    scale = expected.abs().nan_to_num(0, 0, 0).max() if scale is None else scale.abs().nan_to_num(0, 0, 0).max()
    atol = rtol * float(scale) + 1e-30
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol, equal_nan=True, msg=what)


def assert_grad(actual, expected, dtype, what="", rtol=None, global_floor=1e-7):
    assert actual.dtype == dtype, what
    eps = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2 * 2**-10, torch.bfloat16: 2 * 2**-7}[dtype]
    eps = max(eps, rtol or 0.0)
    mag = expected.abs().nan_to_num(0, 0, 0)
    # Entries far below their row's (or the whole gradient's) largest lose relative precision in
    # float32 (e.g. rows weighted e^-1000 times less than others): they count absolutely.
    floor = 1e-5 * mag.amax(dim=-1, keepdim=True) + global_floor * (mag.max() if mag.numel() else 0.0) + 1e-30
    if dtype == torch.float16:
        floor = floor + 6e-8  # float16 subnormal spacing
    err = (actual.double() - expected).abs()
    bound = eps * expected.abs() + floor
    bad = ~((err <= bound) | (actual.double().isnan() & expected.isnan()) | (actual.double() == expected))
    assert not bad.any(), f"{what}: {int(bad.sum())} entries off; worst err {err[bad].max().item():.3g}"


def check(logits, target, scheme, weight, sw, reduction, normalize, what="", rtol=None, **kw):
    upstream = None
    if reduction == "none":
        upstream = torch.randn(target.shape, dtype=acc_of(logits.dtype), device=DEV)
    v, g = run("cuda", logits, target, scheme, weight, sw, reduction, normalize, upstream, **kw)
    v_ref, g_ref = reference64(logits, target, scheme, weight, sw, reduction, normalize, upstream, **kw)
    scale = None
    if sw is not None and reduction != "none":
        scale, _ = reference64(logits, target, scheme, weight, sw.abs(), reduction, normalize, **kw)
    assert v.dtype == acc_of(logits.dtype), what
    assert_value(v, v_ref, logits.dtype, what + " value", scale=scale, rtol=rtol)
    # NFL's gradient alpha P_j + beta h_j can cancel to 1e-6 of its terms (C = 2, gamma = 2): in
    # float32 such a row is only good to ~1e-7 of the largest entries (as the float32 reference is).
    nfl = getattr(scheme, "kernel_id", None) == Kernel.NFL
    assert_grad(g, g_ref, logits.dtype, what + " grad", rtol=rtol, global_floor=1e-6 if nfl else 1e-7)


# ---------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("reduction,normalize", MODES, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES, ids=_id)
def test_end_to_end(scheme, reduction, normalize, dtype):
    for weighted in (False, True):
        logits, target, w, sw = make_inputs(37, 11, dtype, weighted=weighted)
        check(logits, target, scheme, w, sw, reduction, normalize, f"{scheme} weighted={weighted}")


# Row lengths that land in each launch layout for each dtype (4 lanes, a warp,
# a 128- and a 512-thread block per row), plus C = 1, 2, 3 and a GPT-2 vocabulary.
SHAPES = [(64, 1), (64, 2), (64, 3), (300, 10), (33, 37), (17, 600), (9, 2001), (8, 9000), (5, 20001), (4, 50257)]


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("n,c", SHAPES, ids=str)
def test_shapes_and_layouts(n, c, dtype):
    for scheme, reduction, normalize in ((DM(), "mean", None), (CCE(), "none", None), (GCE(), "sum", None)):
        logits, target, w, sw = make_inputs(n, c, dtype)
        check(logits, target, scheme, w, sw, reduction, normalize, f"{scheme} {reduction}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_id)
@pytest.mark.parametrize("offset,pad", [(1, 0), (3, 5), (0, 7)], ids=str)
@pytest.mark.parametrize("c", [10, 601, 20001], ids=str)
def test_misaligned_and_strided_rows(c, offset, pad, dtype):
    """Rows that start off a 16-byte boundary, and rows further apart than C (the
    input and output rows are then aligned differently)."""
    logits, target, w, sw = make_inputs(12, c, dtype, offset=offset, pad=pad)
    assert logits.stride(0) == c + offset + pad
    check(logits, target, DM(), w, sw, "mean", None, "strided")
    check(logits, target, CCE(), None, None, "none", None, "strided")


def test_matches_cross_entropy():
    """CCE, normalize=False is F.cross_entropy (value and gradient)."""
    for dtype in (torch.float32, torch.float64):
        logits, target, w, _ = make_inputs(64, 13, dtype)
        for reduction in ("none", "mean", "sum"):
            x = logits.detach().clone().requires_grad_(True)
            x2 = logits.detach().clone().requires_grad_(True)
            v = rf.robust_cross_entropy(x, target, CCE(), weight=w, reduction=reduction, normalize=False, backend="cuda")
            ref = torch.nn.functional.cross_entropy(x2, target, weight=w.to(dtype), reduction=reduction)
            v.sum().backward()
            ref.sum().backward()
            torch.testing.assert_close(v, ref.to(v.dtype))
            torch.testing.assert_close(x.grad, x2.grad)


# The two-term schemes: (scheme, label_smoothing). Label smoothing is CCE with eps > 0.
TWO_TERM = [(NCE(), 0.0), (APL(), 0.0), (APL(passive="mae", alpha=10.0, beta=1.0), 0.0), (CCE(), 0.1), (CCE(), 0.3)]
# NFL (its own row pass and P-form backward): gamma 0.5, 2 and 0 (NCE through the NFL kernels),
# with the passive term of APL (the NFL kernel's b, alpha as a loss scale).
NFLS = [NFL(), NFL(gamma=2.0), NFL(gamma=0.0), APL(active="nfl", alpha=10.0, beta=1.0),
        APL(active="nfl", passive="mae", alpha=1.0, beta=0.4, gamma=2.0)]  # fmt: skip
TWO_TERM += [(scheme, 0.0) for scheme in NFLS]


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("scheme,eps", TWO_TERM, ids=_id)
def test_two_term_end_to_end(scheme, eps, reduction, dtype):
    for weighted in (False, True):
        logits, target, w, sw = make_inputs(37, 11, dtype, weighted=weighted)
        check(logits, target, scheme, w, sw, reduction, False, f"{scheme} eps={eps} weighted={weighted}",
              label_smoothing=eps)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("n,c", SHAPES, ids=str)
def test_two_term_shapes_and_layouts(n, c, dtype):
    for (scheme, eps), reduction in zip(TWO_TERM[:4], ("mean", "none", "sum", "mean")):
        logits, target, w, sw = make_inputs(n, c, dtype)
        check(logits, target, scheme, w, sw, reduction, False, f"{scheme} eps={eps} {reduction}", label_smoothing=eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("n,c", SHAPES, ids=str)
def test_nfl_shapes_and_layouts(n, c, dtype):
    for scheme, reduction in zip(NFLS, ("mean", "none", "sum", "mean", "none")):
        logits, target, w, sw = make_inputs(n, c, dtype)
        check(logits, target, scheme, w, sw, reduction, False, f"{scheme} {reduction}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("offset,pad", [(1, 0), (3, 5)], ids=str)
@pytest.mark.parametrize("c", [10, 601, 20001], ids=str)
def test_two_term_misaligned_and_strided_rows(c, offset, pad, dtype):
    logits, target, w, sw = make_inputs(12, c, dtype, offset=offset, pad=pad)
    check(logits, target, CCE(), w, sw, "mean", False, "strided label smoothing", label_smoothing=0.1)
    check(logits, target, APL(), w, sw, "none", False, "strided APL")
    check(logits, target, NFL(), w, sw, "sum", False, "strided NFL")


def test_label_smoothing_matches_cross_entropy():
    """CCE with label_smoothing is F.cross_entropy(label_smoothing=...), class weights included."""
    for dtype in (torch.float32, torch.float64):
        for c in (13, 3000):
            logits, target, w, _ = make_inputs(64, c, dtype)
            for weight in (None, w):
                for reduction in ("none", "mean", "sum"):
                    x = logits.detach().clone().requires_grad_(True)
                    x2 = logits.detach().clone().requires_grad_(True)
                    v = rf.robust_cross_entropy(x, target, CCE(), weight=weight, reduction=reduction,
                                                label_smoothing=0.1, backend="cuda")  # fmt: skip
                    ref = F.cross_entropy(x2, target, weight=None if weight is None else weight.to(dtype),
                                          reduction=reduction, label_smoothing=0.1)  # fmt: skip
                    v.sum().backward()
                    ref.sum().backward()
                    what = f"{dtype} c={c} weight={weight is not None} {reduction}"
                    torch.testing.assert_close(v, ref.to(v.dtype), msg=what)
                    torch.testing.assert_close(x.grad, x2.grad, msg=what)


def _nfl_by_definition(x, t, gamma, b, sw):
    """Per-row NFL(gamma) + b q from its formula in tensor ops (autograd gives the gradient)."""
    P = torch.softmax(x, 1)
    fl = -(1 - P).pow(gamma) * P.log()
    valid = t != IGNORE
    ty = torch.where(valid, t, 0)
    p = P.gather(1, ty[:, None]).squeeze(1)
    per_row = fl.gather(1, ty[:, None]).squeeze(1) / fl.sum(1) + b * (1 - p)
    return torch.where(valid, per_row * sw, torch.zeros_like(per_row)), valid


def test_nfl_matches_its_definition():
    """NFL = FL(p) / sum_k FL(P_k) + b q, FL(P) = -(1 - P)^gamma log P: the value and the
    autograd gradient of that formula, in float64, for each layout."""
    for c in (9, 600, 9000):
        logits, target, _, sw = make_inputs(48, c, torch.float64)
        sw = sw.abs() + 0.1
        for gamma, b in ((0.5, 0.4), (2.0, 0.0), (0.0, 0.4)):
            for reduction in ("none", "mean", "sum"):
                x = logits.detach().clone().requires_grad_(True)
                x2 = logits.detach().clone().requires_grad_(True)
                v = torch.ops.robustloss.robust_ce_forward(x, target, _NFL, gamma, b, None, sw, IGNORE,
                                                           {"none": 0, "mean": 1, "sum": 2}[reduction], False)[0]  # fmt: skip
                per_row, valid = _nfl_by_definition(x2, target, gamma, b, sw)
                ref = {"none": per_row, "mean": per_row.sum() / valid.sum(), "sum": per_row.sum()}[reduction]
                up = torch.linspace(0.5, 1.5, 48, dtype=torch.float64, device=DEV) if reduction == "none" else None
                v.backward(up)
                ref.backward(up)
                what = f"c={c} gamma={gamma} b={b} {reduction}"
                torch.testing.assert_close(v, ref, rtol=1e-10, atol=1e-12, msg=what)
                torch.testing.assert_close(x.grad, x2.grad, rtol=1e-9, atol=1e-12, msg=what)


def test_two_term_masked_classes_and_nan_rows():
    """A masked class makes Lambda infinite (smoothed value +inf, NCE 0) unless its smoothing weight is 0;
    a row masked but for its target keeps its beta u term; NaN rows stay NaN, the others finite."""
    for c in (6, 300, 3000, 50257):
        x, t = _masked_and_bad_rows(c)
        w = torch.rand(c, device=DEV) + 0.5
        w[: c // 2] = 0.0
        w[t[2:5]] = 1.0
        for scheme, eps in TWO_TERM[:4] + [(NFL(), 0.0), (NFLS[-1], 0.0)]:
            for weight in (None, w):
                v, g = run("cuda", x, t, scheme, weight, None, "none", False, label_smoothing=eps)
                assert torch.isnan(v[2:5]).all() and torch.isnan(g[2:5]).any(dim=1).all()
                assert torch.isfinite(g[[0, 1, 5]]).all()
                v_ref, g_ref = reference64(x, t, scheme, weight, None, "none", False, label_smoothing=eps)
                assert_value(v, v_ref, torch.float32, f"masked {scheme} eps={eps}")
                assert_grad(g, g_ref, torch.float32, f"masked {scheme} eps={eps}")


def test_spatial_and_unbatched_inputs():
    x = torch.randn(3, 7, 4, 5, device=DEV)
    t = torch.randint(0, 7, (3, 4, 5), device=DEV)
    check(x, t, DM(), None, None, "none", None, "spatial")
    x1 = torch.randn(9, device=DEV)
    t1 = torch.tensor(4, device=DEV)
    check(x1, t1, IMAE(), None, None, "mean", None, "unbatched")


# ---------------------------------------------------------------------------
# the ops one by one (CUDA vs the CPU kernel and vs the reference)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("scheme", [CCE(), GCE(), DM(), DMNormal(psi=0.3, beta=4.0), DMBeta(alpha=2.0, eta=3.0)], ids=_id)
def test_ops_against_cpu_kernel_and_reference(scheme, dtype):
    ops = torch.ops.robustloss
    kid, (a, b) = scheme.kernel_id, scheme.kernel_params
    logits, target, w, sw = make_inputs(41, 300, dtype)
    sw = sw.abs() + 0.1  # positive: no cancellation in the reduced value, so relative tolerances hold
    valid = target != IGNORE
    for reduction, normalize in ((0, False), (1, True), (1, False), (2, False)):
        v, st = ops.robust_ce_forward(logits, target, kid, a, b, w, sw, IGNORE, reduction, normalize)
        v_cpu, st_cpu = ops.robust_ce_forward(logits.cpu(), target.cpu(), kid, a, b, w.cpu(), sw.cpu(), IGNORE,
                                              reduction, normalize)  # fmt: skip
        v_ref, st_ref = reference.forward(logits, target, spec_of(kid, a, b, reduction, normalize), w, sw)
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=3e-5, atol=1e-7)
        torch.testing.assert_close(v.cpu(), v_cpu, **tol)
        torch.testing.assert_close(v, v_ref, **tol)
        # lse_nt of an ignored row is unused (-inf in the kernels); coef is 0 there.
        torch.testing.assert_close(st[valid], st_ref[valid], **tol)
        torch.testing.assert_close(st.cpu(), st_cpu, **tol)
        rows = ops.robust_ce_rows(logits, target, kid, a, b, None, IGNORE, reduction == 1 and normalize)
        v2, st2 = _finalize.finalize(rows, target, spec_of(kid, a, b, reduction, normalize), w, sw)
        torch.testing.assert_close(v2, v, **tol)
        torch.testing.assert_close(st2, st, **tol)
        grad = torch.randn(41, dtype=st.dtype, device=DEV) if reduction == 0 else torch.tensor(0.7, device=DEV).to(st.dtype)
        gl = ops.robust_ce_backward(grad, logits, target, st, None, IGNORE, kid, a)
        gl_cpu = ops.robust_ce_backward(grad.cpu(), logits.cpu(), target.cpu(), st.cpu(), None, IGNORE, kid, a)
        assert gl.dtype == dtype and gl.is_contiguous()
        assert_grad(gl.cpu(), gl_cpu.double(), dtype, "backward vs CPU kernel")


# Two-term kernel formulas (kernel id, a, b): label smoothing eps = 0.1 (the class
# weights are its smoothing weights u), NCE (1, 0), APL NCE+RCE (alpha = 1, beta A = 4),
# NFL (gamma, b) with gamma 0.5, 2 and 0 (its rows and stats hold lse: P-form).
TWO_TERM_KERNELS = [(_LS, 0.1, 0.0), (_NCE, 1.0, 0.0), (_NCE, 1.0, 4.0), (_NFL, 0.5, 0.0), (_NFL, 2.0, 0.4),
                    (_NFL, 0.0, 0.4)]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("c", [11, 300, 9000], ids=str)
@pytest.mark.parametrize("kernel", TWO_TERM_KERNELS, ids=str)
def test_two_term_ops_against_cpu_kernel_and_reference(kernel, c, dtype):
    ops = torch.ops.robustloss
    kid, a, b = kernel
    logits, target, w, sw = make_inputs(41, c, dtype)
    sw = sw.abs() + 0.1
    valid = target != IGNORE
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=3e-5, atol=1e-7)
    for ww in (None, w):
        u = ww if Kernel(kid).weight_in_rows else None  # label smoothing weighs its smoothing sum by the class weights
        for reduction in (0, 1, 2):
            what = f"{kernel} c={c} weight={ww is not None} reduction={reduction}"
            v, st = ops.robust_ce_forward(logits, target, kid, a, b, ww, sw, IGNORE, reduction, False)
            v_cpu, st_cpu = ops.robust_ce_forward(logits.cpu(), target.cpu(), kid, a, b,
                                                  None if ww is None else ww.cpu(), sw.cpu(), IGNORE, reduction, False)  # fmt: skip
            v_ref, st_ref = reference.forward(logits, target, spec_of(kid, a, b, reduction), ww, sw)
            torch.testing.assert_close(v.cpu(), v_cpu, **tol, msg=what)
            torch.testing.assert_close(v, v_ref, **tol, msg=what)
            torch.testing.assert_close(st[valid], st_ref[valid], **tol, msg=what)
            torch.testing.assert_close(st.cpu(), st_cpu, **tol, msg=what)
            rows = ops.robust_ce_rows(logits, target, kid, a, b, u, IGNORE, False)
            rows_ref = reference.rows(logits, target, spec_of(kid, a, b), u)
            torch.testing.assert_close(rows[valid], rows_ref[valid], **tol, msg=what)
            v2, st2 = _finalize.finalize(rows, target, spec_of(kid, a, b, reduction), ww, sw)
            torch.testing.assert_close(v2, v, **tol, msg=what)
            torch.testing.assert_close(st2, st, **tol, msg=what)
            grad = torch.randn(41, dtype=st.dtype, device=DEV) if reduction == 0 else torch.tensor(0.7, device=DEV).to(st.dtype)
            gl = ops.robust_ce_backward(grad, logits, target, st, u, IGNORE, kid, a)
            gl_cpu = ops.robust_ce_backward(grad.cpu(), logits.cpu(), target.cpu(), st.cpu(),
                                            None if u is None else u.cpu(), IGNORE, kid, a)  # fmt: skip
            assert gl.dtype == dtype and gl.is_contiguous()
            assert_grad(gl.cpu(), gl_cpu.double(), dtype, "backward vs CPU kernel " + what)
            gl_ref = reference.backward(grad.double(), logits.double(), target, st_ref.double(), spec_of(kid, a, b),
                                        None if u is None else u.double())  # fmt: skip
            assert_grad(gl, gl_ref, dtype, "backward vs reference " + what)


def test_two_term_refuse_normalize():
    ops = torch.ops.robustloss
    logits, target, w, _ = make_inputs(8, 5, torch.float32)
    for kid, a, b in TWO_TERM_KERNELS:
        with pytest.raises(ValueError, match="normalize"):
            ops.robust_ce_forward(logits, target, kid, a, b, w, None, IGNORE, 1, True)
        with pytest.raises(ValueError, match="normalize"):
            ops.robust_ce_rows(logits, target, kid, a, b, None, IGNORE, True)


# ---------------------------------------------------------------------------
# numerics


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_extreme_margins(dtype):
    """p -> 1 (margins 100+) and p -> 0: q and the gradient stay exact, nothing is NaN."""
    n, c = 16, 50
    logits = torch.randn(n, c, device=DEV, dtype=torch.float64)
    target = torch.randint(0, c, (n,), device=DEV)
    margin = torch.tensor([200.0, -200.0, 120.0, 60.0] * 4, device=DEV, dtype=torch.float64)
    logits[torch.arange(n), target] += margin
    logits = logits.to(dtype)
    if dtype == torch.float16:
        logits = logits.clamp(-60000, 60000)
    for scheme in (CCE(), MAE(), DM(), DM(lam=0.0, beta=-3.0), DMBeta(alpha=2.0, eta=3.0)):
        for reduction, normalize in (("none", None), ("mean", True), ("sum", None)):
            v, g = run("cuda", logits, target, scheme, None, None, reduction, normalize)
            assert torch.isfinite(v).all() and torch.isfinite(g.float()).all(), scheme
            # |z| ~ 200: one float32 ulp of the margin is ~1e-5 relative in p or q.
            check(logits, target, scheme, None, None, reduction, normalize, f"extreme {scheme}", rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("beta", [1000.0, -1000.0])
def test_beta_1000_normalised_mean_is_finite(beta, dtype):
    logits, target, _, _ = make_inputs(256, 100, dtype, weighted=False, scale=5.0)
    v, g = run("cuda", logits, target, DM(lam=1.0, beta=beta), None, None, "mean", True)
    assert torch.isfinite(v) and torch.isfinite(g.float()).all()
    # The normalised emphasis sums to one unit: the L1 norm of the whole gradient is 1.
    assert abs(g.double().abs().sum().item() - 1.0) < (1e-6 if dtype in (torch.float32, torch.float64) else 2e-2)
    v_ref, g_ref = reference64(logits, target, DM(lam=1.0, beta=beta), None, None, "mean", True)
    assert_value(v, v_ref, dtype)
    assert_grad(g, g_ref, dtype, "beta 1000")


def _masked_and_bad_rows(c):
    """Six rows of c classes: 0 half masked, 1 masked but for its target, 2 a NaN, 3 a +inf, 4 a +inf target, 5 plain."""
    x = torch.randn(6, c, device=DEV)
    t = torch.randint(0, c, (6,), device=DEV)
    x[0, : c // 2] = -math.inf
    x[0, t[0]] = 1.0
    x[1] = -math.inf
    x[1, t[1]] = 0.5
    x[2, (t[2] + 1) % c] = math.nan
    x[3, (t[3] + 1) % c] = math.inf
    x[4, t[4]] = math.inf
    return x, t


def test_masked_classes_and_nan_rows():
    """-inf logits are masks; a row masked but for its target has zero gradient; NaN or
    +inf in a row makes that row NaN and leaves the others alone."""
    for c in (6, 300, 3000, 50257):
        x, t = _masked_and_bad_rows(c)
        v, g = run("cuda", x, t, CCE(), None, None, "none", False)
        assert torch.isnan(v[2:5]).all() and torch.isfinite(v[[0, 1, 5]]).all()
        assert torch.isnan(g[2:5]).any(dim=1).all() and torch.isfinite(g[[0, 1, 5]]).all()
        assert (g[1] == 0).all()
        v_ref, g_ref = reference64(x, t, CCE(), None, None, "none", False)
        assert_value(v, v_ref, torch.float32)
        assert_grad(g, g_ref, torch.float32, "masked")


def test_c1_all_ignored_and_empty():
    for dtype in DTYPES:
        x = torch.randn(5, 1, device=DEV).to(dtype)
        t = torch.zeros(5, dtype=torch.long, device=DEV)
        for reduction, normalize in MODES:
            v, g = run("cuda", x, t, DM(), None, None, reduction, normalize)
            assert (g == 0).all()
            check(x, t, DM(), None, None, reduction, normalize, "C=1")
        x = torch.randn(4, 7, device=DEV).to(dtype)
        t = torch.full((4,), IGNORE, device=DEV)
        for reduction, normalize in MODES:
            v, g = run("cuda", x, t, DM(), None, None, reduction, normalize)
            assert (v == 0).all() and (g == 0).all()
        x = torch.randn(0, 7, device=DEV).to(dtype)
        t = torch.zeros(0, dtype=torch.long, device=DEV)
        for reduction, normalize in MODES:
            v, g = run("cuda", x, t, DM(), None, None, reduction, normalize)
            assert g.shape == (0, 7) and (reduction == "none" or v.item() == 0)


def test_ignore_index_inside_the_class_range():
    logits, target, w, _ = make_inputs(40, 9, torch.float32, ignore_frac=0)
    target[:10] = 3
    x = logits.detach().clone().requires_grad_(True)
    v = rf.robust_cross_entropy(x, target, CCE(), weight=w, ignore_index=3, normalize=False, backend="cuda")
    v.backward()
    x2 = logits.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(x2, target, weight=w, ignore_index=3)
    ref.backward()
    torch.testing.assert_close(v, ref)
    torch.testing.assert_close(x.grad, x2.grad)


# ---------------------------------------------------------------------------
# bad targets


@pytest.mark.parametrize("c", [3, 100, 3000, 50257], ids=str)
def test_bad_target_raises_index_error_naming_it(c):
    logits, target, _, _ = make_inputs(10, c, torch.float32, weighted=False, ignore_frac=0)
    for bad in (c, -1, -7, 10**12):
        t = target.clone()
        t[6] = bad
        t[8] = c + 5
        with pytest.raises(IndexError, match=rf"target value {bad} \(at flat position 6\)"):
            rf.robust_cross_entropy(logits, t, DM(), backend="cuda")
        with pytest.raises(IndexError, match=str(bad)):
            torch.ops.robustloss.robust_ce_rows(logits, t, _DM, 1.0, 8.0, None, IGNORE, True)
        with pytest.raises(IndexError, match=str(bad)):  # the two-term pass skips bad rows too
            rf.robust_cross_entropy(logits, t, CCE(), label_smoothing=0.1, backend="cuda")
        with pytest.raises(IndexError, match=str(bad)):  # and NFL's focal pass
            rf.robust_cross_entropy(logits, t, NFL(), backend="cuda")
        # The backward op never syncs: it leaves the bad rows NaN and touches nothing out of bounds.
        st = torch.zeros(10, 4, device=DEV)
        st[:, 0] = torch.logsumexp(logits, 1)  # NFL's P_j = exp(z_j - lse) of a good row are at most 1
        for u, kid, a in ((None, int(Kernel.CCE), 0.0), (torch.ones(c, device=DEV), _LS, 0.1), (None, _NFL, 0.5)):
            g = torch.ops.robustloss.robust_ce_backward(torch.ones((), device=DEV), logits, t, st, u, IGNORE, kid, a)
            assert torch.isnan(g[[6, 8]]).all() and torch.isfinite(g[:6]).all()
    # The context is still healthy (no device-side assert fired).
    torch.cuda.synchronize()
    check(logits, target, DM(), None, None, "mean", None, "after bad targets")


# ---------------------------------------------------------------------------
# determinism, streams, graphs, compile


@pytest.mark.parametrize(
    "n,c,dtype", [(4096, 32000, torch.bfloat16), (65536, 10, torch.float32), (3000, 2001, torch.float16)], ids=str
)
def test_bitwise_deterministic(n, c, dtype):
    logits, target, w, sw = make_inputs(n, c, dtype)
    for scheme, eps in ((DM(), 0.0), (CCE(), 0.1), (APL(), 0.0), (NFL(), 0.0)):
        normalize = None if eps == 0.0 and not scheme.two_term else False
        first = run("cuda", logits, target, scheme, w, sw, "mean", normalize, label_smoothing=eps)
        for _ in range(3):
            again = run("cuda", logits, target, scheme, w, sw, "mean", normalize, label_smoothing=eps)
            assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_side_stream_and_second_device():
    logits, target, w, sw = make_inputs(64, 1000, torch.float32)
    v0, g0 = run("cuda", logits, target, DM(), w, sw, "mean", None)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        v1, g1 = run("cuda", logits, target, DM(), w, sw, "mean", None)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(v0, v1) and torch.equal(g0, g1)
    if torch.cuda.device_count() > 1:  # the device guard: inputs on cuda:1, current device cuda:0
        moved = [t.to("cuda:1") for t in (logits, target, w, sw)]
        v2, g2 = run("cuda", *moved[:2], DM(), moved[2], moved[3], "mean", None)
        assert v2.device.index == 1 and torch.equal(v2.cpu(), v0.cpu()) and torch.equal(g2.cpu(), g0.cpu())


def test_cuda_graph_capture_and_replay():
    """The forward's bad-target read-back is skipped under capture (a sync is illegal there)."""
    logits, target, w, sw = make_inputs(128, 500, torch.float32)
    x = logits.detach().clone().requires_grad_(True)

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
    expected = run("cuda", logits * 1.5, target, DM(), w, sw, "mean", None)
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
    # Target values are still checked at run time inside the compiled graph (the error type
    # may be rewrapped on the way out, the message names the value).
    bad = target.clone()
    bad[3] = 1000
    with pytest.raises(Exception, match=r"\b1000\b"):
        compiled(x, bad, w, sw)


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
    v, st = torch.ops.robustloss.robust_ce_forward(logits, target, _DM, 1.0, 8.0, None, None, IGNORE, 0, False)
    gl = torch.ops.robustloss.robust_ce_backward(torch.ones(n, device=DEV), logits, target, st, None, IGNORE, _DM, 1.0)
    spec = spec_of(Kernel.DM, 1.0, 8.0)
    v_ref, st_ref = reference.forward(logits[tail].double(), target[tail], spec)
    g_ref = reference.backward(torch.ones(8, device=DEV, dtype=torch.float64), logits[tail].double(), target[tail],
                               st_ref, spec)  # fmt: skip
    assert_value(v[tail], v_ref, torch.bfloat16, "tail value")
    assert_grad(gl[tail], g_ref, torch.bfloat16, "tail grad")


def test_built_with_cuda():
    assert BUILT_WITH_CUDA
    for op in ("robust_ce_forward", "robust_ce_backward", "robust_ce_rows"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"robustloss::{op}", "CUDA")
