"""Implicit gradients as DEQ users write G: closures over modules, pytree inputs, coupled
states, autocast, warm starts, double backward, reference cycles, Jacobian regularisation.

References are independent of the engine: backprop through a long float64 unroll,
torchdeq's own hook-based IFT, exact Jacobians from torch.autograd.functional.
"""
import functools
import gc
import weakref

import pytest
import torch
from torch import nn

import imp_fast
from imp_fast import ImplicitLayer, Status, implicit_solve

F64 = torch.float64
TIGHT = dict(tol=1e-12, stop="abs", max_iter=400, backend="reference")


def _unrolled(call, z0, n):
    z = z0
    for _ in range(n):
        z = call(z)
    return z


def _rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ---------------------------------------------------------------- models written as users write them


class SpectralConv1d(nn.Module):
    """The Fourier layer of an FNO: keep the lowest `modes` frequencies, mix channels."""

    def __init__(self, channels, modes, scale):
        super().__init__()
        self.modes = modes
        self.w_re = nn.Parameter(scale * torch.randn(channels, channels, modes, dtype=F64))
        self.w_im = nn.Parameter(scale * torch.randn(channels, channels, modes, dtype=F64))

    def forward(self, z):
        zf = torch.fft.rfft(z, dim=-1)
        w = torch.complex(self.w_re, self.w_im)
        out = torch.zeros_like(zf)
        out[..., : self.modes] = torch.einsum("bim,iom->bom", zf[..., : self.modes], w)
        return torch.fft.irfft(out, n=z.shape[-1], dim=-1)


class FNOBlock(nn.Module):
    """G(z, x) = tanh(K z + W z + inject(x)), contractive at init; states (B, C, L)."""

    def __init__(self, channels=4, modes=4, x_channels=2):
        super().__init__()
        self.spectral = SpectralConv1d(channels, modes, 0.08)
        self.pointwise = nn.Conv1d(channels, channels, 1).double()
        self.inject = nn.Conv1d(x_channels, channels, 3, padding=1).double()
        with torch.no_grad():
            self.pointwise.weight.mul_(0.3)

    def forward(self, z, x):
        return torch.tanh(self.spectral(z) + self.pointwise(z) + self.inject(x))


def _fno_case():
    torch.manual_seed(1)
    block = FNOBlock()
    x = torch.randn(3, 2, 16, dtype=F64, requires_grad=True)
    z0 = torch.zeros(3, 4, 16, dtype=F64)
    w = torch.randn(3, 4, 16, dtype=F64)
    return block, x, z0, w


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_closure_over_module_matches_long_unroll(method):
    # The FNO block is reached only through the closure: every parameter must get the
    # exact IFT gradient (before the hook-based IFT, all of them got None).
    block, x, z0, w = _fno_case()
    G = lambda z, xx: block(z, xx)  # noqa: E731
    wrt = [x] + list(block.parameters())
    z = implicit_solve(G, x, z0, method=method, **TIGHT)
    got = _grads((w * z).sum(), wrt)
    want = _grads((w * _unrolled(lambda zz: block(zz, x), z0, 400)).sum(), wrt)
    assert len(got) == 7
    for g, r in zip(got, want):
        assert g is not None and _rel_err(g, r) < 1e-6


@pytest.mark.parametrize("how", ["method", "partial", "module"])
def test_every_way_of_writing_G_gets_the_same_gradients(how):
    block, x, z0, w = _fno_case()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block

        def step(self, z, xx):
            return self.block(z, xx)

    model = Model()
    G = {
        "method": model.step,
        "partial": functools.partial(lambda z, xx, blk: blk(z, xx), blk=block),
        "module": block,
    }[how]
    wrt = [x] + list(block.parameters())
    got = _grads((w * implicit_solve(G, x, z0, **TIGHT)).sum(), wrt)
    want = _grads((w * _unrolled(lambda zz: block(zz, x), z0, 400)).sum(), wrt)
    for g, r in zip(got, want):
        assert _rel_err(g, r) < 1e-6


def test_matches_torchdeq_hook_ift_on_the_same_module():
    torchdeq = pytest.importorskip("torchdeq")
    block, x, z0, w = _fno_case()
    wrt = [x] + list(block.parameters())
    got = _grads((w * implicit_solve(lambda z, xx: block(z, xx), x, z0, **TIGHT)).sum(), wrt)
    deq = torchdeq.get_deq(ift=True, f_solver="fixed_point_iter", f_max_iter=400, f_tol=1e-13,
                           b_solver="fixed_point_iter", b_max_iter=400, b_tol=1e-13, f_stop_mode="abs",
                           b_stop_mode="abs")
    z_out, _ = deq(lambda z: block(z, x), z0)
    want = _grads((w * z_out[-1]).sum(), wrt)
    for g, r in zip(got, want):
        assert _rel_err(g, r) < 1e-6


# ---------------------------------------------------------------- pytree x, no x, coupled states


def _ring_graph(n):
    src = torch.arange(n)
    dst = (src + 1) % n
    edge_index = torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])
    return edge_index


class GNNStep(nn.Module):
    """IGNN-style G(z, (feat, edge_index, edge_weight)) on a node state (N, H): rows are
    graph nodes coupled by message passing, so the state is one problem."""

    def __init__(self, feat_dim=3, hidden=5):
        super().__init__()
        self.embed = nn.Linear(feat_dim, hidden).double()
        self.W = nn.Parameter(0.3 * torch.randn(hidden, hidden, dtype=F64) / hidden**0.5)

    def forward(self, z, inputs):
        feat, edge_index, edge_weight = inputs
        msg = torch.zeros_like(z).index_add_(0, edge_index[1], edge_weight[:, None] * z[edge_index[0]])
        return torch.tanh(0.4 * msg @ self.W.T + self.embed(feat))


def _gnn_case(n=6):
    torch.manual_seed(2)
    gnn = GNNStep()
    edge_index = _ring_graph(n)
    feat = torch.randn(n, 3, dtype=F64, requires_grad=True)
    edge_weight = torch.rand(edge_index.shape[1], dtype=F64, requires_grad=True)
    return gnn, (feat, edge_index, edge_weight), torch.zeros(n, 5, dtype=F64)


def test_pytree_x_every_tensor_gets_its_gradient():
    gnn, inputs, z0 = _gnn_case()
    feat, _, edge_weight = inputs
    wrt = [feat, edge_weight] + list(gnn.parameters())
    z = implicit_solve(gnn, inputs, z0, batched=False, **TIGHT)
    w = torch.randn_like(z)
    got = _grads((w * z).sum(), wrt)
    want = _grads((w * _unrolled(lambda zz: gnn(zz, inputs), z0, 400)).sum(), wrt)
    for g, r in zip(got, want):
        assert _rel_err(g, r) < 1e-6


def test_dict_x_and_omitted_x():
    torch.manual_seed(3)
    A = (0.4 * torch.randn(4, 4, dtype=F64) / 2).requires_grad_()
    a = torch.randn(2, 4, dtype=F64, requires_grad=True)
    b = torch.randn(2, 4, dtype=F64, requires_grad=True)
    z0 = torch.zeros(2, 4, dtype=F64)
    z = implicit_solve(lambda z, d: torch.tanh(z @ A.T + d["a"] * d["b"]), {"a": a, "b": b}, z0, **TIGHT)
    got = _grads(z.pow(2).sum(), [A, a, b])
    want = _grads(_unrolled(lambda zz: torch.tanh(zz @ A.T + a * b), z0, 400).pow(2).sum(), [A, a, b])
    for g, r in zip(got, want):
        assert _rel_err(g, r) < 1e-6
    # x omitted: G(z) only, z0 required
    z = implicit_solve(lambda z: torch.tanh(z @ A.T + a), z0=z0, **TIGHT)
    (gA,) = _grads(z.sum(), [A])
    (rA,) = _grads(_unrolled(lambda zz: torch.tanh(zz @ A.T + a), z0, 400).sum(), [A])
    assert _rel_err(gA, rA) < 1e-6
    with pytest.raises(TypeError, match="z0 is required"):
        implicit_solve(lambda z: z, **TIGHT)
    with pytest.raises(TypeError, match="z0 is required when x is a tuple"):
        implicit_solve(lambda z, x: z, (a, b))


def test_batched_false_solves_the_coupled_state_as_one_problem():
    gnn, inputs, z0 = _gnn_case(n=40)
    tol = 1e-6
    with torch.no_grad():
        res = imp_fast.solve(lambda z: gnn(z, inputs), z0, batched=False, tol=tol, stop="abs", max_iter=200)
        assert res.status.shape == (1,) and res.ok
        true = float((gnn(res.z, inputs) - res.z).norm())  # residual of the whole state
        assert true < tol
        # the per-sample default freezes rows one by one: their whole-state residual is not
        # what tol bounds (the silent failure batched=False exists for)
        per_row = imp_fast.solve(lambda z: gnn(z, inputs), z0, tol=tol, stop="abs", max_iter=200)
        assert per_row.status.shape == (40,)
    z = implicit_solve(gnn, inputs, z0, batched=False, tol=tol, stop="abs", max_iter=200)
    with torch.no_grad():
        assert float((gnn(z, inputs) - z).norm()) < tol


# ---------------------------------------------------------------- create_graph


def test_ift_create_graph_raises_instead_of_dropping_the_penalty():
    block, x, z0, _ = _fno_case()
    z = implicit_solve(lambda z, xx: block(z, xx), x, z0, **TIGHT)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(z.sum(), x, create_graph=True)
    z = implicit_solve(lambda z, xx: block(z, xx), x, z0, **TIGHT)
    (g,) = torch.autograd.grad(z.sum(), x)  # first order still works
    assert g.shape == x.shape and not g.requires_grad


@pytest.mark.parametrize("mode", ["jfb", "phantom"])
def test_second_order_through_jfb_and_phantom_matches_reference(mode):
    block, x, z0, _ = _fno_case()
    z, res = implicit_solve(lambda z, xx: block(z, xx), x, z0, backward=mode, phantom_k=3,
                            phantom_damping=0.5, return_result=True, **TIGHT)
    (gx,) = torch.autograd.grad(z.pow(2).sum(), x, create_graph=True)
    assert gx.requires_grad
    (hx,) = torch.autograd.grad(gx.pow(2).sum(), x)
    zs = res.z.detach()
    if mode == "jfb":
        zr = block(zs, x)
    else:
        zr = zs
        for _ in range(3):
            zr = 0.5 * zr + 0.5 * block(zr, x)
    (gr,) = torch.autograd.grad(zr.pow(2).sum(), x, create_graph=True)
    (hr,) = torch.autograd.grad(gr.pow(2).sum(), x)
    assert _rel_err(hx, hr) < 1e-12


# ---------------------------------------------------------------- reference cycles


def test_no_reference_cycle_between_output_node_and_result():
    block, x, z0, w = _fno_case()
    gc.collect()
    gc.disable()
    try:
        z, res = implicit_solve(lambda z, xx: block(z, xx), x, z0, return_result=True, **TIGHT)
        refs = [weakref.ref(z), weakref.ref(res), weakref.ref(z.grad_fn)]
        del z, res
        assert all(r() is None for r in refs), "output, result or node kept alive by a cycle"
    finally:
        gc.enable()


def _count_tensors():
    return sum(type(o) is torch.Tensor or type(o) is nn.Parameter for o in gc.get_objects())


def test_memory_flat_over_training_steps_with_gc_disabled():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
    layer = ImplicitLayer(lambda z, x: 0.5 * block(z) + x, tol=1e-6, max_iter=60)
    opt = torch.optim.SGD(block.parameters(), lr=1e-3)

    def step():
        x = torch.randn(32, 16)
        loss = layer(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    gc.collect()
    gc.disable()
    try:
        before = _count_tensors()
        for _ in range(40):
            step()
        after = _count_tensors()
    finally:
        gc.enable()
    assert after <= before + 2, (before, after)


# ---------------------------------------------------------------- autocast


def test_autocast_bf16_training_step_close_to_fp32():
    torch.manual_seed(4)
    core = nn.Sequential(nn.Linear(32, 32), nn.Tanh())
    inject = nn.Linear(8, 32)
    with torch.no_grad():
        core[0].weight.mul_(0.4)
    G = lambda z, x: core(z) + inject(x)  # noqa: E731
    x = torch.randn(16, 8)
    z0 = torch.zeros(16, 32)
    params = list(core.parameters()) + list(inject.parameters())

    def grads(autocast):
        # bf16 VJPs carry ~3 significant digits: the adjoint's tol must not ask for more
        layer = ImplicitLayer(G, tol=1e-5, max_iter=100, b_tol=2e-3, on_adjoint_failure="raise",
                              backend="reference")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            z = layer(x, z0)
            loss = z.pow(2).mean()
        assert z.dtype == torch.float32  # the state keeps its dtype
        return torch.autograd.grad(loss, params), layer.last_result

    g32, _ = grads(False)
    g16, res = grads(True)
    assert res.status.shape == (16,)
    for a, b in zip(g16, g32):
        assert _rel_err(a, b) < 0.05


def test_autocast_solve_casts_f_output_back():
    W = torch.randn(8, 8) * 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = imp_fast.solve(lambda z: torch.tanh(z @ W) + 1.0, torch.zeros(4, 8), tol=1e-2)
    assert res.z.dtype == torch.float32 and res.residual.dtype == torch.float32 and res.ok
    with pytest.raises(TypeError, match="dtype"):  # outside autocast a dtype change is an error
        imp_fast.solve(lambda z: z.half(), torch.zeros(4, 8))


# ---------------------------------------------------------------- return_best, warm starts


def test_return_best_returns_lowest_residual_iterate():
    # Picard on z -> 1.6 z - 0.6 from near the fixed point 1 moves away: the best
    # iterate is the first one evaluated.
    z0 = torch.full((2, 3), 1.01, dtype=F64)
    a = torch.tensor(1.6, dtype=F64, requires_grad=True)
    z, res = implicit_solve(lambda z: a * z - (a - 1.0), z0=z0, method="picard", max_iter=6, tol=1e-12,
                            return_best=True, return_result=True, backward="jfb", backend="reference")
    assert torch.allclose(res.z, z0)
    assert bool((res.status == Status.MAX_ITER).all())
    assert torch.allclose(res.abs_residual, torch.full((2,), 0.6 * 0.01 * 3**0.5, dtype=F64))


def test_previous_output_as_z0_carries_no_gradient(monkeypatch):
    import imp_fast.autograd as ag

    calls = []
    real = ag._report_adjoint
    monkeypatch.setattr(ag, "_report_adjoint", lambda adj, on: (calls.append(1), real(adj, on)))
    torch.manual_seed(5)
    lin = nn.Linear(6, 6).double()
    with torch.no_grad():
        lin.weight.mul_(0.3)
    layer = ImplicitLayer(lambda z, x: torch.tanh(lin(z) + x), tol=1e-10, max_iter=100)
    x = torch.randn(3, 6, dtype=F64)
    z_prev = layer(x)
    z_prev.sum().backward(retain_graph=True)
    z = layer(x + 0.1, z0=z_prev)  # not detached: must not link to the old graph
    z.sum().backward()
    assert len(calls) == 2


def test_warm_start_reuses_last_fixed_point():
    torch.manual_seed(6)
    lin = nn.Linear(6, 6).double()
    with torch.no_grad():
        lin.weight.mul_(0.5)
    G = lambda z, x: torch.tanh(lin(z) + x)  # noqa: E731
    layer = ImplicitLayer(G, warm_start=True, method="picard", tol=1e-10, stop="abs", max_iter=200,
                          check_every=1)
    x = torch.randn(3, 6, dtype=F64)
    z1 = layer(x)
    cold = int(layer.last_result.iterations)
    z2 = layer(x + 1e-9)
    warm = int(layer.last_result.iterations)
    assert warm <= cold / 2, (warm, cold)
    ref = ImplicitLayer(G, method="picard", tol=1e-10, stop="abs", max_iter=200)(x + 1e-9)
    assert torch.allclose(z2, ref, atol=1e-9)
    layer(torch.randn(5, 6, dtype=F64))  # another batch size: starts cold, no error
    layer.reset_warm_start()
    assert layer._warm is None
    assert z1.requires_grad and z2.requires_grad


# ---------------------------------------------------------------- Jacobian regulariser


def test_jacobian_regulariser_estimates_the_frobenius_norm():
    torch.manual_seed(7)
    D = 6
    W = (0.5 * torch.randn(D, D, dtype=F64) / D**0.5).requires_grad_()
    x = torch.randn(3, D, dtype=F64)
    G = lambda z, xx: torch.tanh(z @ W.T + xx)  # noqa: E731
    z, res = implicit_solve(G, x, jac_reg=True, jac_reg_samples=4000, return_result=True, **TIGHT)
    zs = res.z.detach()
    exact = 0.0
    for b in range(3):
        J = torch.autograd.functional.jacobian(lambda v: G(v[None], x[b : b + 1])[0], zs[b], create_graph=True)
        exact = exact + J.pow(2).sum()
    exact = exact / (3 * D)
    est, ex = res.jac_loss.item(), exact.item()
    assert abs(est - ex) < 0.05 * ex
    (g_est,) = torch.autograd.grad(res.jac_loss, W)
    (g_exact,) = torch.autograd.grad(exact, W)
    assert _rel_err(g_est, g_exact) < 0.1
    with torch.no_grad():
        _, r = implicit_solve(G, x, jac_reg=True, return_result=True, **TIGHT)
    assert r.jac_loss is None
    layer = ImplicitLayer(G, jac_reg=True, **TIGHT)
    layer(x)
    assert layer.jac_loss is not None and layer.jac_loss.requires_grad


def test_bad_new_options():
    x = torch.randn(2, 3)
    for kw, exc in [(dict(batched=1), TypeError), (dict(return_best="no"), TypeError),
                    (dict(jac_reg=1), TypeError), (dict(jac_reg_samples=0), ValueError)]:
        with pytest.raises(exc, match=next(iter(kw))):
            implicit_solve(lambda z, x: z, x, **kw)
    with pytest.raises(TypeError, match="warm_start"):
        ImplicitLayer(lambda z, x: z, warm_start="yes")
