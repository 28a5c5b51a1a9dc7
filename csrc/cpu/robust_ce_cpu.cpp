// CPU implementations of the robustloss ops: argument checks, the fused row
// kernel, and the cross-row step (emphasis normalisation and reduction).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "kernel.h"
#include "robustloss/checks.h"
#include "robustloss/schemes.h"

namespace robustloss {
namespace {

// Shape and dtype, then every value: a bad target raises IndexError naming it
// before any kernel reads a logit.
at::Tensor check_target(const at::Tensor& target_in, const at::Tensor& logits, int64_t ignore_index) {
  at::Tensor target = check_target_shape(target_in, logits);
  TORCH_CHECK(target.device().is_cpu(), "robustloss: CPU kernel got target on ", target.device());
  const int64_t* t = target.const_data_ptr<int64_t>();
  const int64_t n = target.size(0), c = logits.size(1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = t[i];
    if (v != ignore_index && (v < 0 || v >= c)) {
      TORCH_CHECK_INDEX(false, ROBUSTLOSS_BAD_TARGET_MSG(v, i, c, ignore_index));
    }
  }
  return target;
}

// The cross-row step of SPEC §5, in double, sequentially (deterministic and
// O(N): small next to the O(N C) row pass). rows = (m, ls, log w, x, alpha,
// beta, gamma); stats = (m, ls, alpha, beta, gamma), the coefficients scaled
// by s_i / D (kernel_args.h: RowCol, StatCol).
// weight_in_rows (label smoothing): the rows already carry the class weights,
// so s_i is the sample weight alone; the mean's D is still sum weight[y_i].
template <typename acc_t>
void finalize(const at::Tensor& rows_t, const at::Tensor& target_t, const c10::optional<at::Tensor>& weight_t,
              const c10::optional<at::Tensor>& sw_t, int64_t ignore_index, int64_t reduction, bool normalize,
              bool weight_in_rows, at::Tensor& value_t, at::Tensor& stats_t, acc_t* log_den = nullptr) {
  const int64_t n = rows_t.size(0);
  const acc_t* rows = rows_t.const_data_ptr<acc_t>();
  const int64_t* target = target_t.const_data_ptr<int64_t>();
  const acc_t* weight = weight_t.has_value() ? weight_t->const_data_ptr<acc_t>() : nullptr;
  const acc_t* sw = sw_t.has_value() ? sw_t->const_data_ptr<acc_t>() : nullptr;
  acc_t* stats = stats_t.data_ptr<acc_t>();
  acc_t* value = value_t.data_ptr<acc_t>();
  const double inf = std::numeric_limits<double>::infinity();

  auto s_of = [&](int64_t i) {
    double s = 1.0;
    if (weight && !weight_in_rows) s *= static_cast<double>(weight[target[i]]);
    if (sw) s *= static_cast<double>(sw[i]);
    return s;
  };
  auto row = [&](int64_t i, int col) { return rows[kRowCols * i + col]; };
  auto stat = [&](int64_t i, int col) -> acc_t& { return stats[kStatCols * i + col]; };
  for (int64_t i = 0; i < n; ++i) {
    stat(i, kStatM) = row(i, kRowM);
    stat(i, kStatLs) = row(i, kRowLs);
    stat(i, kStatAlpha) = stat(i, kStatBeta) = stat(i, kStatGamma) = 0;
  }

  if (reduction == kMean && normalize) {
    // Normalised weights = softmax of log w over the rows that count: shift
    // by the largest log-weight so nothing overflows (|beta| up to 1000+).
    double m = -inf;
    bool saw_nan = false;
    for (int64_t i = 0; i < n; ++i) {
      if (target[i] == ignore_index || s_of(i) == 0.0) continue;
      const double lw = row(i, kRowLogW);
      if (std::isnan(lw)) saw_nan = true;
      else m = std::max(m, lw);
    }
    if (saw_nan) m = std::numeric_limits<double>::quiet_NaN();
    // Every row that counts has w = 0 (or none counts): shift by 0, so that each adds |s| 0 to D,
    // which is NaN for a NaN or infinite s.
    const double shift = m == -inf ? 0.0 : m;
    // One exp per row: coef first holds s * exp(log w - m), then is scaled by 1 / (2 D).
    double denom = 0.0, num = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      if (target[i] == ignore_index) continue;
      const double s = s_of(i);
      if (s == 0.0) continue;
      // exp in the accumulator type (expf for float input: several times
      // cheaper than exp in double, and as exact as the row statistics).
      const double e = static_cast<double>(std::exp(static_cast<acc_t>(row(i, kRowLogW) - static_cast<acc_t>(shift))));
      const double se = s * e;
      denom += std::fabs(se);
      num += normalised_term(s, e, static_cast<double>(row(i, kRowX)), static_cast<double>(row(i, kRowLogW)));
      stat(i, kStatAlpha) = static_cast<acc_t>(se);
    }
    if (denom != 0.0) {  // NaN passes too: it must reach every row
      const double scale = 1.0 / (2.0 * denom);
      for (int64_t i = 0; i < n; ++i) {
        if (target[i] == ignore_index || s_of(i) == 0.0) continue;  // rows that do not count keep coef 0
        // G = 0 for a row with no finite non-target logit (SPEC §3); it still counts in D.
        const acc_t coef = row(i, kRowM) == -static_cast<acc_t>(inf) ? acc_t(0) : static_cast<acc_t>(stat(i, kStatAlpha) * scale);
        stat(i, kStatAlpha) = coef;
        stat(i, kStatGamma) = -coef;
      }
      value[0] = static_cast<acc_t>(num / denom);
    } else {
      for (int64_t i = 0; i < n; ++i) stat(i, kStatAlpha) = 0;  // D = 0: no gradient at all (SPEC §5)
      value[0] = 0;
    }
    // log D = m + log(sum |s| exp(log w - m)); -inf where D = 0 (no row counts, or all have w = 0).
    if (log_den) *log_den = static_cast<acc_t>(shift + std::log(denom));
    return;
  }

  // The mean's divisor first (it needs the targets only), so each row's
  // coefficients are scaled as they are written, in one pass over the rows.
  double denom = 0.0;
  if (reduction == kMean)
    for (int64_t i = 0; i < n; ++i)
      if (target[i] != ignore_index) denom += weight ? static_cast<double>(weight[target[i]]) : 1.0;
  // PyTorch's rule: the mean divides by the summed class weights of the valid
  // rows; when they sum to 0 nothing has a gradient (not 0 * inf = NaN).
  const bool none_count = reduction == kMean && denom == 0.0;
  const double inv = reduction == kMean && !none_count ? 1.0 / denom : 1.0;
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (target[i] == ignore_index) {
      if (reduction == kNone) value[i] = 0;
      continue;
    }
    const double s = s_of(i);
    // A row with s = 0 contributes 0, even where its raw weight overflowed (0 * inf).
    const double sx = s == 0.0 ? 0.0 : s * static_cast<double>(row(i, kRowX));
    const double scale = s * inv;
    for (int k = 0; k < 3; ++k)
      stat(i, kStatAlpha + k) =
          s == 0.0 || none_count ? acc_t(0) : static_cast<acc_t>(scale * static_cast<double>(row(i, kRowAlpha + k)));
    if (reduction == kNone) value[i] = static_cast<acc_t>(sx);
    total += sx;
  }
  if (reduction == kSum) {
    value[0] = static_cast<acc_t>(total);
  } else if (reduction == kMean) {
    value[0] = none_count ? acc_t(0) : static_cast<acc_t>(total / denom);
  }
}

// A large gradient is a fresh mapping whose first touch page-faults 4 KiB at a
// time: at 512 x 32000 fp32 that was 13 of the 16.5 ms of the backward pass
// (benchmarks/results/profile_cpu_ops_*.md). Asking for transparent huge pages
// (where the kernel allows them on request) makes it 512 times fewer faults.
// Only above 32 MiB: smaller blocks come warm from the allocator's heap.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = t.nbytes();
  if (bytes < (size_t(32) << 20)) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice only
#else
  (void)t;
#endif
}

at::Tensor rows_cpu(const at::Tensor& logits_in, const at::Tensor& target_in, int64_t scheme, double a, double b,
                    const c10::optional<at::Tensor>& smooth_weight_in, int64_t ignore_index, bool normalised) {
  const at::Tensor logits = check_logits(logits_in);
  const at::Tensor target = check_target(target_in, logits, ignore_index);
  check_scheme(scheme);
  check_normalisable(scheme, normalised);
  const auto u = check_weight(smooth_weight_in, logits);
  at::Tensor rows = at::empty({logits.size(0), kRowCols}, logits.options().dtype(acc_dtype(logits)));
  cpu::kernels().rows(make_rows_args(logits, target, scheme, a, b, u, ignore_index, normalised, rows));
  return rows;
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                               int64_t scheme, double a, double b,
                                               const c10::optional<at::Tensor>& weight_in,
                                               const c10::optional<at::Tensor>& sw_in, int64_t ignore_index,
                                               int64_t reduction, bool normalize) {
  const at::Tensor logits = check_logits(logits_in);
  const at::Tensor target = check_target(target_in, logits, ignore_index);
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

  at::Tensor rows = at::empty({n, kRowCols}, logits.options().dtype(acc));
  cpu::kernels().rows(make_rows_args(logits, target, scheme, a, b, u, ignore_index, normalised, rows));

  at::Tensor value = reduction == kNone ? at::empty({n}, logits.options().dtype(acc))
                                        : at::empty({}, logits.options().dtype(acc));
  at::Tensor stats = at::empty({n, kStatCols}, logits.options().dtype(acc));
  if (acc == at::kDouble) {
    finalize<double>(rows, target, weight, sw, ignore_index, reduction, normalize, smooth, value, stats);
  } else {
    finalize<float>(rows, target, weight, sw, ignore_index, reduction, normalize, smooth, value, stats);
  }
  return {value, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> finalize_cpu(const at::Tensor& rows_in, const at::Tensor& target_in,
                                                           const c10::optional<at::Tensor>& weight_in,
                                                           const c10::optional<at::Tensor>& sw_in,
                                                           int64_t ignore_index, int64_t reduction, bool normalize,
                                                           bool weight_in_rows) {
  const at::Tensor rows = check_rows(rows_in);
  const int64_t n = rows.size(0);
  TORCH_CHECK(target_in.dim() == 1 && target_in.size(0) == n && target_in.scalar_type() == at::kLong,
              "robustloss: target must be int64 of shape (", n, ",), got ", target_in.scalar_type(), " ",
              target_in.sizes());
  const at::Tensor target = target_in.contiguous();
  const auto weight = check_vector(weight_in, rows, "weight");
  const auto sw = check_vector(sw_in, rows, "sample_weight", n);
  check_reduction(reduction);
  if (weight.has_value()) {  // the targets index the class weights
    const int64_t* t = target.const_data_ptr<int64_t>();
    const int64_t c = weight->size(0);
    for (int64_t i = 0; i < n; ++i)
      if (t[i] != ignore_index && (t[i] < 0 || t[i] >= c))
        TORCH_CHECK_INDEX(false, ROBUSTLOSS_BAD_TARGET_MSG(t[i], i, c, ignore_index));
  }
  at::Tensor value = reduction == kNone ? at::empty({n}, rows.options()) : at::empty({}, rows.options());
  at::Tensor stats = at::empty({n, kStatCols}, rows.options());
  at::Tensor log_den = at::zeros({}, rows.options());
  if (rows.scalar_type() == at::kDouble) {
    finalize<double>(rows, target, weight, sw, ignore_index, reduction, normalize, weight_in_rows, value, stats,
                     log_den.data_ptr<double>());
  } else {
    finalize<float>(rows, target, weight, sw, ignore_index, reduction, normalize, weight_in_rows, value, stats,
                    log_den.data_ptr<float>());
  }
  return {value, stats, log_den};
}

void run_backward(const at::Tensor& grad_in, const at::Tensor& logits, const at::Tensor& target_in,
                  const at::Tensor& stats_in, const c10::optional<at::Tensor>& smooth_weight_in, int64_t ignore_index,
                  int64_t scheme, double a, at::Tensor& out) {
  const at::Tensor target = check_target(target_in, logits, ignore_index);
  const at::Tensor stats = check_stats(stats_in, logits);
  const at::Tensor grad = check_grad(grad_in, logits);
  const auto u = check_weight(smooth_weight_in, logits);
  BackwardArgs args = make_backward_args(grad, logits, target, stats, u, ignore_index, out);
  args.scheme = scheme;
  args.a = a;
  cpu::kernels().backward(args);
}

at::Tensor backward_cpu(const at::Tensor& grad_in, const at::Tensor& logits_in, const at::Tensor& target_in,
                        const at::Tensor& stats_in, const c10::optional<at::Tensor>& smooth_weight_in,
                        int64_t ignore_index, int64_t scheme, double a) {
  const at::Tensor logits = check_logits(logits_in);
  at::Tensor out = at::empty({logits.size(0), logits.size(1)}, logits.options());
  advise_huge_pages(out);
  run_backward(grad_in, logits, target_in, stats_in, smooth_weight_in, ignore_index, scheme, a, out);
  return out;
}

void backward_inplace_cpu(at::Tensor& logits, const at::Tensor& grad_in, const at::Tensor& target_in,
                          const at::Tensor& stats_in, const c10::optional<at::Tensor>& smooth_weight_in,
                          int64_t ignore_index, int64_t scheme, double a) {
  check_inplace_logits(logits);
  run_backward(grad_in, logits, target_in, stats_in, smooth_weight_in, ignore_index, scheme, a, logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(robustloss, CPU, m) {
  m.impl("robust_ce_forward", &forward_cpu);
  m.impl("robust_ce_backward", &backward_cpu);
  m.impl("robust_ce_backward_", &backward_inplace_cpu);
  m.impl("robust_ce_rows", &rows_cpu);
  m.impl("robust_ce_finalize", &finalize_cpu);
}

}  // namespace robustloss
