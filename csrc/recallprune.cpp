// The Python module recallprune._C and the recallprune library of ops. Each op's schema is
// defined beside its argument checks (undecayed_sgd.cpp, confusion.cpp); the CPU and CUDA
// implementations register themselves beside their kernels (csrc/cpu, csrc/cuda).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import recallprune._C` loads this library, which runs the registrations of every file.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "recallprune's compiled kernels (custom torch ops)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// The library; its ops are defined by the TORCH_LIBRARY_FRAGMENT of each op's file.
TORCH_LIBRARY(recallprune, m) {}
