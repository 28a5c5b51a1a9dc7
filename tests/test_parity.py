"""Parity of every backend with the float64 reference (SPEC §2-§6).

End to end: ``robust_cross_entropy`` on each available CPU-side backend
("torch", the reference in the input's dtype, and "cpu", the fused C++
kernel) against the reference evaluated in float64 on the same -- already
rounded -- inputs, over every scheme x reduction x normalize x dtype, on the
shape families (C = 1, 2, 3, odd 37, 1000, a vocabulary-sized C, unbatched,
spatial, non-contiguous) with and without class weights, signed sample
weights and ignored rows.

Op by op: ``torch.ops.robustloss.robust_ce_forward / _backward / _rows``
against ``reference.forward / backward`` and ``_finalize.finalize``, so a
mismatch points at one op rather than at the whole pipeline.

Tolerances: float64 ~1e-10 relative; float32 accumulation ~1e-5; float16 and
bfloat16 gradients are compared against the float64 result of the same
rounded logits with 2 ulps of the output dtype on top.
"""

from __future__ import annotations

import math

import pytest
import torch

import robustloss_fast as rf
from robustloss_fast import backends
from robustloss_fast import _finalize, reference
from robustloss_fast._common import Kernel, KernelSpec, Reduction
from robustloss_fast.schemes import CCE, DM, GCE, IMAE, MAE, MSE, DMBeta, DMExponential, DMNormal

from _cases import SCHEMES  # noqa: E402
# The loss-defined peers of issue 7 (functions of p alone), on the same fused pass.
PEER_NAMES = ("Poly1", "RCE", "SCE", "Focal", "TaylorCE")
PEERS = [getattr(rf.schemes, name)() for name in PEER_NAMES if hasattr(rf.schemes, name)]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["none", "mean", "sum"]
NORMALIZE = [None, True, False]
RED_ID = {"none": 0, "mean": 1, "sum": 2}
IGNORE = -100

# Asked per backend (not via available_backends()) so an optional backend
# that fails to load cannot take these tests down with it.
BACKENDS = [b for b in ("torch", "cpu") if backends.unavailable_reason(b) is None]
needs_cpu = pytest.mark.skipif("cpu" not in BACKENDS, reason="the compiled extension is not importable")


def _id(x):
    return repr(x) if not isinstance(x, torch.dtype) else str(x).replace("torch.", "")


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------
# inputs


def make_logits(shape, dtype, target=None, class_dim=1):
    """Logits spread over p in (0, 1): N(0, 3^2), with every other row's target pushed up by 6."""
    z = torch.randn(shape, dtype=torch.float64) * 3.0
    if target is not None and z.dim() >= 2 and z.shape[class_dim] > 1:
        t = target.clamp(min=0)
        easy = torch.rand(t.shape) < 0.5
        boost = torch.zeros(z.movedim(class_dim, -1).shape, dtype=torch.float64)
        boost.scatter_(-1, t.unsqueeze(-1), 6.0)
        z = z + (boost * easy.unsqueeze(-1)).movedim(-1, class_dim)
    return z.to(dtype)


def make_case(shape, dtype, config, layout="contiguous"):
    """One random problem: (logits, target, weight, sample_weight)."""
    if len(shape) == 1:
        c, tshape = shape[0], ()
    else:
        c, tshape = shape[1], (shape[0],) + tuple(shape[2:])
    target = torch.randint(0, c, tshape)
    if config in ("full", "ignore") and target.dim() > 0:
        target = torch.where(torch.rand(tshape) < 0.25, torch.full_like(target, IGNORE), target)
    weight = sample_weight = None
    if config == "full":
        weight = torch.rand(c, dtype=acc_of(dtype)) + 0.5
        # Signed sample weights: SPEC allows negative ones (gradient ascent).
        sample_weight = torch.randn(tshape, dtype=acc_of(dtype))
    if layout == "transposed":  # classes not contiguous: stride(1) != 1
        logits = make_logits((shape[1], shape[0]), dtype).t()
    elif layout == "row_strided":  # every other row of a bigger buffer: stride(0) > C
        logits = make_logits((2 * shape[0], shape[1]), dtype)[::2]
    else:
        logits = make_logits(shape, dtype, target)
    return logits, target, weight, sample_weight


# (shape, layout, configs): the shape families of the issue.
SHAPES = [
    ((40, 1), "contiguous", ("plain", "full")),
    ((33, 2), "contiguous", ("plain", "full")),
    ((17, 3), "contiguous", ("plain", "full")),
    ((29, 37), "contiguous", ("plain", "full", "ignore")),
    ((6, 1000), "contiguous", ("full",)),
    ((37,), "contiguous", ("plain", "full")),
    ((3, 5, 4, 3), "contiguous", ("full",)),
    ((21, 37), "transposed", ("full",)),
    ((11, 19), "row_strided", ("full",)),
]


# ---------------------------------------------------------------------------
# comparison


def _ulp_terms(dtype):
    """(relative, absolute) slack for values rounded to ``dtype``.

    Half types: 2 ulps, and 2 subnormal steps near 0. Wider types compute at
    their own precision, so only the subnormal range (no relative accuracy
    there) gets an absolute floor.
    """
    fi = torch.finfo(dtype)
    if dtype in (torch.float16, torch.bfloat16):
        return 2 * fi.eps, 2 * fi.tiny * fi.eps
    return 0.0, fi.tiny


def assert_near(actual, expected, acc_rtol, out_dtype, scale=None, what=""):
    """|actual - expected| <= acc_rtol * (|expected| + scale) + 2 ulps of out_dtype.

    ``scale`` (a float, default max |expected|) bounds the error of sums whose
    terms cancel (signed sample weights) or elements far below the largest.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.double()
    e = expected.double()
    if e.numel() == 0:
        return
    if scale is None:
        scale = float(e.abs().max())
    rel, tiny = _ulp_terms(out_dtype)
    tol = acc_rtol * (e.abs() + scale) + rel * e.abs() + tiny
    both_nan = torch.isnan(a) & torch.isnan(e)
    err = torch.where(both_nan, torch.zeros_like(a), (a - e).abs())
    bad = ~(err <= tol)
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        at = tuple(idx)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {e.numel()} elements differ; first at {at}: "
            f"got {float(a[at])!r}, expected {float(e[at])!r}, tolerance {float(tol[at]):.3g}"
        )


def acc_rtol(dtype, c=1):
    if dtype == torch.float64:
        return 1e-10
    # float32 sums over C terms: a little more room for vocabulary-sized rows.
    return 1e-5 if c <= 1000 else 3e-5


def run(backend, logits, target, scheme, weight, sample_weight, reduction, normalize, upstream):
    x = logits.detach().clone().requires_grad_()
    value = rf.robust_cross_entropy(
        x,
        target,
        scheme,
        weight=weight,
        sample_weight=sample_weight,
        ignore_index=IGNORE,
        reduction=reduction,
        normalize=normalize,
        backend=backend,
    )
    (grad,) = torch.autograd.grad(value, x, upstream.to(value.dtype))
    return value.detach(), grad


def _f64(t):
    return None if t is None else t.double()


def check_against_reference(logits, target, scheme, weight, sw, reduction, normalize, backends=BACKENDS, what=""):
    dtype = logits.dtype
    c = logits.shape[0] if logits.dim() == 1 else logits.shape[1]
    out_shape = tuple(target.shape) if reduction == "none" else ()
    upstream = torch.randn(out_shape, dtype=torch.float64)
    ref_v, ref_g = run("torch", logits.double(), target, scheme, _f64(weight), _f64(sw), reduction, normalize, upstream)
    # The value's error scale: the same sum with |sample_weight| has no cancellation.
    vscale = None
    if sw is not None and reduction != "none":
        args = (target, scheme, _f64(weight), _f64(sw).abs(), reduction, normalize, upstream)
        vscale = float(run("torch", logits.double(), *args)[0].abs())
    ok = torch.isfinite(ref_v).all() and torch.isfinite(ref_g).all()
    assert ok, f"{what}: the float64 reference is not finite for finite inputs"
    rtol = acc_rtol(dtype, c)
    for backend in backends:
        v, g = run(backend, logits, target, scheme, weight, sw, reduction, normalize, upstream)
        tag = f"{what} backend={backend}"
        assert v.dtype == acc_of(dtype), f"{tag}: loss dtype {v.dtype}"  # SPEC §6
        assert g.dtype == dtype, f"{tag}: gradient dtype {g.dtype}"
        assert g.shape == logits.shape
        assert_near(v, ref_v, rtol, v.dtype, vscale, f"{tag} value")
        assert_near(g, ref_g, rtol, dtype, None, f"{tag} gradient")


# ---------------------------------------------------------------------------
# end to end


# normalize only acts on "mean"; test_normalize_ignored_without_mean covers the rest.
REDUCTION_NORMALIZE = [("mean", n) for n in NORMALIZE] + [("none", None), ("sum", None)]


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("reduction,normalize", REDUCTION_NORMALIZE, ids=lambda x: str(x))
@pytest.mark.parametrize("scheme", SCHEMES, ids=_id)
def test_end_to_end(scheme, reduction, normalize, dtype):
    for shape, layout, configs in SHAPES:
        for config in configs:
            logits, target, weight, sw = make_case(shape, dtype, config, layout)
            what = f"shape={shape} {layout} {config}"
            check_against_reference(logits, target, scheme, weight, sw, reduction, normalize, what=what)


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("scheme", PEERS, ids=_id)
def test_peer_losses(scheme, dtype):
    """The peer losses through the same matrix, reductions and shapes in one test each."""
    for k, (shape, layout, configs) in enumerate(SHAPES):
        for config in configs:
            reduction, normalize = REDUCTION_NORMALIZE[k % len(REDUCTION_NORMALIZE)]
            logits, target, weight, sw = make_case(shape, dtype, config, layout)
            what = f"shape={shape} {layout} {config} {reduction} normalize={normalize}"
            check_against_reference(logits, target, scheme, weight, sw, reduction, normalize, what=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_large_vocabulary(dtype):
    """C = 50257 (GPT-2's vocabulary), a few rows, every scheme (reductions in rotation)."""
    for k, scheme in enumerate(SCHEMES):
        reduction, normalize = REDUCTION_NORMALIZE[k % len(REDUCTION_NORMALIZE)]
        logits, target, weight, sw = make_case((3, 50257), dtype, "full")
        target[0] = 50256  # the last class: the vector tail holds the target
        what = f"{scheme} {reduction} normalize={normalize}"
        check_against_reference(logits, target, scheme, weight, sw, reduction, normalize, what=what)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_normalize_ignored_without_mean(reduction):
    """SPEC §5: derivative normalisation belongs to "mean"; "none"/"sum" give the same bits either way."""
    for scheme in SCHEMES:
        logits, target, weight, sw = make_case((19, 6), torch.float32, "full")
        for backend in BACKENDS:
            upstream = torch.randn(target.shape) if reduction == "none" else torch.tensor(0.7)
            results = [run(backend, logits, target, scheme, weight, sw, reduction, n, upstream) for n in NORMALIZE]
            for v, g in results[1:]:
                assert torch.equal(v, results[0][0]) and torch.equal(g, results[0][1]), f"{scheme} {backend}"


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_int32_target_and_default_flags(dtype):
    """int32 targets are accepted; default reduction/normalize match the explicit ones."""
    for scheme in SCHEMES:
        logits, target, weight, sw = make_case((13, 7), dtype, "full")
        for backend in BACKENDS:
            a = rf.robust_cross_entropy(logits, target.int(), scheme, weight=weight, sample_weight=sw, backend=backend)
            b = rf.robust_cross_entropy(
                logits,
                target,
                scheme,
                weight=weight,
                sample_weight=sw,
                reduction="mean",
                normalize=scheme.default_normalize,
                backend=backend,
            )
            assert torch.equal(a, b)


def test_auto_backend_is_cpu_kernel_on_cpu():
    """"auto" picks the fused kernel for CPU tensors when it is built (bitwise the same result)."""
    logits, target, weight, sw = make_case((20, 9), torch.float32, "full")
    auto = rf.robust_cross_entropy(logits, target, DM(), weight=weight, sample_weight=sw)
    expected_backend = "cpu" if "cpu" in BACKENDS else "torch"
    explicit = rf.robust_cross_entropy(logits, target, DM(), weight=weight, sample_weight=sw, backend=expected_backend)
    assert torch.equal(auto, explicit)


# ---------------------------------------------------------------------------
# op by op


def _op_inputs(dtype, n=23, c=11, config="full"):
    logits, target, weight, sw = make_case((n, c), dtype, config)
    return logits, target, weight, sw


def spec_of(kid, a, b, reduction=0, normalize=False):
    return KernelSpec(Kernel(kid), a, b, 1.0, Reduction(reduction), normalize, IGNORE)


def reference_rows(logits, target, kernel_id, a, b, normalised):
    """(lse_nt, log w, x) per row from the reference's pieces (SPEC §2, §4, §5)."""
    acc = acc_of(logits.dtype)
    valid = target != IGNORE
    y = torch.where(valid, target, torch.zeros_like(target))
    _, lse_nt, logp, logq, p, q = reference.row_probs(logits.to(acc), y)
    lw = reference.log_weight(kernel_id, a, b, logp, logq, p, q)
    if normalised:
        x = -logp
    else:
        # Unweighted "none" is the row's own value: L(p), or w (-log p).
        x, _ = reference.forward(logits, target, spec_of(kernel_id, a, b))
    return torch.stack([lse_nt, lw, x], dim=1), valid


def _stat_tol(dtype):
    return 1e-12 if dtype == torch.float64 else 2e-5


# Op-level cases: (kernel id, a, b, smoothing) for every SPEC scheme and the
# two-term ones (label smoothing = 10, with the class weights as u; NCE/APL = 11).
OP_CASES = [(s.kernel_id, *s.kernel_params, False) for s in SCHEMES]
_LS, _NCE, _NFL = Kernel.CCE_LS, Kernel.NCE, Kernel.NFL
TWO_TERM_CASES = [(_LS, 0.1, 0.0, True), (_LS, 0.6, 0.0, True), (_NCE, 1.0, 0.0, False), (_NCE, 10.0, 0.4, False)]
TWO_TERM_CASES += [(_NFL, 0.5, 0.0, False), (_NFL, 2.0, 0.4, False), (_NFL, 0.0, 0.0, False)]


def _case_id(case):
    return f"{Kernel(case[0]).name}-{case[1]:g}-{case[2]:g}"


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", OP_CASES + TWO_TERM_CASES, ids=_case_id)
def test_op_rows(case, dtype):
    kid, a, b, smooth = case
    two_term = Kernel(kid).two_term
    for normalised in (False,) if two_term else (False, True):
        logits, target, weight, _ = _op_inputs(dtype)
        u = weight if smooth else None
        rows = torch.ops.robustloss.robust_ce_rows(logits, target, kid, a, b, u, IGNORE, normalised)
        expected = reference.rows(logits, target, spec_of(kid, a, b, 1, normalised), u)
        valid = target != IGNORE
        assert rows.dtype == acc_of(dtype) and rows.shape == (logits.shape[0], 6)
        tol = _stat_tol(dtype)
        if not two_term:
            # The first three columns also from the reference's pieces (SPEC §2, §4, §5).
            pieces, _ = reference_rows(logits, target, kid, a, b, normalised)
            expected_cols = torch.cat([pieces, expected[:, 3:]], dim=1)
        else:
            expected_cols = expected
        # Ignored rows carry nothing the cross-row step reads: compare the valid ones.
        for col, name in enumerate(("lse_nt", "log w", "x", "alpha", "beta", "gamma")):
            what = f"rows {name} normalised={normalised}"
            assert_near(rows[valid, col], expected_cols[valid, col], tol, rows.dtype, what=what)
        assert bool((rows[~valid, 2:] == 0).all()), "ignored rows must carry zeros"


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("case", OP_CASES + TWO_TERM_CASES, ids=_case_id)
def test_op_forward_and_finalize(case, dtype):
    """robust_ce_forward == reference.forward == finalize(robust_ce_rows), stats included."""
    kid, a, b, smooth = case
    two_term = Kernel(kid).two_term
    for reduction in REDUCTIONS:
        for normalize in (False,) if two_term else (False, True):
            for config in ("plain", "full"):
                logits, target, weight, sw = _op_inputs(dtype, config=config)
                red = RED_ID[reduction]
                args = (weight, sw, IGNORE, red, normalize)
                value, stats = torch.ops.robustloss.robust_ce_forward(logits, target, kid, a, b, *args)
                spec = spec_of(kid, a, b, red, normalize)
                ref_value, ref_stats = reference.forward(logits, target, spec, weight, sw)
                u = weight if smooth else None
                rows = torch.ops.robustloss.robust_ce_rows(logits, target, kid, a, b, u, IGNORE, spec.normalised)
                fin_value, fin_stats = _finalize.finalize(rows, target, spec, weight, sw)
                valid = target != IGNORE
                tag = f"{reduction} normalize={normalize} {config}"
                assert value.dtype == acc_of(dtype) and stats.dtype == acc_of(dtype)
                assert value.shape == ((logits.shape[0],) if red == 0 else ())
                assert stats.shape == (logits.shape[0], 4)
                tol = _stat_tol(dtype)
                # Sums with signed sample weights cancel: the same sum with |sw| is the error scale.
                abs_sw = None if sw is None else sw.abs()
                vscale = float(reference.forward(logits, target, spec, weight, abs_sw)[0].abs().max())
                for got, name in ((value, "op"), (fin_value, "finalize")):
                    assert_near(got, ref_value, tol, got.dtype, vscale, f"{tag} value ({name})")
                for got, name in ((stats, "op"), (fin_stats, "finalize")):
                    # lse_nt of an ignored row is not specified; the coefficients must be 0 there.
                    assert_near(got[valid, 0], ref_stats[valid, 0], tol, got.dtype, what=f"{tag} lse_nt ({name})")
                    for col, cname in ((1, "alpha"), (2, "beta"), (3, "gamma")):
                        assert_near(got[:, col], ref_stats[:, col], tol, got.dtype, what=f"{tag} {cname} ({name})")
                    assert bool((got[~valid, 1:] == 0).all()), f"{tag}: nonzero coefficient on an ignored row ({name})"


@needs_cpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar_grad", "row_grad"])
@pytest.mark.parametrize("kind", ["dm", "smoothing", "nce", "nfl"])
def test_op_backward(dtype, per_row, kind):
    """robust_ce_backward == reference.backward for the same stats, incl. masked classes and C = 1."""
    kid, a, b = {
        "dm": (Kernel.DM, 1.0, 8.0), "smoothing": (_LS, 0.3, 0.0), "nce": (_NCE, 1.0, 2.0), "nfl": (_NFL, 0.5, 2.0)
    }[kind]  # fmt: skip
    for n, c in ((23, 11), (9, 1), (7, 37), (5, 3)):
        logits, target, weight, sw = _op_inputs(dtype, n, c)
        if c > 2:
            logits[0, (target[0].clamp(min=0) + 1) % c] = -math.inf  # a masked class
            logits[1] = -math.inf  # every non-target masked: G = 0 (one-term)
            logits[1, target[1].clamp(min=0)] = 0.5
        red = 0 if per_row else 1
        spec = spec_of(kid, a, b, red, kind == "dm")
        _, stats = reference.forward(logits, target, spec, weight, sw)
        u = weight if kind == "smoothing" else None
        grad = torch.randn((n,) if per_row else (), dtype=acc_of(dtype))
        got = torch.ops.robustloss.robust_ce_backward(grad, logits, target, stats, u, IGNORE, kid, a)
        expected = reference.backward(grad, logits, target, stats, spec, u)
        assert got.dtype == dtype and got.shape == logits.shape
        ignored = target == IGNORE
        assert bool((got[ignored] == 0).all())
        # Both compute in the accumulator type and round once to the logits' dtype.
        rtol = 1e-12 if dtype == torch.float64 else 2e-6
        assert_near(got, expected.to(got.dtype), rtol, dtype, what=f"{kind} backward n={n} c={c}")
        if c > 2 and kind == "dm":
            assert bool((got[1] == 0).all()), "a row with no finite non-target logit must get G = 0"
            masked = (target[0].clamp(min=0) + 1) % c
            assert float(got[0, masked]) == 0.0
        if c > 2 and kind == "smoothing" and not ignored[0]:
            # A masked class still gets the smoothing term -g eps/C u_j (as in F.cross_entropy).
            masked = (target[0].clamp(min=0) + 1) % c
            g0 = float(grad[0] if per_row else grad)
            assert float(got[0, masked]) != 0.0 or g0 == 0.0 or float(stats[0, 2]) == 0.0


# ---------------------------------------------------------------------------
# the scheme table, from its closed forms


def closed_form(scheme, p):
    """(value, w) of SPEC §4 written straight from the tables, as functions of p."""
    q = 1 - p
    name = type(scheme).__name__
    if name == "CCE":
        return -torch.log(p), 2 * q
    if name == "MAE":
        return q, 2 * p * q
    if name == "MSE":
        return q**2, 4 * p * q**2
    if name == "GCE":
        k = scheme.q
        return (1 - p**k) / k, 2 * p**k * q
    if name == "DM":
        w = torch.exp(scheme.beta * p**scheme.lam * q)
    elif name == "IMAE":
        w = torch.exp(scheme.T * p * q)
    elif name == "DMNormal":
        w = torch.exp(-scheme.beta * p * (p - 2 * scheme.psi))
    elif name == "DMExponential":
        w = torch.exp(scheme.beta * q)
    elif name == "DMBeta":
        w = p ** (scheme.alpha - 1) * q ** (scheme.eta - 1)
    else:
        raise AssertionError(name)
    return w * -torch.log(p), w


@pytest.mark.parametrize("scheme", SCHEMES, ids=_id)
def test_scheme_table(scheme):
    """Per row, value = the table's L(p) (or w (-log p)) and G = (w / 2q)(softmax - onehot): |G|_1 = w."""
    n, c = 64, 7
    logits = torch.randn(n, c, dtype=torch.float64) * 2
    target = torch.randint(0, c, (n,))
    soft = torch.softmax(logits, dim=1)
    p = soft.gather(1, target[:, None]).squeeze(1)
    value, w = closed_form(scheme, p)
    onehot = torch.nn.functional.one_hot(target, c).double()
    expected_grad = (w / (2 * (1 - p)))[:, None] * (soft - onehot)
    for backend in BACKENDS:
        v, g = run(backend, logits, target, scheme, None, None, "none", None, torch.ones(n, dtype=torch.float64))
        torch.testing.assert_close(v, value, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g, expected_grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g.abs().sum(1), w, rtol=1e-9, atol=1e-12)
