"""The torchdeq drop-in, side by side with torchdeq itself."""
import warnings

import numpy as np
import pytest
import torch

import imp_fast
from imp_fast.compat import torchdeq as drop_in

tdeq = pytest.importorskip("torchdeq.solver")

INFO_KEYS = ("abs_lowest", "rel_lowest", "abs_trace", "rel_trace", "nstep")


def _problem(B=4, D=16, seed=0, rho=0.8, symmetric=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=torch.float64)
    if symmetric:  # spectral radius = rho: stiff enough that Anderson's ridge matters
        W = W + W.T
    W = W * (rho / torch.linalg.matrix_norm(W, 2))
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    return (lambda z: torch.tanh(z @ W.T.to(z.dtype) + x.to(z.dtype))), torch.zeros(B, D, dtype=dtype)


class Counter:
    """Counts calls of f (each call is one evaluation on the whole batch)."""

    def __init__(self, f):
        self.f, self.n = f, 0

    def __call__(self, z, *args, **kwargs):
        self.n += 1
        return self.f(z)


def _assert_info_equal(ours, theirs, atol=1e-12):
    for key in INFO_KEYS:
        assert ours[key].shape == theirs[key].shape, key
        assert ours[key].dtype == theirs[key].dtype, key
        torch.testing.assert_close(ours[key], theirs[key], atol=atol, rtol=0, msg=key)


@pytest.mark.parametrize("name", ["anderson", "fixed_point_iter"])
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_same_fixed_point_and_info_shapes(name, stop_mode):
    f, z0 = _problem()
    ours = drop_in.get_solver(name)(f, z0, max_iter=60, tol=1e-7, stop_mode=stop_mode)
    theirs = tdeq.get_solver(name)(f, z0, max_iter=60, tol=1e-7, stop_mode=stop_mode)
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-6, rtol=0)
    for key in INFO_KEYS:
        assert ours[2][key].shape == theirs[2][key].shape, key
    assert (ours[2][f"{stop_mode}_lowest"] < 1e-7).all()


@pytest.mark.parametrize("name, lam, tau", [
    ("anderson", 1e-4, 1.0), ("anderson", 1e-4, 0.7), ("anderson", 1e-2, 1.0), ("anderson", 1e-2, 0.7),
    ("fixed_point_iter", None, 1.0), ("fixed_point_iter", None, 0.7),
])
def test_iterates_info_and_f_evaluations_match_torchdeq_for_one_sample(name, lam, tau):
    f, z0 = _problem(B=1, D=24, rho=0.95, symmetric=True)
    kw = dict(max_iter=30, tol=1e-9, stop_mode="rel", tau=tau, indexing=[3, 5, 10, 20])
    if lam is not None:
        kw["lam"] = lam
    c_ours, c_theirs = Counter(f), Counter(f)
    z, idx, info = drop_in.get_solver(name)(c_ours, z0, **kw)
    z_t, idx_t, info_t = tdeq.get_solver(name)(c_theirs, z0, **kw)
    torch.testing.assert_close(z, z_t, atol=1e-12, rtol=0)
    assert len(idx) == len(idx_t) == 4
    for a, b in zip(idx, idx_t):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    _assert_info_equal(info, info_t)
    assert c_ours.n == c_theirs.n


def test_lam_is_torchdeqs_absolute_ridge_not_imp_fasts_relative_one():
    """On this problem the two meanings of lam give different iterates: the drop-in
    follows torchdeq's (ridge lam added to G G^T), imp_fast.solve's scales it by the
    newest residual's squared norm."""
    f, z0 = _problem(B=1, D=24, rho=0.95, symmetric=True)
    lam, steps = 1e-2, [4, 6, 8, 12]
    _, idx, _ = drop_in.anderson_solver(f, z0, max_iter=12, tol=1e-14, lam=lam, m=5, indexing=steps)
    _, idx_t, _ = tdeq.anderson_solver(f, z0, max_iter=12, tol=1e-14, lam=lam, m=5, indexing=steps)
    # torchdeq records f(x_{s-1}) at step s; imp_fast.solve's iterate after s-1 updates is x_{s-1}.
    gap = 0.0
    for s, ours, theirs in zip(steps, idx, idx_t):
        torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
        rel = imp_fast.solve(f, z0, method="anderson", m=5, lam=lam, max_iter=s - 1, tol=1e-300,
                             check_every=None, backend="reference")
        gap = max(gap, float((f(rel.z) - theirs).abs().max()))
    assert gap > 1e-4, "the problem must tell the two meanings of lam apart"


def test_each_sample_answers_as_torchdeq_does_for_it_alone():
    """Per-sample freezing: sample i of a batch gets exactly torchdeq's answer for the
    batch of sample i alone (value, nstep, lowest residuals, traces)."""
    B, D = 5, 20
    g = torch.Generator().manual_seed(3)
    W = torch.randn(D, D, generator=g, dtype=torch.float64)
    W = 0.95 * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, B, dtype=torch.float64)[:, None]
    for name in ("anderson", "fixed_point_iter"):
        z, _, info = drop_in.get_solver(name)(lambda z: torch.tanh(z @ W.T + x), torch.zeros(B, D, dtype=torch.float64),
                                              max_iter=60, tol=1e-7, stop_mode="abs")
        steps = set()
        for i in range(B):
            xi = x[i:i + 1]
            z_t, _, info_t = tdeq.get_solver(name)(lambda v: torch.tanh(v @ W.T + xi),
                                                  torch.zeros(1, D, dtype=torch.float64),
                                                  max_iter=60, tol=1e-7, stop_mode="abs")
            torch.testing.assert_close(z[i:i + 1], z_t, atol=1e-12, rtol=0)
            _assert_info_equal({k: info[k][i:i + 1] for k in INFO_KEYS}, info_t)
            steps.add(int(info_t["nstep"]))
        assert len(steps) > 1, "samples must converge at different steps for this test to mean anything"


@pytest.mark.parametrize("name", ["anderson", "fixed_point_iter"])
@pytest.mark.parametrize("tol", [1e-3, 1e-5, 1e-8])
def test_never_more_f_evaluations_than_torchdeq(name, tol):
    f, z0 = _problem(B=6, D=32, rho=0.9, symmetric=True)
    c_ours, c_theirs = Counter(f), Counter(f)
    drop_in.get_solver(name)(c_ours, z0, max_iter=100, tol=tol, stop_mode="rel")
    tdeq.get_solver(name)(c_theirs, z0, max_iter=100, tol=tol, stop_mode="rel")
    assert 0 < c_ours.n <= c_theirs.n


def test_f_evaluations_are_not_rounded_up_to_a_check_interval():
    """The reported case: torchdeq's Anderson stopped after 11 evaluations where the
    drop-in, checking every 5 iterations, ran 15. It now checks every step."""
    f, z0 = _problem(B=4, D=16)
    c_theirs = Counter(f)
    tdeq.anderson_solver(c_theirs, z0, max_iter=50, tol=3e-4)
    assert c_theirs.n % 5 != 0  # else checking every 5 steps would not overshoot
    c = Counter(f)
    drop_in.anderson_solver(c, z0, max_iter=50, tol=3e-4)
    assert c.n <= c_theirs.n


@pytest.mark.parametrize("name", ["anderson", "fixed_point_iter"])
def test_return_final_runs_every_iteration_like_torchdeq(name):
    f, z0 = _problem(B=3, D=16)
    c_ours, c_theirs = Counter(f), Counter(f)
    z, idx, info = drop_in.get_solver(name)(c_ours, z0, max_iter=25, tol=1e-3, return_final=True, indexing=[7])
    z_t, idx_t, info_t = tdeq.get_solver(name)(c_theirs, z0, max_iter=25, tol=1e-3, return_final=True,
                                                indexing=[7])
    assert c_ours.n == c_theirs.n == 25
    torch.testing.assert_close(z, z_t, atol=1e-12, rtol=0)
    torch.testing.assert_close(idx[0], idx_t[0], atol=1e-12, rtol=0)
    _assert_info_equal(info, info_t)
    assert (info["nstep"] == 25).all()
    # Not frozen at tol: without return_final every sample stops earlier, at another value.
    z_tol, _, info_tol = drop_in.get_solver(name)(f, z0, max_iter=25, tol=1e-3)
    assert (info_tol["nstep"] < 25).all()
    assert (info["abs_lowest"] < info_tol["abs_lowest"]).all()


@pytest.mark.parametrize("name, max_iter", [("anderson", 0), ("anderson", 1), ("anderson", 2), ("fixed_point_iter", 0)])
def test_small_max_iter_returns_x0_with_torchdeqs_info(name, max_iter):
    """deq-inr passes f_max_iter=0 to skip the solver; torchdeq's Anderson records
    nothing before its third evaluation either."""
    f, z0 = _problem(B=3, D=8)
    z0 = z0 + 0.25
    c = Counter(f)
    z, idx, info = drop_in.get_solver(name)(c, z0, max_iter=max_iter, tol=1e-3, indexing=[0])
    z_t, idx_t, info_t = tdeq.get_solver(name)(f, z0, max_iter=max_iter, tol=1e-3, indexing=[0])
    assert z is z0 and z_t is z0
    assert len(idx) == len(idx_t) == 1 and idx[0] is z0
    _assert_info_equal(info, info_t)
    assert c.n == 0


@pytest.mark.parametrize("name", ["anderson", "fixed_point_iter"])
def test_nstep_counts_like_torchdeq_from_a_warm_start(name):
    f, z0 = _problem(B=2, D=16)
    z_star = tdeq.fixed_point_iter(f, z0, max_iter=200, tol=1e-13)[0]
    _, _, info = drop_in.get_solver(name)(f, z_star, max_iter=30, tol=1e-6)
    _, _, info_t = tdeq.get_solver(name)(f, z_star, max_iter=30, tol=1e-6)
    assert info["nstep"].tolist() == info_t["nstep"].tolist() == [3.0 if name == "anderson" else 1.0] * 2


@pytest.mark.parametrize("name", ["anderson", "fixed_point_iter"])
def test_integral_numpy_and_float_indexing_like_torchdeq(name):
    f, z0 = _problem()
    idx_in = [np.int64(3), 4.0, np.float32(6)]
    _, idx, _ = drop_in.get_solver(name)(f, z0, max_iter=30, tol=1e-12, indexing=idx_in)
    _, idx_t, _ = tdeq.get_solver(name)(f, z0, max_iter=30, tol=1e-12, indexing=idx_in)
    assert len(idx) == len(idx_t) == 3
    for a, b in zip(idx, idx_t):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("bad", [[2.5, 4], [np.float64(3.5)], ["3"], [True]])
def test_non_integral_indexing_is_an_error_naming_indexing(bad):
    f, z0 = _problem()
    with pytest.raises((ValueError, TypeError), match="indexing"):
        drop_in.anderson_solver(f, z0, indexing=bad)


def test_indexing_must_be_a_list():
    f, z0 = _problem()
    with pytest.raises(TypeError, match="indexing must be a list"):
        drop_in.fixed_point_iter(f, z0, indexing=5)


def test_output_in_another_layout_is_rejected_where_torchdeq_reshapes_it():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)

    def channels_last(z):  # (B, C, H, W) in, (B, H, W, C) out: same numel
        return torch.tanh(0.5 * z.permute(0, 2, 3, 1) + x.permute(0, 2, 3, 1))

    z0 = torch.zeros_like(x)
    z_t, _, info_t = tdeq.anderson_solver(channels_last, z0, max_iter=40, tol=1e-6)
    assert (info_t["abs_lowest"] < 1e-6).all()  # torchdeq "converges" on a scrambled map
    for solver in (drop_in.anderson_solver, drop_in.fixed_point_iter, drop_in.simple_fixed_point_iter):
        with pytest.raises(ValueError, match=r"returned shape \(2, 4, 5, 3\), expected x0's shape \(2, 3, 4, 5\)"):
            solver(channels_last, z0, max_iter=5)


@pytest.mark.parametrize("name", ["anderson", "fixed_point_iter"])
def test_zero_dim_x0_comes_back_shaped_like_torchdeqs(name):
    f = lambda z: 0.5 * (z + 2 / z)
    for dtype in (torch.float32, torch.float64):
        z, _, info = drop_in.get_solver(name)(f, torch.tensor(1.0, dtype=dtype), tol=1e-6)
        z_t, _, info_t = tdeq.get_solver(name)(f, torch.tensor(1.0, dtype=dtype), tol=1e-6)
        assert z.shape == z_t.shape == (1,)
        torch.testing.assert_close(z, z_t)
    # float64: no float32 rounding at the ulp of sqrt(2) between the two step counts
    assert info["nstep"].tolist() == info_t["nstep"].tolist()


def test_scalar_batch_like_torchdeq():
    z, _, info = drop_in.anderson_solver(lambda z: 0.5 * (z + 2 / z), torch.tensor([1.0, 3.0]), tol=1e-6)
    torch.testing.assert_close(z, torch.full((2,), 2.0).sqrt())
    assert info["abs_lowest"].shape == (2,)


def test_simple_fixed_point_iter_matches_plain_loop():
    f, z0 = _problem()
    z, idx, info = drop_in.simple_fixed_point_iter(f, z0, max_iter=12, indexing=[3, 12])
    ref = z0
    for _ in range(12):
        ref = f(ref)
    torch.testing.assert_close(z, ref)
    assert len(idx) == 2 and info["abs_trace"].shape == (4, 1)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_simple_fixed_point_iter_matches_torchdeq(grad, tau):
    """With and without autograd recording (the engine path runs under no_grad)."""
    f, z0 = _problem(B=3, D=10)
    wrapped = lambda x, tau=1.0: tau * f(x) + (1 - tau) * x  # torchdeq calls func(x, tau=tau)
    with torch.set_grad_enabled(grad):
        z, idx, info = drop_in.simple_fixed_point_iter(wrapped, z0, max_iter=9, tau=tau, indexing=[2, 9, 40])
    z_t, idx_t, info_t = tdeq.simple_fixed_point_iter(wrapped, z0, max_iter=9, tau=tau, indexing=[2, 9, 40])
    torch.testing.assert_close(z, z_t, atol=1e-12, rtol=0)
    assert len(idx) == len(idx_t) == 2
    for a, b in zip(idx, idx_t):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    for key in INFO_KEYS:
        torch.testing.assert_close(info[key].double(), info_t[key].double().detach(), atol=1e-6, rtol=1e-6)


def test_simple_fixed_point_iter_is_differentiable_like_torchdeqs():
    _, z0 = _problem(B=2, D=6)
    W = (0.5 * torch.eye(6, dtype=torch.float64)).requires_grad_()
    f = lambda z, tau=1.0: torch.tanh(z @ W + 1.0)
    (g_ours,) = torch.autograd.grad(drop_in.simple_fixed_point_iter(f, z0, max_iter=6)[0].sum(), W)
    (g_theirs,) = torch.autograd.grad(tdeq.simple_fixed_point_iter(f, z0, max_iter=6)[0].sum(), W)
    torch.testing.assert_close(g_ours, g_theirs)


def test_simple_fixed_point_iter_takes_the_arguments_torchdeqs_deq_passes():
    f, z0 = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drop_in.simple_fixed_point_iter(f, x0=z0, max_iter=3, tol=1e-3, stop_mode="abs", indexing=None)


def test_simple_fixed_point_iter_on_a_list_state_like_torchdeq():
    g = torch.Generator().manual_seed(1)
    A = 0.3 * torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    b = torch.randn(2, 5, generator=g, dtype=torch.float64)

    def func(zs, tau=1.0):
        z1, z2 = zs
        return [torch.tanh(z1 * 0.5 + z2[:, :3, None]), torch.tanh(0.4 * z2 + b + z1.mean(dim=(1, 2))[:, None])]

    z0 = [torch.zeros(2, 3, 4, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.float64)]
    with torch.no_grad():
        z, idx, info = drop_in.simple_fixed_point_iter(func, z0, max_iter=7, indexing=[3])
    z_t, idx_t, info_t = tdeq.simple_fixed_point_iter(func, z0, max_iter=7, indexing=[3])
    assert isinstance(z, list) and [t.shape for t in z] == [t.shape for t in z_t]
    for a, b_ in zip(z + idx[0], z_t + idx_t[0]):
        torch.testing.assert_close(a, b_, atol=1e-12, rtol=0)
    torch.testing.assert_close(info["abs_lowest"].double(), info_t["abs_lowest"].double(), atol=1e-6, rtol=1e-6)


def test_bfloat16_anderson_where_torchdeq_cannot():
    f, _ = _problem(B=3, D=32)
    z0 = torch.zeros(3, 32, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):
        tdeq.anderson_solver(f, z0, max_iter=30, tol=1e-2)
    z, _, info = drop_in.anderson_solver(f, z0, max_iter=30, tol=1e-2)
    ref = tdeq.fixed_point_iter(f, torch.zeros(3, 32, dtype=torch.float64), max_iter=300, tol=1e-13)[0]
    assert z.dtype == torch.bfloat16
    assert float((z.double() - ref).norm(dim=1).max()) < 0.05
    assert (info["abs_lowest"] < 1e-2).all() and info["abs_lowest"].dtype == torch.float32


def test_a_nonfinite_sample_is_frozen_and_reported():
    f, z0 = _problem(B=3, D=8)

    def g(z):
        out = f(z)
        return torch.cat([out[:1], out[1:2] + float("nan"), out[2:]])

    z, _, info = drop_in.anderson_solver(g, z0, max_iter=50, tol=1e-8)
    assert torch.isnan(info["abs_lowest"][1]) and torch.isfinite(z).all()
    assert (info["abs_lowest"][[0, 2]] < 1e-8).all()


@pytest.mark.parametrize("kw, match", [
    (dict(max_iter=-1), "max_iter must be >= 0"),
    (dict(max_iter=2.5), "max_iter must be an int"),
    (dict(m=0), "m must be >= 1"),
    (dict(lam=-1.0), "lam must be"),
    (dict(tau=0.0), "tau must be"),
    (dict(tol=-1.0), "tol must be"),
    (dict(stop_mode="max"), "stop_mode"),
])
def test_bad_arguments_name_themselves(kw, match):
    f, z0 = _problem()
    with pytest.raises((ValueError, TypeError), match=match):
        drop_in.anderson_solver(f, z0, **kw)


def test_unknown_kwargs_warn_once_naming_them():
    f, z0 = _problem()
    with pytest.warns(UserWarning, match="'tolerance'.*'stopmode'|'stopmode'.*'tolerance'"):
        drop_in.anderson_solver(f, z0, tolerance=1e-3, stopmode="abs")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drop_in.anderson_solver(f, z0, tolerance=1e-3, stopmode="abs")  # second time: silent


def test_unknown_solver_names_the_available_ones():
    with pytest.raises(ValueError, match="no solver 'newton'.*anderson, broyden, fixed_point_iter, simple_fixed_point_iter"):
        drop_in.get_solver("newton")
    # broyden is provided now (python_tests/test_compat_torchdeq_broyden.py)
    assert drop_in.get_solver("broyden") is drop_in.broyden_solver


def test_bad_stop_mode():
    f, z0 = _problem()
    with pytest.raises(ValueError, match="stop_mode"):
        drop_in.fixed_point_iter(f, z0, stop_mode="max")


def test_register_solvers_adds_prefixed_names_to_torchdeqs_registry():
    names = drop_in.register_solvers()
    assert names == ["imp_fast_anderson", "imp_fast_broyden", "imp_fast_fixed_point_iter",
                     "imp_fast_simple_fixed_point_iter"]
    assert tdeq.get_solver("imp_fast_anderson") is drop_in.anderson_solver
    assert tdeq.get_solver("imp_fast_broyden") is drop_in.broyden_solver
    assert tdeq.get_solver("anderson") is tdeq.anderson_solver  # torchdeq's own names untouched
