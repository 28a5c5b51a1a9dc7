r"""The Triton kernels of SPEC §2-§5: the row pass and the backward pass.

Math, per row ``i`` with logits ``z``, target ``y`` and ``lse_nt = logsumexp_{j != y} z_j``:

* The softmax splits at the target. With ``r_j = exp(z_j - lse_nt)`` (``j != y``),
  the softmax over the non-target classes, and ``lse = logaddexp(z_y, lse_nt)``,

      softmax_j = exp(z_j - lse) = exp(z_j - lse_nt) exp(lse_nt - lse) = q r_j   (j != y)
      softmax_y = p = 1 - q,

  so ``softmax - e_y = q (r - e_y)`` exactly, and ``||r - e_y||_1 = sum_{j != y} r_j + 1 = 2``.
* ``p = exp(z_y) / (exp(z_y) + exp(lse_nt)) = sigmoid(d)`` with the margin
  ``d = z_y - lse_nt``, hence ``log p = -softplus(-d)`` and ``log q = -softplus(d)``:
  q is never formed as ``1 - p`` and stays exact for margins of 100+.
* A loss ``L(p)`` has ``dL/dz = L'(p) dp/dz = L'(p) p (e_y - softmax) = -L'(p) p q (r - e_y)``,
  i.e. ``(w / 2)(r - e_y)`` with the emphasis ``w = -2 L'(p) p q`` (CCE: ``L' = -1/p``,
  ``w = 2q``; MAE: ``w = 2pq``; MSE: ``w = 4pq^2``; GCE: ``w = 2 p^k q``). The
  derivative-defined schemes give ``w`` directly; every scheme's gradient is
  ``G = (w / 2)(r - e_y)``, L1 norm ``w``.
* With ``s_i = sample_weight_i weight[y_i]`` and the reduction's divisor ``D``, the
  final gradient is ``g_i coef_i (r - e_y)`` with ``coef_i = s_i w_i / (2 D)``; for
  ``reduction="mean", normalize=True`` the normalised weights ``w_i / D`` are a
  softmax of ``log w`` over the batch, which is why the row pass returns ``log w``.

The row pass writes ``rows[i] = (lse_nt, log w, x)`` (``x`` is the per-row value
the reduction scales by ``s_i``, see ``_row_x``); the cross-row step (``D`` and
``coef``) is ``robustloss_fast._finalize.finalize``; the backward pass writes
``g_i coef_i (r_i - e_{y_i})`` from the logits and ``(lse_nt, coef)``.

Both kernels work on tiles of ``BLOCK_N`` rows by ``BLOCK_C`` columns (many rows
per program when C is small, one row per program when C is large). Rows wider
than ``BLOCK_C`` are reduced in chunks with an online max/sum. Arithmetic is in
the accumulator type of the output buffer (float32, or float64 for float64
logits: the kernels read it from the pointer's element type). Offsets are int64.

The scheme table (``_log_weight``, ``_row_x``) is the one copy for Triton; it
mirrors ``csrc/include/robustloss/schemes.h`` and ``robustloss_fast/reference.py``
and is selected by the ``SCHEME`` constexpr, so each scheme is its own
specialisation with no branch in the inner loop.
"""

import triton
import triton.language as tl

# Kernel formula ids: keep in sync with robustloss_fast/schemes.py (KERNEL_IDS)
# and csrc/include/robustloss/schemes.h.
CCE, MAE, MSE, GCE, DM, DM_NORMAL, DM_BETA, POLY, FOCAL, TAYLOR = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9
NUM_SCHEMES = 10

_LN2 = tl.constexpr(0.6931471805599453)
_NEG_INF = tl.constexpr(float("-inf"))
_POS_INF = tl.constexpr(float("inf"))
# No NaN global: Triton checks that a global keeps its value between kernels,
# and NaN != NaN fails that check. NaN is written inline as float("nan").


@triton.jit
def _probe():
    pass


def _is_interpreted(fn) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every Triton 3.x has it
        return False
    return isinstance(fn, InterpretedFunction)


#: True when @triton.jit gives interpreted (CPU, numpy) functions: TRITON_INTERPRET=1
#: was set before Triton was imported.
INTERPRETED = _is_interpreted(_probe)


# log1p and expm1: the interpreter patches only triton.language (not libdevice),
# so it gets exact-enough formulas built from exp and log; compiled kernels use
# libdevice, whose float32 log1p does not depend on the accuracy of the fast log
# near 1 (which the formula below would).
@triton.jit
def _log1p_portable(u):
    # log(1 + u) = log(w) * u / (w - 1) with w = fl(1 + u): the rounding error of
    # 1 + u cancels in the ratio (Goldberg 1991, Theorem 4).
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def _expm1_portable(x):
    # exp(x) - 1 = (u - 1) * x / log(u) with u = fl(exp(x)) (Kahan's trick).
    u = tl.exp(x)
    um1 = u - 1.0
    r = tl.where(u == 1.0, x, um1 * (x / tl.log(u)))
    return tl.where(um1 == -1.0, -1.0, r)


if INTERPRETED:
    _log1p = _log1p_portable
    _expm1 = _expm1_portable
else:  # pragma: no cover - needs a GPU
    from triton.language.extra import libdevice

    _log1p = libdevice.log1p
    _expm1 = libdevice.expm1


@triton.jit
def _softplus(x):
    # log(1 + e^x) without overflow; +inf -> +inf, -inf -> 0, NaN -> NaN.
    return tl.where(x > 0, x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _row_prob(z_y, lse_nt):
    """(log p, log q, p, q) from the margin d = z_y - lse_nt (SPEC §2)."""
    d = z_y - lse_nt
    # A +inf target logit is not a valid input (SPEC §6: NaN for the row); the
    # margin alone would read it as p = 1.
    d = tl.where(z_y == _POS_INF, float("nan"), d)
    logp = -_softplus(-d)
    logq = -_softplus(d)
    return logp, logq, tl.exp(logp), tl.exp(logq)


@triton.jit
def _log_weight(logp, logq, p, q, a, b, SCHEME: tl.constexpr):
    """log w(p) (SPEC §4): the batch softmax of these is the normalised emphasis."""
    tl.static_assert(SCHEME >= 0 and SCHEME < 10, "unknown scheme id")
    if SCHEME == 0:  # CCE: w = 2q
        lw = _LN2 + logq
    elif SCHEME == 1:  # MAE: w = 2pq
        lw = _LN2 + logp + logq
    elif SCHEME == 2:  # MSE: w = 4pq^2
        lw = 2.0 * _LN2 + logp + 2.0 * logq
    elif SCHEME == 3:  # GCE(k = a): w = 2 p^k q
        lw = _LN2 + a * logp + logq
    elif SCHEME == 4:  # DM(lam = a, beta = b): w = exp(beta p^lam q)
        # p^0 = 1 even at p = 0 (0 * log 0 would be NaN).
        plam = tl.where(a == 0.0, 1.0, tl.exp(a * logp))
        lw = b * plam * q
    elif SCHEME == 5:  # DMNormal(psi = a, beta = b): w = exp(-beta p (p - 2 psi))
        lw = -b * p * (p - 2.0 * a)
    elif SCHEME == 6:  # DMBeta(alpha = a, eta = b): w = p^(alpha-1) q^(eta-1); 0 * log 0 avoided
        t1 = tl.where(a == 1.0, 0.0, (a - 1.0) * logp)
        t2 = tl.where(b == 1.0, 0.0, (b - 1.0) * logq)
        lw = t1 + t2
    elif SCHEME == 7:  # Poly (Poly-1, RCE, SCE): L = -a log p + b q, w = 2q (a + b p)
        lw = _LN2 + logq + tl.log(a + b * p)
    elif SCHEME == 8:  # Focal(gamma = a)
        # p >= q: w = 2 q^(g+1) (1 + g p (-log p) / q) in logs (q may underflow, log q does not);
        # p < q: w = 2 q^g (q - g p log p), p log p -> 0 at p = 0.
        ratio = tl.where(q > 0.0, -logp / q, 1.0)
        confident = _LN2 + (a + 1.0) * logq + _log1p(a * p * ratio)
        plogp = tl.where(p == 0.0, 0.0, p * logp)
        lw = tl.where(p >= q, confident, _LN2 + tl.where(a == 0.0, 0.0, a * logq) + tl.log(q - a * plogp))
    else:  # TaylorCE(order t = a): w = 2q (1 - q^t)
        lw = _LN2 + logq + tl.log(-_expm1(a * logq))
    # A NaN row stays NaN even where a formula would not look at p (DMBeta(1, 1)).
    return tl.where(p != p, p, lw)


@triton.jit
def _row_x(lw, logp, logq, q, a, b, SCHEME: tl.constexpr, NORMALISED: tl.constexpr):
    """The per-row quantity the reduction scales by s_i (schemes.h ``row_x``).

    With derivative normalisation the value is the emphasis-weighted
    cross-entropy and the weight exp(log w - M) is applied in the cross-row
    step, so x = -log p. Otherwise x is the row's own value: L(p) (accurate as
    p -> 1) for a loss-defined scheme, w (-log p) with the raw w for a
    derivative-defined one.
    """
    if NORMALISED:
        x = -logp
    elif SCHEME == 0:
        x = -logp
    elif SCHEME == 1:
        x = q
    elif SCHEME == 2:
        x = q * q
    elif SCHEME == 3:
        x = -_expm1(a * logp) / a
    elif SCHEME == 7:
        x = tl.where(a == 0.0, 0.0, -a * logp) + b * q
    elif SCHEME == 8:
        x = tl.where(a == 0.0, -logp, -tl.exp(a * logq) * logp)
    elif SCHEME == 9:
        # Horner form of sum_{k=1..t} q^k / k, k from t down to 1.
        t = a.to(tl.int32)
        x = tl.zeros_like(q)
        for i in range(0, t):
            x = q * (1.0 / (t - i).to(q.dtype) + x)
    else:
        x = tl.exp(lw) * (-logp)
    return x


@triton.jit
def rows_kernel(
    logits_ptr,
    target_ptr,
    rows_ptr,
    n_rows,
    n_cols,
    stride_row,
    ignore_index,
    a_hi,
    a_lo,
    b_hi,
    b_lo,
    SCHEME: tl.constexpr,
    NORMALISED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """rows[i] = (lse_nt, log w, x) for BLOCK_N rows; (-inf, -inf, 0) for ignored rows.

    The scheme parameters arrive as float32 pairs (hi + lo) because Triton
    passes Python floats as float32; their sum carries 48 bits, enough for the
    float64 path. A target outside [0, C) (possible only where the eager check
    was traced away) gives a NaN row and reads nothing.
    """
    acc = rows_ptr.dtype.element_ty
    a = tl.cast(a_hi, acc) + tl.cast(a_lo, acc)
    b = tl.cast(b_hi, acc) + tl.cast(b_lo, acc)

    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < n_rows
    y = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = row_ok & (y != ignore_index)
    in_range = (y >= 0) & (y < n_cols)
    live = valid & in_range
    y_safe = tl.where(live, y, 0)
    row_base = logits_ptr + rows * stride_row

    # Online logsumexp over the non-target lanes: running max m and sum s of
    # exp(z - m). NaN / +inf lanes are recorded in `bad` and kept out of m and s,
    # so max and sum never see a NaN (whose handling differs between backends).
    m = tl.full([BLOCK_N], _NEG_INF, acc)
    s = tl.zeros([BLOCK_N], acc)
    bad = tl.zeros([BLOCK_N], tl.int32)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = live[:, None] & (cols < n_cols)[None, :]
        z = tl.load(row_base[:, None] + cols[None, :], mask=mask, other=_NEG_INF).to(acc)
        non_target = cols[None, :] != y_safe[:, None]
        not_finite_above = (z != z) | (z == _POS_INF)
        bad = tl.maximum(bad, tl.max((not_finite_above & non_target).to(tl.int32), axis=1))
        z = tl.where(non_target & ~not_finite_above, z, _NEG_INF)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # While the running max is still -inf nothing has been summed, and
        # exp(-inf - (-inf)) would be NaN: guard both the rescale and the terms.
        alpha = tl.where(m_new == _NEG_INF, 0.0, tl.exp(m - m_new))
        e = tl.where(z == _NEG_INF, 0.0, tl.exp(z - m_new[:, None]))
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
    lse_nt = tl.where(m == _NEG_INF, _NEG_INF, m + tl.log(s))
    lse_nt = tl.where(bad != 0, float("nan"), lse_nt)

    z_y = tl.load(row_base + y_safe, mask=live, other=0.0).to(acc)
    # SPEC §6: a NaN or +inf target logit makes the whole row NaN.
    lse_nt = tl.where((z_y != z_y) | (z_y == _POS_INF), float("nan"), lse_nt)
    logp, logq, p, q = _row_prob(z_y, lse_nt)
    lw = _log_weight(logp, logq, p, q, a, b, SCHEME)
    x = _row_x(lw, logp, logq, q, a, b, SCHEME, NORMALISED)

    lse_nt = tl.where(valid, tl.where(in_range, lse_nt, float("nan")), _NEG_INF)
    lw = tl.where(valid, tl.where(in_range, lw, float("nan")), _NEG_INF)
    x = tl.where(valid, tl.where(in_range, x, float("nan")), 0.0)
    out = rows_ptr + rows * 3
    tl.store(out, lse_nt, mask=row_ok)
    tl.store(out + 1, lw, mask=row_ok)
    tl.store(out + 2, x, mask=row_ok)


@triton.jit
def backward_kernel(
    grad_ptr,
    grad_stride,
    logits_ptr,
    target_ptr,
    stats_ptr,
    out_ptr,
    n_rows,
    n_cols,
    stride_row,
    ignore_index,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[i, j] = g_i coef_i (r_ij - [j == y_i]) on a BLOCK_N x BLOCK_C tile.

    ``stats`` rows are (lse_nt, coef); ``grad_stride`` is 0 for a scalar upstream
    gradient. Ignored rows are exact zeros and read no logits; a row with no
    finite non-target logit (lse_nt = -inf: C = 1 or all masked) is
    ``g coef * 0`` (G = 0, NaN stays NaN). The target lane is selected, never
    multiplied: exp(z_y - lse_nt) may overflow.
    """
    acc = stats_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    y = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = row_ok & (y != ignore_index)
    lse_nt = tl.load(stats_ptr + rows * 2, mask=valid, other=0.0)
    coef = tl.load(stats_ptr + rows * 2 + 1, mask=valid, other=0.0)
    g = tl.load(grad_ptr + rows * grad_stride, mask=valid, other=0.0).to(acc)
    gc = g * coef

    z = tl.load(
        logits_ptr + rows[:, None] * stride_row + cols[None, :],
        mask=valid[:, None] & col_ok[None, :],
        other=_NEG_INF,
    ).to(acc)
    r = tl.exp(z - lse_nt[:, None])
    direction = tl.where(cols[None, :] == y[:, None], -1.0, r)
    direction = tl.where((lse_nt == _NEG_INF)[:, None], 0.0, direction)
    out = tl.where(valid[:, None], gc[:, None] * direction, 0.0)
    tl.store(
        out_ptr + rows[:, None] * n_cols + cols[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )
