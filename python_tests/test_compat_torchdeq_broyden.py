"""imp_fast.compat.torchdeq.broyden_solver side by side with torchdeq's broyden_solver.

Iterates and info match torchdeq's when no sample freezes early (``return_final=True``
or a tol no sample reaches); with a reachable tol each sample is frozen at its first
step below tol (or at torchdeq's "no progress" test, applied per sample), so the
reference for sample i of a batch is torchdeq run on sample i alone.
"""
import warnings

import numpy as np
import pytest
import torch

from imp_fast.compat import torchdeq as drop_in

tdeq = pytest.importorskip("torchdeq.solver")

F64 = torch.float64
INFO_KEYS = ("abs_lowest", "rel_lowest", "abs_trace", "rel_trace", "nstep")


def _problem(B=3, D=48, rho=0.95, seed=0, scale=None, dtype=F64):
    """f(z) = tanh(rho Q z + x), Q orthogonal: the Jacobian's eigenvalues spread around a
    circle, so Broyden needs ~40 steps to reach 1e-12 (residuals stay far above float64
    rounding for the first 35 steps, where the comparisons below are exact)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))
    W = rho * Q
    x = torch.randn(B, D, generator=g, dtype=F64)
    if scale is not None:
        x = x * torch.as_tensor(scale, dtype=F64)[:, None]

    def f(z):
        return torch.tanh(z @ W.T.to(z.dtype) + x.to(z.dtype))

    return f, x, W, torch.zeros(B, D, dtype=dtype)


def _one(W, xi):
    return lambda z: torch.tanh(z @ W.T.to(z.dtype) + xi.to(z.dtype))


def _conv_problem(B=2, C=3, H=5, seed=1, scale=None):
    """A (B, C, H, W) state: f(z) = tanh(conv3x3(z) + x). Returns f, x0 and f for one
    sample (a function of the sample's index)."""
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(C, C, 3, 3, generator=g, dtype=F64)
    K = K * (0.9 / K.abs().sum(dim=(1, 2, 3)).max())
    x = torch.randn(B, C, H, H, generator=g, dtype=F64)
    if scale is not None:
        x = x * torch.as_tensor(scale, dtype=F64)[:, None, None, None]
    conv = lambda xx: (lambda z: torch.tanh(torch.nn.functional.conv2d(z, K, padding=1) + xx))
    return conv(x), torch.zeros(B, C, H, H, dtype=F64), lambda i: conv(x[i:i + 1])


class Counter:
    def __init__(self, f):
        self.f, self.n = f, 0

    def __call__(self, z, *args, **kwargs):
        self.n += 1
        return self.f(z)


def _assert_info_equal(ours, theirs, atol=1e-12, rtol=0.0):
    for key in INFO_KEYS:
        assert ours[key].shape == theirs[key].shape, key
        assert ours[key].dtype == theirs[key].dtype, key
        torch.testing.assert_close(ours[key], theirs[key], atol=atol, rtol=rtol, msg=key)


def _both(f, z0, **kw):
    c_ours, c_theirs = Counter(f), Counter(f)
    ours = drop_in.broyden_solver(c_ours, z0, **kw)
    theirs = tdeq.broyden_solver(c_theirs, z0, **kw)
    return ours, theirs, c_ours.n, c_theirs.n


def _assert_same(ours, theirs, atol=1e-10):
    torch.testing.assert_close(ours[0], theirs[0], atol=atol, rtol=0)
    assert len(ours[1]) == len(theirs[1])
    for a, b in zip(ours[1], theirs[1]):
        torch.testing.assert_close(a, b, atol=atol, rtol=0)
    _assert_info_equal(ours[2], theirs[2], atol=atol)


# ------------------------------------------------------------------ exact iterates


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("conv", [False, True], ids=["BD", "BCHW"])
def test_iterates_and_info_match_torchdeq_when_nothing_freezes(stop_mode, conv):
    if conv:
        f, z0, _ = _conv_problem()
    else:
        f, _, _, z0 = _problem()
    # tol=0: no sample ever stops; index 31 = max_iter + 1 is torchdeq's state after the
    # last step (it records step s when s + 1 is in indexing; index 1 never matches).
    kw = dict(max_iter=30, tol=0.0, stop_mode=stop_mode, indexing=[1, 2, 5, 17, 31])
    ours, theirs, n_ours, n_theirs = _both(f, z0, **kw)
    assert ours[0].shape == z0.shape and len(ours[1]) == 4
    _assert_same(ours, theirs)
    assert n_ours == n_theirs == 31
    assert type(ours[2]) is type(theirs[2])  # SolverStat
    assert ours[2]["abs_trace"].shape == (z0.shape[0], 31)


def test_float32_iterates_match_torchdeq_to_rounding():
    f, _, _, z0 = _problem(dtype=torch.float32)
    ours, theirs, n_ours, n_theirs = _both(f, z0, max_iter=20, tol=0.0, indexing=[10])
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours[1][0], theirs[1][0], atol=1e-5, rtol=0)
    for key in INFO_KEYS:
        assert ours[2][key].dtype == theirs[2][key].dtype == torch.float32, key
    torch.testing.assert_close(ours[2]["abs_trace"], theirs[2]["abs_trace"], atol=1e-5, rtol=1e-3)
    assert n_ours == n_theirs == 21


def test_lbfgs_ring_smaller_than_max_iter():
    f, _, _, z0 = _problem()
    ours, theirs, n_ours, n_theirs = _both(f, z0, max_iter=30, tol=0.0, LBFGS_thres=4, indexing=[6, 20])
    _assert_same(ours, theirs)
    full = drop_in.broyden_solver(f, z0, max_iter=30, tol=0.0)[2]["abs_trace"]
    # the ring overwrote pairs: not the full-memory residuals
    ring = ours[2]["abs_trace"]
    torch.testing.assert_close(ring[:, :6], full[:, :6], atol=1e-14, rtol=0)  # ring wraps at step 5
    assert float((ring[:, 30] / full[:, 30]).min()) > 2
    ours1, theirs1, _, _ = _both(f, z0, max_iter=12, tol=0.0, LBFGS_thres=np.int64(1), stop_mode="rel")
    _assert_same(ours1, theirs1)


def test_lbfgs_larger_than_max_iter():
    f, _, _, z0 = _problem(B=2)
    ours, theirs, _, _ = _both(f, z0, max_iter=10, tol=0.0, LBFGS_thres=100)
    _assert_same(ours, theirs)


def test_return_final_runs_every_iteration_like_torchdeq():
    f, x, W, z0 = _problem(scale=[0.3, 1.0, 2.5])
    ours, theirs, n_ours, n_theirs = _both(f, z0, max_iter=40, tol=1e-3, return_final=True, indexing=[7])
    # torchdeq's "no progress" test compares residuals across the batch: these samples'
    # differ by more than 1.3x, so it does not stop the batch.
    assert n_ours == n_theirs == 41
    _assert_same(ours, theirs)
    assert (ours[2]["nstep"] == 40).all()
    # Not frozen at tol: without return_final every sample stops earlier.
    _, _, info_tol = drop_in.broyden_solver(f, z0, max_iter=40, tol=1e-3)
    assert (info_tol["nstep"] < 40).all()


def test_return_final_stops_on_torchdeqs_batch_wide_no_progress_test():
    """A batch of one is always "uniform": past step 30 torchdeq stops once its residual
    is below 3 tol, even with return_final."""
    f, _, _, z0 = _problem(B=1)
    ours, theirs, n_ours, n_theirs = _both(f, z0, max_iter=45, tol=1e-3, return_final=True)
    assert n_theirs == 32  # stopped after step 31
    assert n_ours == n_theirs
    _assert_same(ours, theirs)
    assert ours[2]["nstep"].tolist() == [31.0]


# --------------------------------------------------------------- per-sample freezing


def test_each_sample_answers_as_torchdeq_does_for_it_alone():
    f, x, W, z0 = _problem(B=5, scale=torch.linspace(0.2, 3, 5).tolist())
    z, _, info = drop_in.broyden_solver(f, z0, max_iter=60, tol=1e-7)
    steps = set()
    for i in range(5):
        z_t, _, info_t = tdeq.broyden_solver(_one(W, x[i:i + 1]), z0[i:i + 1], max_iter=60, tol=1e-7)
        torch.testing.assert_close(z[i:i + 1], z_t, atol=1e-12, rtol=0)
        _assert_info_equal({k: info[k][i:i + 1] for k in INFO_KEYS}, info_t)
        steps.add(int(info_t["nstep"]))
    assert len(steps) > 1, "samples must converge at different steps for this test to mean anything"
    assert (info["abs_lowest"] < 3e-7).all()  # below tol, or below 3 tol after step 30 (no progress)


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_each_sample_of_a_bchw_batch_answers_as_torchdeq_does_for_it_alone(stop_mode):
    f, z0, f_i = _conv_problem(B=3, scale=[0.1, 1.0, 4.0])
    c = Counter(f)
    z, idx, info = drop_in.broyden_solver(c, z0, max_iter=50, tol=1e-8, stop_mode=stop_mode, indexing=[4])
    assert z.shape == idx[0].shape == z0.shape
    steps, evals = set(), []
    for i in range(3):
        ci = Counter(f_i(i))
        z_t, idx_t, info_t = tdeq.broyden_solver(ci, z0[i:i + 1], max_iter=50, tol=1e-8, stop_mode=stop_mode,
                                                 indexing=[4])
        torch.testing.assert_close(z[i:i + 1], z_t, atol=1e-12, rtol=0)
        torch.testing.assert_close(idx[0][i:i + 1], idx_t[0], atol=1e-12, rtol=0)
        _assert_info_equal({k: info[k][i:i + 1] for k in INFO_KEYS}, info_t)
        steps.add(int(info_t["nstep"]))
        evals.append(ci.n)
    assert len(steps) > 1
    assert c.n == max(evals)


@pytest.mark.parametrize("tol", [1e-3, 1e-6, 1e-9])
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_never_more_f_evaluations_than_torchdeq(tol, stop_mode):
    f, _, _, z0 = _problem(B=4, scale=[0.3, 1.0, 2.0, 3.0])
    c_ours, c_theirs = Counter(f), Counter(f)
    drop_in.broyden_solver(c_ours, z0, max_iter=60, tol=tol, stop_mode=stop_mode)
    tdeq.broyden_solver(c_theirs, z0, max_iter=60, tol=tol, stop_mode=stop_mode)
    assert 0 < c_ours.n <= c_theirs.n


def test_all_samples_converging_at_the_same_step_match_the_batch_run():
    f, x, W, _ = _problem(B=1)
    xb = x.expand(3, -1).clone()
    fb = lambda z: torch.tanh(z @ W.T + xb)
    z0 = torch.zeros(3, 48, dtype=F64)
    ours, theirs, n_ours, n_theirs = _both(fb, z0, max_iter=50, tol=1e-6, indexing=[4, 9])
    _assert_same(ours, theirs, atol=1e-12)
    assert n_ours == n_theirs < 51


def test_no_progress_rule_freezes_a_sample_as_torchdeq_does_for_it_alone():
    """torchdeq stops a batch of one after step 30 once its residual is below 3 tol: the
    drop-in applies that to each sample, so a sample whose residual lingers between tol
    and 3 tol at step 31 stops there while the rest of the batch goes on."""
    f, x, W, z0 = _problem(B=3, scale=[1.0, 0.5, 2.0])
    tr = tdeq.broyden_solver(_one(W, x[:1]), z0[:1], max_iter=40, tol=0.0)[2]["abs_trace"][0]
    r31 = float(tr[31])
    tol = r31 / 2
    assert float(tr[1:31].min()) > tol  # sample 0 does not reach tol before step 31
    alone = []
    for i in range(3):
        c = Counter(_one(W, x[i:i + 1]))
        alone.append((tdeq.broyden_solver(c, z0[i:i + 1], max_iter=60, tol=tol), c.n))
    assert alone[0][1] == 32 and float(alone[0][0][2]["abs_lowest"]) >= tol  # stopped by the rule
    c = Counter(f)
    z, _, info = drop_in.broyden_solver(c, z0, max_iter=60, tol=tol)
    for i, ((z_t, _, info_t), _) in enumerate(alone):
        torch.testing.assert_close(z[i:i + 1], z_t, atol=1e-12, rtol=0)
        _assert_info_equal({k: info[k][i:i + 1] for k in INFO_KEYS}, info_t)
    assert c.n == max(n for _, n in alone)
    c_theirs = Counter(f)
    tdeq.broyden_solver(c_theirs, z0, max_iter=60, tol=tol)
    assert c.n <= c_theirs.n


def test_a_warm_start_at_the_fixed_point_stops_at_step_one():
    f, _, _, z0 = _problem(B=2)
    z_star = tdeq.broyden_solver(f, z0, max_iter=60, tol=1e-13)[0]
    ours, theirs, n_ours, n_theirs = _both(f, z_star, max_iter=30, tol=1e-6)
    assert ours[2]["nstep"].tolist() == theirs[2]["nstep"].tolist() == [1.0, 1.0]
    assert n_ours == n_theirs == 2
    _assert_same(ours, theirs, atol=1e-12)


# ---------------------------------------------------------------------- edge cases


def test_max_iter_zero_returns_x0_with_torchdeqs_info():
    f, _, _, z0 = _problem()
    z0 = z0 + 0.25
    c = Counter(f)
    z, idx, info = drop_in.broyden_solver(c, z0, max_iter=0, tol=1e-3, indexing=[0])
    z_t, idx_t, info_t = tdeq.broyden_solver(f, z0, max_iter=0, tol=1e-3, indexing=[0])
    assert z is z0 and z_t is z0
    assert len(idx) == len(idx_t) == 1 and idx[0] is z0
    _assert_info_equal(info, info_t)
    assert c.n == 0  # torchdeq evaluates f(x0) once and discards it


def test_indexing_that_never_matches_returns_the_lowest_like_torchdeq():
    f, _, _, z0 = _problem()
    ours, theirs, _, _ = _both(f, z0, max_iter=20, tol=0.0, indexing=[1, 50])
    assert len(ours[1]) == len(theirs[1]) == 1
    _assert_same(ours, theirs)


def test_integral_numpy_and_float_indexing_like_torchdeq():
    f, _, _, z0 = _problem()
    idx_in = [np.int64(3), 4.0, np.float32(6)]
    ours, theirs, _, _ = _both(f, z0, max_iter=20, tol=0.0, indexing=idx_in)
    assert len(ours[1]) == 3
    _assert_same(ours, theirs)


def test_a_nonfinite_sample_is_frozen_and_reported():
    f, x, W, z0 = _problem(B=3)

    def g(z):
        out = f(z)
        return torch.cat([out[:1], out[1:2] + float("nan"), out[2:]])

    c = Counter(g)
    z, _, info = drop_in.broyden_solver(c, z0, max_iter=60, tol=1e-8)
    assert torch.isnan(info["abs_lowest"][1]) and torch.isnan(info["rel_lowest"][1])
    assert torch.isfinite(z).all()
    assert (info["abs_lowest"][[0, 2]] < 3e-8).all()
    for i in (0, 2):
        z_t = tdeq.broyden_solver(_one(W, x[i:i + 1]), z0[i:i + 1], max_iter=60, tol=1e-8)[0]
        torch.testing.assert_close(z[i:i + 1], z_t, atol=1e-12, rtol=0)
    c_theirs = Counter(g)
    tdeq.broyden_solver(c_theirs, z0, max_iter=60, tol=1e-8)
    assert c.n < c_theirs.n == 61  # torchdeq's NaN batch max never stops


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_states(dtype):
    f, _, _, _ = _problem(B=3, D=32)
    z0 = torch.zeros(3, 32, dtype=dtype)
    z, idx, info = drop_in.broyden_solver(f, z0, max_iter=40, tol=2e-2, indexing=[5])
    ref = tdeq.broyden_solver(f, torch.zeros(3, 32, dtype=F64), max_iter=60, tol=1e-12)[0]
    assert z.dtype == dtype and idx[0].dtype == dtype
    assert float((z.double() - ref).norm(dim=1).max()) < 0.05
    assert (info["abs_lowest"] < 2e-2).all()
    for key in INFO_KEYS:
        assert info[key].dtype == torch.float32, key


def test_zero_dim_and_scalar_batch_like_torchdeq():
    f = lambda z: 0.5 * (z + 2 / z)
    for dtype in (torch.float32, F64):
        z, _, info = drop_in.broyden_solver(f, torch.tensor(1.0, dtype=dtype), tol=1e-6)
        z_t, _, info_t = tdeq.broyden_solver(f, torch.tensor(1.0, dtype=dtype), tol=1e-6)
        assert z.shape == z_t.shape == (1,)
        torch.testing.assert_close(z, z_t)
    assert info["nstep"].tolist() == info_t["nstep"].tolist()
    z, _, info = drop_in.broyden_solver(f, torch.tensor([1.0, 3.0], dtype=F64), tol=1e-9)
    torch.testing.assert_close(z, torch.full((2,), 2.0, dtype=F64).sqrt())
    assert info["abs_lowest"].shape == (2,)


def test_list_state_is_solved_as_the_concatenated_state():
    """torchdeq's broyden_solver fails on a list of tensors; the drop-in concatenates
    them along dim 1, as torchdeq's multi-tensor DEQ wrapper does."""
    f, _, _, z0 = _problem(B=2, D=12)
    split = lambda v: [v[:, :4].reshape(2, 2, 2), v[:, 4:]]
    join = lambda zs: torch.cat([zs[0].reshape(2, 4), zs[1]], dim=1)
    z, _, info = drop_in.broyden_solver(lambda zs: split(f(join(zs))), split(z0), max_iter=30, tol=1e-9)
    z_flat, _, info_flat = drop_in.broyden_solver(f, z0, max_iter=30, tol=1e-9)
    assert isinstance(z, list) and z[0].shape == (2, 2, 2)
    torch.testing.assert_close(join(z), z_flat, atol=1e-14, rtol=0)
    _assert_info_equal(info, info_flat)


# ----------------------------------------------------------------- get_deq with IFT


def test_get_deq_with_ift_gives_torchdeqs_broyden_gradients():
    from torch import nn
    from torchdeq import get_deq

    assert "imp_fast_broyden" in drop_in.register_solvers()
    B, D, DX = 3, 8, 5

    def run(solver):
        g = torch.Generator().manual_seed(0)
        W = torch.randn(D, D, generator=g, dtype=F64)
        W = nn.Parameter(0.7 * W / torch.linalg.matrix_norm(W, 2))
        U = nn.Parameter(torch.randn(D, DX, generator=g, dtype=F64) / DX ** 0.5)
        x = (torch.randn(B, DX, generator=g, dtype=F64) * torch.tensor([[0.3], [1.0], [2.5]], dtype=F64))
        x.requires_grad_()
        deq = get_deq(core="indexing", ift=True, f_solver=solver, b_solver=solver, f_max_iter=40, b_max_iter=40,
                      f_tol=1e-10, b_tol=1e-10)
        deq.train()
        z_out, info = deq(lambda z: torch.tanh(z @ W.T + x @ U.T), torch.zeros(B, D, dtype=F64))
        loss = (z_out[-1] ** 2).sum() + z_out[-1].sum()
        loss.backward()
        return z_out[-1].detach(), info, W.grad, U.grad, x.grad

    ours, ref = run("imp_fast_broyden"), run("broyden")
    assert (ours[1]["abs_lowest"] < 1e-10).all()
    torch.testing.assert_close(ours[0], ref[0], atol=1e-9, rtol=0)
    for a, b in zip(ours[2:], ref[2:]):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=0)


@pytest.mark.parametrize("deq_kwargs, train", [
    (dict(core="indexing", ift=True, f_max_iter=40, b_max_iter=40, f_tol=1e-9, b_tol=1e-9), True),
    (dict(core="sliced", ift=True, f_max_iter=40, b_max_iter=40, f_tol=1e-9, b_tol=1e-9), True),
    (dict(core="indexing", hook_ift=True, f_max_iter=40, b_max_iter=40, f_tol=1e-9, b_tol=1e-9), True),
    (dict(core="indexing", grad=3, tau=0.8, f_max_iter=20, f_tol=1e-6), True),
    # DEQIndexing hands indexing to the solver: torchdeq's Broyden offset (states after steps 2 and 5)
    (dict(core="indexing", indexing=[3, 6], grad=2, f_max_iter=30, f_tol=1e-12), True),
    (dict(core="indexing", ift=True, f_max_iter=10, eval_f_max_iter=40, f_tol=1e-9), False),
], ids=["ift-indexing", "ift-sliced", "hook-ift", "phantom", "indexing-trajectory", "eval"])
def test_torchdeq_deq_patterns_match_torchdeqs_broyden_per_sample(deq_kwargs, train):
    """torchdeq's DEQ classes with f_solver/b_solver 'imp_fast_broyden': outputs, info and
    gradients equal torchdeq's 'broyden' run on each sample alone (the helpers of
    test_compat_torchdeq_patterns.py)."""
    from test_compat_torchdeq_patterns import _compare

    ours, _ = _compare(deq_kwargs, solver="broyden", train=train)
    if "indexing" in deq_kwargs:
        # DEQIndexing asks for [3, 6, f_max_iter]: the states after steps 2 and 5; Broyden
        # converges long before step 29 (as it does in torchdeq, which _compare checks).
        assert len(ours[0]) == 2


# ------------------------------------------------------------------- registry, args


def test_get_solver_and_register_solvers_provide_broyden():
    assert drop_in.get_solver("broyden") is drop_in.broyden_solver
    assert drop_in.SOLVERS["broyden"] is drop_in.broyden_solver
    names = drop_in.register_solvers()
    assert "imp_fast_broyden" in names
    assert tdeq.get_solver("imp_fast_broyden") is drop_in.broyden_solver
    assert tdeq.get_solver("broyden") is tdeq.broyden_solver  # torchdeq's own name untouched


@pytest.mark.parametrize("kw, exc, match", [
    (dict(max_iter=-1), ValueError, "max_iter must be >= 0"),
    (dict(max_iter=2.5), TypeError, "max_iter must be an int"),
    (dict(tol=-1.0), ValueError, "tol must be"),
    (dict(stop_mode="max"), ValueError, "stop_mode"),
    (dict(LBFGS_thres=0), ValueError, "LBFGS_thres must be >= 1"),
    (dict(LBFGS_thres=3.0), TypeError, "LBFGS_thres must be an int"),
    (dict(indexing=[2.5]), ValueError, "indexing"),
    (dict(indexing=5), TypeError, "indexing must be a list"),
    (dict(ls="yes"), TypeError, "ls must be a bool"),
])
def test_bad_arguments_name_themselves(kw, exc, match):
    f, _, _, z0 = _problem()
    with pytest.raises(exc, match=match):
        drop_in.broyden_solver(f, z0, **kw)


def test_bad_func_and_state():
    f, _, _, z0 = _problem()
    with pytest.raises(TypeError, match="func must be callable"):
        drop_in.broyden_solver(None, z0)
    with pytest.raises(TypeError, match="x0 must be a floating-point tensor"):
        drop_in.broyden_solver(f, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"returned shape \(3, 47\), expected x0's shape \(3, 48\)"):
        drop_in.broyden_solver(lambda z: z[:, 1:], z0, max_iter=5)


def test_ls_false_and_unknown_kwargs():
    f, _, _, z0 = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drop_in.broyden_solver(f, z0, max_iter=5, ls=False, LBFGS_thres=None)
    with pytest.warns(UserWarning, match="broyden_solver.*'tau'"):
        drop_in.broyden_solver(f, z0, max_iter=5, tau=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drop_in.broyden_solver(f, z0, max_iter=5, tau=0.5)  # second time: silent


# ------------------------------------------------------------------ line search (ls=True)


# On an expansive map, float64 rounding differences (bmm here, einsum there) grow to ~1e-8
# over 25 steps; the evaluation counts (every step size chosen) must match exactly.
LS_ATOL = 1e-7


def _expansive_problem(B=3, D=24, rho=2.5, seed=3):
    """f(z) = tanh(rho Q z + x) with rho > 1: full Broyden steps overshoot early on, so
    torchdeq's Armijo search backtracks (more f evaluations than steps)."""
    return _problem(B=B, D=D, rho=rho, seed=seed)


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_line_search_iterates_info_and_evaluations_match_torchdeq(stop_mode):
    f, _, _, z0 = _expansive_problem()
    kw = dict(max_iter=25, tol=0.0, stop_mode=stop_mode, ls=True, indexing=[4, 12])
    ours, theirs, n_ours, n_theirs = _both(f, z0, **kw)
    assert n_theirs > 26, "the problem must make torchdeq backtrack"
    assert n_ours == n_theirs
    _assert_same(ours, theirs, atol=LS_ATOL)
    _assert_info_equal(ours[2], theirs[2], atol=LS_ATOL)


def test_line_search_batch_stops_together_as_in_torchdeq():
    """One step size for the whole batch couples the samples: nothing freezes, and the
    batch stops at the step where its largest residual is below tol."""
    f, _, _, z0 = _expansive_problem(rho=1.6)
    ours, theirs, n_ours, n_theirs = _both(f, z0, max_iter=60, tol=1e-8, stop_mode="abs", ls=True)
    assert n_ours == n_theirs  # same step sizes, same stop
    torch.testing.assert_close(ours[0], theirs[0], atol=LS_ATOL, rtol=0)
    for key in ("abs_lowest", "rel_lowest", "abs_trace", "rel_trace"):
        torch.testing.assert_close(ours[2][key], theirs[2][key], atol=LS_ATOL, rtol=0, msg=key)
    assert bool((ours[2]["abs_lowest"] < 1e-8).all())
    # the sample that stopped the batch reached tol last; one that had reached float64
    # rounding long before has its lowest step decided by rounding noise
    last = int(ours[2]["abs_lowest"].argmax())
    assert int(ours[2]["nstep"][last]) == int(theirs[2]["nstep"][last]) == int(ours[2]["nstep"].max())
    assert ours[2]["abs_trace"].shape[1] == theirs[2]["abs_trace"].shape[1]


def test_line_search_with_return_final_and_a_small_ring():
    f, _, _, z0 = _expansive_problem(B=2)
    ours, theirs, n_ours, n_theirs = _both(f, z0, max_iter=20, tol=1e-6, ls=True, return_final=True,
                                            LBFGS_thres=3)
    assert n_ours == n_theirs
    _assert_same(ours, theirs, atol=LS_ATOL)
    _assert_info_equal(ours[2], theirs[2], atol=LS_ATOL)


def test_line_search_on_a_bchw_state():
    f, z0, _ = _conv_problem()
    g = lambda z: f(3.0 * z)  # expansive: the search backtracks
    ours, theirs, n_ours, n_theirs = _both(g, z0, max_iter=15, tol=0.0, ls=True)
    assert n_ours == n_theirs
    _assert_same(ours, theirs, atol=LS_ATOL)


@pytest.mark.parametrize("name, phi", [
    ("accepts the full step", lambda s: (1 - 0.3 * s) ** 2),
    ("quadratic interpolation", lambda s: (1 - 0.1 * s) ** 2 + 5 * s ** 3),
    ("cubic interpolation", lambda s: 1 - 0.5 * s + 30 * s ** 4),
    ("infinite beyond 0.4", lambda s: (1 - s) ** 2 if s <= 0.4 else float("inf")),
    ("no step satisfies", lambda s: 1 + s),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_armijo_search_matches_torchdeqs_scalar_search(name, phi, dtype):
    from torchdeq.solver.broyden import scalar_search_armijo

    from imp_fast.compat._loop import _Loop

    t = lambda s: torch.tensor(phi(float(s)), dtype=dtype)
    theirs, _, _ = scalar_search_armijo(t, t(0.0), -t(0.0), amin=1e-2)
    ours = _Loop._armijo(t, t(0.0))
    if theirs is None:
        assert ours is None, name
    else:
        assert float(ours) == float(theirs), name


def test_float32_line_search_takes_torchdeqs_decisions():
    """The search runs in the state's dtype as torchdeq's: same step sizes (so the same
    number of f evaluations) in float32 too."""
    for seed in range(5):
        f, _, _, z0 = _problem(B=3, D=24, rho=2.5, seed=seed, dtype=torch.float32)
        ours, theirs, n_ours, n_theirs = _both(f, z0, max_iter=15, tol=0.0, ls=True)
        assert n_ours == n_theirs, seed
        # float32 rounding (bmm here, einsum there) grows fast on this expansive map:
        # iterates are compared over the first steps
        ours, theirs, _, _ = _both(f, z0, max_iter=6, tol=0.0, ls=True)
        torch.testing.assert_close(ours[0], theirs[0], atol=1e-4, rtol=0)


def test_line_search_through_non_finite_values_reports_them_and_keeps_a_finite_answer():
    """f is infinite beyond |z| > 1.5: torchdeq's search sees phi = inf and backtracks;
    samples whose residual became non-finite get NaN lowest residuals (as torchdeq
    reports them), and the drop-in answers with their last finite lowest iterate where
    torchdeq's answer is not finite."""
    f0, _, _, z0 = _expansive_problem(D=24, rho=2.5, seed=0)
    f = lambda z: torch.where(z.abs() > 1.5, torch.full_like(z, float("inf")), f0(z))
    ours, theirs, n_ours, n_theirs = _both(f, z0, max_iter=10, tol=0.0, ls=True)
    assert n_ours == n_theirs
    for key in ("abs_lowest", "rel_lowest", "abs_trace", "rel_trace"):
        torch.testing.assert_close(ours[2][key], theirs[2][key], atol=LS_ATOL, rtol=0, equal_nan=True, msg=key)
    bad = torch.isnan(ours[2]["abs_lowest"])
    assert bool(bad.any()) and not bool(bad.all())
    assert bool(torch.isfinite(ours[0]).all())
