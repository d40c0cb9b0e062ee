"""The compiled backend (imp_fast._C, backend="cpp") against the reference backend.

Single steps on identical inputs (every dtype, several m, odd D, frozen / running /
non-finite samples, with and without best tracking), whole solves, torch.compile, and
the backend registry. Skipped when the extension is not built.
"""

import pytest
import torch

pytest.importorskip("imp_fast._C", reason="imp_fast._C not built (pip install -e . --no-build-isolation)")

import imp_fast  # noqa: E402
from imp_fast.backends import backend_status, cpp, get_backend, reference  # noqa: E402
from imp_fast.state import LoopState, StepParams, compute_dtype  # noqa: E402

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (rtol, atol) for z / F / G in storage dtype, and for residuals / H in compute dtype
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-4, 2e-5),
    torch.float16: (1e-2, 2e-3),
    torch.bfloat16: (4e-2, 2e-2),
}
B = 8


def _clone_state(st):
    return st.clone()


def _make_state(D, dtype, m, best, *, filled=0, seed=0):
    """A LoopState with random z, a mix of statuses, and some Anderson history."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(B, D, generator=gen, dtype=torch.float64).to(dtype)
    st = LoopState.create(z, m=m, return_best=best)
    cdt = compute_dtype(dtype)
    W = torch.randn(D, D, generator=gen, dtype=torch.float64) * (0.5 / max(D, 1) ** 0.5)
    x = torch.randn(B, D, generator=gen, dtype=torch.float64)

    def f(zz):
        return torch.tanh(zz.double() @ W.T + x).to(dtype)

    # Synthetic history of `filled` slots: random f-values and residuals of the size of
    # the current residual, H = G G^T of the stored G (what the steps keep current).
    # Random residuals keep the small system well conditioned at every D (a real
    # trajectory at D=1 gives a rank-one Gram matrix, where a float32 solve and a
    # float64 solve legitimately disagree).
    g_scale = (f(z).double() - z.double()).norm(dim=1, keepdim=True) / max(D, 1) ** 0.5
    if m is not None and filled:
        k = min(filled, m)
        st.F[:, :k] = (torch.randn(B, k, D, generator=gen, dtype=torch.float64) + z.double()[:, None]).to(dtype)
        st.G[:, :k] = (torch.randn(B, k, D, generator=gen, dtype=torch.float64) * g_scale[:, None]).to(dtype)
        Gc = st.G[:, :k].to(cdt)
        st.H[:, :k, :k] = Gc @ Gc.transpose(1, 2)
    if filled:
        st.abs0.copy_((f(z).double() - z.double()).norm(dim=1).to(cdt) * 2)
        st.abs_res.copy_(st.abs0 / 2)
        st.n_iter.fill_(filled)
    return st, f, gen


def _statuses_and_fz(st, f, gen, pattern):
    """Set a status pattern, return fz with NaN/Inf rows for some samples."""
    fz = f(st.z).clone()
    if pattern == "mixed":
        st.status[1] = int(imp_fast.Status.CONVERGED)
        st.status[2] = int(imp_fast.Status.NONFINITE)
        st.status[6] = int(imp_fast.Status.DIVERGED)
        fz[3, 0] = float("nan")  # running -> NONFINITE this step
        fz[4, -1] = float("inf")  # running -> NONFINITE this step
        fz[2, 0] = float("nan")  # already frozen: nothing changes
    return fz


def _assert_states_close(a, b, dtype, m, entry_running):
    rtol, atol = TOL[dtype]
    assert torch.equal(a.status, b.status)
    assert torch.equal(a.n_iter, b.n_iter)
    torch.testing.assert_close(a.z, b.z, rtol=rtol, atol=atol, equal_nan=True)
    for name in ("abs_res", "rel_res"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=max(rtol, 1e-5), atol=atol,
                                   equal_nan=True)
    if a.best_z is not None:
        torch.testing.assert_close(a.best_z, b.best_z, rtol=rtol, atol=atol, equal_nan=True)
        torch.testing.assert_close(a.best_abs, b.best_abs, rtol=max(rtol, 1e-5), atol=atol, equal_nan=True)
        torch.testing.assert_close(a.best_rel, b.best_rel, rtol=max(rtol, 1e-5), atol=atol, equal_nan=True)
    if m is not None:
        # history of samples frozen before this step is irrelevant (never read again)
        r = entry_running
        torch.testing.assert_close(a.F[r], b.F[r], rtol=rtol, atol=atol, equal_nan=True)
        torch.testing.assert_close(a.G[r], b.G[r], rtol=rtol, atol=atol, equal_nan=True)
        Ha, Hb = a.H[r], b.H[r]
        fin = torch.isfinite(Hb)
        assert torch.equal(fin, torch.isfinite(Ha))
        real = fin & (Hb.abs() < 1e29)  # written entries (unset diagonals hold 1e30)
        scale = torch.where(real, Hb, 0).abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)
        diff = ((Ha - Hb).abs() / scale)[real]
        assert diff.numel() == 0 or diff.max() < max(rtol, 1e-5) * 10


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("D", [1, 37, 1031])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("best", [False, True], ids=["nobest", "best"])
@pytest.mark.parametrize("pattern", ["running", "mixed"])
@pytest.mark.parametrize("lam", [1e-4, 1e-2], ids=["lam_default", "lam_1e-2"])
def test_anderson_step_matches_reference(dtype, D, m, best, pattern, lam):
    # Every backend solves the small system in float64 (reference module docstring), so
    # the default lam (1e-4) is compared too, in every dtype.
    _check_anderson_step_vs_reference(dtype, D, m, best, pattern, lam)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", ["running", "mixed"])
def test_anderson_step_matches_reference_when_a_sample_spans_tasks(dtype, pattern):
    # D > 4096: a sample's chunks are separate tasks (the phased path: partial Gram rows
    # summed in chunk order, mix in a workspace); m = 13: the history rows are read in
    # groups of 6, 6 and 1 (lanes.h: dots_rows, combine_rows), the slot in the middle.
    _check_anderson_step_vs_reference(dtype, 4099, 13, True, pattern, 1e-4)


def _check_anderson_step_vs_reference(dtype, D, m, best, pattern, lam):
    warm = {1: 1, 2: 3, 5: 3, 8: 9}.get(m, m + 4)  # partly and fully written ring buffers
    st, f, gen = _make_state(D, dtype, m, best, filled=warm, seed=D + m)
    fz = _statuses_and_fz(st, f, gen, pattern)
    entry_running = st.status == 0
    p = StepParams(tol=1e-30, beta=0.8 if pattern == "mixed" else 1.0, stop_rel=pattern == "mixed",
                   divergence=1e6, eps=1e-9, lam=lam)
    a, b = _clone_state(st), _clone_state(st)
    reference.anderson_step(a, fz.clone(), p, warm % m)
    fz_c = fz.clone()
    cpp.anderson_step(b, fz_c, p, warm % m)
    assert torch.equal(fz_c.isnan(), fz.isnan()) and torch.equal(fz_c.nan_to_num(), fz.nan_to_num())
    _assert_states_close(b, a, dtype, m, entry_running)
    # frozen samples: untouched
    frozen = ~entry_running
    assert torch.equal(b.z[frozen], st.z[frozen])
    assert torch.equal(b.abs_res[frozen], st.abs_res[frozen])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("D", [1, 37, 1031])
@pytest.mark.parametrize("best", [False, True], ids=["nobest", "best"])
@pytest.mark.parametrize("pattern", ["running", "mixed"])
def test_picard_step_matches_reference(dtype, D, best, pattern):
    st, f, gen = _make_state(D, dtype, None, best, filled=2, seed=D)
    fz = _statuses_and_fz(st, f, gen, pattern)
    entry_running = st.status == 0
    p = StepParams(tol=1e-30, beta=0.7, stop_rel=pattern == "running", divergence=1e6, eps=1e-9)
    a, b = _clone_state(st), _clone_state(st)
    reference.picard_step(a, fz.clone(), p)
    cpp.picard_step(b, fz.clone(), p)
    _assert_states_close(b, a, dtype, None, entry_running)
    frozen = ~entry_running
    assert torch.equal(b.z[frozen], st.z[frozen])


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_status_codes_converged_and_diverged(method):
    """A step that converges some samples and flags others diverged."""
    D = 37
    dtype = torch.float64
    st, f, gen = _make_state(D, dtype, 3 if method == "anderson" else None, True, filled=1)
    st.abs0.copy_(torch.tensor([1e-12, 1e9, 1e9, 1e-12, 1e9, 1e9, 1e9, 1e9], dtype=dtype))
    fz = f(st.z)
    fz[1] = st.z[1]  # exactly converged
    fz[2] = st.z[2] + 1e-12
    p = StepParams(tol=1e-8, beta=1.0, stop_rel=False, divergence=10.0, eps=1e-9, lam=1e-4)
    a, b = _clone_state(st), _clone_state(st)
    if method == "anderson":
        reference.anderson_step(a, fz.clone(), p, 1)
        cpp.anderson_step(b, fz.clone(), p, 1)
    else:
        reference.picard_step(a, fz.clone(), p)
        cpp.picard_step(b, fz.clone(), p)
    assert b.status.tolist()[:4] == [3, 1, 1, 3]
    _assert_states_close(b, a, dtype, 3 if method == "anderson" else None, torch.ones(B, dtype=torch.bool))


def test_singular_system_falls_back_to_picard():
    """All-zero Gram (g == 0 history, lam == 0) -> singular -> damped Picard step."""
    D = 16
    z = torch.randn(2, D, dtype=torch.float64)
    st = LoopState.create(z.clone(), m=2, return_best=False)
    st.H.zero_()  # singular whatever the new row is when g has zero entries in H
    fz = z.clone()
    fz[0] += 1.0
    fz[1] += torch.randn(D, dtype=torch.float64)
    st.H[0, 1, 1] = 0.0
    p = StepParams(tol=1e-30, beta=0.5, stop_rel=False, divergence=1e6, eps=1e-9, lam=0.0)
    a, b = _clone_state(st), _clone_state(st)
    reference.anderson_step(a, fz.clone(), p, 0)
    cpp.anderson_step(b, fz.clone(), p, 0)
    torch.testing.assert_close(b.z, a.z)
    torch.testing.assert_close(b.z, z + 0.5 * (fz - z))


def _problem(Bn, D, dtype, seed=0):
    """f(z) = tanh(W z + x), contractive (||W||_2 <= ||W||_F = 0.9; no SVD: fast)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(Bn, D, generator=gen, dtype=torch.float64).to(dtype)
    if D > 1024:  # large D: diagonal plus rank-4 coupling, cheap to apply
        d = (torch.rand(D, generator=gen, dtype=torch.float64) * 0.8).to(dtype)
        U = (torch.randn(D, 4, generator=gen, dtype=torch.float64) * (0.1 / D ** 0.5)).to(dtype)
        return (lambda z: torch.tanh(d * z + (z @ U) @ U.T + x)), torch.zeros(Bn, D, dtype=dtype)
    W = torch.randn(D, D, generator=gen, dtype=torch.float64)
    W = (0.9 * W / torch.linalg.matrix_norm(W)).to(dtype)
    return (lambda z: torch.tanh(z @ W.T + x)), torch.zeros(Bn, D, dtype=dtype)


@pytest.mark.parametrize("method", ["anderson", "picard"])
@pytest.mark.parametrize("opts", [dict(), dict(return_best=True, stop="abs", beta=0.9, m=3)])
def test_solve_float64_matches_reference(method, opts):
    f, z0 = _problem(6, 53, torch.float64)
    kw = dict(method=method, max_iter=80, tol=1e-9, check_every=5, **opts)
    r = imp_fast.solve(f, z0, backend="reference", **kw)
    c = imp_fast.solve(f, z0, backend="cpp", **kw)
    assert c.backend == "cpp"
    assert torch.equal(c.status, r.status)
    assert torch.equal(c.n_iter, r.n_iter)
    torch.testing.assert_close(c.z, r.z, rtol=1e-8, atol=1e-10)
    assert (c.status == imp_fast.Status.CONVERGED).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_solve_low_precision_matches_reference(dtype):
    f, z0 = _problem(4, 129, dtype)
    kw = dict(max_iter=30, tol=1e-30, check_every=None)
    r = imp_fast.solve(f, z0, backend="reference", **kw)
    c = imp_fast.solve(f, z0, backend="cpp", **kw)
    assert torch.equal(c.status, r.status) and torch.equal(c.n_iter, r.n_iter)
    rtol, atol = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-2, 1e-2), torch.bfloat16: (1e-1, 5e-2)}[dtype]
    torch.testing.assert_close(c.z, r.z, rtol=rtol, atol=atol)


def test_solve_nonfinite_sample_is_frozen_and_flagged():
    f0, z0 = _problem(4, 33, torch.float64)

    def f(z):
        out = f0(z)
        if z.shape[0] == 4:
            out = out.clone()
            out[2, 5] = float("nan")
        return out

    r = imp_fast.solve(f, z0, backend="reference", max_iter=40, tol=1e-10)
    c = imp_fast.solve(f, z0, backend="cpp", max_iter=40, tol=1e-10)
    assert torch.equal(c.status, r.status) and torch.equal(c.n_iter, r.n_iter)
    assert int(c.status[2]) == int(imp_fast.Status.NONFINITE)
    assert torch.isfinite(c.z).all()
    torch.testing.assert_close(c.z, r.z)


def test_large_d_chunked_path_matches_reference():
    """D > one chunk (4096) with B small: the multi-chunk code path."""
    f, z0 = _problem(2, 5000, torch.float64)
    kw = dict(max_iter=12, tol=1e-30, check_every=None, m=4)
    r = imp_fast.solve(f, z0, backend="reference", **kw)
    c = imp_fast.solve(f, z0, backend="cpp", **kw)
    torch.testing.assert_close(c.z, r.z, rtol=1e-9, atol=1e-11)
    pf = imp_fast.solve(f, z0, backend="cpp", method="picard", **kw)
    pr = imp_fast.solve(f, z0, backend="reference", method="picard", **kw)
    torch.testing.assert_close(pf.z, pr.z, rtol=1e-9, atol=1e-11)


def test_threads_do_not_change_results():
    f, z0 = _problem(3, 9000, torch.float32)  # 3 chunks per sample
    kw = dict(max_iter=6, tol=1e-30, check_every=None, m=3, backend="cpp")
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = imp_fast.solve(f, z0, **kw).z
        torch.set_num_threads(2)
        b = imp_fast.solve(f, z0, **kw).z
    finally:
        torch.set_num_threads(old)
    # f itself (matmul) may differ across thread counts; the steps are deterministic
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_torch_compile_steps_fullgraph(method):
    """The ops trace with fullgraph=True (schemas + fake kernels) and match eager."""
    f, z0 = _problem(4, 40, torch.float32)
    p = StepParams(tol=1e-30, beta=0.9, stop_rel=True, divergence=1e6, eps=1e-9, lam=1e-4)
    step = cpp.anderson_step if method == "anderson" else cpp.picard_step

    def run(z0):
        st = LoopState.create(z0.clone(), m=3 if method == "anderson" else None, return_best=True)
        for k in range(6):
            fz = f(st.z)
            if method == "anderson":
                step(st, fz, p, k % 3)
            else:
                step(st, fz, p)
            if k == 0:
                st.abs0.copy_(st.abs_res)
        return st.z, st.status, st.n_iter, st.best_z, st.abs_res

    eager = run(z0)
    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="eager")(z0)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)


@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_torch_compile_solve_fullgraph(method):
    f, z0 = _problem(4, 40, torch.float32)

    def run(z0):
        res = imp_fast.solve(f, z0, method=method, max_iter=6, tol=1e-30, check_every=None, m=3,
                             backend="cpp")
        return res.z, res.status, res.n_iter

    eager = run(z0)
    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True, backend="eager")(z0)
    torch.testing.assert_close(compiled[0], eager[0])
    assert torch.equal(compiled[1], eager[1]) and torch.equal(compiled[2], eager[2])


def test_fake_kernels_and_schema():
    from torch._subclasses.fake_tensor import FakeTensorMode

    st, f, gen = _make_state(9, torch.float32, 2, True)
    fz = f(st.z)
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    fst = LoopState(**{k: (None if v is None else mode.from_tensor(v)) for k, v in st.tensors().items()})
    ffz = mode.from_tensor(fz)
    with mode:
        p = StepParams(tol=1e-4, beta=1.0, stop_rel=True, divergence=1e6, eps=1e-9, lam=1e-4)
        cpp.anderson_step(fst, ffz, p, 0)
        cpp.picard_step(fst, ffz, p)
    schema = torch.ops.imp_fast.anderson_step.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert {"z", "status", "n_iter", "abs_res", "rel_res", "best_z", "F", "G", "H"} <= mutated
    assert "fz" not in mutated and "abs0" not in mutated


def test_bad_inputs_raise_clear_errors():
    st, f, gen = _make_state(5, torch.float32, 2, False)
    p = StepParams(tol=1e-4, beta=1.0, stop_rel=True, divergence=1e6, eps=1e-9, lam=1e-4)
    with pytest.raises(RuntimeError, match="fz must match"):
        cpp.anderson_step(st, torch.zeros(B, 4), p, 0)
    with pytest.raises(RuntimeError, match="slot"):
        cpp.anderson_step(st, f(st.z), p, 5)


def _bad(name):
    """(field, replacement maker) pairs: each breaks one argument of the ops."""
    return {
        "z": lambda t: t.to(torch.int32),
        "status": lambda t: t.to(torch.int32),
        "n_iter": lambda t: t.to(torch.int64),
        "abs_res": lambda t: t.double(),
        "rel_res": lambda t: torch.zeros(2 * t.numel())[::2],  # not contiguous
        "abs0": lambda t: t[:-1],  # wrong length
        "best_z": lambda t: t.double(),
        "best_abs": lambda t: t.double(),
        "F": lambda t: t.double(),
        "G": lambda t: t[:, :1].contiguous(),  # wrong m
        "H": lambda t: t.transpose(1, 2),  # not contiguous
    }[name]


@pytest.mark.parametrize("name", ["z", "status", "n_iter", "abs_res", "rel_res", "abs0", "best_z", "best_abs",
                                  "F", "G", "H"])
@pytest.mark.parametrize("entry", ["op", "fast"])
def test_every_argument_is_checked(name, entry):
    """Each tensor argument's dtype, shape, contiguity (and device, same check) is
    validated by csrc/checks.h, shared by the CPU and CUDA ops: a clear error naming the
    argument, never a bad read, and the state untouched."""
    st, f, gen = _make_state(6, torch.float32, 3, True, filled=2)
    p = StepParams(tol=1e-4, beta=1.0, stop_rel=True, divergence=1e6, eps=1e-9, lam=1e-4)
    fz = f(st.z)
    setattr(st, name, _bad(name)(getattr(st, name)))
    before = {k: v.clone() for k, v in st.tensors().items() if v is not None}
    with pytest.raises(RuntimeError, match=name if name != "best_abs" else "best_"):
        if entry == "op":
            cpp._anderson_op(st.z, fz, st.status, st.n_iter, st.abs_res, st.rel_res, st.abs0, st.best_z,
                             st.best_abs, st.best_rel, st.F, st.G, st.H, 0, p.tol, p.beta, p.stop_rel,
                             p.divergence, p.eps, p.lam)
        else:
            cpp.anderson_step(st, fz, p, 0)
    for k, v in before.items():
        assert torch.equal(getattr(st, k), v), k
    if name not in ("F", "G", "H"):  # the Picard op checks the same state arguments
        with pytest.raises(RuntimeError, match=name if name != "best_abs" else "best_"):
            cpp._picard_op(st.z, fz if name != "z" else fz.to(torch.int32), st.status, st.n_iter, st.abs_res,
                           st.rel_res, st.abs0, st.best_z, st.best_abs, st.best_rel, p.tol, p.beta, p.stop_rel,
                           p.divergence, p.eps)


@pytest.mark.parametrize("m", [1, 9, 65, 130])
def test_cpu_op_accepts_any_history_size(m):
    # No history limit on the CPU op (CUDA: shared memory up to m = 64, global memory
    # beyond; Triton: fused up to 16, the reference step beyond). A linear map with
    # m >= D + 1 is solved exactly by Anderson: check against float64 linear algebra.
    D = 10
    g = torch.Generator().manual_seed(m)
    A = torch.randn(D, D, generator=g, dtype=torch.float64)
    A = 0.7 * A / torch.linalg.matrix_norm(A, 2)
    b = torch.randn(3, D, generator=g, dtype=torch.float64)
    want = torch.linalg.solve(torch.eye(D, dtype=torch.float64) - A, b.T).T
    r = imp_fast.solve(lambda z: z @ A.T + b, torch.zeros(3, D, dtype=torch.float64), m=m, tol=1e-12,
                       max_iter=300, backend="cpp")
    assert (r.status == imp_fast.Status.CONVERGED).all()
    torch.testing.assert_close(r.z, want, rtol=1e-9, atol=1e-10)


def test_registry():
    assert backend_status()["cpp"] is None
    be = get_backend("cpp", torch.device("cpu"))
    assert be.name == "cpp" and "cpu" in be.devices
    assert get_backend("auto", torch.device("cpu")).name == "cpp"
    assert ("cuda" in cpp.DEVICES) == bool(imp_fast._C.WITH_CUDA)


@pytest.mark.parametrize("D", [37, 9000])
def test_steps_bitwise_independent_of_thread_count(D):
    """Fixed chunking and ordered partial sums: same bits on 1 and 2 threads."""
    st, f, gen = _make_state(D, torch.float32, 4, True, filled=3, seed=1)
    fz = f(st.z)
    p = StepParams(tol=1e-30, beta=0.9, stop_rel=True, divergence=1e6, eps=1e-9, lam=1e-4)
    outs = []
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            s = _clone_state(st)
            cpp.anderson_step(s, fz, p, 3)
            cpp.picard_step(s, fz, p)
            outs.append(s)
    finally:
        torch.set_num_threads(old)
    for name in ("z", "abs_res", "rel_res", "H", "G", "best_z", "status", "n_iter"):
        assert torch.equal(getattr(outs[0], name), getattr(outs[1], name)), name


@pytest.mark.parametrize("method", ["anderson", "picard"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("best", [False, True])
def test_eager_fast_path_matches_the_dispatched_op_exactly(method, dtype, best):
    """cpp steps on plain CPU tensors call _C._step_cpu (no dispatcher); the result is
    bit-identical to the torch.ops.imp_fast call on the same state."""
    st, f, _ = _make_state(37, dtype, 3 if method == "anderson" else None, best, filled=2)
    p = StepParams(tol=1e-3, beta=0.8, stop_rel=True, divergence=1e6, eps=1e-9, lam=1e-4)
    fast, slow = _clone_state(st), _clone_state(st)
    for k in range(3):
        fz = f(fast.z)
        if method == "anderson":
            cpp.anderson_step(fast, fz, p, k % 3)
            cpp._anderson_op(slow.z, f(slow.z), slow.status, slow.n_iter, slow.abs_res, slow.rel_res, slow.abs0,
                             slow.best_z, slow.best_abs, slow.best_rel, slow.F, slow.G, slow.H, k % 3,
                             p.tol, p.beta, p.stop_rel, p.divergence, p.eps, p.lam)
        else:
            cpp.picard_step(fast, fz, p)
            cpp._picard_op(slow.z, f(slow.z), slow.status, slow.n_iter, slow.abs_res, slow.rel_res, slow.abs0,
                           slow.best_z, slow.best_abs, slow.best_rel, p.tol, p.beta, p.stop_rel, p.divergence, p.eps)
    assert ("cpp", p) in fast.cache  # the fast path was taken
    for name, t in fast.tensors().items():
        if t is not None:
            assert torch.equal(t, getattr(slow, name)), name


def test_eager_fast_path_follows_a_replaced_state_tensor():
    st, f, _ = _make_state(16, torch.float32, 2, False)
    p = StepParams(tol=1e-30, beta=1.0, stop_rel=True, divergence=1e6, eps=1e-9, lam=1e-4)
    cpp.anderson_step(st, f(st.z), p, 0)
    st.z = st.z.clone()  # a new tensor object: the cached argument tuple must not be used
    z_before = st.z.clone()
    cpp.anderson_step(st, f(st.z), p, 1)
    assert not torch.equal(st.z, z_before)  # the step moved the new z
    assert st.cache[("cpp", p)][0] is st.z


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_multi_chunk_samples_keep_the_numerical_rules(method):
    """D > 4096 (several chunks per sample, on several threads): an update that overflows
    float16 is caught on the whole sample before any chunk is written, and a float32
    sum of squares that overflows is recomputed across all chunks."""
    D = 9000
    r = imp_fast.solve(lambda z: torch.full_like(z, 6e4), torch.zeros(2, D, dtype=torch.float16), method=method,
                       beta=1.5, backend="cpp")
    assert (r.status == imp_fast.Status.NONFINITE).all() and (r.n_iter == 0).all()
    assert not r.z.any()
    f = lambda z: 0.5 * z + 1e19
    r1 = imp_fast.solve(f, torch.zeros(2, D), method=method, max_iter=1, backend="cpp")
    torch.testing.assert_close(r1.abs_residual, torch.full((2,), 1e19 * D ** 0.5), rtol=1e-5, atol=0)
    r = imp_fast.solve(f, torch.zeros(2, D), method=method, backend="cpp")
    assert (r.status == imp_fast.Status.CONVERGED).all()
    torch.testing.assert_close(r.z.double(), torch.full((2, D), 2e19, dtype=torch.float64), rtol=1e-3, atol=0)
