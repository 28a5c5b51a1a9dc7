// The robustloss op library: schemas here, kernels per dispatch key in
// cpu/robust_ce_cpu.cpp and cuda/. Fake kernels and autograd are registered
// from Python (robustloss_fast/_ops.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(robustloss, m) {
  // Fused forward: (value, stats); stats (N, 2) = (lse_nt, coef) per row, where
  // grad_logits = g * coef * (r - e_y). value is (N,) for reduction 0 (none),
  // a scalar for 1 (mean) and 2 (sum).
  m.def(
      "robust_ce_forward(Tensor logits, Tensor target, int scheme, float a, float b, Tensor? weight, "
      "Tensor? sample_weight, int ignore_index, int reduction, bool normalize) -> (Tensor, Tensor)");
  m.def("robust_ce_backward(Tensor grad, Tensor logits, Tensor target, Tensor stats, int ignore_index) -> Tensor");
  // The row pass alone: (N, 3) = (lse_nt, log w, x) per row.
  m.def(
      "robust_ce_rows(Tensor logits, Tensor target, int scheme, float a, float b, int ignore_index, "
      "bool normalised) -> Tensor");
}

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
