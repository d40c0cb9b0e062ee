"""Active sets' one-call CPU row moves (csrc/rows.cpp via imp_fast.state).

The reference is the torch-op path they replace (index_select / index_copy_ / nonzero),
forced by switching the extension's functions off: same values, same layouts (pairs in one
buffer), same solves bit for bit.
"""
import pytest
import torch

import imp_fast
import imp_fast.state as state_mod
from imp_fast.state import LoopState, gather_rows, running_rows

pytestmark = pytest.mark.skipif(state_mod._gather_rows_cpu is None, reason="imp_fast._C is not built")


@pytest.fixture
def torch_ops(monkeypatch):
    """Run the body on the torch-op fallback (as on CUDA or under torch.compile)."""
    def off():
        for name in ("_running_rows_cpu", "_gather_rows_cpu", "_scatter_rows_cpu"):
            monkeypatch.setattr(state_mod, name, None)
    return off


def _state(kind, dtype, B=9, D=37, m=4):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
    st = LoopState.create(z, m=m if kind == "anderson" else None, return_best=True,
                          broyden_m=m if kind == "broyden" else None,
                          tol=torch.rand(B, generator=g, dtype=torch.float64))
    for t in st.tensors().values():  # every field filled with distinct values
        if t is not None and t.is_floating_point():
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64))
    st.status.copy_(torch.tensor([0, 1, 0, 0, 2, 0, 4, 0, 0], dtype=torch.int8)[:B])
    st.n_iter.copy_(torch.arange(B, dtype=torch.int32) * 3)
    return st


def _adjacent(a, b):
    return b.data_ptr() - a.data_ptr() == a.numel() * a.element_size()


@pytest.mark.parametrize("kind", ["picard", "anderson", "broyden"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_gather_equals_index_select_and_keeps_the_layout(kind, dtype, torch_ops):
    st = _state(kind, dtype)
    idx = torch.tensor([0, 2, 3, 5, 8])
    fast = st.gather(idx)
    torch_ops()
    slow = st.gather(idx)
    for name, want in slow.tensors().items():
        got = getattr(fast, name)
        assert (got is None) == (want is None), name
        if want is not None:
            assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous(), name
            assert torch.equal(got, want), name
            assert torch.equal(got, getattr(st, name).index_select(0, idx)), name
    # create()'s layout: the pairs as rows of one buffer, G first
    assert _adjacent(fast.abs_res, fast.rel_res) and _adjacent(fast.best_abs, fast.best_rel)
    if kind == "anderson":
        assert _adjacent(fast.G, fast.F)


@pytest.mark.parametrize("slots", [0, 1, 3, 4, 9])
def test_gather_copies_only_the_written_broyden_slots(slots, torch_ops):
    st = _state("broyden", torch.float64, m=4)
    st.U[:, min(slots, 4):] = 0  # unwritten slots hold zeros
    st.V[:, min(slots, 4):] = 0
    idx = torch.tensor([0, 2, 3, 5, 8])
    want = st.gather(idx)
    fast = st.gather(idx, broyden_slots=slots)
    torch_ops()
    slow = st.gather(idx, broyden_slots=slots)
    for name, w in want.tensors().items():
        if w is not None:
            assert torch.equal(getattr(fast, name), w) and torch.equal(getattr(slow, name), w), name
    # copied as far as told: data past the prefix does not come along
    st.U.fill_(1.0)
    assert not slow.U[:, slots:].any()
    assert not _state("broyden", torch.float64, m=4).gather(idx, broyden_slots=1).V[:, 1:].any()


def test_gather_prefix_zeroes_the_rest_of_each_row():
    C = state_mod._ext
    a, b = torch.randn(6, 5, 3), torch.randn(6, 2)
    idx = torch.tensor([4, 1])
    (ga,), (gb,) = C._gather_rows([(a,), (b,)], idx, [2, None])
    assert torch.equal(ga[:, :2], a[idx, :2]) and not ga[:, 2:].any()
    assert torch.equal(gb, b[idx])
    (g0,), = C._gather_rows([(a,)], idx, [0])
    assert g0.shape == (2, 5, 3) and not g0.any()
    with pytest.raises(RuntimeError, match="prefix 6"):
        C._gather_rows([(a,)], idx, [6])
    with pytest.raises(RuntimeError, match="prefix 1"):  # no dim 1
        C._gather_rows([(b[:, 0].contiguous(),)], idx, [1])
    with pytest.raises(ValueError, match=">= 0"):
        C._gather_rows([(a,)], idx, [-1])
    with pytest.raises(TypeError, match="one entry per group"):
        C._gather_rows([(a,), (b,)], idx, [2])
    with pytest.raises(TypeError, match="an int or None"):
        C._gather_rows([(a,)], idx, [2.0])
    with pytest.raises(ValueError, match="broyden_slots"):
        _state("broyden", torch.float64).gather(idx, broyden_slots=-1)


@pytest.mark.parametrize("kind", ["picard", "anderson"])
def test_scatter_equals_index_copy(kind, torch_ops):
    work = _state(kind, torch.float32, B=4)
    rows = torch.tensor([7, 1, 4, 2])
    full_fast, full_slow = _state(kind, torch.float32), _state(kind, torch.float32)
    before = full_fast.clone()
    v = full_fast.z._version
    work.scatter_into(full_fast, rows)
    assert full_fast.z._version > v  # counted as an in-place write, as index_copy_ is
    torch_ops()
    work.scatter_into(full_slow, rows)
    for name, want in full_slow.tensors().items():
        if want is not None:
            assert torch.equal(getattr(full_fast, name), want), name
    untouched = torch.tensor([0, 3, 5, 6, 8])
    assert torch.equal(full_fast.z[untouched], before.z[untouched])


def test_running_rows_and_gather_rows_match_torch(torch_ops):
    status = torch.tensor([0, 3, 0, 1, 0, 0, 2], dtype=torch.int8)
    x = torch.randn(7, 3, 2)
    n = torch.arange(7, dtype=torch.int32)
    keep = running_rows(status)
    assert keep.dtype == torch.int64 and keep.tolist() == [0, 2, 4, 5]
    got = gather_rows((x, "label", n, 2.5), keep)
    assert got[1] == "label" and got[3] == 2.5
    assert torch.equal(got[0], x[keep]) and torch.equal(got[2], n[keep])
    assert running_rows(torch.ones(4, dtype=torch.int8)).numel() == 0
    torch_ops()
    assert torch.equal(running_rows(status), keep)
    # non-contiguous arguments (and anything the one-call path does not take) use a[idx]
    xt = torch.randn(3, 7).t()
    assert torch.equal(gather_rows((xt,), keep)[0], xt[keep])


@pytest.mark.parametrize("method", ["picard", "anderson", "broyden"])
def test_compacted_solve_is_the_same_on_either_path(method, torch_ops, monkeypatch):
    g = torch.Generator().manual_seed(1)
    B, D = 10, 24
    W = torch.randn(D, D, generator=g, dtype=torch.float64)
    W = 0.97 * W / torch.linalg.matrix_norm(W, 2)
    s = torch.linspace(0.2, 1.0, B, dtype=torch.float64)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)

    def f(z, s, x):
        return s[:, None] * torch.tanh(torch.einsum("ij,bj->bi", W, z)) + x

    budget = torch.full((B,), 400, dtype=torch.int64)
    budget[3] = 7  # a per-sample budget: gathered with the arguments
    kw = dict(args=(s, x), method=method, tol=1e-10, max_iter=budget, compact=True, return_best=True, trace=True,
              backend="cpp")
    calls = []
    for name in ("_running_rows_cpu", "_gather_rows_cpu", "_scatter_rows_cpu"):
        fn = getattr(state_mod, name)
        monkeypatch.setattr(state_mod, name, lambda *a, fn=fn, name=name: calls.append(name) or fn(*a))
    a = imp_fast.solve(f, torch.zeros(B, D, dtype=torch.float64), **kw)
    assert {"_running_rows_cpu", "_gather_rows_cpu", "_scatter_rows_cpu"} <= set(calls)  # the one-call path ran
    torch_ops()
    b = imp_fast.solve(f, torch.zeros(B, D, dtype=torch.float64), **kw)
    assert len(set(a.n_iter.tolist())) > 2  # the working set shrank several times
    for name in ("z", "status", "n_iter", "abs_residual", "rel_residual", "trace_abs", "trace_rel"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_row_functions_reject_bad_input():
    C = state_mod._ext
    a = torch.randn(5, 3)
    with pytest.raises(RuntimeError, match="out of range"):
        C._gather_rows([(a,)], torch.tensor([0, 5]))
    with pytest.raises(RuntimeError, match="contiguous"):
        C._gather_rows([(a.t(),)], torch.tensor([0]))
    with pytest.raises(RuntimeError, match="share shape and dtype"):
        C._gather_rows([(a, a.double())], torch.tensor([0]))
    with pytest.raises(RuntimeError, match="int64"):
        C._gather_rows([(a,)], torch.tensor([0], dtype=torch.int32))
    with pytest.raises(TypeError, match="groups"):
        C._gather_rows([[a]], torch.tensor([0]))
    with pytest.raises(RuntimeError, match="share memory"):
        C._scatter_rows([(a, a[:2])], torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="out of range"):
        C._scatter_rows([(a, torch.zeros(1, 3))], torch.tensor([9]))
    dst = torch.zeros(5, 3)
    with pytest.raises(RuntimeError, match="rows"):  # the second pair is bad: nothing written
        C._scatter_rows([(dst, torch.ones(1, 3)), (dst.clone(), torch.ones(2, 3))], torch.tensor([1]))
    assert not dst.any()
    with pytest.raises(RuntimeError, match="int8"):
        C._running_rows(torch.zeros(3, dtype=torch.int32))
