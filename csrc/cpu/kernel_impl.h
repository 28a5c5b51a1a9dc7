// The fused CPU row kernels, written once and compiled per instruction set:
// kernel_{default,avx2,avx512}.cpp include this file with CPU_CAPABILITY set,
// so at::vec::Vectorized is 1, 8 or 16 floats wide.
//
// Forward (rows): per row, the statistics of SPEC §2 over the non-target
// classes only -- a max pass then a sum-of-exp pass over the row, the target
// lane masked to -inf -- so q = exp(lse_nt - lse) needs no 1 - p. lse_nt stays
// in its two parts (m, ls) (schemes.h: LseParts). Then the scheme math of
// schemes.h gives (m, ls, log w, x, ...). Nothing of size N x C is written.
//
// Backward: per row, one pass writing g_i (alpha_i r + beta_i u) straight from
// the logits, r_j = exp((z_j - m) - ls) = exp(z_j - m) exp(-ls), then g_i
// gamma_i at the target; the coefficients already carry the cross-row factor.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kernel.h"
#include "robustloss/schemes.h"

// The helpers of the per-logit loops are inlined whatever the compiler's
// size budget says: when rows_typed grew, GCC stopped inlining some of them
// and the row pass lost 13% at every C (benchmarks/NOTES.md).
#if defined(__GNUC__)
#define RL_CPU_INLINE inline __attribute__((always_inline))
#else
#define RL_CPU_INLINE inline
#endif

namespace robustloss {
namespace cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

template <typename scalar_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

// exp of a whole vector: the 20-ulp polynomial for float (what ATen's own
// softmax uses), Sleef's 1-ulp exp for double.
template <typename acc_t>
RL_CPU_INLINE Vectorized<acc_t> vexp(const Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

// Load one full vector of acc_t from scalar_t memory.
template <typename scalar_t, typename acc_t>
RL_CPU_INLINE Vectorized<acc_t> vload(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vectorized<acc_t>::loadu(p);
  } else {
    Vectorized<float> out;
    at::vec::load_to_float(p, out);
    return out;
  }
}

// Load the first `count` (< K) elements; lanes past them are unspecified.
// Masked/partial loads never touch memory past the row.
template <typename scalar_t, typename acc_t>
RL_CPU_INLINE Vectorized<acc_t> vload_partial(const scalar_t* p, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vectorized<acc_t>::loadu(p, count);
  } else {
    const auto v = Vectorized<scalar_t>::loadu(p, count);
    return std::get<0>(at::vec::convert_to_float<scalar_t>(v));
  }
}

// Store `count` (<= K) lanes of v as scalar_t, writing those bytes and no
// others. ATen stores part of a vector with a masked store (AVX512; AVX2 for
// float and double), and a full vector of floats as 16-bit values is only
// half an AVX512 vector, so it too was a masked 512-bit store. A load that
// falls in the masked-off bytes of such a store is not forwarded from it and
// waits for it to retire; the in-place backward makes exactly that load next
// (the following 16 values; after a row's tail, the next row's first ones),
// which made it 4.5x slower per logit in bf16 than writing elsewhere on an
// AMD EPYC (benchmarks/NOTES.md). So: plain stores of the vector's bytes, and
// a tail through a stack buffer and memcpy.
template <typename scalar_t, typename acc_t>
RL_CPU_INLINE void vstore(scalar_t* p, const Vectorized<acc_t>& v, int64_t count) {
  constexpr int64_t K = Vectorized<acc_t>::size();
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (count == K) {
      v.store(p);
      return;
    }
    alignas(64) acc_t tmp[K];
    v.store(tmp);
    std::memcpy(p, tmp, count * sizeof(acc_t));
  } else {
    const auto h = at::vec::convert_from_float<scalar_t>(v, v);  // v's K values in the first half
#if defined(CPU_CAPABILITY_AVX512)
    if (count == K) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(static_cast<__m512i>(h)));
      return;
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if (count == K) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(static_cast<__m256i>(h)));
      return;
    }
#endif
    alignas(64) scalar_t tmp[Vectorized<scalar_t>::size()];
    h.store(tmp);
    std::memcpy(p, tmp, count * sizeof(scalar_t));
  }
}

// The first `count` (<= K) elements at p, the other lanes `fill`.
template <typename scalar_t, typename acc_t>
RL_CPU_INLINE Vectorized<acc_t> vload_fill(const scalar_t* p, int64_t count, const Vectorized<acc_t>& fill) {
  if (count == Vectorized<acc_t>::size()) return vload<scalar_t, acc_t>(p);
  return Vectorized<acc_t>::set(fill, vload_partial<scalar_t, acc_t>(p, count), count);
}

// The vector of row[j0, j0 + K) with the target's lane and the lanes past
// the end set to -inf (exp gives 0 there, max ignores them).
template <typename scalar_t, typename acc_t>
RL_CPU_INLINE Vectorized<acc_t> masked_vector(const scalar_t* row, int64_t c, int64_t y, int64_t j0) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t K = Vec::size();
  const Vec ninf(kNegInf<acc_t>);
  Vec v = vload_fill<scalar_t, acc_t>(row + j0, std::min<int64_t>(K, c - j0), ninf);
  if (y >= j0 && y < j0 + K) v = Vec::blendv(v, ninf, Vec::arange(acc_t(0), acc_t(1)) == Vec(acc_t(y - j0)));
  return v;
}

// Fold step(acc, v) over the row's non-target lanes (masked lanes are -inf),
// with four independent accumulators over the unmasked full vectors so the
// loop is not bound by the latency of one dependency chain; join merges them.
template <typename scalar_t, typename acc_t, typename Step, typename Join>
RL_CPU_INLINE Vectorized<acc_t> fold_non_target(const scalar_t* row, int64_t c, int64_t y, const Vectorized<acc_t>& init,
                                         Step step, Join join) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t K = Vec::size();
  Vec a0 = init, a1 = init, a2 = init, a3 = init;
  auto span = [&](int64_t lo, int64_t hi) {  // [lo, hi) holds no target; lo is a multiple of K
    int64_t j = lo;
    for (; j + 4 * K <= hi; j += 4 * K) {
      a0 = step(a0, vload<scalar_t, acc_t>(row + j));
      a1 = step(a1, vload<scalar_t, acc_t>(row + j + K));
      a2 = step(a2, vload<scalar_t, acc_t>(row + j + 2 * K));
      a3 = step(a3, vload<scalar_t, acc_t>(row + j + 3 * K));
    }
    for (; j < hi; j += K) a0 = step(a0, masked_vector<scalar_t, acc_t>(row, hi, -1, j));
  };
  const int64_t yc = y - y % K;  // the chunk holding the target
  span(0, yc);
  a1 = step(a1, masked_vector<scalar_t, acc_t>(row, c, y, yc));
  if (yc + K < c) span(yc + K, c);
  return join(join(a0, a1), join(a2, a3));
}

template <typename acc_t>
RL_CPU_INLINE acc_t reduce_max(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](const Vectorized<acc_t>& x, const Vectorized<acc_t>& z) { return at::vec::maximum(x, z); }, v);
}

template <typename acc_t>
RL_CPU_INLINE acc_t reduce_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](const Vectorized<acc_t>& x, const Vectorized<acc_t>& z) { return x + z; }, v);
}

// logsumexp over the non-target classes as (m, ls): (-inf, 0) when there is
// none, NaN when a non-target logit is NaN or +inf.
template <typename scalar_t, typename acc_t>
inline LseParts<acc_t> lse_non_target(const scalar_t* row, int64_t c, int64_t y) {
  using Vec = Vectorized<acc_t>;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  if (c <= Vec::size()) {
    // Small C: the whole row is one vector, loaded once.
    const Vec v = masked_vector<scalar_t, acc_t>(row, c, y, 0);
    const acc_t m = reduce_max(v);
    if (m == kNegInf<acc_t>) return lse_parts(m, acc_t(0), false);
    return lse_parts(m, m != m || m == kInf ? acc_t(0) : reduce_sum(vexp(v - Vec(m))), m != m || m == kInf);
  }
  // Two passes (max, then sum of exp): the second reads the row from cache.
  auto vmax_of = [](const Vec& x, const Vec& v) { return at::vec::maximum(x, v); };
  const acc_t m = reduce_max(fold_non_target<scalar_t, acc_t>(row, c, y, Vec(kNegInf<acc_t>), vmax_of, vmax_of));
  if (m != m || m == kInf || m == kNegInf<acc_t>) return lse_parts(m, acc_t(0), m != m || m == kInf);
  const Vec vm(m);
  const Vec vsum = fold_non_target<scalar_t, acc_t>(
      row, c, y, Vec(acc_t(0)), [&](const Vec& x, const Vec& v) { return x + vexp(v - vm); },
      [](const Vec& x, const Vec& v) { return x + v; });
  return lse_parts(m, reduce_sum(vsum), false);
}

// sum_k u_k (ref - z_k) over the whole row, the two-term schemes' extra
// reduction (u = 1 when u == nullptr), ref = schemes.h's spread_ref. A class
// with u_k = 0 adds 0 even when masked (0 * inf would be NaN); lanes past the
// end read as ref and add 0.
template <typename scalar_t, typename acc_t>
RL_CPU_INLINE acc_t spread_sum(const scalar_t* row, int64_t c, acc_t ref, const acc_t* u) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t K = Vec::size();
  const Vec vy(ref), zero(acc_t(0));
  Vec a0(acc_t(0)), a1(acc_t(0));
  auto term = [&](const Vec& z, const acc_t* uj, int64_t count) {
    Vec d = vy - z;
    if (u != nullptr) {
      const Vec w = vload_fill<acc_t, acc_t>(uj, count, zero);
      d = Vec::blendv(w * d, zero, w == zero);
    }
    return d;
  };
  int64_t j = 0;
  for (; j + 2 * K <= c; j += 2 * K) {
    a0 = a0 + term(vload<scalar_t, acc_t>(row + j), u + j, K);
    a1 = a1 + term(vload<scalar_t, acc_t>(row + j + K), u + j + K, K);
  }
  for (; j < c; j += K) {
    const int64_t count = std::min<int64_t>(K, c - j);
    a0 = a0 + term(vload_fill<scalar_t, acc_t>(row + j, count, vy), u + j, count);
  }
  return reduce_sum(a0 + a1);
}

// Q^g for the focal terms: the common exponents without log/exp (the papers'
// NFL uses g = 0.5, a square root).
template <typename acc_t>
RL_CPU_INLINE Vectorized<acc_t> vpow_focal(const Vectorized<acc_t>& Q, acc_t g) {
  using Vec = Vectorized<acc_t>;
  if (g == acc_t(0)) return Vec(acc_t(1));
  if (g == acc_t(0.5)) return Q.sqrt();
  if (g == acc_t(1)) return Q;
  if (g == acc_t(2)) return Q * Q;
  return (Vec(g) * Q.log()).exp();
}

// Vector copy of focal_terms (schemes.h) for l = z - lse: (P, F, h) per lane.
// Q = 1 - P is exact enough while P <= 1/2; only vectors holding a larger P
// (at most one class per row) pay for expm1.
template <typename acc_t>
RL_CPU_INLINE void vfocal_terms(const Vectorized<acc_t>& l, acc_t g, Vectorized<acc_t>& P, Vectorized<acc_t>& F,
                         Vectorized<acc_t>& h) {
  using Vec = Vectorized<acc_t>;
  const Vec zero(acc_t(0)), one(acc_t(1)), half(acc_t(0.5));
  P = vexp(l);
  Vec Q = one - P;
  const Vec big = P > half;
  if (big.zero_mask() != (1 << Vec::size()) - 1) Q = Vec::blendv(Q, l.expm1().neg(), big);
  const Vec qg = vpow_focal(Q, g);
  const Vec pl = Vec::blendv(P * l, zero, P == zero);
  const Vec pl_over_q = Vec::blendv(P.neg(), pl / Q, Q > zero);
  F = (qg * l).neg();
  h = qg * (Vec(g) * pl_over_q - one);
}

// NFL's sums over the non-target classes of F and h (a third pass over the row).
template <typename scalar_t, typename acc_t>
inline void focal_sums(const scalar_t* row, int64_t c, int64_t y, LseParts<acc_t> lse, acc_t g, acc_t& sum_F,
                       acc_t& sum_h) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t K = Vec::size();
  const Vec zero(acc_t(0)), vm(lse.m), vls(lse.ls), lane = Vec::arange(acc_t(0), acc_t(1));
  // Two levels: each lane sums 64 terms into a block sum, then adds the block to its total. F is
  // positive and of one size across a row, so a lane's plain running sum over C / K terms (3141 at
  // C = 50257) lost up to that many roundings; NFL's value F_y / sum F carries the error straight
  // through (2.5e-5 relative, seen at C = 50257 in bfloat16). Two levels bound it by about 64 + C / 64K.
  constexpr int64_t kBlockSteps = 64;
  Vec sF(acc_t(0)), sH(acc_t(0)), bF(acc_t(0)), bH(acc_t(0));
  int64_t steps = 0;
  for (int64_t j = 0; j < c; j += K) {
    const int64_t count = std::min<int64_t>(K, c - j);
    const Vec z = vload_fill<scalar_t, acc_t>(row + j, count, vm);
    Vec P, F, h;
    vfocal_terms<acc_t>((z - vm) - vls, g, P, F, h);
    Vec skip = lane >= Vec(acc_t(count));
    if (y >= j && y < j + K) skip = skip | (lane == Vec(acc_t(y - j)));
    bF = bF + Vec::blendv(F, zero, skip);
    bH = bH + Vec::blendv(h, zero, skip);
    if (++steps == kBlockSteps) {
      sF = sF + bF;
      sH = sH + bH;
      bF = bH = zero;
      steps = 0;
    }
  }
  sum_F = reduce_sum(sF + bF);
  sum_h = reduce_sum(sH + bH);
}

// Work per task: about 16K logits, so small-C batches still split into few tasks.
inline int64_t grain(int64_t c) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(c, 1)); }

template <typename scalar_t>
void rows_typed(const RowsArgs& args) {
  using acc_t = typename AccOf<scalar_t>::type;
  const auto* logits = static_cast<const scalar_t*>(args.logits);
  auto* out = static_cast<acc_t*>(args.rows);
  const acc_t a = static_cast<acc_t>(args.a), b = static_cast<acc_t>(args.b);
  const bool two_term = is_two_term(args.scheme);
  const auto* u = static_cast<const acc_t*>(args.smooth_weight);
  acc_t U = static_cast<acc_t>(args.c);
  if (u != nullptr) {
    double total = 0.0;
    for (int64_t j = 0; j < args.c; ++j) total += static_cast<double>(u[j]);
    U = static_cast<acc_t>(total);
  }
  at::parallel_for(0, args.n, grain(args.c), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = args.target[i];
      acc_t* o = out + kRowCols * i;
      if (y == args.ignore_index) {
        store_ignored_row(o);
        continue;
      }
      const scalar_t* row = logits + i * args.row_stride;
      const acc_t z_y = static_cast<acc_t>(row[y]);
      const LseParts<acc_t> nt = row_lse_nt(z_y, lse_non_target<scalar_t, acc_t>(row, args.c, y));
      const RowProb<acc_t> pr = row_prob<acc_t>(z_y, nt);
      RowGrad<acc_t> g;
      acc_t lw;
      LseParts<acc_t> cols01 = nt;
      if (is_p_form(args.scheme)) {
        cols01 = nfl_lse(z_y, nt, pr);  // P-form: the backward needs P_j = exp((z_j - m) - ls)
        acc_t sum_F, sum_h;
        focal_sums<scalar_t, acc_t>(row, args.c, y, cols01, a, sum_F, sum_h);
        g = nfl_row<acc_t>(a, b, pr, sum_F, sum_h);
        lw = two_term_log_weight(g);
      } else if (two_term) {
        const acc_t spread = spread_sum<scalar_t, acc_t>(row, args.c, spread_ref(nt, z_y), u);
        const acc_t lambda = two_term_lambda(pr, nt, z_y, spread, U);
        g = two_term_row<acc_t>(args.scheme, a, b, pr, lambda, U, u ? u[y] : acc_t(1), static_cast<acc_t>(args.c));
        lw = two_term_log_weight(g);
      } else {
        lw = log_weight<acc_t>(args.scheme, a, b, pr);
        g = one_term_row<acc_t>(args.scheme, a, b, lw, pr, args.normalised, nt);
      }
      store_row(o, cols01, lw, g);
    }
  });
}

template <typename scalar_t>
void backward_typed(const BackwardArgs& args) {
  using acc_t = typename AccOf<scalar_t>::type;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t K = Vec::size();
  const auto* logits = static_cast<const scalar_t*>(args.logits);
  const auto* stats = static_cast<const acc_t*>(args.stats);
  const auto* grad = static_cast<const acc_t*>(args.grad);
  const auto* u = static_cast<const acc_t*>(args.smooth_weight);
  auto* out = static_cast<scalar_t*>(args.out);
  const int64_t c = args.c;
  const bool nfl = is_p_form(args.scheme);
  const acc_t gamma_f = static_cast<acc_t>(args.a);
  at::parallel_for(0, args.n, grain(c), [&](int64_t begin, int64_t end) {
    // exp(-ls) of K rows at a time, in one vector exp: a scalar std::exp per
    // row was 60% of the whole pass at C = 10 (benchmarks/NOTES.md).
    acc_t inv_sum[K];
    for (int64_t i = begin; i < end; ++i) {
      if ((i - begin) % K == 0) {
        const int64_t count = std::min<int64_t>(K, end - i);
        for (int64_t k = 0; k < K; ++k) {
          const acc_t ls = k < count ? stats[kStatCols * (i + k) + kStatLs] : acc_t(0);
          inv_sum[k] = ls == ls ? -ls : acc_t(0);  // NaN rows never read it (and vexp clamps NaN)
        }
        vexp(Vec::loadu(inv_sum)).store(inv_sum);
      }
      scalar_t* o = out + i * c;
      const int64_t y = args.target[i];
      if (y == args.ignore_index) {
        std::fill(o, o + c, scalar_t(0));
        continue;
      }
      const acc_t* st = stats + kStatCols * i;
      const acc_t m = st[kStatM], ls = st[kStatLs];
      const acc_t g = args.grad_per_row ? grad[i] : grad[0];
      const acc_t gb = g * st[kStatBeta], gy = g * st[kStatGamma];
      if (m != m || ls != ls) {
        // A NaN row (SPEC §6). Written directly: the fast vector exp clamps
        // its input and would turn NaN into a finite or infinite number.
        std::fill(o, o + c, static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN()));
        continue;
      }
      const scalar_t* row = logits + i * args.row_stride;
      if (nfl) {
        // P-form (schemes.h, nfl_row): out = g (alpha P + beta h(P)), P = exp((z - m) - ls).
        const Vec va(g * st[kStatAlpha]), vb(gb), vm(m), vls(ls);
        for (int64_t j = 0; j < c; j += K) {
          const int64_t count = std::min<int64_t>(K, c - j);
          const Vec z = vload_fill<scalar_t, acc_t>(row + j, count, vm);
          Vec P, F, h;
          vfocal_terms<acc_t>((z - vm) - vls, gamma_f, P, F, h);
          vstore<scalar_t, acc_t>(o + j, va * P + vb * h, count);
        }
      } else if (m == kNegInf<acc_t>) {
        // No finite non-target logit: r = 0 (SPEC §3), only the beta term is left.
        for (int64_t j = 0; j < c; ++j) o[j] = static_cast<scalar_t>(gb * (u ? u[j] : acc_t(1)));
      } else {
        // r_j = exp(z_j - m) exp(-ls): z_j - m is exact for nearby logits at any
        // offset, and exp(-ls) in [1/C, 1] folds into the row's factor (one
        // exp per row, K rows to a vector, instead of a second subtraction per logit).
        const acc_t ga = g * st[kStatAlpha] * inv_sum[(i - begin) % K];
        const Vec vg(ga), vm(m);
        if (gb == acc_t(0)) {
          // One-term rows (every SPEC §4 scheme): out = g alpha r.
          int64_t j = 0;
          for (; j + K <= c; j += K) vstore<scalar_t, acc_t>(o + j, vg * vexp(vload<scalar_t, acc_t>(row + j) - vm), K);
          if (j < c) {
            const int64_t count = c - j;
            const Vec v = vload_fill<scalar_t, acc_t>(row + j, count, Vec(kNegInf<acc_t>));
            vstore<scalar_t, acc_t>(o + j, vg * vexp(v - vm), count);
          }
        } else {
          // Two-term rows: out = g (alpha r + beta u).
          const Vec vb(gb);
          for (int64_t j = 0; j < c; j += K) {
            const int64_t count = std::min<int64_t>(K, c - j);
            const Vec v = vload_fill<scalar_t, acc_t>(row + j, count, Vec(kNegInf<acc_t>));
            const Vec uj = u == nullptr ? Vec(acc_t(1)) : vload_fill<acc_t, acc_t>(u + j, count, Vec(acc_t(0)));
            vstore<scalar_t, acc_t>(o + j, at::vec::fmadd(vb, uj, vg * vexp(v - vm)), count);
          }
        }
      }
      o[y] = static_cast<scalar_t>(gy);
    }
  });
}

inline void rows_impl(const RowsArgs& args) {
  dispatch_logits_dtype(args.dtype, [&](auto tag) { rows_typed<typename decltype(tag)::type>(args); });
}

inline void backward_impl(const BackwardArgs& args) {
  dispatch_logits_dtype(args.dtype, [&](auto tag) { backward_typed<typename decltype(tag)::type>(args); });
}

}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace robustloss
