// The cross-row step (SPEC §5, §9.4) on the device, in double: from the
// row pass's rows (N, 7) = (m, ls, log w, x, alpha, beta, gamma), the target
// and the weights, the forward op's value and stats (N, 5) = (m, ls, alpha,
// beta, gamma), the same as robustloss_fast/_finalize.py computes in tensor
// ops (column names: kernel_args.h, RowCol and StatCol).
//
// For "mean"/"sum", partials_kernel cuts the N rows into at most 256 chunks
// (the cut depends only on N) and reduces each with a fixed tree: (max log w,
// sum |s| e, sum s e x) with e = exp(log w - max) for derivative normalisation
// -- the log-domain softmax of SPEC §5.3, so |beta| = 1000 cannot overflow --
// else (sum s x, sum weight[y]). apply_kernel merges the partials in one fixed
// tree (every block repeats the same tree, so every block sees bitwise the
// same D), writes the stats and the value. A row with a bad target counts
// nowhere, as an ignored row (common.cuh: bad targets).
#include "common.cuh"

namespace robustloss {
namespace cuda {
namespace {

constexpr int kFinBlock = 256;     // threads of both finalize kernels
constexpr int kMaxPartials = 256;  // == kFinBlock: apply_kernel merges one partial per thread

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
      const double lw = static_cast<double>(p.rows[kRowCols * i + kRowLogW]);
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
        const double e = exp(static_cast<double>(p.rows[kRowCols * i + kRowLogW]) - m);
        d += fabs(r.s) * e;
        num += normalised_term(r.s, e, static_cast<double>(p.rows[kRowCols * i + kRowX]),
                               static_cast<double>(p.rows[kRowCols * i + kRowLogW]));
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
      if (r.s != 0.0) total += r.s * static_cast<double>(p.rows[kRowCols * i + kRowX]);
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
// (m, ls, alpha, beta, gamma) and, for "none", the value. Normalised: (coef,
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
    const acc_t* row = p.rows + kRowCols * i;
    acc_t* st = p.stats + kStatCols * i;
    st[kStatM] = row[kRowM];
    st[kStatLs] = row[kRowLs];
    if (p.normalised) {
      // D = g1 (NaN passes the test: it must reach every row that counts). G
      // = 0 for a row with no finite non-target logit (SPEC §3); it still
      // counts in D.
      double coef = 0.0;
      if (counts && g1 != 0.0 && row[kRowM] != -inf<acc_t>())
        coef = r.s * exp(static_cast<double>(row[kRowLogW]) - g0) / (2.0 * g1);
      st[kStatAlpha] = static_cast<acc_t>(coef);
      st[kStatBeta] = acc_t(0);
      st[kStatGamma] = static_cast<acc_t>(-coef);
    } else {
      // PyTorch's mean: D = sum weight[y] over the valid rows.
      double scale = counts ? r.s : 0.0;
      if (p.reduction == kMean) scale = g1 != 0.0 ? scale / g1 : 0.0;
#pragma unroll
      for (int k = 0; k < 3; ++k) {
        st[kStatAlpha + k] =
            scale == 0.0 ? acc_t(0) : static_cast<acc_t>(scale * static_cast<double>(row[kRowAlpha + k]));
      }
    }
    if (p.reduction == kNone) p.value[i] = counts ? static_cast<acc_t>(r.s * static_cast<double>(row[kRowX])) : acc_t(0);
  }

  if (blockIdx.x == 0 && t == 0 && p.reduction != kNone) {
    double v;
    if (p.normalised) v = g1 != 0.0 ? g2 / g1 : 0.0;
    else if (p.reduction == kSum) v = g0;
    else v = g1 != 0.0 ? g0 / g1 : 0.0;
    p.value[0] = static_cast<acc_t>(v);
    // log D = max log w + log(sum |s| exp(log w - max)); -inf when no row counts.
    if (p.log_den && p.normalised) *p.log_den = static_cast<acc_t>(g0 == -inf<double>() ? g0 : g0 + log(g1));
  }
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
  if (p.reduction != kNone) {
    partials_kernel<acc_t><<<static_cast<int>(p.num_partials), kFinBlock, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  apply_kernel<acc_t><<<grid_for(ceil_div(a.n, kFinBlock)), kFinBlock, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int64_t finalize_workspace_size(int64_t n) { return n > 0 ? 3 * num_partials(n) : 0; }

void launch_finalize(const FinalizeArgs& args, cudaStream_t stream) {
  if (args.is_double) {
    finalize_typed<double>(args, stream);
  } else {
    finalize_typed<float>(args, stream);
  }
}

}  // namespace cuda
}  // namespace robustloss
