// Makes the compiled library importable as `sparseadapter_ext._C`; importing it runs the static
// TORCH_LIBRARY registrations. Only the Python build compiles this file (the CMake library does not).
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "SparseAdapter's compiled ops (torch.ops.sparseadapter)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}
