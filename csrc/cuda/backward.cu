// The gradient pass (SPEC §3; the op robust_ce_backward of SPEC §9.2): one
// kernel reads each row of logits once and writes its gradient once, from the
// row's stats (N, 5) = (m, ls, alpha, beta, gamma) that the forward's
// cross-row step (finalize.cu) left.
//
// backward_kernel -- g (alpha r_j + beta u_j) off the target and g gamma at it
// (SPEC §8.1), r_j = exp((z_j - m) - ls) = exp(z_j - m) exp(-ls) (SPEC §2.2:
// z_j - m is exact for nearby logits at any offset; exp(-ls) folds into the
// row's factor), with the row pass's row-to-threads layout (common.cuh) and
// 16-byte stores aligned on the output row. NFL (its own instantiation) writes
// g (alpha P_j + beta h_j) with P_j = exp((z_j - m) - ls) and h_j its focal
// term, lse = m + ls from the stats' columns 0-1 (P-form, SPEC §8.5). A
// row with a bad target gets NaN: this op never synchronises to report it.
#include "common.cuh"

namespace robustloss {
namespace cuda {
namespace {

template <typename T>
struct BackwardParams {
  using acc_t = typename AccOf<T>::type;
  const T* logits;
  int64_t n, c, row_stride;
  const int64_t* target;
  int64_t ignore_index;
  const acc_t* stats;  // (n, kStatCols): m, ls, alpha, beta, gamma (NFL: lse's m, ls, then alpha, beta, gamma)
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
    const acc_t* st = p.stats + kStatCols * i;
    const acc_t m = st[kStatM], ls = st[kStatLs];  // NFL: lse's parts
    if (m != m || ls != ls) {  // a NaN row (SPEC §6): NaN everywhere, as the CPU kernel writes it
      fill_row<T, TPR>(out, p.c, static_cast<T>(nan<acc_t>()), lane);
      continue;
    }
    const acc_t g = p.grad_per_row ? p.grad[i] : p.grad[0];
    const acc_t gb = g * st[kStatBeta], gy = g * st[kStatGamma];
    // NFL multiplies P_j itself; the others fold exp(-ls) of r_j into alpha.
    const acc_t ga = NFL ? g * st[kStatAlpha] : g * st[kStatAlpha] * dexp(-ls);
    // r = 0 when no non-target logit is finite (SPEC §3); one-term rows have
    // beta = 0 and skip the load of u. (NFL has no such case: every P_j is
    // exp((z_j - m) - ls), as on the CPU.)
    [[maybe_unused]] const bool with_r = m != -inf<acc_t>();
    [[maybe_unused]] const bool with_u = gb != acc_t(0);
    const T* in = p.logits + i * p.row_stride;
    // Any element, the target included (the scalar head and tail, the general packs).
    auto grad_of = [&](int64_t j, acc_t z) -> acc_t {
      if (j == y) return gy;
      if constexpr (NFL) {
        // g (alpha P_j + beta h_j), P_j = exp((z_j - m) - ls), h_j of focal_terms_of_logit (schemes.h).
        const acc_t l = (z - m) - ls;
        const acc_t P = dexp(l);
        return ga * P + gb * focal_terms<acc_t>(p.a, l, P, -dexpm1(l)).h;
      } else {
        acc_t v = with_r ? ga * exp_elem<T>(z - m) : acc_t(0);
        if (with_u) v += gb * (p.u ? p.u[j] : acc_t(1));
        return v;
      }
    };
    auto general = [&](const Pack<T>& x, int64_t j0) {
      acc_t v[K];
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] = grad_of(j0 + k, static_cast<acc_t>(x.v[k]));
      store_pack(out + j0, pack_of<T>(v));
    };
    // The common row (a finite non-target logit, u = 1: the one-term schemes,
    // label smoothing without class weights, NCE/APL): g alpha r_j + g beta off
    // the target (g beta = 0 for one-term rows), branch-free, and the target
    // patched in once per pack -- the loop that sets the speed of a large
    // vocabulary (benchmarks/NOTES.md).
    auto plain = [&](const Pack<T>& x, int64_t j0) {
      acc_t v[K];
#pragma unroll
      for (int k = 0; k < K; ++k) v[k] = ga * exp_elem<T>(static_cast<acc_t>(x.v[k]) - m) + gb;
      set_at(v, y - j0, gy);
      store_pack(out + j0, pack_of<T>(v));
    };

    // Packs are aligned on the output row; the input shares that alignment
    // when its row starts at the same offset modulo 16 bytes (always for
    // contiguous logits), else its elements are loaded one by one. Loads take
    // the coherent path: in place (out = logits) each element is read before
    // its own thread writes it, but __ldg's read-only contract would not hold.
    const int64_t head = head_count(out, p.c);
    const bool in_packed = head_count(in, p.c) == head &&
                           (reinterpret_cast<uintptr_t>(in) % kPackBytes) == (reinterpret_cast<uintptr_t>(out) % kPackBytes);
    for (int64_t j = lane; j < head; j += TPR) out[j] = static_cast<T>(grad_of(j, static_cast<acc_t>(in[j])));
    const int64_t npack = (p.c - head) / K;
    auto packs = [&](auto emit) {
      if (in_packed) {
        constexpr int kU = NFL ? kFocalUnroll : kUnroll;
        int64_t q = lane;
        for (; q + (kU - 1) * TPR < npack; q += kU * TPR) {
          Pack<T> x[kU];
#pragma unroll
          for (int u = 0; u < kU; ++u) x[u] = load_pack_coherent(in + head + (q + u * TPR) * K);
#pragma unroll
          for (int u = 0; u < kU; ++u) emit(x[u], head + (q + u * TPR) * K);
        }
        if constexpr (kU > 1) {
          for (; q < npack; q += TPR) emit(load_pack_coherent(in + head + q * K), head + q * K);
        }
      } else {
        for (int64_t q = lane; q < npack; q += TPR) {
          Pack<T> x;
#pragma unroll
          for (int k = 0; k < K; ++k) x.v[k] = in[head + q * K + k];
          emit(x, head + q * K);
        }
      }
    };
    if (!NFL && with_r && p.u == nullptr) {
      packs(plain);
    } else {
      packs(general);
    }
    for (int64_t j = head + npack * K + lane; j < p.c; j += TPR) out[j] = static_cast<T>(grad_of(j, static_cast<acc_t>(in[j])));
  }
}

// ---------------------------------------------------------------------------
// Launch

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

}  // namespace

void launch_backward(const BackwardArgs& args, cudaStream_t stream) {
  dispatch_logits_dtype(args.dtype, [&](auto tag) { backward_typed<typename decltype(tag)::type>(args, stream); });
}

}  // namespace cuda
}  // namespace robustloss
