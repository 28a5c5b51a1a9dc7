"""Large and tied logits on every backend (issue 18, item 1; docs/spec.md §2.2, §12).

A float32 ``lse_nt = m + log s`` drops ``log s`` once ``|m|`` is large (the
spacing of float32 at 1e8 is 8), and every value and gradient built on it
inherits the loss. The backends keep ``(m, ls)`` apart; here their value and
gradient must stay within float32 rounding of a float64 computation on the same
rounded inputs, for ties and common offsets up to 1e8, and one-term gradient
rows must sum to zero. Each backend runs on its own device (the registry's).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import robustloss_fast as rf
from robustloss_fast import backends
from robustloss_fast.schemes import CCE, DM, GCE, NCE, NFL, Focal, Poly1

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's numpy

EPS32 = torch.finfo(torch.float32).eps


def _backend_params():
    out = []
    for name in backends.NAMES:
        reason = backends.unavailable_reason(name)
        devices = backends.devices(name) or ("cpu",)
        device = "cuda" if "cuda" in devices and torch.cuda.is_available() else devices[-1]
        marks = [pytest.mark.skip(reason=f"backend {name!r} is unavailable here: {reason}")] if reason else []
        out.append(pytest.param(name, device, marks=marks, id=name))
    return out


BACKENDS = _backend_params()


def _loss_and_grad(x, t, scheme, backend, upstream=None, **kw):
    x = x.detach().clone().requires_grad_(True)
    v = rf.robust_cross_entropy(x, t, scheme, backend=backend, **kw)
    v.backward(upstream if upstream is not None else torch.ones_like(v))
    return v.detach().double().cpu(), x.grad.double().cpu()


def _truth(x, t, scheme, upstream=None, **kw):
    """Float64 on the same (already rounded) logits: the reference backend in float64."""
    return _loss_and_grad(x.double().cpu(), t.cpu(), scheme, "torch",
                          None if upstream is None else upstream.double().cpu(), **kw)  # fmt: skip


def _assert_float32_close(got, want, what):
    v, g = got
    rv, rg = want
    # Within float32 rounding: a few ulps per operation of the scheme (Focal and NFL chain a dozen),
    # of the value and of each row's largest gradient entry. Before (m, ls) the error at 1e5 was ~1e-3.
    tol_v = 32 * EPS32 * (rv.abs() + 1e-30)
    assert bool(((v - rv).abs() <= tol_v).all()), f"{what}: value {v.tolist()} vs float64 {rv.tolist()}"
    row_scale = rg.abs().amax(dim=-1, keepdim=True) + 1e-30
    err = ((g - rg).abs() / row_scale).max().item()
    assert err <= 32 * EPS32, f"{what}: gradient off by {err:.3g} of its row's scale (float32 eps {EPS32:.3g})"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_three_tied_logits_at_1e8_are_one_third_each(backend, device):
    x = torch.full((1, 3), 1e8, device=device)
    t = torch.tensor([1], device=device)
    v, g = _loss_and_grad(x, t, CCE(), backend)
    assert abs(v.item() - math.log(3)) <= 4 * EPS32 * math.log(3), v
    want = torch.tensor([[1 / 3, -2 / 3, 1 / 3]], dtype=torch.float64)
    assert torch.allclose(g, want, rtol=0, atol=4 * EPS32), g


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("offset", [0.0, 1e3, 1e5, -1e5, 1e8, -1e8])
@pytest.mark.parametrize(
    "scheme,kw",
    [
        (CCE(), {}),
        (DM(), {}),
        (GCE(), {}),
        (Focal(gamma=2.0), {}),
        (Poly1(), {}),
        (NCE(), {}),
        (NFL(), {}),
        (CCE(), {"label_smoothing": 0.1}),
    ],
    ids=["CCE", "DM", "GCE", "Focal", "Poly1", "NCE", "NFL", "label_smoothing"],
)
def test_common_offsets_cost_nothing(scheme, kw, offset, backend, device):
    n, c = 16, 10
    # The offset is added in float64 and rounded once: the float32 inputs both sides see.
    x = (torch.randn(n, c, dtype=torch.float64) * 2 + offset).float().to(device)
    t = torch.randint(0, c, (n,), device=device)
    for reduction in ("none", "mean"):
        up = torch.randn(n, device=device) if reduction == "none" else None
        got = _loss_and_grad(x, t, scheme, backend, up, reduction=reduction, **kw)
        want = _truth(x, t, scheme, up, reduction=reduction, **kw)
        _assert_float32_close(got, want, f"{backend} {scheme!r} {kw} offset={offset:g} {reduction}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("offset", [1e5, 1e8])
def test_ties_at_an_offset_match_cross_entropy(offset, backend, device):
    # Rows of exact ties (several tie groups) at an offset: CCE must equal float64 F.cross_entropy.
    base = torch.tensor([0.0, 0.0, 0.0, 8.0, 8.0, 16.0, 16.0, 16.0])
    x = torch.stack([base.roll(k) for k in range(8)]).double().add(offset).float().to(device)
    t = torch.arange(8, device=device)
    v, g = _loss_and_grad(x, t, CCE(), backend, reduction="none", upstream=torch.ones(8, device=device))
    xd = x.double().cpu().requires_grad_(True)
    ref = F.cross_entropy(xd, t.cpu(), reduction="none")
    ref.sum().backward()
    _assert_float32_close((v, g), (ref.detach(), xd.grad), f"{backend} ties at {offset:g}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("scheme", [CCE(), DM(), GCE(), Focal(gamma=0.5)], ids=repr)
def test_one_term_gradient_rows_sum_to_zero_at_large_offsets(scheme, backend, device):
    x = (torch.randn(32, 7, dtype=torch.float64) + 1e8).float().to(device)
    t = torch.randint(0, 7, (32,), device=device)
    _, g = _loss_and_grad(x, t, scheme, backend, reduction="none", upstream=torch.ones(32, device=device))
    l1 = g.abs().sum(1)
    assert bool((g.sum(1).abs() <= 4 * EPS32 * l1 + 1e-30).all()), g.sum(1)
    assert bool((l1 > 0).all()), "a zero gradient would make the sum test vacuous"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_logits_at_the_dtype_maximum(dtype, backend, device):
    # lse_nt = m + ls would round up to the maximum (or overflow); its parts give the exact margin.
    big = torch.finfo(dtype).max
    x = torch.tensor([[big, big, 0.0], [big, -big, 0.0]], dtype=dtype, device=device)
    t = torch.tensor([0, 1], device=device)
    v, g = _loss_and_grad(x, t, CCE(), backend, reduction="none", upstream=torch.ones(2, device=device))
    assert abs(v[0].item() - math.log(2)) <= 4 * EPS32, v  # two tied maxima: p = 1/2
    assert v[1].item() == math.inf  # -log p = 2 max, beyond float32: its limit, as F.cross_entropy's
    assert bool(torch.isfinite(g).all()), g
    assert torch.allclose(g[1], torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)), g
    assert abs(g[0, 0].item() + 0.5) <= 4 * EPS32 and abs(g[0, 1].item() - 0.5) <= 4 * EPS32, g
