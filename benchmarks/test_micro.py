"""pytest-benchmark cases for the small shapes (not part of the tests/ run).

Run: ``pytest benchmarks/test_micro.py`` (add ``--benchmark-only`` or
``--benchmark-compare`` as usual). Each case times one forward + backward
step on leaf logits, the gradient allocation included.
"""

import pytest
import torch
import torch.nn.functional as F

from robustloss_fast import _bench

SHAPES = [(4096, 10), (4096, 100)]
VARIANTS = ["F.cross_entropy", "eager DM", "eager DM (lean)", "robustloss[cpu]"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_fwd_bwd(benchmark, shape, variant):
    if variant == "robustloss[cpu]" and "cpu" not in _bench._working_backends():
        pytest.skip("the compiled CPU extension is not importable here")
    case = _bench.Case(*shape)
    z, y = _bench._inputs(case, torch.device("cpu"))
    fn = _bench._variant_fn(variant)
    benchmark.group = case.label
    benchmark(_bench._step, fn, z, y)
    # The step really ran a backward: a finite gradient of the logits' shape.
    assert z.grad is not None and z.grad.shape == z.shape and bool(torch.isfinite(z.grad).all())


def test_eager_dm_matches_fused_gradient():
    """The eager baseline computes the same gradient as the fused op (like-for-like timing)."""
    if "cpu" not in _bench._working_backends():
        pytest.skip("the compiled CPU extension is not importable here")
    z, y = _bench._inputs(_bench.Case(512, 100), torch.device("cpu"), seed=int(torch.randint(0, 2**31, ()).item()))
    grads = []
    for variant in ("eager DM", "robustloss[cpu]"):
        _bench._step(_bench._variant_fn(variant), z, y)
        grads.append(z.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(grads[0], _grad_of(F.cross_entropy, z, y))


def _grad_of(fn, z, y):
    _bench._step(fn, z, y)
    return z.grad.clone()


SCHEME_CASES = {
    "DM": ("DM", {}),
    "CCE+label_smoothing": ("CCE", {"label_smoothing": 0.1}),
    "NCE": ("NCE", {}),
    "APL(nce,rce)": ("APL", {}),
    "NFL": ("NFL", {}),
}


@pytest.mark.parametrize("name", list(SCHEME_CASES))
def test_schemes_fwd_bwd(benchmark, name):
    """The whole-distribution peers next to DM at 4096x100 (benchmarks/bench_schemes.py has the table)."""
    import robustloss_fast as rf

    if "cpu" not in _bench._working_backends():
        pytest.skip("the compiled CPU extension is not importable here")
    cls, kw = SCHEME_CASES[name]
    scheme = getattr(rf.schemes, cls)()
    z, y = _bench._inputs(_bench.Case(4096, 100), torch.device("cpu"))
    benchmark.group = "schemes 4096x100 fp32"
    benchmark(_bench._step, lambda x, t: rf.robust_cross_entropy(x, t, scheme, backend="cpu", **kw), z, y)
    assert z.grad is not None and bool(torch.isfinite(z.grad).all())
