// The row pass (SPEC §2, §4; the two-term schemes of SPEC §8; the op
// robust_ce_rows of SPEC §9.3): one kernel reads each row of logits and writes
// its statistics and gradient coefficients, rows (N, 7) = (m, ls, log w, x,
// alpha, beta, gamma), lse_nt = m + ls kept in its two parts (SPEC §2.2). The forward op hands them to the cross-row step
// (finalize.cu); robust_ce_rows returns them as they are.
//
// rows_kernel -- a group of TPR threads owns a row (layouts: common.cuh). Each
// thread keeps an online (max, sum-of-exp) over its share of the NON-target
// classes (the target lane is read as -inf), so lse_nt comes out directly and
// q = exp(lse_nt - lse) never needs 1 - p (SPEC §2.2). Loads are 16 bytes wide
// from the first 16-byte boundary of the row on (a few scalar loads peel the
// head and tail), several in flight per thread. The group's partial states are
// merged by a fixed shuffle tree (and, for a block, a fixed tree through
// shared memory). Two-term schemes (label smoothing, NCE/APL; their own kernel
// instantiations) take a second pass of the same shape over the whole row for
// spread = sum_k u_k (M - z_k) and U = sum_k u_k (SPEC §8.2), M the row's
// largest logit handed from lane 0 (schemes.h: spread_ref), merged by the
// same trees. NFL (its own instantiation too) first hands the row's lse =
// nfl_lse(z_y, lse_nt), both its parts, from lane 0 to the group (shuffles, or
// shared memory for a block), then its second pass sums the focal terms (F_k, h_k) of the
// non-target classes, merged by the same trees. Lane 0 then evaluates the
// scheme math of robustloss/schemes.h -- the same functions the CPU kernel
// calls -- and writes the row; NFL writes lse in columns 0-1 ("P-form", SPEC
// §8.5). A row with a bad target stops the kernel with a device-side
// assertion (common.cuh: bad targets).
#include "common.cuh"

namespace robustloss {
namespace cuda {
namespace {

// This thread's share of one row: lanes take elements (head, tail) and packs
// (body) TPR apart, UNROLL packs in flight. elem(j, z) takes one element,
// pack(pk, j0) a pack whose first element is column j0.
template <typename T, int TPR, int UNROLL = kUnroll, typename Elem, typename PackFn>
__device__ __forceinline__ void row_share(const T* row, int64_t c, int lane, Elem elem, PackFn pack) {
  constexpr int K = Pack<T>::kVec;
  const int64_t head = head_count(row, c);
  for (int64_t j = lane; j < head; j += TPR) elem(j, row[j]);

  const int64_t npack = (c - head) / K;
  const T* body = row + head;
  int64_t p = lane;
  for (; p + (UNROLL - 1) * TPR < npack; p += UNROLL * TPR) {
    Pack<T> pk[UNROLL];
#pragma unroll
    for (int k = 0; k < UNROLL; ++k) pk[k] = load_pack(body + (p + k * TPR) * K);
#pragma unroll
    for (int k = 0; k < UNROLL; ++k) pack(pk[k], head + (p + k * TPR) * K);
  }
  if constexpr (UNROLL > 1) {
    for (; p < npack; p += TPR) pack(load_pack(body + p * K), head + p * K);
  }

  for (int64_t j = head + npack * K + lane; j < c; j += TPR) elem(j, row[j]);
}

// The online logsumexp of this thread's share; the target's position reads as -inf.
template <typename T, int TPR, typename acc_t>
__device__ __forceinline__ void lse_row_share(Lse<acc_t>& st, const T* row, int64_t c, int64_t y, int lane) {
  constexpr int K = Pack<T>::kVec;
  row_share<T, TPR>(
      row, c, lane, [&](int64_t j, T z) { lse_add<T>(st, j == y ? -inf<acc_t>() : static_cast<acc_t>(z)); },
      [&](const Pack<T>& pk, int64_t j0) {
        acc_t x[K];
#pragma unroll
        for (int k = 0; k < K; ++k) x[k] = static_cast<acc_t>(pk.v[k]);
        set_at(x, y - j0, -inf<acc_t>());
        lse_add_pack<T>(st, x);
      });
  lse_seal(st);
}

// This thread's share of (spread, U) over the whole row, target included, the
// spread taken from ref = schemes.h's spread_ref (as
// the CPU kernel: its term is 0 for a finite z_y). A class with u_k = 0 adds 0
// even when masked (0 * inf would be NaN). u is read one element at a time:
// its alignment is not the row's.
template <typename T, int TPR, typename acc_t>
__device__ __forceinline__ void spread_row_share(Spread<acc_t>& st, const T* row, int64_t c, acc_t ref,
                                                 const acc_t* u, int lane) {
  constexpr int K = Pack<T>::kVec;
  auto add = [&](int64_t j, acc_t z) {
    if (u == nullptr) {
      st.s += ref - z;
    } else {
      const acc_t w = u[j];
      st.u += w;
      if (w != acc_t(0)) st.s += w * (ref - z);
    }
  };
  row_share<T, TPR>(
      row, c, lane, [&](int64_t j, T z) { add(j, static_cast<acc_t>(z)); },
      [&](const Pack<T>& pk, int64_t j0) {
#pragma unroll
        for (int k = 0; k < K; ++k) add(j0 + k, static_cast<acc_t>(pk.v[k]));
      });
}

// NFL: this thread's share of the focal terms of the NON-target classes,
// (s, u) += (F_k, h_k) of schemes.h's focal_terms (the body of
// focal_terms_of_logit(g, z_k, lse), with this file's exp/expm1). A masked
// class adds (inf, -1), as on the CPU; the target adds nothing.
template <typename T, int TPR, typename acc_t>
__device__ __forceinline__ void focal_row_share(Spread<acc_t>& st, const T* row, int64_t c, int64_t y,
                                                LseParts<acc_t> lse, acc_t g, int lane) {
  constexpr int K = Pack<T>::kVec;
  auto add = [&](int64_t j, acc_t z) {
    const acc_t l = (z - lse.m) - lse.ls;
    const FocalTerms<acc_t> t = focal_terms<acc_t>(g, l, dexp(l), -dexpm1(l));
    const bool skip = j == y;  // a select, not a branch: the lanes of a pack stay converged
    st.s += skip ? acc_t(0) : t.F;
    st.u += skip ? acc_t(0) : t.h;
  };
  row_share<T, TPR, kFocalUnroll>(
      row, c, lane, [&](int64_t j, T z) { add(j, static_cast<acc_t>(z)); },
      [&](const Pack<T>& pk, int64_t j0) {
#pragma unroll
        for (int k = 0; k < K; ++k) add(j0 + k, static_cast<acc_t>(pk.v[k]));
      });
}

// Lane 0's v in every lane of its row group (every thread must call it).
template <int TPR, typename acc_t>
__device__ __forceinline__ acc_t group_broadcast(acc_t v, acc_t* smem) {
  if constexpr (TPR <= 32) {
    return __shfl_sync(0xffffffffu, v, 0, TPR);
  } else {
    if (threadIdx.x == 0) *smem = v;
    __syncthreads();
    // No second barrier: thread 0 writes the slot again only for the next
    // row, after the barriers of that row's reductions, which every reader
    // passes after its read.
    return *smem;
  }
}

// ---------------------------------------------------------------------------
// The kernel

template <typename T>
struct RowsParams {
  using acc_t = typename AccOf<T>::type;
  const T* logits;
  int64_t n, c, row_stride;
  const int64_t* target;
  int64_t ignore_index;
  int64_t scheme;
  acc_t a, b;
  bool normalised;
  const acc_t* u;  // smooth weight (c,), or nullptr (all 1)
  acc_t* rows;
};

// The row's lse_nt = m + ls, in its two parts, from its merged online state
// (valid in lane 0 of the group): (-inf, 0) without a finite non-target logit.
template <typename acc_t>
__device__ __forceinline__ LseParts<acc_t> nt_of(const Lse<acc_t>& st, acc_t z_y) {
  LseParts<acc_t> nt{st.m, acc_t(0)};
  if (st.bad) {
    nt.m = nt.ls = nan<acc_t>();
  } else if (st.m != -inf<acc_t>()) {
    nt.ls = dlog(st.s);
  }
  return row_lse_nt(z_y, nt);
}

// The second pass over a row, after its logsumexp: none (one-term schemes),
// the spread of label smoothing and NCE/APL (needs_spread), or NFL's focal
// sums (which need the row's lse in every lane first).
constexpr int kNoPass = 0;
constexpr int kSpreadPass = 1;
constexpr int kFocalPass = 2;

// PASS is a template parameter, not a runtime branch: the extra pass and the
// two-term math would cost the one-term kernels registers (double, 512
// threads: 62 -> 84, half the resident blocks).
template <typename T, int TPR, int BLOCK, int PASS>
__global__ void __launch_bounds__(BLOCK) rows_kernel(const RowsParams<T> p) {
  using acc_t = typename AccOf<T>::type;
  static_assert(BLOCK % TPR == 0 && (TPR <= 32 || TPR == BLOCK), "a row is a sub-warp, a warp or the block");
  constexpr int kGroups = BLOCK / TPR;
  constexpr int kSmem = TPR > 32 ? BLOCK / 32 : 1;
  __shared__ Lse<acc_t> smem[kSmem];
  __shared__ Spread<acc_t> smem_spread[kSmem];
  __shared__ acc_t smem_lse[2];  // block layouts: NFL's lse (m, ls), the spread's reference, for every thread
  const int lane = static_cast<int>(threadIdx.x) % TPR;
  const int group = static_cast<int>(threadIdx.x) / TPR;

  // The loop bound is uniform over the block, so every thread reaches every
  // shuffle and __syncthreads; groups past the last row just carry no data.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kGroups; base < p.n;
       base += static_cast<int64_t>(gridDim.x) * kGroups) {
    const int64_t i = base + group;
    const bool live = i < p.n;
    const int64_t y = live ? p.target[i] : 0;
    const bool ignored = live && y == p.ignore_index;
    const bool in_range = y >= 0 && y < p.c;
    const bool work = live && !ignored && in_range;
    const T* row = p.logits + (live ? i : 0) * p.row_stride;

    Lse<acc_t> st = lse_identity<acc_t>();
    if (work) lse_row_share<T, TPR>(st, row, p.c, y, lane);
    if constexpr (TPR <= 32) {
      st = lse_warp_reduce<TPR>(st);
    } else {
      st = block_reduce<BLOCK>(st, smem, lse_identity<acc_t>(),
                               [](Lse<acc_t> v) { return lse_warp_reduce<32>(v); });
    }

    Spread<acc_t> sp{acc_t(0), acc_t(0)};
    LseParts<acc_t> lse{acc_t(0), acc_t(0)};  // NFL: the row's logsumexp over all classes
    if constexpr (PASS != kNoPass) {
      if constexpr (PASS == kSpreadPass) {
        // The merged state is lane 0's (block layouts: thread 0's): it hands the
        // spread's reference to the group, as NFL's pass below hands its lse.
        acc_t ref = acc_t(0);
        if (lane == 0 && work) {
          const acc_t z_y = static_cast<acc_t>(row[y]);
          ref = spread_ref(nt_of(st, z_y), z_y);
        }
        ref = group_broadcast<TPR>(ref, smem_lse);
        if (work) spread_row_share<T, TPR>(sp, row, p.c, ref, p.u, lane);
      } else {
        LseParts<acc_t> head{acc_t(0), acc_t(0)};
        if (lane == 0 && work) {
          const acc_t z_y = static_cast<acc_t>(row[y]);
          const LseParts<acc_t> nt = nt_of(st, z_y);
          head = nfl_lse(z_y, nt, row_prob<acc_t>(z_y, nt));
        }
        // Two slots: the second broadcast must not overwrite a value a thread has yet to read.
        lse.m = group_broadcast<TPR>(head.m, smem_lse);
        lse.ls = group_broadcast<TPR>(head.ls, smem_lse + 1);
        if (work) focal_row_share<T, TPR>(sp, row, p.c, y, lse, p.a, lane);
      }
      if constexpr (TPR <= 32) {
        sp = spread_warp_reduce<TPR>(sp);
      } else {
        sp = block_reduce<BLOCK>(sp, smem_spread, Spread<acc_t>{acc_t(0), acc_t(0)},
                                 [](Spread<acc_t> v) { return spread_warp_reduce<32>(v); });
      }
    }

    if (lane == 0 && live) {
      acc_t* out = p.rows + kRowCols * i;
      if (ignored) {
        store_ignored_row(out);
      } else if (!in_range) {
        RL_DEVICE_ASSERT(false, RL_BAD_TARGET_ASSERT_MSG);
#pragma unroll
        for (int k = 0; k < kRowCols; ++k) out[k] = nan<acc_t>();
      } else {
        const acc_t z_y = static_cast<acc_t>(row[y]);
        const LseParts<acc_t> nt = nt_of(st, z_y);
        const RowProb<acc_t> pr = row_prob<acc_t>(z_y, nt);
        RowGrad<acc_t> g;
        acc_t lw;
        if constexpr (PASS == kFocalPass) {
          g = nfl_row<acc_t>(p.a, p.b, pr, sp.s, sp.u);
          lw = two_term_log_weight(g);
        } else if constexpr (PASS == kSpreadPass) {
          const acc_t U = p.u ? sp.u : static_cast<acc_t>(p.c);
          const acc_t lambda = two_term_lambda(pr, nt, z_y, sp.s, U);
          g = two_term_row<acc_t>(p.scheme, p.a, p.b, pr, lambda, U, p.u ? p.u[y] : acc_t(1), static_cast<acc_t>(p.c));
          lw = two_term_log_weight(g);
        } else {
          lw = log_weight<acc_t>(p.scheme, p.a, p.b, pr);
          g = one_term_row<acc_t>(p.scheme, p.a, p.b, lw, pr, p.normalised, nt);
        }
        const LseParts<acc_t> cols01 = PASS == kFocalPass ? lse : nt;  // NFL's rows are in P-form (schemes.h: nfl_row)
        store_row(out, cols01, lw, g);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Launch

template <typename T, int TPR, int BLOCK, int PASS>
void rows_launch_kernel(const RowsParams<T>& p, cudaStream_t stream) {
  rows_kernel<T, TPR, BLOCK, PASS><<<grid_for(ceil_div(p.n, BLOCK / TPR)), BLOCK, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int TPR, int BLOCK>
void rows_launch(const RowsParams<T>& p, cudaStream_t stream) {
  if (is_p_form(p.scheme)) {
    rows_launch_kernel<T, TPR, BLOCK, kFocalPass>(p, stream);
  } else if (needs_spread(p.scheme)) {
    rows_launch_kernel<T, TPR, BLOCK, kSpreadPass>(p, stream);
  } else {
    rows_launch_kernel<T, TPR, BLOCK, kNoPass>(p, stream);
  }
}

template <typename T>
void rows_typed(const RowsArgs& a, cudaStream_t stream) {
  using acc_t = typename AccOf<T>::type;
  RowsParams<T> p;
  p.logits = static_cast<const T*>(a.logits);
  p.n = a.n;
  p.c = a.c;
  p.row_stride = a.row_stride;
  p.target = a.target;
  p.ignore_index = a.ignore_index;
  p.scheme = a.scheme;
  p.a = static_cast<acc_t>(a.a);
  p.b = static_cast<acc_t>(a.b);
  p.normalised = a.normalised;
  p.u = static_cast<const acc_t*>(a.smooth_weight);
  p.rows = static_cast<acc_t*>(a.rows);
  with_layout<T>(a.c, [&](auto tpr, auto block) {
    rows_launch<T, decltype(tpr)::value, decltype(block)::value>(p, stream);
  });
}

}  // namespace

void launch_rows(const RowsArgs& args, cudaStream_t stream) {
  dispatch_logits_dtype(args.dtype, [&](auto tag) { rows_typed<typename decltype(tag)::type>(args, stream); });
}

}  // namespace cuda
}  // namespace robustloss
