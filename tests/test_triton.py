"""The Triton backend against the pure-PyTorch reference (SPEC parity).

Without a GPU these run under the Triton interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1 when there is no nvidia-smi); with
one they run on CUDA tensors. The interpreter is slow, so shapes are small;
the chunked (online max/sum) path is forced by lowering the tile widths.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import robustloss_fast as rf
from robustloss_fast import _backends, reference
from robustloss_fast.schemes import CCE, DM, GCE, IMAE, MAE, MSE, DMBeta, DMExponential, DMNormal

_REASON = _backends._unavailable_reason("triton")

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(_REASON is not None, reason=f"the Triton backend is unusable here: {_REASON}"),
    # The interpreter evaluates both branches of tl.where in numpy (e.g. log(0)
    # on lanes that are then discarded); numpy warns about those.
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

if _REASON is None:
    from robustloss_fast.triton import kernels as tk
    from robustloss_fast.triton import ops as tops

    DEVICE = "cpu" if tk.INTERPRETED else "cuda"
else:  # pragma: no cover - the module is skipped
    DEVICE = "cpu"

SCHEMES = [
    CCE(),
    MAE(),
    MSE(),
    GCE(q=0.7),
    DM(),
    DM(lam=0.0, beta=3.0),
    DM(lam=2.0, beta=-4.0),
    IMAE(T=6.0),
    DMNormal(psi=0.3, beta=5.0),
    DMExponential(beta=-2.0),
    DMBeta(alpha=1.0, eta=3.0),
    DMBeta(alpha=2.5, eta=1.5),
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (reduction, normalize): normalize only matters for "mean".
MODES = [("none", False), ("sum", False), ("mean", True), ("mean", False)]

# Relative tolerance of the loss (computed in float32 / float64) and of the
# gradient (rounded to the input dtype: one ulp of the format).
_VALUE_RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
_GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _close(actual, expected, rtol, what, scale=None):
    """assert_close with an absolute tolerance of rtol times the size of the numbers involved."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if scale is None:
        finite = expected[torch.isfinite(expected)].double()
        scale = finite.abs().max().item() if finite.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30), equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def _logits(n, c, dtype, scale=3.0):
    """Random logits, a few rows with a large target margin (p -> 1, q tiny)."""
    return (torch.randn(n, c, device=DEVICE) * scale).to(dtype)


def _targets(n, c, ignored=0):
    t = torch.randint(0, c, (n,), device=DEVICE)
    if ignored:
        t[torch.randperm(n, device=DEVICE)[:ignored]] = -100
    return t


def _value_and_grad(backend, x, t, scheme, upstream, **kw):
    xx = x.detach().clone().requires_grad_(True)
    v = rf.robust_cross_entropy(xx, t, scheme, backend=backend, **kw)
    v.backward(upstream if v.dim() else None)
    return v.detach(), xx.grad


def _check_parity(x, t, scheme, what="", **kw):
    ref_v = rf.robust_cross_entropy(x, t, scheme, backend="torch", **kw).detach()
    upstream = torch.randn_like(ref_v) if ref_v.dim() else None
    v, g = _value_and_grad("triton", x, t, scheme, upstream, **kw)
    rv, rg = _value_and_grad("torch", x, t, scheme, upstream, **kw)
    scale = None
    if kw.get("sample_weight") is not None and rv.dim() == 0:
        # Negative sample weights can cancel a sum of large terms; every per-row
        # value here is >= 0, so the same reduction with |sample_weight| is the
        # size of the terms.
        kw_abs = dict(kw, sample_weight=kw["sample_weight"].abs())
        scale = rf.robust_cross_entropy(x, t, scheme, backend="torch", **kw_abs).abs().item()
    _close(v, rv, _VALUE_RTOL[x.dtype], f"value {what}", scale)
    _close(g, rg, _GRAD_RTOL[x.dtype], f"grad {what}")
    return v, g


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_parity_every_scheme_dtype_and_reduction(scheme, dtype):
    n, c = 13, 7
    x = _logits(n, c, dtype)
    t = _targets(n, c, ignored=2)
    rows = torch.arange(n, device=DEVICE)
    # Confident rows: margins of 40 (q ~ e^-40, where 1 - p would be 0 in float32).
    x[rows[:3], t[:3].clamp(min=0)] = 40.0
    weight = torch.rand(c, device=DEVICE) + 0.5
    sample_weight = torch.randn(n, device=DEVICE)  # negative entries included
    for reduction, normalize in MODES:
        _check_parity(
            x, t, scheme, f"{reduction}/{normalize}", weight=weight, sample_weight=sample_weight,
            reduction=reduction, normalize=normalize,
        )


@pytest.mark.parametrize("use_weight", [False, True], ids=["no_weight", "weight"])
@pytest.mark.parametrize("use_sw", [False, True], ids=["no_sw", "sw"])
@pytest.mark.parametrize("ignored", [0, 3], ids=["no_ignore", "ignore"])
@pytest.mark.parametrize("scheme", [CCE(), DM()], ids=repr)
def test_parity_every_flag_combination(scheme, ignored, use_sw, use_weight):
    n, c = 10, 5
    x = _logits(n, c, torch.float32)
    ignore_index = -100 if ignored == 0 else 3  # a non-default ignore_index that is also a class
    t = _targets(n, c)
    if ignored:
        t[:ignored] = ignore_index
    weight = torch.rand(c, device=DEVICE) + 0.1 if use_weight else None
    sw = torch.randn(n, device=DEVICE) if use_sw else None
    for reduction, normalize in MODES:
        _check_parity(
            x, t, scheme, f"{reduction}/{normalize}", weight=weight, sample_weight=sw,
            ignore_index=ignore_index, reduction=reduction, normalize=normalize,
        )


def test_cce_equals_torch_cross_entropy_with_random_upstream_gradient():
    n, c = 12, 6
    x = _logits(n, c, torch.float32)
    t = _targets(n, c, ignored=3)
    weight = torch.rand(c, device=DEVICE) + 0.5
    for reduction in ("none", "mean", "sum"):
        xt = x.clone().requires_grad_(True)
        xr = x.clone().requires_grad_(True)
        v = rf.robust_cross_entropy(xt, t, CCE(), weight=weight, reduction=reduction, backend="triton")
        r = F.cross_entropy(xr, t, weight=weight, reduction=reduction)
        upstream = torch.randn_like(r) if r.dim() else None
        v.backward(upstream)
        r.backward(upstream)
        _close(v.detach(), r.detach(), 2e-5, f"value {reduction}")
        _close(xt.grad, xr.grad, 2e-5, f"grad {reduction}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("c", [1, 2, 3, 7, 33])
def test_parity_small_class_counts(c, dtype):
    n = 9
    x = _logits(n, c, dtype)
    t = _targets(n, c, ignored=1)
    for scheme in (CCE(), DM()):
        for reduction, normalize in MODES:
            _check_parity(x, t, scheme, f"C={c} {reduction}/{normalize}", reduction=reduction, normalize=normalize)


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Tiles of 8 columns: every row below spans several chunks of the online max/sum."""
    monkeypatch.setattr(tops, "MAX_BLOCK_C", 8)
    monkeypatch.setattr(tops, "MAX_BLOCK_C_F64", 8)
    monkeypatch.setattr(tops, "BACKWARD_BLOCK_C", 8)
    assert tops._tile(4, 37, tops.MAX_BLOCK_C)[1] == 8


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_parity_chunked_rows_wider_than_a_block(tiny_blocks, dtype):
    n, c = 8, 37
    x = _logits(n, c, dtype)
    t = _targets(n, c, ignored=1)
    inf = float("-inf")
    # Row 0: the first two chunks are masked (running max still -inf when the
    # first finite logit arrives); row 1: only the target and one class in the
    # last chunk are finite; row 2: target in the last, partial chunk.
    x[0, :16] = inf
    t[0] = 20
    x[1, :] = inf
    t[1] = 3
    x[1, 3] = 0.5
    x[1, 35] = 1.5
    t[2] = 36
    for scheme in (CCE(), DM(), DMBeta(alpha=2.0, eta=3.0)):
        for reduction, normalize in MODES:
            _check_parity(x, t, scheme, f"{reduction}/{normalize}", reduction=reduction, normalize=normalize)


def test_many_rows_span_several_programs():
    n, c = 150, 3  # 64 rows per program: three programs, the last one partial
    x = _logits(n, c, torch.float32)
    t = _targets(n, c, ignored=10)
    for reduction, normalize in MODES:
        _check_parity(x, t, IMAE(), f"{reduction}/{normalize}", reduction=reduction, normalize=normalize)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_masked_classes(dtype):
    n, c = 6, 5
    x = _logits(n, c, dtype)
    t = torch.tensor([0, 1, 2, 3, 4, 0], device=DEVICE)
    x[0, 1:] = float("-inf")  # no finite non-target: G = 0, value 0 for CCE
    x[1, [0, 2]] = float("-inf")
    x[2, :2] = float("-inf")
    x[5, 1:4] = float("-inf")
    for scheme in (CCE(), DM(), MSE()):
        for reduction, normalize in MODES:
            v, g = _check_parity(x, t, scheme, f"{reduction}/{normalize}", reduction=reduction, normalize=normalize)
            assert torch.isfinite(v).all() and torch.isfinite(g).all()
            assert (g[0] == 0).all()
            masked = torch.isinf(x)
            assert (g[masked] == 0).all(), "masked classes must get exactly zero gradient"


def test_single_class_rows_have_zero_gradient():
    x = _logits(5, 1, torch.float32)
    t = torch.zeros(5, dtype=torch.long, device=DEVICE)
    for scheme in (CCE(), DM(beta=3.0)):
        v, g = _check_parity(x, t, scheme, reduction="none")
        assert (g == 0).all()


def test_nan_and_inf_rows_are_isolated():
    n, c = 7, 4
    x = _logits(n, c, torch.float32)
    t = torch.tensor([0, 1, 2, 3, 0, 1, 2], device=DEVICE)
    x[1, 0] = float("nan")  # NaN non-target
    x[2, 2] = float("inf")  # +inf target
    x[3, 1] = float("inf")  # +inf non-target
    x[4, 0] = float("nan")  # NaN target
    bad = torch.tensor([False, True, True, True, True, False, False], device=DEVICE)
    for scheme in (CCE(), DM()):
        for reduction in ("none", "sum"):
            upstream_shape = (n,) if reduction == "none" else ()
            upstream = torch.randn(upstream_shape, device=DEVICE)
            v, g = _value_and_grad("triton", x, t, scheme, upstream if reduction == "none" else None,
                                   reduction=reduction)
            rv, rg = _value_and_grad("torch", x, t, scheme, upstream if reduction == "none" else None,
                                     reduction=reduction)
            assert g[bad].isnan().all(), "every entry of a NaN/+inf row's gradient is NaN"
            assert torch.isfinite(g[~bad]).all(), "other rows stay finite"
            _close(g[~bad], rg[~bad], 2e-5, "finite rows")
            if reduction == "none":
                assert v[bad].isnan().all() and torch.isfinite(v[~bad]).all()
                _close(v[~bad], rv[~bad], 2e-5, "finite values")
        # Through D (normalised mean) the NaN reaches every row, as in the reference.
        _check_parity(x, t, scheme, "mean", reduction="mean", normalize=True)


@pytest.mark.parametrize("reduction,normalize", MODES)
def test_all_ignored_batch_is_zero_not_nan(reduction, normalize):
    x = _logits(5, 4, torch.float32).requires_grad_(True)
    t = torch.full((5,), -100, device=DEVICE)
    v = rf.robust_cross_entropy(x, t, DM(), reduction=reduction, normalize=normalize, backend="triton")
    v.sum().backward()
    assert (v == 0).all()
    assert (x.grad == 0).all()


@pytest.mark.parametrize("bad", [5, -3, 1000])
def test_bad_target_raises_index_error_naming_it(bad):
    x = _logits(4, 5, torch.float32)
    t = torch.tensor([0, 1, bad, 2], device=DEVICE)
    with pytest.raises(IndexError, match=rf"target value {bad}\b.*5 classes"):
        rf.robust_cross_entropy(x, t, DM(), backend="triton")


def test_unbatched_and_spatial_shapes_and_strided_rows():
    c = 6
    x = _logits(3, c, torch.float32)
    _check_parity(x[1], torch.tensor(2, device=DEVICE), DM(), "unbatched")
    x4 = _logits(2, c, torch.float32).reshape(2, c, 1, 1).expand(2, c, 2, 3).contiguous()
    x4 = x4 + torch.randn_like(x4)
    t4 = torch.randint(0, c, (2, 2, 3), device=DEVICE)
    _check_parity(x4, t4, GCE(), "spatial none", reduction="none")
    # Rows with a stride larger than C: a column slice of a wider tensor.
    wide = _logits(7, c + 5, torch.float32)
    _check_parity(wide[:, :c], _targets(7, c), DMNormal(), "strided", reduction="none")


def test_rows_and_stats_match_the_reference_ops():
    n, c = 11, 9
    x = _logits(n, c, torch.float64)
    t = _targets(n, c, ignored=2)
    w = torch.rand(c, device=DEVICE, dtype=torch.float64)
    for scheme in SCHEMES:
        a, b = scheme.kernel_params
        for reduction, normalize in MODES:
            value, stats = torch.ops.robustloss.triton_forward(
                x, t, scheme.kernel_id, a, b, w, None, -100, {"none": 0, "mean": 1, "sum": 2}[reduction], normalize
            )
            rvalue, rstats = reference.forward(
                x, t, scheme.kernel_id, a, b, w, None, -100, {"none": 0, "mean": 1, "sum": 2}[reduction], normalize
            )
            _close(value, rvalue, 1e-10, f"{scheme} value")
            # lse_nt of an ignored row is never read (its gradient row is zero):
            # the kernels write -inf there, the reference a number.
            valid = t != -100
            _close(stats[valid], rstats[valid], 1e-10, f"{scheme} stats")
            assert (stats[~valid, 1] == 0).all()
        rows = torch.ops.robustloss.triton_rows(x, t, scheme.kernel_id, a, b, -100, False)
        valid = t != -100
        y = t.clamp(min=0)
        _, lse_nt, logp, logq, p, q = reference.row_probs(x, y)
        lw = reference.log_weight(scheme.kernel_id, a, b, logp, logq, p, q)
        _close(rows[valid, 0], lse_nt[valid], 1e-10, f"{scheme} lse_nt")
        _close(rows[valid, 1], lw[valid], 1e-10, f"{scheme} log w")
        assert (rows[~valid, 0] == -math.inf).all() and (rows[~valid, 2] == 0).all()


def test_deterministic():
    x = _logits(20, 11, torch.float32)
    t = _targets(20, 11, ignored=2)
    v1, g1 = _value_and_grad("triton", x, t, DM(), None)
    v2, g2 = _value_and_grad("triton", x, t, DM(), None)
    assert torch.equal(v1, v2) and torch.equal(g1, g2)


def test_torch_compile_fullgraph_with_ignored_targets():
    n, c = 9, 6
    x = _logits(n, c, torch.float32)
    t = _targets(n, c, ignored=3)
    w = torch.rand(c, device=DEVICE) + 0.5

    def loss(inp, target, weight):
        return rf.robust_cross_entropy(inp, target, DM(), weight=weight, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    xc = x.clone().requires_grad_(True)
    v = compiled(xc, t, w)
    v.backward()
    rv, rg = _value_and_grad("torch", x, t, DM(), None, weight=w)
    _close(v.detach(), rv, 2e-5, "compiled value")
    _close(xc.grad, rg, 2e-5, "compiled grad")


@pytest.mark.parametrize("z", [math.nan, math.inf])
def test_nan_target_logit_makes_the_row_nan_for_every_scheme(z):
    """SPEC §6 even for DMBeta(1, 1), whose weight formula ignores p, and for the peer losses."""
    for scheme in (DMBeta(alpha=1.0, eta=1.0), rf.Focal(), rf.SCE(), rf.TaylorCE(3), DM()):
        x = torch.tensor([[0.5, z, -0.3, 2.0], [0.1, 0.2, 0.3, 0.4]], requires_grad=True)
        rf.robust_cross_entropy(x, torch.tensor([1, 0]), scheme, reduction="sum", backend="triton").backward()
        assert torch.isnan(x.grad[0]).all(), scheme
        assert torch.isfinite(x.grad[1]).all(), scheme


@pytest.mark.parametrize("dtype,margin", [(torch.float32, 120.0), (torch.float64, 800.0)])
def test_focal_confident_batch_keeps_its_unit_of_gradient(dtype, margin):
    x = torch.zeros(3, 4, dtype=dtype)
    x[:, 0] = margin
    x.requires_grad_()
    t = torch.zeros(3, dtype=torch.long)
    rf.robust_cross_entropy(x, t, rf.Focal(2.0), reduction="mean", normalize=True, backend="triton").backward()
    torch.testing.assert_close(x.grad.abs().sum().item(), 1.0, rtol=1e-5, atol=0)
