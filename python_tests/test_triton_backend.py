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

# The interpreter evaluates inf - inf for the non-finite samples, and overflowing casts
# (the overflow checks), on purpose.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

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
        elif name == "H":
            _assert_same_gram(g, w)
        else:
            # Storage-dtype tensors may differ by one rounding of the stored value.
            atol = tol * max(1.0, float(w[torch.isfinite(w)].abs().max()) if torch.isfinite(w).any() else 1.0)
            torch.testing.assert_close(g.float(), w.float(), rtol=tol, atol=atol, equal_nan=True, msg=name)


def _assert_same_gram(got: torch.Tensor, want: torch.Tensor):
    """Gram matrices: the unwritten diagonal (UNSET_DIAG) must match exactly; written
    entries within float32 summation error of each sample's written scale (a tolerance
    built from max|H| would include the 1e30 placeholders and compare nothing)."""
    unset = want == LoopState.UNSET_DIAG
    assert torch.equal(got == LoopState.UNSET_DIAG, unset)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))  # NaN rows of a NaN sample
    written = ~unset & torch.isfinite(want)
    assert written.any()
    scale = torch.where(written, want.abs(), 0).amax(dim=(1, 2), keepdim=True).clamp_min(1e-30)
    err = ((got - want).abs() / scale)[written]
    assert float(err.max()) < 1e-5, f"H: max scaled difference {float(err.max()):.3g}"


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
    # 3 launches with one program per sample; a 4th (commit) when D is split.
    assert launches == ({3} if splits is None else {4})


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


@pytest.mark.parametrize("m,D", [(2, 1), (1, 1), (4, 37)])
def test_anderson_nan_before_any_history(m, D):
    # f returns NaN at the very first step, so the sample's whole Gram row is NaN (no
    # padding rows when m is a power of two): the pivot search must not choke on an
    # all-NaN column (the interpreter raised; found by test_fuzz.py). NONFINITE, z kept.
    p = StepParams(tol=1e-4, beta=1.0, stop_rel=True, divergence=1e6, eps=1e-9, lam=1e-4)
    st = _start_state(2, D, torch.float32, m, False)
    z0 = st.z.clone()
    fz = _f(st.z)
    fz[0] = float("nan")
    launch_anderson(st, fz, p, 0)
    assert st.status.tolist() == [int(imp_fast.Status.NONFINITE), 0]
    assert torch.equal(st.z[0], z0[0]) and st.n_iter.tolist() == [0, 1]
    torch.testing.assert_close(st.z[1], fz[1])  # one slot of history: the mix is f(z)


@pytest.mark.parametrize("splits", [None, 3], ids=["one_program", "split"])
@pytest.mark.parametrize("beta", [1.0, 1.5])
def test_anderson_mix_overflow_is_decided_on_the_whole_sample(splits, beta):
    # float16 history (every entry alike, D = 40) whose secant weights are about (-1, 2):
    # g_0 = 4032 (f_0 = 60000), now g_1 = 2016. The mix passes 65504 (infinite once
    # stored); the damped Picard fallback z + beta g_1 is finite for beta = 1 (z = f)
    # but overflows for beta = 1.5 (63008 + 3024): then NONFINITE, z kept. With D split
    # across programs the decision needs the commit launch (4 launches).
    D = 40
    z1, f1 = (62016.0, 64032.0) if beta == 1.0 else (63008.0, 65024.0)
    st = LoopState.create(torch.full((1, D), z1, dtype=torch.float16, device=DEV), m=2, return_best=False)
    st.F[0, 0], st.G[0, 0] = 60000.0, 4032.0
    st.H[0, 0, 0] = D * 4032.0 ** 2
    fz = torch.full((1, D), f1, dtype=torch.float16, device=DEV)
    p = StepParams(tol=1e-30, beta=beta, stop_rel=True, divergence=1e6, eps=1e-9, lam=1e-4)
    n = launch_anderson(st, fz, p, 1, block=None if splits is None else 16, splits=splits)
    assert n == (3 if splits is None else 4)
    if beta == 1.0:
        assert st.status.tolist() == [0] and st.n_iter.tolist() == [1]
        assert torch.equal(st.z, fz)
    else:
        assert st.status.tolist() == [int(imp_fast.Status.NONFINITE)] and st.n_iter.tolist() == [0]
        assert torch.equal(st.z, torch.full((1, D), z1, dtype=torch.float16, device=DEV))


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


@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_solve_nonfinite_and_diverged_samples(method):
    """DIVERGED and NONFINITE agree with the reference, at iterations fixed by closed forms.

    Sample 0 contracts (tanh), sample 1's residual doubles at every call whatever z is
    (f = z + 2^call, so no mixing can help it): abs_k = 3 * 2^(k+1) against abs0 = 6,
    DIVERGED (> 5 * abs0) at the 4th call, after 3 updates. Sample 2 meets Inf at the
    4th call: NONFINITE after 3 updates. (The old version used z -> 3z + 1 for the
    "divergent" sample: Anderson solves that affine map, so nothing diverged, and its
    n_iter hung on whether the mix hit the fixed point to the last bit: the float32
    small-system solve of a rank-one history, now float64 on every backend.)
    """
    B, D = 3, 9
    calls = {"n": 0}

    def f(z):
        calls["n"] += 1
        out = 0.5 * torch.tanh(z) + 0.2
        out[1] = z[1] + 2.0 ** calls["n"]
        if calls["n"] >= 4:
            out[2, 3] = float("inf")
        return out

    z0 = torch.zeros(B, D, device=DEV)
    opts = dict(method=method, max_iter=40, tol=1e-5, m=3, divergence=5.0, check_every=1)
    calls["n"] = 0
    want = imp_fast.solve(f, z0, backend="reference", **opts)
    calls["n"] = 0
    got = imp_fast.solve(f, z0, backend="triton", **opts)
    S = imp_fast.Status
    assert want.status.tolist() == [S.CONVERGED, S.DIVERGED, S.NONFINITE]
    assert want.n_iter.tolist()[1:] == [3, 3]
    assert torch.equal(got.status, want.status), (got.status, want.status)
    assert got.n_iter.tolist()[1:] == [3, 3]
    # sample 0 converges to the fixed point of 0.5 tanh(z) + 0.2 (float64 bisection)
    lo, hi = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 * torch.tanh(mid) + 0.2 > mid else (lo, mid)
    for r in (want, got):
        torch.testing.assert_close(r.z[0].double().cpu(), lo.expand(D), rtol=1e-4, atol=1e-5)
        assert torch.isfinite(r.z).all()
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


def _bf16_rounding_cases():
    """z, f (bfloat16) and beta whose float32 update z + beta (f - z) falls strictly
    between two bfloat16 values (3/4 of an ulp: round up, truncation rounds down), and
    exactly half-way (ties: even mantissa wins; truncation always rounds down)."""
    # even and odd last mantissa bits (ties go down from the former, up from the latter)
    ulp = torch.tensor([2.0 ** -7, 2.0 ** -7, 2.0 ** -7, 2.0 ** -6, 2.0 ** -1, 2.0 ** -14])
    u = torch.tensor([1.0, 1.0, 1.5, -3.0, 100.0, 2.0 ** -7], dtype=torch.float32)
    u = u + ulp * torch.tensor([0.0, 1.0, 1.0, -1.0, 1.0, 1.0])
    z = u.to(torch.bfloat16)
    f = (u + 4 * ulp * torch.sign(u)).to(torch.bfloat16)  # four ulps away, exact
    return z, f


@pytest.mark.parametrize("beta,kind", [(0.1875, "up"), (0.125, "tie")])
def test_bf16_store_rounds_to_nearest_even_like_torch(beta, kind):
    # z + beta (f - z) with f - z = 4 ulps: beta = 3/16 gives 3/4 ulp (round to nearest
    # goes up, truncation down), beta = 1/8 gives exactly half an ulp (a tie: to the
    # even neighbour). Expected values from torch's float32 -> bfloat16 cast (round to
    # nearest even), computed independently of the kernels; the case is checked to
    # separate rounding from truncation.
    z, f = _bf16_rounding_cases()
    exact = z.float() + beta * (f.float() - z.float())
    want = exact.to(torch.bfloat16)
    truncated = (exact.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    assert (want != truncated).any()  # the test can tell rounding from truncation
    if kind == "tie":
        assert torch.equal((want.view(torch.int16) & 1), torch.zeros_like(want.view(torch.int16)))
    p = StepParams(tol=1e-30, beta=beta, stop_rel=False, divergence=1e30, eps=1e-9)
    for method in ("picard", "anderson"):
        st = LoopState.create(z[None].repeat(2, 1).to(DEV), m=1 if method == "anderson" else None,
                              return_best=False)
        fz = f[None].repeat(2, 1).to(DEV)
        if method == "picard":
            launch_picard(st, fz, p)
        else:  # m = 1: the mix F - (1 - beta) G is the same update
            launch_anderson(st, fz, p, 0)
        got = st.z[0].cpu()
        if method == "picard":
            assert torch.equal(got, want), (method, got, want)
        else:  # the mix is formed differently in float32: equal, or one ulp off at a tie
            assert torch.equal(got, want) or kind == "tie", (method, got, want)
            torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=0)


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
    assert proc.stdout.count(": ok") == 3 * 9 + 1  # 9 kernel variants x 3 dtypes, pair_ratios in float64
