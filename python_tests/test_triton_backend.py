"""Triton backend vs the reference steps.

Without a GPU the kernels run under the Triton interpreter on CPU tensors
(TRITON_INTERPRET=1 is set by conftest.py before the kernels are imported), so shapes
stay tiny. The fused steps are checked on identical cloned LoopStates after each step,
then whole solves are compared (statuses and n_iter exactly, z within dtype tolerance).
"""
import os

import pytest
import torch

import imp_fast
from imp_fast.backends import backend_status, get_backend, reference
from imp_fast.state import LoopState, StepParams

triton_be = pytest.importorskip("imp_fast.backends.triton")
if triton_be.unavailable_reason() is not None:  # pragma: no cover
    pytest.skip(f"triton backend unavailable: {triton_be.unavailable_reason()}", allow_module_level=True)

from imp_fast.backends.triton import launch_anderson, launch_picard  # noqa: E402

# The interpreter evaluates inf - inf for the non-finite samples on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _clone(st: LoopState) -> LoopState:
    return st.clone()


def _assert_same_state(got: LoopState, want: LoopState, dtype, *, exact_codes=True):
    tol = RTOL[dtype]
    for name, w in want.tensors().items():
        g = getattr(got, name)
        if w is None:
            assert g is None, name
            continue
        if w.dtype in (torch.int8, torch.int32):
            assert torch.equal(g, w), f"{name}: {g.tolist()} != {w.tolist()}"
        else:
            # Storage-dtype tensors may differ by one rounding of the stored value.
            atol = tol * max(1.0, float(w[torch.isfinite(w)].abs().max()) if torch.isfinite(w).any() else 1.0)
            torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=atol, equal_nan=True, msg=name)


def _f(z):
    return 0.5 * torch.tanh(z.float()) + 0.1 * torch.cos(z.float()) + 0.05


def _start_state(B, D, dtype, m, best, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(B, D, generator=gen).to(dtype).to(DEV)
    st = LoopState.create(z, m=m, return_best=best)
    return st


def _run_steps(method, dtype, B, D, m, splits, *, best=True, stop_rel=True, beta=0.8, steps=4, lam=1e-4):
    """Step the triton and reference backends side by side; compare after each step.

    Sample 1 is frozen (CONVERGED) from the start; sample 2 returns NaN at step 2.
    """
    p = StepParams(tol=1e-4, beta=beta, stop_rel=stop_rel, divergence=1e6, eps=1e-9, lam=lam)
    st = _start_state(B, D, dtype, m, best)
    st.status[1] = int(imp_fast.Status.CONVERGED)
    launches = set()
    block = None if splits is None else 16  # small blocks so that D really splits
    for k in range(steps):
        fz = _f(st.z).to(dtype)
        if k == 2 and B > 2:
            fz[2, D // 2] = float("nan")
        ref = _clone(st)
        if method == "anderson":
            launches.add(launch_anderson(st, fz, p, k % m, block=block, splits=splits))
            reference.anderson_step(ref, fz, p, k % m)
        else:
            launches.add(launch_picard(st, fz, p, block=block, splits=splits))
            reference.picard_step(ref, fz, p)
        if k == 0:
            st.abs0.copy_(st.abs_res)
            ref.abs0.copy_(ref.abs_res)
        _assert_same_state(st, ref, dtype)
        st = ref  # continue from the reference state: no error build-up across steps
    if B > 2:
        assert int(st.status[2]) == int(imp_fast.Status.NONFINITE)
    assert int(st.status[1]) == int(imp_fast.Status.CONVERGED)
    return launches


ANDERSON_CASES = [
    # dtype, m, D, splits (None: automatic geometry, 1 sample program under the interpreter)
    (torch.float32, 1, 1, None),
    (torch.float32, 3, 37, 2),
    (torch.float32, 5, 300, 3),
    (torch.float32, 8, 37, None),
    (torch.float16, 3, 300, 2),
    (torch.float16, 8, 1, None),
    (torch.float16, 5, 37, 3),
    (torch.bfloat16, 1, 300, 3),
    (torch.bfloat16, 5, 37, None),
    (torch.bfloat16, 8, 300, 2),
    (torch.float32, 12, 5, None),  # m > 8: 16-wide register solve
]


@pytest.mark.parametrize("dtype,m,D,splits", ANDERSON_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_anderson_step_matches_reference(dtype, m, D, splits):
    launches = _run_steps("anderson", dtype, 4, D, m, splits)
    assert launches == {3}


@pytest.mark.parametrize(
    "dtype,D,splits,stop_rel,best",
    [
        (torch.float32, 1, None, True, True),
        (torch.float32, 300, 3, False, True),
        (torch.float16, 37, 2, True, False),
        (torch.bfloat16, 300, None, False, True),
        (torch.bfloat16, 37, 3, True, True),
    ],
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_picard_step_matches_reference(dtype, D, splits, stop_rel, best):
    launches = _run_steps("picard", dtype, 4, D, None, splits, best=best, stop_rel=stop_rel)
    # One fused launch when each sample has one program, two when D is split.
    assert launches == ({1} if splits is None else {2})


def test_anderson_undamped_no_best_abs_stop():
    _run_steps("anderson", torch.float32, 3, 53, 3, 2, best=False, stop_rel=False, beta=1.0)


def test_anderson_singular_system_falls_back_like_reference():
    # lam = 0 and a zero residual history (f(z) = z for sample 0): H is exactly
    # singular, both backends take the damped Picard fallback (and freeze sample 0).
    p = StepParams(tol=1e-30, beta=0.5, stop_rel=False, divergence=1e6, eps=1e-9, lam=0.0)
    st = _start_state(2, 5, torch.float32, 2, False)
    for k in range(3):
        fz = _f(st.z).to(torch.float32)
        fz[0] = st.z[0]
        ref = _clone(st)
        launch_anderson(st, fz, p, k % 2)
        reference.anderson_step(ref, fz, p, k % 2)
        _assert_same_state(st, ref, torch.float32)
        st = ref


def test_steps_are_deterministic():
    p = StepParams(tol=1e-6, beta=1.0, stop_rel=True, divergence=1e6, eps=1e-9, lam=1e-4)
    st = _start_state(2, 300, torch.float32, 3, True)
    fz = _f(st.z)
    a, b = _clone(st), _clone(st)
    launch_anderson(a, fz, p, 0, block=16, splits=3)
    launch_anderson(b, fz, p, 0, block=16, splits=3)
    for name, x in a.tensors().items():
        y = getattr(b, name)
        if x is not None:
            assert torch.equal(x, y), name


def test_float64_uses_reference_step():
    p = StepParams(tol=1e-6, beta=0.9, stop_rel=True, divergence=1e6, eps=1e-9, lam=1e-4)
    st = _start_state(3, 7, torch.float64, 3, True)
    fz = _f(st.z).double()
    ref = _clone(st)
    triton_be.anderson_step(st, fz, p, 0)
    reference.anderson_step(ref, fz, p, 0)
    _assert_same_state(st, ref, torch.float32)


def test_registry_reports_triton():
    assert backend_status()["triton"] is None
    be = get_backend("triton", torch.device(DEV))
    assert be.name == "triton"
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert "cpu" in be.devices


def _contraction(B, D, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    W = (torch.randn(D, D, generator=gen) * (0.6 / D**0.5)).to(DEV)
    x = torch.randn(B, D, generator=gen).to(DEV)

    def f(z):
        return torch.tanh(z.float() @ W.T + x).to(dtype)

    return f


@pytest.mark.parametrize(
    "method,dtype,check_every,best",
    [
        ("anderson", torch.float32, None, False),
        ("anderson", torch.float32, 4, True),
        ("picard", torch.float32, 3, True),
        ("anderson", torch.float16, None, False),
        ("anderson", torch.bfloat16, 5, False),
    ],
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_solve_matches_reference(method, dtype, check_every, best):
    B, D = 3, 37
    f = _contraction(B, D, dtype)
    z0 = torch.zeros(B, D, dtype=dtype, device=DEV)
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    opts = dict(method=method, max_iter=12, tol=tol, m=3, beta=0.9, check_every=check_every, return_best=best)
    want = imp_fast.solve(f, z0, backend="reference", **opts)
    got = imp_fast.solve(f, z0, backend="triton", **opts)
    assert got.backend == "triton"
    assert torch.equal(got.status, want.status), (got.status, want.status)
    assert torch.equal(got.n_iter, want.n_iter), (got.n_iter, want.n_iter)
    assert got.host_syncs == want.host_syncs
    torch.testing.assert_close(got.z.float(), want.z.float(), rtol=RTOL[dtype] * 5, atol=RTOL[dtype] * 5)
    assert bool(torch.isfinite(got.z).all())


def test_solve_nonfinite_and_diverged_samples():
    B, D = 3, 9
    calls = {"n": 0}

    def f(z):
        calls["n"] += 1
        out = 0.5 * torch.tanh(z) + 0.2
        out = out.clone()
        out[1] = z[1] * 3.0 + 1.0  # diverges
        if calls["n"] % 2 == 0 and calls["n"] >= 4:
            out[2, 3] = float("inf")  # non-finite
        return out

    z0 = torch.zeros(B, D, device=DEV)
    opts = dict(method="anderson", max_iter=10, tol=1e-6, m=3, divergence=5.0, check_every=None)
    calls["n"] = 0
    want = imp_fast.solve(f, z0, backend="reference", **opts)
    calls["n"] = 0
    got = imp_fast.solve(f, z0, backend="triton", **opts)
    assert torch.equal(got.status, want.status), (got.status, want.status)
    assert torch.equal(got.n_iter, want.n_iter)
    assert int(got.status[2]) == int(imp_fast.Status.NONFINITE)
    torch.testing.assert_close(got.z, want.z, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_loop_is_sync_free_on_cuda(method):
    B, D = 8, 256
    f = _contraction(B, D, torch.float32)
    z0 = torch.zeros(B, D, device="cuda")
    opts = dict(method=method, max_iter=10, tol=1e-5, m=5, check_every=None, backend="triton", return_best=True)
    imp_fast.solve(f, z0, **opts)  # compile the kernels outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = imp_fast.solve(f, z0, **opts)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert res.host_syncs == 0
    want = imp_fast.solve(f, z0, **{**opts, "backend": "reference"})
    assert torch.equal(res.status, want.status)
    torch.testing.assert_close(res.z, want.z, rtol=1e-4, atol=1e-4)


def test_bf16_store_rounds_to_nearest_even_like_torch():
    # Picard with beta=1 stores z = f(z) computed in float32 and rounded to bf16.
    p = StepParams(tol=1e-30, beta=1.0, stop_rel=False, divergence=1e30, eps=1e-9)
    gen = torch.Generator().manual_seed(3)
    z = torch.zeros(2, 300, dtype=torch.bfloat16, device=DEV)
    st = LoopState.create(z, m=None, return_best=False)
    fz = (torch.randn(2, 300, generator=gen) * 3).to(torch.bfloat16).to(DEV)
    st2 = _clone(st)
    launch_picard(st, fz, p)
    reference.picard_step(st2, fz, p)
    assert torch.equal(st.z, st2.z)


def test_kernels_compile_for_gpu_without_one():
    """Compile every kernel to a cubin (sm_90) with Triton's ptxas, outside the interpreter."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "imp_fast.backends.triton.aot", "--arch", "90"],
        capture_output=True, text=True, env=env, timeout=240,
    )
    if proc.returncode != 0 and "FAILED" not in proc.stdout:
        pytest.skip(f"Triton cannot compile for CUDA here: {proc.stderr.strip().splitlines()[-1:]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": ok") == 18
