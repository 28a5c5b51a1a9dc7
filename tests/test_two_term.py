"""Peer losses of the whole distribution: label smoothing, NCE and APL (issue 7).

Their gradient has a second term (``alpha r + beta u`` off the target), so
besides the parity with the float64 reference they are checked against their
definitions written in plain autograd, and label smoothing against PyTorch's
own ``F.cross_entropy(label_smoothing=...)``, with every ``weight`` /
``ignore_index`` / ``reduction`` / shape convention.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import robustloss_fast as rf
from robustloss_fast import backends
from robustloss_fast.schemes import APL, CCE, DM, MAE, NCE, NFL

from test_parity import DTYPES, IGNORE, SHAPES, acc_of, acc_rtol, assert_near, make_case

BACKENDS = [b for b in ("torch", "cpu") if backends.unavailable_reason(b) is None]
TWO_TERM = [
    NCE(),
    APL(),
    APL(passive="mae", alpha=10.0, beta=1.0),
    APL(passive="rce", alpha=10.0, beta=0.1, A=-9.21),
    NFL(),
    NFL(gamma=2.0),
    APL(active="nfl"),
    APL(active="nfl", passive="mae", alpha=10.0, beta=1.0, gamma=1.0),
]
REDUCTIONS = ["none", "mean", "sum"]


def _id(x):
    return repr(x) if not isinstance(x, torch.dtype) else str(x).replace("torch.", "")


def _run(backend, logits, target, scheme, reduction, upstream, weight=None, sw=None, **kw):
    x = logits.detach().clone().requires_grad_()
    value = rf.robust_cross_entropy(
        x, target, scheme, weight=weight, sample_weight=sw, reduction=reduction, backend=backend, **kw
    )
    (grad,) = torch.autograd.grad(value, x, upstream.to(value.dtype))
    return value.detach(), grad


def _upstream(target, reduction):
    return torch.randn(tuple(target.shape) if reduction == "none" else (), dtype=torch.float64)


# ---------------------------------------------------------------------------
# label smoothing == F.cross_entropy


SMOOTH_SHAPES = [((13, 7), (13,)), ((9,), ()), ((4, 5, 3, 2), (4, 3, 2)), ((6, 1), (6,)), ((3, 1000), (3,))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("eps", [0.05, 0.3, 1.0])
def test_label_smoothing_equals_torch_float64(eps, reduction, backend):
    for shape, tshape in SMOOTH_SHAPES:
        c = shape[0] if len(shape) == 1 else shape[1]
        for with_weight in (False, True):
            logits = torch.randn(shape, dtype=torch.float64) * 3
            target = torch.randint(0, c, tshape)
            if target.dim() > 0:
                target.view(-1)[0] = IGNORE
            weight = torch.rand(c, dtype=torch.float64) + 0.2 if with_weight else None
            upstream = _upstream(target, reduction)
            x = logits.clone().requires_grad_()
            want = F.cross_entropy(x, target, weight=weight, reduction=reduction, label_smoothing=eps)
            (want_g,) = torch.autograd.grad(want, x, upstream)
            v, g = _run(backend, logits, target, CCE(), reduction, upstream, weight, label_smoothing=eps)
            what = f"{shape} weight={with_weight}"
            torch.testing.assert_close(v, want.detach(), rtol=1e-10, atol=1e-12, msg=f"value {what}")
            torch.testing.assert_close(g, want_g, rtol=1e-10, atol=1e-12, msg=f"grad {what}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=_id)
def test_label_smoothing_equals_torch_low_precision(dtype, backend):
    """Against F.cross_entropy in float64 on the same rounded logits (torch's own low-precision path is no oracle)."""
    for reduction in REDUCTIONS:
        logits = (torch.randn(33, 50, dtype=torch.float64) * 3).to(dtype)
        target = torch.randint(0, 50, (33,))
        target[::5] = IGNORE
        weight = torch.rand(50, dtype=acc_of(dtype)) + 0.5
        upstream = _upstream(target, reduction)
        x = logits.double().requires_grad_()
        want = F.cross_entropy(x, target, weight=weight.double(), reduction=reduction, label_smoothing=0.1)
        (want_g,) = torch.autograd.grad(want, x, upstream)
        v, g = _run(backend, logits, target, CCE(), reduction, upstream, weight, label_smoothing=0.1)
        assert v.dtype == acc_of(dtype) and g.dtype == dtype
        assert_near(v, want.detach(), 2e-5, v.dtype, what=f"{reduction} value")
        assert_near(g, want_g, 2e-5, dtype, what=f"{reduction} gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_smoothing_masked_class_like_torch(backend):
    """A -inf logit: PyTorch's smoothed value is +inf and its gradient is finite (-eps/C there); so is ours."""
    logits = torch.randn(4, 6, dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3])
    logits[0, 5] = -math.inf
    x = logits.clone().requires_grad_()
    want = F.cross_entropy(x, target, reduction="none", label_smoothing=0.2)
    (want_g,) = torch.autograd.grad(want.sum(), x)
    v, g = _run(backend, logits, target, CCE(), "none", torch.ones(4, dtype=torch.float64), label_smoothing=0.2)
    assert math.isinf(float(v[0])) and float(v[0]) > 0
    torch.testing.assert_close(v[1:], want[1:].detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, want_g, rtol=1e-10, atol=1e-12)
    assert float(g[0, 5]) == pytest.approx(-0.2 / 6)


def test_label_smoothing_zero_is_plain_cce():
    logits, target = torch.randn(8, 5), torch.randint(0, 5, (8,))
    for backend in BACKENDS:
        a = rf.robust_cross_entropy(logits, target, CCE(), backend=backend)
        b = rf.robust_cross_entropy(logits, target, CCE(), label_smoothing=0.0, backend=backend)
        assert torch.equal(a, b)


def test_label_smoothing_module_matches_nn():
    logits, target = torch.randn(10, 4, 3), torch.randint(0, 4, (10, 3))
    weight = torch.rand(4) + 0.5
    ours = rf.RobustCrossEntropyLoss(CCE(), weight=weight, label_smoothing=0.25)
    theirs = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.25)
    torch.testing.assert_close(ours(logits, target), theirs(logits, target), rtol=1e-5, atol=1e-6)
    assert "label_smoothing=0.25" in repr(ours)


# ---------------------------------------------------------------------------
# NCE / NFL / APL from their definitions


def _normalized(ls, y, gamma):
    """FL(p_y) / sum_k FL(P_k) with FL(P) = -(1 - P)^gamma log P (gamma = 0: NCE)."""
    fl = -((1 - ls.exp()) ** gamma) * ls if gamma else -ls
    return fl.gather(1, y[:, None]).squeeze(1) / fl.sum(1)


def nce_apl_definition(logits, target, scheme, weight=None, sw=None, reduction="mean"):
    """alpha active + beta passive (NCE = log p / sum_k log P_k, NFL), in plain autograd (float64)."""
    ls = torch.log_softmax(logits, dim=1)
    valid = target != IGNORE
    y = torch.where(valid, target, torch.zeros_like(target))
    logp = ls.gather(1, y[:, None]).squeeze(1)
    if isinstance(scheme, (NCE, NFL)):
        x = _normalized(ls, y, 0.0 if isinstance(scheme, NCE) else scheme.gamma)
    else:
        active = _normalized(ls, y, scheme.gamma if scheme.active == "nfl" else 0.0)
        passive = (1 - logp.exp()) * (-scheme.A if scheme.passive == "rce" else 1.0)
        x = scheme.alpha * active + scheme.beta * passive
    s = torch.where(valid, torch.ones_like(x), torch.zeros_like(x))
    if weight is not None:
        s = s * weight[y]
    if sw is not None:
        s = s * sw
    sx = torch.where(valid, s * x, torch.zeros_like(x))
    if reduction == "none":
        return sx
    if reduction == "sum":
        return sx.sum()
    return sx.sum() / (weight[y] if weight is not None else torch.ones_like(x))[valid].sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("scheme", TWO_TERM, ids=_id)
def test_nce_apl_equal_their_definition(scheme, reduction, backend):
    for n, c in ((17, 5), (8, 2), (3, 300)):
        for extras in (False, True):
            logits = torch.randn(n, c, dtype=torch.float64) * 3
            target = torch.randint(0, c, (n,))
            target[0] = IGNORE
            weight = torch.rand(c, dtype=torch.float64) + 0.5 if extras else None
            sw = torch.randn(n, dtype=torch.float64) if extras else None
            upstream = _upstream(target, reduction)
            x = logits.clone().requires_grad_()
            want = nce_apl_definition(x, target, scheme, weight, sw, reduction)
            (want_g,) = torch.autograd.grad(want, x, upstream)
            v, g = _run(backend, logits, target, scheme, reduction, upstream, weight, sw)
            torch.testing.assert_close(v, want.detach(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(g, want_g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", TWO_TERM + ["smoothing"], ids=_id)
def test_gradcheck_two_term(scheme, backend):
    kw = {"label_smoothing": 0.3} if scheme == "smoothing" else {}
    scheme = CCE() if scheme == "smoothing" else scheme
    for reduction in REDUCTIONS:
        x = (torch.randn(6, 4, dtype=torch.float64) * 2).requires_grad_()
        t = torch.tensor([0, 3, IGNORE, 1, 2, 2])
        weight = torch.rand(4, dtype=torch.float64) + 0.5
        sw = torch.randn(6, dtype=torch.float64)

        def fn(z):
            return rf.robust_cross_entropy(
                z, t, scheme, weight=weight, sample_weight=sw, reduction=reduction, backend=backend, **kw
            )

        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", [NCE(), NFL()], ids=_id)
def test_normalized_limits(scheme, backend):
    """A masked class makes the denominator infinite: 0 and no gradient (the limit); C = 1: 0.

    Confident rows (margins of 60) stay finite in float32: q underflows, log q does not.
    """
    logits = torch.randn(3, 4, dtype=torch.float64)
    logits[0, 2] = -math.inf
    target = torch.tensor([1, 0, 3])
    v, g = _run(backend, logits, target, scheme, "none", torch.ones(3, dtype=torch.float64))
    assert float(v[0]) == 0.0 and bool((g[0] == 0).all())
    assert bool(torch.isfinite(v).all()) and bool(torch.isfinite(g).all())
    v, g = _run(backend, torch.randn(5, 1), torch.zeros(5, dtype=torch.long), scheme, "sum", torch.tensor(1.0))
    assert float(v) == 0.0 and bool((g == 0).all())
    z = torch.zeros(4, 6)
    z[torch.arange(4), torch.tensor([0, 1, 2, 3])] = 60.0
    z[1, 5] = 60.0  # a confident wrong class too
    v, g = _run(backend, z, torch.tensor([0, 1, 2, 3]), scheme, "none", torch.ones(4))
    assert bool(torch.isfinite(v).all()) and bool(torch.isfinite(g).all()), (v, g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nce_value_range_and_scale_invariance(backend):
    """NCE is in [0, 1] and APL's active term is bounded: confident wrong rows cannot dominate."""
    logits = torch.randn(64, 10) * 10
    target = torch.randint(0, 10, (64,))
    v = rf.robust_cross_entropy(logits, target, NCE(), reduction="none", backend=backend)
    assert bool((v >= 0).all()) and bool((v <= 1 + 1e-6).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", [NCE(), NFL(), APL(), APL(active="nfl", passive="mae", alpha=2.0)], ids=_id)
def test_masked_target_is_the_limit(scheme, backend):
    """A -inf target logit (p = 0): the normalized loss tends to 1 (no gradient), not NaN."""
    z = torch.tensor([[-math.inf, 1.0, 0.0, 3.0], [0.5, 1.0, 0.0, 3.0]], dtype=torch.float64)
    target = torch.tensor([0, 0])
    v, g = _run(backend, z, target, scheme, "none", torch.ones(2, dtype=torch.float64))
    passive = 0.0 if isinstance(scheme, (NCE, NFL)) else scheme.beta * (-scheme.A if scheme.passive == "rce" else 1.0)
    alpha = 1.0 if isinstance(scheme, (NCE, NFL)) else scheme.alpha
    assert float(v[0]) == pytest.approx(alpha + passive, rel=1e-12)
    assert bool((g[0] == 0).all()) and bool(torch.isfinite(g).all())
    # ... and it is the limit of ever smaller target logits.
    far = z.clone()
    far[0, 0] = -1e6
    v_far, _ = _run(backend, far, target, scheme, "none", torch.ones(2, dtype=torch.float64))
    assert float(v_far[0]) == pytest.approx(float(v[0]), rel=1e-4)


# ---------------------------------------------------------------------------
# every dtype, shape family and flag vs the float64 reference


def _check(scheme, logits, target, weight, sw, reduction, what, **kw):
    dtype = logits.dtype
    c = logits.shape[0] if logits.dim() == 1 else logits.shape[1]
    upstream = _upstream(target, reduction)
    ref_v, ref_g = _run("torch", logits.double(), target, scheme, reduction, upstream,
                        None if weight is None else weight.double(), None if sw is None else sw.double(), **kw)  # fmt: skip
    vscale = None
    if sw is not None and reduction != "none":
        vscale = float(_run("torch", logits.double(), target, scheme, reduction, upstream,
                            None if weight is None else weight.double(), sw.double().abs(), **kw)[0].abs())  # fmt: skip
    for backend in BACKENDS:
        v, g = _run(backend, logits, target, scheme, reduction, upstream, weight, sw, **kw)
        tag = f"{what} {backend}"
        assert v.dtype == acc_of(dtype) and g.dtype == dtype, tag
        assert_near(v, ref_v, acc_rtol(dtype, c), v.dtype, vscale, f"{tag} value")
        assert_near(g, ref_g, acc_rtol(dtype, c), dtype, None, f"{tag} gradient")


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("scheme", TWO_TERM + ["smoothing"], ids=_id)
def test_parity_every_shape(scheme, dtype):
    kw = {"label_smoothing": 0.1} if scheme == "smoothing" else {}
    scheme = CCE() if scheme == "smoothing" else scheme
    for k, (shape, layout, configs) in enumerate(SHAPES):
        for config in configs:
            reduction = REDUCTIONS[k % 3]
            logits, target, weight, sw = make_case(shape, dtype, config, layout)
            _check(scheme, logits, target, weight, sw, reduction, f"{shape} {layout} {config} {reduction}", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_parity_large_vocabulary(dtype):
    for k, (scheme, kw) in enumerate([(NCE(), {}), (APL(), {}), (CCE(), {"label_smoothing": 0.1}), (NFL(), {})]):
        logits, target, weight, sw = make_case((3, 50257), dtype, "full")
        target[0] = 50256
        _check(scheme, logits, target, weight, sw, REDUCTIONS[k % 3], f"{scheme} {kw}", **kw)


# ---------------------------------------------------------------------------
# flags and errors


def test_errors():
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    with pytest.raises(ValueError, match="label_smoothing is defined for CCE"):
        rf.robust_cross_entropy(x, t, DM(), label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing is defined for CCE"):
        rf.RobustCrossEntropyLoss(MAE(), label_smoothing=0.1)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="label_smoothing must be in"):
            rf.robust_cross_entropy(x, t, CCE(), label_smoothing=bad)
    with pytest.raises(TypeError, match="label_smoothing"):
        rf.robust_cross_entropy(x, t, CCE(), label_smoothing="0.1")
    # Any real number is accepted, as by F.cross_entropy (numpy and tensor scalars too).
    a = rf.robust_cross_entropy(x, t, CCE(), label_smoothing=torch.tensor(0.25).numpy()[()])
    torch.testing.assert_close(a, F.cross_entropy(x, t, label_smoothing=0.25))
    for scheme, kw in ((NCE(), {}), (APL(), {}), (NFL(), {}), (CCE(), {"label_smoothing": 0.1})):
        with pytest.raises(ValueError, match="normalize=False"):
            rf.robust_cross_entropy(x, t, scheme, normalize=True, **kw)
        # normalize only acts on "mean" (SPEC §5): accepted and ignored for "sum".
        rf.robust_cross_entropy(x, t, scheme, normalize=True, reduction="sum", **kw)
    with pytest.raises(ValueError, match="no emphasis"):
        rf.example_weights(x, t, NCE())
    with pytest.raises(ValueError, match="passive"):
        APL(passive="gce")
    with pytest.raises(ValueError, match="cannot both be 0"):
        APL(alpha=0.0, beta=0.0)
    with pytest.raises(ValueError, match="alpha and beta"):
        APL(alpha=-1.0)
    with pytest.raises(ValueError, match="A must be < 0"):
        APL(A=1.0)
    if "cpu" in BACKENDS:
        ops = torch.ops.robustloss
        with pytest.raises(ValueError, match="normalize=False"):
            ops.robust_ce_forward(x, t, 11, 1.0, 0.0, None, None, -100, 1, True)
        with pytest.raises(ValueError, match="normalize=False"):
            ops.robust_ce_rows(x, t, 10, 0.1, 0.0, None, -100, True)


def test_defaults_and_params():
    assert NCE().loss_defined and NCE().two_term and not NCE().default_normalize
    assert APL().kernel_params == (1.0, 4.0)  # alpha, beta * -A
    assert APL(passive="mae", alpha=10.0, beta=1.0).kernel_params == (10.0, 1.0)
    assert NCE().emphasis_mode is None and NFL().emphasis_mode is None
    # NFL's kernel takes (gamma, b / alpha); alpha is a loss scale outside the kernels.
    apl = APL(active="nfl", passive="rce", alpha=10.0, beta=0.1, gamma=0.5)
    assert apl.kernel_id == NFL().kernel_id and apl.kernel_params == (0.5, 0.04) and apl.loss_scale == 10.0
    assert APL(active="nfl", alpha=0.0, beta=1.0).loss_scale == 1.0  # the passive term alone
    with pytest.raises(ValueError, match="active"):
        APL(active="gce")
    with pytest.raises(ValueError, match="gamma"):
        NFL(gamma=-1.0)


def test_nfl_gamma_zero_is_nce():
    logits, target = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 5, (9,))
    for backend in BACKENDS:
        a = rf.robust_cross_entropy(logits, target, NFL(gamma=0.0), reduction="none", backend=backend)
        b = rf.robust_cross_entropy(logits, target, NCE(), reduction="none", backend=backend)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension is not importable")
@pytest.mark.parametrize("kind", ["smoothing", "apl"])
def test_compile_fullgraph(kind):
    scheme, kw = (CCE(), {"label_smoothing": 0.2}) if kind == "smoothing" else (APL(), {})
    weight = torch.rand(7) + 0.5

    def step(x, t):
        return rf.robust_cross_entropy(x, t, scheme, weight=weight, backend="cpu", **kw)

    x, t = torch.randn(12, 7), torch.randint(0, 7, (12,))
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager = step(xe, t)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True)(xc, t)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("scheme", [NCE(), APL(passive="mae"), APL(active="nfl", alpha=2.0)], ids=_id)
def test_fused_linear(scheme):
    """The fused linear layer runs the two-term rows unchanged (chunks, class and sample weights)."""
    from robustloss_fast.linear import linear_robust_cross_entropy

    h = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (20,))
    t[3] = IGNORE
    cw, sw = torch.rand(11, dtype=torch.float64) + 0.5, torch.randn(20, dtype=torch.float64)
    for backend in BACKENDS:
        got = linear_robust_cross_entropy(h, w, t, scheme, class_weight=cw, sample_weight=sw, chunk_size=6, backend=backend)
        gh, gw = torch.autograd.grad(got, (h, w))
        want = rf.robust_cross_entropy(h @ w.t(), t, scheme, weight=cw, sample_weight=sw, backend="torch")
        wh, ww = torch.autograd.grad(want, (h, w))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gh, wh, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gw, ww, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grad_in_forward", [None, False])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_linear_label_smoothing_equals_torch(reduction, grad_in_forward):
    from robustloss_fast.linear import LinearRobustCrossEntropyLoss, linear_robust_cross_entropy

    h = torch.randn(19, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(13, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 13, (19,))
    t[[2, 7]] = IGNORE
    cw = torch.rand(13, dtype=torch.float64) + 0.5
    upstream = _upstream(t, reduction)
    want = F.cross_entropy(torch.addmm(bias, h, w.t()), t, weight=cw, reduction=reduction, label_smoothing=0.2)
    want_g = torch.autograd.grad(want, (h, w, bias), upstream)
    for backend in BACKENDS:
        got = linear_robust_cross_entropy(
            h, w, t, CCE(), bias=bias, class_weight=cw, reduction=reduction, chunk_size=5, backend=backend,
            grad_in_forward=grad_in_forward, label_smoothing=0.2,
        )  # fmt: skip
        got_g = torch.autograd.grad(got, (h, w, bias), upstream)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for a, b in zip(got_g, want_g):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="label_smoothing is defined for CCE"):
        LinearRobustCrossEntropyLoss(NCE(), label_smoothing=0.1)


def test_cli_parses_and_refuses_to_plot_them():
    from robustloss_fast.cli import CLIError, parse_scheme
    from robustloss_fast.cli._common import scheme_name
    from robustloss_fast.cli.plot import log_emphasis

    apl = parse_scheme("APL(active='nfl', passive='mae', alpha=10, beta=1)")
    assert apl == APL(active="nfl", passive="mae", alpha=10.0, beta=1.0)
    assert scheme_name(apl).startswith("APL(active='nfl', passive='mae', alpha=10")
    assert parse_scheme("nfl(0.5)") == NFL(gamma=0.5)
    with pytest.raises(CLIError, match="no emphasis"):
        log_emphasis(NCE(), torch.linspace(0, 1, 5))
    with pytest.raises(CLIError, match="invalid scheme"):
        parse_scheme("APL(active='xyz')")
