// Argument checks shared by the CPU and CUDA op layers. Messages name the
// argument and the bad value; the Python API has already canonicalised shapes,
// so these guard direct calls of the ops (torch.ops.robustloss.*).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "robustloss/kernel_args.h"
#include "robustloss/schemes.h"

namespace robustloss {

inline at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// 2-D float logits whose classes are contiguous (rows may have any stride).
inline at::Tensor check_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2, "robustloss: logits must be 2-D (N, C), got shape ", logits.sizes());
  const auto t = logits.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "robustloss: logits must be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK(logits.size(1) >= 1, "robustloss: logits need at least one class (C >= 1)");
  if (logits.stride(1) != 1 || (logits.size(0) > 1 && logits.stride(0) < logits.size(1))) return logits.contiguous();
  return logits;
}

// The logits of the in-place backward: written over, so used as they are.
inline void check_inplace_logits(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(),
              "robustloss: the in-place backward needs contiguous 2-D logits, got shape ", logits.sizes(),
              " and strides ", logits.strides());
  check_logits(logits);
}

inline at::Tensor check_target_shape(const at::Tensor& target, const at::Tensor& logits) {
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "robustloss: target must have shape (",
              logits.size(0), ",), got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "robustloss: target must be int64, got ", target.scalar_type());
  TORCH_CHECK(target.device() == logits.device(), "robustloss: target is on ", target.device(),
              " but logits are on ", logits.device());
  return target.contiguous();
}

inline void check_scheme(int64_t scheme) {
  TORCH_CHECK(scheme >= 0 && scheme < kNumSchemes, "robustloss: unknown scheme id ", scheme);
}

// Two-term schemes have no emphasis w(p) to normalise over the batch.
inline void check_normalisable(int64_t scheme, bool normalised) {
  TORCH_CHECK_VALUE(!(normalised && is_two_term(scheme)),
                    "robustloss: derivative normalisation (normalize=True) is not defined for scheme id ", scheme,
                    " (label smoothing, NCE/APL have a second gradient term); use normalize=False");
}

inline void check_reduction(int64_t reduction) {
  TORCH_CHECK(reduction == kNone || reduction == kMean || reduction == kSum,
              "robustloss: reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

inline c10::optional<at::Tensor> check_weight(const c10::optional<at::Tensor>& weight, const at::Tensor& logits) {
  if (!weight.has_value()) return c10::nullopt;
  TORCH_CHECK(weight->dim() == 1 && weight->size(0) == logits.size(1), "robustloss: weight must have shape (",
              logits.size(1), ",), got ", weight->sizes());
  TORCH_CHECK(weight->device() == logits.device(), "robustloss: weight is on ", weight->device(),
              " but logits are on ", logits.device());
  return weight->to(acc_dtype(logits)).contiguous();
}

inline c10::optional<at::Tensor> check_sample_weight(const c10::optional<at::Tensor>& sw, const at::Tensor& logits) {
  if (!sw.has_value()) return c10::nullopt;
  TORCH_CHECK(sw->dim() == 1 && sw->size(0) == logits.size(0), "robustloss: sample_weight must have shape (",
              logits.size(0), ",), got ", sw->sizes());
  TORCH_CHECK(sw->device() == logits.device(), "robustloss: sample_weight is on ", sw->device(),
              " but logits are on ", logits.device());
  return sw->to(acc_dtype(logits)).contiguous();
}

inline at::Tensor check_stats(const at::Tensor& stats, const at::Tensor& logits) {
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == logits.size(0) && stats.size(1) == kStatCols,
              "robustloss: stats must have shape (", logits.size(0), ", ", int(kStatCols), "), got ", stats.sizes());
  TORCH_CHECK(stats.device() == logits.device(), "robustloss: stats is on ", stats.device(), " but logits are on ",
              logits.device());
  return stats.to(acc_dtype(logits)).contiguous();
}

// The upstream gradient: one value (reductions "mean"/"sum") or one per row ("none").
inline at::Tensor check_grad(const at::Tensor& grad, const at::Tensor& logits) {
  TORCH_CHECK(grad.dim() == 0 || (grad.dim() == 1 && grad.size(0) == logits.size(0)),
              "robustloss: grad must be a scalar or have shape (", logits.size(0), ",), got ", grad.sizes());
  return grad.to(logits.device(), acc_dtype(logits)).contiguous();
}

// The rows of robust_ce_finalize: (N, 7) in an accumulator type, contiguous.
inline at::Tensor check_rows(const at::Tensor& rows) {
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) == kRowCols, "robustloss: rows must have shape (N, ", int(kRowCols),
              "), got ", rows.sizes());
  TORCH_CHECK(rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kDouble,
              "robustloss: rows must be float32 or float64, got ", rows.scalar_type());
  return rows.contiguous();
}

// A per-class or per-row vector of robust_ce_finalize, in the rows' type.
inline c10::optional<at::Tensor> check_vector(const c10::optional<at::Tensor>& v, const at::Tensor& rows,
                                              const char* name, int64_t size = -1) {
  if (!v.has_value()) return c10::nullopt;
  TORCH_CHECK(v->dim() == 1 && (size < 0 || v->size(0) == size), "robustloss: ", name, " must be 1-D",
              size < 0 ? "" : " with one entry per row", ", got shape ", v->sizes());
  TORCH_CHECK(v->device() == rows.device(), "robustloss: ", name, " is on ", v->device(), " but rows are on ",
              rows.device());
  return v->to(rows.scalar_type()).contiguous();
}

inline RowsArgs make_rows_args(const at::Tensor& logits, const at::Tensor& target, int64_t scheme, double a, double b,
                               const c10::optional<at::Tensor>& smooth_weight, int64_t ignore_index, bool normalised,
                               at::Tensor& rows) {
  RowsArgs args;
  args.dtype = logits.scalar_type();
  args.logits = logits.const_data_ptr();
  args.n = logits.size(0);
  args.c = logits.size(1);
  args.row_stride = logits.stride(0);
  args.target = target.const_data_ptr<int64_t>();
  args.ignore_index = ignore_index;
  args.scheme = scheme;
  args.a = a;
  args.b = b;
  args.normalised = normalised;
  args.smooth_weight = smooth_weight.has_value() ? smooth_weight->const_data_ptr() : nullptr;
  args.rows = rows.data_ptr();
  return args;
}

inline BackwardArgs make_backward_args(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& target,
                                       const at::Tensor& stats, const c10::optional<at::Tensor>& smooth_weight,
                                       int64_t ignore_index, at::Tensor& out) {
  BackwardArgs args;
  args.dtype = logits.scalar_type();
  args.logits = logits.const_data_ptr();
  args.n = logits.size(0);
  args.c = logits.size(1);
  args.row_stride = logits.stride(0);
  args.target = target.const_data_ptr<int64_t>();
  args.ignore_index = ignore_index;
  args.stats = stats.const_data_ptr();
  args.smooth_weight = smooth_weight.has_value() ? smooth_weight->const_data_ptr() : nullptr;
  args.grad = grad.const_data_ptr();
  args.grad_per_row = grad.dim() == 1;
  args.out = out.data_ptr();
  return args;
}

// The message of a bad target, shared by every backend.
#define ROBUSTLOSS_BAD_TARGET_MSG(value, position, num_classes, ignore_index)                                   \
  "robust_cross_entropy: target value ", (value), " (at flat position ", (position), ") is out of bounds for ", \
      (num_classes), " classes; expected 0..", (num_classes)-1, " or ignore_index=", (ignore_index)

}  // namespace robustloss
