// Row moves for active sets (csrc/rows.cpp): plain Python functions of imp_fast._C,
// registered in the module's method table (csrc/ops.cpp).
#pragma once

#include <Python.h>

namespace imp_fast {

PyObject* running_rows_py(PyObject* self, PyObject* arg);
PyObject* gather_rows_py(PyObject* self, PyObject* args);
PyObject* scatter_rows_py(PyObject* self, PyObject* args);

}  // namespace imp_fast
