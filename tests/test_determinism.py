"""SPEC §6: the same inputs give bitwise-identical outputs on the same device and backend."""

from __future__ import annotations

import pytest
import torch

import robustloss_fast as rf
from robustloss_fast import backends
from robustloss_fast.schemes import CCE, DM, GCE, DMNormal

BACKENDS = [b for b in ("torch", "cpu") if backends.unavailable_reason(b) is None]


def _problem(dtype, n=300, c=129):
    # n * c is well above the CPU kernel's grain (16K logits per task), so the
    # row pass is split across threads.
    x = (torch.randn(n, c) * 3).to(dtype)
    t = torch.randint(0, c, (n,))
    t[::11] = -100
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return x, t, torch.rand(c, dtype=acc) + 0.5, torch.randn(n, dtype=acc), torch.randn(n, dtype=acc)


def _outputs(x, t, w, sw, upstream, backend):
    out = []
    for scheme, reduction in ((DM(), "mean"), (GCE(), "none"), (CCE(), "sum"), (DMNormal(psi=0.3, beta=4.0), "none")):
        z = x.detach().clone().requires_grad_()
        v = rf.robust_cross_entropy(z, t, scheme, weight=w, sample_weight=sw, reduction=reduction, backend=backend)
        g_out = upstream.to(v.dtype) if reduction == "none" else torch.ones((), dtype=v.dtype)
        (g,) = torch.autograd.grad(v, z, g_out)
        out += [v.detach(), g]
    return out


def _bitwise_equal(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_repeated_runs_are_bitwise_identical(dtype, backend):
    x, t, w, sw, upstream = _problem(dtype)
    first = _outputs(x, t, w, sw, upstream, backend)
    for _ in range(2):
        again = _outputs(x, t, w, sw, upstream, backend)
        assert all(_bitwise_equal(a, b) for a, b in zip(first, again))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension is not importable")
def test_cpu_kernel_does_not_depend_on_thread_count():
    """Beyond SPEC: the CPU kernel is row-parallel and sums across rows sequentially,
    so even the thread count does not change a bit. A change here means a reduction
    became thread-order dependent."""
    x, t, w, sw, upstream = _problem(torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _outputs(x, t, w, sw, upstream, "cpu")
        torch.set_num_threads(max(2, before))
        many = _outputs(x, t, w, sw, upstream, "cpu")
    finally:
        torch.set_num_threads(before)
    assert all(_bitwise_equal(a, b) for a, b in zip(one, many))
