"""CUDA-graph mode (imp_fast.graph.solve_graphed). GPU parts skip cleanly without CUDA."""
import pytest
import torch

import imp_fast
from imp_fast.graph import clear_graph_cache, solve_graphed

HAS_CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]


def _f_factory(B, D, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = (torch.randn(D, D, generator=gen) * (0.6 / D**0.5)).to(device)
    x = torch.randn(B, D, generator=gen).to(device)

    def f(z):
        return torch.tanh(z @ W.T + x)

    return f


def test_rejects_cpu_z0():
    f = _f_factory(2, 4, "cpu")
    with pytest.raises(ValueError, match="CUDA"):
        solve_graphed(f, torch.zeros(2, 4))


def test_rejects_non_tensor():
    with pytest.raises(TypeError, match="z0"):
        solve_graphed(lambda z: z, [1.0, 2.0])


def _apply(marks):
    def deco(fn):
        for m in marks:
            fn = m(fn)
        return fn

    return deco


@_apply(gpu)
@pytest.mark.parametrize("method", ["anderson", "picard"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_graph_matches_plain_solve_and_caches(method, backend):
    clear_graph_cache()
    B, D = 8, 64
    f = _f_factory(B, D, "cuda")
    opts = dict(method=method, max_iter=15, tol=1e-5, m=4, backend=backend)
    z0 = torch.randn(B, D, device="cuda")
    want = imp_fast.solve(f, z0, check_every=None, **opts)
    got = solve_graphed(f, z0, **opts)
    assert got.host_syncs == 0 and got.extras["graph_cache_hit"] is False
    assert torch.equal(got.status, want.status)
    assert torch.equal(got.n_iter, want.n_iter)
    torch.testing.assert_close(got.z, want.z, rtol=1e-5, atol=1e-5)
    # Second call with a new z0: replays the cached graph, earlier results untouched.
    z1 = torch.randn(B, D, device="cuda")
    first_z = got.z.clone()
    again = solve_graphed(f, z1, check_every=3, **opts)  # check_every is forced to None
    assert again.extras["graph_cache_hit"] is True
    want1 = imp_fast.solve(f, z1, check_every=None, **opts)
    assert torch.equal(again.status, want1.status)
    torch.testing.assert_close(again.z, want1.z, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.z, first_z)


@_apply(gpu)
def test_graph_throw_applies_after_replay():
    clear_graph_cache()
    f = _f_factory(4, 16, "cuda")
    with pytest.raises(imp_fast.SolveError):
        solve_graphed(f, torch.zeros(4, 16, device="cuda"), max_iter=2, tol=1e-12, throw=True)


@_apply(gpu)
def test_uncapturable_f_names_f():
    clear_graph_cache()

    def syncing_f(z):
        if float(z.abs().max()) > 1e9:  # host sync: not capturable
            return z
        return 0.5 * z

    with pytest.raises(RuntimeError, match="syncing_f"):
        solve_graphed(syncing_f, torch.ones(2, 8, device="cuda"), max_iter=3)
    clear_graph_cache()
