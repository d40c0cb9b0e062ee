"""Per-sample failure reporting (divergence, NaN/Inf, max_iter, throw=True) and the
numerical rules behind the statuses, on every available backend and both methods.

Expected values are closed forms or independent float64 computations; each rule here
was a silent wrong answer once (issue 13): 0/0 relative residuals at exact fixed
points, float32 norms overflowing/underflowing, updates overflowing float16 while the
status promised the last finite iterate, the small Anderson system solved in float32
on some backends and float64 on others.
"""
import math

import pytest
import torch

import imp_fast
from imp_fast import SolveError, Status
from imp_fast.backends import BackendUnavailable, backend_status, get_backend
from imp_fast.state import LoopState, StepParams

METHODS = ["picard", "anderson"]
BACKENDS = [name for name, why in backend_status().items() if why is None]

# The Triton interpreter evaluates inf - inf and overflowing casts on purpose.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def _device(backend):
    """CPU where the backend runs on CPU (the Triton interpreter does), else CUDA."""
    try:
        get_backend(backend, torch.device("cpu"))
        return torch.device("cpu")
    except BackendUnavailable:
        if not torch.cuda.is_available():
            pytest.skip(f"{backend} needs CUDA here")
        return torch.device("cuda")


def _solve(f, z0, backend, **kw):
    return imp_fast.solve(f, z0.to(_device(backend)), backend=backend, **kw)


def _true_residuals(f, z):
    """(abs, rel with eps=0) of each sample at z, recomputed in float64 from f."""
    fz = f(z).double().reshape(z.shape[0], -1).cpu()
    zz = z.double().reshape(z.shape[0], -1).cpu()
    a = (fz - zz).norm(dim=1)
    return a, a / fz.norm(dim=1)


# ---------------------------------------------------------------------------------
# statuses


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_divergent_samples_are_flagged_and_others_converge(backend, method):
    # Sample 0 contracts (0.5), sample 1 expands (1.5): z -> a z + 1. Anderson with m=1
    # is the damped Picard step, so both methods see the same closed-form trajectory:
    # sample 1's residual is 1.5^k, past divergence=1e4 (times the first, 1) at k=23.
    a = torch.tensor([[0.5], [1.5]], dtype=torch.float64)
    r = _solve(lambda z: a.to(z.device) * z + 1, torch.zeros(2, 1, dtype=torch.float64), backend, method=method,
               m=1, tol=1e-10, stop="abs", max_iter=500, divergence=1e4)
    assert r.status.tolist() == [Status.CONVERGED, Status.DIVERGED]
    assert int(r.n_iter[1]) == 23  # 1.5^23 > 1e4 >= 1.5^22
    assert torch.isfinite(r.z).all()
    assert abs(float(r.z[0, 0]) - 2.0) < 1e-9  # fixed point of z/2 + 1


def test_divergence_is_detected_in_a_vector_anderson_solve():
    # A map with no fixed point: z -> z + 1 grows by one each step, residual constant;
    # with an expanding component Anderson can not fix it either.
    f = lambda z: torch.stack([2.0 * z[:, 0] + torch.sin(z[:, 1]), z[:, 1] + 1.0], dim=1)
    r = imp_fast.anderson(f, torch.ones(1, 2, dtype=torch.float64), tol=1e-12, max_iter=300,
                          divergence=1e3, backend="reference")
    assert r.status[0] in (Status.DIVERGED, Status.MAX_ITER)
    assert torch.isfinite(r.z).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_nan_from_f_is_flagged_and_frozen_at_last_finite_iterate(backend, method):
    calls = {"n": 0}

    def f(z):
        calls["n"] += 1
        out = 0.5 * z + 1.0
        if calls["n"] >= 3:  # sample 1 starts returning NaN at the third evaluation
            out = out.clone()
            out[1] = float("nan")
        return out

    r = _solve(f, torch.zeros(3, 4, dtype=torch.float32), backend, method=method, tol=1e-6, stop="abs",
               max_iter=200, trace=True)
    assert r.status.tolist() == [Status.CONVERGED, Status.NONFINITE, Status.CONVERGED]
    assert torch.isfinite(r.z).all()
    assert int(r.n_iter[1]) == 2  # frozen at z_2, the iterate f failed on
    assert not torch.isfinite(r.abs_residual[1])
    torch.testing.assert_close(r.z[0].cpu(), torch.full((4,), 2.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_inf_and_nan_both_count_as_nonfinite(backend, bad):
    def f(z):
        out = 0.5 * z
        out[0, 0] = bad
        return out

    r = _solve(f, torch.ones(2, 3), backend, method="picard")
    assert r.status[0] == Status.NONFINITE and r.status[1] == Status.CONVERGED
    assert torch.equal(r.z[0].cpu(), torch.ones(3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_max_iter_status(backend, method):
    # z -> z + 1 has no fixed point: every method's residual is ||1|| = sqrt(D) at every
    # iterate (f(z) - z does not depend on z), so max_iter is the only honest outcome.
    D = 5
    r = _solve(lambda z: z + 1, torch.zeros(2, D, dtype=torch.float64), backend, method=method,
               tol=1e-12, max_iter=10, stop="abs")
    assert r.method == method
    assert (r.status == Status.MAX_ITER).all()
    assert (r.n_iter == 10).all()
    assert r.iterations == 10
    torch.testing.assert_close(r.abs_residual.cpu(), torch.full((2,), math.sqrt(D), dtype=torch.float64))


def test_throw_raises_one_error_listing_failed_samples():
    a = torch.tensor([[0.5], [1.5], [0.999]], dtype=torch.float64)
    with pytest.raises(SolveError) as ei:
        imp_fast.picard(lambda z: a * z + 1, torch.zeros(3, 1, dtype=torch.float64), tol=1e-10, stop="abs",
                        max_iter=100, divergence=1e4, throw=True, backend="reference")
    msg = str(ei.value)
    assert "failed for 2 of 3 samples" in msg
    assert "sample 1: diverged" in msg and "sample 2: max_iter" in msg
    assert "sample 0" not in msg
    assert ei.value.result.status[0] == Status.CONVERGED


def test_throw_does_not_raise_when_all_converge():
    r = imp_fast.picard(lambda z: 0.5 * z, torch.ones(2, 2), throw=True, backend="reference")
    assert r.ok


# ---------------------------------------------------------------------------------
# numerical rules (the reference backend's module docstring), on every backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_exact_fixed_point_with_eps_zero_is_converged(backend, method, dtype):
    # z0 = 0 is the fixed point of z/2 and f(0) = 0: abs = 0 and ||f|| + eps = 0. An
    # exact fixed point is converged with rel residual 0 (not 0/0 = NaN, max_iter).
    r = _solve(lambda z: 0.5 * z, torch.zeros(2, 4, dtype=dtype), backend, method=method, eps=0.0, max_iter=10)
    assert r.status.tolist() == [Status.CONVERGED] * 2
    assert r.rel_residual.tolist() == [0.0, 0.0] and r.abs_residual.tolist() == [0.0, 0.0]
    assert r.n_iter.tolist() == [0, 0]
    assert not r.z.any()
    # with f(z) != 0 the rule does not change anything: still rel = abs / ||f||
    r = _solve(lambda z: 0.5 * z + 1, torch.zeros(1, 4, dtype=dtype), backend, method=method, eps=0.0,
               max_iter=1)
    assert float(r.rel_residual[0]) == 1.0  # ||1 - 0|| / ||1||


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_float32_norms_do_not_overflow(backend, method):
    # Fixed point 2e19 (finite in float32) whose squared norm, 64 * 4e38, is not: the
    # sum of squares must not overflow (it used to: NONFINITE, z stuck at 0).
    f = lambda z: 0.5 * z + 1e19
    r1 = _solve(f, torch.zeros(2, 64), backend, method=method, max_iter=1)
    assert r1.status.tolist() == [Status.MAX_ITER] * 2  # a finite first residual, not NONFINITE
    torch.testing.assert_close(r1.abs_residual.cpu(), torch.full((2,), 8e19), rtol=1e-6, atol=0)
    r = _solve(f, torch.zeros(2, 64), backend, method=method)
    assert r.status.tolist() == [Status.CONVERGED] * 2, r.summary()
    torch.testing.assert_close(r.z.double().cpu(), torch.full((2, 64), 2e19, dtype=torch.float64), rtol=1e-3,
                               atol=0)
    true_abs, true_rel = _true_residuals(f, r.z)
    assert (true_rel < 1e-4 * 1.01).all()
    torch.testing.assert_close(r.abs_residual.double().cpu(), true_abs, rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_float32_norms_do_not_underflow(backend, method):
    # Entries of 1e-25: their squares (1e-50) underflow float32. With eps = 0 the true
    # relative residual at z0 = 0 is 1, not 0/0 (or 0: a false CONVERGED); the solve
    # must reach the true fixed point 2e-25 * c.
    c = torch.linspace(1.0, 2.0, 16)
    f = lambda z: 0.5 * z + 1e-25 * c.to(z.device)
    r1 = _solve(f, torch.zeros(2, 16), backend, method=method, eps=0.0, max_iter=1)
    torch.testing.assert_close(r1.rel_residual.cpu(), torch.ones(2), rtol=1e-6, atol=0)
    torch.testing.assert_close(r1.abs_residual.double().cpu(), 1e-25 * c.double().norm().expand(2), rtol=1e-6,
                               atol=0)
    r = _solve(f, torch.zeros(2, 16), backend, method=method, eps=0.0, max_iter=100)
    assert r.status.tolist() == [Status.CONVERGED] * 2
    _, true_rel = _true_residuals(f, r.z)
    assert (true_rel < 1e-4 * 1.01).all()
    torch.testing.assert_close(r.z.double().cpu(), 2e-25 * c.double().expand(2, 16), rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_float64_norms_are_scale_safe(backend, method):
    # Squared norms beyond float64's range (64 * 1e600) and below it (1e-400).
    for scale in (1e300, 1e-200):
        f = lambda z: 0.5 * z + scale
        r = _solve(f, torch.zeros(2, 64, dtype=torch.float64), backend, method=method, eps=0.0)
        assert r.status.tolist() == [Status.CONVERGED] * 2, (scale, r.summary())
        torch.testing.assert_close(r.z.cpu(), torch.full((2, 64), 2 * scale, dtype=torch.float64), rtol=1e-3,
                                   atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("best", [False, True], ids=["last", "best"])
def test_float16_update_overflow_keeps_the_last_finite_iterate(backend, method, best):
    # f = 6e4 everywhere (finite in float16); beta = 1.5 extrapolates to 9e4 > 65504:
    # the update overflows. NONFINITE promises "frozen at the last finite iterate": z
    # stays z0 = 0, no update counted, and the residuals are those of z0.
    f = lambda z: torch.full_like(z, 6e4)
    r = _solve(f, torch.zeros(2, 4, dtype=torch.float16), backend, method=method, beta=1.5, return_best=best)
    assert r.status.tolist() == [Status.NONFINITE] * 2
    assert torch.equal(r.z.cpu(), torch.zeros(2, 4, dtype=torch.float16))
    assert r.n_iter.tolist() == [0, 0]
    torch.testing.assert_close(r.abs_residual.cpu(), torch.full((2,), 1.2e5), rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_float16_overflow_after_some_steps(backend, method):
    # f(z) = -z stays finite wherever z is; beta = 1.9 makes the update z + 1.9 (f - z)
    # = -2.8 z, which passes float16's 65504 after ten steps (2.8^10 < 65504 < 2.8^11).
    # The sample must stop at the last finite iterate z_10 with n_iter 10 (Anderson with
    # m = 1 mixes F - (1 - beta) G, the same update). The trajectory is recomputed here
    # in float16, step by step.
    f = lambda z: -z
    r = _solve(f, torch.ones(1, 8, dtype=torch.float16), backend, method=method, m=1, beta=1.9, max_iter=50,
               divergence=1e9)
    want, n = torch.ones(1, 8, dtype=torch.float16), 0
    while True:
        nxt = (want.float() + 1.9 * (f(want).float() - want.float())).half()
        if not torch.isfinite(nxt).all():
            break
        want, n = nxt, n + 1
    assert n == 10
    assert r.status.tolist() == [Status.NONFINITE]
    assert int(r.n_iter[0]) == n
    z = r.z.cpu()
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z.float(), want.float(), rtol=1e-3, atol=0)
    if method == "picard":
        assert torch.equal(z, want)
    # the reported residual is that of the returned iterate: ||f(z) - z|| = 2 ||z||
    torch.testing.assert_close(r.abs_residual.cpu(), 2 * z.float().norm(dim=1), rtol=1e-3, atol=0)


def _to(st, dev):
    return st if dev.type == "cpu" else LoopState(**{k: None if v is None else v.to(dev) for k, v in st.tensors().items()})


@pytest.mark.parametrize("backend", BACKENDS)
def test_anderson_mix_overflow_falls_back_to_picard(backend):
    # History (all entries alike, D = 4): slot 0 went z = 55968 -> f = 60000 (g = 4032);
    # now z = 62016 -> f = 64032 (g = 2016 = g_0 / 2), every value exact in float16.
    # The secant weights are about (-1, 2): mix = 2 * 64032 - 60000 = 68064, finite in
    # float32 but past float16's 65504. The mix must be rejected (it used to be stored
    # as inf) and the damped Picard step (beta = 1: f itself) taken instead.
    dev = _device(backend)
    st = LoopState.create(torch.full((1, 4), 62016.0, dtype=torch.float16), m=2, return_best=False)
    st.F[0, 0] = 60000.0
    st.G[0, 0] = 4032.0
    st.H[0, 0, 0] = 4 * 4032.0 ** 2
    st = _to(st, dev)
    fz = torch.full((1, 4), 64032.0, dtype=torch.float16, device=dev)
    p = StepParams(tol=1e-30, beta=1.0, stop_rel=True, divergence=1e6, eps=1e-9, lam=1e-4)
    get_backend(backend, dev).anderson_step(st, fz, p, 1)
    assert int(st.status[0]) == Status.RUNNING and int(st.n_iter[0]) == 1
    assert torch.equal(st.z.cpu(), fz.cpu())


def _near_singular_history(dtype=torch.float32):
    """A float32 Anderson state whose bordered system (lam = 0) is near-singular
    (condition ~3e7) with every Gram entry exact in float32 (integer residuals; all
    partial sums < 2^24, so every backend computes the same H bit for bit). The
    f-values are unit vectors, so the mixed z is the weight vector itself."""
    m, D = 4, 8
    g = torch.Generator().manual_seed(63)
    Gv = torch.randint(-400, 401, (m, D), generator=g).double()
    Gv[3] = Gv[0] + Gv[1] - Gv[2]
    Gv[3, 63 % D] += 1
    slot = 3
    fz = torch.zeros(1, D, dtype=torch.float64)
    fz[0, slot] = 1.0
    z = fz - Gv[slot]
    st = LoopState.create(z.to(dtype), m=m, return_best=False)
    for i in range(m):
        if i != slot:
            st.F[0, i] = torch.nn.functional.one_hot(torch.tensor(i), D).to(dtype)
            st.G[0, i] = Gv[i].to(dtype)
    H = Gv @ Gv.T
    old = torch.arange(m) != slot
    st.H[0][old[:, None] & old[None, :]] = H[old[:, None] & old[None, :]].float()
    return st, fz.to(dtype), slot, H


@pytest.mark.parametrize("backend", BACKENDS)
def test_near_singular_anderson_system_is_solved_in_float64(backend):
    st, fz, slot, H = _near_singular_history()
    m = H.shape[0]
    x = torch.linalg.solve(H, torch.ones(m, dtype=torch.float64))  # float64 reference
    want = x / x.sum()
    # the case separates the precision rules: a float32 solve is off by > 1%
    x32 = torch.linalg.solve(H.float(), torch.ones(m))
    assert float(((x32 / x32.sum()).double() - want).abs().max() / want.abs().max()) > 1e-2
    dev = _device(backend)
    st = _to(st, dev)
    be = get_backend(backend, dev)
    p = StepParams(tol=1e-30, beta=1.0, stop_rel=True, divergence=1e6, eps=1e-9, lam=0.0)
    be.anderson_step(st, fz.to(dev), p, slot)
    assert int(st.status[0]) == Status.RUNNING and int(st.n_iter[0]) == 1
    torch.testing.assert_close(st.H[0].double().cpu(), H.float().double())  # exact Gram row
    got = st.z[0, :m].double().cpu()
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
    assert not st.z[0, m:].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_exactly_singular_anderson_system_falls_back_on_every_backend(backend):
    # Two equal residuals in the history and lam = 0: H is singular (exactly, in any
    # precision); every backend takes the Picard step z = f(z).
    st, fz, slot, H = _near_singular_history()
    st.G[0, 0] = fz[0] - st.z[0]  # slot 0's residual equals the new one
    st.H[0, 0, :] = 0
    st.H[0, :, 0] = 0
    Gv = st.G[0].double()
    Gv[slot] = (fz[0] - st.z[0]).double()
    Hs = Gv @ Gv.T
    old = torch.arange(H.shape[0]) != slot
    st.H[0][old[:, None] & old[None, :]] = Hs[old[:, None] & old[None, :]].float()
    dev = _device(backend)
    st = _to(st, dev)
    p = StepParams(tol=1e-30, beta=1.0, stop_rel=True, divergence=1e6, eps=1e-9, lam=0.0)
    get_backend(backend, dev).anderson_step(st, fz.to(dev), p, slot)
    assert torch.equal(st.z.cpu(), fz)
    assert int(st.n_iter[0]) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [1, 16, 17, 70])
def test_every_backend_accepts_any_history_size(backend, m):
    # Anderson on an affine contraction with m >= D + 1 is exact (GMRES) in about D + 1
    # steps; smaller m still converges. Every backend takes every m >= 1 (no hard
    # limits; Triton runs the reference step past its fused MAX_M = 16).
    D = 12
    g = torch.Generator().manual_seed(m)
    A = torch.randn(D, D, generator=g, dtype=torch.float64)
    A = 0.8 * A / torch.linalg.matrix_norm(A, 2)
    b = torch.randn(2, D, generator=g, dtype=torch.float64)
    want = torch.linalg.solve(torch.eye(D, dtype=torch.float64) - A, b.T).T  # float64 closed form
    f = lambda z: (z.double() @ A.T.to(z.device) + b.to(z.device)).to(z.dtype)
    r = _solve(f, torch.zeros(2, D), backend, method="anderson", m=m, tol=1e-6, max_iter=200)
    assert r.status.tolist() == [Status.CONVERGED] * 2, r.summary()
    torch.testing.assert_close(r.z.double().cpu(), want, rtol=1e-4, atol=1e-4)
