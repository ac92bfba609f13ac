// Makes the compiled library importable as `sparseadapter_ext._C`; importing it runs the static
// TORCH_LIBRARY registrations. Only the Python build compiles this file (the CMake library does not).
#include <Python.h>

#include "cpu/cpu_isa.h"

namespace {

// _C.cpu_isa() -> "avx512" | "avx2" | "baseline": the variant the CPU kernels run.
PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(sparseadapter::cpu_isa_name(sparseadapter::cpu_isa()));
  } catch (const c10::Error& e) {  // a bad SPARSEADAPTER_CPU_ISA
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The x86 vector ISA variant the CPU kernels run."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "SparseAdapter's compiled ops (torch.ops.sparseadapter)", -1, methods};
  return PyModule_Create(&module_def);
}
}
