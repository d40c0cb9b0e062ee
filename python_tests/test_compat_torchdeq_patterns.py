"""torchdeq usage patterns run with torchdeq's solvers and with the drop-in's, registered
in torchdeq's registry: ``get_deq`` with IFT (autograd Function and hook), phantom
gradients, DEQIndexing trajectories, DEQSliced, list-of-tensor states, eval mode and
``f_max_iter=0``; outputs, info and gradients compared.

The drop-in freezes each sample at its first step below tol, torchdeq iterates the whole
batch until every sample is below tol. So the reference for a batch is torchdeq run on
each sample alone (f treats samples independently): outputs and info are compared
sample by sample, and parameter gradients against the sum of the per-sample runs'
(the loss is a sum over samples).
"""
import pytest
import torch
from torch import nn

torchdeq = pytest.importorskip("torchdeq")
from torchdeq import get_deq  # noqa: E402

from imp_fast.compat.torchdeq import register_solvers  # noqa: E402

register_solvers()  # 'imp_fast_anderson', 'imp_fast_broyden', 'imp_fast_fixed_point_iter', ...

B, D, DX = 3, 8, 5
INFO_KEYS = ("abs_lowest", "rel_lowest", "abs_trace", "rel_trace", "nstep")


class Layer(nn.Module):
    """f(z, x) = tanh(W z + U x + b), ||W||_2 = 0.7 (a contraction), float64."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        W = torch.randn(D, D, generator=g, dtype=torch.float64)
        self.W = nn.Parameter(0.7 * W / torch.linalg.matrix_norm(W, 2))
        self.U = nn.Parameter(torch.randn(D, DX, generator=g, dtype=torch.float64) / DX ** 0.5)
        self.b = nn.Parameter(0.1 * torch.randn(D, generator=g, dtype=torch.float64))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


class TwoStateLayer(nn.Module):
    """A multi-resolution-style pair of states (B, 2, 4) and (B, 3): f takes and returns both."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.A = nn.Parameter(0.3 * torch.randn(4, 4, generator=g, dtype=torch.float64))
        self.C = nn.Parameter(0.3 * torch.randn(3, 3, generator=g, dtype=torch.float64))
        self.U = nn.Parameter(torch.randn(3, DX, generator=g, dtype=torch.float64) / DX ** 0.5)

    def forward(self, z1, z2, x):
        u = x @ self.U.T  # (B, 3)
        z1n = torch.tanh(z1 @ self.A.T + z2.mean(dim=1, keepdim=True)[:, :, None] + u[:, :2, None])
        z2n = torch.tanh(z2 @ self.C.T + u + 0.5 * z1.mean(dim=(1, 2))[:, None])
        return z1n, z2n


def _inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(B, DX, generator=g, dtype=torch.float64) * torch.tensor([[0.3], [1.0], [2.5]], dtype=torch.float64)


def _run(deq_kwargs, solver, x, *, train=True, solver_kwargs=None, two_states=False):
    """One forward (and backward when training) of a torchdeq DEQ; returns outputs,
    info, parameter gradients and the input gradient."""
    torch.manual_seed(0)
    layer = TwoStateLayer() if two_states else Layer()
    kw = dict(f_solver=solver, b_solver=solver.replace("simple_fixed_point_iter", "fixed_point_iter"))
    kw.update(deq_kwargs)
    deq = get_deq(**kw)
    deq.train(train)
    x = x.clone().requires_grad_(train)
    if two_states:
        z0 = [torch.zeros(x.shape[0], 2, 4, dtype=torch.float64), torch.zeros(x.shape[0], 3, dtype=torch.float64)]
        func = lambda z1, z2: layer(z1, z2, x)
    else:
        z0 = torch.zeros(x.shape[0], D, dtype=torch.float64)
        func = lambda z: layer(z, x)
    z_out, info = deq(func, z0, solver_kwargs=solver_kwargs)
    flat = [torch.cat([t.flatten(1) for t in z], dim=1) if isinstance(z, (list, tuple)) else z for z in z_out]
    grads, xg = {}, None
    if train:
        loss = sum((z ** 2).sum() + z.sum() for z in flat)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        xg = x.grad.clone()
    return [z.detach() for z in flat], info, grads, xg


def _torchdeq_per_sample(deq_kwargs, solver, x, **kw):
    """torchdeq run on each sample alone: outputs and info concatenated over samples,
    parameter gradients summed, input gradients concatenated."""
    outs, infos, grads, xgs = [], [], {}, []
    for i in range(x.shape[0]):
        o, info, g, xg = _run(deq_kwargs, solver, x[i:i + 1], **kw)
        outs.append(o)
        infos.append(info)
        xgs.append(xg)
        for n, v in g.items():
            grads[n] = grads.get(n, 0) + v
    out = [torch.cat([o[j] for o in outs]) for j in range(len(outs[0]))]
    info = {k: torch.cat([inf[k] for inf in infos]) for k in INFO_KEYS}
    return out, info, grads, (torch.cat(xgs) if xgs[0] is not None else None)


def _compare(deq_kwargs, solver="anderson", *, train=True, solver_kwargs=None, two_states=False, exact_info=True):
    x = _inputs()
    kw = dict(train=train, solver_kwargs=solver_kwargs, two_states=two_states)
    ours = _run(deq_kwargs, "imp_fast_" + solver, x, **kw)
    ref = _torchdeq_per_sample(deq_kwargs, solver, x, **kw)
    assert len(ours[0]) == len(ref[0]) >= 1
    for a, b in zip(ours[0], ref[0]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    if exact_info:
        for k in INFO_KEYS:
            assert ours[1][k].shape == ref[1][k].shape, k
            torch.testing.assert_close(ours[1][k], ref[1][k], atol=1e-10, rtol=0, msg=k)
    if train:
        assert ours[2].keys() == ref[2].keys()
        for n in ours[2]:
            torch.testing.assert_close(ours[2][n], ref[2][n], atol=1e-9, rtol=0, msg=n)
        torch.testing.assert_close(ours[3], ref[3], atol=1e-9, rtol=0)
    return ours, ref


IFT = dict(f_max_iter=40, b_max_iter=40, f_tol=1e-9, b_tol=1e-9)


@pytest.mark.parametrize("core", ["indexing", "sliced"])
def test_ift_gradients(core):
    ours, _ = _compare(dict(core=core, ift=True, **IFT))
    assert (ours[1]["abs_lowest"] < 1e-6).all()  # lam=1e-4 (absolute) stalls Anderson near 1e-8


def test_hook_ift_gradients():
    _compare(dict(core="indexing", hook_ift=True, **IFT))


def test_ift_with_fixed_point_iter_solvers():
    _compare(dict(core="indexing", ift=True, **IFT), solver="fixed_point_iter")


@pytest.mark.parametrize("core", ["indexing", "sliced"])
def test_phantom_gradients(core):
    _compare(dict(core=core, grad=3, tau=0.8, f_max_iter=20, f_tol=1e-6))


def test_indexing_trajectory_with_phantom_gradients():
    ours, _ = _compare(dict(core="indexing", indexing=[3, 6], grad=2, f_max_iter=30, f_tol=1e-12))
    assert len(ours[0]) == 3  # states at steps 3 and 6, and the last one


def test_sliced_n_states():
    ours, _ = _compare(dict(core="sliced", n_states=3, grad=2, f_max_iter=18, f_tol=1e-12))
    assert len(ours[0]) == 3


def test_eval_mode():
    ours, _ = _compare(dict(core="indexing", ift=True, f_max_iter=10, eval_f_max_iter=40, f_tol=1e-9), train=False)
    assert (ours[1]["abs_lowest"] < 1e-6).all()  # lam=1e-4 (absolute) stalls Anderson near 1e-8
    assert "sradius" in ours[1]


@pytest.mark.parametrize("ift", [False, True])
def test_f_max_iter_zero_skips_the_solver(ift):
    """deq-inr passes f_max_iter=0: z_init goes straight to the gradient function."""
    ours, _ = _compare(dict(core="indexing", ift=ift, **{k: v for k, v in IFT.items() if k != "f_max_iter"}),
                       solver_kwargs={"f_max_iter": 0})
    x = _inputs()
    layer = Layer()
    with torch.no_grad():
        torch.testing.assert_close(ours[0][0], layer(torch.zeros(B, D, dtype=torch.float64), x))
    assert ours[1]["nstep"].tolist() == [0.0] * B


def test_list_states_through_torchdeqs_vector_wrapper():
    _compare(dict(core="indexing", ift=True, **IFT), two_states=True)


def test_list_states_through_the_no_stat_path():
    """simple_fixed_point_iter with no_stat=True hands the solver the list itself; its
    info is the final step's (no per-sample stopping), so it matches the batch run too."""
    kw = dict(core="indexing", no_stat=True, grad=2, f_max_iter=12)
    x = _inputs()
    ours = _run(kw, "imp_fast_simple_fixed_point_iter", x, two_states=True)
    ref = _run(kw, "simple_fixed_point_iter", x, two_states=True)
    for a, b in zip(ours[0], ref[0]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    for k in INFO_KEYS:
        torch.testing.assert_close(ours[1][k].double(), ref[1][k].double().detach(), atol=1e-12, rtol=1e-6, msg=k)
    for n in ours[2]:
        torch.testing.assert_close(ours[2][n], ref[2][n], atol=1e-12, rtol=0, msg=n)
