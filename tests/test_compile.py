"""The ops under torch.library.opcheck, and the API under torch.compile(fullgraph=True).

opcheck verifies the schemas, the fake (meta) kernels against the real ones,
the autograd registration and AOT dispatch. The compile tests trace a whole
training step through the API with no graph break and compare with eager.
Compiles are slow on a 2-core machine (inductor): one compiled function per
backend, doing several calls at once.
"""

from __future__ import annotations

import pytest
import torch

import robustloss_fast as rf
from robustloss_fast import backends
from robustloss_fast._common import Kernel as K
from robustloss_fast.schemes import CCE, DM, GCE

HAS_CPU = backends.unavailable_reason("cpu") is None
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="the compiled extension is not importable")


def _inputs(n, c, dtype, requires_grad=False):
    x = (torch.randn(n, c, dtype=torch.float64) * 3).to(dtype).requires_grad_(requires_grad)
    t = torch.randint(0, c, (n,))
    if n > 2:
        t[1] = -100
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(c, dtype=acc) + 0.5
    sw = torch.randn(n, dtype=acc)
    return x, t, w, sw


def _forward_samples():
    samples = []
    # (n, c, dtype, scheme id, a, b, weighted, reduction, normalize, requires_grad)
    for n, c, dtype, kid, a, b, weighted, red, norm, rg in (
        (8, 5, torch.float32, K.DM, 1.0, 8.0, True, 1, True, True),
        (8, 5, torch.float32, K.CCE, 0.0, 0.0, False, 0, False, True),
        (6, 7, torch.float64, K.GCE, 0.7, 0.0, True, 2, False, True),
        (5, 3, torch.bfloat16, K.DM_BETA, 2.0, 3.0, True, 1, False, False),
        (4, 1, torch.float16, K.DM_NORMAL, 0.3, 4.0, False, 0, True, False),
        (0, 4, torch.float32, K.DM, 0.5, 12.0, True, 1, True, False),
    ):
        x, t, w, sw = _inputs(n, c, dtype, rg)
        samples.append((x, t, int(kid), a, b, w if weighted else None, sw if weighted else None, -100, red, norm))
    return samples


@needs_cpu
def test_opcheck_forward():
    for args in _forward_samples():
        torch.library.opcheck(torch.ops.robustloss.robust_ce_forward.default, args)


@needs_cpu
def test_opcheck_backward_and_rows():
    ops = torch.ops.robustloss
    cases = ((8, 5, torch.float32, False), (7, 3, torch.float64, True), (6, 9, torch.bfloat16, True))
    for n, c, dtype, per_row in cases:
        x, t, w, sw = _inputs(n, c, dtype)
        _, stats = ops.robust_ce_forward(x, t, 4, 1.0, 8.0, w, sw, -100, 0 if per_row else 1, True)
        acc = stats.dtype
        grad = torch.randn(n, dtype=acc) if per_row else torch.tensor(0.5, dtype=acc)
        torch.library.opcheck(ops.robust_ce_backward.default, (grad, x, t, stats, None, -100, 4, 1.0))
        # Label smoothing with class weights: stats with a beta term, u = the class weights.
        _, stats = ops.robust_ce_forward(x, t, 10, 0.1, 0.0, w, sw, -100, 0 if per_row else 1, False)
        torch.library.opcheck(ops.robust_ce_backward.default, (grad, x, t, stats, w, -100, 10, 0.1))
        # The in-place twin: its schema must declare the write (opcheck's test_schema sees it happen).
        torch.library.opcheck(ops.robust_ce_backward_.default, (x.clone(), grad, t, stats, w, -100, 10, 0.1))
        cases = ((4, 0.5, 12.0, None, True), (3, 0.7, 0.0, None, False), (6, 2.0, 3.0, None, False))
        cases += ((10, 0.2, 0.0, w, False), (11, 1.0, 4.0, None, False))
        for kid, a, b, u, normalised in cases:
            torch.library.opcheck(ops.robust_ce_rows.default, (x, t, kid, a, b, u, -100, normalised))
        # The cross-row step alone, on rows of the row op (float32/float64 rows), each reduction.
        rows = ops.robust_ce_rows(x, t, 4, 1.0, 8.0, None, -100, True)
        sw = torch.randn(n, dtype=acc)
        for reduction, normalize, weight_in_rows in ((1, True, False), (1, False, True), (2, False, False),
                                                     (0, False, False)):  # fmt: skip
            args = (rows, t, w.to(acc), sw, -100, reduction, normalize, weight_in_rows)
            torch.library.opcheck(ops.robust_ce_finalize.default, args)


def _step(x, t, w, sw, backend):
    """Two losses of a training step: a weighted normalised DM mean and a per-element GCE."""
    a = rf.robust_cross_entropy(x, t, DM(lam=0.5, beta=12.0), weight=w, sample_weight=sw, backend=backend)
    b = rf.robust_cross_entropy(x, t, GCE(), reduction="none", backend=backend)
    c = rf.robust_cross_entropy(x, t, CCE(), reduction="sum", backend=backend)
    return a + (b * torch.arange(b.shape[0], dtype=b.dtype)).sum() / 10 + c


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_cpu), "torch"])
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    compiled = torch.compile(_step, fullgraph=True)
    for n in (16, 16):  # the second call reuses the compiled graph
        x, t, w, sw = _inputs(n, 10, torch.float32, requires_grad=True)
        t[5] = -100
        value = compiled(x, t, w, sw, backend)
        (grad,) = torch.autograd.grad(value, x)
        x_eager = x.detach().clone().requires_grad_()
        expected = _step(x_eager, t, w, sw, backend)
        (expected_grad,) = torch.autograd.grad(expected, x_eager)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
        assert bool((grad[1] == 0).all()) and bool((grad[5] == 0).all())  # ignored rows
    if backend == "cpu":
        # The op validates targets at run time, inside the compiled graph too.
        t_bad = t.clone()
        t_bad[3] = 10
        with pytest.raises(Exception, match=r"\b10\b"):
            compiled(x, t_bad, w, sw, backend)


def test_choosing_a_backend_traces_under_fullgraph():
    """Resolving every backend on every device calls nothing Dynamo cannot trace.

    On a GPU machine ``backend="cuda"`` / ``"auto"`` once asked the compiled
    extension whether it was built with CUDA while Dynamo traced the call (a
    builtin of a C extension: a hard graph break under fullgraph=True). The
    same questions are asked here for every name and device type, CUDA
    included, so a CPU-only run catches any such call.
    """

    def choose(x):
        names = backends.available_backends()
        for device in ("cpu", "cuda", "meta"):
            backends.resolve("auto", torch.device(device))
            for name in backends.NAMES:
                backends.unavailable_reason(name)
        return x * len(names)

    x = torch.ones(3)
    got = torch.compile(choose, fullgraph=True, backend="eager")(x)
    assert torch.equal(got, x * len(backends.available_backends()))
