"""The optional per-sample tolerance ``tol_t`` of the compiled step ops.

picard_step, anderson_step and broyden_step (csrc/ops.cpp, csrc/broyden.cpp; CUDA twins
in csrc/cuda) take a trailing ``Tensor? tol_t=None``: a contiguous (B,) tensor in the
compute dtype on the state's device, with which sample b converges when its residual
is below ``tol_t[b]`` (the scalar ``tol`` is then unused). Checked here, calling the ops
directly on LoopState objects:

- tol_t filled with the scalar tol gives exactly the scalar call (every state tensor);
- per-sample tol_t: every sample's status, n_iter, z and residuals, step after step,
  equal a solve of that sample alone with its own scalar tol;
- the eager CPU fast path (``_C._step_cpu``, state tuple item 18) and the backend
  wrappers (``LoopState.tol`` through getattr) agree with the torch.ops call;
- a bad tol_t (shape, dtype, device, contiguity) is a clear error that writes nothing;
- torch.library.opcheck with tol_t given, for all three ops.
Skipped when the extension is not built.
"""
import pytest
import torch

pytest.importorskip("imp_fast._C", reason="imp_fast._C not built (pip install -e . --no-build-isolation)")

from imp_fast import Status  # noqa: E402
from imp_fast import _C  # noqa: E402
from imp_fast.backends import broyden as plain  # noqa: E402
from imp_fast.backends import cpp, reference  # noqa: E402
from imp_fast.state import LoopState, StepParams  # noqa: E402

from helpers import CPP_DEVICES, op_inputs  # noqa: E402

F64, F32 = torch.float64, torch.float32
OPS = ("picard_step", "anderson_step", "broyden_step")
M = 3
B, D = 6, 37  # D: not a multiple of any vector width

DEVICES = CPP_DEVICES


def _params(stop_rel=False, tol=1e-4):
    return StepParams(tol=tol, beta=0.8, stop_rel=stop_rel, divergence=1e6, eps=1e-9, lam=1e-4)


def _cdt(dtype):
    return F64 if dtype == F64 else F32


def _new_state(op, z0):
    if op == "anderson_step":
        return LoopState.create(z0, m=M, return_best=True)
    if op == "broyden_step":
        return LoopState.create(z0, m=None, return_best=True, broyden_m=M)
    return LoopState.create(z0, m=None, return_best=True)


def _args(op, st, fz, k, p, tol_t):
    head = (st.z, fz, st.status, st.n_iter, st.abs_res, st.rel_res, st.abs0, st.best_z, st.best_abs, st.best_rel)
    if op == "picard_step":
        args = head + (p.tol, p.beta, p.stop_rel, p.divergence, p.eps)
    elif op == "anderson_step":
        args = head + (st.F, st.G, st.H, k % M, p.tol, p.beta, p.stop_rel, p.divergence, p.eps, p.lam)
    else:
        args = head + (st.U, st.V, st.z_prev, st.g_prev, k, p.tol, p.beta, p.stop_rel, p.divergence, p.eps)
    return args if tol_t is None else args + (tol_t,)


def _step(op, st, fz, k, p, tol_t=None):
    getattr(torch.ops.imp_fast, op).default(*_args(op, st, fz, k, p, tol_t))
    if k == 0:
        st.abs0.copy_(st.abs_res)  # as the loop does after the first step


def _problem(dtype, device="cpu", nb=B, seed=0):
    """f(z) row by row (a (1, D) computation per sample, whatever the batch: the same
    bits for a sample alone and in a batch), contractions of different strength per
    sample so that samples converge at different iterations."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(nb, D, D, generator=gen, dtype=F64) * (0.5 / D**0.5)
    W = W * torch.linspace(0.3, 1.0, nb, dtype=F64)[:, None, None]
    x = torch.randn(nb, D, generator=gen, dtype=F64)
    W, x = W.to(device), x.to(device)

    def f_rows(z, rows):
        return torch.cat([torch.tanh(z[i:i + 1].double() @ W[b].T + x[b:b + 1]) for i, b in enumerate(rows)]).to(dtype)

    return f_rows


# ---------------------------------------------------------------------------------------
# semantics


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stop_rel", [False, True], ids=["abs", "rel"])
@pytest.mark.parametrize("dtype", [F32, F64, torch.float16, torch.bfloat16], ids=["f32", "f64", "f16", "bf16"])
@pytest.mark.parametrize("op", OPS)
def test_tol_t_equal_to_the_scalar_is_the_scalar_call(op, dtype, stop_rel, device):
    tol = 3e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    p = _params(stop_rel, tol)
    f = _problem(dtype, device)
    rows = list(range(B))
    a = _new_state(op, torch.zeros(B, D, dtype=dtype, device=device))
    b = a.clone()
    tol_t = torch.full((B,), tol, dtype=_cdt(dtype), device=device)
    for k in range(40):
        fz = f(a.z, rows)
        _step(op, a, fz, k, p)
        _step(op, b, fz.clone(), k, p, tol_t)
        for name, t in a.tensors().items():
            if t is not None:
                assert torch.equal(t, getattr(b, name)) or (
                    t.is_floating_point() and torch.equal(t.isnan(), getattr(b, name).isnan())
                    and torch.equal(t.nan_to_num(), getattr(b, name).nan_to_num())), (name, k)
        if bool((a.status != 0).all()):
            break
    assert int((a.status == Status.CONVERGED).sum()) >= (B if dtype in (F32, F64) else 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stop_rel", [False, True], ids=["abs", "rel"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("op", OPS)
def test_each_sample_converges_at_its_own_tolerance(op, dtype, stop_rel, device):
    """Batched with per-sample tol_t == each sample alone with its scalar tol: statuses,
    n_iter, z and residuals after every step."""
    tols = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 3e-6]
    f = _problem(dtype, device)
    z0 = torch.zeros(B, D, dtype=dtype, device=device)
    batch = _new_state(op, z0.clone())
    tol_t = torch.tensor(tols, dtype=_cdt(dtype), device=device)
    # the scalar given with tol_t is ignored: make it one that would freeze everything
    p_batch = _params(stop_rel, tol=1e30)
    alone = [_new_state(op, z0[b:b + 1].clone()) for b in range(B)]
    p_alone = [_params(stop_rel, tol=t) for t in tols]
    for k in range(60):
        _step(op, batch, f(batch.z, range(B)), k, p_batch, tol_t)
        for b in range(B):
            _step(op, alone[b], f(alone[b].z, [b]), k, p_alone[b])
        for b, s in enumerate(alone):
            assert int(batch.status[b]) == int(s.status[0]), (b, k)
            assert int(batch.n_iter[b]) == int(s.n_iter[0]), (b, k)
            for name in ("z", "abs_res", "rel_res", "best_z", "best_abs", "best_rel"):
                assert torch.equal(getattr(batch, name)[b], getattr(s, name)[0]), (name, b, k)
        if bool((batch.status != 0).all()):
            break
    assert batch.status.tolist() == [int(Status.CONVERGED)] * B
    n = batch.n_iter.tolist()
    assert n == sorted(n) and len(set(n)) >= 3, n  # the tolerances mattered


@pytest.mark.parametrize("op", OPS)
def test_per_sample_tolerance_with_samples_over_several_chunks(op):
    """D > 4096: the CPU ops' two-pass paths (a sample split over several tasks, heads
    in finish_heads) against each sample alone."""
    nb, d = 3, 9000
    tols = [3e-1, 1e-2, 1e-4]
    a = torch.linspace(0.2, 0.6, nb, dtype=F64)
    x = torch.randn(nb, d, generator=torch.Generator().manual_seed(3), dtype=F64)

    def f(z, rows):  # elementwise, row by row: the same bits alone and batched
        return torch.cat([torch.tanh(a[b] * z[i:i + 1] + x[b:b + 1]) for i, b in enumerate(rows)]).to(F32)

    p = _params(tol=1e30)
    batch = _new_state(op, torch.zeros(nb, d))
    tol_t = torch.tensor(tols)
    alone = [_new_state(op, torch.zeros(1, d)) for _ in range(nb)]
    for k in range(60):
        _step(op, batch, f(batch.z, range(nb)), k, p, tol_t)
        for b in range(nb):
            _step(op, alone[b], f(alone[b].z, [b]), k, _params(tol=tols[b]))
            assert int(batch.status[b]) == int(alone[b].status[0]), (b, k)
            assert int(batch.n_iter[b]) == int(alone[b].n_iter[0]), (b, k)
            assert torch.equal(batch.z[b], alone[b].z[0]), (b, k)
            assert torch.equal(batch.abs_res[b], alone[b].abs_res[0]), (b, k)
        if bool((batch.status != 0).all()):
            break
    assert batch.status.tolist() == [int(Status.CONVERGED)] * nb
    assert len(set(batch.n_iter.tolist())) == nb


@pytest.mark.parametrize("op", ["picard_step", "anderson_step"])
def test_eager_fast_path_and_wrappers_take_the_state_tol(op):
    """``_C._step_cpu`` (state tuple item 18) and the backend wrappers, reading
    ``LoopState.tol`` through getattr, agree with the torch.ops call with tol_t."""
    tols = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 3e-6]
    p = _params(tol=1e30)
    f = _problem(F32)
    ref = _new_state(op, torch.zeros(B, D))
    got = ref.clone()
    tol_t = torch.tensor(tols)
    got.tol = tol_t  # the LoopState field (or a plain attribute before it exists)
    for k in range(60):
        fz = f(ref.z, range(B))
        _step(op, ref, fz, k, p, tol_t)
        if op == "picard_step":
            cpp.picard_step(got, fz.clone(), p)
        else:
            cpp.anderson_step(got, fz.clone(), p, k % M)
        if k == 0:
            got.abs0.copy_(got.abs_res)
        assert cpp._fast_state(got, p, fz)[18] is tol_t
        for name, t in ref.tensors().items():
            if t is not None and name != "tol":
                assert torch.equal(t, getattr(got, name)), (name, k)
        if bool((ref.status != 0).all()):
            break
    assert len(set(ref.n_iter.tolist())) >= 3


def test_broyden_wrapper_takes_the_state_tol():
    tols = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 3e-6]
    p = _params(tol=1e30)
    f = _problem(F64)
    ref = _new_state("broyden_step", torch.zeros(B, D, dtype=F64))
    got = ref.clone()
    tol_t = torch.tensor(tols, dtype=F64)
    got.tol = tol_t
    for k in range(60):
        fz = f(ref.z, range(B))
        _step("broyden_step", ref, fz, k, p, tol_t)
        cpp.broyden_step(got, fz.clone(), p, k)
        if k == 0:
            got.abs0.copy_(got.abs_res)
        for name, t in ref.tensors().items():
            if t is not None and name != "tol":
                assert torch.equal(t, getattr(got, name)), (name, k)
        if bool((ref.status != 0).all()):
            break
    assert ref.status.tolist() == [int(Status.CONVERGED)] * B and len(set(ref.n_iter.tolist())) >= 3


def test_fast_path_cache_follows_the_state_tol():
    """The cached fast-path tuple is rebuilt when ``st.tol`` is replaced or removed."""
    p = _params()
    st = _new_state("picard_step", torch.zeros(B, D))
    fz = torch.ones(B, D)
    assert cpp._fast_state(st, p, fz)[18] is None
    t1 = torch.full((B,), 1e-3)
    st.tol = t1
    assert cpp._fast_state(st, p, fz)[18] is t1
    st.tol = None
    assert cpp._fast_state(st, p, fz)[18] is None


def test_tol_t_none_in_the_fast_path_is_the_scalar_tol():
    p = _params(tol=1e-3)
    f = _problem(F32)
    a = _new_state("picard_step", torch.zeros(B, D))
    b = a.clone()
    for k in range(40):
        fz = f(a.z, range(B))
        _step("picard_step", a, fz, k, p)
        _C._step_cpu(cpp._fast_state(b, p, fz), fz.clone())
        if k == 0:
            b.abs0.copy_(b.abs_res)
        for name, t in a.tensors().items():
            if t is not None:
                assert torch.equal(t, getattr(b, name)), (name, k)


# ---------------------------------------------------------------------------------------
# argument checks


def _bad_cases(dtype):
    cdt = _cdt(dtype)
    other = F32 if cdt == F64 else F64
    return [
        (torch.zeros(B + 1, dtype=cdt), r"tol_t must be a \(6,\) tensor"),
        (torch.zeros(B - 1, dtype=cdt), r"tol_t must be a \(6,\) tensor"),
        (torch.zeros(B, 1, dtype=cdt), r"tol_t must be a \(6,\) tensor"),
        (torch.zeros((), dtype=cdt), r"tol_t must be a \(6,\) tensor"),
        (torch.zeros(B, dtype=other), f"tol_t must be {'Double' if cdt == F64 else 'Float'}"),
        (torch.zeros(B, dtype=torch.int32), "tol_t must be"),
        (torch.zeros(B, dtype=torch.float16), "tol_t must be"),
        (torch.zeros(2 * B, dtype=cdt)[::2], "tol_t must be contiguous"),
    ]


@pytest.mark.parametrize("dtype", [F32, F64, torch.float16], ids=["f32", "f64", "f16"])
@pytest.mark.parametrize("op", OPS)
def test_bad_tol_t_raises_a_clear_error_and_writes_nothing(op, dtype):
    p = _params()
    for bad, match in _bad_cases(dtype):
        st = _new_state(op, torch.zeros(B, D, dtype=dtype))
        fz = torch.ones(B, D, dtype=dtype)
        before = {k: v.clone() for k, v in st.tensors().items() if v is not None}
        with pytest.raises(RuntimeError, match=match):
            getattr(torch.ops.imp_fast, op).default(*_args(op, st, fz, 1, p, bad))
        for k, v in before.items():
            assert torch.equal(getattr(st, k), v), (k, match)


@pytest.mark.parametrize("op", ["picard_step", "anderson_step"])
def test_bad_tol_t_in_the_fast_path(op):
    p = _params()
    st = _new_state(op, torch.zeros(B, D))
    fz = torch.ones(B, D)
    slot = () if op == "picard_step" else (1,)
    state = cpp._fast_state(st, p, fz)
    for bad, match in _bad_cases(F32):
        with pytest.raises(RuntimeError, match=match):
            _C._step_cpu(state[:18] + (bad,), fz, *slot)
    with pytest.raises(RuntimeError, match="tol_t must be on cpu"):
        _C._step_cpu(state[:18] + (torch.zeros(B, device="meta"),), fz, *slot)
    with pytest.raises(TypeError, match=r"state\[18\] \(tol_t\) must be None or a tensor"):
        _C._step_cpu(state[:18] + (1e-3,), fz, *slot)
    with pytest.raises(TypeError, match="state tuple of 19"):
        _C._step_cpu(state[:18], fz, *slot)
    assert int(st.n_iter.sum()) == 0 and int(st.status.abs().sum()) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not (cpp.WITH_CUDA and torch.cuda.is_available()), reason="needs imp_fast._C built with CUDA and a GPU")
@pytest.mark.parametrize("op", OPS)
def test_tol_t_on_another_device_is_an_error(op):
    p = _params()
    for dev, tdev in (("cuda", "cpu"), ("cpu", "cuda")):
        st = _new_state(op, torch.zeros(B, D, device=dev))
        fz = torch.ones(B, D, device=dev)
        with pytest.raises(RuntimeError, match="tol_t must be on"):
            getattr(torch.ops.imp_fast, op).default(*_args(op, st, fz, 1, p, torch.zeros(B, device=tdev)))


# ---------------------------------------------------------------------------------------
# torch.library: opcheck with tol_t, the schema


def _opcheck_state(op, dtype, stage, device="cpu"):
    """(state, fz, k) before one step: "first" (fresh state) or "mid" (after 4 steps of
    the plain-torch step, one sample frozen CONVERGED, one NONFINITE, two running samples
    whose f(z) turns NaN / Inf now)."""
    p = _params(stop_rel=True)
    st = _new_state(op, torch.zeros(B, D, dtype=dtype, device=device))

    def step(s_, fz_, k_):
        if op == "picard_step":
            reference.picard_step(s_, fz_, p)
        elif op == "anderson_step":
            reference.anderson_step(s_, fz_, p, k_ % M)
        else:
            plain.broyden_step(s_, fz_, p, k_)

    fz, k = op_inputs(st, stage, step)
    return st, fz, k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stage", ["first", "mid"])
@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("op", OPS)
def test_opcheck_with_tol_t(op, dtype, stage, device):
    st, fz, k = _opcheck_state(op, dtype, stage, device)
    if stage == "mid":
        fz.requires_grad_(True)  # so that opcheck's autograd registration check runs
    tol_t = torch.logspace(-1, -6, B, dtype=_cdt(dtype), device=device)
    args = _args(op, st, fz, k, _params(stop_rel=True), tol_t)
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    result = torch.library.opcheck(getattr(torch.ops.imp_fast, op).default, args)
    assert result == {
        "test_schema": "SUCCESS",
        "test_autograd_registration": "SUCCESS",
        "test_faketensor": "SUCCESS",
        "test_aot_dispatch_dynamic": "SUCCESS",
    }
    for a, b in zip(args, before):  # opcheck works on copies
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("op", OPS)
def test_schema_has_a_trailing_optional_tol_t_read_only(op):
    schema = getattr(torch.ops.imp_fast, op).default._schema
    last = schema.arguments[-1]
    assert last.name == "tol_t" and str(last.type) == "Optional[Tensor]"
    assert last.default_value is None and last.alias_info is None


@pytest.mark.parametrize("op", OPS)
def test_fake_kernel_takes_tol_t(op):
    st, fz, k = _opcheck_state(op, F32, "first")
    tol_t = torch.full((B,), 1e-3)
    args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in _args(op, st, fz, k, _params(), tol_t)]
    assert getattr(torch.ops.imp_fast, op).default(*args) is None
