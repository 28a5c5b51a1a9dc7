"""Peer losses of the whole distribution: label smoothing, NCE and APL (issue 7).

Their gradient has a second term (``alpha r + beta u`` off the target). Their
parity with the float64 reference, with their definitions written in autograd
and with ``F.cross_entropy(label_smoothing=...)`` runs on every backend in the
backend suite (tests/test_backends.py). Here: gradcheck, their limits, the
module, errors and defaults, torch.compile, the fused linear layer and the CLI.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import robustloss_fast as rf
from robustloss_fast import backends
from robustloss_fast.schemes import APL, CCE, DM, MAE, NCE, NFL

from _cases import IGNORE

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
# the module, gradcheck, limits


def test_label_smoothing_module_matches_nn():
    logits, target = torch.randn(10, 4, 3), torch.randint(0, 4, (10, 3))
    weight = torch.rand(4) + 0.5
    ours = rf.RobustCrossEntropyLoss(CCE(), weight=weight, label_smoothing=0.25)
    theirs = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=0.25)
    torch.testing.assert_close(ours(logits, target), theirs(logits, target), rtol=1e-5, atol=1e-6)
    assert "label_smoothing=0.25" in repr(ours)


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
