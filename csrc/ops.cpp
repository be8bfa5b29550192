// Schemas of the compiled dsl ops (namespace dsl_C).
//
// dsl_C is the namespace of the compiled kernels only; the op layer (schemas users and
// torch.compile see, fake impls, autograd) is dsl:: in dsl_kernels/ops/<op>.py. The semantics
// and argument order are those of the reference implementations
// (dsl_kernels/backends/reference/<op>.py), so dsl_kernels/backends/{cpu,cuda}/<op>.py register
// these ops as the backend's implementation as they are. Kernels are registered per dispatch key:
//   CPU  -> csrc/cpu/*.cpp          (TORCH_LIBRARY_IMPL(dsl_C, CPU, m), built into dsl_kernels._C)
//   CUDA -> csrc/cuda/binding.cpp   (TORCH_LIBRARY_IMPL(dsl_C, CUDA, m), built into _C_cuda)
// Other files may add ops with TORCH_LIBRARY_FRAGMENT(dsl_C, m) (e.g. the fused optimizer).
//
// Conventions (see dsl_kernels/format.py): offsets are CSR with num_bags + 1 entries and the dtype of
// indices (int32/int64); mode 0/1/2 = sum/mean/max; padding_idx -1 = none; row_ptr int32[N+1],
// row_slots int32[C], row_mask int64[N, ceil(NB/64)].
#include <torch/library.h>

TORCH_LIBRARY(dsl_C, m) {
  m.def(
      "lookup(Tensor values, Tensor row_ptr, Tensor row_slots, Tensor row_mask, Tensor indices, "
      "Tensor offsets, Tensor? per_sample_weights, int num_blocks, int mode, int padding_idx) "
      "-> (Tensor, Tensor)");
  m.def(
      "lookup_backward(Tensor grad_out, Tensor values, Tensor row_ptr, Tensor row_slots, "
      "Tensor row_mask, Tensor indices, Tensor offsets, Tensor? per_sample_weights, "
      "Tensor max_idx, Tensor? frozen, int num_blocks, int mode, int padding_idx, "
      "bool deterministic) -> Tensor");
  m.def(
      "grow_scores(Tensor grad_out, Tensor row_ptr, Tensor row_slots, Tensor row_mask, "
      "Tensor indices, Tensor offsets, Tensor? per_sample_weights, Tensor max_idx, "
      "int num_blocks, int mode, int padding_idx) -> (Tensor, Tensor)");
  m.def("rebuild_index(Tensor coord, int num_rows, int num_blocks) -> (Tensor, Tensor, Tensor)");
}

#ifdef DSL_KERNELS_PYTHON_MODULE
// setup.py builds this file into the Python module dsl_kernels._C: importing it runs the
// registrations above. The module itself exposes nothing (the ops live in torch.ops.dsl_C), so
// a bare module definition is enough and pybind11 is not needed. The CMake build leaves this
// out and produces a plain library for torch.ops.load_library().
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
#endif
