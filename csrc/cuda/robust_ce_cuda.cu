// The fused CUDA kernels of robustloss (SPEC §2-§6) for float32, float16,
// bfloat16 (float32 accumulation) and float64 logits.
//
// Three kernels carry an op; none holds anything of size N x C:
//
// 1. rows_kernel -- one pass over each row. A group of TPR threads owns a row
//    (4 or 32 lanes of a warp for small C, so a block holds several rows; a
//    whole block of 128 or 512 threads for large C). Each thread keeps an
//    online (max, sum-of-exp) over its share of the NON-target classes (the
//    target lane is read as -inf), so lse_nt comes out directly and q =
//    exp(lse_nt - lse) never needs 1 - p. Loads are 16 bytes wide from the
//    first 16-byte boundary of the row on (a few scalar loads peel the head
//    and tail), several in flight per thread. The group's partial states are
//    merged by a fixed shuffle tree (and, for a block, a fixed tree through
//    shared memory). Two-term schemes (label smoothing, NCE/APL; their own
//    kernel instantiations) take a second pass of the same shape over the
//    whole row for spread = sum_k u_k (z_y - z_k) and U = sum_k u_k, merged by
//    the same trees. NFL (its own instantiation too) first hands the row's
//    lse = nfl_lse(z_y, lse_nt) from lane 0 to the group (a shuffle, or shared
//    memory for a block), then its second pass sums the focal terms (F_k,
//    h_k) of the non-target classes, merged by the same trees. Lane 0 then
//    evaluates the scheme math of robustloss/schemes.h -- the same functions
//    the CPU kernel calls -- and writes rows (N, 6) = (lse_nt, log w, x,
//    alpha, beta, gamma); NFL writes lse in column 0 ("P-form").
//
// 2. finalize (partials_kernel + apply_kernel) -- the cross-row step of
//    robustloss_fast/_finalize.py on the device, in double. For "mean"/"sum",
//    partials_kernel cuts the N rows into at most 256 chunks (the cut depends
//    only on N) and reduces each with a fixed tree: (max log w, sum |s| e,
//    sum s e x) with e = exp(log w - max) for derivative normalisation -- the
//    log-domain softmax, so |beta| = 1000 cannot overflow -- else (sum s x,
//    sum weight[y]). apply_kernel merges the partials in one fixed tree (every
//    block repeats the same tree, so every block sees bitwise the same D),
//    writes stats (N, 4) = (lse_nt, alpha, beta, gamma) and the value.
//
// 3. backward_kernel -- one pass writing g (alpha r_j + beta u_j) off the
//    target and g gamma at it, r_j = exp(z_j - lse_nt), with the same
//    row-to-threads layout, 16-byte stores aligned on the output row. NFL
//    (its own instantiation) writes g (alpha P_j + beta h_j) with P_j =
//    exp(z_j - lse) and h_j its focal term, lse from the stats' column 0.
//
// Determinism: no atomics take part in any value. The order of every sum is
// fixed by (N, C, the row's address modulo 16 bytes): the same tensors give
// bitwise the same outputs, run after run. The one atomic (atomicMin on the
// bad-target slot) computes a minimum, whose result does not depend on order.
//
// Bad targets: the kernels check every target themselves; a row whose target
// is neither ignore_index nor in [0, C) is skipped (never read or written out
// of bounds): the row kernel writes NaN statistics and atomicMin's the row
// index into a one-int64 device slot preset to N; finalize counts such a row
// nowhere; backward writes a NaN row. The forward and rows ops then read the
// slot back -- one 8-byte device-to-host copy and one stream synchronisation
// per call, which also means the host cannot queue the next kernels before
// the forward finishes (a few microseconds of launch latency exposed per
// step). If the slot is below N they read the bad value (a second copy, on
// the error path only) and raise IndexError through TORCH_CHECK_INDEX with
// ROBUSTLOSS_BAD_TARGET_MSG. Under CUDA-graph capture the read-back is
// skipped (a sync is illegal there): bad rows then give NaN silently. The
// backward op never synchronises.
//
// Offsets: every row offset and column index is int64, so N * C past 2^31
// elements is fine.
//
// Without a GPU, csrc/cuda/emu/check_emu.py runs this file's code on a CPU
// emulation of blocks, warps and shuffles and compares every op with the
// reference (.ci/cuda_build_check.sh runs it after the nvcc build);
// tests/test_cuda.py is the on-device half.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "robust_ce_cuda.h"
#include "robustloss/schemes.h"

namespace robustloss {
namespace cuda {
namespace {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename T>
__device__ __forceinline__ T inf() {
  return std::numeric_limits<T>::infinity();
}
template <typename T>
__device__ __forceinline__ T nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

// Full-precision exp/log (not the approximate intrinsics): the gradient entries
// r_j far below 1 keep their relative accuracy.
__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }
__device__ __forceinline__ float dexpm1(float x) { return expm1f(x); }
__device__ __forceinline__ double dexpm1(double x) { return expm1(x); }

// ---------------------------------------------------------------------------
// 16-byte packs and row alignment

constexpr int kPackBytes = 16;

template <typename T>
struct Pack {
  static constexpr int kVec = kPackBytes / static_cast<int>(sizeof(T));
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {  // p is 16-byte aligned
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  Pack<T> out;
  memcpy(&out, &raw, kPackBytes);
  return out;
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& pk) {  // p is 16-byte aligned
  uint4 raw;
  memcpy(&raw, &pk, kPackBytes);
  *reinterpret_cast<uint4*>(p) = raw;
}

// Elements before the first 16-byte boundary of a row (all of them when the
// pointer is not even element-aligned, so nothing is ever loaded misaligned).
template <typename T>
__device__ __forceinline__ int64_t head_count(const T* p, int64_t c) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  if (addr % sizeof(T) != 0) return c;
  const int64_t h = static_cast<int64_t>(((kPackBytes - (addr % kPackBytes)) % kPackBytes) / sizeof(T));
  return h < c ? h : c;
}

// ---------------------------------------------------------------------------
// Online logsumexp over the non-target classes

template <typename acc_t>
struct Lse {
  acc_t m;  // running max of the finite values (-inf: none yet)
  acc_t s;  // sum of exp(value - m)
  int bad;  // saw NaN or +inf: the row's lse_nt is NaN (SPEC §6)
};

template <typename acc_t>
__device__ __forceinline__ Lse<acc_t> lse_identity() {
  return Lse<acc_t>{-inf<acc_t>(), acc_t(0), 0};
}

template <typename acc_t>
__device__ __forceinline__ void lse_add(Lse<acc_t>& st, acc_t x) {
  if (x != x || x == inf<acc_t>()) {
    st.bad = 1;
  } else if (x > st.m) {  // also the first finite value: s * exp(-inf) = 0
    st.s = st.s * dexp(st.m - x) + acc_t(1);
    st.m = x;
  } else if (x != -inf<acc_t>()) {
    st.s += dexp(x - st.m);
  }
}

// A pack at once: one rescale per pack instead of one per element.
template <typename acc_t, int K>
__device__ __forceinline__ void lse_add_pack(Lse<acc_t>& st, acc_t (&x)[K]) {
  acc_t vmax = -inf<acc_t>();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (x[k] != x[k] || x[k] == inf<acc_t>()) {
      st.bad = 1;
      x[k] = -inf<acc_t>();
    }
    vmax = x[k] > vmax ? x[k] : vmax;
  }
  if (vmax == -inf<acc_t>()) return;  // every lane masked: nothing to add (and -inf - -inf is NaN)
  if (vmax > st.m) {
    st.s *= dexp(st.m - vmax);
    st.m = vmax;
  }
#pragma unroll
  for (int k = 0; k < K; ++k) st.s += dexp(x[k] - st.m);  // exp(-inf) = 0 for masked lanes
}

template <typename acc_t>
__device__ __forceinline__ void lse_merge(Lse<acc_t>& a, const Lse<acc_t>& b) {
  a.bad |= b.bad;
  if (b.m == -inf<acc_t>()) return;
  if (a.m == -inf<acc_t>()) {
    a.m = b.m;
    a.s = b.s;
  } else if (b.m > a.m) {
    a.s = a.s * dexp(a.m - b.m) + b.s;
    a.m = b.m;
  } else {
    a.s += b.s * dexp(b.m - a.m);
  }
}

// Butterfly over WIDTH lanes; every lane of the warp must call it. Lane 0 of
// each WIDTH-group ends with a result whose merge order is fixed.
template <int WIDTH, typename acc_t>
__device__ __forceinline__ Lse<acc_t> lse_warp_reduce(Lse<acc_t> v) {
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off >>= 1) {
    Lse<acc_t> o;
    o.m = __shfl_xor_sync(0xffffffffu, v.m, off, WIDTH);
    o.s = __shfl_xor_sync(0xffffffffu, v.s, off, WIDTH);
    o.bad = __shfl_xor_sync(0xffffffffu, v.bad, off, WIDTH);
    lse_merge(v, o);
  }
  return v;
}

// The sum pair of the two-term schemes' second pass: spread = sum_k u_k (z_y
// - z_k) and U = sum_k u_k (U only with a smooth weight: else it is C); for
// NFL, (sum F_k, sum h_k) over the non-target classes.
template <typename acc_t>
struct Spread {
  acc_t s, u;
};

template <int WIDTH, typename acc_t>
__device__ __forceinline__ Spread<acc_t> spread_warp_reduce(Spread<acc_t> v) {
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off >>= 1) {
    v.s += __shfl_xor_sync(0xffffffffu, v.s, off, WIDTH);
    v.u += __shfl_xor_sync(0xffffffffu, v.u, off, WIDTH);
  }
  return v;
}

// Whole-block reduction (TPR == BLOCK > 32) through one warp's shuffle tree
// per level; every thread must call it. The result is valid in thread 0.
template <int BLOCK, typename V, typename WarpReduce>
__device__ __forceinline__ V block_reduce(V v, V* smem, const V& identity, WarpReduce warp_reduce) {
  constexpr int kWarps = BLOCK / 32;
  v = warp_reduce(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? smem[lane] : identity;
    v = warp_reduce(v);
  }
  __syncthreads();  // smem is reused by the block's next row
  return v;
}

// Number of packs each thread loads before it uses any: bytes in flight.
constexpr int kUnroll = 4;
// NFL's passes (forward and backward) evaluate exp, expm1, log, a power and a
// division per element, so they should be bound by arithmetic rather than by
// bytes in flight (not yet timed on a GPU): one pack at a time. Unrolled by 4
// their inlined math doubled nvcc's time for the whole file.
constexpr int kFocalUnroll = 1;

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
      row, c, lane, [&](int64_t j, T z) { lse_add(st, j == y ? -inf<acc_t>() : static_cast<acc_t>(z)); },
      [&](const Pack<T>& pk, int64_t j0) {
        acc_t x[K];
#pragma unroll
        for (int k = 0; k < K; ++k) x[k] = (j0 + k == y) ? -inf<acc_t>() : static_cast<acc_t>(pk.v[k]);
        lse_add_pack(st, x);
      });
}

// This thread's share of (spread, U) over the whole row, target included (as
// the CPU kernel: its term is 0 for a finite z_y). A class with u_k = 0 adds 0
// even when masked (0 * inf would be NaN). u is read one element at a time:
// its alignment is not the row's.
template <typename T, int TPR, typename acc_t>
__device__ __forceinline__ void spread_row_share(Spread<acc_t>& st, const T* row, int64_t c, acc_t z_y,
                                                 const acc_t* u, int lane) {
  constexpr int K = Pack<T>::kVec;
  auto add = [&](int64_t j, acc_t z) {
    if (u == nullptr) {
      st.s += z_y - z;
    } else {
      const acc_t w = u[j];
      st.u += w;
      if (w != acc_t(0)) st.s += w * (z_y - z);
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
__device__ __forceinline__ void focal_row_share(Spread<acc_t>& st, const T* row, int64_t c, int64_t y, acc_t lse,
                                                acc_t g, int lane) {
  constexpr int K = Pack<T>::kVec;
  auto add = [&](int64_t j, acc_t z) {
    const acc_t l = z - lse;
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
// Kernel 1: the row pass

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
  long long* first_bad;
};

// The row's lse_nt from its merged online state (valid in lane 0 of the group).
template <typename acc_t>
__device__ __forceinline__ acc_t lse_nt_of(const Lse<acc_t>& st, acc_t z_y) {
  return row_lse_nt(z_y, st.bad ? nan<acc_t>() : (st.m == -inf<acc_t>() ? st.m : st.m + dlog(st.s)));
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
  __shared__ acc_t smem_lse[1];  // NFL, block layouts: the row's lse for every thread
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
    acc_t lse = acc_t(0);  // NFL: the row's logsumexp over all classes
    if constexpr (PASS != kNoPass) {
      if constexpr (PASS == kSpreadPass) {
        if (work) spread_row_share<T, TPR>(sp, row, p.c, static_cast<acc_t>(row[y]), p.u, lane);
      } else {
        acc_t head = acc_t(0);
        if (lane == 0 && work) {
          const acc_t z_y = static_cast<acc_t>(row[y]);
          const acc_t lse_nt = lse_nt_of(st, z_y);
          head = nfl_lse(z_y, lse_nt, row_prob<acc_t>(z_y, lse_nt));
        }
        lse = group_broadcast<TPR>(head, smem_lse);
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
      acc_t* out = p.rows + 6 * i;
      if (ignored) {
        out[0] = -inf<acc_t>();
        out[1] = -inf<acc_t>();
        out[2] = out[3] = out[4] = out[5] = acc_t(0);
      } else if (!in_range) {
        atomicMin(p.first_bad, static_cast<long long>(i));
#pragma unroll
        for (int k = 0; k < 6; ++k) out[k] = nan<acc_t>();
      } else {
        const acc_t z_y = static_cast<acc_t>(row[y]);
        const acc_t lse_nt = lse_nt_of(st, z_y);
        const RowProb<acc_t> pr = row_prob<acc_t>(z_y, lse_nt);
        RowGrad<acc_t> g;
        acc_t lw;
        if constexpr (PASS == kFocalPass) {
          g = nfl_row<acc_t>(p.a, p.b, pr, sp.s, sp.u);
          lw = two_term_log_weight(g);
        } else if constexpr (PASS == kSpreadPass) {
          const acc_t U = p.u ? sp.u : static_cast<acc_t>(p.c);
          g = two_term_row<acc_t>(p.scheme, p.a, p.b, pr, sp.s, U, p.u ? p.u[y] : acc_t(1), static_cast<acc_t>(p.c));
          lw = two_term_log_weight(g);
        } else {
          lw = log_weight<acc_t>(p.scheme, p.a, p.b, pr);
          g = one_term_row<acc_t>(p.scheme, p.a, p.b, lw, pr, p.normalised, lse_nt);
        }
        out[0] = PASS == kFocalPass ? lse : lse_nt;  // NFL's rows are in P-form (schemes.h: nfl_row)
        out[1] = lw;
        out[2] = g.x;
        out[3] = g.alpha;
        out[4] = g.beta;
        out[5] = g.gamma;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Kernel 3: the gradient pass

template <typename T>
struct BackwardParams {
  using acc_t = typename AccOf<T>::type;
  const T* logits;
  int64_t n, c, row_stride;
  const int64_t* target;
  int64_t ignore_index;
  const acc_t* stats;  // (n, 4): lse_nt, alpha, beta, gamma (NFL: lse, alpha, beta, gamma)
  const acc_t* u;      // smooth weight (c,), or nullptr (all 1)
  const acc_t* grad;
  bool grad_per_row;
  T* out;
  acc_t a;  // NFL's gamma (the focal exponent)
};

// Every element of an output row set to v.
template <typename T, int TPR>
__device__ __forceinline__ void fill_row(T* out, int64_t c, T v, int lane) {
  constexpr int K = Pack<T>::kVec;
  const int64_t head = head_count(out, c);
  for (int64_t j = lane; j < head; j += TPR) out[j] = v;
  const int64_t npack = (c - head) / K;
  Pack<T> pk;
#pragma unroll
  for (int k = 0; k < K; ++k) pk.v[k] = v;
  for (int64_t q = lane; q < npack; q += TPR) store_pack(out + head + q * K, pk);
  for (int64_t j = head + npack * K + lane; j < c; j += TPR) out[j] = v;
}

// NFL (P-form stats, a per-class h_j) is its own instantiation, as in the row pass.
template <typename T, int TPR, int BLOCK, bool NFL>
__global__ void __launch_bounds__(BLOCK) backward_kernel(const BackwardParams<T> p) {
  using acc_t = typename AccOf<T>::type;
  constexpr int K = Pack<T>::kVec;
  constexpr int kGroups = BLOCK / TPR;
  const int lane = static_cast<int>(threadIdx.x) % TPR;
  const int group = static_cast<int>(threadIdx.x) / TPR;

  // Rows are independent here (no shuffles, no barriers): a group may skip.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kGroups; base < p.n;
       base += static_cast<int64_t>(gridDim.x) * kGroups) {
    const int64_t i = base + group;
    if (i >= p.n) continue;
    T* out = p.out + i * p.c;
    const int64_t y = p.target[i];
    if (y == p.ignore_index) {
      fill_row<T, TPR>(out, p.c, static_cast<T>(acc_t(0)), lane);
      continue;
    }
    if (y < 0 || y >= p.c) {  // only reachable by calling the op directly with a bad target
      fill_row<T, TPR>(out, p.c, static_cast<T>(nan<acc_t>()), lane);
      continue;
    }
    const acc_t* st = p.stats + 4 * i;
    const acc_t lse_nt = st[0];  // NFL: lse
    if (lse_nt != lse_nt) {  // a NaN row (SPEC §6): NaN everywhere, as the CPU kernel writes it
      fill_row<T, TPR>(out, p.c, static_cast<T>(lse_nt), lane);
      continue;
    }
    const acc_t g = p.grad_per_row ? p.grad[i] : p.grad[0];
    const acc_t ga = g * st[1], gb = g * st[2], gy = g * st[3];
    // r = 0 when no non-target logit is finite (SPEC §3); one-term rows have
    // beta = 0 and skip the load of u. (NFL has no such case: every P_j is
    // exp(z_j - lse), as on the CPU.)
    [[maybe_unused]] const bool with_r = lse_nt != -inf<acc_t>();
    [[maybe_unused]] const bool with_u = gb != acc_t(0);
    const T* in = p.logits + i * p.row_stride;
    auto grad_of = [&](int64_t j, acc_t z) -> T {
      if (j == y) return static_cast<T>(gy);
      if constexpr (NFL) {
        // g (alpha P_j + beta h_j), P_j = exp(z_j - lse), h_j of focal_terms_of_logit (schemes.h).
        const acc_t l = z - lse_nt;
        const acc_t P = dexp(l);
        return static_cast<T>(ga * P + gb * focal_terms<acc_t>(p.a, l, P, -dexpm1(l)).h);
      } else {
        acc_t v = with_r ? ga * dexp(z - lse_nt) : acc_t(0);
        if (with_u) v += gb * (p.u ? p.u[j] : acc_t(1));
        return static_cast<T>(v);
      }
    };

    // Packs are aligned on the output row; the input shares that alignment
    // when its row starts at the same offset modulo 16 bytes (always for
    // contiguous logits), else its elements are loaded one by one.
    const int64_t head = head_count(out, p.c);
    const bool in_packed = head_count(in, p.c) == head &&
                           (reinterpret_cast<uintptr_t>(in) % kPackBytes) == (reinterpret_cast<uintptr_t>(out) % kPackBytes);
    for (int64_t j = lane; j < head; j += TPR) out[j] = grad_of(j, static_cast<acc_t>(in[j]));
    const int64_t npack = (p.c - head) / K;
    auto emit = [&](const Pack<T>& x, int64_t q) {
      const int64_t j0 = head + q * K;
      Pack<T> pk;
#pragma unroll
      for (int k = 0; k < K; ++k) pk.v[k] = grad_of(j0 + k, static_cast<acc_t>(x.v[k]));
      store_pack(out + j0, pk);
    };
    if (in_packed) {
      constexpr int kU = NFL ? kFocalUnroll : kUnroll;
      int64_t q = lane;
      for (; q + (kU - 1) * TPR < npack; q += kU * TPR) {
        Pack<T> x[kU];
#pragma unroll
        for (int u = 0; u < kU; ++u) x[u] = load_pack(in + head + (q + u * TPR) * K);
#pragma unroll
        for (int u = 0; u < kU; ++u) emit(x[u], q + u * TPR);
      }
      if constexpr (kU > 1) {
        for (; q < npack; q += TPR) emit(load_pack(in + head + q * K), q);
      }
    } else {
      for (int64_t q = lane; q < npack; q += TPR) {
        Pack<T> x;
#pragma unroll
        for (int k = 0; k < K; ++k) x.v[k] = in[head + q * K + k];
        emit(x, q);
      }
    }
    for (int64_t j = head + npack * K + lane; j < p.c; j += TPR) out[j] = grad_of(j, static_cast<acc_t>(in[j]));
  }
}

// ---------------------------------------------------------------------------
// Kernel 2: the cross-row step (double precision, fixed reduction trees)

constexpr int kFinBlock = 256;     // threads of both finalize kernels
constexpr int kMaxPartials = 256;  // == kFinBlock: apply_kernel merges one partial per thread

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How the rows are cut into chunks: a function of n alone, so the order of
// every sum is the same on any GPU.
int64_t num_partials(int64_t n) {
  const int64_t by_rows = ceil_div(n, kFinBlock);
  return by_rows < kMaxPartials ? by_rows : kMaxPartials;
}

template <typename acc_t>
struct FinParams {
  const acc_t* rows;
  const int64_t* target;
  int64_t n, c, ignore_index;
  const acc_t* weight;
  const acc_t* sw;
  int64_t reduction;
  bool normalised;
  bool weight_in_rows;  // label smoothing: the rows carry the class weights, s_i leaves them out
  double* partials;     // (num_partials, 3)
  int64_t num_partials, chunk;
  acc_t* value;
  acc_t* stats;
};

// s_i = sample_weight_i * weight[y_i] (without weight[y_i] when the rows carry
// it) and the class weight of row i, which makes the mean's D either way; a
// row with an ignored or out-of-range target counts nowhere.
struct RowScale {
  bool valid;
  double s, cw;
};

template <typename acc_t>
__device__ __forceinline__ RowScale row_scale(const FinParams<acc_t>& p, int64_t i) {
  const int64_t y = p.target[i];
  RowScale r{y != p.ignore_index && y >= 0 && y < p.c, 0.0, 0.0};
  if (r.valid) {
    r.cw = p.weight ? static_cast<double>(p.weight[y]) : 1.0;
    const double cs = p.weight_in_rows ? 1.0 : r.cw;
    r.s = p.sw ? cs * static_cast<double>(p.sw[i]) : cs;
  }
  return r;
}

// Fixed-tree block sum (every thread calls it; the result is in every thread).
__device__ __forceinline__ double block_sum(double v, double* buf) {
  buf[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int stride = kFinBlock / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) buf[threadIdx.x] += buf[threadIdx.x + stride];
    __syncthreads();
  }
  const double out = buf[0];
  __syncthreads();
  return out;
}

__device__ __forceinline__ double block_max(double v, double* buf) {  // NaN-free inputs
  buf[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int stride = kFinBlock / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) buf[threadIdx.x] = fmax(buf[threadIdx.x], buf[threadIdx.x + stride]);
    __syncthreads();
  }
  const double out = buf[0];
  __syncthreads();
  return out;
}

// One chunk of rows per block -> (max log w, sum |s| e, sum s e x) with
// derivative normalisation, else (sum s x, sum weight[y], 0).
template <typename acc_t>
__global__ void __launch_bounds__(kFinBlock) partials_kernel(const FinParams<acc_t> p) {
  __shared__ double buf[kFinBlock];
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * p.chunk;
  const int64_t hi = lo + p.chunk < p.n ? lo + p.chunk : p.n;
  double* out = p.partials + 3 * static_cast<int64_t>(blockIdx.x);
  const double neg_inf = -inf<double>();

  if (p.normalised) {
    // Softmax of log w over the rows that count (s != 0), shifted by the
    // chunk's largest log w; a NaN log w poisons the chunk (and so D).
    double m = neg_inf, saw_nan = 0.0;
    for (int64_t i = lo + threadIdx.x; i < hi; i += kFinBlock) {
      const RowScale r = row_scale(p, i);
      if (!r.valid || r.s == 0.0) continue;
      const double lw = static_cast<double>(p.rows[6 * i + 1]);
      if (lw != lw) saw_nan = 1.0;
      else m = fmax(m, lw);
    }
    m = block_max(m, buf);
    if (block_max(saw_nan, buf) != 0.0) m = nan<double>();
    double d = 0.0, num = 0.0;
    if (m != neg_inf) {
      for (int64_t i = lo + threadIdx.x; i < hi; i += kFinBlock) {
        const RowScale r = row_scale(p, i);
        if (!r.valid || r.s == 0.0) continue;
        const double e = exp(static_cast<double>(p.rows[6 * i + 1]) - m);
        d += fabs(r.s) * e;
        num += r.s * e * static_cast<double>(p.rows[6 * i + 2]);
      }
    }
    d = block_sum(d, buf);
    num = block_sum(num, buf);
    if (threadIdx.x == 0) {
      out[0] = m;
      out[1] = d;
      out[2] = num;
    }
  } else {
    double total = 0.0, den = 0.0;
    for (int64_t i = lo + threadIdx.x; i < hi; i += kFinBlock) {
      const RowScale r = row_scale(p, i);
      if (!r.valid) continue;
      // A row with s = 0 adds 0 even where its raw value overflowed (0 * inf).
      if (r.s != 0.0) total += r.s * static_cast<double>(p.rows[6 * i + 2]);
      den += r.cw;
    }
    total = block_sum(total, buf);
    den = block_sum(den, buf);
    if (threadIdx.x == 0) {
      out[0] = total;
      out[1] = den;
      out[2] = 0.0;
    }
  }
}

// (m, d, num) of two sets of rows -> the same of their union, in the log domain.
__device__ __forceinline__ void merge_normalised(double& m, double& d, double& num, double m2, double d2, double num2) {
  if (m != m || m2 != m2) {
    m = d = num = nan<double>();
    return;
  }
  const double mm = fmax(m, m2);
  if (mm == -inf<double>()) return;  // both empty: (-inf, 0, 0)
  const double e1 = m == -inf<double>() ? 0.0 : exp(m - mm);
  const double e2 = m2 == -inf<double>() ? 0.0 : exp(m2 - mm);
  d = d * e1 + d2 * e2;
  num = num * e1 + num2 * e2;
  m = mm;
}

// Merge the partials (same fixed tree in every block), then per row: stats =
// (lse_nt, alpha, beta, gamma) and, for "none", the value. Normalised: (coef,
// 0, -coef) with coef = s e / (2 D); else s_i / D times the row's (alpha,
// beta, gamma).
template <typename acc_t>
__global__ void __launch_bounds__(kFinBlock) apply_kernel(const FinParams<acc_t> p) {
  __shared__ double sm[3][kFinBlock];
  const int t = static_cast<int>(threadIdx.x);
  double g0 = 0.0, g1 = 0.0, g2 = 0.0;  // merged partials
  if (p.reduction != kNone) {
    const bool have = t < p.num_partials;
    if (p.normalised) {
      sm[0][t] = have ? p.partials[3 * t] : -inf<double>();
      sm[1][t] = have ? p.partials[3 * t + 1] : 0.0;
      sm[2][t] = have ? p.partials[3 * t + 2] : 0.0;
    } else {
      sm[0][t] = have ? p.partials[3 * t] : 0.0;
      sm[1][t] = have ? p.partials[3 * t + 1] : 0.0;
      sm[2][t] = 0.0;
    }
    __syncthreads();
#pragma unroll
    for (int stride = kFinBlock / 2; stride > 0; stride >>= 1) {
      if (t < stride) {
        if (p.normalised) {
          merge_normalised(sm[0][t], sm[1][t], sm[2][t], sm[0][t + stride], sm[1][t + stride], sm[2][t + stride]);
        } else {
          sm[0][t] += sm[0][t + stride];
          sm[1][t] += sm[1][t + stride];
        }
      }
      __syncthreads();
    }
    g0 = sm[0][0];
    g1 = sm[1][0];
    g2 = sm[2][0];
  }

  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kFinBlock + t; i < p.n;
       i += static_cast<int64_t>(gridDim.x) * kFinBlock) {
    const RowScale r = row_scale(p, i);
    const bool counts = r.valid && r.s != 0.0;
    const acc_t* row = p.rows + 6 * i;
    acc_t* st = p.stats + 4 * i;
    st[0] = row[0];
    if (p.normalised) {
      // D = g1 (NaN passes the test: it must reach every row that counts). G
      // = 0 for a row with no finite non-target logit (SPEC §3); it still
      // counts in D.
      double coef = 0.0;
      if (counts && g1 != 0.0 && row[0] != -inf<acc_t>())
        coef = r.s * exp(static_cast<double>(row[1]) - g0) / (2.0 * g1);
      st[1] = static_cast<acc_t>(coef);
      st[2] = acc_t(0);
      st[3] = static_cast<acc_t>(-coef);
    } else {
      // PyTorch's mean: D = sum weight[y] over the valid rows.
      double scale = counts ? r.s : 0.0;
      if (p.reduction == kMean) scale = g1 != 0.0 ? scale / g1 : 0.0;
#pragma unroll
      for (int k = 1; k <= 3; ++k) st[k] = scale == 0.0 ? acc_t(0) : static_cast<acc_t>(scale * static_cast<double>(row[2 + k]));
    }
    if (p.reduction == kNone) p.value[i] = counts ? static_cast<acc_t>(r.s * static_cast<double>(row[2])) : acc_t(0);
  }

  if (blockIdx.x == 0 && t == 0 && p.reduction != kNone) {
    double v;
    if (p.normalised) v = g1 != 0.0 ? g2 / g1 : 0.0;
    else if (p.reduction == kSum) v = g0;
    else v = g1 != 0.0 ? g0 / g1 : 0.0;
    p.value[0] = static_cast<acc_t>(v);
  }
}

// ---------------------------------------------------------------------------
// Launch configuration

int grid_for(int64_t blocks) {
  constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x limit; the kernels loop past it
  return static_cast<int>(blocks < kMaxGrid ? blocks : kMaxGrid);
}

// Threads per row from the row's length in 16-byte packs: about 2 to 32 packs
// per thread, so small C puts many rows in a block and large C a whole block
// on a row.
enum class Layout { kQuad, kWarp, kBlock128, kBlock512 };

template <typename T>
Layout layout_for(int64_t c) {
  const int64_t packs = ceil_div(c, Pack<T>::kVec);
  if (packs <= 8) return Layout::kQuad;
  if (packs <= 128) return Layout::kWarp;
  if (packs <= 2048) return Layout::kBlock128;
  return Layout::kBlock512;
}

// f(TPR, BLOCK) as integral constants for the layout of rows of c classes:
// the one switch over layouts, shared by the row and backward launchers.
template <typename T, typename F>
void with_layout(int64_t c, F&& f) {
  using std::integral_constant;
  switch (layout_for<T>(c)) {
    case Layout::kQuad:
      return f(integral_constant<int, 4>{}, integral_constant<int, 128>{});
    case Layout::kWarp:
      return f(integral_constant<int, 32>{}, integral_constant<int, 128>{});
    case Layout::kBlock128:
      return f(integral_constant<int, 128>{}, integral_constant<int, 128>{});
    case Layout::kBlock512:
      return f(integral_constant<int, 512>{}, integral_constant<int, 512>{});
  }
}

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
  p.first_bad = reinterpret_cast<long long*>(a.first_bad);
  with_layout<T>(a.c, [&](auto tpr, auto block) {
    rows_launch<T, decltype(tpr)::value, decltype(block)::value>(p, stream);
  });
}

template <typename T, int TPR, int BLOCK, bool NFL>
void backward_launch_kernel(const BackwardParams<T>& p, cudaStream_t stream) {
  backward_kernel<T, TPR, BLOCK, NFL><<<grid_for(ceil_div(p.n, BLOCK / TPR)), BLOCK, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int TPR, int BLOCK>
void backward_launch(const BackwardParams<T>& p, bool nfl, cudaStream_t stream) {
  if (nfl) {
    backward_launch_kernel<T, TPR, BLOCK, true>(p, stream);
  } else {
    backward_launch_kernel<T, TPR, BLOCK, false>(p, stream);
  }
}

template <typename T>
void backward_typed(const BackwardArgs& a, cudaStream_t stream) {
  using acc_t = typename AccOf<T>::type;
  BackwardParams<T> p;
  p.logits = static_cast<const T*>(a.logits);
  p.n = a.n;
  p.c = a.c;
  p.row_stride = a.row_stride;
  p.target = a.target;
  p.ignore_index = a.ignore_index;
  p.stats = static_cast<const acc_t*>(a.stats);
  p.u = static_cast<const acc_t*>(a.smooth_weight);
  p.grad = static_cast<const acc_t*>(a.grad);
  p.grad_per_row = a.grad_per_row;
  p.out = static_cast<T*>(a.out);
  p.a = static_cast<acc_t>(a.a);
  const bool nfl = is_p_form(a.scheme);
  with_layout<T>(a.c, [&](auto tpr, auto block) {
    backward_launch<T, decltype(tpr)::value, decltype(block)::value>(p, nfl, stream);
  });
}

template <typename acc_t>
void finalize_typed(const FinalizeArgs& a, cudaStream_t stream) {
  FinParams<acc_t> p;
  p.rows = static_cast<const acc_t*>(a.rows);
  p.target = a.target;
  p.n = a.n;
  p.c = a.c;
  p.ignore_index = a.ignore_index;
  p.weight = static_cast<const acc_t*>(a.weight);
  p.sw = static_cast<const acc_t*>(a.sample_weight);
  p.reduction = a.reduction;
  p.normalised = a.reduction == kMean && a.normalize;
  p.weight_in_rows = a.weight_in_rows;
  p.partials = a.workspace;
  p.num_partials = num_partials(a.n);
  p.chunk = ceil_div(a.n, p.num_partials);
  p.value = static_cast<acc_t*>(a.value);
  p.stats = static_cast<acc_t*>(a.stats);
  if (p.reduction != kNone) {
    partials_kernel<acc_t><<<static_cast<int>(p.num_partials), kFinBlock, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  apply_kernel<acc_t><<<grid_for(ceil_div(a.n, kFinBlock)), kFinBlock, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int64_t finalize_workspace_size(int64_t n) { return n > 0 ? 3 * num_partials(n) : 0; }

void launch_rows(const RowsArgs& args, cudaStream_t stream) {
  dispatch_logits_dtype(args.dtype, [&](auto tag) { rows_typed<typename decltype(tag)::type>(args, stream); });
}

void launch_backward(const BackwardArgs& args, cudaStream_t stream) {
  dispatch_logits_dtype(args.dtype, [&](auto tag) { backward_typed<typename decltype(tag)::type>(args, stream); });
}

void launch_finalize(const FinalizeArgs& args, cudaStream_t stream) {
  if (args.is_double) {
    finalize_typed<double>(args, stream);
  } else {
    finalize_typed<float>(args, stream);
  }
}

}  // namespace cuda
}  // namespace robustloss
