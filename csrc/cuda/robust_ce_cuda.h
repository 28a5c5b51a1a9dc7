// Interface between the CUDA op layer (robust_ce_cuda_ops.cpp, host compiler)
// and the CUDA kernels (rows.cu, finalize.cu, backward.cu, nvcc). Plain
// pointers only, as in csrc/cpu/kernel.h: no at::Tensor crosses this line, so
// the .cu files need no ATen headers and nvcc compiles them quickly.
#pragma once

#include <c10/core/ScalarType.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "robustloss/kernel_args.h"

namespace robustloss {
namespace cuda {

using robustloss::BackwardArgs;
using robustloss::RowsArgs;

// The cross-row step (SPEC §5; finalize.cu) on the device: (value, stats) from rows (n, 7)
// = (m, ls, log w, x, alpha, beta, gamma).
struct FinalizeArgs {
  bool is_double;  // accumulator type of rows/weights/value/stats
  const void* rows;
  const int64_t* target;
  int64_t n, c, ignore_index;
  const void* weight;         // (c,) accumulator type, or nullptr
  const void* sample_weight;  // (n,) accumulator type, or nullptr
  int64_t reduction;
  bool normalize;
  bool weight_in_rows;  // label smoothing: rows already carry `weight`, so s_i is the sample weight alone
  double* workspace;    // finalize_workspace_size(n) doubles (nullptr when that is 0)
  void* value;          // (n,) for reduction none, else one element
  void* stats;          // (n, kStatCols): m, ls (NFL: of lse, copied from rows), alpha, beta, gamma
  void* log_den = nullptr;  // one element or nullptr: log D of derivative normalisation (-inf: no row counts)
};

// Doubles of scratch the finalize step needs for n rows (0 where it runs in one launch).
int64_t finalize_workspace_size(int64_t n);

// Each launches on `stream` and checks the launch; n must be > 0. One per
// pass: rows.cu, finalize.cu, backward.cu.
void launch_rows(const RowsArgs& args, cudaStream_t stream);
void launch_finalize(const FinalizeArgs& args, cudaStream_t stream);
void launch_backward(const BackwardArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace robustloss
