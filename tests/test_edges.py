"""Edges of SPEC: extreme margins and betas, non-finite logits, degenerate batches, errors, schemes.

Every backend here ("torch" and "cpu") must give finite results wherever the
logits are finite, NaN exactly where SPEC §6 says, the value 0 and gradient 0
when nothing counts (D = 0), and a clear Python error for every bad input.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import robustloss_fast as rf
from robustloss_fast import backends
from robustloss_fast._common import STAT_COLS
from robustloss_fast.schemes import CCE, DM, GCE, IMAE, MAE, MSE, DMBeta, DMExponential, DMNormal, Focal, Scheme

from _cases import SCHEMES  # noqa: E402
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
BACKENDS = [b for b in ("torch", "cpu") if backends.unavailable_reason(b) is None]
REDUCTIONS = ["none", "mean", "sum"]
SCHEME_NAMES = ("CCE", "MAE", "MSE", "GCE", "DM", "IMAE", "DMNormal", "DMExponential", "DMBeta")
INF, NAN = math.inf, math.nan


def _id(x):
    return repr(x) if not isinstance(x, torch.dtype) else str(x).replace("torch.", "")


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def loss(logits, target, scheme, backend, reduction="mean", normalize=None, grad_out=None, **kw):
    """(value, grad of the logits) of one call; grad_out defaults to ones."""
    x = logits.detach().clone().requires_grad_()
    v = rf.robust_cross_entropy(x, target, scheme, reduction=reduction, normalize=normalize, backend=backend, **kw)
    g_out = torch.ones_like(v) if grad_out is None else grad_out.to(v.dtype)
    (g,) = torch.autograd.grad(v, x, g_out)
    return v.detach(), g


def near_reference(logits, target, scheme, backend, reduction, normalize, rtol, **kw):
    """The backend's result in logits.dtype against the float64 reference of the same inputs."""
    v, g = loss(logits, target, scheme, backend, reduction, normalize, **kw)
    f64 = {k: (t.double() if isinstance(t, torch.Tensor) else t) for k, t in kw.items()}
    rv, rg = loss(logits.double(), target, scheme, "torch", reduction, normalize, **f64)
    assert torch.isfinite(v).all() and torch.isfinite(g).all(), f"{scheme} {backend}: non-finite result"
    fi = torch.finfo(logits.dtype)
    half = logits.dtype in (torch.float16, torch.bfloat16)
    # Gradients of half inputs are rounded once: 2 ulps on top of the float32 error.
    grel = rtol + (2 * fi.eps if half else 0.0)
    gabs = rtol * float(rg.abs().max()) + (2 * fi.tiny * fi.eps if half else fi.tiny)
    vscale = float(rv.abs().max()) if rv.numel() else 0.0
    if kw.get("sample_weight") is not None and reduction != "none":
        # Signed sample weights cancel in the sum: the error scales with the sum of |terms|.
        f64["sample_weight"] = f64["sample_weight"].abs()
        abs_value = loss(logits.double(), target, scheme, "torch", reduction, normalize, **f64)[0]
        vscale = max(vscale, float(abs_value.abs()))
    torch.testing.assert_close(v.double(), rv, rtol=rtol, atol=rtol * vscale + 1e-300)
    torch.testing.assert_close(g.double(), rg, rtol=grel, atol=gabs)
    return v, g


# ---------------------------------------------------------------------------
# extreme margins and betas


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_extreme_margins(dtype, backend):
    """Margins of +-30, 100, 1000 (p -> 1 and p -> 0): finite and as in float64.

    q is never 1 - p, so the limit form G = (w / 2)(r - e_y) stays exact where
    p rounds to 1; -log p = margin where p underflows.
    """
    rows, target = [], []
    for m in (30.0, 100.0, 1000.0):
        rows += [[m, 0.0, 0.0, -1.0], [0.0, -m, 2.0, 1.0], [1.0, 0.5, -m, 0.0]]
        target += [0, 2, 2]  # margins +m, ~+m (non-targets down), -m
    logits = torch.tensor(rows, dtype=torch.float64).to(dtype)
    t = torch.tensor(target)
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    for scheme in SCHEMES:
        for reduction, normalize in (("none", None), ("sum", None), ("mean", True), ("mean", False)):
            v, g = near_reference(logits, t, scheme, backend, reduction, normalize, rtol)
            if reduction == "none":
                # p rounds to 1 at margin 1000: G_y = -w/2 with w = w(1) (the limit form).
                _, w1 = scheme_w_at_1(scheme)
                assert float(g[6, 0]) == pytest.approx(-w1 / 2, rel=1e-2, abs=1e-30), f"{scheme}"


def scheme_w_at_1(scheme):
    """(value, w) at p = 1 (q = 0), from SPEC §4."""
    name = type(scheme).__name__
    if name in ("CCE", "MAE", "MSE", "GCE"):
        return 0.0, 0.0
    if name == "DMBeta":
        return 0.0, 1.0 if scheme.eta == 1 else 0.0
    if name == "DMNormal":
        return 0.0, math.exp(-scheme.beta * (1 - 2 * scheme.psi))
    return 0.0, 1.0  # DM, IMAE, DMExponential: exp(beta * 0)


BIG_BETA = [
    DM(lam=0.0, beta=1000.0),
    DM(lam=1.0, beta=1000.0),
    DM(lam=2.0, beta=-1000.0),
    IMAE(T=1000.0),
    DMExponential(beta=-1000.0),
    DMNormal(psi=0.8, beta=1000.0),
    DMBeta(alpha=200.0, eta=300.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_large_beta_normalised_mean(dtype, backend):
    """|beta| up to 1000 with the normalised mean: log-domain weights, no overflow in any dtype."""
    n, c = 48, 10
    logits = (torch.randn(n, c, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, c, (n,))
    target[::5] = -100
    sw = torch.randn(n, dtype=acc_of(dtype))
    weight = torch.rand(c, dtype=acc_of(dtype)) + 0.5
    for scheme in BIG_BETA:
        # log w = beta * (something of p) carries beta * float32 rounding of p.
        rtol = 1e-9 if dtype == torch.float64 else 5e-4
        v, g = near_reference(logits, target, scheme, backend, "mean", True, rtol, weight=weight, sample_weight=sw)
        assert v.dtype == acc_of(dtype) and g.dtype == dtype


# ---------------------------------------------------------------------------
# non-finite logits


def _nan_batch(dtype):
    n, c = 8, 5
    logits = torch.randn(n, c, dtype=torch.float64).to(dtype)
    target = torch.randint(0, c, (n,))
    bad = {1: ("nan", 2), 3: ("+inf", None), 5: ("+inf", 0)}  # row: (kind, column; None = the target)
    for row, (kind, col) in bad.items():
        col = int(target[row]) if col is None else col
        if kind == "+inf" and col == int(target[row]) and row == 5:
            col = (col + 1) % c  # row 5: +inf in a non-target column
        logits[row, col] = NAN if kind == "nan" else INF
    logits[6, (int(target[6]) + 1) % c] = -INF  # a masked class: legal
    return logits, target, sorted(bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize(
    "scheme", [CCE(), MSE(), DM(), DMBeta(alpha=2.0, eta=3.0), DMBeta(alpha=1.0, eta=1.0), Focal()], ids=_id
)
def test_nan_isolation(scheme, dtype, backend):
    """SPEC §6: NaN or +inf in a row makes that row NaN and touches no other row, except through D."""
    logits, target, bad_rows = _nan_batch(dtype)
    good = torch.ones(len(target), dtype=torch.bool)
    good[bad_rows] = False
    clean = logits.clone()
    clean[bad_rows] = 0.0  # the same batch (same D for normalize=False) with finite rows
    for reduction, normalize in (("none", None), ("sum", None), ("mean", False), ("mean", True)):
        grad_out = torch.randn(len(target)) if reduction == "none" else None
        v, g = loss(logits, target, scheme, backend, reduction, normalize, grad_out=grad_out)
        cv, cg = loss(clean, target, scheme, backend, reduction, normalize, grad_out=grad_out)
        tag = f"{reduction} normalize={normalize}"
        if reduction == "mean" and normalize:
            # D = sum |s| w includes the bad rows' w, so the whole batch is NaN: that is allowed,
            # silently finite is not.
            assert torch.isnan(v), tag
            continue
        assert torch.isnan(g[bad_rows]).all(dim=1).all(), f"{tag}: a bad row's gradient is not NaN"
        assert torch.isfinite(g[good]).all(), f"{tag}: NaN leaked into another row's gradient"
        torch.testing.assert_close(g[good], cg[good], rtol=0, atol=0, msg=tag)
        if reduction == "none":
            assert torch.isnan(v[bad_rows]).all() and torch.isfinite(v[good]).all(), tag
            torch.testing.assert_close(v[good], cv[good], rtol=0, atol=0, msg=tag)
        else:
            assert torch.isnan(v), tag


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,margin", [(torch.float32, 120.0), (torch.float64, 800.0)], ids=_id)
@pytest.mark.parametrize("scheme", [CCE(), Focal(gamma=0.0), Focal(gamma=2.0)], ids=_id)
def test_confident_batch_keeps_its_unit_of_gradient(scheme, dtype, margin, backend):
    """Normalised mean over rows whose q underflows: log w must stay finite (no D = 0, no vanished gradient)."""
    logits = torch.zeros(3, 4, dtype=dtype)
    logits[:, 0] = margin
    logits.requires_grad_()
    target = torch.zeros(3, dtype=torch.long)
    rf.robust_cross_entropy(logits, target, scheme, reduction="mean", normalize=True, backend=backend).backward()
    torch.testing.assert_close(logits.grad.abs().sum().item(), 1.0, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_ignored_row_is_harmless(backend):
    logits = torch.randn(6, 4)
    target = torch.randint(0, 4, (6,))
    target[2] = -100
    logits[2] = torch.tensor([NAN, INF, -INF, 1.0])
    clean = logits.clone()
    clean[2] = 0.0
    for scheme in (CCE(), DM()):
        for reduction in REDUCTIONS:
            for normalize in (True, False):
                v, g = loss(logits, target, scheme, backend, reduction, normalize)
                cv, cg = loss(clean, target, scheme, backend, reduction, normalize)
                assert torch.equal(v, cv) and torch.equal(g, cg)
                assert bool((g[2] == 0).all())


# ---------------------------------------------------------------------------
# masked classes, C = 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_masked_classes_equal_deleted_classes(dtype, backend):
    """-inf logits are masked classes: the same loss as without those columns, and gradient 0 there."""
    n, c = 12, 9
    keep = torch.tensor([0, 2, 3, 5, 8])
    logits = torch.full((n, c), -INF, dtype=torch.float64)
    logits[:, keep] = torch.randn(n, len(keep), dtype=torch.float64) * 2
    logits = logits.to(dtype)
    small_target = torch.randint(0, len(keep), (n,))
    small_target[3] = -100
    target = torch.where(small_target >= 0, keep[small_target.clamp(min=0)], small_target)
    weight = torch.rand(c, dtype=acc_of(dtype)) + 0.5
    # Positive sample weights: with signed ones the reduced value can cancel, and
    # the two layouts' float32 sums (different lane orders) then differ by more
    # than 1e-5 relative; negative weights are covered by the parity tests.
    sw = torch.rand(n, dtype=acc_of(dtype)) + 0.5
    for scheme in SCHEMES:
        for reduction, normalize in (("none", None), ("mean", True), ("mean", False)):
            kw = dict(weight=weight, sample_weight=sw)
            v, g = loss(logits, target, scheme, backend, reduction, normalize, **kw)
            kw_small = dict(weight=weight[keep], sample_weight=sw)
            sv, sg = loss(logits[:, keep].contiguous(), small_target, scheme, backend, reduction, normalize, **kw_small)
            assert torch.isfinite(v).all() and torch.isfinite(g).all()
            masked = torch.ones(c, dtype=torch.bool)
            masked[keep] = False
            assert bool((g[:, masked] == 0).all())
            tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(v, sv, **tol)
            if dtype in (torch.float16, torch.bfloat16):
                # Different float32 sums may round to neighbouring half values: 2 ulps.
                fi = torch.finfo(dtype)
                tol = dict(rtol=2 * fi.eps, atol=1e-6 + 2 * fi.tiny * fi.eps)
            torch.testing.assert_close(g[:, keep].double(), sg.double(), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_single_class_and_all_non_targets_masked(dtype, backend):
    """C = 1, or every non-target at -inf: p = 1, value 0 (-log 1, L(1)), G = 0 -- never NaN."""
    one = torch.randn(5, 1, dtype=torch.float64).to(dtype)
    t1 = torch.zeros(5, dtype=torch.long)
    masked = torch.full((4, 3), -INF, dtype=torch.float64)
    t2 = torch.tensor([0, 1, 2, 1])
    masked[torch.arange(4), t2] = torch.randn(4, dtype=torch.float64)
    masked = masked.to(dtype)
    for scheme in SCHEMES:
        for logits, target in ((one, t1), (masked, t2), (one[0, :].clone(), torch.tensor(0))):
            for reduction, normalize in (("none", None), ("sum", None), ("mean", True), ("mean", False)):
                sw = torch.randn(target.shape, dtype=acc_of(dtype))
                v, g = loss(logits, target, scheme, backend, reduction, normalize, sample_weight=sw)
                assert bool((v == 0).all()), f"{scheme} {reduction}: value {v}"
                assert bool((g == 0).all()), f"{scheme} {reduction}: gradient {g}"


# ---------------------------------------------------------------------------
# degenerate batches: D = 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_empty_batch(dtype, backend):
    for shape, tshape in (((0, 5), (0,)), ((0, 5, 3), (0, 3)), ((2, 5, 0), (2, 0))):
        logits = torch.randn(shape).to(dtype)
        target = torch.zeros(tshape, dtype=torch.long)
        for scheme in (CCE(), DM(), GCE()):
            for reduction in REDUCTIONS:
                for normalize in (True, False):
                    v, g = loss(logits, target, scheme, backend, reduction, normalize)
                    assert v.dtype == acc_of(dtype) and g.shape == logits.shape
                    if reduction == "none":
                        assert v.shape == tshape
                    else:
                        assert v.shape == () and float(v) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_nothing_counts(dtype, backend):
    """All ignored, all sample weights 0, all class weights 0, all w = 0: value 0 and gradient 0."""
    n, c = 6, 4
    logits = torch.randn(n, c, dtype=torch.float64).to(dtype)
    target = torch.randint(0, c, (n,))
    acc = acc_of(dtype)
    cases = [
        ("all ignored", target.new_full((n,), -100), {}),
        ("all ignored, ignore_index=2", target.new_full((n,), 2), {"ignore_index": 2}),
        ("zero sample weights", target, {"sample_weight": torch.zeros(n, dtype=acc)}),
        ("zero class weights", target, {"weight": torch.zeros(c, dtype=acc)}),
    ]
    for scheme in SCHEMES:
        for name, tgt, kw in cases:
            for reduction, normalize in (("none", None), ("sum", None), ("mean", True), ("mean", False)):
                v, g = loss(logits, tgt, scheme, backend, reduction, normalize, **kw)
                assert bool((v == 0).all()), f"{scheme} {name} {reduction} {normalize}: {v}"
                assert bool((g == 0).all()), f"{scheme} {name} {reduction} {normalize}"
    # Every w underflows (w = 2q with q = e^-1000) but is not 0: in the log
    # domain D > 0 and the batch still carries one unit of L1 emphasis.
    sure = torch.zeros(n, c, dtype=dtype)
    sure[torch.arange(n), target] = 1000.0 if dtype != torch.float16 else 60000.0
    for scheme in (CCE(), MAE(), MSE(), GCE(), DMBeta(alpha=2.0, eta=3.0)):
        v, g = loss(sure, target, scheme, backend, "mean", True)
        assert float(v) == 0.0 and torch.isfinite(g).all()
        assert float(g.double().abs().sum()) == pytest.approx(1.0, rel=1e-2), f"{scheme}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancelling_sample_weights(backend):
    """sum s_i = 0 but D = sum |s_i| w_i > 0: a finite, nonzero gradient."""
    logits = torch.randn(2, 5, dtype=torch.float64)
    logits[1] = logits[0]
    target = torch.tensor([3, 3])
    v, g = loss(logits, target, DM(), backend, "mean", True, sample_weight=torch.tensor([1.0, -1.0]).double())
    assert abs(float(v)) < 1e-12
    torch.testing.assert_close(g[0], -g[1], rtol=0, atol=1e-15)
    assert float(g.abs().sum()) == pytest.approx(1.0)  # total L1 emphasis is one unit


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_values(backend):
    """ignore_index may be any int: inside [0, C), negative, or >= C; those rows count nowhere."""
    n, c = 10, 5
    logits = torch.randn(n, c, dtype=torch.float64)
    for ii in (2, -1, 7, -100):
        target = torch.randint(0, c, (n,))
        drop = torch.rand(n) < 0.4
        drop[0] = True
        target[drop] = ii
        keep = target != ii
        for scheme in (CCE(), DM()):
            for reduction in REDUCTIONS:
                v, g = loss(logits, target, scheme, backend, reduction, ignore_index=ii)
                kv, kg = loss(logits[keep], target[keep], scheme, backend, reduction)
                assert bool((g[~keep] == 0).all())
                torch.testing.assert_close(g[keep], kg, rtol=1e-12, atol=1e-15)
                torch.testing.assert_close(v[keep] if reduction == "none" else v, kv, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_target_value_names_it(backend):
    logits = torch.randn(4, 5)
    for bad, ii in ((7, -100), (5, -100), (-1, -100), (-100, 3), (123456789, -100)):
        target = torch.tensor([0, 1, bad, 2])
        with pytest.raises(IndexError, match=rf"(?<![\w-]){bad}(?!\d)"):
            rf.robust_cross_entropy(logits, target, DM(), ignore_index=ii, backend=backend)
    with pytest.raises(IndexError, match=r"\b9\b"):
        rf.robust_cross_entropy(torch.randn(5), torch.tensor(9), CCE(), backend=backend)
    with pytest.raises(IndexError, match=r"(?<![\w-])-3(?!\d)"):
        rf.robust_cross_entropy(torch.randn(2, 5, 3), torch.tensor([[0, 1, -3], [0, 0, 0]]), CCE(), backend=backend)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension is not importable")
def test_bad_target_value_in_the_ops():
    """The ops themselves validate targets: a direct call can never read out of bounds."""
    logits = torch.randn(3, 4)
    target = torch.tensor([0, 4, 1])
    stats = torch.zeros(3, STAT_COLS)
    ops = torch.ops.robustloss
    with pytest.raises(IndexError, match=r"\b4\b"):
        ops.robust_ce_forward(logits, target, 4, 1.0, 8.0, None, None, -100, 1, True)
    with pytest.raises(IndexError, match=r"\b4\b"):
        ops.robust_ce_rows(logits, target, 4, 1.0, 8.0, None, -100, True)
    with pytest.raises(IndexError, match=r"\b4\b"):
        ops.robust_ce_backward(torch.tensor(1.0), logits, target, stats, None, -100, 4, 1.0)


def _errors():
    x = torch.randn(4, 3)
    t = torch.tensor([0, 1, 2, 1])
    meta = torch.device("meta")
    E = []  # (name, kwargs of robust_cross_entropy, exception, regex)
    E.append(("int input", dict(input=torch.ones(4, 3, dtype=torch.long)), TypeError, "input"))
    E.append(("complex input", dict(input=torch.randn(4, 3, dtype=torch.complex64)), TypeError, "input"))
    E.append(("list input", dict(input=[[0.0, 1.0]]), TypeError, "tensor"))
    E.append(("float target", dict(target=t.float()), TypeError, "target"))
    E.append(("bool target", dict(target=t.bool()), TypeError, "target"))
    E.append(("target shape", dict(target=t[:3]), ValueError, "target shape"))
    E.append(("target (N, 1)", dict(target=t[:, None]), ValueError, "target shape"))
    E.append(("scalar input", dict(input=torch.tensor(1.0), target=torch.tensor(0)), ValueError, "dimension"))
    E.append(("no classes", dict(input=torch.randn(4, 0)), ValueError, "class"))
    E.append(("target device", dict(target=t.to(meta)), ValueError, "meta"))
    E.append(("reduction", dict(reduction="avg"), ValueError, "reduction"))
    E.append(("reduction None", dict(reduction=None), ValueError, "reduction"))
    E.append(("normalize int", dict(normalize=1), TypeError, "normalize"))
    E.append(("normalize str", dict(normalize="yes"), TypeError, "normalize"))
    E.append(("scheme str", dict(scheme="DM"), TypeError, "scheme"))
    E.append(("scheme class", dict(scheme=DM), TypeError, "scheme"))
    E.append(("weight shape", dict(weight=torch.ones(4)), ValueError, "weight"))
    E.append(("weight 2-D", dict(weight=torch.ones(1, 3)), ValueError, "weight"))
    E.append(("weight int", dict(weight=torch.ones(3, dtype=torch.long)), TypeError, "weight"))
    E.append(("weight list", dict(weight=[1.0, 1.0, 1.0]), TypeError, "weight"))
    E.append(("weight device", dict(weight=torch.ones(3, device=meta)), ValueError, "weight"))
    E.append(("sample_weight shape", dict(sample_weight=torch.ones(3)), ValueError, "sample_weight"))
    E.append(("sample_weight (N, 1)", dict(sample_weight=torch.ones(4, 1)), ValueError, "sample_weight"))
    E.append(("sample_weight int", dict(sample_weight=torch.ones(4, dtype=torch.long)), TypeError, "sample_weight"))
    E.append(("sample_weight list", dict(sample_weight=[1.0] * 4), TypeError, "sample_weight"))
    E.append(("sample_weight device", dict(sample_weight=torch.ones(4, device=meta)), ValueError, "sample_weight"))
    E.append(("ignore_index float", dict(ignore_index=-100.0), TypeError, "ignore_index"))
    E.append(("ignore_index bool", dict(ignore_index=True), TypeError, "ignore_index"))
    E.append(("backend type", dict(backend=1), TypeError, "backend"))
    on_meta = dict(input=x.to(meta), target=t.to(meta), backend="cpu")
    E.append(("cpu backend, meta tensors", on_meta, ValueError, "meta"))
    base = dict(input=x, target=t, scheme=DM())
    return [pytest.param({**base, **kw}, exc, rx, id=name) for name, kw, exc, rx in E]


@pytest.mark.parametrize("kwargs,exc,regex", _errors())
def test_bad_inputs_raise_clear_errors(kwargs, exc, regex):
    kwargs = dict(kwargs)
    args = (kwargs.pop("input"), kwargs.pop("target"), kwargs.pop("scheme"))
    kwargs.setdefault("backend", "torch")
    with pytest.raises(exc, match=regex):
        rf.robust_cross_entropy(*args, **kwargs)


def test_shape_errors_are_raised_before_any_backend():
    """The same message whatever the backend: shapes are checked once, in the API."""
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2])
    messages = set()
    for backend in BACKENDS:
        with pytest.raises(ValueError) as info:
            rf.robust_cross_entropy(x, t, DM(), backend=backend)
        messages.add(str(info.value))
    assert len(messages) == 1


def test_unavailable_backend_says_why():
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    if backends.unavailable_reason("cuda") is None:
        pytest.skip("the cuda backend is available here")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available: .*(CUDA|cuda)"):
        rf.robust_cross_entropy(x, t, DM(), backend="cuda")
    assert "cuda" not in rf.available_backends()


def test_unknown_backend():
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    with pytest.raises((ValueError, RuntimeError), match="unknown backend 'fast'.*torch"):
        rf.robust_cross_entropy(x, t, DM(), backend="fast")


def test_module_argument_errors():
    with pytest.raises(TypeError, match="scheme"):
        rf.RobustCrossEntropyLoss("DM")
    with pytest.raises(ValueError, match="reduction"):
        rf.RobustCrossEntropyLoss(DM(), reduction="avg")
    with pytest.raises(ValueError, match="lam"):
        rf.DMLoss(lam=-1.0)
    with pytest.raises(TypeError, match="scheme"):
        rf.example_weights(torch.randn(3, 2), torch.tensor([0, 1, 0]), "DM")


# ---------------------------------------------------------------------------
# schemes


@pytest.mark.parametrize(
    "make,exc,regex",
    [
        (lambda: DMBeta(alpha=0.5), ValueError, "alpha"),
        (lambda: DMBeta(eta=0.99), ValueError, "eta"),
        (lambda: GCE(q=0), ValueError, "q"),
        (lambda: GCE(q=-0.5), ValueError, "q"),
        (lambda: GCE(q=1.01), ValueError, "q"),
        (lambda: DM(lam=-1), ValueError, "lam"),
        (lambda: DMNormal(psi=1.5), ValueError, "psi"),
        (lambda: DMNormal(psi=-0.1), ValueError, "psi"),
        (lambda: DMNormal(beta=-1.0), ValueError, "beta"),
        (lambda: DM(beta=math.nan), ValueError, "beta"),
        (lambda: DM(lam=math.inf), ValueError, "lam"),
        (lambda: IMAE(T=math.nan), ValueError, "T"),
        (lambda: DMExponential(beta=-math.inf), ValueError, "beta"),
        (lambda: DMNormal(psi=math.nan), ValueError, "psi"),
        (lambda: DMBeta(alpha=math.nan), ValueError, "alpha"),
        (lambda: GCE(q=math.nan), ValueError, "q"),
        (lambda: DM(beta="8"), TypeError, "beta"),
        (lambda: DM(lam=True), TypeError, "lam"),
        (lambda: IMAE(T=None), TypeError, "T"),
        (lambda: GCE(q=torch.tensor([0.5, 0.6])), TypeError, "q"),
    ],
)
def test_scheme_validation(make, exc, regex):
    with pytest.raises(exc, match=regex):
        make()


def test_scheme_boundaries_are_valid():
    for s in (GCE(q=1.0), DMBeta(alpha=1.0, eta=1.0), DM(lam=0.0), DMNormal(psi=0.0), DMNormal(psi=1.0, beta=0.0)):
        assert isinstance(s, Scheme)


def _all_schemes():
    return SCHEMES + [DMNormal(), DMBeta(), GCE(q=1.0), DM(beta=0.0), DM(beta=-2.0), IMAE(T=0.0)]


def test_schemes_frozen_hashable_repr():
    for s in _all_schemes():
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(s, dataclasses.fields(s)[0].name if dataclasses.fields(s) else "x", 1.0)
        # repr is the constructor call, so it round-trips (the golden cases rely on it).
        names = {k: getattr(rf, k) for k in SCHEME_NAMES}
        again = eval(repr(s), {"__builtins__": {}}, names)
        assert again == s and hash(again) == hash(s) and again is not s
        assert isinstance(s.kernel_id, int)
        assert len(s.kernel_params) == 2 and all(isinstance(p, float) for p in s.kernel_params)
        assert s.default_normalize == (not s.loss_defined)
    assert DM(1, 8) == DM(lam=1.0, beta=8.0)
    assert DM() != IMAE() and DM() != DM(beta=8.5)
    assert len({DM(), DM(1.0, 8.0), IMAE(), IMAE(8), CCE(), CCE()}) == 3
    assert {type(s).loss_defined for s in (CCE(), MAE(), MSE(), GCE())} == {True}
    assert {type(s).loss_defined for s in (DM(), IMAE(), DMNormal(), DMExponential(), DMBeta())} == {False}


def test_emphasis_mode_is_argmax_of_w():
    """psi = argmax_p w(p) on [0, 1] (DM Definition 1), checked on a grid of p."""
    from robustloss_fast import reference

    p = torch.linspace(0, 1, 20001, dtype=torch.float64)[1:-1]
    logp, logq = torch.log(p), torch.log1p(-p)
    for s in _all_schemes():
        a, b = s.kernel_params
        lw = reference.log_weight(s.kernel_id, a, b, logp, logq, p, 1 - p)
        mode = s.emphasis_mode
        flat = float(lw.max() - lw.min()) < 1e-12
        if mode is None:
            # No unique maximum: constant w, or the maximum sits at both ends.
            ends = max(float(lw[0]), float(lw[-1]))
            assert flat or ends >= float(lw.max()) - 1e-9, f"{s}: w has an interior maximum"
            continue
        assert 0.0 <= mode <= 1.0
        assert float(p[lw.argmax()]) == pytest.approx(mode, abs=2e-4), f"{s}"
    assert DM(lam=0.5).emphasis_mode == pytest.approx(1 / 3)
    assert DMExponential(beta=-1.0).emphasis_mode == 1.0
    assert DMBeta(alpha=1.0, eta=1.0).emphasis_mode is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_cases_share_the_kernel(backend):
    """IMAE(T) is DM(1, T) and DMExponential(beta) is DM(0, beta): the same numbers, bit for bit."""
    x = torch.randn(20, 6)
    t = torch.randint(0, 6, (20,))
    for a, b in ((IMAE(T=5.0), DM(lam=1.0, beta=5.0)), (DMExponential(beta=-2.0), DM(lam=0.0, beta=-2.0))):
        for reduction in REDUCTIONS:
            va, ga = loss(x, t, a, backend, reduction)
            vb, gb = loss(x, t, b, backend, reduction)
            assert torch.equal(va, vb) and torch.equal(ga, gb)
    # GCE at q = 1 is MAE (L = 1 - p): equal to rounding.
    for reduction in REDUCTIONS:
        va, ga = loss(x.double(), t, GCE(q=1.0), backend, reduction)
        vb, gb = loss(x.double(), t, MAE(), backend, reduction)
        torch.testing.assert_close(va, vb, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_refused(backend):
    """The SPEC gradient has no derivative of its own: create_graph=True must raise, not return a wrong grad."""
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 3, (4,))
    with pytest.raises(RuntimeError, match="double backward|differentiate twice|once_differentiable"):
        # Refused either when the graph of the gradient is built or when it is differentiated.
        (g,) = torch.autograd.grad(rf.robust_cross_entropy(x, t, CCE(), backend=backend), x, create_graph=True)
        torch.autograd.grad(g.pow(2).sum(), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction,normalize", [("none", None), ("sum", None), ("mean", False)])
def test_zero_weight_row_with_overflowing_raw_weight(backend, reduction, normalize):
    """A row with s = 0 adds nothing, even where its raw weight exp(1000 ...) overflows (no 0 * inf = NaN)."""
    x = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, -1.0]], requires_grad=True)
    t = torch.tensor([0, 1])
    for kwargs in ({"sample_weight": torch.tensor([0.0, 1.0])}, {"weight": torch.tensor([0.0, 1.0, 1.0])}):
        v = rf.robust_cross_entropy(x, t, DM(lam=1.0, beta=1000.0), reduction=reduction, normalize=normalize,
                                    backend=backend, **kwargs)  # fmt: skip
        x.grad = None
        v.sum().backward()
        assert not torch.isnan(v).any(), kwargs
        assert torch.equal(x.grad[0], torch.zeros(3)), kwargs


def test_auto_on_devices_without_fused_kernels_uses_the_reference():
    assert backends.resolve("auto", torch.device("meta")).name == "torch"
    assert backends.resolve("torch", torch.device("meta")).name == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        backends.resolve("fastest", torch.device("cpu"))


def test_emphasis_mode_of_a_rising_dm():
    assert DM(lam=0.0, beta=-1.0).emphasis_mode == 1.0 == DMExponential(beta=-1.0).emphasis_mode
    assert DM(lam=1.0, beta=-1.0).emphasis_mode is None  # largest at both ends
