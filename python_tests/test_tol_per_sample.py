"""Per-sample tolerances: solve(f, z0, tol=(B,) tensor). Each sample must behave exactly
as if it were solved alone with its own scalar tol (batch-separable f), on every
backend and method, with and without active sets."""
import pytest
import torch

import imp_fast
from imp_fast import Status, implicit_solve
from imp_fast.backends import backend_status

BACKENDS = [b for b, why in backend_status().items() if why is None]
F64 = torch.float64
TOLS = [1e-2, 1e-4, 1e-6, 1e-8, 1e-10, 1e-12]


def _problem(dtype=F64, seed=0, B=len(TOLS), D=24):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g, dtype=F64)
    A = (0.9 * A / torch.linalg.matrix_norm(A, 2)).to(dtype)
    x = torch.randn(B, D, generator=g, dtype=F64).to(dtype)

    def f(z, x):  # row-wise: exactly batch separable
        return torch.tanh(torch.einsum("ij,bj->bi", A, z) + x)

    return f, x, torch.zeros(B, D, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["picard", "anderson", "broyden"])
@pytest.mark.parametrize("stop", ["abs", "rel"])
def test_each_sample_as_if_solved_alone_with_its_tol(backend, method, stop):
    f, x, z0 = _problem()
    tol = torch.tensor(TOLS, dtype=F64)
    opts = dict(method=method, stop=stop, max_iter=400, check_every=3, backend=backend)
    r = imp_fast.solve(lambda z: f(z, x), z0, tol=tol, **opts)
    assert r.ok and isinstance(r.tol, torch.Tensor)
    assert len(set(r.n_iter.tolist())) > 3  # the tolerances really differ in effect
    for b, t in enumerate(TOLS):
        alone = imp_fast.solve(lambda z: f(z, x[b:b + 1]), z0[b:b + 1], tol=t, **opts)
        assert int(r.n_iter[b]) == int(alone.n_iter[0]), (b, r.n_iter.tolist())
        assert int(r.status[b]) == int(alone.status[0])
        torch.testing.assert_close(r.z[b], alone.z[0], rtol=1e-12, atol=1e-12)
        assert float(r.residual[b]) < t  # the converged status is true for its own tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_tensor_equals_scalar_tol(backend):
    f, x, z0 = _problem(torch.float32, seed=1)
    opts = dict(method="anderson", max_iter=200, backend=backend)
    a = imp_fast.solve(lambda z: f(z, x), z0, tol=1e-5, **opts)
    b = imp_fast.solve(lambda z: f(z, x), z0, tol=torch.full((len(TOLS),), 1e-5), **opts)
    assert torch.equal(a.n_iter, b.n_iter) and torch.equal(a.status, b.status)
    if backend in ("reference", "cpp"):  # the same step with the scalar replaced: bit for bit
        assert torch.equal(a.z, b.z)
    else:  # per-sample tolerances run the reference step there (documented)
        torch.testing.assert_close(a.z, b.z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_tol_with_active_sets(backend):
    f, x, z0 = _problem(seed=2)
    tol = torch.tensor(TOLS, dtype=F64).flip(0)  # order must follow the gathered rows
    opts = dict(method="picard", stop="abs", max_iter=400, check_every=2, backend=backend)
    whole = imp_fast.solve(f, z0, args=(x,), tol=tol, **opts)
    comp = imp_fast.solve(f, z0, args=(x,), tol=tol, compact=True, **opts)
    assert torch.equal(whole.n_iter, comp.n_iter) and torch.equal(whole.status, comp.status)
    torch.testing.assert_close(comp.z, whole.z, rtol=1e-12, atol=1e-13)  # BLAS rounding differs by batch size


def test_implicit_solve_per_sample_tol_forward_and_adjoint():
    f, x, z0 = _problem(seed=3)
    x = x.clone().requires_grad_()
    tol = torch.tensor(TOLS, dtype=F64)
    z, res = implicit_solve(f, x, z0, tol=tol, stop="abs", max_iter=400, return_result=True, backend="reference")
    (g,) = torch.autograd.grad(z.sum(), x)
    adj = res.extras["adjoint"]
    assert res.ok and adj.ok and isinstance(adj.tol, torch.Tensor)
    assert len(set(res.n_iter.tolist())) > 3 and len(set(adj.n_iter.tolist())) > 3
    # gradient of the loosest sample is looser than the tightest: compare each to a tight solve
    zt, _ = implicit_solve(f, x, z0, tol=1e-13, stop="abs", max_iter=600, return_result=True, backend="reference")
    (gt,) = torch.autograd.grad(zt.sum(), x)
    err = (g - gt).abs().amax(dim=1)
    assert float(err[-1]) < 1e-9 < float(err[0])


def test_bad_per_sample_tol():
    f, x, z0 = _problem()
    g = lambda z: f(z, x)  # noqa: E731
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        imp_fast.solve(g, z0, tol=torch.full((5,), 1e-4))
    with pytest.raises(ValueError, match=">= 0"):
        imp_fast.solve(g, z0, tol=torch.tensor([1e-4, float("nan"), 1e-4, 1e-4, 1e-4, 1e-4]))
    with pytest.raises(ValueError, match=">= 0"):
        imp_fast.solve(g, z0, tol=torch.tensor([1e-4, -1.0, 1e-4, 1e-4, 1e-4, 1e-4]))
    with pytest.raises(TypeError, match="real numbers"):
        imp_fast.solve(g, z0, tol=torch.ones(6, dtype=torch.bool))
    with pytest.raises(ValueError, match="per-sample max_iter / tol tensors"):
        imp_fast.solve(g, z0, tol=torch.full((6,), 1e-4), cuda_graph=True)
    with pytest.raises(ValueError, match=r"shape \(1,\)"):  # batched=False: one problem
        imp_fast.solve(g, z0, tol=torch.full((6,), 1e-4), batched=False)


def test_zero_dim_tensor_is_one_tol():
    f, x, z0 = _problem()
    a = imp_fast.solve(lambda z: f(z, x), z0, tol=1e-6, backend="reference")
    b = imp_fast.solve(lambda z: f(z, x), z0, tol=torch.tensor(1e-6), backend="reference")
    assert torch.equal(a.n_iter, b.n_iter) and b.tol == pytest.approx(1e-6)


def test_failure_message_names_the_range():
    f, x, z0 = _problem()
    tol = torch.tensor(TOLS, dtype=F64)
    with pytest.raises(imp_fast.SolveError, match=r"tol=per-sample in \[1e-12, 0.01\]"):
        imp_fast.solve(lambda z: f(z, x), z0, tol=tol, max_iter=3, throw=True, backend="reference")
    r = imp_fast.solve(lambda z: f(z, x), z0, tol=tol, max_iter=3, backend="reference")
    assert int((r.status == int(Status.MAX_ITER)).sum()) >= 1
