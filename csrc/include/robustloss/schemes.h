// The scheme math of SPEC §2-§5, once, for every C++ backend (CPU and CUDA).
//
// Everything here is per row and scalar: the kernels reduce a row to
// (z_y, lse_nt = m + ls), and these functions turn that into p, q, the log-emphasis
// log w(p) and the per-row value. The kernel table mirrors
// robustloss_fast/schemes.py (KERNEL_IDS) and robustloss_fast/reference.py.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RL_HD __host__ __device__ __forceinline__
#else
#define RL_HD inline
#endif

namespace robustloss {

enum SchemeId : int64_t {
  kCCE = 0,       // L = -log p            w = 2q
  kMAE = 1,       // L = q                 w = 2pq
  kMSE = 2,       // L = q^2               w = 4pq^2
  kGCE = 3,       // L = (1 - p^k)/k       w = 2 p^k q          params (k)
  kDM = 4,        // w = exp(beta p^lam q)                      params (lam, beta)
  kDMNormal = 5,  // w = exp(-beta p (p - 2 psi))               params (psi, beta)
  kDMBeta = 6,    // w = p^(alpha-1) q^(eta-1)                  params (alpha, eta)
  // Peer losses of p alone (loss-defined, so w = 2q (-p L'(p))):
  kPoly = 7,    // L = -a log p + b q     w = 2q (a + b p)          Poly-1 (1, eps), RCE (0, -A), SCE (alpha, -beta A)
  kFocal = 8,   // L = -q^g log p         w = 2 q^g (q - g p log p) params (g)
  kTaylor = 9,  // L = sum_{k<=t} q^k/k   w = 2q (1 - q^t)          params (t, an integer >= 1)
  // Peer losses of the whole distribution ("two-term": their gradient is
  // alpha r + beta u off the target, see RowGrad below). With
  // Lambda = sum_k u_k (-log P_k) (u = class weights for kCCELS, else 1):
  kCCELS = 10,  // L = (1 - eps) u_y (-log p) + (eps / C) Lambda               params (eps)  label smoothing
  kNCE = 11,    // L = a (-log p) / Lambda + b q                             params (a, b)
                //   NCE (1, 0); APL NCE+RCE (alpha, -beta A); NCE+MAE (alpha, beta)
  // Normalized focal loss: L = FL(p) / sum_k FL(P_k) + b q, FL(P) = -(1-P)^g log P   params (g, b)
  // (APL's alpha is a loss scale applied outside the kernels). Its gradient has
  // a per-class term, so its rows and stats use lse instead of lse_nt (below).
  kNFL = 12,
  kNumSchemes = 13,
};

enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

RL_HD bool is_loss_defined(int64_t id) { return id <= kGCE || (id >= kPoly && id < kNumSchemes); }

// Two-term schemes need one more row quantity, sum_k u_k (z_y - z_k), and
// their gradient has a second direction (u), so they have no log-emphasis
// normalisation: the op layers refuse normalize=True for them.
RL_HD bool is_two_term(int64_t id) { return id == kCCELS || id == kNCE || id == kNFL; }
RL_HD bool needs_spread(int64_t id) { return id == kCCELS || id == kNCE; }
// NFL's rows and stats carry lse in column 0 ("P-form"), and its gradient has a
// per-class term h(P_j): its passes are their own kernel instantiations.
RL_HD bool is_p_form(int64_t id) { return id == kNFL; }
// Label smoothing weighs every class of its smoothing sum by the class weights
// (F.cross_entropy's convention): they enter the rows as u, not the row scale s_i.
RL_HD bool weight_in_rows(int64_t id) { return id == kCCELS; }

// softplus(x) = log(1 + exp(x)) without overflow; +inf -> +inf, -inf -> 0.
template <typename T>
RL_HD T softplus(T x) {
  using std::exp;
  using std::fabs;
  using std::log1p;
  return (x > T(0) ? x : T(0)) + log1p(exp(-fabs(x)));
}

// log(1 + t) for t in [0, 1] (NaN passes through), accurate to a few ulps via
// the classic correction log(u) * t / (u - 1), u = fl(1 + t): it needs only
// log, which is several times cheaper than libm's scalar log1pf on the CPU.
template <typename T>
RL_HD T log1p_unit(T t) {
  using std::log;
  const T u = T(1) + t;
  return u == T(1) ? t : log(u) * (t / (u - T(1)));
}

// A log-sum-exp in its two parts, lse = m + ls (spec §2.2): m the largest
// finite logit of the sum, ls = log sum exp(z_j - m), in [0, log C]. The sum
// m + ls is never formed: at logits of 1e8 a float m + ls is m alone, so
// every use subtracts m from a logit first (exact for nearby logits) and ls
// after. A sum with no finite term is (-inf, 0); a NaN row is (NaN, NaN).
template <typename T>
struct LseParts {
  T m, ls;
};

// SPEC §6: a NaN or +inf target logit makes its whole row NaN. The kernels
// reduce the non-target classes only, so they pass lse_nt's parts through here.
template <typename T>
RL_HD LseParts<T> row_lse_nt(T z_y, LseParts<T> nt) {
  if (z_y != z_y || z_y == std::numeric_limits<T>::infinity()) {
    nt.m = nt.ls = std::numeric_limits<T>::quiet_NaN();
  }
  return nt;
}

// (m, ls) from a merged online (max, sum of exp(z - max)) state.
template <typename T>
RL_HD LseParts<T> lse_parts(T m, T s, bool bad) {
  using std::log;
  if (bad) return {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::quiet_NaN()};
  if (m == -std::numeric_limits<T>::infinity()) return {m, T(0)};
  return {m, log(s)};
}

// The probabilities of one row from its target logit and lse_nt (SPEC §2).
// With d = (z_y - m) - ls (the margin z_y - lse_nt): log p = -softplus(-d),
// log q = -softplus(d). q is never formed as 1 - p, so it stays exact for
// margins of 100+.
template <typename T>
struct RowProb {
  T logp, logq, p, q;
};

template <typename T>
RL_HD RowProb<T> row_prob(T z_y, LseParts<T> nt) {
  using std::exp;
  using std::fabs;
  using std::log1p;
  T d = (z_y - nt.m) - nt.ls;
  // A +inf target logit is not a valid input (SPEC §6: NaN for the row); the
  // margin alone would read it as p = 1.
  if (z_y == std::numeric_limits<T>::infinity()) d = std::numeric_limits<T>::quiet_NaN();
  // softplus(d) and softplus(-d) share t = exp(-|d|) in (0, 1]: one exp and
  // one log1p per row give all four numbers (this runs once per row, so on
  // small-C batches it is a large share of the work).
  const T t = exp(-fabs(d));
  const T l = log1p_unit(t);
  const T big = T(1) / (T(1) + t), small = t * big;  // sigmoid(|d|), sigmoid(-|d|)
  const bool pos = d >= T(0);
  RowProb<T> r;
  r.logp = -((pos ? T(0) : -d) + l);
  r.logq = -((pos ? d : T(0)) + l);
  r.p = pos ? big : small;
  r.q = pos ? small : big;
  if (d != d) r.p = r.q = d;  // NaN margin: every output NaN (the selects above would pick a side)
  return r;
}

// a + b p, the Poly formula's factor of w = 2q (a + b p), from the smaller of p
// and q: as (a + b) - b q for p >= 1/2, exact as p -> 1 when b = -a (Poly-1
// with epsilon = -1, whose factor is q); directly for p < 1/2, exact as
// p -> 0 when a = 0 (RCE, whose factor is b p).
template <typename T>
RL_HD T poly_factor(T a, T b, const RowProb<T>& r) {
  return r.p >= r.q ? (a + b) - b * r.q : a + b * r.p;
}

// -log p - q = sum_{k >= 2} q^k / k >= 0. Formed directly it cancels to q^2/2
// as p -> 1 (Poly-1 with epsilon = -1 is all of it), so for q < 1/4 the series
// is summed instead, to the type's precision (0.25^14 < float's epsilon,
// 0.25^30 < double's); above, the subtraction loses at most 3 bits.
template <typename T>
RL_HD T neglogp_minus_q(const RowProb<T>& r) {
  if (!(r.q < T(0.25))) return -r.logp - r.q;  // NaN too
  constexpr int kTerms = sizeof(T) == 4 ? 16 : 32;
  T h = T(1) / T(kTerms);
  for (int k = kTerms - 1; k >= 2; --k) h = T(1) / T(k) + r.q * h;
  return r.q * r.q * h;
}

// A row's term s e x of the derivative-normalised value (SPEC §5.3), e its
// normalised weight. An infinite x (-log p of a masked target) keeps its
// infinity even where e underflowed to 0 in the accumulation type: any
// weight w > 0 times +inf is +inf, so the value's limit does not depend on
// the precision the cross-row step runs in; only an exact w = 0 (log w =
// -inf) gives 0 * inf = NaN.
template <typename T>
RL_HD T normalised_term(T s, T e, T x, T logw) {
  const T inf = std::numeric_limits<T>::infinity();
  if ((x == inf || x == -inf) && logw > -inf && e == T(0)) return s > T(0) ? x : -x;  // s != 0: it counts
  return s * e * x;
}

// log w(p): the log of the emphasis. Normalised weights are a softmax over the
// batch of these, so they never overflow (SPEC §5).
template <typename T>
RL_HD T log_weight(int64_t id, T a, T b, const RowProb<T>& r) {
  using std::exp;
  using std::expm1;
  using std::log;
  using std::log1p;
  const T ln2 = T(0.69314718055994530942);
  // A NaN row stays NaN even where a formula would not look at p (DMBeta(1, 1)).
  if (r.p != r.p) return r.p;
  switch (id) {
    case kCCE:
      return ln2 + r.logq;
    case kMAE:
      return ln2 + r.logp + r.logq;
    case kMSE:
      return T(2) * ln2 + r.logp + T(2) * r.logq;
    case kGCE:
      return ln2 + a * r.logp + r.logq;
    case kDM: {
      // p^0 = 1 even at p = 0 (0 * log 0 would be NaN).
      const T plam = (a == T(0)) ? T(1) : (a == T(1) ? r.p : exp(a * r.logp));
      return b * plam * r.q;
    }
    case kDMNormal:
      return -b * r.p * (r.p - T(2) * a);
    case kDMBeta:
      return (a == T(1) ? T(0) : (a - T(1)) * r.logp) + (b == T(1) ? T(0) : (b - T(1)) * r.logq);
    case kPoly:
      return ln2 + r.logq + log(poly_factor(a, b, r));
    case kFocal: {
      if (r.p >= r.q) {
        // w = 2 q^(g+1) (1 + g p (-log p) / q), all in logs: q underflows at
        // margins past ~104 (float32) while log q does not; (-log p) / q -> 1.
        const T ratio = r.q > T(0) ? -r.logp / r.q : T(1);
        return ln2 + (a + T(1)) * r.logq + log1p(a * r.p * ratio);
      }
      // w = 2 q^g (q - g p log p): both terms >= 0; p log p -> 0 at p = 0.
      const T plogp = r.p == T(0) ? T(0) : r.p * r.logp;
      return ln2 + (a == T(0) ? T(0) : a * r.logq) + log(r.q - a * plogp);
    }
    case kTaylor:
      return ln2 + r.logq + log(-expm1(a * r.logq));
    default:
      return std::numeric_limits<T>::quiet_NaN();
  }
}

// L(p) of a loss-defined scheme, written to stay accurate as p -> 1.
template <typename T>
RL_HD T loss_value(int64_t id, T a, T b, const RowProb<T>& r) {
  using std::exp;
  using std::expm1;
  switch (id) {
    case kCCE:
      return -r.logp;
    case kMAE:
      return r.q;
    case kMSE:
      return r.q * r.q;
    case kGCE:
      return -expm1(a * r.logp) / a;
    case kPoly:
      // -a log p + b q = a (-log p - q) + (a + b) q: the first term without cancellation.
      return (a == T(0) ? T(0) : a * neglogp_minus_q(r)) + (a + b) * r.q;
    case kFocal:
      return a == T(0) ? -r.logp : -exp(a * r.logq) * r.logp;
    case kTaylor: {
      // Horner form of sum_{k=1..t} q^k / k.
      const int64_t t = static_cast<int64_t>(a);
      T acc = T(0);
      for (int64_t k = t; k >= 1; --k) acc = r.q * (T(1) / T(k) + acc);
      return acc;
    }
    default:
      return std::numeric_limits<T>::quiet_NaN();
  }
}

// The per-row quantity x_i that the reduction scales by the sample weight s_i
// (SPEC §4-§5). With derivative normalisation (reduction "mean", normalize=True)
// the value of every scheme is the emphasis-weighted cross-entropy, and the
// weight exp(log w - M) is applied in the cross-row step, so x_i = -log p_i.
// Otherwise x_i is the row's own value: L(p) for a loss-defined scheme, the
// monitoring value w * (-log p) for a derivative-defined one (raw w: it can
// overflow for large beta, as SPEC documents).
template <typename T>
RL_HD T row_x(int64_t id, T a, T b, T logw, const RowProb<T>& r, bool derivative_normalised) {
  using std::exp;
  if (derivative_normalised) return -r.logp;
  if (is_loss_defined(id)) return loss_value(id, a, b, r);
  return exp(logw) * (-r.logp);
}

// The per-row gradient of every scheme, before the cross-row factor: with
// r_j = exp((z_j - m) - ls) (the softmax over the non-target classes),
//
//     dL/dz_j = alpha r_j + beta u_j   (j != y),      dL/dz_y = gamma,
//
// and x the row's value. One-term schemes have alpha = w/2, beta = 0,
// gamma = -w/2 (SPEC §3). The rows op writes (alpha, beta, gamma) next to
// (m, ls, log w, x); the cross-row step scales them by s_i / D.
template <typename T>
struct RowGrad {
  T x, alpha, beta, gamma;
};

// The reference the spread is taken from: the row's largest finite logit, the
// target's included (M = max(m, z_y); z_y where no non-target logit is finite).
template <typename T>
RL_HD T spread_ref(LseParts<T> nt, T z_y) {
  return z_y > nt.m ? z_y : nt.m;
}

// Lambda = sum_k u_k (-log P_k) (SPEC §8.2) from spread = sum_k u_k (M - z_k),
// M = spread_ref: with lseM = log sum_j exp(z_j - M) in [0, log C],
// -log P_k = (M - z_k) + lseM, so Lambda = spread + U lseM is a sum of
// non-negative terms: no cancellation, and no overflow before Lambda itself
// leaves the float range. lseM is -log p where the target is the max, else
// ls - log q (both exact). A masked class with u_k > 0 (the target's too)
// makes the spread, and Lambda, +inf.
template <typename T>
RL_HD T two_term_lambda(const RowProb<T>& r, LseParts<T> nt, T z_y, T spread, T U) {
  const T lse_m = z_y > nt.m ? -r.logp : nt.ls - r.logq;
  return spread + (U == T(0) ? T(0) : U * lse_m);
}

// A two-term scheme's row. For L(p, Lambda) with Lambda = sum_k u_k (-log P_k),
// a = p dL/dp and l = dL/dLambda (U = sum_k u_k):
//   alpha = q (U l - a),  beta = -l,  gamma = q a + l (U p - u_y),
// from dp/dz_j = p (e_y - P)_j, dLambda/dz_j = U P_j - u_j and P_j = q r_j.
// `lambda` comes from two_term_lambda.
template <typename T>
RL_HD RowGrad<T> two_term_row(int64_t id, T a, T b, const RowProb<T>& r, T lambda, T U, T u_y, T num_classes) {
  const T nlp = -r.logp;
  RowGrad<T> g;
  if (id == kCCELS) {
    // PyTorch's label smoothing: (1 - eps) u_y CE + (eps / C) sum_k u_k (-log P_k).
    // A zero factor adds nothing even against an infinite term (0 * inf would be NaN).
    const T eps = a, sm = a / num_classes, hard = (T(1) - a) * u_y;
    g.x = (hard == T(0) ? T(0) : hard * nlp) + (eps == T(0) ? T(0) : sm * lambda);
    g.alpha = r.q * (U * sm + hard);
    g.beta = -sm;
    g.gamma = -r.q * hard + sm * (U * r.p - u_y);
    return g;
  }
  // kNCE: a (-log p) / Lambda + b q. Lambda = 0 only for C = 1 (p = 1): NCE 0.
  // Lambda = inf (a masked class) gives NCE 0 and no NCE gradient, its limit;
  // a masked target (p = 0, where Lambda reads inf - inf) NCE 1, its limit.
  if (nlp == std::numeric_limits<T>::infinity()) {
    g.x = a + b * r.q;
    g.alpha = g.beta = g.gamma = T(0);
    return g;
  }
  const T nce = lambda == T(0) ? T(0) : nlp / lambda;
  const T inv = lambda == T(0) ? T(0) : T(1) / lambda;
  // (U, u_y) = (C, 1): the op layers pass no u for NCE; written generally so
  // that a direct rows call with u agrees with the reference.
  const T pq = r.p * r.q;
  g.x = a * nce + b * r.q;
  g.alpha = a * r.q * (T(1) - U * nce) * inv + b * pq;
  g.beta = a * nce * inv;
  g.gamma = -a * (r.q + nce * (U * r.p - u_y)) * inv - b * pq;
  return g;
}

// The focal terms of one class from l = log P, P and Q = 1 - P (NFL):
// F = -Q^g l and h = P dF/dP = Q^g (g P l / Q - 1). Limits: P = 0 (a masked
// class, l = -inf) gives F = inf, h = -1; Q = 0 gives P l / Q -> -1.
// The CPU kernel has a vector copy of this formula (kernel_impl.h).
template <typename T>
struct FocalTerms {
  T F, h;
};

template <typename T>
RL_HD FocalTerms<T> focal_terms(T g, T l, T P, T Q) {
  using std::exp;
  using std::log;
  const T qg = g == T(0) ? T(1) : exp(g * log(Q));
  const T pl = P == T(0) ? T(0) : P * l;
  const T pl_over_q = Q > T(0) ? pl / Q : -P;
  FocalTerms<T> t;
  t.F = -qg * l;
  t.h = qg * (g * pl_over_q - T(1));
  return t;
}

// One non-target class of NFL from its logit: l = (z - m) - ls, P = e^l, Q = -expm1(l).
template <typename T>
RL_HD FocalTerms<T> focal_terms_of_logit(T g, T z, LseParts<T> lse) {
  using std::exp;
  using std::expm1;
  const T l = (z - lse.m) - lse.ls;
  return focal_terms<T>(g, l, exp(l), -expm1(l));
}

// NFL's rows and stats hold lse (not lse_nt): (m, ls - log q), or (z_y, 0)
// when no non-target logit is finite (log q = -inf there).
template <typename T>
RL_HD LseParts<T> nfl_lse(T z_y, LseParts<T> nt, const RowProb<T>& r) {
  if (nt.m == -std::numeric_limits<T>::infinity()) return {z_y, T(0)};
  return {nt.m, nt.ls - r.logq};
}

// The row of NFL (+ b q) from the row's p, q and the sums over the non-target
// classes of F and h. With S = sum_k F_k, H = sum_k h_k and the gradient
// dL/dz_j = P_j (-h_y / S + F_y H / S^2) - (F_y / S^2) h_j   (j != y),
// dL/dz_y = h_y q / S - (F_y / S^2)(h_y - p H),
// the row is written in P-form: alpha multiplies P_j (not r_j), beta is the
// factor of h_j (the backward recomputes h_j per class), gamma the target's.
// S = 0 (C = 1) or inf (a masked class): NFL = 0 and no NFL gradient.
template <typename T>
RL_HD RowGrad<T> nfl_row(T g, T b, const RowProb<T>& r, T sum_F_nt, T sum_h_nt) {
  const FocalTerms<T> ty = focal_terms<T>(g, r.logp, r.p, r.q);
  RowGrad<T> out;
  if (ty.F == std::numeric_limits<T>::infinity()) {  // a masked target: NFL's limit is 1, no gradient
    out.x = T(1) + b * r.q;
    out.alpha = out.beta = out.gamma = T(0);
    return out;
  }
  const T S = sum_F_nt + ty.F, H = sum_h_nt + ty.h;
  const T inv = S == T(0) ? T(0) : T(1) / S;
  const T nfl = ty.F * inv;
  out.x = nfl + b * r.q;
  out.alpha = -ty.h * inv + nfl * inv * H + b * r.p;
  out.beta = -nfl * inv;
  out.gamma = ty.h * r.q * inv - nfl * inv * (ty.h - r.p * H) - b * r.p * r.q;
  return out;
}

// w/2 of a loss-defined scheme in the linear domain: the unnormalised rows
// need w itself, and exp(log w) is a libm call per row on the CPU (most of
// these need no transcendental function at all). Derivative-defined schemes
// go through exp(log w).
template <typename T>
RL_HD T half_weight(int64_t id, T a, T b, T logw, const RowProb<T>& r) {
  using std::exp;
  using std::expm1;
  switch (id) {
    case kCCE:
      return r.q;
    case kMAE:
      return r.p * r.q;
    case kMSE:
      return T(2) * r.p * r.q * r.q;
    case kGCE:
      return exp(a * r.logp) * r.q;
    case kPoly:
      return r.q * poly_factor(a, b, r);
    case kTaylor:
      return -r.q * expm1(a * r.logq);
    default:
      return exp(logw) / T(2);  // Focal (its log form guards q's underflow), DM family
  }
}

// The row of a one-term scheme: the value of row_x and (w/2, 0, -w/2), or all
// 0 when no non-target logit is finite (G = 0 there, SPEC §3). Under
// derivative normalisation they are left 0 too: the cross-row step derives
// the gradient from log w, and the per-row exp (a libm call on the CPU) cost
// ~40% of a small-C row pass.
template <typename T>
RL_HD RowGrad<T> one_term_row(int64_t id, T a, T b, T logw, const RowProb<T>& r, bool derivative_normalised,
                              LseParts<T> nt) {
  using std::exp;
  RowGrad<T> g;
  g.x = row_x<T>(id, a, b, logw, r, derivative_normalised);
  g.alpha = (derivative_normalised || nt.m == -std::numeric_limits<T>::infinity()) ? T(0)
                                                                                  : half_weight(id, a, b, logw, r);
  g.beta = T(0);
  g.gamma = -g.alpha;
  return g;
}

// log w of a two-term row: twice the target's gradient magnitude (for a
// one-term scheme that is exactly w, the L1 norm of its gradient).
template <typename T>
RL_HD T two_term_log_weight(const RowGrad<T>& g) {
  using std::fabs;
  using std::log;
  return log(T(2) * fabs(g.gamma));
}

}  // namespace robustloss
