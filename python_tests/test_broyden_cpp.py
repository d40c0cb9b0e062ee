"""The fused Broyden op (csrc/broyden.cpp, backend="cpp") against the plain-torch step.

The ground truth is imp_fast/backends/broyden.py (what backend="reference" runs). Checked
here: whole solves (same statuses and n_iter, z within 1e-10 in float64 / 1e-4 in
float32) on a contractive tanh problem, linear maps with a closed-form fixed point and
the stiff demo problem; single steps on identical inputs (the whole state, history
included, after every step: restarts, zero updates of frozen samples, z_prev/g_prev);
per-sample freezing, batch and thread-count invariance; a NaN in one sample; float16
overflow of the update (NONFINITE, last finite iterate kept); restarts (m smaller than
the iteration count, m = 1); low-precision storage; argument checks; torch.library
opcheck, functionalization and the fake kernel. The single-step, stiff-problem and
opcheck cases also run the CUDA twin where it is built and a GPU is present (marker
"gpu"). Skipped when the extension is not built.
"""
import warnings

import pytest
import torch

pytest.importorskip("imp_fast._C", reason="imp_fast._C not built (pip install -e . --no-build-isolation)")

import imp_fast  # noqa: E402
from imp_fast import Status  # noqa: E402
from imp_fast.backends import broyden as plain  # noqa: E402
from imp_fast.backends import cpp, get_backend  # noqa: E402
from imp_fast.demo import make_problem  # noqa: E402
from imp_fast.state import LoopState, StepParams  # noqa: E402

from helpers import CPP_DEVICES, assert_compiled_op_writes_back, contractive_linear, linear_map, op_inputs  # noqa: E402

F64, F32 = torch.float64, torch.float32
ZTOL = {F64: 1e-10, F32: 1e-4}

# The CUDA twin (csrc/cuda/broyden.cu) against the same ground truth, where built and a GPU
# is present.
DEVICES = CPP_DEVICES


def _solve(f, z0, backend, **kw):
    kw.setdefault("max_iter", 100)
    return imp_fast.solve(f, z0, method="broyden", backend=backend, **kw)


def _same_solve(f, z0, *, ztol=None, **kw):
    """cpp and reference solves of the same problem agree: statuses, n_iter, z."""
    ref = _solve(f, z0, "reference", **kw)
    got = _solve(f, z0, "cpp", **kw)
    assert got.backend == "cpp" and ref.backend == "reference"
    assert got.status.tolist() == ref.status.tolist()
    assert got.n_iter.tolist() == ref.n_iter.tolist()
    tol = ZTOL[z0.dtype] if ztol is None else ztol
    torch.testing.assert_close(got.z, ref.z, rtol=0, atol=tol)
    return ref, got


def test_registry_picks_the_fused_op():
    be = get_backend("cpp", torch.device("cpu"))
    assert be.broyden_step is cpp.broyden_step
    assert "broyden_step" in cpp.__all__
    assert get_backend("auto", torch.device("cpu")).broyden_step is cpp.broyden_step


# ---------------------------------------------------------------------------------------
# whole solves


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("opts", [
    dict(),
    dict(beta=0.7, stop="abs"),
    dict(return_best=True, m=5),
    dict(m=1),
    dict(m=3, beta=1.3),
], ids=["default", "damped_abs", "best_m5", "m1", "m3_beta1.3"])
@pytest.mark.parametrize("D", [29, 1037])  # 1037: tails of every vector loop, several blocks
def test_tanh_problem_trajectory_matches_reference(dtype, opts, D):
    g = torch.Generator().manual_seed(D)
    W = torch.randn(D, D, generator=g, dtype=F64)
    W = (0.9 * W / torch.linalg.matrix_norm(W, 2)).to(dtype)
    x = torch.randn(5, D, generator=g, dtype=F64).to(dtype)
    tol = 1e-10 if dtype == F64 else 1e-5
    ref, got = _same_solve(lambda z: torch.tanh(z @ W.T + x), torch.zeros(5, D, dtype=dtype), tol=tol,
                           max_iter=80, check_every=1, **opts)
    assert ref.ok
    # the last residuals (below tol) differ by rounding of the last steps
    torch.testing.assert_close(got.residual, ref.residual, rtol=0, atol=0.05 * tol)


@pytest.mark.parametrize("m", [40, 7, 1])
def test_linear_problem_reaches_the_closed_form_fixed_point(m):
    B, D = 4, 12
    A, b = contractive_linear(B, D, rho=0.95)
    want = torch.linalg.solve(torch.eye(D, dtype=F64) - A, b.unsqueeze(2)).squeeze(2)
    ref, got = _same_solve(linear_map(A, b), torch.zeros(B, D, dtype=F64), tol=1e-12, stop="abs", max_iter=400,
                           m=m, check_every=5)
    assert got.ok
    torch.testing.assert_close(got.z, want, rtol=1e-10, atol=1e-10)
    if m == 40:  # full memory: a linear problem in D unknowns takes at most ~2D updates
        assert int(got.n_iter.max()) <= 2 * D


def test_restart_when_memory_is_smaller_than_the_iteration_count():
    """m = 4 on a problem that needs many more iterations: the memory fills and restarts
    several times, identically in both implementations."""
    p = make_problem(6, 96, rho=0.95, symmetric=True, x_scale=0.5, dtype=F64)
    ref, got = _same_solve(p.f, p.z0(), tol=1e-11, m=4, max_iter=200, check_every=1)
    assert got.ok and int(got.n_iter.min()) > 3 * 4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_stiff_demo_problem(dtype, device):
    p = make_problem(8, 256, rho=0.97, symmetric=True, x_scale=0.5, dtype=dtype, device=device)
    tol = 1e-5 if dtype == F32 else 1e-10
    ref, got = _same_solve(p.f, p.z0(), tol=tol, max_iter=100, check_every=1)
    assert got.ok
    assert int(got.n_iter.max()) <= int(ref.n_iter.max())  # no more iterations than the plain step
    with torch.no_grad():
        fz = p.f(got.z)
        rel = (fz - got.z).double().norm(dim=1) / (fz.double().norm(dim=1) + 1e-9)
    assert bool((rel < tol * 1.01).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_storage(dtype):
    p = make_problem(4, 64, rho=0.9, dtype=dtype)
    ref = _solve(p.f, p.z0(), "reference", tol=1e-2, max_iter=100)
    got = _solve(p.f, p.z0(), "cpp", tol=1e-2, max_iter=100)
    assert got.ok and ref.ok
    assert got.z.dtype == dtype and got.residual.dtype == F32
    # the states round to 8-11 bits: one rounding flip may shift a sample by an iteration
    assert (got.n_iter - ref.n_iter).abs().max() <= 1
    torch.testing.assert_close(got.z.float(), ref.z.float(), rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 4e-3)


def test_compact_equals_uncompacted():
    from test_active_sets import heterogeneous_batch

    f, args, z0, _ = heterogeneous_batch()
    opts = dict(method="broyden", tol=1e-8, max_iter=300, check_every=3, backend="cpp")
    full = imp_fast.solve(f, z0, args=args, **opts)
    comp = imp_fast.solve(f, z0, args=args, compact=True, **opts)
    assert torch.equal(full.n_iter, comp.n_iter) and full.ok
    torch.testing.assert_close(comp.z, full.z, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------
# per-sample behaviour


def _elementwise(c):
    """f(z) = 0.5 tanh(z) + c per sample (exactly batch separable); c (B, 1)."""
    return lambda z: 0.5 * torch.tanh(z) + c


def test_batch_invariance_and_per_sample_freezing():
    """Each sample's trajectory is its own: solved in a batch or alone, the same bits;
    samples freeze at their own iteration and do not move after."""
    c = torch.tensor([[0.3], [0.01], [2.0], [-1.2]], dtype=F64)
    z0 = torch.linspace(-1, 1, 4 * 9, dtype=F64).view(4, 9)
    opts = dict(tol=1e-11, stop="abs", max_iter=60, m=5, trace=True)
    batch = _solve(_elementwise(c), z0, "cpp", **opts)
    assert batch.ok and len(set(batch.n_iter.tolist())) > 1  # they freeze at different iterations
    for b in range(4):
        one = _solve(_elementwise(c[b:b + 1]), z0[b:b + 1], "cpp", **opts)
        assert torch.equal(batch.z[b:b + 1], one.z)
        assert batch.n_iter[b] == one.n_iter[0]
        n = int(one.n_iter[0])
        # frozen: the residual trace stays at its value of the converging step
        assert bool((batch.trace_abs[n:, b] == batch.trace_abs[n, b]).all())


def test_nan_in_one_sample_stays_in_that_sample():
    c = torch.tensor([[0.3], [0.1], [0.7]], dtype=F64)
    calls = [0]

    def f(z):
        calls[0] += 1
        out = 0.5 * torch.tanh(z) + c
        if calls[0] == 5:  # mid-solve, with a Broyden history in place
            out = out.clone()
            out[1, 3] = float("nan")
        return out

    z0 = torch.zeros(3, 7, dtype=F64)
    r = _solve(f, z0, "cpp", tol=1e-12, stop="abs", max_iter=50)
    assert r.status.tolist() == [Status.CONVERGED, Status.NONFINITE, Status.CONVERGED]
    assert int(r.n_iter[1]) == 4 and bool(torch.isfinite(r.z).all())
    clean = _solve(_elementwise(c), z0, "cpp", tol=1e-12, stop="abs", max_iter=50)
    for b in (0, 2):
        assert torch.equal(r.z[b], clean.z[b]) and r.n_iter[b] == clean.n_iter[b]
    # the NaN sample keeps the iterate f was evaluated at (its last finite one)
    calls[0] = 0
    short = _solve(f, z0, "cpp", tol=1e-12, stop="abs", max_iter=4)
    assert torch.equal(r.z[1], short.z[1])
    calls[0] = 0
    ref = _solve(f, z0, "reference", tol=1e-12, stop="abs", max_iter=50)
    assert ref.status.tolist() == r.status.tolist() and ref.n_iter.tolist() == r.n_iter.tolist()
    torch.testing.assert_close(r.z, ref.z, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_float16_update_overflow_is_nonfinite_and_keeps_the_last_iterate(backend):
    """f(z) = z / 2 + 40000 in float16 has its fixed point at 80000 (> 65504). The first
    step lands on 40000, f(40000) = 60000 is finite, and the secant step, exact for a
    linear map, jumps to 80000: it overflows float16, so the sample is NONFINITE with z
    kept at 40000 and one update counted. The other sample is unaffected."""
    c = torch.tensor([[40000.0], [1.0]], dtype=torch.float16)
    r = _solve(lambda z: z / 2 + c, torch.zeros(2, 6, dtype=torch.float16), backend, tol=1e-3, max_iter=20)
    assert r.status.tolist() == [Status.NONFINITE, Status.CONVERGED]
    assert int(r.n_iter[0]) == 1
    assert bool((r.z[0] == 40000).all())
    torch.testing.assert_close(r.z[1].float(), torch.full((6,), 2.0), rtol=0, atol=2e-3)


def test_diverged_status_matches_reference():
    ref, got = _same_solve(lambda z: 2.0 * z + 1.0, torch.zeros(2, 3, dtype=F64), tol=1e-12, stop="abs",
                           max_iter=30, divergence=10.0)
    assert got.status.tolist() == ref.status.tolist()


def test_threads_do_not_change_results():
    p = make_problem(16, 200, rho=0.95, symmetric=True, x_scale=0.5)
    old = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(_solve(p.f, p.z0(), "cpp", tol=1e-6, max_iter=60, m=8))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0].z, outs[1].z) and torch.equal(outs[0].n_iter, outs[1].n_iter)


# ---------------------------------------------------------------------------------------
# single steps: the whole state after every step


def _step_problem(B, D, dtype, seed=0, device="cpu"):
    """Linear maps of different contraction per sample (they freeze at different
    iterations), one sample whose f turns NaN at step 5."""
    A, b = contractive_linear(B, D, rho=0.9, seed=seed)
    A = (A * torch.linspace(0.2, 1.0, B, dtype=F64)[:, None, None]).to(device)
    b = b.to(device)

    def f(z, k):
        out = (torch.einsum("bij,bj->bi", A, z.double()) + b).to(dtype)
        if k == 5:
            out[B - 1, 0] = float("nan")
        return out

    return f


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F64, F32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 30])
@pytest.mark.parametrize("best", [False, True])
def test_steps_match_the_plain_step_on_the_whole_state(dtype, m, best, device):
    B, D = 6, 21
    f = _step_problem(B, D, dtype, device=device)
    z0 = torch.zeros(B, D, dtype=dtype, device=device)
    ref = LoopState.create(z0.clone(), m=None, return_best=best, broyden_m=m)
    got = LoopState.create(z0.clone(), m=None, return_best=best, broyden_m=m)
    p = StepParams(tol=1e-7 if dtype == F64 else 1e-3, beta=0.9, stop_rel=False, divergence=1e6, eps=1e-9)
    rt = {F64: 1e-9, F32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    froze = 0
    for k in range(12):
        fz = f(ref.z, k)
        plain.broyden_step(ref, fz, p, k)
        cpp.broyden_step(got, fz.clone(), p, k)
        if k == 0:
            ref.abs0.copy_(ref.abs_res)
            got.abs0.copy_(got.abs_res)
        assert got.status.tolist() == ref.status.tolist(), k
        assert got.n_iter.tolist() == ref.n_iter.tolist(), k
        for name, t in ref.tensors().items():
            if t is None or name in ("status", "n_iter"):
                continue
            u = getattr(got, name)
            td = t.double()
            scale = td[torch.isfinite(td)].abs().max().clamp_min(1.0) if td.numel() else 1.0
            torch.testing.assert_close(u.double(), t.double(), rtol=rt, atol=rt * float(scale), equal_nan=True,
                                       msg=lambda s: f"{name} at k={k}: {s}")
        # storage z and the history of frozen samples match exactly (copies and zeros)
        frozen = ref.status != 0
        froze = max(froze, int(frozen.sum()))
        if k > 0:
            assert bool((got.U[frozen, (k - 1) % m] == 0).all()) and bool((got.V[frozen, (k - 1) % m] == 0).all())
    assert froze >= 2 and int(ref.status[B - 1]) == Status.NONFINITE


def test_restart_zeroes_the_memory():
    B, D, m = 3, 10, 3
    f = _step_problem(B, D, F64)
    st = LoopState.create(torch.zeros(B, D, dtype=F64), m=None, return_best=False, broyden_m=m)
    p = StepParams(tol=1e-30, beta=1.0, stop_rel=True, divergence=1e30, eps=1e-9)
    for k in range(m + 1):  # k = 1..m fill slots 0..m-1
        cpp.broyden_step(st, f(st.z, -1), p, k)
        if k == 0:
            st.abs0.copy_(st.abs_res)
    assert bool((st.U.abs().sum(dim=2) > 0).all())
    cpp.broyden_step(st, f(st.z, -1), p, m + 1)  # memory full: restart, then slot 0
    assert bool((st.U[:, 1:] == 0).all()) and bool((st.V[:, 1:] == 0).all())
    assert bool((st.U[:, 0].abs().sum(dim=1) > 0).all())


def test_zero_update_when_v_dot_dg_vanishes():
    """dz = 0 (z did not move, e.g. a state restored by hand): v = -dz = 0, v.dg = 0, the
    update is zero (slot left zero) and the step is the plain one, as in the torch step."""
    B, D = 2, 5
    z = torch.randn(B, D, dtype=F64)
    fz = 0.5 * z + 1
    states = []
    for step in (plain.broyden_step, cpp.broyden_step):
        st = LoopState.create(z.clone(), m=None, return_best=False, broyden_m=4)
        st.z_prev.copy_(z)
        st.g_prev.copy_(fz - z + 1)
        step(st, fz, StepParams(tol=1e-30, beta=1.0, stop_rel=True, divergence=1e30, eps=1e-9), 1)
        states.append(st)
    ref, got = states
    assert bool((got.U == 0).all()) and bool((got.V == 0).all())
    torch.testing.assert_close(got.z, ref.z, rtol=0, atol=1e-15)
    torch.testing.assert_close(got.z, fz, rtol=0, atol=1e-15)


@pytest.mark.parametrize("step", [plain.broyden_step, cpp.broyden_step], ids=["plain", "cpp"])
def test_nonfinite_step_falls_back_to_picard(step):
    """A finite update (u, v) whose share of the step, u (v.g), overflows float32: the
    step is not finite, so the sample takes the Picard step z + g (it stays running), and
    the update is kept. State by hand at k = 1 (no updates yet, J^-1 = -I):
    dz = (1e28, 0), dg = (~1e-28, ~1e38), g = (1e-27, 1): v = -dz, v.dg = ~-1,
    v.g = -10, u = r / (v.dg) ~ (-1e28, -1e38) finite, u_2 (v.g) ~ 1e39 = inf."""
    fz = torch.tensor([[1e-27, 1.0]])
    st = LoopState.create(torch.zeros(1, 2), m=None, return_best=False, broyden_m=4)
    st.z_prev.copy_(torch.tensor([[-1e28, 0.0]]))
    st.g_prev.copy_(torch.tensor([[9e-28, -1e38]]))
    step(st, fz, StepParams(tol=1e-30, beta=1.0, stop_rel=True, divergence=1e30, eps=1e-9), 1)
    assert st.status.tolist() == [0] and st.n_iter.tolist() == [1]
    assert torch.equal(st.z, fz)
    assert bool(torch.isfinite(st.U[:, 0]).all()) and float(st.U[0, 0, 1]) < -1e37
    torch.testing.assert_close(st.V[:, 0], torch.tensor([[-1e28, 0.0]]))
    torch.testing.assert_close(st.z_prev, torch.zeros(1, 2))
    torch.testing.assert_close(st.g_prev, fz)


# ---------------------------------------------------------------------------------------
# arguments


def _op_args(st, fz, k, p):
    return (st.z, fz, st.status, st.n_iter, st.abs_res, st.rel_res, st.abs0, st.best_z, st.best_abs, st.best_rel,
            st.U, st.V, st.z_prev, st.g_prev, k, p.tol, p.beta, p.stop_rel, p.divergence, p.eps)


PARAMS = StepParams(tol=1e-4, beta=0.8, stop_rel=True, divergence=1e6, eps=1e-9)


@pytest.mark.parametrize("name,bad,match", [
    ("U", lambda t: t.double(), "U must be a contiguous"),
    ("U", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2), "U must be a contiguous"),
    ("U", lambda t: t[:, :, :-1].contiguous(), "U must be a contiguous"),
    ("U", lambda t: t[:, :0].contiguous(), "memory m must be >= 1"),
    ("V", lambda t: t[:, :1].contiguous(), "V must be a contiguous tensor like U"),
    ("V", lambda t: t.double(), "V must be a contiguous tensor like U"),
    ("z_prev", lambda t: t[:-1].contiguous(), "z_prev must be a contiguous"),
    ("g_prev", lambda t: t.to(torch.float16), "g_prev must be a contiguous"),
    ("g_prev", lambda t: t.t().contiguous().t(), "g_prev must be a contiguous"),
    ("z", lambda t: t.to(torch.int32), "z must be float64"),
    ("status", lambda t: t.to(torch.int32), "status"),
    ("best_abs", lambda t: t.double(), "best_abs"),
])
def test_bad_arguments_raise_clear_errors(name, bad, match):
    st = LoopState.create(torch.zeros(3, 8), m=None, return_best=True, broyden_m=4)
    fz = torch.ones(3, 8)
    setattr(st, name, bad(getattr(st, name)))
    before = {k: v.clone() for k, v in st.tensors().items() if v is not None}
    with pytest.raises(RuntimeError, match=match):
        cpp.broyden_step(st, fz if name != "z" else fz.to(torch.int32), PARAMS, 2)
    for k, v in before.items():
        assert torch.equal(getattr(st, k), v), k


def test_bad_iteration_and_fz():
    st = LoopState.create(torch.zeros(3, 8), m=None, return_best=False, broyden_m=4)
    with pytest.raises(RuntimeError, match="iteration k must be >= 0"):
        cpp.broyden_step(st, torch.ones(3, 8), PARAMS, -1)
    with pytest.raises(RuntimeError, match="fz must match"):
        cpp.broyden_step(st, torch.ones(3, 7), PARAMS, 0)
    with pytest.raises(RuntimeError, match="fz must match"):
        cpp.broyden_step(st, torch.ones(3, 8, dtype=F64), PARAMS, 0)


def test_empty_batch_and_non_contiguous_fz():
    st = LoopState.create(torch.zeros(0, 8), m=None, return_best=False, broyden_m=2)
    cpp.broyden_step(st, torch.ones(0, 8), PARAMS, 0)
    a = LoopState.create(torch.zeros(3, 8), m=None, return_best=False, broyden_m=2)
    b = a.clone()
    fz = torch.randn(8, 3).t()
    cpp.broyden_step(a, fz, PARAMS, 0)
    cpp.broyden_step(b, fz.contiguous(), PARAMS, 0)
    assert torch.equal(a.z, b.z)


# ---------------------------------------------------------------------------------------
# torch.library: opcheck, functionalization, fake kernel (pattern of test_opcheck.py)

OB, OD, OM = 6, 37, 3


def _op_state(dtype, best, stage, device="cpu"):
    """(state, fz, k) before one Broyden step. "first": fresh state, k = 0. "mid": after
    4 plain steps (memory m = 3 full: the next step restarts it), one sample frozen
    CONVERGED, one NONFINITE, two running samples whose f(z) turns NaN / Inf now."""
    st = LoopState.create(torch.zeros(OB, OD, dtype=dtype, device=device), m=None, return_best=best, broyden_m=OM)
    fz, k = op_inputs(st, stage, lambda s_, fz_, k_: plain.broyden_step(s_, fz_, PARAMS, k_))
    return st, fz, k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stage", ["first", "mid"])
@pytest.mark.parametrize("best", [False, True], ids=["no_best", "best"])
@pytest.mark.parametrize("dtype", [F32, F64, torch.float16, torch.bfloat16], ids=["f32", "f64", "f16", "bf16"])
def test_opcheck(dtype, best, stage, device):
    st, fz, k = _op_state(dtype, best, stage, device)
    if stage == "mid":
        fz.requires_grad_(True)  # so that opcheck's autograd registration check runs
    args = _op_args(st, fz, k, PARAMS)
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    result = torch.library.opcheck(torch.ops.imp_fast.broyden_step.default, args)
    assert result == {
        "test_schema": "SUCCESS",
        "test_autograd_registration": "SUCCESS",
        "test_faketensor": "SUCCESS",
        "test_aot_dispatch_dynamic": "SUCCESS",
    }
    for a, b in zip(args, before):  # opcheck works on copies
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0, equal_nan=True)


def test_schema_marks_every_mutated_tensor():
    schema = torch.ops.imp_fast.broyden_step.default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"z", "status", "n_iter", "abs_res", "rel_res", "best_z", "best_abs", "best_rel", "U", "V",
                       "z_prev", "g_prev"}


@pytest.mark.parametrize("best", [False, True], ids=["no_best", "best"])
def test_functionalized_op_writes_back_every_mutated_input(best):
    st, fz, k = _op_state(F64, best, "mid")
    # z, status, n_iter, residuals, U, V, z_prev, g_prev move
    assert_compiled_op_writes_back(torch.ops.imp_fast.broyden_step.default, list(_op_args(st, fz, k, PARAMS)),
                                   min_changed=7)


@pytest.mark.parametrize("best", [False, True], ids=["no_best", "best"])
def test_fake_kernel_is_registered(best):
    st, fz, k = _op_state(F32, best, "first")
    args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in _op_args(st, fz, k, PARAMS)]
    assert torch.ops.imp_fast.broyden_step.default(*args) is None


def test_step_is_not_differentiable():
    st, fz, k = _op_state(F32, True, "first")
    fz.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cpp.broyden_step(st, fz, PARAMS, k)
    for name, t in st.tensors().items():
        if t is not None:
            assert not t.requires_grad and t.grad_fn is None, name
    assert int(st.n_iter.sum()) == OB


def test_torch_compile_solve_fullgraph():
    """The op traces inside a compiled loop body (fake kernel + schema)."""
    p = make_problem(4, 32, rho=0.9, dtype=F64)
    st0 = LoopState.create(p.z0(), m=None, return_best=False, broyden_m=5)
    prm = StepParams(tol=1e-9, beta=1.0, stop_rel=True, divergence=1e6, eps=1e-9)

    def body(z, status, n_iter, abs_res, rel_res, abs0, U, V, z_prev, g_prev, k: int):
        s = LoopState(z=z, status=status, n_iter=n_iter, abs_res=abs_res, rel_res=rel_res, abs0=abs0, U=U, V=V,
                      z_prev=z_prev, g_prev=g_prev)
        cpp.broyden_step(s, p.f(z), prm, k)

    names = ("z", "status", "n_iter", "abs_res", "rel_res", "abs0", "U", "V", "z_prev", "g_prev")
    eager, comp = st0.clone(), st0.clone()
    torch._dynamo.reset()
    cbody = torch.compile(body, backend="aot_eager", fullgraph=True, dynamic=False)
    for k in range(6):
        body(*(getattr(eager, n) for n in names), k)
        cbody(*(getattr(comp, n) for n in names), k)
        if k == 0:
            eager.abs0.copy_(eager.abs_res)
            comp.abs0.copy_(comp.abs_res)
    for n in names:
        torch.testing.assert_close(getattr(comp, n), getattr(eager, n), rtol=0, atol=0)
