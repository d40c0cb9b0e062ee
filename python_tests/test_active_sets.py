"""Active-set solves: solve(f, z0, args=..., compact=True) and per-sample budgets.

The reference is the uncompacted solve of the same batch-separable f (same iterates,
statuses, counters and traces), plus closed forms for the budgets.
"""
import pytest
import torch

import imp_fast
from imp_fast import Status, implicit_solve
from imp_fast.backends import backend_status

BACKENDS = [b for b, why in backend_status().items() if why is None]
F64 = torch.float64


def heterogeneous_batch(B=12, D=48, rho=0.99, dtype=F64, seed=0):
    """f(z, s, x) = s * tanh(W z) + x with per-sample scales s in [0.2, 1]: easy and hard
    samples in one batch. Row-wise (einsum per sample), so exactly batch separable."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g, dtype=F64)
    W = (A + A.T) / 2
    W = rho * W / torch.linalg.matrix_norm(W, 2)
    s = torch.linspace(0.2, 1.0, B, dtype=F64)
    x = torch.randn(B, D, generator=g, dtype=F64)
    W, s, x = W.to(dtype), s.to(dtype), x.to(dtype)
    rows = []

    def f(z, s, x):
        rows.append(z.shape[0])
        return s[:, None] * torch.tanh(torch.einsum("ij,bj->bi", W, z)) + x

    return f, (s, x), torch.zeros(B, D, dtype=dtype), rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["picard", "anderson"])
@pytest.mark.parametrize("best", [False, True])
def test_compacted_solve_equals_uncompacted(backend, method, best):
    f, args, z0, rows = heterogeneous_batch()
    opts = dict(method=method, tol=1e-8, max_iter=400, check_every=3, trace=True, return_best=best,
                backend=backend, m=4)
    full = imp_fast.solve(f, z0, args=args, **opts)
    full_rows = sum(rows)
    rows.clear()
    comp = imp_fast.solve(f, z0, args=args, compact=True, **opts)
    assert full.ok and comp.ok
    assert torch.equal(comp.status, full.status)
    assert torch.equal(comp.n_iter, full.n_iter)
    assert comp.iterations == full.iterations and comp.host_syncs == full.host_syncs
    torch.testing.assert_close(comp.z, full.z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(comp.abs_residual, full.abs_residual, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(comp.trace_abs, full.trace_abs, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(comp.trace_rel, full.trace_rel, rtol=1e-10, atol=1e-14)
    n = full.n_iter.tolist()
    assert len(set(n)) > 3  # the batch really is heterogeneous
    # f-work: the compacted solve evaluates far fewer rows than B * iterations
    assert sum(rows) < 0.8 * full_rows
    assert sum(rows) >= sum(n)  # at least one row-evaluation per update made


def test_compaction_keeps_nonfinite_and_diverged_statuses():
    B, D = 4, 5

    def f(z, c):
        out = 0.5 * torch.tanh(z) + c[:, None]
        out = torch.where((c == 2.0)[:, None], 3.0 * z + 1.0, out)  # diverges (picard)
        return torch.where((c == 3.0)[:, None] & (z.abs().sum(1, keepdim=True) > 0.5),
                           torch.full_like(z, float("nan")), out)

    c = torch.tensor([0.1, 0.2, 2.0, 3.0], dtype=F64)
    z0 = torch.zeros(B, D, dtype=F64)
    opts = dict(method="picard", tol=1e-10, max_iter=60, check_every=2, divergence=50.0, backend="reference")
    full = imp_fast.solve(f, z0, args=(c,), **opts)
    comp = imp_fast.solve(f, z0, args=(c,), compact=True, **opts)
    assert comp.status.tolist() == full.status.tolist()
    assert comp.status.tolist()[2:] == [Status.DIVERGED, Status.NONFINITE]
    torch.testing.assert_close(comp.z, full.z, rtol=0, atol=0, equal_nan=True)
    assert bool(torch.isfinite(comp.z).all())


def test_args_without_compact_is_a_closure():
    f, (s, x), z0, _ = heterogeneous_batch(B=4, D=8)
    a = imp_fast.solve(f, z0, args=(s, x), backend="reference")
    b = imp_fast.solve(lambda z: f(z, s, x), z0, backend="reference")
    assert torch.equal(a.z, b.z) and torch.equal(a.n_iter, b.n_iter)


def test_per_sample_max_iter_budgets():
    # Picard on z -> 0.5 z + 1 from 0: z_k = 2 (1 - 0.5^k) exactly, so each sample's
    # answer says how many updates it was allowed.
    budget = torch.tensor([1, 3, 7, 20])
    z0 = torch.zeros(4, 2, dtype=F64)
    for compact in (False, True):
        r = imp_fast.solve(lambda z: 0.5 * z + 1.0, z0, method="picard", max_iter=budget, tol=1e-30,
                           stop="abs", check_every=2, compact=compact, backend="reference")
        assert r.n_iter.tolist() == [1, 3, 7, 20]
        assert r.iterations == 20
        assert all(s == Status.MAX_ITER for s in r.status.tolist())
        want = 2.0 * (1.0 - 0.5 ** budget.to(F64))
        torch.testing.assert_close(r.z[:, 0], want, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(args=torch.zeros(3, 2)), TypeError, "args must be a tuple"),
        (dict(args=(torch.zeros(2, 2),)), ValueError, r"args\[0\] must have the batch on dim 0"),
        (dict(compact=1), TypeError, "compact must be a bool"),
        (dict(compact=True, check_every=None), ValueError, "compact=True needs check_every"),
        (dict(compact=True, batched=False), ValueError, "compact=True needs batched=True"),
        (dict(max_iter=torch.tensor([1.0, 2.0, 3.0])), TypeError, "integers"),
        (dict(max_iter=torch.tensor([1, 2])), ValueError, r"shape \(3,\)"),
        (dict(max_iter=torch.tensor([1, 0, 3])), ValueError, "max_iter must be >= 1"),
    ],
)
def test_bad_active_set_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        imp_fast.solve(lambda z, *a: z * 0.5, torch.zeros(3, 2), **kw)


def test_wrong_output_shape_after_a_shrink_names_the_working_set():
    calls = []

    def f(z, c):  # the first three samples are fixed at 0 and freeze at once
        calls.append(z.shape[0])
        out = 0.5 * z + c[:, None]
        return out if len(calls) < 6 else out[:, :3]

    z0 = torch.zeros(6, 4)
    c = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"f returned shape \(3, 3\), expected \(3, 4\): the shape of z0 \(6, 4\) "
                                         r"with only the 3 samples still running \(compact=True\)"):
        imp_fast.solve(f, z0, args=(c,), compact=True, method="picard", tol=1e-6, max_iter=100, check_every=2)
    assert calls[-1] == 3 and not z0.any() and c.tolist() == [0.0, 0.0, 0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("backward", ["ift", "jfb"])
def test_implicit_solve_compact_forward_same_answer_and_gradients(backward):
    # x carries each sample's input (first D columns) and its contraction scale (last D
    # columns), so compaction gathers both with the running rows.
    torch.manual_seed(0)
    D, B = 16, 10
    A = torch.randn(D, D, dtype=F64)
    W = (0.95 * (A + A.T) / torch.linalg.matrix_norm(A + A.T, 2)).requires_grad_()
    inp = torch.randn(B, D, dtype=F64, requires_grad=True)
    scale = torch.linspace(0.2, 1.0, B, dtype=F64)[:, None].expand(B, D)

    def G(z, x):
        return torch.tanh(x[:, D:] * (z @ W) + x[:, :D])

    def run(compact):
        x = torch.cat([inp, scale], 1)
        z, res = implicit_solve(G, x, torch.zeros(B, D, dtype=F64), compact=compact, backward=backward,
                                tol=1e-11, stop="abs", max_iter=500, check_every=2, return_result=True,
                                backend="reference")
        return z, res, torch.autograd.grad(z.pow(2).sum(), [inp, W])

    z0, r0, g0 = run(False)
    z1, r1, g1 = run(True)
    assert torch.equal(r0.n_iter, r1.n_iter) and len(set(r0.n_iter.tolist())) > 2
    torch.testing.assert_close(z1, z0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="compact=True needs x to be one tensor"):
        implicit_solve(lambda z, xx: z * 0.5, (inp, inp), torch.zeros(B, D, dtype=F64), compact=True)


def test_ift_adjoint_runs_on_active_sets():
    """compact=True also compacts the adjoint solve: after the first check that drops
    samples, G is re-evaluated on the running rows only, and the gradients still equal
    backprop through a long unrolled iteration (an independent float64 reference)."""
    torch.manual_seed(1)
    D, B = 12, 8
    A = torch.randn(D, D, dtype=F64)
    W = (0.97 * (A + A.T) / torch.linalg.matrix_norm(A + A.T, 2)).requires_grad_()
    inp = torch.randn(B, D, dtype=F64, requires_grad=True)
    scale = torch.linspace(0.1, 1.0, B, dtype=F64)[:, None].expand(B, D)
    rows = []

    def G(z, x):
        rows.append(z.shape[0])
        return torch.tanh(x[:, D:] * (z @ W) + x[:, :D])

    x = torch.cat([inp, scale], 1)
    z, res = implicit_solve(G, x, torch.zeros(B, D, dtype=F64), compact=True, tol=1e-12, stop="abs",
                            max_iter=2000, check_every=2, return_result=True, backend="reference")
    rows.clear()
    g_inp, g_W = torch.autograd.grad(z.pow(2).sum(), [inp, W])
    adj = res.extras["adjoint"]
    assert bool(adj.converged.all()) and len(set(adj.n_iter.tolist())) > 2
    # the backward evaluated G only on shrinking working sets (never the whole batch again)
    assert rows and max(rows) < B and min(rows) >= 1
    # independent reference: backprop through 600 plain iterations from zero
    zz = torch.zeros(B, D, dtype=F64)
    for _ in range(600):
        zz = torch.tanh(scale * (zz @ W) + inp)
    r_inp, r_W = torch.autograd.grad(zz.pow(2).sum(), [inp, W])
    torch.testing.assert_close(g_inp, r_inp, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(g_W, r_W, rtol=1e-8, atol=1e-10)
