// Python module init for fastdiff._C. The ops themselves register with the dispatcher from their own
// files (TORCH_LIBRARY_FRAGMENT(fastdiff, m) + TORCH_LIBRARY_IMPL) and are called as torch.ops.fastdiff.*.
#include <Python.h>
#include <torch/library.h>

#include "cpu/isa.h"

namespace {

PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef FASTDIFF_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

// The CUDA targets the kernels were compiled for, as setup.py passed them to nvcc: (SASS, PTX), each a
// "_"-separated list of architectures ("80_86_89_90", "90"); None without CUDA kernels.
#define FD_STRINGIFY_(...) #__VA_ARGS__
#define FD_STRINGIFY(...) FD_STRINGIFY_(__VA_ARGS__)
PyObject* cuda_archs(PyObject*, PyObject*) {
#if defined(FASTDIFF_WITH_CUDA) && defined(FASTDIFF_CUDA_SASS) && defined(FASTDIFF_CUDA_PTX)
  return Py_BuildValue("(ss)", FD_STRINGIFY(FASTDIFF_CUDA_SASS), FD_STRINGIFY(FASTDIFF_CUDA_PTX));
#else
  Py_RETURN_NONE;
#endif
}

PyObject* cpu_capability(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(fastdiff::cpu::isa_name(fastdiff::cpu::isa()));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* detected_cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(fastdiff::cpu::isa_name(fastdiff::cpu::detected_isa()));
}

PyObject* set_cpu_capability(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  try {
    fastdiff::cpu::set_isa(fastdiff::cpu::parse_isa(name));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "True when the CUDA kernels were compiled in."},
    {"cuda_archs", cuda_archs, METH_NOARGS, "(SASS, PTX) CUDA architectures compiled in, or None."},
    {"cpu_capability", cpu_capability, METH_NOARGS, "The CPU instruction set the kernels dispatch to."},
    {"detected_cpu_capability", detected_cpu_capability, METH_NOARGS, "The best instruction set this CPU has."},
    {"set_cpu_capability", set_cpu_capability, METH_O,
     "Dispatch to this instruction set ('' or 'auto': the detected one); fastdiff.settings calls it."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastdiff compiled kernels", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
