"""The public API: CCE is F.cross_entropy, shapes and strides, modules, helpers, kernel variants."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import robustloss_fast as rf
from robustloss_fast import backends
from robustloss_fast._common import Kernel
from robustloss_fast.schemes import CCE, DM, GCE, IMAE, MAE, MSE, DMBeta, DMExponential, DMNormal

from _backends import device_of

BACKENDS = [b for b in ("torch", "cpu") if backends.unavailable_reason(b) is None]
REDUCTIONS = ["none", "mean", "sum"]
needs_cpu = pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension is not importable")


def _grad(fn, x, upstream=None):
    x = x.detach().clone().requires_grad_()
    v = fn(x)
    (g,) = torch.autograd.grad(v, x, torch.ones_like(v) if upstream is None else upstream)
    return v.detach(), g


# ---------------------------------------------------------------------------
# CCE == F.cross_entropy (value and gradient on every backend: test_backends.test_cce_is_cross_entropy)


def _close(a, b, dtype):
    """float64: a few ulps of the largest entry; float32: to rounding."""
    if dtype == torch.float64:
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15 * max(1.0, float(b.abs().max()) if b.numel() else 1.0))
    else:
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6 * max(1.0, float(b.abs().max()) if b.numel() else 1.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cce_default_normalize_is_false(backend):
    x, t = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 4, (9,))
    torch.testing.assert_close(rf.robust_cross_entropy(x, t, CCE(), backend=backend), F.cross_entropy(x, t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_drop_in_for_cross_entropy_loss(backend):
    w = torch.rand(6, dtype=torch.float64) + 0.5
    ours = rf.RobustCrossEntropyLoss(CCE(), weight=w, ignore_index=2, backend=backend)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=2)
    x, t = torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 6, (10,))
    v, g = _grad(lambda z: ours(z, t), x)
    ev, eg = _grad(lambda z: theirs(z, t), x)
    _close(v, ev, torch.float64)
    _close(g, eg, torch.float64)


# ---------------------------------------------------------------------------
# shapes and strides


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scheme", [DM(), GCE(), DMBeta(alpha=2.0, eta=3.0)], ids=repr)
def test_spatial_and_unbatched_shapes_equal_rows(scheme, backend):
    """(N, C, d1, d2) and (C,) are the same rows as (N * d1 * d2, C) and (1, C)."""
    x = torch.randn(3, 5, 4, 2, dtype=torch.float64)
    t = torch.randint(0, 5, (3, 4, 2))
    t[0, 1, 1] = -100
    sw = torch.randn(3, 4, 2, dtype=torch.float64)
    rows = x.movedim(1, -1).reshape(-1, 5)
    for reduction in REDUCTIONS:
        kw = dict(reduction=reduction, backend=backend)
        v, g = _grad(lambda z: rf.robust_cross_entropy(z, t, scheme, sample_weight=sw, **kw), x)
        flat_t, flat_sw = t.reshape(-1), sw.reshape(-1)
        rv, rg = _grad(lambda z: rf.robust_cross_entropy(z, flat_t, scheme, sample_weight=flat_sw, **kw), rows)
        assert v.shape == (t.shape if reduction == "none" else ())
        torch.testing.assert_close(v, rv.reshape(v.shape), rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(g, rg.reshape(3, 4, 2, 5).movedim(-1, 1), rtol=1e-13, atol=1e-15)
    one = torch.randn(7, dtype=torch.float64)
    for reduction in REDUCTIONS:
        kw = dict(reduction=reduction, backend=backend)
        v, g = _grad(lambda z: rf.robust_cross_entropy(z, torch.tensor(3), scheme, **kw), one)
        rv, rg = _grad(lambda z: rf.robust_cross_entropy(z, torch.tensor([3]), scheme, **kw), one[None])
        assert v.shape == () and g.shape == (7,)
        torch.testing.assert_close(v, rv.reshape(()), rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(g, rg[0], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_non_contiguous_inputs(dtype, backend):
    """Any strides: transposed, sliced, expanded (stride 0), channels-last, strided targets and weights.

    Each must give exactly what its contiguous copy gives on the same backend.
    """
    n, c = 12, 9
    base = torch.randn(2 * n, 2 * c).to(dtype)
    views = {
        "transposed": torch.randn(c, n).to(dtype).t(),
        "column slice": base[:n, ::2],
        "row slice": base[::2, :c],
        "expanded": torch.randn(1, c).to(dtype).expand(n, c),
    }
    t = torch.randint(0, c, (2 * n,))[::2]
    t[1] = -100
    sw = torch.randn(3 * n)[::3]
    w = (torch.rand(2 * c) + 0.5)[::2]
    for name, x in views.items():
        assert not x.is_contiguous()
        for scheme in (DM(), CCE(), DMNormal()):
            for reduction in ("none", "mean"):
                kw = dict(reduction=reduction, backend=backend)
                v, g = _grad(lambda z: rf.robust_cross_entropy(z, t, scheme, weight=w, sample_weight=sw, **kw), x)
                cv, cg = _grad(
                    lambda z: rf.robust_cross_entropy(
                        z, t.contiguous(), scheme, weight=w.contiguous(), sample_weight=sw.contiguous(), **kw
                    ),
                    x.contiguous(),
                )
                assert torch.equal(v, cv), name
                assert torch.equal(g, cg), name
    x4 = torch.randn(2, c, 3, 4).to(dtype).to(memory_format=torch.channels_last)
    t4 = torch.randint(0, c, (2, 3, 4))
    v, g = _grad(lambda z: rf.robust_cross_entropy(z, t4, DM(), backend=backend), x4)
    cv, cg = _grad(lambda z: rf.robust_cross_entropy(z, t4, DM(), backend=backend), x4.contiguous())
    assert torch.equal(v, cv) and torch.equal(g, cg)


# ---------------------------------------------------------------------------
# modules and helpers


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_match_functional(backend):
    x = torch.randn(10, 5, dtype=torch.float64)
    t = torch.randint(0, 5, (10,))
    t[0] = 4
    sw = torch.randn(10, dtype=torch.float64)
    w = torch.rand(5, dtype=torch.float64) + 0.5
    cases = [
        (rf.DMLoss(lam=0.5, beta=3.0, backend=backend), DM(lam=0.5, beta=3.0), {}),
        (rf.IMAELoss(T=5.0, backend=backend, reduction="sum"), IMAE(T=5.0), dict(reduction="sum")),
        (
            rf.RobustCrossEntropyLoss(MSE(), weight=w, ignore_index=4, normalize=True, backend=backend),
            MSE(),
            dict(weight=w, ignore_index=4, normalize=True),
        ),
    ]
    for module, scheme, kw in cases:
        for sample_weight in (None, sw):
            got = module(x, t, sample_weight) if sample_weight is not None else module(x, t)
            expected = rf.robust_cross_entropy(x, t, scheme, sample_weight=sample_weight, backend=backend, **kw)
            assert torch.equal(got, expected)
        assert repr(scheme) in repr(module)
    assert rf.DMLoss().scheme == DM() and rf.IMAELoss().scheme == IMAE()
    assert isinstance(rf.DMLoss(), torch.nn.Module)


def test_module_weight_is_a_buffer():
    w = torch.rand(4) + 0.5
    m = rf.DMLoss(weight=w)
    assert "weight" in dict(m.named_buffers()) and list(m.parameters()) == []
    sd = m.state_dict()
    torch.testing.assert_close(sd["weight"], w)
    m64 = m.to(torch.float64)
    assert m64.weight.dtype == torch.float64
    x = torch.randn(6, 4, dtype=torch.float64)
    t = torch.randint(0, 4, (6,))
    torch.testing.assert_close(m64(x, t), rf.dm_loss(x, t, weight=w.double()))
    # state_dict round trip into a fresh module.
    other = rf.DMLoss(weight=torch.ones(4))
    other.load_state_dict(sd)
    torch.testing.assert_close(other.weight, w)
    assert torch.equal(other(x.float(), t), rf.dm_loss(x.float(), t, weight=w))
    assert "weight" not in rf.DMLoss().state_dict()
    assert m.to("meta").weight.device.type == "meta"  # follows devices too


def test_dm_and_imae_shortcuts():
    x = torch.randn(8, 3)
    t = torch.randint(0, 3, (8,))
    sw = torch.rand(8)
    kw = dict(reduction="sum", sample_weight=sw)
    assert torch.equal(rf.dm_loss(x, t, lam=0.0, beta=2.0, **kw), rf.robust_cross_entropy(x, t, DM(0.0, 2.0), **kw))
    assert torch.equal(rf.dm_loss(x, t), rf.robust_cross_entropy(x, t, DM()))
    assert torch.equal(rf.imae_loss(x, t, T=3.0, **kw), rf.robust_cross_entropy(x, t, IMAE(3.0), **kw))
    assert torch.equal(rf.imae_loss(x, t), rf.robust_cross_entropy(x, t, IMAE()))


def test_example_weights():
    n, c = 20, 6
    x = torch.randn(n, c, dtype=torch.float64) * 2
    t = torch.randint(0, c, (n,))
    t[3] = -100
    valid = t != -100
    p_true = torch.softmax(x, 1).gather(1, t.clamp(min=0)[:, None]).squeeze(1)
    scheme = DM(lam=0.5, beta=4.0)
    ew = rf.example_weights(x, t, scheme)
    assert isinstance(ew, rf.ExampleWeights) and ew.p.shape == (n,) and ew.w.shape == (n,)
    torch.testing.assert_close(ew.p[valid], p_true[valid])
    assert torch.isnan(ew.p[3]) and float(ew.w[3]) == 0.0
    assert float(ew.w.sum()) == pytest.approx(1.0)  # normalised by default for DM
    raw = rf.example_weights(x, t, scheme, normalize=False)
    w_true = torch.exp(4.0 * p_true**0.5 * (1 - p_true))
    torch.testing.assert_close(raw.w[valid], w_true[valid])
    torch.testing.assert_close(ew.w[valid], w_true[valid] / w_true[valid].sum())
    # The normalised weights are the L1 norms of the rows of the normalised-mean gradient.
    _, g = _grad(lambda z: rf.robust_cross_entropy(z, t, scheme), x)
    torch.testing.assert_close(g.abs().sum(1), ew.w)
    # Loss-defined schemes are raw by default: CCE's w = 2q.
    torch.testing.assert_close(rf.example_weights(x, t, CCE()).w[valid], 2 * (1 - p_true[valid]))
    # Spatial input: shaped like the target; float32 results for half input.
    x4 = torch.randn(2, 3, 4, 5).half()
    t4 = torch.randint(0, 3, (2, 4, 5))
    e4 = rf.example_weights(x4, t4, DMExponential())
    assert e4.p.shape == (2, 4, 5) and e4.w.dtype == torch.float32
    assert float(e4.w.sum()) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(IndexError, match="7"):
        rf.example_weights(x, torch.full((n,), 7), scheme)


def test_available_backends():
    got = rf.available_backends()
    assert isinstance(got, list) and "torch" in got
    assert set(got) <= {"torch", "cpu", "cuda", "triton"}
    assert ("cpu" in got) == (backends.unavailable_reason("cpu") is None)
    if not torch.cuda.is_available():
        assert "cuda" not in got
    # Each one works on the device the registry gives it (tests/_backends.py).
    x, t = torch.randn(5, 3), torch.randint(0, 3, (5,))
    for name in got:
        device = device_of(name)
        assert torch.isfinite(rf.robust_cross_entropy(x.to(device), t.to(device), DM(), backend=name)), name


def test_public_names():
    for name in rf.__all__:
        assert hasattr(rf, name), name
    # The kernel ids of SPEC §4 keep their numbers (they are op arguments).
    foundation = {"CCE": 0, "MAE": 1, "MSE": 2, "GCE": 3, "DM": 4, "DM_NORMAL": 5, "DM_BETA": 6}
    assert {k: int(Kernel[k]) for k in foundation} == foundation
    # The old table still answers, with a deprecation warning.
    with pytest.warns(DeprecationWarning, match="KERNEL_IDS"):
        old = rf.schemes.KERNEL_IDS
    assert old == {k.name: int(k) for k in Kernel}
    for s in (CCE(), MAE(), MSE(), GCE(), DM(), IMAE(), DMNormal(), DMExponential(), DMBeta()):
        assert isinstance(s, rf.Scheme)


# ---------------------------------------------------------------------------
# every CPU kernel variant

_VARIANT_CHECK = textwrap.dedent(
    """
    import json, torch
    import robustloss_fast as rf
    from robustloss_fast import _C
    from robustloss_fast.schemes import CCE, DM, GCE, DMBeta, DMNormal

    worst = 0.0
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        # C around the vector widths (8 and 16 floats): tails, the target in a tail.
        for n, c in ((7, 1), (9, 7), (9, 8), (5, 17), (4, 33), (3, 1000)):
            x = (torch.randn(n, c, dtype=torch.float64) * 3).to(dtype)
            t = torch.randint(0, c, (n,))
            t[0] = c - 1
            t[-1] = -100
            sw = torch.randn(n)
            for scheme in (CCE(), GCE(), DM(0.5, 12.0), DMNormal(psi=0.3, beta=4.0), DMBeta(alpha=2.0, eta=3.0)):
                for red in ("none", "mean"):
                    up = torch.randn(n) if red == "none" else torch.tensor(1.0)
                    res = []
                    # The last run, with |sample_weight|, only gives the value's error scale.
                    for backend, xx, s in (("cpu", x, sw), ("torch", x.double(), sw), ("torch", x.double(), sw.abs())):
                        xx = xx.detach().clone().requires_grad_()
                        s = s.double() if xx.dtype == torch.float64 else s
                        v = rf.robust_cross_entropy(xx, t, scheme, sample_weight=s, reduction=red, backend=backend)
                        (g,) = torch.autograd.grad(v, xx, up.to(v.dtype))
                        res.append((v.detach().double(), g))
                    # The in-place backward: the same kernel writing over its input, so the same bytes.
                    xi = x.detach().clone().requires_grad_()
                    s = sw.double() if x.dtype == torch.float64 else sw
                    vi = rf.robust_cross_entropy(xi * 1, t, scheme, sample_weight=s, reduction=red, backend="cpu",
                                                 inplace_backward=True)
                    (gi,) = torch.autograd.grad(vi, xi, up.to(vi.dtype))
                    if not torch.equal(gi.view(torch.uint8), res[0][1].view(torch.uint8)):
                        worst = float("inf")
                        print("in place differs:", dtype, n, c, scheme, red)
                    (v, g), (rv, rg), (av, _) = ((a, b.double()) for a, b in res)
                    # As in the backend suite (tests/_cases.py): accumulator error, then 2 ulps of a half output.
                    acc = 1e-10 if dtype == torch.float64 else 1e-5
                    fi = torch.finfo(dtype)
                    half = dtype in (torch.float16, torch.bfloat16)
                    rounding = 2 * fi.eps * rg.abs() + 2 * fi.tiny * fi.eps if half else fi.tiny
                    tol_g = acc * (rg.abs() + rg.abs().max()) + rounding
                    vscale = float(av.abs().max())
                    err_g = float(((g - rg).abs() / tol_g).max())
                    err_v = float(((v - rv).abs() / (acc * (rv.abs() + vscale))).max())
                    worst = max(worst, err_g, err_v)
    print(json.dumps({"capability": _C.cpu_capability(), "worst": worst}))
    """
)


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


@needs_cpu
@pytest.mark.parametrize("variant", ["default", "avx2"])
def test_cpu_kernel_variants(variant):
    """ROBUSTLOSS_CPU_CAPABILITY picks each compiled variant; each matches the float64 reference."""
    if variant == "avx2" and not {"avx2", "fma", "f16c"} <= _cpu_flags():
        pytest.skip("this CPU has no AVX2/FMA/F16C (or /proc/cpuinfo is unreadable)")
    env = dict(os.environ, ROBUSTLOSS_CPU_CAPABILITY=variant, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", _VARIANT_CHECK], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if variant == "avx2" and result["capability"] == "DEFAULT":
        pytest.skip("the extension was built without the x86 variants")
    assert result["capability"] == variant.upper()
    # worst = the largest error in units of the allowed tolerance.
    assert result["worst"] <= 1.0, (result, out.stdout[-2000:])
