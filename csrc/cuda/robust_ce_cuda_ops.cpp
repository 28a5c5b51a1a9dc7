// CUDA implementations of the robustloss ops: argument checks, device guard,
// stream, launches of the kernels (rows.cu, finalize.cu, backward.cu), and the
// bad-target read-back. Autograd and fake kernels are registered once, in Python
// (robustloss_fast/_ops.py), for every dispatch key.
//
// Cost of the target check (see "Bad targets" in common.cuh): the forward
// and rows ops each copy one int64 back to the host and synchronise the
// current stream once; the backward op never synchronises.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
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

// A device slot for the first row with a bad target: starts at n ("none").
at::Tensor bad_target_slot(const at::Tensor& target) {
  return at::full({1}, target.size(0), target.options());
}

// Reads the slot back (one small copy, one sync) and raises IndexError naming
// the bad value. Skipped while the stream is captured into a CUDA graph, where
// a sync is illegal: the kernels skipped the bad rows, which then hold NaN.
void raise_if_bad_target(const at::Tensor& slot, const at::Tensor& target, int64_t c, int64_t ignore_index) {
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return;
  const int64_t pos = slot.item<int64_t>();
  if (pos < target.size(0)) {
    const int64_t value = target[pos].item<int64_t>();
    TORCH_CHECK_INDEX(false, ROBUSTLOSS_BAD_TARGET_MSG(value, pos, c, ignore_index));
  }
}

void launch_rows_for(const at::Tensor& logits, const at::Tensor& target, int64_t scheme, double a, double b,
                     const c10::optional<at::Tensor>& smooth_weight, int64_t ignore_index, bool normalised,
                     at::Tensor& rows, at::Tensor& slot) {
  RowsArgs args = make_rows_args(logits, target, scheme, a, b, smooth_weight, ignore_index, normalised, rows);
  args.first_bad = slot.data_ptr<int64_t>();
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
  at::Tensor slot = bad_target_slot(target);
  launch_rows_for(logits, target, scheme, a, b, u, ignore_index, normalised, rows, slot);
  raise_if_bad_target(slot, target, logits.size(1), ignore_index);
  return rows;
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
  at::Tensor slot = bad_target_slot(target);
  launch_rows_for(logits, target, scheme, a, b, u, ignore_index, normalised, rows, slot);

  at::Tensor workspace = at::empty({cuda::finalize_workspace_size(n)}, logits.options().dtype(at::kDouble));
  cuda::FinalizeArgs fin;
  fin.is_double = acc == at::kDouble;
  fin.rows = rows.const_data_ptr();
  fin.target = target.const_data_ptr<int64_t>();
  fin.n = n;
  fin.c = logits.size(1);
  fin.ignore_index = ignore_index;
  fin.weight = weight.has_value() ? weight->const_data_ptr() : nullptr;
  fin.sample_weight = sw.has_value() ? sw->const_data_ptr() : nullptr;
  fin.reduction = reduction;
  fin.normalize = normalize;
  fin.weight_in_rows = smooth;
  fin.workspace = workspace.data_ptr<double>();
  fin.value = value.data_ptr();
  fin.stats = stats.data_ptr();
  cuda::launch_finalize(fin, c10::cuda::getCurrentCUDAStream());

  raise_if_bad_target(slot, target, logits.size(1), ignore_index);
  return {value, stats};
}

at::Tensor backward_cuda(const at::Tensor& grad_in, const at::Tensor& logits_in, const at::Tensor& target_in,
                         const at::Tensor& stats_in, const c10::optional<at::Tensor>& smooth_weight_in,
                         int64_t ignore_index, int64_t scheme, double a) {
  check_on_cuda(logits_in, "logits");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = check_logits(logits_in);
  const at::Tensor target = check_target_shape(target_in, logits);
  const at::Tensor stats = check_stats(stats_in, logits);
  const at::Tensor grad = check_grad(grad_in, logits);
  const auto u = check_weight(smooth_weight_in, logits);
  at::Tensor out = at::empty({logits.size(0), logits.size(1)}, logits.options());
  if (logits.size(0) == 0) return out;
  BackwardArgs args = make_backward_args(grad, logits, target, stats, u, ignore_index, out);
  args.scheme = scheme;  // NFL reads its stats in P-form, with its gamma = a
  args.a = a;
  cuda::launch_backward(args, c10::cuda::getCurrentCUDAStream());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(robustloss, CUDA, m) {
  m.impl("robust_ce_forward", &forward_cuda);
  m.impl("robust_ce_backward", &backward_cuda);
  m.impl("robust_ce_rows", &rows_cuda);
}

}  // namespace robustloss
