// The cross-row step (SPEC §5, §9.4) on the device, in double: from the
// row pass's rows (N, 7) = (m, ls, log w, x, alpha, beta, gamma), the target
// and the weights, the forward op's value and stats (N, 5) = (m, ls, alpha,
// beta, gamma), the same as robustloss_fast/_finalize.py computes in tensor
// ops (column names: kernel_args.h, RowCol and StatCol).
//
// "mean" and "sum" need the batch totals (M, D, V): with derivative
// normalisation the softmax of log w over the rows that count, in the log
// domain (SPEC §5.3, so |beta| = 1000 cannot overflow): M = max log w, D = sum
// |s| e and V = sum s e x with e = exp(log w - M); otherwise D = sum weight[y]
// (the mean's divisor) and V = sum s x. value = V / D ("mean") or V ("sum");
// the rows' stats need D. "none" needs no totals.
//
// Up to kOneBlockMaxRows rows, one_block_kernel does it all in one launch: one
// block of kOneBlock threads sums the rows (each thread a running total, then a
// fixed tree), then writes every row's stats. Above, its rows' load latencies
// add up, so two launches share the rows among many blocks: partials_kernel
// cuts them into at most kMaxPartials chunks (the cut depends only on N) and
// sums each the same way; apply_kernel merges the partials in one fixed tree
// (every block repeats it, so every block sees bitwise the same D), then its
// rows' stats. Which of the two runs depends only on N, so the order of every
// sum is the same on any GPU. A row with a bad target counts nowhere, as an
// ignored row (common.cuh: bad targets).
#include "common.cuh"

namespace robustloss {
namespace cuda {
namespace {

constexpr int kFinBlock = 256;     // threads of partials_kernel and apply_kernel
constexpr int kMaxPartials = 256;  // == kFinBlock: apply_kernel merges one partial per thread
constexpr int kOneBlock = 1024;    // threads of one_block_kernel
// At most this many rows (one per thread): one launch. Timed in a CUDA graph on
// an H200 (benchmarks/NOTES.md), the one block took 9 us at 1024 rows, 16 at
// 4096 and 27 at 8192, the two launches 10-12 us at 8193-65536 rows: one
// block's serial latency overtakes a second launch at about 1500 rows. The
// Triton backend's CROSS_ROW_ONE_PROGRAM_MAX is the same.
constexpr int64_t kOneBlockMaxRows = 1024;

// The emulator (emu/shim.h) can lower the limit, to run the two-launch path on small batches.
#ifndef RL_ONE_BLOCK_MAX_ROWS
#define RL_ONE_BLOCK_MAX_ROWS(rows) (rows)
#endif
int64_t one_block_max_rows() { return RL_ONE_BLOCK_MAX_ROWS(kOneBlockMaxRows); }

// How the rows are cut into chunks for the two-launch path: a function of n alone.
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
  double* partials;     // (num_partials, 3), two-launch path only
  int64_t num_partials, chunk;
  acc_t* value;
  acc_t* stats;
  acc_t* log_den;  // or nullptr
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

// The totals (M, D, V) of a set of rows; M is used only when normalised. No
// rows: (-inf, 0, 0).
struct Totals {
  double m, d, v;
};

__device__ __forceinline__ Totals no_rows() { return Totals{-inf<double>(), 0.0, 0.0}; }

// An infinite sum keeps its infinity under a rescale that may underflow to 0
// (the limit of any w > 0 times inf, as normalised_term keeps it per row).
__device__ __forceinline__ double rescaled(double v, double e) { return v == inf<double>() || v == -inf<double>() ? v : v * e; }

// t := the totals of the union of t's rows and o's. Normalised, each relative
// to its own M: rescaled to the larger. A NaN or +inf M (such a log w)
// poisons all three; a side whose M is below the other's by more than double's range adds
// its sums times 0, so a NaN there still reaches V.
__device__ __forceinline__ void merge(Totals& t, const Totals& o, bool normalised) {
  if (!normalised) {
    t.d += o.d;
    t.v += o.v;
    return;
  }
  const double mm = fmax(t.m, o.m);
  if (t.m != t.m || o.m != o.m || mm == inf<double>()) {  // as exp(log w - M) would make D
    t.m = t.d = t.v = nan<double>();
    return;
  }
  const double e1 = t.m == mm ? 1.0 : exp(t.m - mm);  // exp(-inf) = 0; never -inf - -inf
  const double e2 = o.m == mm ? 1.0 : exp(o.m - mm);
  t.d = t.d * e1 + o.d * e2;
  t.v = rescaled(t.v, e1) + rescaled(o.v, e2);
  t.m = mm;
}

// t := t plus row i. Normalised, the row alone is (log w, |s|, s x), or, for w
// = 0 exactly (log w = -inf), (-inf, |s| 0, s 0 x): NaN where s or x is not
// finite (normalised_term), else 0. A row with s = 0 adds nothing, even where
// its raw value overflowed (0 * inf).
template <typename acc_t>
__device__ __forceinline__ void add_row(const FinParams<acc_t>& p, int64_t i, Totals& t) {
  const RowScale r = row_scale(p, i);
  if (!r.valid) return;
  const double x = static_cast<double>(p.rows[kRowCols * i + kRowX]);
  if (!p.normalised) {
    if (r.s != 0.0) t.v += r.s * x;
    t.d += r.cw;
    return;
  }
  if (r.s == 0.0) return;
  const double lw = static_cast<double>(p.rows[kRowCols * i + kRowLogW]);
  const double e = lw == -inf<double>() ? 0.0 : 1.0;
  merge(t, Totals{lw, fabs(r.s) * e, normalised_term(r.s, e, x, lw)}, p.normalised);
}

// Every thread's totals merged in one fixed tree (every thread of the block
// calls it; the result is in every thread). sm: 3 * B doubles of shared memory.
template <int B>
__device__ __forceinline__ Totals block_merge(Totals t, bool normalised, double* sm) {
  const int k = static_cast<int>(threadIdx.x);
  sm[k] = t.m;
  sm[B + k] = t.d;
  sm[2 * B + k] = t.v;
  __syncthreads();
#pragma unroll
  for (int stride = B / 2; stride > 0; stride >>= 1) {
    if (k < stride) {
      Totals a{sm[k], sm[B + k], sm[2 * B + k]};
      merge(a, Totals{sm[k + stride], sm[B + k + stride], sm[2 * B + k + stride]}, normalised);
      sm[k] = a.m;
      sm[B + k] = a.d;
      sm[2 * B + k] = a.v;
    }
    __syncthreads();
  }
  const Totals out{sm[0], sm[B], sm[2 * B]};
  __syncthreads();  // before anyone writes sm again
  return out;
}

// The totals of rows [lo, hi): thread k sums rows lo + k, lo + k + B, ...
template <int B, typename acc_t>
__device__ __forceinline__ Totals block_totals(const FinParams<acc_t>& p, int64_t lo, int64_t hi, double* sm) {
  Totals t = no_rows();
#pragma unroll 4
  for (int64_t i = lo + threadIdx.x; i < hi; i += B) add_row(p, i, t);
  return block_merge<B>(t, p.normalised, sm);
}

// Rows first, first + step, ...: stats = (m, ls, alpha, beta, gamma) and, for
// "none", the value. Normalised: (coef, 0, -coef) with coef = s e / (2 D); else
// s_i (s_i / D for "mean") times the row's (alpha, beta, gamma).
template <typename acc_t>
__device__ __forceinline__ void apply_rows(const FinParams<acc_t>& p, const Totals& g, int64_t first, int64_t step) {
  for (int64_t i = first; i < p.n; i += step) {
    const RowScale r = row_scale(p, i);
    const bool counts = r.valid && r.s != 0.0;
    const acc_t* row = p.rows + kRowCols * i;
    acc_t* st = p.stats + kStatCols * i;
    st[kStatM] = row[kRowM];
    st[kStatLs] = row[kRowLs];
    if (p.normalised) {
      // A NaN D passes the test: it must reach every row that counts. G = 0
      // for a row with no finite non-target logit (SPEC §3); it still counts in D.
      double coef = 0.0;
      if (counts && g.d != 0.0 && row[kRowM] != -inf<acc_t>())
        coef = r.s * exp(static_cast<double>(row[kRowLogW]) - g.m) / (2.0 * g.d);
      st[kStatAlpha] = static_cast<acc_t>(coef);
      st[kStatBeta] = acc_t(0);
      st[kStatGamma] = static_cast<acc_t>(-coef);
    } else {
      // PyTorch's mean: D = sum weight[y] over the valid rows. A row that does
      // not count stays 0 even where D is NaN (a NaN class weight).
      double scale = 0.0;
      if (counts) scale = p.reduction != kMean ? r.s : g.d != 0.0 ? r.s / g.d : 0.0;
#pragma unroll
      for (int k = 0; k < 3; ++k) {
        st[kStatAlpha + k] =
            scale == 0.0 ? acc_t(0) : static_cast<acc_t>(scale * static_cast<double>(row[kRowAlpha + k]));
      }
    }
    if (p.reduction == kNone) p.value[i] = counts ? static_cast<acc_t>(r.s * static_cast<double>(row[kRowX])) : acc_t(0);
  }
}

// By one thread: the value of "mean"/"sum" (0 where D = 0) and log D = M + log D
// (-inf where D = 0, M taken as 0 when it is -inf; 0 where the loss is not
// normalised). Writing log D in every case lets the host allocate it empty: a
// zero fill would be one more launch per step.
template <typename acc_t>
__device__ __forceinline__ void store_totals(const FinParams<acc_t>& p, const Totals& g) {
  const bool totals = p.reduction != kNone;
  if (totals) p.value[0] = static_cast<acc_t>((p.normalised || p.reduction == kMean) ? (g.d != 0.0 ? g.v / g.d : 0.0) : g.v);
  if (p.log_den) {
    *p.log_den = p.normalised ? static_cast<acc_t>((g.m == -inf<double>() ? 0.0 : g.m) + log(g.d)) : acc_t(0);
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kOneBlock) one_block_kernel(const FinParams<acc_t> p) {
  __shared__ double sm[3 * kOneBlock];
  Totals g = no_rows();
  if (p.reduction != kNone) g = block_totals<kOneBlock>(p, 0, p.n, sm);
  apply_rows(p, g, threadIdx.x, kOneBlock);
  if (threadIdx.x == 0) store_totals(p, g);
}

// Block b: the totals of chunk b into partials[b].
template <typename acc_t>
__global__ void __launch_bounds__(kFinBlock) partials_kernel(const FinParams<acc_t> p) {
  __shared__ double sm[3 * kFinBlock];
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * p.chunk;
  const int64_t hi = lo + p.chunk < p.n ? lo + p.chunk : p.n;
  const Totals g = block_totals<kFinBlock>(p, lo, hi, sm);
  if (threadIdx.x == 0) {
    double* out = p.partials + 3 * static_cast<int64_t>(blockIdx.x);
    out[0] = g.m;
    out[1] = g.d;
    out[2] = g.v;
  }
}

// Every block: the partials merged (thread k holds partial k), then its rows'
// stats; block 0 writes the value.
template <typename acc_t>
__global__ void __launch_bounds__(kFinBlock) apply_kernel(const FinParams<acc_t> p) {
  __shared__ double sm[3 * kFinBlock];
  const int t = static_cast<int>(threadIdx.x);
  Totals g = no_rows();
  if (p.reduction != kNone) {
    if (t < p.num_partials) g = Totals{p.partials[3 * t], p.partials[3 * t + 1], p.partials[3 * t + 2]};
    g = block_merge<kFinBlock>(g, p.normalised, sm);
  }
  apply_rows(p, g, static_cast<int64_t>(blockIdx.x) * kFinBlock + t, static_cast<int64_t>(gridDim.x) * kFinBlock);
  if (blockIdx.x == 0 && t == 0) store_totals(p, g);
}

// ---------------------------------------------------------------------------
// Launch

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
  p.log_den = static_cast<acc_t*>(a.log_den);
  if (a.n <= one_block_max_rows()) {
    one_block_kernel<acc_t><<<1, kOneBlock, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  if (p.reduction != kNone) {
    partials_kernel<acc_t><<<static_cast<int>(p.num_partials), kFinBlock, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  apply_kernel<acc_t><<<grid_for(ceil_div(a.n, kFinBlock)), kFinBlock, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int64_t finalize_workspace_size(int64_t n) { return n > one_block_max_rows() ? 3 * num_partials(n) : 0; }

void launch_finalize(const FinalizeArgs& args, cudaStream_t stream) {
  if (args.is_double) {
    finalize_typed<double>(args, stream);
  } else {
    finalize_typed<float>(args, stream);
  }
}

}  // namespace cuda
}  // namespace robustloss
