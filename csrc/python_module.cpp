// Makes the compiled library importable as `sparseadapter_ext._C`; importing it runs the static
// TORCH_LIBRARY registrations. Only the Python build compiles this file (the CMake library does not).
#include <Python.h>

#include <cmath>
#include <string>
#include <utility>

#include "cpu/cpu_isa.h"
#include "path_choice.h"

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

// _C.set_path_mode(mode) -> previous mode, mode in {"auto", "sparse", "dense"}.
PyObject* set_path_mode(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) {
    return nullptr;
  }
  try {
    const auto previous = sparseadapter::set_path_mode(sparseadapter::parse_path_mode(name));
    return PyUnicode_FromString(sparseadapter::path_mode_name(previous));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

PyObject* path_mode(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(sparseadapter::path_mode_name(sparseadapter::path_mode()));
  } catch (const c10::Error& e) {  // a bad SPARSEADAPTER_PATH
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  }
}

// Sets key to a new reference (stolen); false with a Python error set when either failed.
bool set_item(PyObject* dict, const char* key, PyObject* value) {
  if (value == nullptr) {
    return false;
  }
  const int rc = PyDict_SetItemString(dict, key, value);
  Py_DECREF(value);
  return rc == 0;
}

PyObject* float_or_none(double v) {
  if (std::isnan(v)) {
    Py_RETURN_NONE;
  }
  return PyFloat_FromDouble(v);
}

// _C.path_decisions() -> [dict]: one per problem seen (see path_choice.h).
PyObject* path_decisions(PyObject*, PyObject*) {
  const auto decisions = sparseadapter::path_decisions();
  PyObject* list = PyList_New(0);
  if (list == nullptr) {
    return nullptr;
  }
  for (const auto& d : decisions) {
    PyObject* dict = PyDict_New();
    PyObject* dims = dict ? PyTuple_New(static_cast<Py_ssize_t>(d.dims.size())) : nullptr;
    bool ok = dims != nullptr;
    for (size_t i = 0; ok && i < d.dims.size(); ++i) {
      PyObject* v = PyLong_FromLongLong(d.dims[i]);
      ok = v != nullptr && PyTuple_SetItem(dims, static_cast<Py_ssize_t>(i), v) == 0;  // steals v
    }
    if (!ok) {
      Py_XDECREF(dims);
    }
    ok = ok && set_item(dict, "dims", dims) && set_item(dict, "op", PyUnicode_FromString(d.op.c_str())) &&
         set_item(dict, "device", PyUnicode_FromString(d.device.c_str())) &&
         set_item(dict, "dtype", PyUnicode_FromString(d.dtype.c_str())) &&
         set_item(dict, "tokens", PyLong_FromLongLong(d.tokens)) &&
         set_item(dict, "path", PyUnicode_FromString(sparseadapter::path_name(d.path))) &&
         set_item(dict, "source", PyUnicode_FromString(d.source.c_str())) &&
         set_item(dict, "ms_sparse", float_or_none(d.ms_sparse)) &&
         set_item(dict, "ms_dense", float_or_none(d.ms_dense)) &&
         set_item(dict, "calls", PyLong_FromLongLong(d.calls));
    if (!ok || PyList_Append(list, dict) != 0) {
      Py_XDECREF(dict);
      Py_DECREF(list);
      return nullptr;
    }
    Py_DECREF(dict);
  }
  return list;
}

// _C.seed_path_decision(op, device, dtype, dims, tokens, path, ms_sparse, ms_dense): a measurement
// of an earlier process (sparseadapter_ext.path_cache).
PyObject* seed_path_decision(PyObject*, PyObject* args) {
  const char *op, *device, *dtype, *path;
  PyObject* dims;
  long long tokens;
  double ms_sparse, ms_dense;
  if (!PyArg_ParseTuple(args, "sssOLsdd", &op, &device, &dtype, &dims, &tokens, &path, &ms_sparse, &ms_dense)) {
    return nullptr;
  }
  sparseadapter::PathDecision d;
  PyObject* seq = PySequence_Fast(dims, "dims must be a sequence of 6 integers");
  if (seq == nullptr) {
    return nullptr;
  }
  const bool six = PySequence_Fast_GET_SIZE(seq) == static_cast<Py_ssize_t>(d.dims.size());
  for (size_t i = 0; six && i < d.dims.size(); ++i) {
    d.dims[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, static_cast<Py_ssize_t>(i)));
  }
  Py_DECREF(seq);
  if (!six) {
    PyErr_SetString(PyExc_ValueError, "dims must be a sequence of 6 integers");
    return nullptr;
  }
  if (PyErr_Occurred()) {
    return nullptr;
  }
  const std::string path_name = path;
  if (path_name != "sparse" && path_name != "dense") {
    PyErr_Format(PyExc_ValueError, "path must be 'sparse' or 'dense', got '%s'", path);
    return nullptr;
  }
  d.op = op;
  d.device = device;
  d.dtype = dtype;
  d.tokens = tokens;
  d.path = path_name == "sparse" ? sparseadapter::Path::kSparse : sparseadapter::Path::kDense;
  d.ms_sparse = ms_sparse;
  d.ms_dense = ms_dense;
  sparseadapter::seed_path_decision(std::move(d));
  Py_RETURN_NONE;
}

PyObject* clear_path_decisions(PyObject*, PyObject*) {
  sparseadapter::clear_path_decisions();
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The x86 vector ISA variant the CPU kernels run."},
    {"set_path_mode", set_path_mode, METH_O, "Sets the path mode (auto, sparse, dense); returns the previous."},
    {"path_mode", path_mode, METH_NOARGS, "The path mode: auto, sparse or dense."},
    {"path_decisions", path_decisions, METH_NOARGS, "The path decisions of this process, one dict per problem."},
    {"clear_path_decisions", clear_path_decisions, METH_NOARGS, "Forgets every path decision."},
    {"seed_path_decision", seed_path_decision, METH_VARARGS, "Records a measurement of an earlier process."},
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
