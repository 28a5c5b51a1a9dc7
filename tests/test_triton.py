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
from robustloss_fast import backends, reference
from robustloss_fast._common import Kernel, KernelSpec, Reduction
from robustloss_fast.schemes import CCE, DM, GCE, IMAE, MAE, MSE, DMBeta, DMExponential, DMNormal

_REASON = backends.unavailable_reason("triton")

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(_REASON is not None, reason=f"the Triton backend is unusable here: {_REASON}"),
    # The interpreter evaluates both branches of tl.where in numpy (e.g. log(0)
    # on lanes that are then discarded); numpy warns about those.
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

if _REASON is None:
    from robustloss_fast.backends.triton import kernels as tk
    from robustloss_fast.backends.triton import ops as tops

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
# The two-term schemes (label smoothing, NCE/APL) refuse normalize=True.
TWO_TERM_MODES = [m for m in MODES if m[1] is False]
_RED = {"none": 0, "mean": 1, "sum": 2}
# NCE / APL kernel parameters (a, b): NCE, NCE + RCE(A = -4), the paper's CIFAR-100 APL.
TWO_TERM_NCE = [(11, 1.0, 0.0), (11, 1.0, 4.0), (11, 10.0, 0.1)]
# NFL kernel parameters (gamma, b): NFL + b q; gamma = 0 is NCE.
NFL_PARAMS = [(0.5, 0.0), (2.0, 0.0), (0.0, 0.0), (0.5, 0.4), (2.0, 0.4), (0.0, 0.4)]

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
    cases = [(s.kernel_id, *s.kernel_params) for s in SCHEMES] + [(Kernel.CCE_LS, 0.2, 0.0)] + TWO_TERM_NCE
    cases += [(Kernel.NFL, g, b) for g, b in NFL_PARAMS]
    for kid, a, b in cases:
        two_term = Kernel(kid).two_term
        for reduction, normalize in MODES:
            if two_term and reduction == "mean" and normalize:
                continue  # refused: test_two_term_schemes_refuse_normalize
            args = (x, t, kid, a, b, w, None, -100, _RED[reduction], normalize)
            value, stats = torch.ops.robustloss.triton_forward(*args)
            rvalue, rstats = reference.forward(x, t, _spec(kid, a, b, -100, _RED[reduction], normalize), w, None)
            _close(value, rvalue, 1e-10, f"{kid} value")
            assert stats.shape == (n, 4)
            # Ignored rows: (-inf, 0, 0, 0) in both.
            _close(stats, rstats, 1e-10, f"{kid} stats")
        for u in (None, w) if two_term else (None,):
            rows = torch.ops.robustloss.triton_rows(x, t, kid, a, b, u, -100, False)
            rrows = reference.rows(x, t, _spec(kid, a, b), u)
            assert rows.shape == (n, 6)
            _close(rows, rrows, 1e-10, f"{kid} rows u={u is not None}")
            valid = t != -100
            assert (rows[~valid, :2] == -math.inf).all() and (rows[~valid, 2:] == 0).all()
            if not two_term:
                # One-term rows: (alpha, beta, gamma) = (w/2, 0, -w/2).
                half = rows[valid, 1].exp() / 2
                _close(rows[valid, 3], half, 1e-12, f"{kid} alpha")
                assert (rows[:, 4] == 0).all() and torch.equal(rows[:, 5], -rows[:, 3])


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


# ---- two-term schemes: label smoothing (kernel id 10) and NCE / APL (11) ----
# Called through the ops (``ops.apply``: the differentiable forward op) against
# the reference's autograd Function, so they do not depend on the API layer.


def _spec(kid, a, b, ignore_index=-100, reduction=0, normalize=False):
    return KernelSpec(Kernel(kid), a, b, 1.0, Reduction(reduction), normalize, ignore_index)


def triton_apply(x, t, kid, a, b, weight, sample_weight, ignore_index, reduction, normalize):
    """The Triton backend's loss from the op's positional arguments."""
    spec = _spec(kid, a, b, ignore_index, reduction, normalize)
    return backends.get("triton").loss(x, t, spec, weight, sample_weight)


def ref_apply(x, t, kid, a, b, weight, sample_weight, ignore_index, reduction, normalize):
    """The reference's autograd Function from the same arguments."""
    spec = _spec(kid, a, b, ignore_index, reduction, normalize)
    return reference.ReferenceFunction.apply(x, t, spec, weight, sample_weight)


def _op_value_and_grad(fn, x, t, args, upstream):
    xx = x.detach().clone().requires_grad_(True)
    v = fn(xx, t, *args)
    v.backward(upstream if v.dim() else None)
    return v.detach(), xx.grad


def _check_op_parity(x, t, kid, a, b, what="", weight=None, sample_weight=None, ignore_index=-100,
                     reduction="mean", normalize=False, grad_scale=None):
    """Value and gradient of the Triton op against reference.ReferenceFunction, random upstream gradient.

    ``grad_scale(upstream)`` (optional): the size of the terms that make up the
    gradient, where it is larger than the gradient itself (NFL: ``_nfl_term_scale``).
    """
    args = (kid, a, b, weight, sample_weight, ignore_index, _RED[reduction], normalize)
    ref = ref_apply
    rv = ref(x, t, *args).detach()
    upstream = torch.randn_like(rv) if rv.dim() else None
    v, g = _op_value_and_grad(triton_apply, x, t, args, upstream)
    rv, rg = _op_value_and_grad(ref, x, t, args, upstream)
    scale = None
    if sample_weight is not None and rv.dim() == 0:
        # Signed sample weights can cancel a sum of terms that are all >= 0.
        abs_args = (kid, a, b, weight, sample_weight.abs(), ignore_index, _RED[reduction], normalize)
        scale = ref(x, t, *abs_args).abs().item()
    _close(v, rv, _VALUE_RTOL[x.dtype], f"value {what}", scale)
    gscale = None
    if grad_scale is not None:
        finite = rg[torch.isfinite(rg)].double()
        gscale = max(grad_scale(upstream), finite.abs().max().item() if finite.numel() else 0.0)
    _close(g, rg, _GRAD_RTOL[x.dtype], f"grad {what}", gscale)
    return v, g


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("use_weight", [False, True], ids=["no_weight", "weight"])
@pytest.mark.parametrize("eps", [0.1, 0.6])
def test_label_smoothing_parity(eps, use_weight, dtype):
    n, c = 12, 7
    x = _logits(n, c, dtype)
    t = _targets(n, c)
    t[:3] = 4  # ignore_index 4 is also a class
    x[3, t[3]] = 40.0  # a confident row
    weight = torch.rand(c, device=DEVICE) + 0.2 if use_weight else None
    sw = torch.randn(n, device=DEVICE)
    for reduction, _ in TWO_TERM_MODES:
        for s in (None, sw):
            _check_op_parity(x, t, Kernel.CCE_LS, eps, 0.0, f"eps={eps} {reduction} sw={s is not None}",
                             weight=weight, sample_weight=s, ignore_index=4, reduction=reduction)


@pytest.mark.parametrize("use_weight", [False, True], ids=["no_weight", "weight"])
@pytest.mark.parametrize("eps", [0.1, 0.6])
def test_label_smoothing_equals_torch_cross_entropy(eps, use_weight):
    n, c = 12, 6
    x = _logits(n, c, torch.float32)
    t = _targets(n, c, ignored=3)
    weight = torch.rand(c, device=DEVICE) + 0.5 if use_weight else None
    for reduction in ("none", "mean", "sum"):
        args = (Kernel.CCE_LS, eps, 0.0, weight, None, -100, _RED[reduction], False)
        r = F.cross_entropy(x, t, weight=weight, reduction=reduction, label_smoothing=eps)
        upstream = torch.randn_like(r) if r.dim() else None
        v, g = _op_value_and_grad(triton_apply, x, t, args, upstream)
        xr = x.clone().requires_grad_(True)
        F.cross_entropy(xr, t, weight=weight, reduction=reduction, label_smoothing=eps).backward(upstream)
        _close(v, r.detach(), 2e-5, f"value {reduction}")
        _close(g, xr.grad, 2e-5, f"grad {reduction}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("kid,a,b", TWO_TERM_NCE, ids=lambda v: str(v))
def test_nce_apl_parity(kid, a, b, dtype):
    n, c = 12, 7
    x = _logits(n, c, dtype)
    t = _targets(n, c, ignored=2)
    x[2, (t[2].clamp(min=0) + 1) % c] = float("-inf")  # a masked class: Lambda = inf, NCE 0
    x[3, t[3].clamp(min=0)] = 40.0
    weight = torch.rand(c, device=DEVICE) + 0.2
    sw = torch.randn(n, device=DEVICE)
    for reduction, _ in TWO_TERM_MODES:
        for w, s in ((None, None), (weight, sw)):
            _check_op_parity(x, t, kid, a, b, f"({a}, {b}) {reduction} weighted={w is not None}",
                             weight=w, sample_weight=s, reduction=reduction)


def test_nce_matches_its_definition():
    """NCE = log p / sum_k log P_k (Ma et al. 2020), autograd gradient included."""
    n, c = 8, 5
    x = _logits(n, c, torch.float64)
    t = _targets(n, c)
    xx = x.clone().requires_grad_(True)
    logp = torch.log_softmax(xx, dim=1)
    (logp.gather(1, t[:, None]).squeeze(1) / logp.sum(1)).sum().backward()
    v, g = _op_value_and_grad(triton_apply, x, t, (Kernel.NCE, 1.0, 0.0, None, None, -100, 2, False), None)
    expected = (logp.gather(1, t[:, None]).squeeze(1) / logp.sum(1)).sum()
    _close(v, expected.detach(), 1e-10, "value")
    _close(g, xx.grad, 1e-10, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_two_term_masked_classes(dtype):
    n, c = 6, 5
    x = _logits(n, c, dtype)
    t = torch.tensor([0, 1, 2, 3, 4, 0], device=DEVICE)
    x[0, 1:] = float("-inf")  # no finite non-target: r = 0, only the beta u term is left
    x[1, [0, 2]] = float("-inf")
    x[5, 1:4] = float("-inf")
    # Label smoothing: a masked class with weight 0 adds nothing to Lambda (0 * inf
    # is not NaN), so row 5 is finite; a masked class with weight > 0 makes the
    # value +inf (rows 0, 1), as in the reference. The gradient stays finite.
    weight = torch.rand(c, device=DEVICE) + 0.5
    weight[[1, 2, 3]] = 0.0
    finite_rows = ~(torch.isinf(x) & (weight != 0)).any(1)
    assert finite_rows.tolist() == [False, False, True, True, True, True]
    for reduction, _ in TWO_TERM_MODES:
        v, g = _check_op_parity(x, t, Kernel.CCE_LS, 0.3, 0.0, f"ls {reduction}", weight=weight, reduction=reduction)
        assert torch.isfinite(g).all()
        if reduction == "none":
            assert torch.isfinite(v[finite_rows]).all() and (v[~finite_rows] == math.inf).all()
        for kid, a, b in TWO_TERM_NCE:
            v, g = _check_op_parity(x, t, kid, a, b, f"nce ({a}, {b}) {reduction}", reduction=reduction)
            assert torch.isfinite(v).all() and torch.isfinite(g).all()
    # Without the weights a masked class makes the smoothing term +inf, as in the reference.
    v, g = _check_op_parity(x, t, Kernel.CCE_LS, 0.3, 0.0, "ls unweighted", reduction="none")
    assert (v[[0, 1, 5]] == math.inf).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("c", [1, 2, 3, 33])
def test_two_term_small_class_counts(c, dtype):
    n = 9
    x = _logits(n, c, dtype)
    t = _targets(n, c, ignored=1)
    weight = torch.rand(c, device=DEVICE, dtype=dtype) + 0.5
    for reduction, _ in TWO_TERM_MODES:
        _check_op_parity(x, t, Kernel.CCE_LS, 0.1, 0.0, f"C={c} ls {reduction}", weight=weight, reduction=reduction)
        for kid, a, b in TWO_TERM_NCE:
            _check_op_parity(x, t, kid, a, b, f"C={c} nce ({a}, {b}) {reduction}", reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["float32", "float64", "bfloat16"])
def test_two_term_chunked_rows_wider_than_a_block(tiny_blocks, dtype):
    n, c = 8, 37
    x = _logits(n, c, dtype)
    t = _targets(n, c, ignored=1)
    inf = float("-inf")
    # As in test_parity_chunked_rows_wider_than_a_block: masked leading chunks,
    # a row with two finite logits, a target in the last, partial chunk.
    x[0, :16] = inf
    t[0] = 20
    x[1, :] = inf
    t[1] = 3
    x[1, 3] = 0.5
    x[1, 35] = 1.5
    t[2] = 36
    for reduction, _ in TWO_TERM_MODES:
        for kid, a, b in TWO_TERM_NCE:
            _check_op_parity(x, t, kid, a, b, f"nce ({a}, {b}) {reduction}", reduction=reduction)
    # Label smoothing: weight 0 on the masked classes (else the value is +inf), so
    # row 1 keeps its leading masked chunks but has finite classes from 16 on;
    # U = sum u and the spread span every chunk.
    weight = torch.rand(c, device=DEVICE) + 0.5
    weight[:16] = 0.0
    x[1, 16:] = _logits(1, c - 16, dtype)[0]
    for reduction, _ in TWO_TERM_MODES:
        for eps in (0.1, 0.6):
            v, _ = _check_op_parity(x, t, Kernel.CCE_LS, eps, 0.0, f"ls {eps} {reduction}", weight=weight,
                                    reduction=reduction)
            assert torch.isfinite(v).all()
        # Unweighted (U = C) on the rows without a masked class.
        _check_op_parity(x[2:], t[2:], Kernel.CCE_LS, 0.1, 0.0, f"ls unweighted {reduction}", reduction=reduction)


@pytest.mark.parametrize("kid,a,b", [(10, 0.2, 0.0)] + TWO_TERM_NCE + [(12, 0.5, 0.4)], ids=lambda v: str(v))
def test_two_term_schemes_refuse_normalize(kid, a, b):
    x = _logits(4, 5, torch.float32)
    t = _targets(4, 5)
    with pytest.raises(ValueError, match="normali"):
        torch.ops.robustloss.triton_forward(x, t, kid, a, b, None, None, -100, 1, True)
    with pytest.raises(ValueError, match="normali"):
        torch.ops.robustloss.triton_rows(x, t, kid, a, b, None, -100, True)


def test_two_term_nan_and_inf_rows_are_isolated():
    n, c = 7, 4
    x = _logits(n, c, torch.float32)
    t = torch.tensor([0, 1, 2, 3, 0, 1, 2], device=DEVICE)
    x[1, 0] = float("nan")  # NaN non-target
    x[2, 2] = float("inf")  # +inf target
    x[3, 1] = float("inf")  # +inf non-target
    x[4, 0] = float("nan")  # NaN target
    bad = torch.tensor([False, True, True, True, True, False, False], device=DEVICE)
    weight = torch.rand(c, device=DEVICE) + 0.5
    nfl = [(Kernel.NFL, g, b, None) for g, b in NFL_PARAMS]
    for kid, a, b, w in [(Kernel.CCE_LS, 0.1, 0.0, weight)] + [(*k, None) for k in TWO_TERM_NCE] + nfl:
        upstream = torch.randn(n, device=DEVICE)
        args = (kid, a, b, w, None, -100, 0, False)
        v, g = _op_value_and_grad(triton_apply, x, t, args, upstream)
        rv, rg = _op_value_and_grad(ref_apply, x, t, args, upstream)
        assert g[bad].isnan().all(), "every entry of a NaN/+inf row's gradient is NaN"
        assert v[bad].isnan().all() and torch.isfinite(v[~bad]).all()
        _close(g[~bad], rg[~bad], 2e-5, f"{kid} finite rows")
        _close(v[~bad], rv[~bad], 2e-5, f"{kid} finite values")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=["float32", "float64", "float16"])
def test_backward_op_against_the_reference(dtype):
    """out = g (alpha r + beta u) off the target, g gamma at it; r = 0 at lse_nt = -inf; NaN lse_nt: NaN row."""
    n, c = 7, 6
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = _logits(n, c, dtype)
    t = _targets(n, c)
    t[4] = -100
    stats = torch.randn(n, 4, device=DEVICE, dtype=acc)
    stats[:, 0] += 3.0
    stats[1, 0] = -math.inf
    stats[2, 0] = math.nan
    stats[3, 2] = 0.0  # a one-term row
    u = torch.rand(c, device=DEVICE) + 0.5
    u[2] = 0.0
    # Every scheme but NFL reads the stats alike (scheme and a do not matter to them).
    _check_backward_op(x, t, stats, u, ((Kernel.CCE, 0.0), (Kernel.DM, 1.0), (Kernel.CCE_LS, 0.1), (Kernel.NCE, 1.0)))


def _check_backward_op(x, t, stats, u, cases):
    """triton_backward == reference.backward for each (scheme, a), with and without u, scalar and per-row g.

    Row 2 has a NaN statistic (a NaN row), row 4 is ignored (zeros).
    """
    n, c = x.shape
    for kid, a in cases:
        for smooth in (None, u):
            for g in (torch.randn((), device=DEVICE), torch.randn(n, device=DEVICE)):
                out = torch.ops.robustloss.triton_backward(g, x, t, stats, smooth, -100, kid, a)
                ref = reference.backward(g, x, t, stats, _spec(kid, a, 0.0), smooth)
                assert out.dtype == x.dtype and out.shape == (n, c)
                assert out[2].isnan().all()
                assert (out[4] == 0).all()
                keep = torch.arange(n, device=DEVICE) != 2
                what = f"backward {kid} a={a} u={smooth is not None} g={tuple(g.shape)}"
                _close(out[keep], ref[keep], _GRAD_RTOL[x.dtype], what)


def test_torch_compile_fullgraph_label_smoothing_with_weight():
    n, c = 9, 6
    x = _logits(n, c, torch.float32)
    t = _targets(n, c, ignored=3)
    w = torch.rand(c, device=DEVICE) + 0.5

    def loss(inp, target, weight):
        return triton_apply(inp, target, Kernel.CCE_LS, 0.2, 0.0, weight, None, -100, 1, False)

    compiled = torch.compile(loss, fullgraph=True)
    xc = x.clone().requires_grad_(True)
    v = compiled(xc, t, w)
    v.backward()
    xr = x.clone().requires_grad_(True)
    r = F.cross_entropy(xr, t, weight=w, label_smoothing=0.2)
    r.backward()
    _close(v.detach(), r.detach(), 2e-5, "compiled value")
    _close(xc.grad, xr.grad, 2e-5, "compiled grad")


# ---- NFL (kernel id 12): normalized focal loss + b q, P-form rows and stats ----


def _nfl_term_scale(x, t, gamma, b, weight=None, sample_weight=None, reduction="mean", ignore_index=-100):
    """grad_scale of _check_op_parity for NFL: max_i |g_i s_i / D| ((|h_y| + NFL |H|) / S + |b|).

    NFL's gradient is a difference of terms of that size (the quotient rule of
    F_y / S, and alpha P_j against beta h_j); where NFL saturates (a
    confidently wrong row of few classes) they cancel to a gradient far below
    them, which float32 (kernel and reference alike) cannot resolve better
    than eps times the terms. Computed in float64 from the reference's focal_terms.
    """
    z = x.detach().double()
    valid = t != ignore_index
    y = torch.where(valid, t, torch.zeros_like(t))
    logP = torch.log_softmax(z, dim=1)
    F_all, h_all = reference.focal_terms(gamma, logP, logP.exp(), -torch.expm1(logP))
    S, H = F_all.sum(1), h_all.sum(1)
    F_y, h_y = F_all.gather(1, y[:, None]).squeeze(1), h_all.gather(1, y[:, None]).squeeze(1)
    ok = torch.isfinite(S) & (S != 0)
    safe = torch.where(ok, S, torch.ones_like(S))
    terms = torch.where(ok, (h_y.abs() + (F_y / safe) * H.abs()) / safe, torch.zeros_like(S)) + abs(b)
    cw = weight.double()[y] if weight is not None else torch.ones_like(S)
    s = torch.where(valid, cw, torch.zeros_like(cw))
    if sample_weight is not None:
        s = s * sample_weight.double()
    if reduction == "mean":
        s = s / torch.where(valid, cw, torch.zeros_like(cw)).sum()

    def scale(upstream):
        g = torch.ones_like(S) if upstream is None else upstream.double().expand(S.shape)
        return (g * s * terms).abs().max().item()

    return scale


def _nfl_definition(x, t, gamma, b, weight=None, sample_weight=None, reduction="sum"):
    """NFL(gamma) + b q from its definition, in plain autograd: FL(P) = -(1 - P)^gamma log P,
    NFL = FL(p_y) / sum_k FL(P_k) (Ma et al. 2020), reduced as the library reduces a loss."""
    ls = torch.log_softmax(x, dim=1)
    fl = -((1 - ls.exp()) ** gamma) * ls if gamma else -ls
    valid = t != -100
    y = torch.where(valid, t, torch.zeros_like(t))
    p = ls.gather(1, y[:, None]).squeeze(1).exp()
    v = fl.gather(1, y[:, None]).squeeze(1) / fl.sum(1) + b * (1 - p)
    s = torch.where(valid, torch.ones_like(v), torch.zeros_like(v))
    if weight is not None:
        s = s * weight[y]
    if sample_weight is not None:
        s = s * sample_weight
    sv = torch.where(valid, s * v, torch.zeros_like(v))
    if reduction == "none":
        return sv
    if reduction == "sum":
        return sv.sum()
    cw = weight[y] if weight is not None else torch.ones_like(v)
    return sv.sum() / torch.where(valid, cw, torch.zeros_like(cw)).sum()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("gamma,b", NFL_PARAMS, ids=lambda v: str(v))
def test_nfl_parity(gamma, b, dtype):
    n, c = 12, 7
    x = _logits(n, c, dtype)
    t = _targets(n, c, ignored=2)
    x[2, (t[2].clamp(min=0) + 1) % c] = float("-inf")  # a masked class: sum F = inf, NFL 0
    x[3, t[3].clamp(min=0)] = 40.0  # a confident row: q ~ e^-40
    x[4, (t[4].clamp(min=0) + 2) % c] = 40.0  # a confidently wrong row: p ~ e^-40
    weight = torch.rand(c, device=DEVICE) + 0.2
    sw = torch.randn(n, device=DEVICE)
    for reduction, _ in TWO_TERM_MODES:
        for w, s in ((None, None), (weight, None), (weight, sw)):
            _check_op_parity(x, t, Kernel.NFL, gamma, b, f"({gamma}, {b}) {reduction} w={w is not None} sw={s is not None}",
                             weight=w, sample_weight=s, reduction=reduction,
                             grad_scale=_nfl_term_scale(x, t, gamma, b, w, s, reduction))


@pytest.mark.parametrize("gamma,b", NFL_PARAMS, ids=lambda v: str(v))
def test_nfl_matches_its_definition(gamma, b):
    """Value and gradient against autograd through FL(p_y) / sum_k FL(P_k) + b q (float64)."""
    n, c = 9, 6
    x = _logits(n, c, torch.float64)
    t = _targets(n, c, ignored=1)
    weight = torch.rand(c, device=DEVICE, dtype=torch.float64) + 0.5
    sw = torch.randn(n, device=DEVICE, dtype=torch.float64)
    for reduction in ("none", "mean", "sum"):
        for w, s in ((None, None), (weight, sw)):
            xx = x.clone().requires_grad_(True)
            want = _nfl_definition(xx, t, gamma, b, w, s, reduction)
            upstream = torch.randn_like(want) if want.dim() else None
            want.backward(upstream)
            args = (Kernel.NFL, gamma, b, w, s, -100, _RED[reduction], False)
            v, g = _op_value_and_grad(triton_apply, x, t, args, upstream)
            what = f"({gamma}, {b}) {reduction} w={w is not None}"
            _close(v, want.detach(), 1e-10, f"value {what}")
            _close(g, xx.grad, 1e-10, f"grad {what}")


def test_nfl_gamma_zero_is_nce():
    n, c = 10, 5
    x = _logits(n, c, torch.float32)
    t = _targets(n, c, ignored=2)
    for b in (0.0, 0.4):
        args = (0.0, b, None, None, -100, 0, False)
        upstream = torch.randn(n, device=DEVICE)
        v, g = _op_value_and_grad(triton_apply, x, t, (Kernel.NFL, *args), upstream)
        rv, rg = _op_value_and_grad(triton_apply, x, t, (Kernel.NCE, 1.0, *args[1:]), upstream)
        _close(v, rv, 2e-5, f"value b={b}")
        _close(g, rg, 2e-5, f"grad b={b}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_nfl_masked_classes(dtype):
    n, c = 6, 5
    x = _logits(n, c, dtype)
    t = torch.tensor([0, 1, 2, 3, 4, 0], device=DEVICE)
    x[0, 1:] = float("-inf")  # no finite non-target: lse = z_y, sum F = inf
    x[1, [0, 2]] = float("-inf")
    x[2, :2] = float("-inf")
    x[5, 1:4] = float("-inf")
    masked = torch.isinf(x)
    for gamma, b in NFL_PARAMS:
        for reduction, _ in TWO_TERM_MODES:
            v, g = _check_op_parity(x, t, Kernel.NFL, gamma, b, f"({gamma}, {b}) {reduction}", reduction=reduction,
                                    grad_scale=_nfl_term_scale(x, t, gamma, b, reduction=reduction))
            assert torch.isfinite(v).all() and torch.isfinite(g).all()
            assert (g[masked] == 0).all(), "masked classes must get exactly zero gradient"
            if reduction == "none":
                # A masked class makes the denominator infinite: NFL 0, only b q is left.
                rows = masked.any(1)
                assert (v[rows] == 0).all() if b == 0 else (v[rows] >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("c", [1, 2, 3, 33])
def test_nfl_small_class_counts(c, dtype):
    n = 9
    x = _logits(n, c, dtype)
    t = _targets(n, c, ignored=1)
    weight = torch.rand(c, device=DEVICE, dtype=dtype) + 0.5
    for gamma, b in NFL_PARAMS:
        for reduction, _ in TWO_TERM_MODES:
            v, g = _check_op_parity(x, t, Kernel.NFL, gamma, b, f"C={c} ({gamma}, {b}) {reduction}", weight=weight,
                                    reduction=reduction,
                                    grad_scale=_nfl_term_scale(x, t, gamma, b, weight, reduction=reduction))
            if c == 1:  # S = 0: NFL 0 and p = 1, so no gradient at all
                assert (v == 0).all() and (g == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_nfl_chunked_rows_wider_than_a_block(tiny_blocks, dtype):
    n, c = 8, 37
    x = _logits(n, c, dtype)
    t = _targets(n, c, ignored=1)
    inf = float("-inf")
    # As in test_parity_chunked_rows_wider_than_a_block: masked leading chunks,
    # a row with two finite logits, a target in the last, partial chunk.
    x[0, :16] = inf
    t[0] = 20
    x[1, :] = inf
    t[1] = 3
    x[1, 3] = 0.5
    x[1, 35] = 1.5
    t[2] = 36
    weight = torch.rand(c, device=DEVICE) + 0.5
    for gamma, b in NFL_PARAMS:
        for reduction, _ in TWO_TERM_MODES:
            scale = _nfl_term_scale(x, t, gamma, b, weight, reduction=reduction)
            _check_op_parity(x, t, Kernel.NFL, gamma, b, f"({gamma}, {b}) {reduction}", weight=weight,
                             reduction=reduction, grad_scale=scale)
            # Rows without a masked class: the sums of F and h span every chunk.
            scale = _nfl_term_scale(x[2:], t[2:], gamma, b, reduction=reduction)
            _check_op_parity(x[2:], t[2:], Kernel.NFL, gamma, b, f"({gamma}, {b}) {reduction} unmasked",
                             reduction=reduction, grad_scale=scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=["float32", "float64", "float16"])
def test_nfl_backward_op_against_the_reference(dtype):
    """P-form: out = g (alpha P + beta h(P)) off the target, P = exp(z - lse); NaN lse: NaN row; u ignored."""
    n, c = 7, 6
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = _logits(n, c, dtype)
    x[5, 2] = float("-inf")  # a masked class: P = 0, h = -1
    t = _targets(n, c)
    t[4] = -100
    stats = torch.randn(n, 4, device=DEVICE, dtype=acc)
    stats[:, 0] = torch.logsumexp(x.to(acc), dim=1) + torch.rand(n, device=DEVICE, dtype=acc)
    stats[1, 0] = torch.logsumexp(x[1].to(acc), dim=0)  # P of the largest class may round to 1: Q = 0
    stats[2, 0] = math.nan
    u = torch.rand(c, device=DEVICE) + 0.5  # passed, and ignored by NFL (reference.backward ignores it too)
    _check_backward_op(x, t, stats, u, ((Kernel.NFL, 0.5), (Kernel.NFL, 2.0), (Kernel.NFL, 0.0)))


def test_torch_compile_fullgraph_nfl():
    """The autograd rule hands the backward op NFL's scheme id and gamma under torch.compile too."""
    n, c = 9, 6
    x = _logits(n, c, torch.float32)
    t = _targets(n, c, ignored=3)
    w = torch.rand(c, device=DEVICE) + 0.5

    def loss(inp, target, weight):
        return triton_apply(inp, target, Kernel.NFL, 0.5, 0.4, weight, None, -100, 1, False)

    compiled = torch.compile(loss, fullgraph=True)
    xc = x.clone().requires_grad_(True)
    v = compiled(xc, t, w)
    v.backward()
    rv, rg = _op_value_and_grad(ref_apply, x, t, (Kernel.NFL, 0.5, 0.4, w, None, -100, 1, False),
                                None)
    _close(v.detach(), rv, 2e-5, "compiled value")
    _close(xc.grad, rg, 2e-5, "compiled grad")
