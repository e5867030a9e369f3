// The Python module rlhf_fast._C itself: build facts and the CPU ISA switch.
// The ops are not here (ops.cpp and the kernels register them with
// torch.library). Plain CPython API: pybind11 through <torch/extension.h>
// made ops.cpp a 32 s compile (GCC 12, -g) for two small functions; this
// file needs only <Python.h> (~0.2 s).
#include <Python.h>

#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "rlhf_fast/cpu_isa.h"

namespace {

// d[key] = v, stealing the reference to v.
void put(PyObject* d, const char* key, PyObject* v) {
  PyDict_SetItemString(d, key, v);
  Py_DECREF(v);
}

// Facts about this build, shown by rlhf_fast.info() / `rlhf-fast info`.
PyObject* build_info(PyObject*, PyObject*) {
  using namespace rlhf_fast::cpu;
  PyObject* info = PyDict_New();
  if (!info) return nullptr;
  PyObject* backends = PyList_New(0);
  PyObject* cpp = PyUnicode_FromString("cpp");
  PyList_Append(backends, cpp);
  Py_DECREF(cpp);
#ifdef RLHF_FAST_WITH_CUDA
  PyObject* cuda = PyUnicode_FromString("cuda");
  PyList_Append(backends, cuda);
  Py_DECREF(cuda);
  put(info, "cuda_archs", PyUnicode_FromString(RLHF_FAST_CUDA_ARCHS));
#else
  put(info, "cuda_archs", PyUnicode_FromString(""));
#endif
  put(info, "backends", backends);
#if defined(__clang__)
  put(info, "compiler", PyUnicode_FromString((std::string("clang ") + __clang_version__).c_str()));
#elif defined(__GNUC__)
  put(info, "compiler", PyUnicode_FromString((std::string("gcc ") + __VERSION__).c_str()));
#else
  put(info, "compiler", PyUnicode_FromString("unknown"));
#endif
#ifdef _OPENMP
  put(info, "openmp", PyBool_FromLong(1));
  put(info, "omp_max_threads", PyLong_FromLong(omp_get_max_threads()));
#else
  put(info, "openmp", PyBool_FromLong(0));
  put(info, "omp_max_threads", PyLong_FromLong(1));
#endif
#if defined(__x86_64__)
  __builtin_cpu_init();
  put(info, "cpu_avx2", PyBool_FromLong(__builtin_cpu_supports("avx2")));
  put(info, "cpu_avx512f", PyBool_FromLong(__builtin_cpu_supports("avx512f")));
#endif
  put(info, "cpu_isa", PyUnicode_FromString(isa_name(active_isa())));
  put(info, "cpu_isa_best", PyUnicode_FromString(isa_name(best_supported_isa())));
  return info;
}

// Selects the vector ISA of the CPU kernels (tests run every copy); returns
// the previous one. Asking for more than the CPU supports is an error.
PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  using namespace rlhf_fast::cpu;
  const char* name = PyUnicode_AsUTF8(arg);
  if (!name) return nullptr;
  Isa want;
  if (!parse_isa(name, &want)) {
    PyErr_Format(PyExc_RuntimeError, "rlhf_fast: unknown CPU ISA '%s'; choose avx512, avx2 or baseline", name);
    return nullptr;
  }
  if (static_cast<int>(want) > static_cast<int>(best_supported_isa())) {
    PyErr_Format(PyExc_RuntimeError, "rlhf_fast: this CPU does not support %s (best: %s)", name,
                 isa_name(best_supported_isa()));
    return nullptr;
  }
  const Isa prev = active_isa();
  isa_slot().store(static_cast<int>(want));
  return PyUnicode_FromString(isa_name(prev));
}

PyMethodDef kMethods[] = {
    {"build_info", build_info, METH_NOARGS, "Facts about how this extension was built"},
    {"set_cpu_isa", set_cpu_isa, METH_O, "Select avx512 | avx2 | baseline CPU kernels; returns the previous"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT, "_C", "rlhf_fast compiled kernels; the ops live under torch.ops.rlhf_fast", -1, kMethods,
};

}  // namespace

#define RLHF_FAST_CAT2(a, b) a##b
#define RLHF_FAST_CAT(a, b) RLHF_FAST_CAT2(a, b)
// PyInit__C, from torch's -DTORCH_EXTENSION_NAME=_C
PyMODINIT_FUNC RLHF_FAST_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&kModule); }
