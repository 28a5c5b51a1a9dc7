// CUDA implementations of the robustloss ops: argument checks, device guard,
// stream and the launches of the kernels (rows.cu, finalize.cu, backward.cu).
// Autograd is registered once in C++ (ops.cpp), the fake kernels in Python
// (robustloss_fast/backends/compiled.py), for every dispatch key.
//
// No op reads anything back from the device: a bad target stops the row
// kernel with a device-side assertion ("Bad targets" in common.cuh), so a
// training step never synchronises the host with the stream.
#include <limits>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "robust_ce_cuda.h"
#include "robustloss/checks.h"
#include "robustloss/schemes.h"

namespace robustloss {
namespace {

void check_on_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "robustloss: the CUDA kernel got ", name, " on ", t.device());
}

void launch_rows_for(const at::Tensor& logits, const at::Tensor& target, int64_t scheme, double a, double b,
                     const c10::optional<at::Tensor>& smooth_weight, int64_t ignore_index, bool normalised,
                     at::Tensor& rows) {
  RowsArgs args = make_rows_args(logits, target, scheme, a, b, smooth_weight, ignore_index, normalised, rows);
  cuda::launch_rows(args, c10::cuda::getCurrentCUDAStream());
}

at::Tensor rows_cuda(const at::Tensor& logits_in, const at::Tensor& target_in, int64_t scheme, double a, double b,
                     const c10::optional<at::Tensor>& smooth_weight_in, int64_t ignore_index, bool normalised) {
  check_on_cuda(logits_in, "logits");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = check_logits(logits_in);
  const at::Tensor target = check_target_shape(target_in, logits);
  check_scheme(scheme);
  check_normalisable(scheme, normalised);
  const auto u = check_weight(smooth_weight_in, logits);
  const int64_t n = logits.size(0);
  at::Tensor rows = at::empty({n, kRowCols}, logits.options().dtype(acc_dtype(logits)));
  if (n == 0) return rows;
  launch_rows_for(logits, target, scheme, a, b, u, ignore_index, normalised, rows);
  return rows;
}

// The cross-row step on the device (finalize.cu) for n > 0 rows of `rows`, into value and stats
// (and log D when `log_den` is given): the forward op's and robust_ce_finalize's, one launcher.
void launch_finalize_for(const at::Tensor& rows, const at::Tensor& target, int64_t num_classes,
                         const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& sw,
                         int64_t ignore_index, int64_t reduction, bool normalize, bool weight_in_rows,
                         at::Tensor& value, at::Tensor& stats, at::Tensor* log_den) {
  const int64_t n = rows.size(0);
  const int64_t scratch = cuda::finalize_workspace_size(n);  // 0: one launch, no scratch
  at::Tensor workspace = scratch > 0 ? at::empty({scratch}, rows.options().dtype(at::kDouble)) : at::Tensor();
  cuda::FinalizeArgs fin;
  fin.is_double = rows.scalar_type() == at::kDouble;
  fin.rows = rows.const_data_ptr();
  fin.target = target.const_data_ptr<int64_t>();
  fin.n = n;
  fin.c = num_classes;
  fin.ignore_index = ignore_index;
  fin.weight = weight.has_value() ? weight->const_data_ptr() : nullptr;
  fin.sample_weight = sw.has_value() ? sw->const_data_ptr() : nullptr;
  fin.reduction = reduction;
  fin.normalize = normalize;
  fin.weight_in_rows = weight_in_rows;
  fin.workspace = scratch > 0 ? workspace.data_ptr<double>() : nullptr;
  fin.value = value.data_ptr();
  fin.stats = stats.data_ptr();
  fin.log_den = log_den ? log_den->data_ptr() : nullptr;
  cuda::launch_finalize(fin, c10::cuda::getCurrentCUDAStream());
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                int64_t scheme, double a, double b,
                                                const c10::optional<at::Tensor>& weight_in,
                                                const c10::optional<at::Tensor>& sw_in, int64_t ignore_index,
                                                int64_t reduction, bool normalize) {
  check_on_cuda(logits_in, "logits");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = check_logits(logits_in);
  const at::Tensor target = check_target_shape(target_in, logits);
  check_scheme(scheme);
  check_reduction(reduction);
  const auto weight = check_weight(weight_in, logits);
  const auto sw = check_sample_weight(sw_in, logits);
  const bool normalised = reduction == kMean && normalize;
  check_normalisable(scheme, normalised);
  const auto acc = acc_dtype(logits);
  const int64_t n = logits.size(0);
  // Label smoothing weighs the classes of its smoothing sum by `weight` (PyTorch).
  const bool smooth = weight_in_rows(scheme);
  const c10::optional<at::Tensor> u = smooth ? weight : c10::nullopt;

  at::Tensor stats = at::empty({n, kStatCols}, logits.options().dtype(acc));
  if (n == 0) {  // SPEC §5: an empty batch has value 0
    at::Tensor value = reduction == kNone ? at::empty({0}, logits.options().dtype(acc))
                                          : at::zeros({}, logits.options().dtype(acc));
    return {value, stats};
  }
  at::Tensor value = reduction == kNone ? at::empty({n}, logits.options().dtype(acc))
                                        : at::empty({}, logits.options().dtype(acc));
  at::Tensor rows = at::empty({n, kRowCols}, logits.options().dtype(acc));
  launch_rows_for(logits, target, scheme, a, b, u, ignore_index, normalised, rows);

  launch_finalize_for(rows, target, logits.size(1), weight, sw, ignore_index, reduction, normalize, smooth, value,
                      stats, nullptr);
  return {value, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> finalize_cuda(const at::Tensor& rows_in, const at::Tensor& target_in,
                                                            const c10::optional<at::Tensor>& weight_in,
                                                            const c10::optional<at::Tensor>& sw_in,
                                                            int64_t ignore_index, int64_t reduction, bool normalize,
                                                            bool weight_in_rows) {
  check_on_cuda(rows_in, "rows");
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const at::Tensor rows = check_rows(rows_in);
  const int64_t n = rows.size(0);
  TORCH_CHECK(target_in.dim() == 1 && target_in.size(0) == n && target_in.scalar_type() == at::kLong,
              "robustloss: target must be int64 of shape (", n, ",), got ", target_in.scalar_type(), " ",
              target_in.sizes());
  TORCH_CHECK(target_in.device() == rows.device(), "robustloss: target is on ", target_in.device(),
              " but rows are on ", rows.device());
  const at::Tensor target = target_in.contiguous();
  const auto weight = check_vector(weight_in, rows, "weight");
  const auto sw = check_vector(sw_in, rows, "sample_weight", n);
  check_reduction(reduction);
  at::Tensor stats = at::empty({n, kStatCols}, rows.options());
  at::Tensor log_den = at::empty({}, rows.options());  // the kernel writes it (no fill launch)
  if (n == 0) {  // SPEC §5: an empty batch has value 0, and no row counts
    log_den.fill_(reduction == kMean && normalize ? -std::numeric_limits<double>::infinity() : 0.0);
    return {reduction == kNone ? at::empty({0}, rows.options()) : at::zeros({}, rows.options()), stats, log_den};
  }
  at::Tensor value = reduction == kNone ? at::empty({n}, rows.options()) : at::empty({}, rows.options());
  // The targets index the class weights only: without them any class id is in range.
  const int64_t c = weight.has_value() ? weight->size(0) : std::numeric_limits<int64_t>::max();
  launch_finalize_for(rows, target, c, weight, sw, ignore_index, reduction, normalize, weight_in_rows, value, stats,
                      &log_den);
  return {value, stats, log_den};
}

void run_backward(const at::Tensor& grad_in, const at::Tensor& logits, const at::Tensor& target_in,
                  const at::Tensor& stats_in, const c10::optional<at::Tensor>& smooth_weight_in, int64_t ignore_index,
                  int64_t scheme, double a, at::Tensor& out) {
  const at::Tensor target = check_target_shape(target_in, logits);
  const at::Tensor stats = check_stats(stats_in, logits);
  const at::Tensor grad = check_grad(grad_in, logits);
  const auto u = check_weight(smooth_weight_in, logits);
  if (logits.size(0) == 0) return;
  BackwardArgs args = make_backward_args(grad, logits, target, stats, u, ignore_index, out);
  args.scheme = scheme;  // NFL reads its stats in P-form, with its gamma = a
  args.a = a;
  cuda::launch_backward(args, c10::cuda::getCurrentCUDAStream());
}

at::Tensor backward_cuda(const at::Tensor& grad_in, const at::Tensor& logits_in, const at::Tensor& target_in,
                         const at::Tensor& stats_in, const c10::optional<at::Tensor>& smooth_weight_in,
                         int64_t ignore_index, int64_t scheme, double a) {
  check_on_cuda(logits_in, "logits");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = check_logits(logits_in);
  at::Tensor out = at::empty({logits.size(0), logits.size(1)}, logits.options());
  run_backward(grad_in, logits, target_in, stats_in, smooth_weight_in, ignore_index, scheme, a, out);
  return out;
}

void backward_inplace_cuda(at::Tensor& logits, const at::Tensor& grad_in, const at::Tensor& target_in,
                           const at::Tensor& stats_in, const c10::optional<at::Tensor>& smooth_weight_in,
                           int64_t ignore_index, int64_t scheme, double a) {
  check_on_cuda(logits, "logits");
  const c10::cuda::CUDAGuard guard(logits.device());
  check_inplace_logits(logits);
  run_backward(grad_in, logits, target_in, stats_in, smooth_weight_in, ignore_index, scheme, a, logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(robustloss, CUDA, m) {
  m.impl("robust_ce_forward", &forward_cuda);
  m.impl("robust_ce_backward", &backward_cuda);
  m.impl("robust_ce_backward_", &backward_inplace_cuda);
  m.impl("robust_ce_rows", &rows_cuda);
  m.impl("robust_ce_finalize", &finalize_cuda);
}

}  // namespace robustloss
