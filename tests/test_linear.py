"""linear_robust_cross_entropy: parity with materialised logits, gradients, memory, compile."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import robustloss_fast as rf
from robustloss_fast import backends, linear, schemes
from robustloss_fast._common import ROW_COLS
from robustloss_fast.linear import LinearRobustCrossEntropyLoss, linear_robust_cross_entropy

from _backends import device_of, thin
from _launches import aten_outside_launches, mark_triton_launches

ALL_SCHEMES = [
    schemes.CCE(),
    schemes.MAE(),
    schemes.MSE(),
    schemes.GCE(q=0.6),
    schemes.DM(lam=0.5, beta=6.0),
    schemes.IMAE(T=4.0),
    schemes.DMNormal(psi=0.3, beta=5.0),
    schemes.DMExponential(beta=-3.0),
    schemes.DMBeta(alpha=2.0, eta=1.5),
]
BACKENDS = ["torch"] + (["cpu"] if "cpu" in rf.available_backends() else [])


def _inputs(n, h, v, dtype, *, bias=True, extras=True, device="cpu"):
    """Drawn on the CPU, then moved to ``device`` (the same numbers on every device)."""
    hidden = torch.randn(n, h, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(v, h, dtype=torch.float64) / h**0.5).to(dtype).to(device).requires_grad_()
    b = torch.randn(v, dtype=torch.float64).to(dtype).to(device).requires_grad_() if bias else None
    target = torch.randint(0, v, (n,))
    target[torch.rand(n) < 0.2] = -100
    cw = torch.rand(v, dtype=torch.float64) + 0.5 if extras else None
    sw = torch.randn(n, dtype=torch.float64) if extras else None
    return hidden, weight, b, target.to(device), None if cw is None else cw.to(device), None if sw is None else sw.to(device)


def _materialised(hidden, weight, bias, target, scheme, cw, sw, **kw):
    logits = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    return rf.robust_cross_entropy(logits, target, scheme, weight=cw, sample_weight=sw, backend="torch", **kw)


def _both(hidden, weight, bias, target, scheme, cw, sw, upstream, **kw):
    """(value, grads) of the fused op and of the materialised reference, same upstream gradient."""
    params = [x for x in (hidden, weight, bias) if x is not None]
    fw = {k: kw.pop(k) for k in ("chunk_size", "memory_budget", "grad_in_forward", "backend", "process_group")
          if k in kw}
    out = linear_robust_cross_entropy(hidden, weight, target, scheme, bias=bias, class_weight=cw, sample_weight=sw,
                                      **kw, **fw)
    ref = _materialised(hidden, weight, bias, target, scheme, cw, sw, **kw)
    g = upstream(ref)
    return (out, torch.autograd.grad(out, params, g)), (ref, torch.autograd.grad(ref, params, g))


def _close(got, want, rtol, atol):
    (v1, g1), (v2, g2) = got, want
    assert v1.dtype == v2.dtype and v1.shape == v2.shape
    torch.testing.assert_close(v1, v2, rtol=rtol, atol=atol)
    for a, b in zip(g1, g2):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=repr)
def test_parity_every_scheme_float64(backend, scheme):
    # Every registered backend on its own device (the ``backend`` fixture, tests/_backends.py).
    # N = 23 rows in chunks of 5 (the last chunk is short), ignored rows,
    # class and (signed) sample weights, bias, random upstream gradient.
    combos = [(r, gif) for r in ("mean", "sum", "none") for gif in (None, False)]
    for reduction, grad_in_forward in thin(combos, backend, 2, ALL_SCHEMES.index(scheme)):
        hidden, weight, bias, target, cw, sw = _inputs(23, 7, 11, torch.float64, device=backend.device)
        got, want = _both(hidden, weight, bias, target, scheme, cw, sw, lambda r: torch.randn_like(r),
                          reduction=reduction, chunk_size=5, grad_in_forward=grad_in_forward, backend=backend.name)
        _close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_parity_normalize_flag_and_chunks(normalize, chunk_size):
    hidden, weight, bias, target, cw, sw = _inputs(19, 5, 13, torch.float64, bias=False)
    got, want = _both(hidden, weight, None, target, schemes.DM(), cw, sw, lambda r: torch.randn_like(r),
                      normalize=normalize, chunk_size=chunk_size)
    _close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_parity_low_precision(dtype, tol, reduction):
    # The reference sees the same dtype of logits; the chunked matmuls may
    # round differently from the full one, hence a tolerance of the dtype's order.
    hidden, weight, bias, target, cw, sw = _inputs(45, 16, 37, dtype)
    got, want = _both(hidden, weight, bias, target, schemes.DM(), cw, sw, lambda r: torch.randn_like(r),
                      reduction=reduction, chunk_size=7)
    _close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("grad_in_forward", [None, False])
def test_batched_hidden_and_module(grad_in_forward):
    b, t, h, v = 3, 5, 6, 9
    hidden = torch.randn(b, t, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, v, (b, t))
    target[0, 1] = -100
    sw = torch.rand(b, t, dtype=torch.float64)
    loss = LinearRobustCrossEntropyLoss(schemes.IMAE(), reduction="none", chunk_size=4,
                                        grad_in_forward=grad_in_forward)
    out = loss(hidden, weight, target, sample_weight=sw)
    assert out.shape == (b, t)
    up = torch.randn(b, t, dtype=torch.float64)
    g = torch.autograd.grad(out, (hidden, weight), up)
    ref = rf.robust_cross_entropy((hidden @ weight.t()).movedim(-1, 1), target, schemes.IMAE(), sample_weight=sw,
                                  reduction="none", backend="torch")
    gr = torch.autograd.grad(ref, (hidden, weight), up)
    torch.testing.assert_close(out, ref)
    for a, r in zip(g, gr):
        torch.testing.assert_close(a, r)
    assert g[0].shape == hidden.shape


def test_gradcheck_loss_defined_float64():
    # GCE is loss-defined: with normalize=False its gradient is the exact
    # derivative of its value, so finite differences must agree.
    hidden, weight, bias, target, cw, sw = _inputs(6, 3, 5, torch.float64)
    for reduction in ("mean", "sum", "none"):

        def f(h, w, b):
            return linear_robust_cross_entropy(h, w, target, schemes.GCE(), bias=b, class_weight=cw, sample_weight=sw,
                                               reduction=reduction, chunk_size=4, grad_in_forward=False)

        assert torch.autograd.gradcheck(f, (hidden, weight, bias))


def test_grad_in_forward_matches_recompute_and_refuses_a_second_backward():
    # The 3-matmul path stores gradients; its result must equal the recompute
    # path's, and a second backward through it must fail loudly, not go wrong.
    hidden, weight, bias, target, cw, sw = _inputs(17, 4, 9, torch.float64)
    kw = dict(bias=bias, class_weight=cw, sample_weight=sw, chunk_size=3)
    params = (hidden, weight, bias)
    out = linear_robust_cross_entropy(hidden, weight, target, schemes.DM(), grad_in_forward=True, **kw)
    g1 = torch.autograd.grad(3.0 * out, params, retain_graph=True)
    ref = linear_robust_cross_entropy(hidden, weight, target, schemes.DM(), grad_in_forward=False, **kw)
    g2 = torch.autograd.grad(3.0 * ref, params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(out, params)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("scheme", [schemes.DM(), schemes.CCE()], ids=repr)
def test_grad_in_forward_16bit_scales_once_and_refuses_a_second_backward(backend, scheme, reduction):
    # 16-bit inputs: the stored gradients (float32 sums, or held in bfloat16) get the upstream
    # gradient in backward (on a GPU in the pass that rounds a sum), "mean"'s divisor in forward;
    # the result matches the recompute path's, and a second backward is refused on every device,
    # as for float32.
    hidden, weight, bias, target, cw, sw = _inputs(17, 4, 9, torch.bfloat16, device=backend.device)
    kw = dict(bias=bias, class_weight=cw, sample_weight=sw, chunk_size=3, reduction=reduction, backend=backend.name)
    params = (hidden, weight, bias)
    out = linear_robust_cross_entropy(hidden, weight, target, scheme, grad_in_forward=True, **kw)
    ref = linear_robust_cross_entropy(hidden, weight, target, scheme, grad_in_forward=False, **kw)
    got = torch.autograd.grad(3.0 * out, params, retain_graph=True)
    want = torch.autograd.grad(3.0 * ref, params)
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        # Normwise: with signed sample weights an entry can be a cancelling sum of bfloat16 terms.
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * b.abs().max().item())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out, params)


def test_bfloat16_grad_weight_accumulates_in_float32():
    # 512 chunks of one row: summing their grad_weight contributions in bfloat16
    # gives ~2% error here; float32 accumulation stays at bfloat16 rounding.
    n, h, v = 512, 32, 64
    hidden = torch.randn(n, h).bfloat16()
    weight = (0.3 * torch.randn(v, h)).bfloat16()
    target = torch.randint(0, v, (n,))
    w64 = weight.double().requires_grad_()
    truth = torch.autograd.grad(
        rf.robust_cross_entropy(hidden.double() @ w64.t(), target, schemes.CCE(), reduction="sum", backend="torch"),
        w64,
    )[0]
    for gif in (None, False):
        w = weight.clone().requires_grad_()
        out = linear_robust_cross_entropy(hidden, w, target, schemes.CCE(), reduction="sum", chunk_size=1,
                                          grad_in_forward=gif)
        (gw,) = torch.autograd.grad(out, w)
        assert gw.dtype == torch.bfloat16
        err = ((gw.double() - truth).norm() / truth.norm()).item()
        assert err < 8e-3, err


def test_large_beta_normalised_no_overflow():
    # |beta| = 1000: raw weights overflow float32 by hundreds of orders of
    # magnitude; chunks with very different log-weights are merged in the log domain.
    # The weights' rounding scales with |beta| * eps (chunked and whole-batch
    # matmuls round the logits differently), so float32 is checked for
    # finiteness and float64 for agreement with the materialised reference.
    for dtype, tol in ((torch.float32, None), (torch.float64, 1e-9)):
        hidden, weight, _, target, _, sw = _inputs(40, 6, 10, dtype, bias=False)
        hidden = (hidden.detach() * 3).requires_grad_()
        for beta in (1000.0, -1000.0):
            scheme = schemes.DM(lam=1.0, beta=beta)
            for gif in (None, False):
                got, want = _both(hidden, weight, None, target, scheme, None, sw, lambda r: torch.ones_like(r),
                                  chunk_size=6, grad_in_forward=gif)
                for x in (got[0],) + got[1]:
                    assert torch.isfinite(x).all()
                if tol is not None:
                    _close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("grad_in_forward", [None, False])
def test_all_ignored_is_zero_not_nan(grad_in_forward):
    hidden, weight, bias, target, _, _ = _inputs(9, 4, 5, torch.float32)
    target = torch.full_like(target, -100)
    for reduction in ("mean", "sum"):
        out = linear_robust_cross_entropy(hidden, weight, target, schemes.DM(), bias=bias, reduction=reduction,
                                          chunk_size=4, grad_in_forward=grad_in_forward)
        grads = torch.autograd.grad(out, (hidden, weight, bias))
        assert out.item() == 0.0
        for g in grads:
            assert torch.equal(g, torch.zeros_like(g))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


@pytest.mark.parametrize("grad_in_forward", [None, False])
def test_never_materialises_the_logits(grad_in_forward):
    # N x V = 40000 logits; no tensor of forward or backward may exceed the
    # largest of one chunk of logits (8 x 1000), the weight (V x H) and hidden.
    n, h, v, chunk = 40, 4, 1000, 8
    hidden, weight, bias, target, cw, sw = _inputs(n, h, v, torch.float32)
    with _LargestTensor() as mode:
        out = linear_robust_cross_entropy(hidden, weight, target, schemes.DM(), bias=bias, class_weight=cw,
                                          sample_weight=sw, chunk_size=chunk, grad_in_forward=grad_in_forward)
        out.backward()
    assert mode.largest <= max(chunk * v, v * h, n * h)
    assert mode.largest < n * v


def test_bad_inputs_raise():
    hidden, weight, _, target, _, _ = _inputs(5, 3, 4, torch.float32)
    bad = target.clone()
    bad[2] = 4
    for backend in BACKENDS:
        with pytest.raises(IndexError, match="4"):
            linear_robust_cross_entropy(hidden, weight, bad, schemes.DM(), backend=backend)
    with pytest.raises(ValueError, match="target shape"):
        linear_robust_cross_entropy(hidden, weight, target[:4], schemes.DM())
    with pytest.raises(ValueError, match="weight must have shape"):
        linear_robust_cross_entropy(hidden, weight.t(), target, schemes.DM())
    with pytest.raises(TypeError, match="dtype"):
        linear_robust_cross_entropy(hidden, weight.double(), target, schemes.DM())
    with pytest.raises(ValueError, match="grad_in_forward"):
        linear_robust_cross_entropy(hidden, weight, target, schemes.DM(), reduction="none", grad_in_forward=True)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_robust_cross_entropy(hidden, weight, target, schemes.DM(), chunk_size=0)


def test_no_grad_forward_matches():
    hidden, weight, bias, target, cw, sw = _inputs(12, 5, 7, torch.float64)
    with torch.no_grad():
        out = linear_robust_cross_entropy(hidden, weight, target, schemes.DM(), bias=bias, class_weight=cw,
                                          sample_weight=sw, chunk_size=5)
        ref = _materialised(hidden, weight, bias, target, schemes.DM(), cw, sw)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("grad_in_forward", [None, False])
def test_compile_fullgraph_with_ignored_targets(grad_in_forward):
    # fullgraph=True fails on any graph break; aot_eager traces forward and
    # backward through AOTAutograd without spending CI time in inductor codegen.
    hidden, weight, _, target, _, sw = _inputs(20, 6, 9, torch.float32, bias=False)
    target[:3] = -100

    def f(h, w, t, s):
        return linear_robust_cross_entropy(h, w, t, schemes.DM(), sample_weight=s, chunk_size=8,
                                           grad_in_forward=grad_in_forward)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(hidden, weight, target, sw)
    g = torch.autograd.grad(out, (hidden, weight))
    ref = f(hidden, weight, target, sw)
    gr = torch.autograd.grad(ref, (hidden, weight))
    torch.testing.assert_close(out, ref)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_first_call_in_a_fresh_process():
    """Nothing on the compiled path reads files or caches lazily (a first call in a fresh process once
    traced ``open('/proc/cpuinfo')``): bfloat16 and float32, each process's first loss call compiled."""
    code = (
        "import torch\n"
        "from robustloss_fast import schemes\n"
        "from robustloss_fast.linear import linear_robust_cross_entropy as f\n"
        "for dt in (torch.bfloat16, torch.float32):\n"
        "    h = torch.randn(12, 8, dtype=dt, requires_grad=True)\n"
        "    w = torch.randn(9, 8, dtype=dt, requires_grad=True)\n"
        "    t = torch.randint(0, 9, (12,))\n"
        "    g = torch.compile(lambda h, w, t: f(h, w, t, schemes.DM(), chunk_size=4), fullgraph=True,\n"
        "                      backend='aot_eager')\n"
        "    torch.autograd.grad(g(h, w, t), (h, w))\n"
        "print('ok')\n"
    )
    import os
    import subprocess
    import sys

    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.parametrize("grad_in_forward", [None, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_parity_float32_every_backend(backend, reduction, grad_in_forward):
    # Each backend's tensors on the device the registry gives it: Triton's on CUDA with a GPU, on
    # the CPU under its interpreter (conftest sets TRITON_INTERPRET=1 without one): tiny sizes.
    hidden, weight, bias, target, cw, sw = _inputs(11, 4, 9, torch.float32, device=backend.device)
    got, want = _both(hidden, weight, bias, target, schemes.DM(), cw, sw, lambda r: torch.randn_like(r),
                      reduction=reduction, chunk_size=4, grad_in_forward=grad_in_forward, backend=backend.name)
    _close(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("upcast", [True, False])
def test_grad_weight_accumulator_both_16bit_paths(upcast):
    # The CPU path (float32 GEMM on upcast chunks) and the GPU path (16-bit GEMM
    # per vocabulary block, added in float32), each with a decay factor.
    from robustloss_fast.linear import _add_product

    v, h, c = 9000, 8, 16  # two vocabulary blocks and a short one
    acc = torch.randn(v, h, dtype=torch.float64).float()
    gl = torch.randn(c, v).bfloat16()
    x = torch.randn(c, h).bfloat16()
    decay = torch.tensor(0.375)
    want = 0.375 * acc.double() + gl.double().t() @ x.double()
    _add_product(acc, gl.t(), x, decay, upcast=upcast)
    assert acc.dtype == torch.float32
    tol = 1e-5 if upcast else 2e-2  # the 16-bit GEMM rounds each block product once
    torch.testing.assert_close(acc.double(), want, rtol=tol, atol=tol)


def test_process_group_uses_distributed_finalize(monkeypatch):
    # The wiring only (multi-process runs are tests/test_distributed.py's job):
    # with a process_group the cross-row step goes through
    # distributed.finalize_distributed, and the recompute path is used.
    from robustloss_fast import _finalize, distributed

    calls = []

    def spy(rows, target, spec, weight, sample_weight, group):
        calls.append((rows.shape, spec.reduction, spec.normalize, group))
        return _finalize.finalize(rows, target, spec, weight, sample_weight)

    monkeypatch.setattr(distributed, "finalize_distributed", spy)
    hidden, weight, bias, target, cw, sw = _inputs(10, 3, 6, torch.float64)
    group = object()
    got, want = _both(hidden, weight, bias, target, schemes.DM(), cw, sw, lambda r: torch.randn_like(r),
                      chunk_size=4, process_group=group)
    _close(got, want, rtol=1e-10, atol=1e-13)
    assert calls == [((10, ROW_COLS), 1, True, group)]
    with pytest.raises(ValueError, match="process_group"):
        linear_robust_cross_entropy(hidden, weight, target, schemes.DM(), process_group=group, grad_in_forward=True)


@pytest.mark.parametrize("grad_in_forward", [None, False])
def test_nan_stays_in_its_row_without_normaliser(grad_in_forward):
    # SPEC §6: a NaN hidden state makes its own row NaN; with "sum" no other
    # row's grad_hidden is touched (with the normalised mean, D spreads it).
    hidden, weight, _, target, _, _ = _inputs(10, 3, 5, torch.float64, bias=False)
    hidden = hidden.detach().clone()
    hidden[3, 1] = float("nan")
    hidden.requires_grad_()
    out = linear_robust_cross_entropy(hidden, weight, target.clamp(min=0), schemes.DM(), reduction="sum",
                                      chunk_size=4, grad_in_forward=grad_in_forward)
    (gh,) = torch.autograd.grad(out, hidden)
    assert torch.isnan(out)
    assert torch.isnan(gh).any(1).tolist() == [i == 3 for i in range(10)]


@pytest.mark.parametrize("weights", ["none", "class"])  # the fixed reference, the running one
@pytest.mark.parametrize("nan_chunk", [0, 2])
@pytest.mark.parametrize("grad_in_forward", [None, False])
def test_nan_reaches_every_row_through_the_normaliser(grad_in_forward, nan_chunk, weights):
    # SPEC §5-§6 with the normalised mean: a NaN row makes D NaN, so the value, grad_weight,
    # grad_bias and every active row's grad_hidden are NaN, as on the materialised logits;
    # ignored rows (counted nowhere) keep a zero gradient. Whether the NaN chunk comes first
    # or after the others, and a chunk of ignored rows only (rows 4-7).
    hidden, weight, bias, target, cw, _ = _inputs(12, 3, 5, torch.float64)
    hidden = hidden.detach().clone()
    hidden[4 * nan_chunk + 1, 1] = float("nan")
    hidden.requires_grad_()
    target = target.clamp(min=0)
    target[[2, 4, 5, 6, 7, 11]] = -100
    cw = cw if weights == "class" else None
    got, want = _both(hidden, weight, bias, target, schemes.DM(), cw, None, lambda r: torch.ones_like(r),
                      chunk_size=4, grad_in_forward=grad_in_forward)
    (v1, (gh1, gw1, gb1)), (v2, (gh2, gw2, gb2)) = got, want
    assert v1.isnan() and v2.isnan()
    assert gw1.isnan().all() and gw2.isnan().all() and gb1.isnan().all() and gb2.isnan().all()
    ignored = target == -100
    assert gh2[~ignored].isnan().all() and (gh2[ignored] == 0).all()  # the reference's pattern
    assert gh1[~ignored].isnan().all() and (gh1[ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", [schemes.DM(), schemes.DM(beta=1000.0)], ids=["fixed", "running"])
@pytest.mark.parametrize("grad_in_forward", [None, False])
def test_a_nan_in_an_ignored_row_reaches_grad_weight(grad_in_forward, scheme, backend):
    # An ignored row's logit gradient is 0, and 0 x its NaN hidden state is NaN in grad_weight on
    # the materialised logits: so here, even when its chunk has nothing active and the running
    # normaliser's first factor (0) meets what that chunk summed.
    hidden, weight, bias, target, _, _ = _inputs(12, 3, 5, torch.float64)
    hidden = hidden.detach().clone()
    hidden[1, 1] = float("nan")
    hidden.requires_grad_()
    target = target.clamp(min=0)
    target[:4] = -100  # the first chunk: ignored rows only
    got, want = _both(hidden, weight, bias, target, scheme, None, None, lambda r: torch.ones_like(r),
                      chunk_size=4, grad_in_forward=grad_in_forward, backend=backend)
    (v1, g1), (v2, g2) = got, want
    assert g2[1].isnan().any()  # the reference's NaN: this test can fail
    torch.testing.assert_close(v1, v2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", [schemes.DM(), schemes.DM(beta=1000.0)], ids=["fixed", "running"])
@pytest.mark.parametrize("where", ["sample", "class"])
@pytest.mark.parametrize("inf_chunk", [0, 2])
@pytest.mark.parametrize("grad_in_forward", [None, False])
def test_an_infinite_weight_is_nan_in_its_own_rows_only(grad_in_forward, inf_chunk, where, scheme, backend):
    # An infinite weight makes D infinite: on materialised logits every other row's coefficient
    # s_i w_i / D is 0 and the infinite row's own is inf / inf = NaN. The chunked normaliser must
    # not turn that into NaN everywhere (exp(inf - inf) when moving a chunk to the reference):
    # the fixed reference (R = log sum|s| + max log w is +inf too) and the running one.
    hidden, weight, bias, target, cw, sw = _inputs(12, 3, 5, torch.float64)
    target = target.clamp(min=0)
    target[[2, 6]] = -100
    row = 4 * inf_chunk + 1
    if where == "sample":
        sw = sw.clone()
        sw[row] = math.inf
    else:
        cw = cw.clone()
        cw[target[row]] = math.inf
    got, want = _both(hidden, weight, bias, target, scheme, cw, sw, lambda r: torch.ones_like(r),
                      chunk_size=4, grad_in_forward=grad_in_forward, backend=backend)
    (v1, (gh1, gw1, gb1)), (v2, (gh2, gw2, gb2)) = got, want
    assert v1.isnan() and v2.isnan()
    nan_rows = gh2.isnan().any(1)
    infinite_rows = (target == target[row]) if where == "class" else torch.arange(12) == row
    assert nan_rows.tolist() == infinite_rows.tolist()  # the reference's pattern
    assert gh1.isnan().any(1).tolist() == nan_rows.tolist()
    torch.testing.assert_close(gh1, gh2, equal_nan=True)  # the other rows: 0, as the reference's
    assert (gh1[~nan_rows] == 0).all()
    torch.testing.assert_close(gw1, gw2, equal_nan=True)
    torch.testing.assert_close(gb1, gb2, equal_nan=True)


BOUNDED = [schemes.DM(), schemes.DM(lam=0.0, beta=-3.0), schemes.DM(lam=2.5, beta=5.0), schemes.IMAE(T=-4.0),
           schemes.DMExponential(beta=6.0), schemes.DMNormal(psi=0.2, beta=7.0), schemes.DMNormal(psi=0.9, beta=3.0)]


@pytest.mark.parametrize("scheme", BOUNDED + [schemes.DMBeta(), schemes.CCE(), schemes.GCE()], ids=repr)
def test_log_weight_range_bounds_and_attains(scheme):
    # The bounds the fixed reference rests on, against the reference's log w on a fine grid of p
    # (and None for the formulas with log p or log q in them).
    from robustloss_fast import reference

    spec = rf.functional.kernel_spec(scheme, normalize=True)
    bounds = spec.log_weight_range
    if scheme not in BOUNDED:
        assert bounds is None
        return
    p = torch.linspace(0, 1, 200001, dtype=torch.float64)
    q = 1 - p
    lw = reference.log_weight(int(spec.kernel), spec.a, spec.b, p.log(), q.log(), p, q)
    lo, hi = bounds
    assert lw.min().item() >= lo - 1e-12 and lw.max().item() <= hi + 1e-12
    assert lw.min().item() <= lo + 1e-8 and lw.max().item() >= hi - 1e-8


@pytest.mark.parametrize("dtype,tol", [(torch.float64, (1e-9, 1e-12)), (torch.float32, (2e-5, 2e-5)),
                                       (torch.bfloat16, (3e-2, 3e-2))])
@pytest.mark.parametrize("scheme", BOUNDED, ids=repr)
def test_fixed_reference_parity(backend, returns_of, scheme, dtype, tol):
    # Bounded emphasis, no class or sample weights: every chunk scaled against the host's
    # R = log N + max log w (no rescale across chunks), ignored rows, bias, a random upstream.
    seen = returns_of(linear, "_fixed_reference")
    hidden, weight, bias, target, _, _ = _inputs(23, 6, 11, dtype, device=backend.device)
    got, want = _both(hidden, weight, bias, target, scheme, None, None, lambda r: torch.randn_like(r),
                      chunk_size=5, backend=backend.name)
    assert len(seen) == 1 and seen[0] is not None
    _close(got, want, rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("weights,dtype,tol", [
    ("class", torch.float64, (1e-9, 1e-12)), ("class", torch.float32, (2e-5, 2e-5)),
    ("sample", torch.float64, (1e-9, 1e-12)), ("sample", torch.float32, (2e-5, 2e-5)),
    ("class", torch.bfloat16, (3e-2, 3e-2)), ("sample", torch.bfloat16, (3e-2, 3e-2)),
    ("signed", torch.float64, (1e-9, 1e-12)),  # class and signed sample weights: the value cancels
    ("huge_class", torch.float32, (2e-5, 2e-5)),  # weights of 1e30, 69 nats from 1
], ids=str)  # fmt: skip
def test_fixed_reference_with_weights(backend, returns_of, weights, dtype, tol):
    # With class or sample weights R = log sum |s_i| + max log w is summed on the device before the
    # first chunk (a tensor: no host synchronisation), and still nothing is rescaled across chunks:
    # every chunk's factor exp(L_k - R) is at most 1, so none can overflow.
    seen = returns_of(linear, "_fixed_reference")
    factors = returns_of(linear, "_shares")
    hidden, weight, bias, target, cw, sw = _inputs(23, 6, 11, dtype, device=backend.device)
    if weights in ("class", "huge_class"):
        sw = None
    if weights == "huge_class":
        cw = cw.clone()
        cw[::2] *= 1e30
    if weights == "sample":
        cw, sw = None, sw.abs() + 0.1
    got, want = _both(hidden, weight, bias, target, schemes.DM(), cw, sw, lambda r: torch.randn_like(r),
                      chunk_size=5, backend=backend.name)
    assert len(seen) == 1 and isinstance(seen[0], torch.Tensor) and seen[0].device == hidden.device
    assert factors and all(float(f.max()) <= 1 + 1e-6 for f in factors), [float(f.max()) for f in factors]
    assert all(torch.isfinite(g).all() for g in got[1])
    _close(got, want, rtol=tol[0], atol=tol[1])


def test_fixed_reference_with_weights_counts_only_rows_that_count():
    # S = sum |s_i| over valid rows: an ignored row's NaN sample weight is not read, a NaN one on a
    # valid row makes R NaN (it reaches D), no row that counts gives -inf, and a target outside
    # [0, V) is left to the row pass (the class-weight gather does not fault on it).
    spec = rf.functional.kernel_spec(schemes.DM(), normalize=True)
    hi = spec.log_weight_range[1]
    target = torch.tensor([0, 1, -100, 2])
    cw = torch.tensor([1.0, 2.0, 3.0])
    sw = torch.tensor([1.0, -3.0, math.nan, 0.5])
    r = linear._fixed_reference(spec, target, cw, sw, torch.float32, 2)
    assert r.item() == pytest.approx(math.log(1.0 + 6.0 + 1.5) + hi, rel=1e-6)
    sw_nan = torch.tensor([1.0, math.nan, 1.0, 1.0])
    assert linear._fixed_reference(spec, target, cw, sw_nan, torch.float32, 2).isnan()
    none = linear._fixed_reference(spec, torch.full((4,), -100), cw, sw, torch.float32, 2)
    assert none.item() == -math.inf
    bad = linear._fixed_reference(spec, torch.tensor([0, 7, -100, 2]), cw, None, torch.float32, 2)
    assert bad.item() == pytest.approx(math.log(1.0 + 3.0) + hi, rel=1e-6)
    # One chunk: nothing to rescale across chunks, so no sum of the weights either; nor, without
    # weights, the host's R, whose exp(R - log D) would round every held 16-bit gradient twice.
    assert linear._fixed_reference(spec, target, cw, sw, torch.float32, 1) is None
    assert linear._fixed_reference(spec, target, None, None, torch.bfloat16, 1) is None
    assert linear._fixed_reference(spec, target, None, None, torch.bfloat16, 2) is not None


def test_one_chunk_holds_bfloat16_grad_weight_but_not_float16(monkeypatch):
    # One chunk's grad_weight comes from one GEMM: held in bfloat16 on any device that does not upcast
    # the product, a GPU whose GEMM could write float32 included. Not float16: its unnormalised
    # "mean" leaves the divisor to backward, and N x the gradient would pass float16's 65504.
    monkeypatch.setitem(linear._FP32_OUT_GEMM, "cuda", True)
    assert linear._held_16bit(torch.bfloat16, "cuda", True) == (True, True)
    assert linear._held_16bit(torch.bfloat16, "cuda", False) == (True, False)
    assert linear._held_16bit(torch.float16, "cuda", True) == (True, False)
    assert linear._held_16bit(torch.float32, "cuda", True) == (False, False)


def test_fixed_reference_limits_with_and_without_weights():
    # DM(lam=1): hi - lo = beta / 4. With weights R may lie at most 10 nats above the running
    # normaliser (beta = 36: 9, beta = 44: 11); without, hi - lo + log N at most 30 (N = 1000: 6.9).
    target = torch.zeros(1000, dtype=torch.long)
    cw = torch.ones(3)
    for beta, weighted in ((36.0, True), (44.0, False), (92.0, False)):
        spec = rf.functional.kernel_spec(schemes.DM(beta=beta), normalize=True)
        got = linear._fixed_reference(spec, target, cw, None, torch.float32, 4)
        assert isinstance(got, torch.Tensor) if weighted else got is None, (beta, got)
        unweighted = linear._fixed_reference(spec, target, None, None, torch.float32, 4)
        assert (unweighted is None) == (beta / 4 + math.log(1000) > 30), (beta, unweighted)


@pytest.mark.parametrize("case", ["weights_span", "beta_1000", "float16", "unbounded"])
def test_running_reference_where_no_fixed_one_is_safe(returns_of, case):
    # Each of these falls back to the running normaliser, and stays exact: a fixed reference
    # would span e^-50 (beta = 200, class weights) or e^-250 (beta = 1000), underflow a float16
    # chunk gradient, or has no bound at all (CCE's log w = log 2q).
    seen = returns_of(linear, "_fixed_reference")
    dtype = torch.float16 if case == "float16" else torch.float64
    hidden, weight, bias, target, cw, _ = _inputs(23, 6, 11, dtype)
    scheme = {"beta_1000": schemes.DM(beta=1000.0), "weights_span": schemes.DM(beta=200.0),
              "unbounded": schemes.CCE()}.get(case, schemes.DM())  # fmt: skip
    if case != "weights_span":
        cw = None
    got, want = _both(hidden, weight, bias, target, scheme, cw, None, lambda r: torch.randn_like(r),
                      chunk_size=5, normalize=True)
    assert seen == [None]
    tol = (5e-3, 5e-3) if dtype == torch.float16 else (1e-9, 1e-12)
    _close(got, want, rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
@pytest.mark.parametrize("grad_in_forward", [None, False])
def test_inductor_never_reads_an_uninitialised_sum(nan_filled_empty, monkeypatch, grad_in_forward, dtype):
    # Inductor lowers a small addmm to beta * acc + a @ b, where beta = 0 does not hide an
    # uninitialised NaN: compiled, the first chunk's product must not rely on beta = 0.
    # V = 1 and 1-row chunks take that lowering on CPU; torch.empty returns NaNs here.
    # float16 (no native float16 GEMM here): the products in float32 blocks, _upcast_product's.
    from robustloss_fast import linear

    monkeypatch.setitem(linear._CPU_FAST_16BIT, torch.float16, False)
    hidden = torch.randn(3, 4, dtype=dtype, requires_grad=True)
    weight = torch.randn(1, 4, dtype=dtype, requires_grad=True)
    target = torch.zeros(3, dtype=torch.long)

    def f(h, w):
        return linear_robust_cross_entropy(h, w, target, schemes.CCE(), reduction="sum", chunk_size=1,
                                           grad_in_forward=grad_in_forward)

    torch._dynamo.reset()
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(hidden, weight), (hidden, weight))
    want = torch.autograd.grad(f(hidden, weight), (hidden, weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_fixed_reference_all_ignored_is_zero():
    hidden, weight, bias, target, _, _ = _inputs(12, 3, 7, torch.float64)
    target = torch.full_like(target, -100)
    out = linear_robust_cross_entropy(hidden, weight, target, schemes.DM(), bias=bias, chunk_size=5)
    grads = torch.autograd.grad(out, (hidden, weight, bias))
    assert out.item() == 0.0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def _capped_reference(hidden, weight, bias, target, scheme, cw, sw, cap, **kw):
    logits = hidden @ weight.t() if bias is None else torch.addmm(bias, hidden, weight.t())
    logits = cap * torch.tanh(logits / cap)
    return rf.robust_cross_entropy(logits, target, scheme, weight=cw, sample_weight=sw, backend="torch", **kw)


def _softcap_both(dtype, scheme, cap, reduction, grad_in_forward, backend="auto", scale=4.0, **kw):
    # scale spreads the logits well past the cap, where tanh bends.
    hidden, weight, bias, target, cw, sw = _inputs(29, 6, 13, dtype)
    hidden = (hidden.detach() * scale).requires_grad_()
    params = (hidden, weight, bias)
    out = linear_robust_cross_entropy(hidden, weight, target, scheme, bias=bias, class_weight=cw, sample_weight=sw,
                                      reduction=reduction, chunk_size=5, grad_in_forward=grad_in_forward,
                                      backend=backend, softcap=cap, **kw)
    ref = _capped_reference(hidden, weight, bias, target, scheme, cw, sw, cap, reduction=reduction, **kw)
    g = torch.randn_like(ref)
    return (out, torch.autograd.grad(out, params, g)), (ref, torch.autograd.grad(ref, params, g))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad_in_forward", [None, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("scheme", [schemes.CCE(), schemes.GCE(q=0.6), schemes.DM(lam=0.5, beta=6.0)], ids=repr)
def test_softcap_parity_float64(scheme, reduction, grad_in_forward, backend):
    got, want = _softcap_both(torch.float64, scheme, 3.0, reduction, grad_in_forward, backend)
    _close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("grad_in_forward", [None, False])
def test_softcap_parity_label_smoothing(grad_in_forward):
    got, want = _softcap_both(torch.float64, schemes.CCE(), 2.5, "mean", grad_in_forward, label_smoothing=0.2)
    _close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("grad_in_forward", [None, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_softcap_parity_low_precision(dtype, tol, grad_in_forward):
    got, want = _softcap_both(dtype, schemes.DM(), 5.0, "mean", grad_in_forward)
    _close(got, want, rtol=tol, atol=tol)


def test_softcap_changes_the_loss_and_is_validated():
    # A cap far above every logit is the identity to float64 rounding; a small
    # one must change the value (so the parity tests above cannot pass vacuously).
    hidden, weight, bias, target, _, _ = _inputs(16, 4, 7, torch.float64)
    kw = dict(bias=bias, chunk_size=5)
    plain = linear_robust_cross_entropy(hidden, weight, target, schemes.CCE(), **kw)
    far = linear_robust_cross_entropy(hidden, weight, target, schemes.CCE(), softcap=1e6, **kw)
    near = linear_robust_cross_entropy(hidden, weight, target, schemes.CCE(), softcap=0.5, **kw)
    torch.testing.assert_close(far, plain, rtol=1e-9, atol=1e-12)
    assert abs(near.item() - plain.item()) > 1e-2
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap"):
            linear_robust_cross_entropy(hidden, weight, target, schemes.CCE(), softcap=bad)
    for bad in (True, "30"):  # not a number at all: a TypeError, as for every scalar argument
        with pytest.raises(TypeError, match="softcap"):
            linear_robust_cross_entropy(hidden, weight, target, schemes.CCE(), softcap=bad)
    torch.testing.assert_close(
        linear_robust_cross_entropy(hidden, weight, target, schemes.CCE(), softcap=torch.tensor(0.5), **kw), near
    )
    module = LinearRobustCrossEntropyLoss(schemes.CCE(), chunk_size=5, softcap=0.5)
    torch.testing.assert_close(module(hidden, weight, target, bias=bias), near)


@pytest.mark.parametrize("grad_in_forward", [None, False])
def test_softcap_compile_fullgraph(grad_in_forward):
    # The in-place cap and its chain rule must trace without a graph break.
    hidden, weight, _, target, _, _ = _inputs(20, 6, 9, torch.float32, bias=False)

    def f(h, w, t):
        return linear_robust_cross_entropy(h, w, t, schemes.DM(), chunk_size=8, softcap=1.5,
                                           grad_in_forward=grad_in_forward)

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(hidden, weight, target)
    g = torch.autograd.grad(out, (hidden, weight))
    ref = _capped_reference(hidden, weight, None, target, schemes.DM(), None, None, 1.5)
    gr = torch.autograd.grad(ref, (hidden, weight))
    torch.testing.assert_close(out, ref)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b)


def test_cpu_16bit_gemm_needs_onednn(monkeypatch):
    # Without oneDNN ATen's bfloat16 GEMM is a slow fallback: the upcast must be chosen then.
    from robustloss_fast import linear

    monkeypatch.setitem(linear._CPU_FAST_16BIT, torch.bfloat16, True)
    if torch.backends.mkldnn.is_available():
        assert linear._cpu_fast_16bit_gemm(torch.bfloat16)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert not linear._cpu_fast_16bit_gemm(torch.bfloat16)


@pytest.mark.parametrize("fast", [True, False])
def test_cpu_16bit_grad_weight_path_follows_the_cpu(monkeypatch, fast):
    # The default on CPU is the 16-bit GEMM exactly when the CPU multiplies
    # bfloat16 natively, else the float32 GEMM on upcast copies.
    from robustloss_fast import linear

    monkeypatch.setitem(linear._CPU_FAST_16BIT, torch.bfloat16, fast)
    gl, x = torch.randn(16, 9000).bfloat16(), torch.randn(16, 8).bfloat16()
    got, want = torch.zeros(9000, 8), torch.zeros(9000, 8)
    linear._add_product(got, gl.t(), x)
    linear._add_product(want, gl.t(), x, upcast=not fast)
    assert torch.equal(got, want)
    other = torch.zeros(9000, 8)
    linear._add_product(other, gl.t(), x, upcast=fast)
    assert not torch.equal(got, other)  # the two paths do differ: the check above can fail


# (float32 result, beta, bias): a float32 result is accumulated into or, at beta = 0, written
# unread; a 16-bit one is written, with or without a bias.
UPCAST_PRODUCTS = [(True, 0.0, False), (True, 1.0, False), (True, 0.375, False), (False, 0.0, False),
                   (False, 0.0, True)]  # fmt: skip


@pytest.mark.parametrize("direct,beta,with_bias", UPCAST_PRODUCTS)
@pytest.mark.parametrize("m,k,n", [(11, 13, 17), (1, 30, 9), (12, 0, 7)])
def test_upcast_product_in_blocks(nan_filled_empty, monkeypatch, direct, beta, with_bias, m, k, n):
    # Blocks of 5: every dimension has several and a short last one (or, k = 0, none: beta alone
    # applies). NaN-filled empties: an unread result or block that were read would bring NaN in.
    from robustloss_fast import linear

    monkeypatch.setattr(linear, "_UPCAST_BLOCK", 5)
    a = torch.randn(m, k).bfloat16()
    b = torch.randn(n, k).bfloat16().t()  # a transposed view, as the logits' weight.t()
    bias = torch.randn(n).bfloat16() if with_bias else None
    start = torch.randn(m, n)
    want = a.double() @ b.double() + (0 if bias is None else bias.double())
    if direct:
        out = torch.empty(m, n) if beta == 0.0 else start.clone()
        want = want + (beta * start.double() if beta else 0)
    else:
        out = torch.empty(m, n, dtype=torch.bfloat16)
    linear._upcast_product(out, a, b, beta, bias)
    if direct:
        torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-5)
    else:  # the float32 sum rounded once: within half a bfloat16 ulp of the exact value
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), want, rtol=2**-8, atol=1e-5)


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
@pytest.mark.parametrize("reference,bound", [("fixed", 16), ("fixed_weighted", 16), ("running", 20)])
def test_a_chunk_costs_a_bounded_number_of_torch_ops(monkeypatch, reference, bound):
    """The gradient-in-forward path of the normalised DM with the Triton backend: each more chunk adds its
    three Triton kernels (rows, cross-row step, gradient), its matmuls and a few scalar ops that move the
    chunk to the running normaliser -- counted with the CPU profiler, 4 against 8 chunks of 8 rows. The
    interpreter's own copies around each launch and the CPU-only host check of the targets (neither exists
    on a GPU) are not counted."""
    reason = backends.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(f"backend 'triton' is unavailable here: {reason}")
    from robustloss_fast.backends.triton import ops

    device = device_of("triton")
    monkeypatch.setattr(ops, "_check_targets_here", lambda *a: None)
    monkeypatch.setattr(ops, "_assert_targets_on_device", lambda rows: None)
    mark_triton_launches(monkeypatch, device)
    free = {"empty", "empty_strided", "empty_like", "new_empty", "view", "as_strided", "slice", "select", "t",
            "transpose", "detach", "reshape", "_reshape_alias", "expand", "alias", "to", "contiguous", "unsqueeze",
            "squeeze", "narrow", "resolve_conj", "resolve_neg", "lift_fresh"}  # fmt: skip

    def computing_ops(chunks):
        n = 8 * chunks
        h = torch.randn(n, 4, device=device, requires_grad=True)
        w = torch.randn(10, 4, device=device, requires_grad=True)
        t = torch.randint(0, 10, (n,), device=device)
        # beta = 1000 takes the running normaliser (a fixed reference would span e^-250); class weights
        # a fixed reference summed on the device once, not per chunk.
        scheme = schemes.DM(beta=1000.0) if reference == "running" else schemes.DM()
        cw = torch.rand(10, device=device) + 0.5 if reference == "fixed_weighted" else None
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            linear_robust_cross_entropy(h, w, t, scheme, class_weight=cw, chunk_size=8, backend="triton").backward()
        return [name for name in aten_outside_launches(prof) if name not in free]

    computing_ops(2)  # warm: compile and cache the kernels
    few, many = computing_ops(4), computing_ops(8)
    per_chunk = (len(many) - len(few)) / 4
    # Here (torch 2.13, interpreter) 16 with the fixed reference: 3 matmuls (mm, mm, addmm_), the
    # normaliser's logaddexp, the chunk's share (eq, sub, exp, where: linear._shares) and nested calls
    # (to -> _to_copy/copy_). The running one adds the stack of the pair, the decay of grad_bias, and
    # the CPU-only read of the decay for the GEMM's beta (item): 19-20. Comparing each share with -inf
    # on its own cost 40; the tensor-op cross-row step before the one-kernel one about 90 more.
    assert per_chunk <= bound, (per_chunk, sorted(set(many)))


class _ChunkAllocations(TorchDispatchMode):
    """Tensors of ``shape`` that ops allocate (views, in-place and ``out=`` calls write into existing ones)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.fresh = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        writes_existing = func.is_view or func._overloadname.startswith("out") or func.__name__.split(".")[0].endswith("_")
        if not writes_existing and isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
            self.fresh.append(func.__name__)
        return out


@pytest.mark.parametrize("grad_in_forward", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_chunks_share_one_logits_buffer(monkeypatch, grad_in_forward, dtype):
    # 5 chunks of 8 rows x 300 classes: one chunk-sized allocation a pass, not one per chunk (on a
    # CPU each large one is a fresh mapping that page-faults on first touch). Native bfloat16
    # GEMMs: upcast ones make block-sized float32 copies (chunk-sized, at these sizes).
    monkeypatch.setitem(linear._CPU_FAST_16BIT, torch.bfloat16, True)
    if dtype == torch.bfloat16 and not linear._cpu_fast_16bit_gemm(torch.bfloat16):
        pytest.skip("no native bfloat16 GEMM here: the upcast products copy blocks as large as a chunk")
    hidden, weight, bias, target, _, _ = _inputs(40, 16, 300, dtype)
    with _ChunkAllocations((8, 300)) as seen:
        out = linear_robust_cross_entropy(hidden, weight, target, schemes.DM(), bias=bias, chunk_size=8,
                                          grad_in_forward=grad_in_forward)
        forward = len(seen.fresh)
        torch.autograd.grad(out, (hidden, weight, bias))
    assert forward == 1, seen.fresh
    assert len(seen.fresh) == (1 if grad_in_forward else 2), seen.fresh


class _BigOps(TorchDispatchMode):
    """Ops other than views that touch a tensor of at least ``numel`` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat = list(args) + list((kwargs or {}).values())
        if not func.is_view and any(isinstance(x, torch.Tensor) and x.numel() >= self.numel for x in flat):
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme,reduction", [(schemes.CCE(), "mean"), (schemes.CCE(), "sum"), (schemes.DM(), "mean")],
                         ids=["cce-mean", "cce-sum", "dm-mean"])
def test_a_unit_factor_leaves_backward_nothing_to_do(monkeypatch, dtype, scheme, reduction):
    # One chunk (its normaliser is the batch's) or no normaliser, "mean"'s divisor carried by the
    # chunks' coefficients, upstream gradient 1, on a CPU: backward returns the gradients made in
    # forward without a pass over them (here 96 x 80 and 200 x 80 values).
    monkeypatch.setitem(linear._CPU_FAST_16BIT, torch.bfloat16, True)
    if dtype == torch.bfloat16 and not linear._cpu_fast_16bit_gemm(torch.bfloat16):
        pytest.skip("no native bfloat16 GEMM here: the products are upcast and summed in float32")
    hidden, weight, _, target, cw, sw = _inputs(96, 80, 200, dtype, bias=False)
    out = linear_robust_cross_entropy(hidden, weight, target, scheme, class_weight=cw, sample_weight=sw,
                                      reduction=reduction)
    with _BigOps(96 * 80) as ops:
        got = torch.autograd.grad(out, (hidden, weight))
    assert ops.seen == [], ops.seen
    ref = _materialised(hidden, weight, None, target, scheme, cw, sw, reduction=reduction)
    want = torch.autograd.grad(ref, (hidden, weight))
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


def test_autocast_gives_the_same_loss_in_one_chunk_or_many():
    # Under autocast the logits are autocast's dtype in every chunk (a shared float32 buffer written
    # with out= would bypass autocast once there are several chunks: 2.6e-4 apart here).
    hidden, weight, bias, target, _, _ = _inputs(64, 32, 50, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        one = linear_robust_cross_entropy(hidden, weight, target, schemes.CCE(), bias=bias)
        many = linear_robust_cross_entropy(hidden, weight, target, schemes.CCE(), bias=bias, chunk_size=16)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)


def test_float16_mean_keeps_small_gradient_entries():
    # CCE "mean" over 4096 rows of 4000 classes: each logit's gradient is ~1/(N V), below float16's
    # smallest normal. The gradient-in-forward path applies the divisor to the products in float32
    # and stays within 0.2% of float64 (3e-4 seen; dividing every chunk's float16 entries first: 1.7%; the
    # recompute path writes the divided entries in float16, as materialised float16 logits do).
    n, h, v = 4096, 16, 4000
    h16 = torch.randn(n, h).half().requires_grad_()
    w16 = (torch.randn(v, h) / h**0.5).half().requires_grad_()
    target = torch.randint(0, v, (n,))
    hidden, weight = (x.detach().double().requires_grad_() for x in (h16, w16))
    truth = torch.autograd.grad(linear_robust_cross_entropy(hidden, weight, target, schemes.CCE()), (hidden, weight))
    got = torch.autograd.grad(linear_robust_cross_entropy(h16, w16, target, schemes.CCE(), chunk_size=1024), (h16, w16))
    errs = [float((g.double() - t).norm() / t.norm()) for g, t in zip(got, truth)]
    assert max(errs) < 2e-3, errs


@pytest.mark.parametrize("shape,per_row", [((6, 40), False), ((6, 40), True), ((301,), False)])
@pytest.mark.parametrize("src_dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                                 (torch.float32, torch.float16)])  # fmt: skip
def test_scale_into_without_a_kernel_is_the_float32_product_rounded_once(monkeypatch, shape, per_row, src_dtype,
                                                                           out_dtype):
    """Where no backend has a scale kernel (backends.fused_scale gives None), ATen's mul computes it, for the
    stored gradients of every shape the layer holds (grad_bias is 1-D), the factor never rounded to 16 bits."""
    monkeypatch.setattr(backends, "fused_scale", lambda device: None)
    src = (torch.randn(shape, dtype=torch.float64) * 3).to(src_dtype)
    f = (torch.rand(shape[0], 1) if per_row else torch.tensor(1.0 + 3 * 2.0**-9)).float()  # rounded to bf16 it would be 1 + 2^-7
    out = src.clone() if src_dtype == out_dtype else torch.empty(shape, dtype=out_dtype)
    linear._scale_into(out if src_dtype == out_dtype else src, f, out)
    assert torch.equal(out, (src.float() * f).to(out_dtype))
