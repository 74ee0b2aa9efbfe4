// The Python module object of unispeech_fast._C. The ops themselves are registered with the
// dispatcher (TORCH_LIBRARY in csrc/schemas.cpp, TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda) when
// this shared library is loaded; Python calls them as torch.ops.unispeech_fast.<name>. The module
// only reports how it was built. Plain CPython API: no pybind11 or torch/extension.h to compile.
#include <Python.h>

#ifndef UNISPEECH_FAST_CUDA_STATUS
#define UNISPEECH_FAST_CUDA_STATUS 0
#endif

namespace {

// setup.py passes UNISPEECH_FAST_CUDA_STATUS: why the CUDA sources were (not) compiled in.
const char* cuda_build_note() {
  switch (UNISPEECH_FAST_CUDA_STATUS) {
    case 1: return "built with the CUDA sources (csrc/cuda)";
    case 2: return "CUDA sources skipped: UNISPEECH_FAST_SKIP_CUDA_BUILD=1 at build time";
    case 3: return "CUDA sources not built: torch at build time was a CPU-only build";
    case 4: return "CUDA sources not built: no CUDA toolkit (CUDA_HOME / nvcc) found at build time";
    case 5: return "CUDA sources not built: csrc/cuda holds no .cu files";
    default: return "CUDA sources not built (reason not recorded)";
  }
}

PyObject* built_with_cuda(PyObject*, PyObject*) {
  if (UNISPEECH_FAST_CUDA_STATUS == 1) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyObject* cuda_note(PyObject*, PyObject*) { return PyUnicode_FromString(cuda_build_note()); }

PyMethodDef methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "True when the CUDA kernels were compiled in."},
    {"cuda_build_note", cuda_note, METH_NOARGS, "Why the CUDA kernels were or were not compiled in."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "unispeech_fast's compiled ops (registered as torch.ops.unispeech_fast.*).", -1,
                          methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
