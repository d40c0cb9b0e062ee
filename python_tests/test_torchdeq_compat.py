"""The torchdeq drop-in reaches torchdeq's fixed points with torchdeq's info layout."""
import warnings

import pytest
import torch

from imp_fast.compat import torchdeq as drop_in

tdeq = pytest.importorskip("torchdeq.solver")


def _problem(B=4, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=torch.float64)
    W = W * (0.8 / torch.linalg.matrix_norm(W, 2))
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    return (lambda z: torch.tanh(z @ W.T + x)), torch.zeros(B, D, dtype=torch.float64)


@pytest.mark.parametrize("name", ["anderson", "fixed_point_iter"])
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_same_fixed_point_and_info_shapes(name, stop_mode):
    f, z0 = _problem()
    ours = drop_in.get_solver(name)(f, z0, max_iter=40, tol=1e-9, stop_mode=stop_mode)
    theirs = tdeq.get_solver(name)(f, z0, max_iter=40, tol=1e-9, stop_mode=stop_mode)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-7, rtol=0)
    for key in ("abs_lowest", "rel_lowest", "abs_trace", "rel_trace", "nstep"):
        assert ours[2][key].shape == theirs[2][key].shape, key
    assert (ours[2][f"{stop_mode}_lowest"] < 1e-9).all()


def test_simple_fixed_point_iter_matches_plain_loop():
    f, z0 = _problem()
    z, idx, info = drop_in.simple_fixed_point_iter(f, z0, max_iter=12, indexing=[3, 12])
    ref = z0
    for _ in range(12):
        ref = f(ref)
    torch.testing.assert_close(z, ref)
    assert len(idx) == 2 and info["abs_trace"].shape == (4, 1)


def test_indexing_list_holds_estimates_at_requested_steps():
    f, z0 = _problem()
    _, idx, _ = drop_in.fixed_point_iter(f, z0, max_iter=30, tol=1e-12, indexing=[2, 5])
    _, idx_t, _ = tdeq.fixed_point_iter(f, z0, max_iter=30, tol=1e-12, indexing=[2, 5])
    assert len(idx) == len(idx_t) == 2
    # torchdeq records f applied k times; ours records z after k steps: the same thing.
    torch.testing.assert_close(idx[1], idx_t[1], atol=1e-12, rtol=0)


def test_scalar_batch_like_torchdeq():
    z, _, info = drop_in.anderson_solver(lambda z: 0.5 * (z + 2 / z), torch.tensor([1.0, 3.0]), tol=1e-6)
    torch.testing.assert_close(z, torch.full((2,), 2.0).sqrt())
    assert info["abs_lowest"].shape == (2,)


def test_unknown_kwargs_warn_once_naming_them():
    f, z0 = _problem()
    with pytest.warns(UserWarning, match="'tolerance'.*'stopmode'|'stopmode'.*'tolerance'"):
        drop_in.anderson_solver(f, z0, tolerance=1e-3, stopmode="abs")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drop_in.anderson_solver(f, z0, tolerance=1e-3, stopmode="abs")  # second time: silent


def test_unknown_solver_names_the_available_ones():
    with pytest.raises(ValueError, match="no solver 'broyden'.*anderson, fixed_point_iter, simple_fixed_point_iter"):
        drop_in.get_solver("broyden")


def test_bad_stop_mode():
    f, z0 = _problem()
    with pytest.raises(ValueError, match="stop_mode"):
        drop_in.fixed_point_iter(f, z0, stop_mode="max")
