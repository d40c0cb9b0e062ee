"""Per-sample failure reporting: divergence, NaN/Inf, max_iter, throw=True."""
import pytest
import torch

import imp_fast
from imp_fast import SolveError, Status

METHODS = ["picard", "anderson"]


@pytest.mark.parametrize("method", METHODS)
def test_divergent_samples_are_flagged_and_others_converge(method):
    # Sample 0 contracts (0.5), sample 1 expands (1.5): z -> a z + 1.
    a = torch.tensor([[0.5], [1.5]], dtype=torch.float64)
    r = imp_fast.solve(lambda z: a * z + 1, torch.zeros(2, 1, dtype=torch.float64), method=method,
                       tol=1e-10, stop="abs", max_iter=500, divergence=1e4, backend="reference")
    if method == "picard":
        assert r.status.tolist() == [Status.CONVERGED, Status.DIVERGED]
        assert torch.isfinite(r.z).all()
    else:  # Anderson solves the scalar affine map exactly, divergent or not
        assert r.status[0] == Status.CONVERGED


def test_divergence_is_detected_in_a_vector_anderson_solve():
    # A map with no fixed point: z -> z + 1 grows by one each step, residual constant;
    # with an expanding component Anderson can not fix it either.
    f = lambda z: torch.stack([2.0 * z[:, 0] + torch.sin(z[:, 1]), z[:, 1] + 1.0], dim=1)
    r = imp_fast.anderson(f, torch.ones(1, 2, dtype=torch.float64), tol=1e-12, max_iter=300,
                          divergence=1e3, backend="reference")
    assert r.status[0] in (Status.DIVERGED, Status.MAX_ITER)
    assert torch.isfinite(r.z).all()


@pytest.mark.parametrize("method", METHODS)
def test_nan_from_f_is_flagged_and_frozen_at_last_finite_iterate(method):
    calls = {"n": 0}

    def f(z):
        calls["n"] += 1
        out = 0.5 * z + 1.0
        if calls["n"] >= 3:  # sample 1 starts returning NaN at the third evaluation
            out = out.clone()
            out[1] = float("nan")
        return out

    r = imp_fast.solve(f, torch.zeros(3, 4, dtype=torch.float64), method=method, tol=1e-10, stop="abs",
                       max_iter=200, trace=True, backend="reference")
    assert r.status.tolist() == [Status.CONVERGED, Status.NONFINITE, Status.CONVERGED]
    assert torch.isfinite(r.z).all()
    assert int(r.n_iter[1]) == 2  # frozen at z_2, the iterate f failed on
    assert not torch.isfinite(r.abs_residual[1])


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_inf_and_nan_both_count_as_nonfinite(bad):
    def f(z):
        out = 0.5 * z
        out[0, 0] = bad
        return out

    r = imp_fast.picard(f, torch.ones(2, 3), backend="reference")
    assert r.status[0] == Status.NONFINITE and r.status[1] == Status.CONVERGED
    assert torch.equal(r.z[0], torch.ones(3))


@pytest.mark.parametrize("method", METHODS)
def test_max_iter_status(method):
    A = 0.999 * torch.eye(5, dtype=torch.float64)
    r = imp_fast.solve(lambda z: z @ A + 1, torch.zeros(2, 5, dtype=torch.float64), method="picard",
                       tol=1e-12, max_iter=10, backend="reference")
    assert (r.status == Status.MAX_ITER).all()
    assert (r.n_iter == 10).all()
    assert r.iterations == 10


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
