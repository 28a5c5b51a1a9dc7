"""The pure-PyTorch reference backend: SPEC written out in tensor ops.

This is the oracle of every parity test, so it favours clarity over speed and
shares no code with the kernels. It implements the same ops as every backend,
on canonical 2-D rows:

``forward(logits (N, C), target (N,), spec, weight, sample_weight) -> (value, stats)``
    ``value`` is the reduced loss (``(N,)`` for ``reduction="none"``);
    ``stats`` is ``(N, 5)``: per row ``(m, ls)``, the logsumexp over the
    non-target classes ``lse_nt = m + ls`` in its two parts, and
    ``(alpha, beta, gamma)``, the final gradient's coefficients.

``backward(grad, logits, target, stats, spec, u) -> grad_logits``
    ``grad_logits[i, j] = g_i (alpha_i r_ij + beta_i u_j)`` for ``j != y_i`` and
    ``g_i gamma_i`` at ``y_i``, with ``r_ij = exp((z_ij - m_i) - ls_i)`` (SPEC §3;
    0 for a row with no finite non-target logit) and ``u`` the class weights
    for label smoothing (else 1); zero for ignored rows. For the schemes of SPEC §4 (one-term)
    ``alpha = -gamma = coef = s_i w_i / 2 (/ D)`` and ``beta = 0``: the
    gradient ``coef (r - e_y)``.

Math (SPEC §2-§5), per row with margin ``d = (z_y - m) - ls``:
``log p = -softplus(-d)``, ``log q = -softplus(d)`` (q never formed as 1 - p);
``m + ls`` is never formed, so logits of 1e8 lose nothing (spec §2.2);
the emphasis is handled as ``log w`` so that the derivative normaliser
``D = sum |s_i| w_i`` is a log-sum-exp over the batch and cannot overflow.
Two-term schemes (label-smoothed CCE, NCE/APL) are functions of ``p`` and
``Lambda = sum_k u_k (-log P_k)``; their rows are derived in docs/math.md.
"""

from __future__ import annotations

import math

import torch

from ._common import NORMALIZE_TWO_TERM_MSG, Kernel, KernelSpec, Reduction, RowCol, StatCol, acc_dtype, check_target

K = Kernel


def _softplus(x: torch.Tensor) -> torch.Tensor:
    # Exact log(1 + e^x); F.softplus's threshold would drop e^-x for x > 20.
    return x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))


def log_weight(kernel_id: int, a: float, b: float, logp, logq, p, q) -> torch.Tensor:
    """log w(p) of SPEC §4 for one kernel formula (NaN for a NaN row, whatever the formula)."""
    lw = _log_weight(kernel_id, a, b, logp, logq, p, q)
    return torch.where(torch.isnan(p), p, lw)


def _log_weight(kernel_id: int, a: float, b: float, logp, logq, p, q) -> torch.Tensor:
    ln2 = math.log(2.0)
    if kernel_id == K.CCE:
        return ln2 + logq
    if kernel_id == K.MAE:
        return ln2 + logp + logq
    if kernel_id == K.MSE:
        return 2 * ln2 + logp + 2 * logq
    if kernel_id == K.GCE:
        return ln2 + a * logp + logq
    if kernel_id == K.DM:
        plam = torch.ones_like(p) if a == 0 else torch.exp(a * logp)
        return b * plam * q
    if kernel_id == K.DM_NORMAL:
        return -b * p * (p - 2 * a)
    if kernel_id == K.DM_BETA:
        t1 = torch.zeros_like(logp) if a == 1 else (a - 1) * logp
        t2 = torch.zeros_like(logq) if b == 1 else (b - 1) * logq
        return t1 + t2
    # Loss-defined peers: log of w = 2q (-p L'(p)).
    if kernel_id == K.POLY:
        # a + b p from the smaller of p and q: exact as p -> 1 when b = -a, as p -> 0 when a = 0.
        return ln2 + logq + torch.log(torch.where(p >= q, (a + b) - b * q, a + b * p))
    if kernel_id == K.FOCAL:
        # p >= q: w = 2 q^(g+1) (1 + g p (-log p) / q) in logs (q may underflow, log q does not);
        # p < q: w = 2 q^g (q - g p log p).
        ratio = torch.where(q > 0, -logp / q, torch.ones_like(q))
        confident = ln2 + (a + 1) * logq + torch.log1p(a * p * ratio)
        plogp = torch.where(p == 0, torch.zeros_like(p), p * logp)
        mod = torch.zeros_like(logq) if a == 0 else a * logq
        return torch.where(p >= q, confident, ln2 + mod + torch.log(q - a * plogp))
    if kernel_id == K.TAYLOR:
        return ln2 + logq + torch.log(-torch.expm1(a * logq))
    raise ValueError(f"unknown kernel id {kernel_id}")


def neglogp_minus_q(logp, q):
    """-log p - q = sum_{k >= 2} q^k / k: the series below q = 1/4 (the difference cancels to q^2/2)."""
    h = torch.full_like(q, 1.0 / 32)
    for k in range(31, 1, -1):
        h = 1.0 / k + q * h
    return torch.where(q < 0.25, q * q * h, -logp - q)


def loss_value(kernel_id: int, a: float, b: float, logp, logq, p, q) -> torch.Tensor:
    """L(p) of a loss-defined scheme, accurate as p -> 1."""
    if kernel_id == K.CCE:
        return -logp
    if kernel_id == K.MAE:
        return q
    if kernel_id == K.MSE:
        return q * q
    if kernel_id == K.GCE:
        return -torch.expm1(a * logp) / a
    if kernel_id == K.POLY:
        # -a log p + b q = a (-log p - q) + (a + b) q, the first term without cancellation.
        return (torch.zeros_like(logp) if a == 0 else a * neglogp_minus_q(logp, q)) + (a + b) * q
    if kernel_id == K.FOCAL:
        return -logp if a == 0 else -torch.exp(a * logq) * logp
    if kernel_id == K.TAYLOR:
        return sum(q**k / k for k in range(1, int(a) + 1))
    raise ValueError(f"kernel id {kernel_id} is not loss-defined")


def lse_parts(z: torch.Tensor, mask: torch.Tensor):
    """``(m, ls)`` of each row's logsumexp over the lanes where ``mask`` is False: ``lse = m + ls``.

    ``m`` is the largest such logit and ``ls = log sum exp(z - m)`` lies in
    ``[0, log C]``; the sum is left to the caller, which subtracts ``m`` from
    a logit first (exact for nearby logits) and ``ls`` after. A row with no
    finite lane gets ``(-inf, 0)``.
    """
    zm = z.masked_fill(mask, -math.inf)
    m = zm.max(dim=1).values
    dead = m == -math.inf
    m_safe = torch.where(dead, torch.zeros_like(m), m)
    ls = torch.log(torch.exp(zm - m_safe[:, None]).sum(1))
    return m, torch.where(dead, torch.zeros_like(ls), ls)


def row_probs(z: torch.Tensor, y: torch.Tensor):
    """(z_y, m, ls, log p, log q, p, q) of every row (SPEC §2), in z's dtype; ``lse_nt = m + ls``."""
    n, c = z.shape
    onehot = torch.zeros((n, c), dtype=torch.bool, device=z.device)
    onehot.scatter_(1, y[:, None], True)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    m, ls = lse_parts(z, onehot)
    # SPEC §6: NaN or +inf anywhere in a row makes that row NaN (the max would
    # turn a +inf non-target into lse_nt = +inf and p = 0).
    bad = torch.isnan(z).any(1) | torch.isposinf(z).any(1)
    nan = torch.full_like(m, math.nan)
    m, ls = torch.where(bad, nan, m), torch.where(bad, nan, ls)
    d = (z_y - m) - ls
    logp = -_softplus(-d)
    logq = -_softplus(d)
    return z_y, m, ls, logp, logq, logp.exp(), logq.exp()


def rows_from_probs(kernel_id, a, b, valid, m, ls, logp, logq, p, q, normalised):
    """The op ``robust_ce_rows`` of a one-term scheme from row probabilities: (N, 7).

    Columns ``(m, ls, log w, x, alpha, beta, gamma)``: ``x`` is ``-log p``
    under derivative normalisation, else the row's value (``L(p)`` or
    ``w (-log p)``); the row's gradient is ``(w/2)(r - e_y)``, so
    ``alpha = w/2, beta = 0, gamma = -w/2`` (all 0 where no non-target logit
    is finite, SPEC §3, and under derivative normalisation, where the
    cross-row step works from ``log w``). Ignored rows are written as the
    compiled op writes them: ``(-inf, 0, -inf, 0, 0, 0, 0)``.
    """
    lw = log_weight(kernel_id, a, b, logp, logq, p, q)
    if normalised:
        x = -logp
    elif Kernel(kernel_id).loss_defined:
        x = loss_value(kernel_id, a, b, logp, logq, p, q)
    else:
        x = lw.exp() * (-logp)
    # SPEC §3: no finite non-target logit (C = 1, all masked) -> G = 0. Derivative-normalised
    # rows leave (alpha, beta, gamma) at 0: the cross-row step derives the gradient from log w.
    dead = (m == -math.inf) | normalised
    half = torch.where(dead, torch.zeros_like(lw), lw.exp() / 2)
    return _pack_rows(valid, m, ls, lw, x, half, torch.zeros_like(half), -half)


def _pack_rows(valid, m, ls, lw, x, alpha, beta, gamma):
    ninf = torch.full_like(lw, -math.inf)
    zero = torch.zeros_like(lw)
    cols = [torch.where(valid, m, ninf), torch.where(valid, ls, zero), torch.where(valid, lw, ninf)]
    cols += [torch.where(valid, t, zero) for t in (x, alpha, beta, gamma)]
    return torch.stack(cols, dim=1)


def two_term_rows(kernel_id, a, b, z, y, valid, m, ls, logp, logq, p, q, smooth_weight):
    """The rows (N, 7) of a two-term scheme, from its definition.

    ``Lambda = sum_k u_k (-log P_k)`` (``u = smooth_weight`` for label
    smoothing, else 1; a class with ``u_k = 0`` adds nothing even when
    masked). For ``L(p, Lambda)`` with ``A = p dL/dp`` and ``l = dL/dLambda``:
    ``alpha = q (U l - A)``, ``beta = -l``, ``gamma = q A + l (U p - u_y)``.
    """
    n, c = z.shape
    u = torch.ones(c, dtype=z.dtype, device=z.device) if smooth_weight is None else smooth_weight.to(z.dtype)
    U = u.sum()
    u_y = u[y]
    neglogp_all = -torch.log_softmax(z, dim=1)
    lam = torch.where(u == 0, torch.zeros_like(neglogp_all), u * neglogp_all).sum(1)
    bad = torch.isnan(m)
    lam = torch.where(bad, m, lam)
    nlp = -logp
    if kernel_id == K.CCE_LS:
        eps, sm = a, a / c
        hard = (1 - eps) * u_y
        # A zero factor adds nothing even against an infinite term (0 * inf would be NaN).
        x = torch.where(hard == 0, torch.zeros_like(nlp), hard * nlp) + (sm * lam if eps != 0 else 0.0)
        A, lgrad = -hard, torch.full_like(nlp, sm)
    elif kernel_id == K.NCE:
        # a * NCE + b * MAE-like q; NCE = 0 where Lambda = 0 (C = 1) or inf (a masked class).
        safe = torch.where(lam == 0, torch.ones_like(lam), lam)
        nce = torch.where(lam == 0, torch.zeros_like(lam), nlp / safe)
        inv = torch.where(lam == 0, torch.zeros_like(lam), 1 / safe)
        # A masked target (p = 0): NCE's limit is 1, with no NCE gradient.
        masked = nlp == math.inf
        nce = torch.where(masked, torch.ones_like(nce), nce)
        inv = torch.where(masked, torch.zeros_like(inv), inv)
        x = a * nce + b * q
        A = -a * inv - b * p
        lgrad = -a * nce * inv
    else:
        raise ValueError(f"kernel id {kernel_id} is not a two-term scheme")
    alpha = q * (U * lgrad - A)
    beta = -lgrad
    gamma = q * A + lgrad * (U * p - u_y)
    lw = torch.log(2 * gamma.abs())
    return _pack_rows(valid, m, ls, lw, x, alpha, beta, gamma)


def focal_terms(g, logP, P, Q):
    """NFL's per-class ``F = -Q^g log P`` and ``h = P dF/dP = Q^g (g P log P / Q - 1)``, with their limits.

    ``P = 0`` (a masked class): ``F = inf``, ``h = -1``; ``Q = 0``: ``P log P / Q -> -1``.
    """
    qg = torch.ones_like(Q) if g == 0 else torch.exp(g * torch.log(Q))
    plogp = torch.where(P == 0, torch.zeros_like(P), P * logP)
    ratio = torch.where(Q > 0, plogp / torch.where(Q > 0, Q, torch.ones_like(Q)), -P)
    return -qg * logP, qg * (g * ratio - 1)


def nfl_rows(a, b, z, y, valid, m, ls, logp, logq, p, q):
    """The rows (N, 7) of NFL(gamma = a) + b q, in P-form (columns 0-1 hold lse, not lse_nt).

    ``L = F_y / S + b q`` with ``S = sum_k F_k``, ``H = sum_k h_k``:
    ``dL/dz_j = alpha P_j + beta h_j`` (``j != y``) with
    ``alpha = -h_y / S + F_y H / S^2 + b p`` and ``beta = -F_y / S^2``; the
    target's ``gamma = h_y q / S - F_y (h_y - p H) / S^2 - b p q``. ``S = 0``
    (C = 1) or ``inf`` (a masked class): NFL 0, no NFL gradient.
    """
    n, c = z.shape
    # lse = m + (ls - log q), or z_y (+ 0) where no non-target logit is finite (log q = -inf there).
    dead = m == -math.inf
    m_p = torch.where(dead, z.gather(1, y[:, None]).squeeze(1), m)
    ls_p = torch.where(dead, torch.zeros_like(ls), ls - logq)
    logP = (z - m_p[:, None]) - ls_p[:, None]
    F_all, h_all = focal_terms(a, logP, logP.exp(), -torch.expm1(logP))
    onehot = torch.zeros((n, c), dtype=torch.bool, device=z.device)
    onehot.scatter_(1, y[:, None], True)
    zero = torch.zeros_like(F_all)
    F_y, h_y = focal_terms(a, logp, p, q)
    S = torch.where(onehot, zero, F_all).sum(1) + F_y
    H = torch.where(onehot, zero, h_all).sum(1) + h_y
    S = torch.where(torch.isnan(m), m, S)
    inv = torch.where(S == 0, torch.zeros_like(S), 1 / torch.where(S == 0, torch.ones_like(S), S))
    # A masked target (F_y = inf): NFL's limit is 1, with no NFL gradient.
    masked = F_y == math.inf
    inv = torch.where(masked, torch.zeros_like(inv), inv)
    nfl = torch.where(masked, torch.ones_like(F_y), F_y * inv)
    x = nfl + b * q
    alpha = -h_y * inv + nfl * inv * H + b * p
    beta = -nfl * inv
    gamma = h_y * q * inv - nfl * inv * (h_y - p * H) - b * p * q
    return _pack_rows(valid, m_p, ls_p, torch.log(2 * gamma.abs()), x, alpha, beta, gamma)


def _rounded(v: float, dtype: torch.dtype) -> float:
    return float(torch.tensor(v, dtype=torch.float64).to(dtype))


def rows(logits, target, spec: KernelSpec, u=None):
    """The op ``robust_ce_rows`` in tensor ops (checks the targets outside ``torch.compile``).

    ``u`` is the op's ``smooth_weight``: the class weights of label smoothing
    (or any ``u`` of the two-term formulas with the spread), None for all 1.
    """
    # On the CPU the check is free; on an accelerator it would be a host sync
    # (indexing with a bad target fails there with PyTorch's own device-side
    # assertion instead, or earlier where set_validate_targets asks for it).
    if target.device.type == "cpu" and not torch.compiler.is_compiling():
        check_target(target, logits.shape[1], spec.ignore_index)
    if spec.two_term and spec.normalised:
        raise ValueError(NORMALIZE_TWO_TERM_MSG)
    acc = acc_dtype(logits.dtype)
    # The parameters as the kernels see them: rounded to the accumulation dtype
    # (label_smoothing = 1e-134 is 0 in float32, and is then plain CE).
    kernel_id, a, b = spec.kernel, _rounded(spec.a, acc), _rounded(spec.b, acc)
    valid = target != spec.ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    z = logits.to(acc)
    _, m, ls, logp, logq, p, q = row_probs(z, y)
    if spec.p_form:
        return nfl_rows(a, b, z, y, valid, m, ls, logp, logq, p, q)
    if spec.two_term:
        return two_term_rows(kernel_id, a, b, z, y, valid, m, ls, logp, logq, p, q, u)
    return rows_from_probs(kernel_id, a, b, valid, m, ls, logp, logq, p, q, spec.normalised)


def forward(logits, target, spec: KernelSpec, weight=None, sample_weight=None):
    n, c = logits.shape
    acc = acc_dtype(logits.dtype)
    # Label smoothing keeps PyTorch's convention: class weights weigh every
    # class of the smoothing sum, so they live inside the row, not in s_i.
    inside = spec.weight_in_rows
    r = rows(logits, target, spec, weight.to(acc) if inside and weight is not None else None)
    row_max, lw, x = r[:, RowCol.M], r[:, RowCol.LOGW], r[:, RowCol.X]
    valid = target != spec.ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))

    s = torch.ones(n, dtype=acc, device=logits.device)
    cw = torch.ones(n, dtype=acc, device=logits.device)
    if weight is not None:
        cw = weight.to(acc)[y]
        if not inside:
            s = s * cw
    if sample_weight is not None:
        s = s * sample_weight.to(acc)
    zero = torch.zeros((), dtype=acc, device=logits.device)
    s = torch.where(valid, s, zero)

    # Rows with s = 0 contribute 0, even where their raw value overflowed (0 * inf).
    counts = valid & (s != 0)
    sx = torch.where(counts, s * x, zero)

    if spec.normalised:
        # Normalised weights are a softmax of log w over the batch (SPEC §5):
        # shift by the largest log-weight among rows that count.
        lw_active = torch.where(counts, lw, torch.full_like(lw, -math.inf))
        m = torch.cat([lw_active, torch.full((1,), -math.inf, dtype=acc, device=logits.device)]).max()
        m = torch.where(m == -math.inf, zero, m)
        e = torch.where(counts, torch.exp(lw - m), zero)
        denom = (s.abs() * e).sum()
        ok = denom != 0
        safe = torch.where(ok, denom, torch.ones_like(denom))
        # An infinite x keeps its infinity where its weight underflowed (only an exact w = 0 gives NaN).
        keep = torch.isinf(x) & (lw > -math.inf) & (e == 0)
        terms = torch.where(keep, torch.where(s > 0, x, -x), s * e * x)
        value = torch.where(ok, (torch.where(counts, terms, zero)).sum() / safe, zero)
        # G = 0 for a row with no finite non-target logit (SPEC §3); it still counts in D.
        coef = torch.where(ok & counts & (row_max != -math.inf), s * e / (2 * safe), zero)
        coefs = torch.stack([coef, torch.zeros_like(coef), -coef], dim=1)
    else:
        scale = s
        if spec.reduction == Reduction.NONE:
            value = sx
        elif spec.reduction == Reduction.SUM:
            value = sx.sum()
        else:
            denom = torch.where(valid, cw, zero).sum()
            ok = denom != 0
            safe = torch.where(ok, denom, torch.ones_like(denom))
            value = torch.where(ok, sx.sum() / safe, zero)
            scale = torch.where(ok, s / safe, zero)
        coefs = torch.where(counts[:, None], scale[:, None] * r[:, RowCol.ALPHA :], zero)
    stats = torch.cat([r[:, : RowCol.LS + 1], coefs], dim=1)
    return value, stats


def backward(grad, logits, target, stats, spec: KernelSpec, u=None):
    """The gradient from ``stats``; a P-form spec (NFL, focal gamma ``spec.a``) reads them as
    ``alpha P_j + beta h(P_j)`` off the target, ``P_j = exp((z_j - m) - ls)``, ``lse = m + ls`` in columns 0-1.
    ``u``: the op's ``smooth_weight`` (None for all 1)."""
    n, c = logits.shape
    acc = stats.dtype
    z = logits.to(acc)
    valid = target != spec.ignore_index
    y = torch.where(valid, target, torch.zeros_like(target))
    m, ls = stats[:, StatCol.M], stats[:, StatCol.LS]
    alpha, beta, gamma = stats[:, StatCol.ALPHA], stats[:, StatCol.BETA], stats[:, StatCol.GAMMA]
    onehot = torch.zeros((n, c), dtype=torch.bool, device=z.device)
    onehot.scatter_(1, y[:, None], True)
    # (z - m) - ls: m is the row's largest non-target logit, so the first
    # difference is exact for every nearby logit, whatever the offset.
    shifted = (z - m[:, None]) - ls[:, None]
    if spec.p_form:
        logP = shifted
        P = logP.exp()
        _, h = focal_terms(_rounded(spec.a, acc), logP, P, -torch.expm1(logP))
        off = alpha[:, None] * P + beta[:, None] * h
    else:
        # r_y is excluded by selection, not by multiplying with 0: its exp may be inf.
        r = torch.exp(shifted)
        # r = 0 when no non-target class has a finite logit (C = 1, all masked).
        r = torch.where((m == -math.inf)[:, None], torch.zeros_like(r), r)
        u = torch.ones(c, dtype=acc, device=z.device) if u is None else u.to(acc)
        off = alpha[:, None] * r
        off = torch.where((beta != 0)[:, None], off + beta[:, None] * u, off)
    direction = torch.where(onehot, gamma[:, None].expand(n, c), off)
    # A NaN row is NaN everywhere, its target too (as the kernels write it).
    direction = torch.where(torch.isnan(m)[:, None], m[:, None].expand(n, c), direction)
    g = grad.to(acc)
    g = g[:, None] if g.dim() == 1 else g
    out = g * direction
    out = torch.where(valid[:, None], out, torch.zeros_like(out))
    return out.to(logits.dtype)


class ReferenceFunction(torch.autograd.Function):
    """Autograd glue for the reference: forward value, SPEC gradient in backward."""

    @staticmethod
    def forward(ctx, logits, target, spec, weight, sample_weight):
        value, stats = forward(logits, target, spec, weight, sample_weight)
        ctx.save_for_backward(logits, target, stats, spec.smooth_weight(weight))
        ctx.spec = spec
        return value

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: refuse rather than drop the second-order term
            raise RuntimeError("robustloss: double backward (create_graph=True) is not supported")
        logits, target, stats, u = ctx.saved_tensors
        # u is saved only where the spec routes the class weights into the rows.
        grad_logits = backward(grad, logits, target, stats, ctx.spec, u)
        return grad_logits, None, None, None, None
