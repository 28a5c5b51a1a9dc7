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
* ``lse_nt = m + ls`` stays in its two parts: ``m`` the row's largest non-target
  logit, ``ls = log sum_j exp(z_j - m)`` in ``[0, log C]``. The margin is
  ``(z_y - m) - ls`` and ``r_j = exp((z_j - m) - ls)``: each first difference is
  exact for nearby logits, so offsets of 1e8 (where a float32 ``m + ls`` is just
  ``m``) lose nothing.
* A loss ``L(p)`` has ``dL/dz = L'(p) dp/dz = L'(p) p (e_y - softmax) = -L'(p) p q (r - e_y)``,
  i.e. ``(w / 2)(r - e_y)`` with the emphasis ``w = -2 L'(p) p q`` (CCE: ``L' = -1/p``,
  ``w = 2q``; MAE: ``w = 2pq``; MSE: ``w = 4pq^2``; GCE: ``w = 2 p^k q``). The
  derivative-defined schemes give ``w`` directly; every scheme's gradient is
  ``G = (w / 2)(r - e_y)``, L1 norm ``w``.
* With ``s_i = sample_weight_i weight[y_i]`` and the reduction's divisor ``D``, the
  final gradient is ``g_i coef_i (r - e_y)`` with ``coef_i = s_i w_i / (2 D)``; for
  ``reduction="mean", normalize=True`` the normalised weights ``w_i / D`` are a
  softmax of ``log w`` over the batch, which is why the row pass returns ``log w``.

The row pass writes ``rows[i] = (m, ls, log w, x, alpha, beta, gamma)``: ``x`` is
the per-row value the reduction scales by ``s_i`` (see ``_row_x``) and the row's
gradient is ``alpha r_j + beta u_j`` off the target, ``gamma`` at it (schemes.h
``RowGrad``; one-term schemes: ``(w/2, 0, -w/2)``, or 0 under derivative
normalisation, whose gradient the cross-row step derives from ``log w``). The two-term schemes (label
smoothing, NCE/APL: ``_two_term_row``) reduce one more row quantity,
``spread = sum_k u_k (M - z_k)`` with M the row's largest logit (spec §8.2). The cross-row step (``D``, and the rows
scaled by ``s_i / D``) is ``cross_row.py``'s kernel; the backward
pass writes ``g_i (alpha_i r_ij + beta_i u_j)`` and ``g_i gamma_i`` from the
logits and ``stats = (m, ls, alpha, beta, gamma)``.

NFL (normalized focal loss, ``Kernel.NFL``: ``L = F_y / sum_k F_k + b q`` with
``F_k = -(1 - P_k)^gamma log P_k``) has a per-class gradient term
``h_j = P_j dF/dP (P_j)``, so its rows and stats are in "P-form": columns 0-1
hold ``lse = m + (ls - log q)`` (not ``lse_nt``), the row pass makes one more pass over the
non-target classes for ``sum F`` and ``sum h`` (``_nfl_row``), and the backward
pass writes ``g_i (alpha_i P_ij + beta_i h_ij)``, ``P_ij = exp((z_ij - m_i) - ls_i)``,
recomputing ``h`` per class (``_focal_terms``, the one Triton copy of schemes.h
``focal_terms``). It is a constexpr specialisation of both kernels.

Both kernels work on tiles of ``BLOCK_N`` rows by ``BLOCK_C`` columns (many rows
per program when C is small, one row per program when C is large). Rows wider
than ``BLOCK_C`` are reduced in chunks with an online max/sum. Arithmetic is in
the accumulator type of the output buffer (float32, or float64 for float64
logits: the kernels read it from the pointer's element type). Offsets are int64.

The scheme table (``_log_weight``, ``_row_x``, ``_two_term_row``, ``_nfl_row``) is the one copy for Triton; it
mirrors ``csrc/include/robustloss/schemes.h`` and ``robustloss_fast/reference.py``
and is selected by the ``SCHEME`` constexpr, so each scheme is its own
specialisation with no branch in the inner loop.
"""

import triton
import triton.language as tl

from ..._common import Kernel

# The kernel ids the formulas are selected by, from the one id table
# (robustloss_fast._common.Kernel); jit functions read globals only as constexprs.
_CCE = tl.constexpr(int(Kernel.CCE))
_MAE = tl.constexpr(int(Kernel.MAE))
_MSE = tl.constexpr(int(Kernel.MSE))
_GCE = tl.constexpr(int(Kernel.GCE))
_DM = tl.constexpr(int(Kernel.DM))
_DM_NORMAL = tl.constexpr(int(Kernel.DM_NORMAL))
_DM_BETA = tl.constexpr(int(Kernel.DM_BETA))
_POLY = tl.constexpr(int(Kernel.POLY))
_FOCAL = tl.constexpr(int(Kernel.FOCAL))
_TAYLOR = tl.constexpr(int(Kernel.TAYLOR))
_CCE_LS = tl.constexpr(int(Kernel.CCE_LS))
_NCE = tl.constexpr(int(Kernel.NCE))
_NFL = tl.constexpr(int(Kernel.NFL))

_LN2 = tl.constexpr(0.6931471805599453)
# No infinity or NaN globals: Inductor re-emits a kernel's constexpr globals by
# their repr ("-inf" is no Python name), and Triton checks that a global keeps
# its value between launches (NaN != NaN). They are written inline as float("...").


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
def _row_prob(z_y, m, ls):
    """(log p, log q, p, q) from the margin d = (z_y - m) - ls, lse_nt = m + ls (SPEC §2).

    ``m + ls`` is never formed: at logits of 1e8 it would round ``ls`` away.
    """
    d = (z_y - m) - ls
    # A +inf target logit is not a valid input (SPEC §6: NaN for the row); the
    # margin alone would read it as p = 1.
    d = tl.where(z_y == float("inf"), float("nan"), d)
    logp = -_softplus(-d)
    logq = -_softplus(d)
    return logp, logq, tl.exp(logp), tl.exp(logq)


@triton.jit
def _log_weight(logp, logq, p, q, a, b, SCHEME: tl.constexpr):
    """log w(p) (SPEC §4): the batch softmax of these is the normalised emphasis."""
    tl.static_assert(SCHEME != _CCE_LS and SCHEME != _NCE and SCHEME != _NFL, "not a one-term scheme id")
    if SCHEME == _CCE:  # CCE: w = 2q
        lw = _LN2 + logq
    elif SCHEME == _MAE:  # MAE: w = 2pq
        lw = _LN2 + logp + logq
    elif SCHEME == _MSE:  # MSE: w = 4pq^2
        lw = 2.0 * _LN2 + logp + 2.0 * logq
    elif SCHEME == _GCE:  # GCE(k = a): w = 2 p^k q
        lw = _LN2 + a * logp + logq
    elif SCHEME == _DM:  # DM(lam = a, beta = b): w = exp(beta p^lam q)
        # p^0 = 1 even at p = 0 (0 * log 0 would be NaN).
        plam = tl.where(a == 0.0, 1.0, tl.exp(a * logp))
        lw = b * plam * q
    elif SCHEME == _DM_NORMAL:  # DMNormal(psi = a, beta = b): w = exp(-beta p (p - 2 psi))
        lw = -b * p * (p - 2.0 * a)
    elif SCHEME == _DM_BETA:  # DMBeta(alpha = a, eta = b): w = p^(alpha-1) q^(eta-1); 0 * log 0 avoided
        t1 = tl.where(a == 1.0, 0.0, (a - 1.0) * logp)
        t2 = tl.where(b == 1.0, 0.0, (b - 1.0) * logq)
        lw = t1 + t2
    elif SCHEME == _POLY:  # Poly (Poly-1, RCE, SCE): L = -a log p + b q, w = 2q (a + b p)
        # a + b p from the smaller of p and q (schemes.h ``poly_factor``): exact as p -> 1
        # when b = -a (Poly-1 with epsilon = -1) and as p -> 0 when a = 0 (RCE).
        lw = _LN2 + logq + tl.log(tl.where(p >= q, (a + b) - b * q, a + b * p))
    elif SCHEME == _FOCAL:  # Focal(gamma = a)
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
    elif SCHEME == _CCE:
        x = -logp
    elif SCHEME == _MAE:
        x = q
    elif SCHEME == _MSE:
        x = q * q
    elif SCHEME == _GCE:
        x = -_expm1(a * logp) / a
    elif SCHEME == _POLY:
        # -a log p + b q = a (-log p - q) + (a + b) q: the first term without cancellation.
        x = tl.where(a == 0.0, 0.0, a * _neglogp_minus_q(logp, q)) + (a + b) * q
    elif SCHEME == _FOCAL:
        x = tl.where(a == 0.0, -logp, -tl.exp(a * logq) * logp)
    elif SCHEME == _TAYLOR:
        # Horner form of sum_{k=1..t} q^k / k, k from t down to 1.
        t = a.to(tl.int32)
        x = tl.zeros_like(q)
        for i in range(0, t):
            x = q * (1.0 / (t - i).to(q.dtype) + x)
    else:
        x = tl.exp(lw) * (-logp)
    return x


@triton.jit
def _neglogp_minus_q(logp, q):
    """-log p - q = sum_{k >= 2} q^k / k (schemes.h ``neglogp_minus_q``).

    Formed directly it cancels to q^2/2 as p -> 1, so for q < 1/4 the series is
    summed (30 terms: 0.25^30 is below double's epsilon); above, the subtraction
    loses at most 3 bits.
    """
    h = tl.zeros_like(q) + 1.0 / 32.0
    k = tl.zeros_like(q) + 31.0  # the divisor in q's dtype (float64 keeps its 1/k exact)
    for _ in range(0, 30):
        h = 1.0 / k + q * h
        k -= 1.0
    return tl.where(q < 0.25, q * q * h, -logp - q)


@triton.jit
def _two_term_row(logp, p, q, lam, U, u_y, n_classes, a, b, SCHEME: tl.constexpr):
    """(x, alpha, beta, gamma) of a two-term scheme (schemes.h ``two_term_row``).

    With Lambda = sum_k u_k (-log P_k) (``lam``, see rows_kernel), A = p dL/dp and
    l = dL/dLambda: alpha = q (U l - A), beta = -l, gamma = q A + l (U p - u_y).
    """
    tl.static_assert(SCHEME == _CCE_LS or SCHEME == _NCE, "not a two-term scheme id with the spread")
    nlp = -logp
    if SCHEME == _CCE_LS:  # label smoothing: (1 - eps) u_y (-log p) + (eps / C) Lambda, eps = a
        sm = a / n_classes
        hard = (1.0 - a) * u_y
        # A zero factor adds nothing even against an infinite term (0 * inf would be NaN).
        x = tl.where(hard == 0.0, 0.0, hard * nlp) + tl.where(a == 0.0, 0.0, sm * lam)
        alpha = q * (U * sm + hard)
        beta = tl.zeros_like(q) - sm
        gamma = -q * hard + sm * (U * p - u_y)
    else:  # NCE / APL: a (-log p) / Lambda + b q; Lambda = 0 (C = 1) or inf (a masked class): NCE 0
        # schemes.h with (C, 1) written as (U, u_y): the same for u = 1 (all the forward
        # op passes), and the reference's rows for any u.
        zero_lam = lam == 0.0
        safe = tl.where(zero_lam, 1.0, lam)
        nce = tl.where(zero_lam, 0.0, nlp / safe)
        inv = tl.where(zero_lam, 0.0, 1.0 / safe)
        pq = p * q
        x = a * nce + b * q
        alpha = a * q * (1.0 - U * nce) * inv + b * pq
        beta = a * nce * inv
        gamma = -a * (q + nce * (U * p - u_y)) * inv - b * pq
        # A masked target (p = 0): NCE's limit is 1, with no gradient (Lambda = inf - inf above).
        masked = nlp == float("inf")
        x = tl.where(masked, a + b * q, x)
        alpha = tl.where(masked, 0.0, alpha)
        beta = tl.where(masked, 0.0, beta)
        gamma = tl.where(masked, 0.0, gamma)
    return x, alpha, beta, gamma


@triton.jit
def _focal_terms(g, l, P, Q):
    """NFL's per-class (F, h) = (-Q^g l, Q^g (g P l / Q - 1)) from l = log P, P, Q = 1 - P (schemes.h ``focal_terms``).

    Limits: P = 0 (a masked class, l = -inf): P l := 0, so F = inf, h = -1;
    Q = 0: P l / Q := -P; g = 0: Q^g := 1 (even at Q = 0).
    """
    qg = tl.where(g == 0.0, 1.0, tl.exp(g * tl.log(Q)))
    pl = tl.where(P == 0.0, 0.0, P * l)
    pl_over_q = tl.where(Q > 0.0, pl / Q, -P)
    return -qg * l, qg * (g * pl_over_q - 1.0)


@triton.jit
def _focal_terms_of_logit(g, z, m, ls):
    """(P, F, h) of a non-target class from its logit: l = (z - m) - ls, P = e^l, Q = -expm1(l)."""
    l = (z - m) - ls
    P = tl.exp(l)
    F, h = _focal_terms(g, l, P, -_expm1(l))
    return P, F, h


@triton.jit
def _nfl_row(g, b, logp, p, q, sum_F, sum_h):
    """(x, alpha, beta, gamma) of NFL(g) + b q in P-form (schemes.h ``nfl_row``).

    With S = sum_k F_k and H = sum_k h_k (the sums over the non-target classes
    plus the target's terms): alpha = -h_y / S + F_y H / S^2 + b p,
    beta = -F_y / S^2, gamma = h_y q / S - (F_y / S^2)(h_y - p H) - b p q.
    S = 0 (C = 1) or inf (a masked class): NFL 0 and no NFL gradient.
    """
    F_y, h_y = _focal_terms(g, logp, p, q)
    S = sum_F + F_y
    H = sum_h + h_y
    zero_s = S == 0.0
    inv = tl.where(zero_s, 0.0, 1.0 / tl.where(zero_s, 1.0, S))
    nfl = F_y * inv
    x = nfl + b * q
    alpha = -h_y * inv + nfl * inv * H + b * p
    beta = -nfl * inv
    gamma = h_y * q * inv - nfl * inv * (h_y - p * H) - b * p * q
    # A masked target (F_y = inf): NFL's limit is 1, with no gradient (inf * 0 above).
    masked = F_y == float("inf")
    x = tl.where(masked, 1.0 + b * q, x)
    alpha = tl.where(masked, 0.0, alpha)
    beta = tl.where(masked, 0.0, beta)
    gamma = tl.where(masked, 0.0, gamma)
    return x, alpha, beta, gamma


@triton.jit
def _exp_elem(x):
    """exp(x) in the per-element loops: exp2(x log2 e), the hardware ex2 alone.

    Triton's exp is the same ex2 plus a compare and two predicated multiplies
    that keep results below 2^-126 from flushing to 0; a gradient entry or a
    term of the row's sum that small changes nothing that is compared. float64
    keeps exp: log2 e would be rounded to float32 here.
    """
    if x.dtype == tl.float64:
        return tl.exp(x)
    else:
        return tl.exp2(x * 1.4426950408889634)


@triton.jit
def rows_kernel(
    logits_ptr,
    target_ptr,
    u_ptr,
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
    SPREAD: tl.constexpr,
    P_FORM: tl.constexpr,
    NORMALISED: tl.constexpr,
    HAS_U: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """rows[i] = (m, ls, log w, x, alpha, beta, gamma) for BLOCK_N rows; (-inf, 0, -inf, 0, 0, 0, 0) if ignored.

    SPREAD and P_FORM are the id classes of SCHEME (``Kernel.needs_spread``,
    ``Kernel.p_form``): the two-term schemes with the spread reduction (label
    smoothing, NCE), and NFL, which writes lse = m + ls in columns 0-1:
    P-form, see the module docstring.

    The scheme parameters arrive as float32 pairs (hi + lo) because Triton
    passes Python floats as float32; their sum carries 48 bits, enough for the
    float64 path. A target outside [0, C) (GPU tensors: nothing checks it on the
    host) gives a NaN row marked with ls = +inf and reads nothing. ``u_ptr`` (the smoothing
    weights u, accumulator type) is read only when HAS_U, by two-term schemes.
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
    z_y = tl.load(row_base + y_safe, mask=live, other=0.0).to(acc)

    # Online logsumexp over the non-target lanes: running max m and sum s of
    # exp(z - m). Per element only the target's select, the max and the exp:
    # NaN and +inf lanes are not masked but left to poison s (a NaN adds
    # exp(NaN - m), a +inf becomes m and adds exp(inf - inf)), whichever way
    # the backend's max treats NaN (the GPU's skips it, the interpreter's keeps
    # it), and the row is marked bad from s and m after the loop. Columns are
    # the loop's own integer type (int32 unless C needs int64); the target's
    # position in a block is compared in int32.
    m = tl.full([BLOCK_N], float("-inf"), acc)
    s = tl.zeros([BLOCK_N], acc)
    lanes = tl.arange(0, BLOCK_C)
    for start in range(0, n_cols, BLOCK_C):
        cols = start + lanes
        mask = live[:, None] & (cols < n_cols)[None, :]
        z = tl.load(row_base[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(acc)
        y_in = tl.minimum(tl.maximum(y_safe - start, -1), BLOCK_C).to(tl.int32)
        z = tl.where(lanes[None, :] == y_in[:, None], float("-inf"), z)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # While the running max is still -inf nothing has been summed, and
        # exp(-inf - (-inf)) would be NaN: take the terms against 0 instead.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * _exp_elem(m - m_ref) + tl.sum(_exp_elem(z - m_ref[:, None]), axis=1)
        m = m_new
    bad = (s != s) | (m != m) | (m == float("inf"))
    # lse_nt = m + ls, kept in its two parts (no finite non-target logit: m = -inf, ls = 0).
    ls = tl.where(m == float("-inf"), 0.0, tl.log(s))
    # SPEC §6: a NaN or +inf logit, the target's included, makes the whole row NaN.
    row_nan = bad | (z_y != z_y) | (z_y == float("inf"))
    m = tl.where(row_nan, float("nan"), m)
    ls = tl.where(row_nan, float("nan"), ls)
    logp, logq, p, q = _row_prob(z_y, m, ls)
    if P_FORM:
        # NFL: lse = m + (ls - log q) (z_y + 0 where no non-target logit is finite:
        # log q = -inf there), then sum F and h over the non-target classes.
        dead = m == float("-inf")
        m_p = tl.where(dead, z_y, m)
        ls_p = tl.where(dead, 0.0, ls - logq)
        sum_F = tl.zeros([BLOCK_N], acc)
        sum_h = tl.zeros([BLOCK_N], acc)
        for start in range(0, n_cols, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
            mask = live[:, None] & (cols < n_cols)[None, :]
            z = tl.load(row_base[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(acc)
            _, F, h = _focal_terms_of_logit(a, z, m_p[:, None], ls_p[:, None])
            take = mask & (cols[None, :] != y_safe[:, None])
            sum_F += tl.sum(tl.where(take, F, 0.0), axis=1)
            sum_h += tl.sum(tl.where(take, h, 0.0), axis=1)
        x, g_alpha, g_beta, g_gamma = _nfl_row(a, b, logp, p, q, sum_F, sum_h)
        lw = tl.log(2.0 * tl.abs(g_gamma))
        m = m_p  # columns 0-1 hold lse (P-form)
        ls = ls_p
    elif SPREAD:
        # Lambda = sum_k u_k (-log P_k) = spread + U lseM with spread = sum_k u_k (M - z_k),
        # M = max(m, z_y) and lseM = log sum_j exp(z_j - M) in [0, log C] (schemes.h
        # two_term_lambda): non-negative terms, no cancellation. A second pass over the
        # row, since M is known only now. U = sum_k u_k.
        ref = tl.where(z_y > m, z_y, m)
        spread = tl.zeros([BLOCK_N], acc)
        U = tl.sum(tl.zeros([BLOCK_C], acc), axis=0)
        for start in range(0, n_cols, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C).to(tl.int64)
            col_ok = cols < n_cols
            mask = live[:, None] & col_ok[None, :]
            z = tl.load(row_base[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(acc)
            diff = ref[:, None] - z
            if HAS_U:
                u = tl.load(u_ptr + cols, mask=col_ok, other=0.0).to(acc)
                U += tl.sum(u, axis=0)
                # u_k = 0 adds 0 even for a masked class (0 * inf would be NaN).
                term = tl.where(mask & (u[None, :] != 0.0), u[None, :] * diff, 0.0)
            else:
                term = tl.where(mask, diff, 0.0)
            spread += tl.sum(term, axis=1)
        if HAS_U:
            u_y = tl.load(u_ptr + y_safe, mask=live, other=0.0).to(acc)
        else:
            U = tl.cast(n_cols, acc)
            u_y = tl.full([BLOCK_N], 1.0, acc)
        lse_m = tl.where(z_y > m, -logp, ls - logq)
        lam = spread + tl.where(U == 0.0, 0.0, U * lse_m)
        x, g_alpha, g_beta, g_gamma = _two_term_row(logp, p, q, lam, U, u_y, tl.cast(n_cols, acc), a, b, SCHEME)
        # log w = twice the target's gradient magnitude (= w for a one-term scheme).
        lw = tl.log(2.0 * tl.abs(g_gamma))
    else:
        lw = _log_weight(logp, logq, p, q, a, b, SCHEME)
        x = _row_x(lw, logp, logq, q, a, b, SCHEME, NORMALISED)
        # SPEC §3: no finite non-target logit (C = 1, all masked) -> G = 0.
        # Derivative-normalised rows leave them 0: the cross-row step uses log w.
        if NORMALISED:
            g_alpha = tl.zeros_like(lw)
        else:
            g_alpha = tl.where(m == float("-inf"), 0.0, 0.5 * tl.exp(lw))
        g_beta = tl.zeros_like(g_alpha)
        g_gamma = -g_alpha

    # A bad target (possible only where the host check is off: GPU tensors) reads
    # nothing and marks its row with ls = +inf, which no valid row has; the op
    # turns the mark into a device-side assertion.
    m = tl.where(valid, tl.where(in_range, m, float("nan")), float("-inf"))
    ls = tl.where(valid, tl.where(in_range, ls, float("inf")), 0.0)
    lw = tl.where(valid, tl.where(in_range, lw, float("nan")), float("-inf"))
    x = tl.where(valid, tl.where(in_range, x, float("nan")), 0.0)
    g_alpha = tl.where(valid, tl.where(in_range, g_alpha, float("nan")), 0.0)
    g_beta = tl.where(valid, tl.where(in_range, g_beta, float("nan")), 0.0)
    g_gamma = tl.where(valid, tl.where(in_range, g_gamma, float("nan")), 0.0)
    out = rows_ptr + rows * 7  # RowCol: (m, ls, log w, x, alpha, beta, gamma)
    tl.store(out, m, mask=row_ok)
    tl.store(out + 1, ls, mask=row_ok)
    tl.store(out + 2, lw, mask=row_ok)
    tl.store(out + 3, x, mask=row_ok)
    tl.store(out + 4, g_alpha, mask=row_ok)
    tl.store(out + 5, g_beta, mask=row_ok)
    tl.store(out + 6, g_gamma, mask=row_ok)


@triton.jit
def backward_kernel(
    grad_ptr,
    grad_stride,
    logits_ptr,
    target_ptr,
    stats_ptr,
    u_ptr,
    out_ptr,
    n_rows,
    n_cols,
    stride_row,
    ignore_index,
    a_hi,
    a_lo,
    P_FORM: tl.constexpr,
    HAS_U: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[i, j] = g_i (alpha_i r_ij + beta_i u_j) (j != y_i), g_i gamma_i at y_i, on a BLOCK_N x BLOCK_C tile.

    P_FORM (NFL, focal gamma = a_hi + a_lo): stats rows hold lse = m + ls and
    off the target out = g_i (alpha_i P_ij + beta_i h_ij) with
    P_ij = exp((z_ij - m_i) - ls_i) and h from ``_focal_terms``; u is not read.

    ``stats`` rows are (m, ls, alpha, beta, gamma), lse_nt = m + ls; ``u`` is
    read only when HAS_U (else 1); ``grad_stride`` is 0 for a scalar upstream
    gradient. Ignored rows are exact zeros and read no logits; a row with no
    finite non-target logit (m = -inf: C = 1 or all masked) has r = 0; a NaN
    m makes the whole row NaN (whatever its coefficients). The target lane is
    selected, never multiplied: its exp may overflow.
    """
    acc = stats_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    # The tile's first column in int64, its lanes in int32: per element only
    # int32 compares (a column index past 2^31 is only ever a row offset here).
    col0 = tl.program_id(1).to(tl.int64) * BLOCK_C
    lanes = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    col_ok = lanes < tl.minimum(n_cols - col0, BLOCK_C).to(tl.int32)
    y = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int64)
    valid = row_ok & (y != ignore_index)
    y_in = tl.minimum(tl.maximum(y - col0, -1), BLOCK_C).to(tl.int32)
    st = stats_ptr + rows * 5  # StatCol: (m, ls, alpha, beta, gamma)
    m = tl.load(st, mask=valid, other=0.0)
    ls = tl.load(st + 1, mask=valid, other=0.0)
    g = tl.load(grad_ptr + rows * grad_stride, mask=valid, other=0.0).to(acc)
    ga = g * tl.load(st + 2, mask=valid, other=0.0)
    gb = g * tl.load(st + 3, mask=valid, other=0.0)
    gy = g * tl.load(st + 4, mask=valid, other=0.0)
    # A NaN row is NaN everywhere, its target too (off the target z - m is NaN already).
    gy = tl.where(m != m, float("nan"), gy)

    z = tl.load(
        (logits_ptr + rows * stride_row + col0)[:, None] + lanes[None, :],
        mask=valid[:, None] & col_ok[None, :],
        other=float("-inf"),
    ).to(acc)
    if P_FORM:
        gam = tl.cast(a_hi, acc) + tl.cast(a_lo, acc)
        P, _, h = _focal_terms_of_logit(gam, z, m[:, None], ls[:, None])
        # Ignored rows load their coefficients as 0 but their -inf logits'
        # focal terms need not be finite: select.
        off = tl.where(valid[:, None], ga[:, None] * P + gb[:, None] * h, 0.0)
    else:
        # Ignored rows load their coefficients as 0 and their logits as -inf:
        # every term below is 0 without a select.
        # g alpha r = (g alpha e^-ls) e^(z - m): the row's factors folded once, per
        # element one exp. No finite non-target logit (m = -inf): r = 0, with every
        # non-target z = -inf and the terms taken against 0 (-inf - -inf is NaN).
        dead = m == float("-inf")
        gr = tl.where(dead, 0.0, ga * tl.exp(-ls))
        m_ref = tl.where(dead, 0.0, m)
        r_part = gr[:, None] * _exp_elem(z - m_ref[:, None])
        if HAS_U:
            u = tl.load(u_ptr + col0 + lanes, mask=col_ok, other=0.0).to(acc)
            off = r_part + gb[:, None] * u[None, :]
        else:
            off = r_part + gb[:, None]
    out = tl.where(lanes[None, :] == y_in[:, None], gy[:, None], off)
    tl.store(
        (out_ptr + rows * n_cols + col0)[:, None] + lanes[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )
