"""Fixed points the engine must find: analytic cases, batch invariance, dtypes, host syncs."""
import math

import pytest
import torch

import imp_fast
import imp_fast.backends
from imp_fast import Status

from helpers import contractive_linear, linear_map

METHODS = ["picard", "anderson"]


@pytest.mark.parametrize("method", METHODS)
def test_linear_contraction_matches_direct_solve(method):
    A, b = contractive_linear(6, 12)
    r = imp_fast.solve(linear_map(A, b), torch.zeros(6, 12, dtype=torch.float64), method=method,
                       tol=1e-12, stop="abs", max_iter=500, backend="reference")
    exact = torch.linalg.solve(torch.eye(12, dtype=torch.float64) - A, b)
    assert r.converged.all()
    torch.testing.assert_close(r.z, exact, atol=1e-10, rtol=0)
    assert (r.abs_residual < 1e-12).all()


@pytest.mark.parametrize("method", METHODS)
def test_paper_reciprocal_example_converges_to_one_over_x(method):
    # G(y, x) = y - eta (x y - 1) has fixed point 1/x; contraction factor |1 - eta x|.
    x = torch.linspace(0.5, 3.0, 16, dtype=torch.float64).reshape(16, 1)
    eta = 0.3
    r = imp_fast.solve(lambda y: y - eta * (x * y - 1), torch.zeros(16, 1, dtype=torch.float64),
                       method=method, tol=1e-12, stop="abs", max_iter=1000, backend="reference")
    assert r.converged.all()
    torch.testing.assert_close(r.z, 1 / x, atol=1e-10, rtol=0)
    if method == "anderson":  # scalar samples: a secant step, exact up to the small ridge
        assert int(r.n_iter.max()) <= 10


@pytest.mark.parametrize("method", METHODS)
def test_batch_invariance_same_iterates_and_counts(method):
    A, b = contractive_linear(5, 9, rho=0.9, seed=3)
    # Samples converge at different iterations, so freezing happens at different times.
    b = b * torch.tensor([1e-3, 1.0, 10.0, 0.1, 3.0], dtype=torch.float64)[:, None]
    opts = dict(method=method, tol=1e-9, stop="abs", max_iter=300, backend="reference", trace=True)
    full = imp_fast.solve(linear_map(A, b), torch.zeros(5, 9, dtype=torch.float64), **opts)
    assert len(set(full.n_iter.tolist())) > 1
    for i in range(5):
        one = imp_fast.solve(linear_map(A[i:i + 1], b[i:i + 1]), torch.zeros(1, 9, dtype=torch.float64), **opts)
        assert int(one.n_iter) == int(full.n_iter[i])
        torch.testing.assert_close(one.z[0], full.z[i], rtol=0, atol=1e-13)
        T = one.trace_abs.shape[0]
        torch.testing.assert_close(one.trace_abs[:T, 0], full.trace_abs[:T, i], rtol=0, atol=1e-13)


@pytest.mark.parametrize("method", METHODS)
def test_converged_samples_are_frozen(method):
    A, b = contractive_linear(4, 8, rho=0.9)
    b[0] *= 1e-6  # converges almost at once
    r = imp_fast.solve(linear_map(A, b), torch.zeros(4, 8, dtype=torch.float64), method=method,
                       tol=1e-8, stop="abs", max_iter=200, trace=True, backend="reference")
    k = int(r.n_iter[0])
    assert k < int(r.n_iter[1:].min())
    # Its residual trace is constant after it converged.
    tail = r.trace_abs[k:, 0]
    assert torch.all(tail == tail[0])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("method", METHODS)
def test_low_precision_storage_with_float32_norms(dtype, tol, method):
    A, b = contractive_linear(4, 32, rho=0.5)
    f = linear_map(A.to(dtype), b.to(dtype))
    r = imp_fast.solve(f, torch.zeros(4, 32, dtype=dtype), method=method, tol=tol, max_iter=200, backend="reference")
    assert r.z.dtype == dtype
    assert r.abs_residual.dtype == torch.float32
    assert r.converged.all(), r.summary()
    exact = torch.linalg.solve(torch.eye(32, dtype=torch.float64) - A, b)
    rel_err = (r.z.double() - exact).norm(dim=1) / exact.norm(dim=1)
    assert (rel_err < 20 * tol).all()


def test_float64_residuals_are_float64():
    A, b = contractive_linear(2, 4)
    r = imp_fast.solve(linear_map(A, b), torch.zeros(2, 4, dtype=torch.float64), backend="reference")
    assert r.abs_residual.dtype == torch.float64


def test_structured_state_shape_is_preserved():
    x = torch.rand(3, 2, 5, 5, dtype=torch.float64) + 0.5
    r = imp_fast.solve(lambda y: y - 0.3 * (x * y - 1), torch.zeros_like(x), tol=1e-10, stop="abs",
                       max_iter=500, backend="reference")
    assert r.z.shape == x.shape
    torch.testing.assert_close(r.z, 1 / x, atol=1e-8, rtol=0)


def test_anderson_beats_picard_on_a_stiff_problem():
    from imp_fast.demo import make_problem

    p = make_problem(4, 64, rho=0.99, symmetric=True, x_scale=0.1, dtype=torch.float64)
    pic = imp_fast.picard(p.f, p.z0(), tol=1e-8, max_iter=5000, backend="reference")
    an = imp_fast.anderson(p.f, p.z0(), tol=1e-8, max_iter=2000, backend="reference")
    assert pic.ok and an.ok
    assert int(an.n_iter.max()) * 3 < int(pic.n_iter.max())


@pytest.mark.parametrize("check_every,max_iter", [(1, 7), (3, 12), (5, 12), (4, 400), (7, 400)])
def test_host_syncs_one_per_check(check_every, max_iter):
    A, b = contractive_linear(3, 5, rho=0.8)
    r = imp_fast.solve(linear_map(A, b), torch.zeros(3, 5, dtype=torch.float64), tol=1e-10, stop="abs",
                       max_iter=max_iter, check_every=check_every, backend="reference")
    assert r.host_syncs == math.ceil(r.iterations / check_every)
    if r.ok:  # early exit happens at the first check after the last sample converged
        assert r.iterations < max_iter
        assert r.iterations - int(r.n_iter.max()) <= check_every


def test_check_every_none_runs_max_iter_without_syncs():
    A, b = contractive_linear(3, 5, rho=0.5)
    r = imp_fast.solve(linear_map(A, b), torch.zeros(3, 5, dtype=torch.float64), tol=1e-6,
                       max_iter=40, check_every=None, trace=True, backend="reference")
    assert r.host_syncs == 0
    assert r.iterations == 40
    assert r.trace_abs.shape == (40, 3) and r.trace_rel.shape == (40, 3)
    assert r.ok


def test_return_best_returns_lowest_residual_iterate():
    # Oscillating, slowly converging map: the last iterate is not the best.
    x = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    f = lambda y: y - 1.9 / x * (x * y - 1)  # contraction factor 0.9, alternating sign
    r_last = imp_fast.picard(f, torch.zeros(2, 1, dtype=torch.float64), tol=1e-30, max_iter=5,
                             trace=True, backend="reference")
    r_best = imp_fast.picard(f, torch.zeros(2, 1, dtype=torch.float64), tol=1e-30, max_iter=5,
                             trace=True, return_best=True, backend="reference")
    assert torch.equal(r_best.abs_residual, r_last.trace_abs.min(dim=0).values)
    res_of_best = (f(r_best.z) - r_best.z).abs().flatten()
    torch.testing.assert_close(res_of_best, r_best.abs_residual)


def test_caller_tensor_is_never_modified():
    z0 = torch.randn(4, 6, dtype=torch.float64)
    keep = z0.clone()
    A, b = contractive_linear(4, 6)
    imp_fast.anderson(linear_map(A, b), z0, backend="reference")
    imp_fast.picard(linear_map(A, b), z0, backend="reference")
    assert torch.equal(z0, keep)


def test_f_returning_its_input_is_safe():
    z0 = torch.ones(2, 3)
    r = imp_fast.solve(lambda z: z, z0, backend="reference")
    assert r.ok and torch.equal(r.z, z0)


@pytest.mark.parametrize("backend", [b for b, why in imp_fast.backends.backend_status().items() if why is None])
@pytest.mark.parametrize("compact", [False, True])
def test_f_returning_a_permuted_view_of_its_input_gets_the_right_answer(backend, compact):
    # f(z) = z^T per sample: a view of the solver's own state with its entries permuted,
    # which the steps must not read while they write z (the loop copies an f(z) that
    # shares z's storage; the compiled steps copy non-contiguous inputs). Damped
    # Picard (beta 0.3) shrinks the antisymmetric part by 0.4 a step: the answer is the
    # symmetric part of z0. Samples 0-2 start symmetric and converge at once, so with
    # compact=True the rest run on a gathered state (whose own storage f then returns).
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(6, 5, 5, generator=g, dtype=torch.float64)
    z0[:3] = z0[:3] + z0[:3].transpose(1, 2)
    scale = torch.ones(6, dtype=torch.float64)  # a batched argument (gathered with compact)

    r = imp_fast.solve(lambda z, scale: z.transpose(1, 2), z0, args=(scale,), method="picard", beta=0.3,
                       tol=1e-13, stop="abs", max_iter=200, check_every=1, compact=compact, backend=backend)
    assert r.ok and (r.n_iter[:3] == 0).all() and (r.n_iter[3:] > 20).all()
    torch.testing.assert_close(r.z, (z0 + z0.transpose(1, 2)) / 2, rtol=0, atol=1e-12)


def test_solve_builds_no_autograd_graph():
    W = torch.nn.Linear(4, 4)
    with torch.no_grad():
        W.weight.mul_(0.1)
    r = imp_fast.solve(lambda z: torch.tanh(W(z)), torch.zeros(2, 4, requires_grad=True), backend="reference")
    assert not r.z.requires_grad


def test_result_messages_and_summary():
    A, b = contractive_linear(2, 3)
    r = imp_fast.solve(linear_map(A, b), torch.zeros(2, 3, dtype=torch.float64), backend="reference")
    assert r.summary() == "2 converged"
    assert all("converged" in m for m in r.messages())
    assert r.status.dtype == torch.int8 and r.n_iter.dtype == torch.int32
    assert (r.status == Status.CONVERGED).all()


# ---------------------------------------------------------------- adversarial inputs (issue 13)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_f_modifying_its_input_in_place_is_an_error(backend, method):
    if imp_fast.backends.backend_status()[backend] is not None:
        pytest.skip(f"{backend} not built")
    z0 = torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="modified its input in place"):
        imp_fast.solve(lambda z: z.mul_(0.5).add_(1.0), z0, method=method, backend=backend)
    assert torch.equal(z0, torch.zeros(2, 4))


def test_f_modifying_its_input_under_inference_mode_gets_a_copy():
    # inference tensors have no version counter: f gets a copy, the answer is still right
    with torch.inference_mode():
        r = imp_fast.solve(lambda z: z.mul_(0.5).add_(1.0), torch.zeros(2, 4), method="picard", tol=1e-6,
                           max_iter=100, backend="reference")
    assert r.ok and torch.allclose(r.z, torch.full((2, 4), 2.0), atol=1e-5)


def test_trace_grows_with_iterations_instead_of_allocating_max_iter():
    # Picard on z -> 0.9 z + 1: residual after k updates is 0.1 * 0.9^k * ||1|| (closed form)
    B, D = 3, 4
    r = imp_fast.solve(lambda z: 0.9 * z + 1.0, torch.zeros(B, D, dtype=torch.float64), method="picard",
                       max_iter=10**9, tol=1e-9, stop="abs", trace=True, backend="reference")
    n = r.iterations
    assert n > 64  # more than one trace chunk
    assert r.trace_abs.shape == (n, B)
    k = torch.arange(n, dtype=torch.float64)
    want = (0.9**k * 1.0 * D**0.5)[:, None].expand(n, B)  # ||f(z_k) - z_k|| = 0.9^k * ||1||
    torch.testing.assert_close(r.trace_abs, want, rtol=1e-9, atol=1e-12)


def test_scipy_spelling_gets_the_right_hint():
    with pytest.raises(TypeError, match=r"'maxiter' \(did you mean 'max_iter'\?\)"):
        imp_fast.solve(lambda z: z, torch.zeros(1, 2), maxiter=5)
