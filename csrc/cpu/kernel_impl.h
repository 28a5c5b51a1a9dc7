// The fused CPU row kernels, written once and compiled per instruction set:
// kernel_{default,avx2,avx512}.cpp include this file with CPU_CAPABILITY set,
// so at::vec::Vectorized is 1, 8 or 16 floats wide.
//
// Forward (rows): per row, the statistics of SPEC §2 over the non-target
// classes only -- a max pass then a sum-of-exp pass over the row, the target
// lane masked to -inf -- so q = exp(lse_nt - lse) needs no 1 - p. Then the
// scheme math of schemes.h gives (lse_nt, log w, x). Nothing of size N x C is
// written.
//
// Backward: per row, one pass writing g_i * coef_i * (r - e_y) straight from the
// logits, r_j = exp(z_j - lse_nt), already scaled by the cross-row factor.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "kernel.h"
#include "robustloss/schemes.h"

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
inline Vectorized<acc_t> vexp(const Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

// Load one full vector of acc_t from scalar_t memory.
template <typename scalar_t, typename acc_t>
inline Vectorized<acc_t> vload(const scalar_t* p) {
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
inline Vectorized<acc_t> vload_partial(const scalar_t* p, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vectorized<acc_t>::loadu(p, count);
  } else {
    const auto v = Vectorized<scalar_t>::loadu(p, count);
    return std::get<0>(at::vec::convert_to_float<scalar_t>(v));
  }
}

// Store `count` lanes of v as scalar_t.
template <typename scalar_t, typename acc_t>
inline void vstore(scalar_t* p, const Vectorized<acc_t>& v, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(p, count);
  } else {
    const auto h = at::vec::convert_from_float<scalar_t>(v, v);
    h.store(p, count);
  }
}

// The vector of row[j0, j0 + K) with the target's lane and the lanes past
// the end set to -inf (exp gives 0 there, max ignores them).
template <typename scalar_t, typename acc_t>
inline Vectorized<acc_t> masked_vector(const scalar_t* row, int64_t c, int64_t y, int64_t j0) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t K = Vec::size();
  const Vec ninf(kNegInf<acc_t>);
  const int64_t count = std::min<int64_t>(K, c - j0);
  Vec v = count == K ? vload<scalar_t, acc_t>(row + j0)
                     : Vec::set(ninf, vload_partial<scalar_t, acc_t>(row + j0, count), count);
  if (y >= j0 && y < j0 + K) v = Vec::blendv(v, ninf, Vec::arange(acc_t(0), acc_t(1)) == Vec(acc_t(y - j0)));
  return v;
}

// Fold step(acc, v) over the row's non-target lanes (masked lanes are -inf),
// with four independent accumulators over the unmasked full vectors so the
// loop is not bound by the latency of one dependency chain; join merges them.
template <typename scalar_t, typename acc_t, typename Step, typename Join>
inline Vectorized<acc_t> fold_non_target(const scalar_t* row, int64_t c, int64_t y, const Vectorized<acc_t>& init,
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
inline acc_t reduce_max(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](const Vectorized<acc_t>& x, const Vectorized<acc_t>& z) { return at::vec::maximum(x, z); }, v);
}

template <typename acc_t>
inline acc_t reduce_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>(
      [](const Vectorized<acc_t>& x, const Vectorized<acc_t>& z) { return x + z; }, v);
}

// logsumexp over the non-target classes (-inf when there is none, NaN when a
// non-target logit is NaN or +inf).
template <typename scalar_t, typename acc_t>
inline acc_t lse_non_target(const scalar_t* row, int64_t c, int64_t y) {
  using Vec = Vectorized<acc_t>;
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  if (c <= Vec::size()) {
    // Small C: the whole row is one vector, loaded once.
    const Vec v = masked_vector<scalar_t, acc_t>(row, c, y, 0);
    const acc_t m = reduce_max(v);
    if (m != m || m == kInf) return std::numeric_limits<acc_t>::quiet_NaN();
    if (m == kNegInf<acc_t>) return m;
    return m + std::log(reduce_sum(vexp(v - Vec(m))));
  }
  // Two passes (max, then sum of exp): the second reads the row from cache.
  auto vmax_of = [](const Vec& x, const Vec& v) { return at::vec::maximum(x, v); };
  const acc_t m = reduce_max(fold_non_target<scalar_t, acc_t>(row, c, y, Vec(kNegInf<acc_t>), vmax_of, vmax_of));
  if (m != m || m == kInf) return std::numeric_limits<acc_t>::quiet_NaN();
  if (m == kNegInf<acc_t>) return m;
  const Vec vm(m);
  const Vec vsum = fold_non_target<scalar_t, acc_t>(
      row, c, y, Vec(acc_t(0)), [&](const Vec& x, const Vec& v) { return x + vexp(v - vm); },
      [](const Vec& x, const Vec& v) { return x + v; });
  return m + std::log(reduce_sum(vsum));
}

// Work per task: about 16K logits, so small-C batches still split into few tasks.
inline int64_t grain(int64_t c) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(c, 1)); }

template <typename scalar_t>
void rows_typed(const RowsArgs& args) {
  using acc_t = typename AccOf<scalar_t>::type;
  const auto* logits = static_cast<const scalar_t*>(args.logits);
  auto* out = static_cast<acc_t*>(args.rows);
  const acc_t a = static_cast<acc_t>(args.a), b = static_cast<acc_t>(args.b);
  at::parallel_for(0, args.n, grain(args.c), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = args.target[i];
      acc_t* o = out + 3 * i;
      if (y == args.ignore_index) {
        o[0] = kNegInf<acc_t>;
        o[1] = kNegInf<acc_t>;
        o[2] = 0;
        continue;
      }
      const scalar_t* row = logits + i * args.row_stride;
      const acc_t z_y = static_cast<acc_t>(row[y]);
      const acc_t lse_nt = row_lse_nt(z_y, lse_non_target<scalar_t, acc_t>(row, args.c, y));
      const RowProb<acc_t> pr = row_prob<acc_t>(z_y, lse_nt);
      const acc_t lw = log_weight<acc_t>(args.scheme, a, b, pr);
      o[0] = lse_nt;
      o[1] = lw;
      o[2] = row_x<acc_t>(args.scheme, a, b, lw, pr, args.normalised);
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
  auto* out = static_cast<scalar_t*>(args.out);
  const int64_t c = args.c;
  at::parallel_for(0, args.n, grain(c), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* o = out + i * c;
      const int64_t y = args.target[i];
      if (y == args.ignore_index) {
        std::fill(o, o + c, scalar_t(0));
        continue;
      }
      const acc_t lse_nt = stats[2 * i];
      const acc_t gc = (args.grad_per_row ? grad[i] : grad[0]) * stats[2 * i + 1];
      if (lse_nt == kNegInf<acc_t>) {
        // SPEC §3: no finite non-target logit, G = 0 (NaN stays NaN).
        std::fill(o, o + c, static_cast<scalar_t>(gc * acc_t(0)));
        continue;
      }
      if (lse_nt != lse_nt) {
        // A NaN row (SPEC §6). Written directly: the fast vector exp clamps
        // its input and would turn NaN into a finite or infinite number.
        std::fill(o, o + c, static_cast<scalar_t>(lse_nt));
        continue;
      }
      const scalar_t* row = logits + i * args.row_stride;
      const Vec vg(gc), vl(lse_nt);
      int64_t j = 0;
      for (; j + K <= c; j += K) vstore<scalar_t, acc_t>(o + j, vg * vexp(vload<scalar_t, acc_t>(row + j) - vl), K);
      if (j < c) {
        const int64_t count = c - j;
        const Vec v = Vec::set(Vec(kNegInf<acc_t>), vload_partial<scalar_t, acc_t>(row + j, count), count);
        vstore<scalar_t, acc_t>(o + j, vg * vexp(v - vl), count);
      }
      o[y] = static_cast<scalar_t>(-gc);
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
