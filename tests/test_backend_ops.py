"""Every registered backend's three entry points against the reference, op by op (SPEC §9).

``backends.get(name)`` gives ``rows``, ``grad`` and ``loss`` (the registry's
interface, tests/_backends.py runs each backend on its own device); they are
compared with ``reference.rows`` / ``reference.backward`` /
``reference.forward`` and with ``robustloss_fast._finalize.finalize`` (the
cross-row step), so that a mismatch points at one op rather than at the
whole pipeline (tests/test_backends.py). Shapes come from the reference's
outputs, not from column counts written here.

Tolerances: both sides accumulate in the same precision (float64, else
float32) from the same inputs; rows and stats 1e-12 (float64) and 2e-5
relative to the column's largest entry, the gradient op 1e-12 and 2e-6 of its
largest entry plus 2 ulps of a half output (tests/_cases.py).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from robustloss_fast import _finalize, reference
from robustloss_fast._common import Kernel, Reduction, RowCol, StatCol
from robustloss_fast.schemes import APL, CCE, DM

from _backends import thin
from _cases import (
    DTYPES,
    IGNORE,
    LOSSES,
    TWO_TERM_LOSSES,
    Loss,
    acc_of,
    assert_grad,
    assert_value,
    dtype_id,
    make_problem,
    special_rows,
)

# The columns of robust_ce_rows (SPEC §9.3) and of the stats (§9.1), as the library names them.
M, LS, LOG_W, X, ALPHA, BETA, GAMMA = RowCol
S_M, S_LS, S_ALPHA, S_BETA, S_GAMMA = StatCol


def _stat_tol(dtype):
    return 1e-12 if dtype == torch.float64 else 2e-5


def _problem(backend, loss, dtype, config="full"):
    return make_problem((23, 11), dtype, backend.device, config=config, special=special_rows(loss))


def _spec(loss, reduction="none", normalize=False):
    return loss.spec(reduction, normalize)


# NFL's coefficients are a quotient rule, -h_y/S + F_y H/S^2 + ..., whose terms exceed the
# result by orders of magnitude where NFL saturates (a confidently wrong row of few classes):
# two correct float64 evaluations there agree to ~1e-9 of the column, not to 1e-12.
P_FORM_CANCELLATION = 1e4


def assert_columns(got, expected, dtype, rows, what, cancelling=()):
    """Column by column, relative to the column's largest entry; non-finite entries must match exactly.
    ``cancelling``: the columns of NFL's quotient-rule coefficients (see P_FORM_CANCELLATION)."""
    for col in range(expected.shape[1]):
        rtol = _stat_tol(dtype) * (P_FORM_CANCELLATION if col in cancelling else 1)
        assert_value(got[rows, col], expected[rows, col], dtype, rtol=rtol, what=f"{what} column {col}")


# ---------------------------------------------------------------------------
# rows


@pytest.mark.parametrize("loss", LOSSES, ids=str)
def test_rows(backend, loss):
    """``rows`` == ``reference.rows``: every column, the ignored rows exactly (-inf, -inf, 0, ...)."""
    combos = [(d, n, w) for d in DTYPES for n in ((False,) if loss.two_term else (False, True)) for w in (False, True)]
    for dtype, normalised, use_weight in thin(combos, backend, 4, LOSSES.index(loss)):
        problem = _problem(backend, loss, dtype, config="ignore")
        logits, target = problem.logits, problem.target
        valid = target != IGNORE
        w = (torch.rand(logits.shape[1], dtype=torch.float64) + 0.5).to(acc_of(dtype)).to(backend.device)
        w = w if use_weight else None
        spec = _spec(loss, "mean", normalised)
        assert spec.normalised == normalised
        rows = backend.impl.rows(logits, target, spec, w)
        expected = reference.rows(logits, target, spec, spec.smooth_weight(w))
        what = f"rows {dtype_id(dtype)} normalised={normalised} weight={w is not None}"
        assert rows.dtype == acc_of(dtype) and rows.shape == expected.shape, what
        assert rows.device.type == backend.device, what
        assert_columns(rows, expected, dtype, valid, what, (LOG_W, ALPHA, BETA, GAMMA) if spec.p_form else ())
        assert torch.equal(rows[~valid], expected[~valid]), f"{what}: ignored rows"
        if not loss.two_term:
            _check_one_term_rows(rows, logits, target, loss, spec, valid, what)


def _check_one_term_rows(rows, logits, target, loss, spec, valid, what):
    """SPEC §9.3 for a one-term scheme, from the reference's pieces rather than from its rows:
    lse_nt and log w of SPEC §2 and §4.3, x = -log p when normalised, else the row's own value;
    (alpha, beta, gamma) = (w/2, 0, -w/2), or 0 where no non-target logit is finite and when normalised."""
    dtype = logits.dtype
    y = torch.where(valid, target, torch.zeros_like(target))
    _, m, ls, logp, logq, p, q = reference.row_probs(logits.to(acc_of(dtype)), y)
    lw = reference.log_weight(spec.kernel, spec.a, spec.b, logp, logq, p, q)
    x = -logp if spec.normalised else reference.forward(logits, target, dataclasses.replace(spec, reduction=Reduction.NONE))[0]
    for col, want in ((M, m), (LS, ls), (LOG_W, lw), (X, x)):
        assert_value(rows[valid, col], want[valid], dtype, rtol=_stat_tol(dtype), what=f"{what} piece {col}")
    half = torch.where(spec.normalised | (rows[:, M] == -math.inf), 0.0, rows[:, LOG_W].exp() / 2)
    assert_value(rows[valid, ALPHA], half[valid], dtype, rtol=_stat_tol(dtype), what=f"{what} alpha = w / 2")
    assert (rows[:, BETA] == 0).all() and torch.equal(rows[:, GAMMA], -rows[:, ALPHA]), f"{what}: (w/2, 0, -w/2)"


@pytest.mark.parametrize("loss", TWO_TERM_LOSSES, ids=str)
def test_two_term_refuse_normalize(backend, loss):
    """SPEC §8.6: no emphasis, so no derivative normalisation, at the op level too (rows and loss)."""
    problem = make_problem((4, 5), torch.float32, backend.device, config="plain")
    spec = dataclasses.replace(_spec(loss, "mean", False), normalize=True)
    assert spec.normalised
    with pytest.raises(ValueError, match="normali"):
        backend.impl.rows(problem.logits, problem.target, spec, None)
    with pytest.raises(ValueError, match="normali"):
        backend.impl.loss(problem.logits, problem.target, spec, None, None)


# ---------------------------------------------------------------------------
# loss and the cross-row step


# The forward ops that also return the stats, where a backend has one: their stats are checked
# directly (every other backend's stats reach the comparison through its gradient).
FORWARD_OPS = {
    "cpu": "robust_ce_forward",
    "cuda": "robust_ce_forward",
    "triton": "triton_forward",
}


def _forward_op(name, logits, target, spec, weight, sample_weight):
    op = getattr(torch.ops.robustloss, FORWARD_OPS[name])
    return op(logits, target, int(spec.kernel), spec.a, spec.b, weight, sample_weight, spec.ignore_index,
              int(spec.reduction), spec.normalize)  # fmt: skip


def _check_stats(got, expected, valid, dtype, what, p_form=False):
    assert got.dtype == expected.dtype and got.shape == expected.shape, what
    # lse_nt = m + ls of an ignored row is not specified; its coefficients must be exactly 0.
    for col in (S_M, S_LS):
        assert_value(got[valid, col], expected[valid, col], dtype, rtol=_stat_tol(dtype), what=f"{what} lse_nt {col}")
    coefs = range(len(StatCol) - S_ALPHA)
    assert_columns(got[:, S_ALPHA:], expected[:, S_ALPHA:], dtype, slice(None), f"{what} coefficients",
                   coefs if p_form else ())  # fmt: skip
    assert (got[~valid, S_ALPHA:] == 0).all(), f"{what}: a nonzero coefficient on an ignored row"


@pytest.mark.parametrize("loss", LOSSES, ids=str)
def test_loss_and_finalize(backend, loss):
    """``loss`` and ``finalize(rows)`` == ``reference.forward`` (value and stats) for every mode and dtype;
    the gradient of ``loss`` for a random upstream gradient == ``reference.backward`` of the reference's stats."""
    combos = [(d, mode, config) for d in DTYPES for mode in loss.modes for config in ("plain", "full")]
    for dtype, (reduction, normalize), config in thin(combos, backend, 5, LOSSES.index(loss)):
        problem = _problem(backend, loss, dtype, config)
        logits, target, weight, sw = problem.logits, problem.target, problem.weight, problem.sample_weight
        spec = _spec(loss, reduction, normalize)
        valid = target != IGNORE
        ref_value, ref_stats = reference.forward(logits, target, spec, weight, sw)
        # Sums with signed sample weights cancel: the same sum with |sw| is the error scale.
        abs_sw = None if sw is None else sw.abs()
        vscale = float(reference.forward(logits, target, spec, weight, abs_sw)[0].abs().max())
        what = f"{dtype_id(dtype)} {reduction} normalize={normalize} {config}"
        tol = _stat_tol(dtype)

        x = logits.detach().clone().requires_grad_()
        value = backend.impl.loss(x, target, spec, weight, sw)
        assert value.dtype == acc_of(dtype) and value.shape == ref_value.shape, what
        assert_value(value.detach(), ref_value, dtype, scale=vscale, rtol=tol, what=f"{what} value (loss)")
        up = torch.randn(ref_value.shape, dtype=torch.float64).to(backend.device)
        (grad,) = torch.autograd.grad(value, x, up.to(value.dtype))
        want = reference.backward(up, logits, target, ref_stats, spec, spec.smooth_weight(weight))
        assert grad.dtype == dtype, what
        assert_grad(grad, want, logits.shape[1], what=f"{what} gradient (loss)")

        rows = backend.impl.rows(logits, target, spec, weight)
        fin_value, fin_stats = _finalize.finalize(rows, target, spec, weight, sw)
        assert_value(fin_value, ref_value, dtype, scale=vscale, rtol=tol, what=f"{what} value (finalize)")
        _check_stats(fin_stats, ref_stats, valid, dtype, f"{what} stats (finalize)", spec.p_form)

        if backend.name in FORWARD_OPS:
            op_value, op_stats = _forward_op(backend.name, logits, target, spec, weight, sw)
            assert_value(op_value, ref_value, dtype, scale=vscale, rtol=tol, what=f"{what} value (forward op)")
            _check_stats(op_stats, ref_stats, valid, dtype, f"{what} stats (forward op)", spec.p_form)


# ---------------------------------------------------------------------------
# the gradient pass


# One per way the gradient pass reads its stats: a one-term scheme (derivative-normalised DM), label
# smoothing (beta u with u the class weights), NCE + MAE (beta u, u = 1) and NFL + MAE (P-form).
GRAD_LOSSES = [
    Loss(DM()),
    Loss(CCE(), 0.3),
    Loss(APL(passive="mae", alpha=1.0, beta=2.0)),
    Loss(APL(active="nfl", passive="mae", alpha=1.0, beta=2.0, gamma=0.5)),
]


def _grad_tols(dtype):
    # Both compute in the accumulator type and round once to the logits' dtype.
    return (1e-12, 1e-12) if dtype == torch.float64 else (2e-6, 2e-6)


def _check_grad_op(backend, loss, spec, logits, target, stats, weight, g, what):
    got = backend.impl.grad(g, logits, target, stats, spec, weight)
    expected = reference.backward(g, logits, target, stats, spec, spec.smooth_weight(weight))
    assert got.dtype == logits.dtype and got.shape == logits.shape, what
    assert got.device.type == backend.device, what
    assert (got[target == IGNORE] == 0).all(), f"{what}: ignored rows get 0"
    rtol, floor = _grad_tols(logits.dtype)
    assert_grad(got, expected.to(got.dtype), logits.shape[1], what=what, rtol=rtol, floor=floor)
    return got, expected


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("loss", GRAD_LOSSES, ids=str)
def test_grad_of_the_reference_stats(backend, loss, dtype):
    """``grad`` == ``reference.backward`` for the reference's own stats, with masked classes, a row masked
    but for its target, C = 1 and C = 3, a scalar or a per-row upstream gradient."""
    dm = loss.kernel is Kernel.DM
    combos = [(p, shape) for p in (False, True) for shape in ((23, 11), (9, 1), (7, 37), (5, 3))]
    for per_row, (n, c) in thin(combos, backend, 3, DTYPES.index(dtype)):
        spec = _spec(loss, "none" if per_row else "mean", dm)
        problem = make_problem((n, c), dtype, backend.device, config="full")
        logits, target, weight, sw = problem.logits, problem.target, problem.weight, problem.sample_weight
        if c > 2:
            target[:2] = torch.randint(0, c, (2,)).to(backend.device)
            masked = int((target[0] + 1) % c)
            logits[0, masked] = -math.inf  # a masked class
            keep = logits[1, target[1]].clone()
            logits[1] = -math.inf  # every non-target masked: G = 0 (one-term)
            logits[1, target[1]] = keep
        _, stats = reference.forward(logits, target, spec, weight, sw)
        g = torch.randn((n,) if per_row else (), dtype=acc_of(dtype)).to(backend.device)
        what = f"grad n={n} c={c} per_row={per_row}"
        got, expected = _check_grad_op(backend, loss, spec, logits, target, stats, weight, g, what)
        if c > 2 and dm:
            assert (got[1] == 0).all(), "a row with no finite non-target logit must get G = 0"
            assert float(got[0, masked]) == 0.0, "a masked class gets no gradient"
        if c > 2 and loss.kernel is Kernel.CCE_LS:
            # A masked class still gets the smoothing term -g eps/C u_j (as F.cross_entropy's), unless
            # the reference's term itself rounds to 0 in the dtype (float16: below 6e-8).
            assert float(got[0, masked]) != 0.0 or float(expected[0, masked].to(dtype)) == 0.0, what


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("loss", GRAD_LOSSES, ids=str)
def test_grad_of_arbitrary_stats(backend, loss, dtype):
    """SPEC §9.2 for any stats: g (alpha r + beta u) off the target, g gamma at it; r = 0 where m = -inf;
    a NaN statistic makes its row NaN in every column; ignored rows 0. NFL (P-form): g (alpha P + beta h(P))
    with P = exp(z - lse), P rounding to 1 (Q = 0) and a masked class (P = 0, h = -1) included."""
    n, c = 7, 6
    acc = acc_of(dtype)
    problem = make_problem((n, c), dtype, backend.device, config="full")
    logits, target, weight = problem.logits, problem.target, problem.weight
    target.copy_(torch.randint(0, c, (n,)).to(backend.device))
    target[4] = IGNORE
    spec = _spec(loss)
    shape = reference.forward(logits, target, spec, weight)[1].shape
    stats = torch.randn(shape, dtype=torch.float64).to(acc).to(backend.device)
    z = logits.to(acc)
    # lse = m + ls: m a row's largest logit, ls in [0, log C] (here drawn rather than computed).
    if spec.p_form:
        logits[5, 2] = -math.inf
        z = logits.to(acc)
        stats[:, S_M] = z.amax(dim=1)
        stats[:, S_LS] = torch.log(torch.exp(z - stats[:, S_M, None]).sum(1)) + torch.rand(n, dtype=acc).to(backend.device)
        stats[1, S_LS] = torch.log(torch.exp(z[1] - stats[1, S_M]).sum())  # P of the largest may round to 1: Q = 0
    else:
        stats[:, S_M] = z.amax(dim=1) + 3.0
        stats[:, S_LS] = torch.rand(n, dtype=acc).to(backend.device) * math.log(c)
        stats[1, S_M] = -math.inf  # no finite non-target: r = 0
        stats[1, S_LS] = 0.0
        stats[3, S_BETA] = 0.0  # a one-term row
    stats[2, S_M] = math.nan
    if weight is not None:
        weight[2] = 0.0  # label smoothing: a class with no smoothing weight
    keep = torch.arange(n).to(backend.device) != 2
    for g in (torch.randn(()), torch.randn(n)):
        g = g.to(acc).to(backend.device)
        got = backend.impl.grad(g, logits, target, stats, spec, weight)
        expected = reference.backward(g, logits, target, stats, spec, spec.smooth_weight(weight))
        what = f"grad g={tuple(g.shape)}"
        assert got.dtype == dtype and got.shape == (n, c), what
        assert got[2].isnan().all(), f"{what}: a NaN statistic makes its whole row NaN"
        assert (got[4] == 0).all(), f"{what}: ignored rows get 0"
        rtol, floor = _grad_tols(dtype)
        assert_grad(got[keep], expected[keep].to(dtype), c, what=what, rtol=rtol, floor=floor)
