"""G is the exact gradient of L for the loss-defined schemes (SPEC §4), by finite differences.

With ``normalize=False`` the normaliser D does not depend on the logits, so
``torch.autograd.gradcheck`` in float64 must pass for CCE, MAE, MSE and GCE
under every reduction, with class weights, signed sample weights and ignored
rows. The derivative-defined schemes define G directly: their monitoring
value's derivative is not G, and gradcheck must say so.
"""

from __future__ import annotations

import pytest
import torch

import robustloss_fast as rf
from robustloss_fast import backends
from robustloss_fast.schemes import CCE, DM, GCE, MAE, MSE

BACKENDS = [b for b in ("torch", "cpu") if backends.unavailable_reason(b) is None]
LOSS_DEFINED = [CCE(), MAE(), MSE(), GCE(), GCE(q=0.25)]
# The loss-defined peers of issue 7, where present.
PEER_NAMES = ("Poly1", "RCE", "SCE", "Focal", "TaylorCE")
LOSS_DEFINED += [getattr(rf.schemes, name)() for name in PEER_NAMES if hasattr(rf.schemes, name)]


def _problem(shape, with_weights):
    c = shape[0] if len(shape) == 1 else shape[1]
    tshape = () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])
    x = (torch.randn(shape, dtype=torch.float64) * 2).requires_grad_()
    t = torch.randint(0, c, tshape)
    weight = sw = None
    if with_weights:
        if t.dim() > 0:
            t.view(-1)[0] = -100
        weight = torch.rand(c, dtype=torch.float64) + 0.5
        sw = torch.randn(tshape, dtype=torch.float64)  # negative entries: gradient ascent rows
    return x, t, weight, sw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("scheme", LOSS_DEFINED, ids=repr)
def test_gradcheck_loss_defined(scheme, reduction, backend):
    for shape in ((5, 4), (2, 3, 3), (6,)):
        for with_weights in (False, True):
            x, t, weight, sw = _problem(shape, with_weights)

            def fn(z):
                return rf.robust_cross_entropy(
                    z, t, scheme, weight=weight, sample_weight=sw, reduction=reduction, normalize=False, backend=backend
                )

            assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-6), (shape, with_weights)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_confident_rows(backend):
    """Margins of 15-25 (1 - p ~ 1e-7..1e-11): the gradient stays exact where q << eps(p)."""
    x = torch.zeros(4, 3, dtype=torch.float64)
    x[:, 0] = torch.tensor([15.0, 18.0, 21.0, 25.0])
    x.requires_grad_()
    t = torch.zeros(4, dtype=torch.long)
    for scheme in LOSS_DEFINED:
        def fn(z):
            return rf.robust_cross_entropy(z, t, scheme, reduction="sum", normalize=False, backend=backend)

        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-12, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_derivative_defined_value_is_not_differentiated(backend):
    """DM's value w (-log p) is a monitor: G is the designed gradient, not its derivative."""
    x, t, _, _ = _problem((5, 4), False)

    def fn(z):
        return rf.robust_cross_entropy(z, t, DM(), reduction="sum", backend=backend)

    assert not torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-6, raise_exception=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_are_constants(backend):
    """SPEC §3: weights are constants for differentiation. Weights that require grad are refused
    (as F.cross_entropy refuses a differentiable class weight) rather than silently left without one."""
    x, t, weight, sw = _problem((5, 4), True)
    for name in ("weight", "sample_weight"):
        kwargs = {"weight": weight, "sample_weight": sw}
        kwargs[name] = kwargs[name].clone().requires_grad_()
        with pytest.raises(RuntimeError, match=f"not differentiable with respect to {name}"):
            rf.robust_cross_entropy(x, t, DM(), backend=backend, **kwargs)
        with torch.no_grad():  # no autograd, no objection
            rf.robust_cross_entropy(x, t, DM(), backend=backend, **kwargs)
    v = rf.robust_cross_entropy(x, t, DM(), weight=weight, sample_weight=sw, backend=backend)
    v.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
