"""Every registered backend against the float64 reference, end to end (SPEC §1-§8, §11, §12).

Each test takes the ``backend`` fixture (conftest.py, tests/_backends.py): it
runs once per backend of ``robustloss_fast.backends.NAMES``, with its tensors
on that backend's device, and skips with the registry's reason where the
backend cannot run. ``robust_cross_entropy(..., backend=name)`` is compared,
value and gradient for random upstream gradients, with the reference in
float64 on the same rounded inputs (tests/_cases.py says how), and with the
losses' own definitions: F.cross_entropy, the closed forms of SPEC §4, and
NCE / NFL / APL written in autograd.

The loops run every case on every backend, except where a backend runs under
an emulator here (the Triton interpreter, ``OnDevice.emulated``): there
``thin`` takes an evenly spread share of each loop, rotated from one test of
a family to the next, so that the family still reaches every case.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import robustloss_fast as rf
from robustloss_fast import backends
from robustloss_fast._common import Kernel
from robustloss_fast.schemes import APL, CCE, DM, MAE, MSE, NCE, NFL, SCE, DMBeta, Focal, TaylorCE

from _backends import thin
from _cases import (
    DTYPES,
    FAMILIES,
    IGNORE,
    LOSSES,
    MODES,
    REDUCTIONS,
    SCHEMES,
    TWO_TERM,
    TWO_TERM_LOSSES,
    TWO_TERM_MODES,
    VOCAB_DTYPES,
    Loss,
    Problem,
    acc_of,
    assert_grad,
    assert_value,
    check_loss,
    dtype_id,
    make_problem,
    special_rows,
    run,
)


# ---------------------------------------------------------------------------
# every loss x mode x dtype x shape family


# Every shape family but the vocabulary (test_large_vocabulary), each of its configs.
PROBLEMS = [(f"{name} {config}", shape, layout, config) for name, shape, layout, configs in FAMILIES
            for config in configs if name != "vocab"]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("loss", LOSSES, ids=str)
def test_end_to_end(backend, loss, dtype):
    """Every loss x dtype: each mode on a batch with p -> 1, p -> 0 and masked-class rows (ignored rows, class
    and signed sample weights), and each shape family -- C = 1, 2, 3, odd, 1000, unbatched, spatial,
    transposed, strided and misaligned rows -- with the modes in rotation over the families and dtypes."""
    d, modes = DTYPES.index(dtype), loss.modes
    # The loss x dtype x mode matrix, in full on every backend.
    for reduction, normalize in modes:
        problem = make_problem((23, 11), dtype, backend.device, special=special_rows(loss))
        check_loss(backend, problem, loss, reduction, normalize, "special rows")
    offset = (LOSSES.index(loss) + d) * 5
    for k, (what, shape, layout, config) in thin(list(enumerate(PROBLEMS)), backend, 3, offset):
        reduction, normalize = modes[(k + d) % len(modes)]
        problem = make_problem(shape, dtype, backend.device, config=config, layout=layout)
        check_loss(backend, problem, loss, reduction, normalize, what)


VOCAB_LOSSES = [Loss(s) for s in SCHEMES] + [Loss(NCE()), Loss(APL()), Loss(CCE(), 0.1), Loss(NFL())]


@pytest.mark.parametrize("dtype", VOCAB_DTYPES, ids=dtype_id)
def test_large_vocabulary(backend, dtype):
    """C = 50257 (GPT-2's vocabulary), a few rows, every SPEC scheme and the two-term kinds (modes in
    rotation); the last class is a target, so a vector tail holds it."""
    cases = list(enumerate(VOCAB_LOSSES))
    for k, loss in thin(cases, backend, 4, VOCAB_DTYPES.index(dtype) * 5):
        reduction, normalize = loss.modes[k % len(loss.modes)]
        problem = make_problem((3, 50257), dtype, backend.device)
        problem.target[0] = 50256
        check_loss(backend, problem, loss, reduction, normalize, "vocab")


def test_nfl_sums_a_vocabulary_accurately(backend):
    """NFL's value F_y / sum_k F_k carries the error of the sum over C classes straight through: at
    C = 50257 in bfloat16 it must stay within 4e-6 of the float64 value (a lane's plain running sum
    once reached 2.5e-5). The value alone, per row, on fresh batches."""
    for _ in thin(range(4), backend, 1):
        z = (3 * torch.randn(3, 50257, dtype=torch.float64)).bfloat16()
        t = torch.randint(0, 50257, (3,))
        got = rf.robust_cross_entropy(z.to(backend.device), t.to(backend.device), NFL(), reduction="none",
                                      backend=backend.name)  # fmt: skip
        want = rf.robust_cross_entropy(z.double(), t, NFL(), reduction="none", backend="torch")
        rel = ((got.double().cpu() - want) / want).abs().max().item()
        assert rel <= 4e-6, rel


FLAG_LOSSES = [Loss(CCE()), Loss(DM()), Loss(CCE(), 0.1), Loss(NFL(gamma=2.0))]


@pytest.mark.parametrize("loss", FLAG_LOSSES, ids=str)
def test_every_flag_combination(backend, loss):
    """Class weights x sample weights x ignored rows (with an ignore_index that is also a class) x every mode."""
    n, c = 10, 5
    combos = [
        (w, s, ignored, mode)
        for w in (False, True)
        for s in (False, True)
        for ignored in (0, 3)
        for mode in loss.modes
    ]
    for use_w, use_sw, ignored, (reduction, normalize) in thin(combos, backend, 6, FLAG_LOSSES.index(loss)):
        ignore_index = IGNORE if ignored == 0 else 3
        problem = make_problem((n, c), torch.float32, backend.device, config="full")
        problem.target.copy_(torch.randint(0, c, (n,)).to(backend.device))
        problem.target[:ignored] = ignore_index
        problem.weight = problem.weight if use_w else None
        problem.sample_weight = problem.sample_weight if use_sw else None
        what = f"weight={use_w} sample_weight={use_sw} ignored={ignored}"
        check_loss(backend, problem, loss, reduction, normalize, what, ignore_index=ignore_index)


# ---------------------------------------------------------------------------
# the losses' own definitions


def _grad_of(fn, x, upstream):
    x = x.detach().clone().requires_grad_()
    v = fn(x)
    (g,) = torch.autograd.grad(v, x, upstream.to(v.dtype))
    return v.detach(), g


def _close_to_definition(a, b, dtype, what):
    """As tests/test_api.py had it: float64 a few ulps of the largest entry; float32 to rounding."""
    big = max(1.0, float(b.abs().max()) if b.numel() else 1.0)
    if dtype == torch.float64:
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15 * big, msg=what)
    else:
        torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-6 * big, msg=what)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
def test_cce_is_cross_entropy(backend, dtype, reduction):
    """SPEC §4.2: CCE with normalize=False is F.cross_entropy, value and gradient, for every weight,
    ignore_index and shape; F.cross_entropy runs in float64 on the same rounded logits."""
    dev = backend.device
    for shape, tshape in (((32, 7), (32,)), ((4, 5, 3, 2), (4, 3, 2)), ((11,), ())):
        c = shape[0] if len(shape) == 1 else shape[1]
        for use_weight in (False, True):
            for ignore_index in (-100, 1):
                x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype).to(dev)
                t = torch.randint(0, c, tshape)
                if t.dim() > 0:
                    t[torch.rand(tshape) < 0.3] = ignore_index
                t = t.to(dev)
                if reduction == "mean" and bool((t == ignore_index).all()):
                    continue  # PyTorch gives NaN for 0/0, SPEC §5.5 gives 0 (test_single_class_all_ignored_and_empty)
                w = (torch.rand(c, dtype=torch.float64) + 0.2).to(dtype).to(dev) if use_weight else None
                up = torch.randn(tshape if reduction == "none" else (), dtype=torch.float64).to(dev)
                kw = dict(weight=w, ignore_index=ignore_index, reduction=reduction)
                v, g = _grad_of(lambda z: rf.robust_cross_entropy(z, t, CCE(), normalize=False, backend=backend.name,
                                                                  **kw), x, up)  # fmt: skip
                kw64 = dict(kw, weight=None if w is None else w.double())
                ev, eg = _grad_of(lambda z: F.cross_entropy(z, t, **kw64), x.double(), up)
                what = f"{shape} weight={use_weight} ignore_index={ignore_index}"
                assert v.dtype == dtype and g.dtype == dtype and v.shape == ev.shape, what
                _close_to_definition(v.double(), ev, dtype, f"value {what}")
                _close_to_definition(g.double(), eg, dtype, f"gradient {what}")


SMOOTH_SHAPES = [((13, 7), (13,)), ((9,), ()), ((4, 5, 3, 2), (4, 3, 2)), ((6, 1), (6,)), ((3, 1000), (3,)),
                 ((2, 3000), (2,))]  # fmt: skip


@pytest.mark.parametrize("eps", [0.05, 0.3, 1.0])
def test_label_smoothing_is_cross_entropy(backend, eps):
    """SPEC §8.3: F.cross_entropy(label_smoothing=eps), class weights weighing every class of the smoothing sum."""
    dev = backend.device
    combos = [(s, w, r) for s in SMOOTH_SHAPES for w in (False, True) for r in REDUCTIONS]
    for (shape, tshape), with_weight, reduction in thin(combos, backend, 6, int(eps * 10)):
        c = shape[0] if len(shape) == 1 else shape[1]
        logits = (torch.randn(shape, dtype=torch.float64) * 3).to(dev)
        target = torch.randint(0, c, tshape)
        if target.dim() > 0:
            target.view(-1)[0] = IGNORE
        target = target.to(dev)
        weight = (torch.rand(c, dtype=torch.float64) + 0.2).to(dev) if with_weight else None
        up = torch.randn(tshape if reduction == "none" else (), dtype=torch.float64).to(dev)
        kw = dict(weight=weight, reduction=reduction, label_smoothing=eps)
        want, want_g = _grad_of(lambda z: F.cross_entropy(z, target, **kw), logits, up)
        v, g = _grad_of(lambda z: rf.robust_cross_entropy(z, target, CCE(), backend=backend.name, **kw), logits, up)
        what = f"{shape} weight={with_weight} {reduction}"
        torch.testing.assert_close(v, want, rtol=1e-10, atol=1e-12, msg=f"value {what}")
        torch.testing.assert_close(g, want_g, rtol=1e-10, atol=1e-12, msg=f"grad {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_label_smoothing_low_precision(backend, dtype):
    """Against F.cross_entropy in float64 on the same rounded logits (torch's own low-precision path is no oracle)."""
    dev = backend.device
    for n, c in thin(((33, 50), (4, 3000)), backend, 1, DTYPES.index(dtype)):
        for reduction in REDUCTIONS:
            problem = make_problem((n, c), dtype, dev, config="full")
            problem.sample_weight = None
            target = torch.randint(0, c, (n,))
            target[::5] = IGNORE  # every fifth row: never all of them (PyTorch's mean would be NaN)
            problem.target = target.to(dev)
            up = torch.randn(n if reduction == "none" else (), dtype=torch.float64).to(dev)
            x = problem.logits.double()
            kw = dict(weight=problem.weight.double(), reduction=reduction, label_smoothing=0.1)
            want, want_g = _grad_of(lambda z: F.cross_entropy(z, problem.target, **kw), x, up)
            v, g = run(backend.name, problem, Loss(CCE(), 0.1), reduction, None, up)
            assert v.dtype == acc_of(dtype) and g.dtype == dtype
            assert_value(v, want, dtype, c, what=f"C={c} {reduction} value")
            assert_grad(g, want_g, c, what=f"C={c} {reduction} gradient")


def test_label_smoothing_masked_class_like_torch(backend):
    """A -inf logit: PyTorch's smoothed value is +inf and its gradient finite (-eps/C there); so is ours."""
    dev = backend.device
    logits = torch.randn(4, 6, dtype=torch.float64)
    logits[0, 5] = -math.inf
    logits, target = logits.to(dev), torch.tensor([0, 1, 2, 3]).to(dev)
    ones = torch.ones(4, dtype=torch.float64).to(dev)
    want, want_g = _grad_of(lambda z: F.cross_entropy(z, target, reduction="none", label_smoothing=0.2), logits, ones)
    v, g = _grad_of(lambda z: rf.robust_cross_entropy(z, target, CCE(), reduction="none", label_smoothing=0.2,
                                                      backend=backend.name), logits, ones)  # fmt: skip
    assert math.isinf(float(v[0])) and float(v[0]) > 0
    torch.testing.assert_close(v[1:], want[1:], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, want_g, rtol=1e-10, atol=1e-12)
    assert float(g[0, 5]) == pytest.approx(-0.2 / 6)


def test_label_smoothing_zero_is_plain_cce(backend):
    logits = torch.randn(8, 5).to(backend.device)
    target = torch.randint(0, 5, (8,)).to(backend.device)
    a = rf.robust_cross_entropy(logits, target, CCE(), backend=backend.name)
    b = rf.robust_cross_entropy(logits, target, CCE(), label_smoothing=0.0, backend=backend.name)
    assert torch.equal(a, b)


def _normalized(ls, y, gamma):
    """FL(p_y) / sum_k FL(P_k) with FL(P) = -(1 - P)^gamma log P (gamma = 0: NCE), Ma et al. 2020."""
    fl = -((1 - ls.exp()) ** gamma) * ls if gamma else -ls
    return fl.gather(1, y[:, None]).squeeze(1) / fl.sum(1)


def two_term_definition(logits, target, scheme, weight=None, sw=None, reduction="mean"):
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


@pytest.mark.parametrize("scheme", TWO_TERM, ids=repr)
def test_two_term_equal_their_definition(backend, scheme):
    """NCE, NFL and APL: value and gradient against their formulas in autograd, float64."""
    dev = backend.device
    combos = [(s, e, r) for s in ((17, 5), (8, 2), (3, 300)) for e in (False, True) for r in REDUCTIONS]
    for (n, c), extras, reduction in thin(combos, backend, 3, TWO_TERM.index(scheme)):
        logits = (torch.randn(n, c, dtype=torch.float64) * 3).to(dev)
        target = torch.randint(0, c, (n,))
        target[0] = IGNORE
        target = target.to(dev)
        weight = (torch.rand(c, dtype=torch.float64) + 0.5).to(dev) if extras else None
        sw = torch.randn(n, dtype=torch.float64).to(dev) if extras else None
        up = torch.randn(n if reduction == "none" else (), dtype=torch.float64).to(dev)
        want, want_g = _grad_of(lambda z: two_term_definition(z, target, scheme, weight, sw, reduction), logits, up)
        v, g = _grad_of(lambda z: rf.robust_cross_entropy(z, target, scheme, weight=weight, sample_weight=sw,
                                                          reduction=reduction, backend=backend.name), logits, up)  # fmt: skip
        what = f"({n}, {c}) extras={extras} {reduction}"
        torch.testing.assert_close(v, want, rtol=1e-10, atol=1e-12, msg=f"value {what}")
        torch.testing.assert_close(g, want_g, rtol=1e-10, atol=1e-12, msg=f"grad {what}")


def test_nfl_gamma_zero_is_nce(backend):
    """NFL(0) runs the NFL kernels (P-form) and must equal NCE, value and gradient, with and without b."""
    dev = backend.device
    logits = torch.randn(10, 5, dtype=torch.float64).to(dev)
    target = torch.randint(0, 5, (10,))
    target[:2] = IGNORE
    target = target.to(dev)
    up = torch.randn(10, dtype=torch.float64).to(dev)
    pairs = ((NFL(gamma=0.0), NCE()),
             (APL(active="nfl", passive="mae", alpha=1.0, beta=0.4, gamma=0.0), APL(passive="mae", beta=0.4)))  # fmt: skip
    for nfl, nce in pairs:
        a = _grad_of(lambda z: rf.robust_cross_entropy(z, target, nfl, reduction="none", backend=backend.name), logits, up)
        b = _grad_of(lambda z: rf.robust_cross_entropy(z, target, nce, reduction="none", backend=backend.name), logits, up)
        torch.testing.assert_close(a[0], b[0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a[1], b[1], rtol=1e-12, atol=1e-14)


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


@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_scheme_table(backend, scheme):
    """Per row, value = the table's L(p) (or w (-log p)) and G = (w / 2q)(softmax - onehot): |G|_1 = w."""
    n, c = 64, 7
    logits = torch.randn(n, c, dtype=torch.float64) * 2
    target = torch.randint(0, c, (n,))
    soft = torch.softmax(logits, dim=1)
    p = soft.gather(1, target[:, None]).squeeze(1)
    value, w = closed_form(scheme, p)
    onehot = torch.nn.functional.one_hot(target, c).double()
    expected_grad = (w / (2 * (1 - p)))[:, None] * (soft - onehot)
    problem = Problem(logits.to(backend.device), target.to(backend.device))
    ones = torch.ones(n, dtype=torch.float64).to(backend.device)
    v, g = run(backend.name, problem, Loss(scheme), "none", None, ones)
    torch.testing.assert_close(v.cpu(), value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g.cpu(), expected_grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g.abs().sum(1).cpu(), w, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------
# masked classes, NaN and +inf rows (SPEC §6.2, §12)


def _masked_batch(dtype, device):
    """Six rows of five classes (targets 0, 1, 2, 3, 4, 0): row 0 has no finite non-target logit, rows 1,
    2 and 5 some masked classes, rows 3 and 4 none."""
    x = torch.randn(6, 5, dtype=torch.float64) * 3
    x[0, 1:] = -math.inf
    x[1, [0, 2]] = -math.inf
    x[2, :2] = -math.inf
    x[5, 1:4] = -math.inf
    return Problem(x.to(dtype).to(device), torch.tensor([0, 1, 2, 3, 4, 0]).to(device))


MASKED_LOSSES = [Loss(s) for s in (CCE(), DM(), MSE(), DMBeta(alpha=2.0, eta=3.0), Focal())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("loss", MASKED_LOSSES, ids=str)
def test_masked_classes(backend, loss, dtype):
    """-inf logits are masked classes: exactly zero gradient there, and G = 0 for a row with no finite non-target."""
    problem = _masked_batch(dtype, backend.device)
    masked = torch.isinf(problem.logits)
    for reduction, normalize in thin(MODES, backend, 3, MASKED_LOSSES.index(loss)):
        v, g, _, _ = check_loss(backend, problem, loss, reduction, normalize, "masked")
        assert torch.isfinite(v).all() and torch.isfinite(g).all()
        assert (g[0] == 0).all(), "a row with no finite non-target logit must get G = 0"
        assert (g[masked] == 0).all(), "masked classes must get exactly zero gradient"


@pytest.mark.parametrize("loss", TWO_TERM_LOSSES, ids=str)
def test_two_term_masked_classes(backend, loss):
    """SPEC §8.3-§8.5: a masked class makes Lambda and sum_k FL(P_k) infinite. NCE and NFL terms: 0, with no
    gradient (the passive b q term keeps its own); label smoothing: +inf where the masked class has a
    weight (as PyTorch), nothing where its weight is 0; the gradient stays finite."""
    combos = [(d, m) for d in (torch.float32, torch.float64) for m in TWO_TERM_MODES]
    for dtype, (reduction, normalize) in thin(combos, backend, 3, TWO_TERM_LOSSES.index(loss)):
        problem = _masked_batch(dtype, backend.device)
        masked = torch.isinf(problem.logits)
        if loss.kernel is Kernel.CCE_LS:
            weight = torch.rand(5, dtype=acc_of(dtype)) + 0.5
            weight[[1, 2, 3]] = 0.0  # row 5 masks only classes of weight 0
            for w in (None, weight.to(backend.device)):
                problem.weight = w
                v, g, _, _ = check_loss(backend, problem, loss, reduction, normalize, "masked",
                                        require_finite=False)  # fmt: skip
                assert torch.isfinite(g).all()
                if reduction == "none":
                    infinite = (masked & (w != 0)).any(1) if w is not None else masked.any(1)
                    assert (v[infinite] == math.inf).all() and torch.isfinite(v[~infinite]).all()
        else:
            v, g, _, _ = check_loss(backend, problem, loss, reduction, normalize, "masked")
            assert torch.isfinite(v).all() and torch.isfinite(g).all()
            if loss.kernel is Kernel.NFL:
                assert (g[masked] == 0).all(), "masked classes must get exactly zero gradient"
                spec = loss.spec()
                if reduction == "none" and spec.b == 0:
                    # The masked class makes the denominator infinite: NFL is 0 on those rows.
                    assert (v[masked.any(1)] == 0).all()


def _bad_rows(c, dtype, device):
    """Seven rows of c classes: NaN non-target (1), +inf target (2), +inf non-target (3), NaN target (4)."""
    x = torch.randn(7, c, dtype=torch.float64)
    t = torch.randint(0, c, (7,))
    x[1, (t[1] + 1) % c] = math.nan
    x[2, t[2]] = math.inf
    x[3, (t[3] + 1) % c] = math.inf
    x[4, t[4]] = math.nan
    bad = torch.tensor([False, True, True, True, True, False, False])
    return Problem(x.to(dtype).to(device), t.to(device)), bad.to(device)


NAN_LOSSES = [Loss(s) for s in (CCE(), DM(), DMBeta(alpha=1.0, eta=1.0), Focal(), SCE(), TaylorCE(3))]
NAN_LOSSES += [Loss(CCE(), 0.1)] + [Loss(s) for s in (NCE(), APL(), APL(passive="mae", alpha=10.0, beta=1.0), NFL(),
                                                     APL(active="nfl", passive="mae", alpha=1.0, beta=0.4, gamma=2.0))]  # fmt: skip


@pytest.mark.parametrize("loss", NAN_LOSSES, ids=str)
def test_nan_and_inf_rows_are_isolated(backend, loss):
    """SPEC §12.2: NaN or +inf anywhere in a row makes every entry of that row's gradient NaN, whatever the
    scheme (DMBeta(1, 1) ignores p), and touches no other row -- except through D, which the normalised
    mean spreads to the whole batch."""
    problem, bad = _bad_rows(4, torch.float32, backend.device)
    if loss.kernel is Kernel.CCE_LS:
        problem.weight = (torch.rand(4) + 0.5).to(backend.device)
    modes = [m for m in MODES if m in loss.modes]
    for reduction, normalize in thin(modes, backend, 2, NAN_LOSSES.index(loss)):
        v, g, rv, rg = check_loss(backend, problem, loss, reduction, normalize, "NaN rows", require_finite=False)
        if loss.spec(reduction, normalize).normalised:
            assert torch.isnan(v) and torch.isnan(g).all(), "D is NaN: the whole batch is"
            continue
        assert torch.isnan(g[bad]).all(), "every entry of a NaN/+inf row's gradient is NaN"
        assert torch.isfinite(g[~bad]).all(), "NaN leaked into another row"
        if reduction == "none":
            assert torch.isnan(v[bad]).all() and torch.isfinite(v[~bad]).all()
        else:
            assert torch.isnan(v)


@pytest.mark.parametrize("z", [math.nan, math.inf], ids=["nan", "inf"])
def test_nan_target_logit_makes_the_row_nan_for_every_scheme(backend, z):
    """SPEC §12.2 even for DMBeta(1, 1), whose weight formula ignores p, and for the peer losses."""
    for scheme in (DMBeta(alpha=1.0, eta=1.0), Focal(), SCE(), TaylorCE(3), DM()):
        x = torch.tensor([[0.5, z, -0.3, 2.0], [0.1, 0.2, 0.3, 0.4]]).to(backend.device).requires_grad_()
        t = torch.tensor([1, 0]).to(backend.device)
        rf.robust_cross_entropy(x, t, scheme, reduction="sum", backend=backend.name).backward()
        assert torch.isnan(x.grad[0]).all(), scheme
        assert torch.isfinite(x.grad[1]).all(), scheme


@pytest.mark.parametrize("kind", ["nan_sample", "inf_sample", "nan_class", "inf_class"])
def test_nan_and_infinite_weights(backend, kind):
    """docs/spec.md §12.5: a non-finite weight acts through s_i. Its rows' gradients are not finite; a NaN
    one reaches every counting row through D (the normalised mean, and the unnormalised mean's class
    weights), an infinite one zeroes every other row's gradient there (s_j w_j / inf) instead; rows that
    do not count (ignored, s = 0) keep a zero gradient. Against the reference too, the pattern included."""
    n, c = 10, 5
    dev = backend.device
    target = torch.tensor([0, 2, 2, 1, 3, 4, 2, 0, 1, 3])
    target[7] = IGNORE
    sample = torch.rand(n) + 0.5
    sample[9] = 0.0  # counts nowhere (its class weight stays finite: 0 x inf would be NaN)
    weight = torch.rand(c) + 0.5
    bad_value = math.nan if kind.startswith("nan") else math.inf
    if kind.endswith("sample"):
        sample[2] = bad_value
        bad = torch.arange(n) == 2
    else:
        weight[2] = bad_value
        bad = target == 2
    counting = (target != IGNORE) & (sample != 0)
    problem = Problem(torch.randn(n, c).to(dev), target.to(dev), weight.to(dev), sample.to(dev))
    for reduction, normalize in MODES:
        v, g, _, _ = check_loss(backend, problem, Loss(DM()), reduction, normalize, kind, require_finite=False)
        v, g = v.cpu(), g.cpu()
        through_d = reduction == "mean" and (normalize is not False or kind.endswith("class"))
        finite_rows = g.isfinite().all(1)
        zero_rows = (g == 0).all(1)
        what = f"{kind} {reduction} normalize={normalize}"
        assert (~finite_rows[bad]).all() and zero_rows[~counting].all(), what
        if through_d and kind.startswith("nan"):
            assert (~finite_rows[counting]).all(), what
        elif through_d:
            assert zero_rows[~bad].all(), what
        else:
            assert finite_rows[~bad].all() and not zero_rows[counting & ~bad].any(), what
        if reduction == "none":
            assert (~v.isfinite()).tolist() == bad.tolist(), what
        else:
            assert v.isnan() if through_d or kind.startswith("nan") else v == math.inf, what


# ---------------------------------------------------------------------------
# degenerate batches (SPEC §3.2, §5.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_single_class_all_ignored_and_empty(backend, dtype):
    """C = 1: p = 1, G = 0 (and the reference's value); every row ignored or no rows: value 0, gradient 0."""
    dev = backend.device
    for loss in (Loss(DM()), Loss(CCE()), Loss(NFL())):
        for reduction, normalize in thin(loss.modes, backend, 2, DTYPES.index(dtype)):
            one = make_problem((5, 1), dtype, dev, config="plain")
            _, g, _, _ = check_loss(backend, one, loss, reduction, normalize, "C=1")
            assert (g == 0).all()
            ignored = make_problem((4, 7), dtype, dev, config="plain")
            ignored.target.fill_(IGNORE)
            up = torch.randn(4 if reduction == "none" else (), dtype=torch.float64).to(dev)
            v, g = run(backend.name, ignored, loss, reduction, normalize, up)
            assert (v == 0).all() and (g == 0).all(), f"{loss} {reduction}: nothing counts, so 0 (not NaN)"
            empty = Problem(torch.randn(0, 7).to(dtype).to(dev), torch.zeros(0, dtype=torch.long).to(dev))
            up = torch.randn(0 if reduction == "none" else (), dtype=torch.float64).to(dev)
            v, g = run(backend.name, empty, loss, reduction, normalize, up)
            assert g.shape == (0, 7) and v.dtype == acc_of(dtype)
            assert v.shape == ((0,) if reduction == "none" else ()) and (v == 0).all()


@pytest.mark.parametrize("bad", [5, -3, 1000, 10**12], ids=str)
def test_bad_target_raises_index_error_naming_it(backend, bad):
    """SPEC §6.4: a target outside [0, C) that is not ignore_index raises, naming the value and its position,
    in every pass (the one-term rows, label smoothing's spread, NFL's focal pass) and in the rows op.

    On the CPU that is every backend's own check. On an accelerator the backends check on the device (an
    assertion that ends the process's use of it: tests/test_cuda.py runs that in a child process), so here
    the opt-in host validation gives the same error there."""
    dev = backend.device
    x = torch.randn(4, 5).to(dev)
    t = torch.tensor([0, 1, bad, 2]).to(dev)
    message = rf"target value {bad} \(at flat position 2\).*5 classes"
    previous = rf.set_validate_targets(torch.device(dev).type != "cpu")
    try:
        for scheme, kw in ((DM(), {}), (CCE(), {"label_smoothing": 0.1}), (NFL(), {})):
            with pytest.raises(IndexError, match=message):
                rf.robust_cross_entropy(x, t, scheme, backend=backend.name, **kw)
    finally:
        rf.set_validate_targets(previous)
    if torch.device(dev).type == "cpu":  # the op itself (no host check on an accelerator)
        with pytest.raises(IndexError, match=message):
            backend.impl.rows(x, t, Loss(DM()).spec(), None)


# ---------------------------------------------------------------------------
# numerics


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_extreme_margins(backend, dtype):
    """p -> 1 (margins 200, 120, 60) and p -> 0 (-200): q and the gradient stay exact, nothing is NaN."""
    n, c = 16, 50
    logits = torch.randn(n, c, dtype=torch.float64)
    target = torch.randint(0, c, (n,))
    logits[torch.arange(n), target] += torch.tensor([200.0, -200.0, 120.0, 60.0] * 4, dtype=torch.float64)
    if dtype == torch.float16:
        logits = logits.clamp(-60000, 60000)
    problem = Problem(logits.to(dtype).to(backend.device), target.to(backend.device))
    losses = [Loss(s) for s in (CCE(), MAE(), DM(), DM(lam=0.0, beta=-3.0), DMBeta(alpha=2.0, eta=3.0))]
    combos = [(loss, mode) for loss in losses for mode in (("none", None), ("mean", True), ("sum", None))]
    for loss, (reduction, normalize) in thin(combos, backend, 5, DTYPES.index(dtype)):
        # |z| ~ 200: one float32 ulp of the margin is ~1e-5 relative in p or q.
        v, g, _, _ = check_loss(backend, problem, loss, reduction, normalize, "extreme margins", rtol=1e-4)
        assert torch.isfinite(v).all() and torch.isfinite(g.float()).all()


@pytest.mark.parametrize("beta", [1000.0, -1000.0], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_beta_1000_normalised_mean_is_finite(backend, dtype, beta):
    """SPEC §5.3: the normalised weights are a softmax of log w, so |beta| = 1000 overflows nothing; the L1
    norm of the whole gradient is one unit."""
    problem = make_problem((256, 100), dtype, backend.device, config="ignore", scale=5.0)
    loss = Loss(DM(lam=1.0, beta=beta))
    # log w = beta p q carries beta times the float32 rounding of p q (through the margin):
    # |beta| epsilons relative, in the weights and so in the value and the gradient.
    rtol = abs(beta) * torch.finfo(torch.float32).eps if dtype != torch.float64 else None
    check_loss(backend, problem, loss, "mean", True, "beta 1000", rtol=rtol)
    one = torch.ones((), dtype=torch.float64).to(backend.device)
    v, g = run(backend.name, problem, loss, "mean", True, one)
    assert torch.isfinite(v) and torch.isfinite(g.float()).all()
    l1 = g.double().abs().sum().item()
    assert abs(l1 - 1.0) < (1e-6 if dtype in (torch.float32, torch.float64) else 2e-2), l1


@pytest.mark.parametrize("dtype,margin", [(torch.float32, 120.0), (torch.float64, 800.0)], ids=dtype_id)
@pytest.mark.parametrize("scheme", [CCE(), Focal(gamma=0.0), Focal(gamma=2.0)], ids=repr)
def test_confident_batch_keeps_its_unit_of_gradient(backend, scheme, dtype, margin):
    """Normalised mean over rows whose q underflows: log w stays finite (no D = 0, no vanished gradient)."""
    x = torch.zeros(3, 4, dtype=dtype)
    x[:, 0] = margin
    x = x.to(backend.device).requires_grad_()
    t = torch.zeros(3, dtype=torch.long).to(backend.device)
    rf.robust_cross_entropy(x, t, scheme, reduction="mean", normalize=True, backend=backend.name).backward()
    torch.testing.assert_close(x.grad.abs().sum().item(), 1.0, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------
# flags and determinism


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_normalize_ignored_without_mean(backend, reduction):
    """SPEC §5.4: derivative normalisation belongs to "mean"; "none"/"sum" give the same bits either way."""
    for scheme in thin(SCHEMES, backend, 3, REDUCTIONS.index(reduction)):
        problem = make_problem((19, 6), torch.float32, backend.device)
        up = torch.randn(19 if reduction == "none" else (), dtype=torch.float64).to(backend.device)
        results = [run(backend.name, problem, Loss(scheme), reduction, n, up) for n in (None, True, False)]
        for v, g in results[1:]:
            assert torch.equal(v, results[0][0]) and torch.equal(g, results[0][1]), f"{scheme}"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_int32_target_and_default_flags(backend, dtype):
    """int32 targets are accepted; the default reduction and normalize match the explicit ones, bit for bit."""
    for scheme in thin(SCHEMES + [NCE()], backend, 3, DTYPES.index(dtype)):
        p = make_problem((13, 7), dtype, backend.device)
        kw = dict(weight=p.weight, sample_weight=p.sample_weight, backend=backend.name)
        a = rf.robust_cross_entropy(p.logits, p.target.int(), scheme, **kw)
        b = rf.robust_cross_entropy(p.logits, p.target, scheme, reduction="mean", normalize=scheme.default_normalize,
                                    **kw)  # fmt: skip
        assert torch.equal(a, b), f"{scheme}"


def test_repeated_calls_are_bitwise_identical(backend):
    """SPEC §6.3: the same inputs give the same bits on the same device and backend."""
    problem = make_problem((20, 11), torch.float32, backend.device)
    for loss in (Loss(DM()), Loss(CCE(), 0.1), Loss(NFL())):
        up = torch.randn((), dtype=torch.float64).to(backend.device)
        first = run(backend.name, problem, loss, "mean", None, up)
        again = run(backend.name, problem, loss, "mean", None, up)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]), f"{loss}"


def test_auto_picks_the_first_available_backend_of_its_device(backend):
    """backend="auto" resolves, per device type, to the first available of backends.AUTO_ORDER (else the
    reference): on this backend's device that one's result, bit for bit."""
    device = torch.device(backend.device)
    order = backends.AUTO_ORDER.get(device.type, ())
    expected = next((name for name in order if backends.unavailable_reason(name) is None), "torch")
    assert backends.resolve("auto", device).name == expected
    p = make_problem((20, 9), torch.float32, backend.device)
    kw = dict(weight=p.weight, sample_weight=p.sample_weight)
    auto = rf.robust_cross_entropy(p.logits, p.target, DM(), **kw)
    assert torch.equal(auto, rf.robust_cross_entropy(p.logits, p.target, DM(), backend=expected, **kw))
