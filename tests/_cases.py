"""The cases every backend is checked on, their inputs, and the one way results are compared.

Shared by the backend suite (test_backends.py end to end, test_backend_ops.py
op by op), the edge tests and the backend files. Everything is built on the
CPU in float64 from torch's seeded generator (conftest.py reseeds per test),
rounded to the case's dtype and only then moved to the backend's device, so
a case draws the same numbers whichever device runs it.

Tolerances (``assert_value``, ``assert_grad``): results are compared with the
float64 reference evaluated on the same, already rounded, inputs.

* float64: 1e-10 relative; float32 accumulation: 1e-5 (2e-5 past C = 1000,
  a sum of more terms); float16 / bfloat16 gradients: 2 ulps of the dtype.
* Every element also gets an absolute floor of that accumulation tolerance
  times the size of its own row: the largest of its entries and of the terms
  they are sums of (``gradient_terms``: a two-term row can cancel to far
  below its terms), and never less than a hundredth of the largest entry of
  the whole result (rows weighted e^-1000 times less than the batch's
  largest lose relative accuracy in float32).
* A reduced value whose terms cancel (signed sample weights) is compared
  relative to the same reduction with |sample_weight|.
* NaN matches NaN, and an infinity matches the same infinity, nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch

import robustloss_fast as rf
from robustloss_fast import reference
from robustloss_fast._common import ROW_COLS, Kernel, Reduction, RowCol, acc_dtype
from robustloss_fast.functional import kernel_spec
from robustloss_fast.schemes import (
    APL,
    CCE,
    DM,
    GCE,
    IMAE,
    MAE,
    MSE,
    NCE,
    NFL,
    RCE,
    SCE,
    DMBeta,
    DMExponential,
    DMNormal,
    Focal,
    Poly1,
    TaylorCE,
)

IGNORE = -100
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = ["none", "mean", "sum"]

# Every scheme of SPEC §4, with parameters that reach each branch of its formula.
SCHEMES = [
    CCE(),
    MAE(),
    MSE(),
    GCE(),
    DM(),
    DM(lam=0.5, beta=12.0),
    DM(lam=0.0, beta=-3.0),
    DM(lam=2.0, beta=-4.0),  # lambda > 1 with a negative beta: w largest at both ends
    IMAE(),
    DMNormal(psi=0.3, beta=4.0),
    DMExponential(),
    # alpha != eta, so swapping the two kernel parameters cannot go unnoticed.
    DMBeta(alpha=2.0, eta=3.0),
    DMBeta(alpha=1.0, eta=3.0),  # alpha = 1: the log p term is dropped, not 0 * log p
    DMBeta(alpha=2.5, eta=1.5),  # non-integer exponents
]
# The peer losses of p alone (SPEC §7), on the same one-term pass.
PEERS = [Poly1(), RCE(), SCE(), Focal(), TaylorCE()]
# The schemes of the whole distribution (SPEC §8) with the kernel parameters
# each reaches: NCE (1, 0), APL + RCE (1, 4), APL + MAE (10, 1), APL + RCE with
# the official A (10, 0.921), the passive term alone (0, 4); NFL gamma 0.5, 2
# and 0 (= NCE through the NFL kernels), and APL with NFL (gamma, b / alpha)
# with alpha a loss scale outside the kernels.
TWO_TERM = [
    NCE(),
    APL(),
    APL(passive="mae", alpha=10.0, beta=1.0),
    APL(passive="rce", alpha=10.0, beta=0.1, A=-9.21),
    APL(active="nfl", alpha=0.0, beta=1.0),
    NFL(),
    NFL(gamma=2.0),
    NFL(gamma=0.0),
    APL(active="nfl"),
    APL(active="nfl", passive="mae", alpha=10.0, beta=1.0, gamma=1.0),
    APL(active="nfl", passive="mae", alpha=1.0, beta=0.4, gamma=2.0),
    APL(active="nfl", passive="mae", alpha=1.0, beta=0.4, gamma=0.0),
]

# (reduction, normalize): normalize only acts on "mean" (None: the scheme's default).
MODES = [("none", None), ("sum", None), ("mean", None), ("mean", True), ("mean", False)]
# The schemes of SPEC §8 refuse normalize=True.
TWO_TERM_MODES = [("none", None), ("sum", None), ("mean", None)]


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def acc_of(dtype: torch.dtype) -> torch.dtype:
    return acc_dtype(dtype)


@dataclass(frozen=True)
class Loss:
    """A loss as the API takes it: a scheme and, for CCE, a label smoothing."""

    scheme: object
    label_smoothing: float = 0.0

    def __str__(self) -> str:
        return repr(self.scheme) + (f"-ls{self.label_smoothing:g}" if self.label_smoothing else "")

    @property
    def kw(self) -> dict:
        return {"label_smoothing": self.label_smoothing} if self.label_smoothing else {}

    def spec(self, reduction="mean", normalize=None, ignore_index=IGNORE):
        return kernel_spec(self.scheme, reduction, normalize, ignore_index, self.label_smoothing)

    @property
    def kernel(self) -> Kernel:
        return self.spec().kernel

    @property
    def two_term(self) -> bool:
        return self.kernel.two_term

    @property
    def modes(self):
        return TWO_TERM_MODES if self.two_term else MODES


ONE_TERM_LOSSES = [Loss(s) for s in SCHEMES + PEERS]
TWO_TERM_LOSSES = [Loss(s) for s in TWO_TERM] + [Loss(CCE(), 0.1), Loss(CCE(), 0.6)]
LOSSES = ONE_TERM_LOSSES + TWO_TERM_LOSSES


# ---------------------------------------------------------------------------
# inputs


@dataclass
class Problem:
    """One random batch on one device. The logits are ``view(base)``: a layout
    test keeps its strides by differentiating with respect to ``base``."""

    base: torch.Tensor
    target: torch.Tensor
    weight: Optional[torch.Tensor] = None
    sample_weight: Optional[torch.Tensor] = None
    view: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda b: b)

    @property
    def logits(self) -> torch.Tensor:
        return self.view(self.base)

    @property
    def classes(self) -> int:
        z = self.logits
        return z.shape[0] if z.dim() == 1 else z.shape[1]


def _target_shape(shape):
    return () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])


def make_problem(
    shape,
    dtype,
    device="cpu",
    *,
    config="full",
    layout="contiguous",
    special=(),
    scale=3.0,
    ignore_index=IGNORE,
):
    """A random problem of logical logits ``shape`` (classes in dim 1, or a single row of ``(C,)``).

    Logits are N(0, scale^2) with every other target pushed up by 6, so p
    spreads over (0, 1). ``config``: "plain" (no weights, nothing ignored),
    "ignore" (about a quarter of the rows ignored) or "full" (ignored rows,
    class weights and signed sample weights). ``layout``: "contiguous",
    "transposed" (classes not contiguous), "row_strided" (every other row of a
    buffer twice as tall), or ``("offset", k, pad)`` (rows start k elements
    into rows of C + k + pad: misaligned and further apart than C).
    ``special`` rows of a 2-D batch (never ignored): "confident" (row 0: target
    margin +40, q ~ e^-40), "wrong" (row 1: another class +40, p ~ e^-40),
    "masked" (row 2: a non-target class at -inf).
    """
    c = shape[0] if len(shape) == 1 else shape[1]
    tshape = _target_shape(shape)
    target = torch.randint(0, c, tshape)
    z = torch.randn(shape, dtype=torch.float64) * scale
    if z.dim() >= 2 and c > 1:
        rows_z = z.movedim(1, -1)  # a view: classes last
        easy = (torch.rand(tshape) < 0.5).to(torch.float64)
        rows_z.scatter_add_(-1, target.unsqueeze(-1), 6.0 * easy.unsqueeze(-1))
    if config in ("full", "ignore") and target.dim() > 0:
        target = torch.where(torch.rand(tshape) < 0.25, torch.full_like(target, ignore_index), target)
    if len(shape) == 2 and special:
        n = shape[0]
        assert n > 2, "special rows need three rows"
        target[:3] = torch.randint(0, c, (3,))
        if "confident" in special:
            z[0, target[0]] += 40.0
        if "wrong" in special and c > 1:
            z[1, (target[1] + 1) % c] += 40.0
        if "masked" in special and c > 2:
            z[2, (target[2] + 2) % c] = -math.inf
    acc = acc_of(dtype)
    weight = sample_weight = None
    if config == "full":
        weight = (torch.rand(c, dtype=torch.float64) + 0.5).to(acc).to(device)
        # Signed sample weights: SPEC §1.3 allows negative ones (gradient ascent).
        sample_weight = torch.randn(tshape, dtype=torch.float64).to(acc).to(device)
    z = z.to(dtype)
    if layout == "contiguous":
        base, view = z, (lambda b: b)
    elif layout == "transposed":  # stride(1) != 1: the API copies, the values must not change
        base, view = z.t().contiguous(), (lambda b: b.t())
    elif layout == "row_strided":  # stride(0) = 2C
        base = torch.zeros((2 * shape[0], c), dtype=dtype)
        base[::2] = z
        view = lambda b: b[::2]  # noqa: E731
    else:
        _, k, pad = layout
        base = torch.zeros((shape[0], c + k + pad), dtype=dtype)
        base[:, k : k + c] = z
        view = lambda b: b[:, k : k + c]  # noqa: E731
    problem = Problem(base.to(device), target.to(device), weight, sample_weight, view)
    # ``run`` differentiates with respect to ``base`` so that these strides reach the backend
    # (a clone of a non-dense view would be contiguous).
    if layout == "row_strided":
        assert problem.logits.stride() == (2 * c, 1)
    elif layout not in ("contiguous", "transposed"):
        assert problem.logits.stride() == (c + k + pad, 1) and problem.logits.storage_offset() == k
    return problem


def special_rows(loss: Loss):
    """make_problem's special rows for ``loss``: a masked class makes label smoothing's value +inf
    (SPEC §8.3), which its own tests check, so its batches leave that one out."""
    return ("confident", "wrong") if loss.kernel is Kernel.CCE_LS else ("confident", "wrong", "masked")


def cross_row_rows(n, dtype, device, special=None, generator=None):
    """Random rows (N, 7) for a cross-row step, and targets in [0, 7) (a fifth ignored); ``special``:
    "edges" (w = 0, m = -inf, a row whose exp underflows), "inf" (an infinite value in the first
    row block and a log w 800 above the others' in the last: rescaling the first block's sums
    underflows to 0, even in float64), or "nan" (a NaN row, which makes every batch total NaN,
    so it gets batches of its own). Specials need n >= 8."""
    rows = torch.randn(n, ROW_COLS, dtype=torch.float64, generator=generator)
    rows[:, RowCol.LS] = rows[:, RowCol.LS].abs()
    rows[:, RowCol.LOGW] *= 30  # normalised weights spread over many orders of magnitude
    rows[:, RowCol.X] = rows[:, RowCol.X].abs() * 5
    target = torch.randint(0, 7, (n,), generator=generator)
    target[torch.rand(n, generator=generator) < 0.2] = IGNORE
    if special and n >= 8:
        target[:4] = torch.arange(4)
    if special == "edges" and n >= 8:
        rows[0, RowCol.LOGW] = -math.inf  # w = 0 exactly
        rows[1, RowCol.M] = -math.inf  # no finite non-target logit: no gradient, still counts in D
        rows[2, RowCol.LOGW] = rows[:, RowCol.LOGW].max() - 200  # its exp underflows against the batch's max
    if special == "inf" and n >= 8:
        rows[1, RowCol.X] = math.inf  # an infinite value with w > 0, in the first block
        target[-1] = 3
        rows[-1, RowCol.LOGW] = rows[:, RowCol.LOGW].max() + 800
    if special == "nan" and n >= 8:
        rows[3, :] = math.nan
    return rows.to(dtype).to(device), target.to(device)


# The shape families: (id, logical shape, layout, configs). dtypes: VOCAB_DTYPES for "vocab".
FAMILIES = [
    ("C1", (40, 1), "contiguous", ("plain", "full")),
    ("C2", (33, 2), "contiguous", ("plain", "full")),
    ("C3", (17, 3), "contiguous", ("plain", "full")),
    ("odd", (29, 37), "contiguous", ("plain", "full", "ignore")),
    ("wide", (6, 1000), "contiguous", ("full",)),
    ("unbatched", (37,), "contiguous", ("plain", "full")),
    ("spatial", (3, 5, 4, 3), "contiguous", ("full", "ignore")),
    ("transposed", (21, 37), "transposed", ("full",)),
    ("row_strided", (11, 19), "row_strided", ("full",)),
    ("misaligned", (12, 10), ("offset", 1, 0), ("full",)),
    ("misaligned_strided", (12, 10), ("offset", 3, 5), ("full",)),
    ("vocab", (3, 50257), "contiguous", ("full",)),  # GPT-2's vocabulary; its last class is a target
]
VOCAB_DTYPES = [torch.float32, torch.bfloat16]


# ---------------------------------------------------------------------------
# running a loss


def run(backend, problem: Problem, loss: Loss, reduction, normalize, upstream, *, weight="problem", sample_weight="problem",
        ignore_index=IGNORE, inplace_backward=False):
    """(value, gradient of the logits) of ``robust_cross_entropy`` on ``backend`` (a name), upstream gradient given.

    ``inplace_backward``: the logits are a non-leaf copy of ``base`` (the
    option refuses leaves), laid out by the problem's view all the same."""
    w = problem.weight if weight == "problem" else weight
    sw = problem.sample_weight if sample_weight == "problem" else sample_weight
    base = problem.base.detach().clone().requires_grad_()
    logits = problem.view(base * 1 if inplace_backward else base)
    kw = dict(loss.kw, inplace_backward=True) if inplace_backward else loss.kw
    value = rf.robust_cross_entropy(
        logits, problem.target, loss.scheme, weight=w, sample_weight=sw, ignore_index=ignore_index,
        reduction=reduction, normalize=normalize, backend=backend, **kw,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(value, base, upstream.to(value.dtype))
    return value.detach(), problem.view(grad)


def _f64(t):
    return None if t is None else t.double()


def reference_problem(problem: Problem) -> Problem:
    """The same problem in float64 (contiguous), for the reference."""
    return Problem(problem.logits.detach().double(), problem.target, _f64(problem.weight), _f64(problem.sample_weight))


def upstream_for(problem: Problem, reduction, device):
    shape = tuple(problem.target.shape) if reduction == "none" else ()
    return torch.randn(shape, dtype=torch.float64).to(device)


@dataclass
class Rows:
    """A problem as rows (SPEC §1.1), written here independently of the API's own reshaping."""

    logits: torch.Tensor  # (N', C)
    target: torch.Tensor  # (N',)
    sample_weight: Optional[torch.Tensor]
    shape: Tuple[int, ...]  # of the logits

    @classmethod
    def of(cls, problem: Problem, sample_weight="problem"):
        z, t = problem.logits, problem.target
        sw = problem.sample_weight if sample_weight == "problem" else sample_weight
        rows = z[None] if z.dim() == 1 else z.movedim(1, -1).reshape(-1, z.shape[1])
        return cls(rows, t.reshape(-1), None if sw is None else sw.reshape(-1), tuple(z.shape))

    def gradient(self, rows, classes=None):
        """(N', C) rows back to the logits' shape (``classes``: a class dimension of another size)."""
        c = self.shape[0 if len(self.shape) == 1 else 1] if classes is None else classes
        if len(self.shape) == 1:
            return rows[0]
        return rows.reshape((self.shape[0],) + self.shape[2:] + (c,)).movedim(-1, 1)

    def per_row(self, values):
        """(N',) values beside the gradient: the class dimension of size 1."""
        return self.gradient(values[:, None], classes=1)


def reference_result(ref: Problem, loss: Loss, reduction, normalize, upstream, ignore_index=IGNORE,
                     sample_weight="problem"):
    """(value, gradient, rows, stats) of ``reference.forward`` / ``reference.backward`` on ``ref``'s rows."""
    spec = loss.spec(reduction, normalize, ignore_index)
    rows = Rows.of(ref, sample_weight)
    value, stats = reference.forward(rows.logits, rows.target, spec, ref.weight, rows.sample_weight)
    value = value * spec.scale
    if spec.reduction == Reduction.NONE:
        value = value.reshape(ref.target.shape)
    g = upstream.double().reshape(-1) if upstream.dim() else upstream.double()
    grad = reference.backward(g * spec.scale, rows.logits, rows.target, stats, spec, spec.smooth_weight(ref.weight))
    return value, rows.gradient(grad), rows, stats


def check_loss(backend, problem: Problem, loss: Loss, reduction, normalize, what="", *, require_finite=True,
               ignore_index=IGNORE, rtol=None, inplace_backward=False):
    """``backend`` (an ``OnDevice``) against the float64 reference on the same rounded inputs: value and
    gradient for a random upstream gradient, dtypes and shapes. Returns (value, grad, ref_value, ref_grad)."""
    logits = problem.logits
    dtype = logits.dtype
    upstream = upstream_for(problem, reduction, backend.device)
    ref = reference_problem(problem)
    ref_v, ref_g, rows, stats = reference_result(ref, loss, reduction, normalize, upstream, ignore_index)
    if require_finite:
        assert torch.isfinite(ref_v).all() and torch.isfinite(ref_g).all(), f"{what}: the reference is not finite"
    vscale = None
    if problem.sample_weight is not None and reduction != "none":
        # The value's error scale: the same sum with |sample_weight| has no cancellation.
        abs_sw = ref.sample_weight.abs()
        spec = loss.spec(reduction, normalize, ignore_index)
        abs_rows = Rows.of(ref, abs_sw)
        abs_value = reference.forward(abs_rows.logits, abs_rows.target, spec, ref.weight, abs_rows.sample_weight)[0]
        vscale = float(abs_value.abs()) * abs(spec.scale)
    v, g = run(backend.name, problem, loss, reduction, normalize, upstream, ignore_index=ignore_index,
               inplace_backward=inplace_backward)
    tag = f"{what} {loss} {reduction} normalize={normalize} backend={backend}"
    assert v.dtype == acc_of(dtype), f"{tag}: loss dtype {v.dtype}"  # SPEC §6.1
    assert g.dtype == dtype, f"{tag}: gradient dtype {g.dtype}"
    assert v.device.type == backend.device and g.device.type == backend.device, tag
    c = problem.classes
    assert_value(v, ref_v, dtype, c, vscale, what=f"{tag} value", rtol=rtol)
    terms = gradient_terms(loss.spec(reduction, normalize, ignore_index), rows, stats, ref.weight, upstream)
    assert_grad(g, ref_g, c, rows.per_row(terms), what=f"{tag} gradient", rtol=rtol)
    return v, g, ref_v, ref_g


# ---------------------------------------------------------------------------
# comparison


def rel_tol(dtype, c=1):
    """The accumulation tolerance (SPEC §6.1): float64, or float32 for every other dtype."""
    if dtype == torch.float64:
        return 1e-10
    return 1e-5 if c <= 1000 else 2e-5


def _floor_tol(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-5


def _compare(actual, expected, tol, what):
    a = actual.detach().double()
    e = expected.detach().double().to(a.device)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    if e.numel() == 0:
        return
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    # A non-finite expectation is matched exactly or not at all.
    tol = torch.where(torch.isfinite(e), tol, torch.zeros_like(tol))
    bad = ~(same | ((a - e).abs() <= tol))
    if bool(bad.any()):
        at = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {e.numel()} elements differ; first at {at}: "
            f"got {float(a[at])!r}, expected {float(e[at])!r}, tolerance {float(tol[at]):.3g}"
        )


def _finite_abs(t):
    return t.double().abs().nan_to_num(0.0, 0.0, 0.0)


def assert_value(actual, expected, logits_dtype, c=1, scale=None, what="", rtol=None):
    """A loss value (float32 or float64): rtol (|expected| + scale), scale = max |expected| unless given."""
    rtol = rel_tol(logits_dtype, c) if rtol is None else rtol
    mag = _finite_abs(expected).to(actual.device)
    if scale is None or not math.isfinite(scale):
        scale = float(mag.max()) if mag.numel() else 0.0
    tol = rtol * (mag + scale) + torch.finfo(actual.dtype).tiny
    _compare(actual, expected, tol, what)


def assert_grad(actual, expected, c=1, terms=None, what="", rtol=None, floor=None):
    """A gradient in the logits' dtype (see the module docstring); ``terms`` (optional, broadcastable to
    the gradient) is the size of the terms each element is a difference of, where larger than the row;
    ``rtol`` and ``floor`` replace the relative tolerance and the coefficient of the row's size."""
    dtype = actual.dtype
    rtol = rel_tol(dtype, c) if rtol is None else rtol
    floor = _floor_tol(dtype) if floor is None else floor
    fi = torch.finfo(dtype)
    half = dtype in (torch.float16, torch.bfloat16)
    rel = max(rtol, 2 * fi.eps) if half else rtol  # rounded once to the output dtype: 2 ulps
    mag = _finite_abs(expected).to(actual.device)
    if mag.numel() == 0:
        return _compare(actual, expected, mag, what)
    cdim = 0 if mag.dim() == 1 else 1
    row = mag.amax(dim=cdim, keepdim=True)
    if terms is not None:
        row = torch.maximum(row, _finite_abs(terms).to(actual.device))
    scale = torch.clamp(row, min=float(mag.max()) / 100)
    tol = rel * mag + floor * scale + (fi.tiny * fi.eps if half else fi.tiny)
    _compare(actual, expected, tol, what)


def gradient_terms(spec, rows: Rows, stats, weight, upstream):
    """Per row (N',), the size of the terms its gradient entries are sums of.

    From the reference's stats (SPEC §9.1, the coefficients with s_i / D
    applied): off the target an entry is alpha r_j + beta u_j (NFL: alpha P_j +
    beta h_j, |h| <= 1 + gamma), at it gamma, all times the upstream gradient
    and the loss scale. A two-term row can cancel to far below these terms
    (NCE with C = 2), and float32 resolves it only to its epsilon times them.
    NFL's alpha and gamma are themselves differences: see ``_nfl_terms``.
    """
    alpha, beta, gamma = stats[:, 1].abs(), stats[:, 2].abs(), stats[:, 3].abs()
    if spec.p_form:
        u_max = 1.0 + spec.a
    elif spec.weight_in_rows and weight is not None:
        u_max = float(weight.abs().max())
    else:
        u_max = 1.0
    terms = torch.maximum(torch.maximum(alpha, beta * u_max), gamma)
    g = upstream.double().reshape(-1) if upstream.dim() else upstream.double().expand(terms.shape)
    terms = terms * g.abs() * abs(spec.scale)
    if spec.p_form:
        terms = torch.maximum(terms, _nfl_terms(rows.logits, rows.target, spec, weight, rows.sample_weight, g))
    return terms


def _nfl_terms(z, t, spec, weight, sw, g):
    """NFL's gradient is a difference of terms of size |g s / D| ((|h_y| + NFL |H|) / S + |b|) (the
    quotient rule of F_y / S, and alpha P_j against beta h_j); where NFL saturates (a confidently
    wrong row of few classes) they cancel to a gradient far below them. From the reference's focal_terms."""
    valid = t != spec.ignore_index
    y = torch.where(valid, t, torch.zeros_like(t))
    logP = torch.log_softmax(z.double(), dim=1)
    F_all, h_all = reference.focal_terms(spec.a, logP, logP.exp(), -torch.expm1(logP))
    S, H = F_all.sum(1), h_all.sum(1)
    F_y, h_y = F_all.gather(1, y[:, None]).squeeze(1), h_all.gather(1, y[:, None]).squeeze(1)
    ok = torch.isfinite(S) & (S != 0)
    safe = torch.where(ok, S, torch.ones_like(S))
    terms = torch.where(ok, (h_y.abs() + (F_y / safe) * H.abs()) / safe, torch.zeros_like(S)) + abs(spec.b)
    zero = torch.zeros_like(S)
    cw = weight.double()[y] if weight is not None else torch.ones_like(S)
    s = torch.where(valid, cw, zero)
    if sw is not None:
        s = s * sw.double()
    if spec.reduction == Reduction.MEAN:
        denom = torch.where(valid, cw, zero).sum()
        s = s / denom if float(denom) != 0 else zero
    return (g * s * terms).abs() * abs(spec.scale)
