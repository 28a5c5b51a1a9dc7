// The robustloss op library: schemas and the autograd rule here, kernels per
// dispatch key in cpu/robust_ce_cpu.cpp and cuda/. Fake kernels are registered
// from Python (robustloss_fast/_ops.py).
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "robustloss/schemes.h"

TORCH_LIBRARY(robustloss, m) {
  // Fused forward: (value, stats); stats (N, 5) = (m, ls, alpha, beta, gamma)
  // per row, lse_nt = m + ls in its two parts (kernel_args.h: StatCol). value
  // is (N,) for reduction 0 (none), a scalar for 1 (mean) and 2 (sum). For
  // label smoothing (kCCELS) `weight` also weighs the classes of the smoothing
  // sum, as in F.cross_entropy.
  m.def(
      "robust_ce_forward(Tensor logits, Tensor target, int scheme, float a, float b, Tensor? weight, "
      "Tensor? sample_weight, int ignore_index, int reduction, bool normalize) -> (Tensor, Tensor)");
  // grad_logits[i, j] = g (alpha r_j + beta u_j) for j != y, g gamma at y;
  // u = smooth_weight (all 1 when None). scheme and a: the forward's; NFL
  // reads its stats in P-form, g (alpha P_j + beta h_a(P_j)) (schemes.h).
  m.def(
      "robust_ce_backward(Tensor grad, Tensor logits, Tensor target, Tensor stats, Tensor? smooth_weight, "
      "int ignore_index, int scheme, float a) -> Tensor");
  // The same gradient written over the logits themselves (which must be
  // contiguous): robust_cross_entropy(inplace_backward=True). Every kernel
  // reads a logit before it writes that logit's gradient, in the same thread,
  // so the one buffer serves as both.
  m.def(
      "robust_ce_backward_(Tensor(a!) logits, Tensor grad, Tensor target, Tensor stats, Tensor? smooth_weight, "
      "int ignore_index, int scheme, float a) -> ()");
  // The cross-row step alone (SPEC §5), on rows from robust_ce_rows: (value,
  // stats) as robust_ce_forward returns them, and log D = log sum |s_i| w_i for
  // derivative normalisation (-inf when no row counts; 0 otherwise), which the
  // fused linear layer needs to rescale chunks. Targets index `weight` only.
  m.def(
      "robust_ce_finalize(Tensor rows, Tensor target, Tensor? weight, Tensor? sample_weight, int ignore_index, "
      "int reduction, bool normalize, bool weight_in_rows) -> (Tensor, Tensor, Tensor)");
  // The row pass alone: (N, 7) = (m, ls, log w, x, alpha, beta, gamma) per row
  // (kernel_args.h: RowCol; schemes.h: RowGrad); smooth_weight is u of label
  // smoothing (kCCELS).
  m.def(
      "robust_ce_rows(Tensor logits, Tensor target, int scheme, float a, float b, Tensor? smooth_weight, "
      "int ignore_index, bool normalised) -> Tensor");
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Autograd of robust_ce_forward for every device: the SPEC gradient is written
// by robust_ce_backward from the saved logits and per-row stats. Registered in
// C++ (the Autograd key) rather than with torch.library.register_autograd: the
// Python autograd wrapper cost 50-70 us per step, a large share of a small-C
// step (benchmarks/README.md). torch.compile traces through it as through any
// ATen op with a C++ derivative.
class RobustCEFunction : public torch::autograd::Function<RobustCEFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               int64_t scheme, double a, double b, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& sample_weight, int64_t ignore_index,
                               int64_t reduction, bool normalize) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("robustloss::robust_ce_forward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, int64_t, double, double,
                             const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t, int64_t,
                             bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [value, stats] =
        op.call(logits, target, scheme, a, b, weight, sample_weight, ignore_index, reduction, normalize);
    // Label smoothing's second term points along the class weights.
    const bool smooth = robustloss::weight_in_rows(scheme) && weight.has_value();
    ctx->save_for_backward({logits, target, stats, smooth ? *weight : at::Tensor()});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["scheme"] = scheme;
    ctx->saved_data["a"] = a;
    ctx->mark_non_differentiable({stats});
    // The stats take no gradient: materialised, autograd would fill an (N, 5)
    // tensor of zeros for them every step (one more launch on a GPU).
    ctx->set_materialize_grads(false);
    return {value, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("robustloss::robust_ce_backward", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t,
                                           double)>();
    // The backward op has no derivative of its own: refuse create_graph=True
    // rather than return a silently missing second-order gradient.
    TORCH_CHECK(!at::GradMode::is_enabled(), "robustloss: double backward (create_graph=True) is not supported");
    if (!grads[0].defined()) return variable_list(10);  // nothing reached the value
    const auto saved = ctx->get_saved_variables();
    const int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    std::optional<at::Tensor> smooth_weight;
    if (saved[3].defined()) smooth_weight = saved[3];
    at::Tensor grad_logits = op.call(grads[0], saved[0], saved[1], saved[2], smooth_weight, ignore_index,
                                     ctx->saved_data["scheme"].toInt(), ctx->saved_data["a"].toDouble());
    // One entry per forward argument; only the logits get a gradient (the
    // emphasis is a constant for differentiation, SPEC §3).
    return {grad_logits, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(),  at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> forward_autograd(const at::Tensor& logits, const at::Tensor& target,
                                                    int64_t scheme, double a, double b,
                                                    const std::optional<at::Tensor>& weight,
                                                    const std::optional<at::Tensor>& sample_weight,
                                                    int64_t ignore_index, int64_t reduction, bool normalize) {
  auto out = RobustCEFunction::apply(logits, target, scheme, a, b, weight, sample_weight, ignore_index, reduction,
                                     normalize);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(robustloss, Autograd, m) { m.impl("robust_ce_forward", &forward_autograd); }

namespace {
PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef ROBUSTLOSS_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyObject* cpu_capability(PyObject*, PyObject*);

PyMethodDef methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "True when the CUDA kernels were compiled in."},
    {"cpu_capability", cpu_capability, METH_NOARGS, "The CPU kernel variant in use: DEFAULT, AVX2 or AVX512."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "robustloss_fast compiled ops", -1, methods};
}  // namespace

#include "cpu/kernel.h"

namespace {
PyObject* cpu_capability(PyObject*, PyObject*) { return PyUnicode_FromString(robustloss::cpu::kernels().name); }
}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
