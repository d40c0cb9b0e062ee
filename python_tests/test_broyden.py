"""method="broyden": limited-memory good Broyden (imp_fast/backends/broyden.py).

References: closed-form fixed points (linear maps, solved with torch.linalg.solve in
float64), torchdeq's broyden_solver on the stiff demo problem, the statuses' meaning.
"""
import pytest
import torch

import imp_fast
from imp_fast import Status
from imp_fast.backends import backend_status
from imp_fast.demo import make_problem

from helpers import contractive_linear, linear_map

BACKENDS = [b for b, why in backend_status().items() if why is None]
F64 = torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_fixed_point_matches_closed_form(backend):
    B, D = 4, 12
    A, b = contractive_linear(B, D, rho=0.95)
    want = torch.linalg.solve(torch.eye(D, dtype=F64) - A, b.unsqueeze(2)).squeeze(2)
    r = imp_fast.solve(linear_map(A, b), torch.zeros(B, D, dtype=F64), method="broyden", tol=1e-12,
                       stop="abs", max_iter=100, m=40, backend=backend)
    assert r.ok and r.method == "broyden"
    torch.testing.assert_close(r.z, want, rtol=1e-10, atol=1e-10)
    # a linear problem in D unknowns: Broyden with full memory needs at most ~2D updates
    assert int(r.n_iter.max()) <= 2 * D


def test_stiff_demo_problem_no_more_iterations_than_torchdeq():
    tdeq = pytest.importorskip("torchdeq.solver")
    p = make_problem(8, 256, rho=0.97, symmetric=True, x_scale=0.5)
    r = imp_fast.solve(p.f, p.z0(), method="broyden", tol=1e-5, max_iter=100, check_every=1)
    assert r.ok
    _, _, info = tdeq.broyden_solver(p.f, p.z0(), max_iter=100, tol=1e-5, stop_mode="rel")
    # torchdeq reports the step index of its lowest residual; imp_fast the updates made
    assert int(r.n_iter.max()) <= int(info["nstep"].max())
    picard = imp_fast.solve(p.f, p.z0(), method="picard", tol=1e-5, max_iter=2000, check_every=1)
    assert 1.5 * int(r.n_iter.max()) < int(picard.n_iter.max())
    # each converged sample's true residual is below tol
    with torch.no_grad():
        fz = p.f(r.z)
        rel = (fz - r.z).norm(dim=1) / (fz.norm(dim=1) + 1e-9)
    assert bool((rel < 1e-5).all())


def test_statuses_nonfinite_diverged_and_batch_invariance():
    D = 6
    c = torch.tensor([0.3, 0.1, 2.0], dtype=F64)

    def f(z):
        out = 0.5 * torch.tanh(z) + c[:, None]
        out = torch.where((c == 2.0)[:, None], torch.full_like(z, float("nan")), out)
        return out

    z0 = torch.zeros(3, D, dtype=F64)
    r = imp_fast.solve(f, z0, method="broyden", tol=1e-10, stop="abs", max_iter=50, backend="reference")
    assert r.status.tolist() == [Status.CONVERGED, Status.CONVERGED, Status.NONFINITE]
    assert bool(torch.isfinite(r.z).all())
    one = imp_fast.solve(lambda z: 0.5 * torch.tanh(z) + 0.3, z0[:1], method="broyden", tol=1e-10, stop="abs",
                         max_iter=50, backend="reference")
    torch.testing.assert_close(r.z[:1], one.z, rtol=0, atol=1e-14)
    assert r.n_iter[0] == one.n_iter[0]
    # diverging map: z -> 2z + 1 along a direction where Broyden's secant steps blow up is
    # caught by the divergence guard or converges to the (repelling) fixed point -1
    r = imp_fast.solve(lambda z: 2.0 * z + 1.0, torch.zeros(2, 3, dtype=F64), method="broyden", tol=1e-12,
                       stop="abs", max_iter=30, backend="reference")
    ok = r.status == Status.CONVERGED
    assert bool(torch.allclose(r.z[ok], torch.full_like(r.z[ok], -1.0)))


def test_broyden_in_implicit_solve_gradients_match_anderson():
    torch.manual_seed(0)
    W = (0.5 * torch.randn(8, 8, dtype=F64) / 8**0.5).requires_grad_()
    x = torch.randn(3, 8, dtype=F64, requires_grad=True)
    G = lambda z, xx: torch.tanh(z @ W.T + xx)  # noqa: E731
    grads = []
    for method in ("broyden", "anderson"):
        z = imp_fast.implicit_solve(G, x, method=method, tol=1e-12, stop="abs", max_iter=200,
                                    backend="reference")
        grads.append(torch.autograd.grad(z.pow(2).sum(), [x, W]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_written_slots_bounds_what_every_step_writes(backend):
    """written_slots(done, m) (what a compacting check copies of U and V) against the
    steps themselves: after done steps, the slots from written_slots on are all zero and
    the last slot before it was just written, through two restarts of the memory."""
    from imp_fast.backends import broyden as broyden_mod
    from imp_fast.backends import get_backend
    from imp_fast.state import LoopState, StepParams

    impl = get_backend(backend, torch.device("cpu"))
    step = impl.broyden_step or broyden_mod.broyden_step
    B, D, m = 3, 16, 3
    A, b = contractive_linear(B, D, rho=0.9)
    f = linear_map(A, b)
    st = LoopState.create(torch.zeros(B, D, dtype=F64), m=None, return_best=False, broyden_m=m)
    p = StepParams(tol=0.0, beta=1.0, stop_rel=False, divergence=float("inf"), eps=0.0)
    for done in range(1, 3 * m + 3):
        step(st, f(st.z.clone()), p, done - 1)
        assert bool((st.status == 0).all())
        w = broyden_mod.written_slots(done, m)
        assert not st.U[:, w:].any() and not st.V[:, w:].any(), (done, w)
        if done > 1:
            assert bool(st.U[:, w - 1].abs().sum(1).gt(0).all()), (done, w)  # not one too many


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m,check_every", [(2, 1), (3, 2), (4, 3), (5, 1)])
def test_compaction_keeps_the_broyden_memory_across_restarts(backend, m, check_every):
    """Compacting checks at every phase of the ring buffer (filling, full, just
    restarted): the compacted solve makes the uncompacted one's iterates."""
    from test_active_sets import heterogeneous_batch

    f, args, z0, rows = heterogeneous_batch(B=10, D=24, rho=0.95)
    opts = dict(method="broyden", m=m, tol=1e-10, max_iter=300, check_every=check_every, backend=backend)
    full = imp_fast.solve(f, z0, args=args, **opts)
    full_rows, _ = sum(rows), rows.clear()
    comp = imp_fast.solve(f, z0, args=args, compact=True, **opts)
    assert full.ok and torch.equal(full.n_iter, comp.n_iter)
    assert len(set(full.n_iter.tolist())) > 3 and int(full.n_iter.max()) > 2 * m  # restarts happened
    assert sum(rows) < full_rows  # and the working set shrank
    torch.testing.assert_close(comp.z, full.z, rtol=0, atol=1e-12)


def test_broyden_compact_equals_uncompacted():
    from test_active_sets import heterogeneous_batch

    f, args, z0, _ = heterogeneous_batch()
    opts = dict(method="broyden", tol=1e-8, max_iter=300, check_every=3, backend="reference")
    full = imp_fast.solve(f, z0, args=args, **opts)
    comp = imp_fast.solve(f, z0, args=args, compact=True, **opts)
    assert torch.equal(full.n_iter, comp.n_iter) and full.ok
    torch.testing.assert_close(comp.z, full.z, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_states(dtype):
    p = make_problem(4, 64, rho=0.9, dtype=dtype)
    r = imp_fast.solve(p.f, p.z0(), method="broyden", tol={torch.float32: 1e-5}.get(dtype, 1e-2), max_iter=100,
                       backend="reference")
    assert r.ok and r.z.dtype == dtype and r.residual.dtype == torch.float32
