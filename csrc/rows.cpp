// imp_fast._C row moves for active sets (solve(..., compact=True)), CPU, eager.
//
// At a check that shrinks the working set, the loop finds the running rows, scatters the
// working state's results back and gathers the running rows of every state tensor and
// every batched argument: about 25 small torch ops per shrink. Inside a solve each of them
// runs with cold caches (f streams its weights through them every iteration), and they
// cost several times their warm time: 47 us for a (status == 0).nonzero() on 64 flags that
// takes 4 us in a tight loop. These three calls do the same moves in one call each, with
// plain row copies (rows are contiguous). imp_fast/state.py and imp_fast/loop.py use them
// for CPU tensors outside torch.compile and fall back to the torch ops elsewhere; results
// are the same tensors, values and layouts (tests compare both paths).
//
//   _running_rows(status)       int64 indices of the rows whose int8 status is 0
//   _gather_rows(groups, idx[, prefix])
//                               for each group (a tuple of tensors of one shape and dtype,
//                               or None): one new (n, k, ...) buffer holding rows idx of
//                               each member, returned as its n slices (the layout
//                               LoopState.create gives its pairs), or None. prefix (a
//                               list, one int or None per group): copy only the first
//                               prefix[g] slices along dim 1 of each row and zero the
//                               rest (Broyden's U and V hold data only in their written
//                               slots; the rest is zero, so the result is the same)
//   _scatter_rows(pairs, idx)   for each (dst, src): dst[idx[i]] = src[i]
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "rows.h"

namespace imp_fast {
namespace {

// Bytes of one row (dim 0 slice) of a contiguous tensor.
int64_t row_bytes(const at::Tensor& t) {
  return t.dim() == 0 ? 0 : (t.size(0) == 0 ? 0 : t.numel() / t.size(0)) * static_cast<int64_t>(t.element_size());
}

void check_row_tensor(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(t.dim() >= 1, what, ": tensors with a batch dim 0, got a 0-d tensor");
  TORCH_CHECK(t.is_contiguous(), what, ": contiguous tensors only");
}

// idx: 1-d int64 CPU contiguous, every entry >= 0; checked once per call. fits(rows):
// every entry is below rows (per tensor, from the largest entry).
struct RowIndex {
  const int64_t* p;
  int64_t k, max;
  RowIndex(const at::Tensor& idx, const char* what) {
    TORCH_CHECK(idx.device().is_cpu() && idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.is_contiguous(),
                what, ": idx must be a contiguous 1-d int64 CPU tensor");
    p = idx.data_ptr<int64_t>();
    k = idx.numel();
    max = -1;
    for (int64_t i = 0; i < k; ++i) {
      TORCH_CHECK(p[i] >= 0, what, ": index ", p[i], " out of range");
      max = std::max(max, p[i]);
    }
  }
  void fits(int64_t rows, const char* what) const {
    TORCH_CHECK(max < rows, what, ": index ", max, " out of range for ", rows, " rows");
  }
};

// Gather: dst row i <- the first pb bytes of src row ix[i], zeros for the rest of its rb
// bytes (pb = rb: the whole row). Scatter: dst row ix[i] <- src row i (pb = rb).
void move_rows(char* dst, const char* src, const int64_t* ix, int64_t k, int64_t rb, bool scatter, int64_t pb) {
  // Row copies are independent: split them over threads only when there is enough to copy.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(rb, 1));
  at::parallel_for(0, k, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (scatter) {
        std::memcpy(dst + ix[i] * rb, src + i * rb, rb);
      } else {
        if (pb > 0) std::memcpy(dst + i * rb, src + ix[i] * rb, pb);
        if (rb > pb) std::memset(dst + i * rb + pb, 0, rb - pb);
      }
    }
  });
}

PyObject* wrap(const at::Tensor& t) { return THPVariable_Wrap(t); }

// (list, idx tensor) arguments; false with a Python error set otherwise
bool parse_list_idx(PyObject* args, const char* sig, PyObject** list, PyObject** idx, PyObject** opt = nullptr) {
  if (opt != nullptr) {
    if (!PyArg_ParseTuple(args, "O!O|O", &PyList_Type, list, idx, opt)) return false;
  } else if (!PyArg_ParseTuple(args, "O!O", &PyList_Type, list, idx)) {
    return false;
  }
  if (!THPVariable_Check(*idx)) {
    PyErr_Format(PyExc_TypeError, "%s: idx must be a tensor", sig);
    return false;
  }
  return true;
}

template <typename Fn>
PyObject* guarded(Fn&& fn) {
  try {
    return fn();
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

}  // namespace

PyObject* running_rows_py(PyObject* /*self*/, PyObject* arg) {
  if (!THPVariable_Check(arg)) {
    PyErr_SetString(PyExc_TypeError, "imp_fast._C._running_rows(status): status must be a tensor");
    return nullptr;
  }
  return guarded([&]() -> PyObject* {
    const at::Tensor& st = THPVariable_Unpack(arg);
    TORCH_CHECK(st.device().is_cpu() && st.scalar_type() == at::kChar && st.dim() == 1 && st.is_contiguous(),
                "imp_fast._C._running_rows: status must be a contiguous 1-d int8 CPU tensor");
    const int8_t* s = st.data_ptr<int8_t>();
    const int64_t n = st.numel();
    int64_t k = 0;
    for (int64_t i = 0; i < n; ++i) k += s[i] == 0;
    at::Tensor out = at::empty({k}, st.options().dtype(at::kLong));
    int64_t* o = out.data_ptr<int64_t>();
    for (int64_t i = 0, j = 0; i < n; ++i)
      if (s[i] == 0) o[j++] = i;
    return wrap(out);
  });
}

PyObject* gather_rows_py(PyObject* /*self*/, PyObject* args) {
  PyObject *groups, *idx_obj, *prefix_obj = Py_None;
  if (!parse_list_idx(args, "imp_fast._C._gather_rows(groups, idx[, prefix])", &groups, &idx_obj, &prefix_obj))
    return nullptr;
  const Py_ssize_t ng = PyList_GET_SIZE(groups);
  // prefix[g]: slices of dim 1 to copy (-1: the whole row)
  std::vector<int64_t> prefix(static_cast<size_t>(ng), -1);
  if (prefix_obj != Py_None) {
    if (!PyList_Check(prefix_obj) || PyList_GET_SIZE(prefix_obj) != ng) {
      PyErr_SetString(PyExc_TypeError, "imp_fast._C._gather_rows: prefix must be a list with one entry per group");
      return nullptr;
    }
    for (Py_ssize_t g = 0; g < ng; ++g) {
      PyObject* p = PyList_GET_ITEM(prefix_obj, g);
      if (p == Py_None) continue;
      if (!PyLong_Check(p)) {
        PyErr_Format(PyExc_TypeError, "imp_fast._C._gather_rows: prefix[%zd] must be an int or None", g);
        return nullptr;
      }
      const long long v = PyLong_AsLongLong(p);
      if (v == -1 && PyErr_Occurred()) return nullptr;
      if (v < 0) {
        PyErr_Format(PyExc_ValueError, "imp_fast._C._gather_rows: prefix[%zd] must be >= 0, got %lld", g, v);
        return nullptr;
      }
      prefix[static_cast<size_t>(g)] = static_cast<int64_t>(v);
    }
  }
  // Validate every group before anything is allocated or copied.
  for (Py_ssize_t g = 0; g < ng; ++g) {
    PyObject* grp = PyList_GET_ITEM(groups, g);
    if (grp == Py_None) continue;
    if (!PyTuple_Check(grp) || PyTuple_GET_SIZE(grp) == 0) {
      PyErr_Format(PyExc_TypeError, "imp_fast._C._gather_rows: groups[%zd] must be None or a non-empty tuple", g);
      return nullptr;
    }
    for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(grp); ++j) {
      if (!THPVariable_Check(PyTuple_GET_ITEM(grp, j))) {
        PyErr_Format(PyExc_TypeError, "imp_fast._C._gather_rows: groups[%zd][%zd] must be a tensor", g, j);
        return nullptr;
      }
    }
  }
  return guarded([&]() -> PyObject* {
    const RowIndex ix(THPVariable_Unpack(idx_obj), "imp_fast._C._gather_rows");
    const int64_t k = ix.k;
    std::vector<std::vector<at::Tensor>> outs(ng);
    for (Py_ssize_t g = 0; g < ng; ++g) {
      PyObject* grp = PyList_GET_ITEM(groups, g);
      if (grp == Py_None) continue;
      const Py_ssize_t n = PyTuple_GET_SIZE(grp);
      const at::Tensor& first = THPVariable_Unpack(PyTuple_GET_ITEM(grp, 0));
      check_row_tensor(first, "imp_fast._C._gather_rows");
      for (Py_ssize_t j = 1; j < n; ++j) {
        const at::Tensor& t = THPVariable_Unpack(PyTuple_GET_ITEM(grp, j));
        check_row_tensor(t, "imp_fast._C._gather_rows");
        TORCH_CHECK(t.sizes() == first.sizes() && t.scalar_type() == first.scalar_type(),
                    "imp_fast._C._gather_rows: the tensors of a group must share shape and dtype");
      }
      ix.fits(first.size(0), "imp_fast._C._gather_rows");
      const int64_t pre = prefix[static_cast<size_t>(g)];
      TORCH_CHECK(pre < 0 || (first.dim() >= 2 && pre <= first.size(1)), "imp_fast._C._gather_rows: prefix ", pre,
                  " needs tensors with a dim 1 of at least that size, got shape ", first.sizes());
      std::vector<int64_t> shape = {static_cast<int64_t>(n), k};
      for (int64_t d = 1; d < first.dim(); ++d) shape.push_back(first.size(d));
      at::Tensor buf = at::empty(shape, first.options());
      const int64_t rb = row_bytes(first);
      const int64_t pb = pre < 0 || first.size(1) == 0 ? rb : rb / first.size(1) * pre;
      for (Py_ssize_t j = 0; j < n; ++j) {
        const at::Tensor& t = THPVariable_Unpack(PyTuple_GET_ITEM(grp, j));
        at::Tensor dst = buf.select(0, j);
        char* d = static_cast<char*>(dst.data_ptr());
        const char* src = static_cast<const char*>(t.data_ptr());
        if (k > 0 && rb > 0) move_rows(d, src, ix.p, k, rb, false, pb);
        outs[g].push_back(dst);
      }
    }
    PyObject* result = PyList_New(ng);
    if (result == nullptr) return nullptr;
    for (Py_ssize_t g = 0; g < ng; ++g) {
      PyObject* item;
      if (PyList_GET_ITEM(groups, g) == Py_None) {
        Py_INCREF(Py_None);
        item = Py_None;
      } else {
        item = PyTuple_New(static_cast<Py_ssize_t>(outs[g].size()));
        if (item == nullptr) {
          Py_DECREF(result);
          return nullptr;
        }
        for (size_t j = 0; j < outs[g].size(); ++j) PyTuple_SET_ITEM(item, j, wrap(outs[g][j]));
      }
      PyList_SET_ITEM(result, g, item);
    }
    return result;
  });
}

PyObject* scatter_rows_py(PyObject* /*self*/, PyObject* args) {
  PyObject *pairs, *idx_obj;
  if (!parse_list_idx(args, "imp_fast._C._scatter_rows(pairs, idx)", &pairs, &idx_obj)) return nullptr;
  const Py_ssize_t np = PyList_GET_SIZE(pairs);
  for (Py_ssize_t p = 0; p < np; ++p) {
    PyObject* pr = PyList_GET_ITEM(pairs, p);
    if (!PyTuple_Check(pr) || PyTuple_GET_SIZE(pr) != 2 || !THPVariable_Check(PyTuple_GET_ITEM(pr, 0)) ||
        !THPVariable_Check(PyTuple_GET_ITEM(pr, 1))) {
      PyErr_Format(PyExc_TypeError, "imp_fast._C._scatter_rows: pairs[%zd] must be a (dst, src) tuple of tensors", p);
      return nullptr;
    }
  }
  return guarded([&]() -> PyObject* {
    const RowIndex ix(THPVariable_Unpack(idx_obj), "imp_fast._C._scatter_rows");
    const int64_t k = ix.k;
    // Check every pair before the first write: a bad pair leaves every dst unchanged.
    for (Py_ssize_t p = 0; p < np; ++p) {
      PyObject* pr = PyList_GET_ITEM(pairs, p);
      const at::Tensor& dst = THPVariable_Unpack(PyTuple_GET_ITEM(pr, 0));
      const at::Tensor& src = THPVariable_Unpack(PyTuple_GET_ITEM(pr, 1));
      check_row_tensor(dst, "imp_fast._C._scatter_rows");
      check_row_tensor(src, "imp_fast._C._scatter_rows");
      TORCH_CHECK(dst.scalar_type() == src.scalar_type() && src.size(0) == k &&
                      dst.sizes().slice(1) == src.sizes().slice(1),
                  "imp_fast._C._scatter_rows: src must have idx.numel() rows of dst's row shape and dtype");
      TORCH_CHECK(!dst.is_same(src) && dst.storage().data() != src.storage().data(),
                  "imp_fast._C._scatter_rows: dst and src must not share memory");
      ix.fits(dst.size(0), "imp_fast._C._scatter_rows");
    }
    for (Py_ssize_t p = 0; p < np; ++p) {
      PyObject* pr = PyList_GET_ITEM(pairs, p);
      const at::Tensor& dst = THPVariable_Unpack(PyTuple_GET_ITEM(pr, 0));
      const at::Tensor& src = THPVariable_Unpack(PyTuple_GET_ITEM(pr, 1));
      const int64_t rb = row_bytes(src);
      if (k > 0 && rb > 0)
        move_rows(static_cast<char*>(dst.data_ptr()), static_cast<const char*>(src.data_ptr()), ix.p, k, rb, true, rb);
      dst.unsafeGetTensorImpl()->bump_version();  // written in place, as index_copy_ would count it
    }
    Py_RETURN_NONE;
  });
}

}  // namespace imp_fast
