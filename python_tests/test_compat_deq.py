"""The locuslab/deq-style drop-in (imp_fast.compat.deq): fixed points of (B, C, H, W) and
(B, D, L) states against plain float64 references, the algorithm against torchdeq's
Anderson (the same algorithm, derived from locuslab/deq), and a small implicit FNO written
the way the DEQ code bases write it (phantom gradients, hook-based IFT backward) against
the same model run with a plain PyTorch solver."""
import warnings

import pytest
import torch
from torch import autograd, nn

from imp_fast.compat import deq

LOCUSLAB_KEYS = ("result", "lowest", "nstep", "prot_break", "abs_trace", "rel_trace", "eps", "threshold")


def _conv_problem(B=2, C=3, H=6, W=5, seed=0, rho=0.9):
    """f(z) = tanh(conv(z) + x) with the 3x3 convolution's operator norm <= rho."""
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(C, C, 3, 3, generator=g, dtype=torch.float64)
    K = K * rho / (K.abs().sum() * 1.0)  # ||conv||_2 <= sum |K|: a contraction
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    return (lambda z: torch.tanh(nn.functional.conv2d(z, K.to(z.dtype), padding=1) + x.to(z.dtype))), x


def _picard_reference(f, z, n=400):
    with torch.no_grad():
        for _ in range(n):
            z = f(z)
    return z


def test_anderson_on_bchw_states_reaches_the_float64_fixed_point():
    f, x = _conv_problem()
    out = deq.anderson(f, torch.zeros_like(x), threshold=60, eps=1e-11, stop_mode="abs", lam=1e-10, name="forward")
    ref = _picard_reference(f, torch.zeros_like(x))
    assert set(LOCUSLAB_KEYS) <= set(out)
    assert out["result"].shape == x.shape
    torch.testing.assert_close(out["result"], ref, atol=1e-10, rtol=0)
    assert out["lowest"] < 1e-11 and out["converged"].all()
    assert isinstance(out["lowest"], float) and isinstance(out["nstep"], int)
    assert len(out["abs_trace"]) == len(out["rel_trace"]) == 60 - 2
    assert out["eps"] == 1e-11 and out["threshold"] == 60 and out["prot_break"] is False


def test_anderson_on_bdl_states_and_half_precision():
    g = torch.Generator().manual_seed(1)
    Bn, Dn, L = 3, 4, 7
    A = torch.randn(Dn, Dn, generator=g, dtype=torch.float64)
    A = 0.8 * A / torch.linalg.matrix_norm(A, 2)
    x = torch.randn(Bn, Dn, L, generator=g, dtype=torch.float64)
    f = lambda z: torch.tanh(torch.einsum("ij,bjl->bil", A.to(z.dtype), z) + x.to(z.dtype))
    ref = _picard_reference(f, torch.zeros_like(x))
    # An absolute ridge must stay below ||g||^2 at the tolerance (here ~1e-20) not to stall.
    out = deq.anderson(f, torch.zeros_like(x), threshold=40, eps=1e-10, lam=1e-16)
    assert out["converged"].all()
    torch.testing.assert_close(out["result"], ref, atol=1e-8, rtol=0)
    out16 = deq.anderson(f, torch.zeros(Bn, Dn, L, dtype=torch.bfloat16), threshold=40, eps=1e-2)
    assert out16["result"].dtype == torch.bfloat16
    assert float((out16["result"].double() - ref).abs().max()) < 0.05


def test_anderson_is_torchdeqs_algorithm_returning_the_iterate():
    """locuslab's anderson and torchdeq's anderson_solver run the same iterations;
    locuslab returns the iterate x_k and nstep = k, torchdeq f(x_k) and nstep = k + 1.
    With stop_mode='abs' (their relative residuals use different epsilons) the traces
    agree too."""
    tdeq = pytest.importorskip("torchdeq.solver")
    f, x = _conv_problem(B=1)
    x0 = torch.zeros_like(x)
    for lam, beta in ((1e-4, 1.0), (1e-2, 0.8)):
        out = deq.anderson(f, x0, threshold=30, eps=1e-9, stop_mode="abs", lam=lam, beta=beta, m=5)
        z_t, _, info_t = tdeq.anderson_solver(f, x0, max_iter=30, tol=1e-9, stop_mode="abs", lam=lam, tau=beta, m=5)
        torch.testing.assert_close(f(out["result"]), z_t, atol=1e-12, rtol=0)
        assert out["nstep"] == int(info_t["nstep"]) - 1
        torch.testing.assert_close(torch.tensor(out["abs_trace"], dtype=torch.float64), info_t["abs_trace"][0, 1:],
                                   atol=1e-12, rtol=0)


def test_whole_batch_residual_like_locuslab():
    """per_sample=False: one residual norm over the whole batch (locuslab's), while each
    sample keeps its own mixing weights. torchdeq with return_final runs the same
    iterates for every sample without stopping; its per-sample residuals combine into
    the whole-batch one."""
    tdeq = pytest.importorskip("torchdeq.solver")
    f, x = _conv_problem(B=3)
    x0 = torch.zeros_like(x)
    eps = 1e-6
    out = deq.anderson(f, x0, threshold=40, eps=eps, stop_mode="abs", per_sample=False)
    steps = list(range(3, 41))
    _, snaps, info_t = tdeq.anderson_solver(f, x0, max_iter=40, tol=eps, stop_mode="abs", return_final=True,
                                            indexing=steps)
    batch_trace = torch.linalg.vector_norm(info_t["abs_trace"][:, 1:], dim=0)  # (38,)
    k_stop = int((batch_trace < eps).nonzero()[0])  # first step below eps, counted from 0 = step 3
    assert 0 < k_stop < 37
    torch.testing.assert_close(torch.tensor(out["abs_trace"][:k_stop + 1], dtype=torch.float64),
                               batch_trace[:k_stop + 1], atol=1e-12, rtol=0)
    assert out["nstep"] == k_stop + 2  # iterate index of step k_stop + 3
    torch.testing.assert_close(f(out["result"]), snaps[k_stop], atol=1e-12, rtol=0)
    # Per sample (the default) the iterates are the same until a sample freezes, and each
    # sample's residual is below the whole-batch one: every sample freezes by that step.
    per = deq.anderson(f, x0, threshold=40, eps=eps, stop_mode="abs")
    assert (per["nstep_per_sample"] <= out["nstep"]).all()
    assert len(set(per["nstep_per_sample"].tolist())) > 1


def test_output_in_another_layout_is_rejected():
    f, x = _conv_problem()
    with pytest.raises(ValueError, match=r"f returned shape \(2, 6, 5, 3\), expected x0's shape \(2, 3, 6, 5\)"):
        deq.anderson(lambda z: f(z).permute(0, 2, 3, 1), torch.zeros_like(x))


def test_bad_arguments_and_unknown_keywords():
    f, x = _conv_problem()
    with pytest.raises(ValueError, match="threshold must be >= 3"):
        deq.anderson(f, torch.zeros_like(x), threshold=2)
    with pytest.raises(ValueError, match="stop_mode"):
        deq.anderson(f, torch.zeros_like(x), stop_mode="max")
    with pytest.raises(ValueError, match="lam must be"):
        deq.anderson(f, torch.zeros_like(x), lam=-1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deq.anderson(f, torch.zeros_like(x), threshold=5, name="backward")  # locuslab passes name
    with pytest.warns(UserWarning, match="'treshold'"):
        deq.anderson(f, torch.zeros_like(x), threshold=5, treshold=10)


def test_broyden_reaches_the_float64_fixed_point():
    f, x = _conv_problem()
    out = deq.broyden(f, torch.zeros_like(x), 60, eps=1e-10, stop_mode="abs", ls=False, name="forward")
    assert set(LOCUSLAB_KEYS) <= set(out)
    torch.testing.assert_close(out["result"], _picard_reference(f, torch.zeros_like(x)), atol=1e-9, rtol=0)


@pytest.mark.parametrize("per_sample", [True, False])
def test_broyden_with_line_search_reaches_the_float64_fixed_point(per_sample):
    f, x = _conv_problem()
    out = deq.broyden(f, torch.zeros_like(x), 60, eps=1e-10, stop_mode="abs", ls=True, name="forward",
                      per_sample=per_sample)
    assert set(LOCUSLAB_KEYS) <= set(out)
    assert out["result"].shape == x.shape
    torch.testing.assert_close(out["result"], _picard_reference(f, torch.zeros_like(x)), atol=1e-9, rtol=0)
    assert out["lowest"] < 1e-10 and bool(out["converged"].all())
    assert len(out["abs_trace"]) == 61
    if not per_sample:  # locuslab's whole-batch residual: one lowest, one step for all
        assert out["lowest_per_sample"].unique().numel() == 1
        assert out["nstep_per_sample"].unique().numel() == 1
    with pytest.raises(TypeError, match="ls must be a bool"):
        deq.broyden(f, torch.zeros_like(x), 10, ls="yes")


def test_broyden_line_search_is_torchdeqs_for_one_sample():
    """locuslab's Broyden line search is the one torchdeq took over: for a batch of one
    (where locuslab's whole-batch norms are the sample's), the drop-in's answer, lowest
    residual and step equal torchdeq's broyden_solver(ls=True), with the same number of
    f evaluations, on an expansive map where the search backtracks."""
    tdeq = pytest.importorskip("torchdeq.solver")
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
    xin = torch.randn(1, 24, generator=g, dtype=torch.float64)
    calls = {"ours": 0, "theirs": 0}

    def counted(key):
        def f(z):
            calls[key] += 1
            return torch.tanh(z @ (2.5 * Q).T + xin)
        return f

    z0 = torch.zeros(1, 24, dtype=torch.float64)
    ours = deq.broyden(counted("ours"), z0, 25, eps=1e-12, stop_mode="abs", ls=True)
    z, _, info = tdeq.broyden_solver(counted("theirs"), z0, max_iter=25, tol=1e-12, stop_mode="abs", ls=True)
    assert calls["ours"] == calls["theirs"] > 26  # same step sizes; the search backtracked
    torch.testing.assert_close(ours["result"], z, atol=1e-7, rtol=0)
    assert ours["lowest"] == pytest.approx(float(info["abs_lowest"][0]), abs=1e-7)
    assert ours["nstep"] == int(info["nstep"][0])


# --------------------------------------------------------------------------------------
# A small implicit FNO in the DEQ code bases' style.


class SpectralConv1d(nn.Module):
    def __init__(self, C, modes, g):
        super().__init__()
        self.modes = modes
        scale = 0.3 / C
        self.w = nn.Parameter(scale * torch.randn(C, C, modes, 2, generator=g, dtype=torch.float64))

    def forward(self, z):  # (B, C, L)
        zf = torch.fft.rfft(z)
        w = torch.view_as_complex(self.w)
        out = torch.zeros_like(zf)
        out[..., :self.modes] = torch.einsum("bim,iom->bom", zf[..., :self.modes], w)
        return torch.fft.irfft(out, n=z.shape[-1])


class FNOCell(nn.Module):
    """G(z, x) = tanh(K z + W z + P x): a Fourier layer with a pointwise path and input
    injection, kept contractive by small weights."""

    def __init__(self, C=4, modes=5, cx=2):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.spectral = SpectralConv1d(C, modes, g)
        self.W = nn.Parameter(0.3 / C * torch.randn(C, C, generator=g, dtype=torch.float64))
        self.P = nn.Parameter(torch.randn(C, cx, generator=g, dtype=torch.float64) / cx)

    def forward(self, z, x):
        return torch.tanh(self.spectral(z) + torch.einsum("oc,bcl->bol", self.W, z) + torch.einsum("oc,bcl->bol", self.P, x))


class ImplicitFNO(nn.Module):
    """The DEQ code bases' forward: solve without a graph, re-engage autograd with one
    call of the cell, and either phantom gradients (k damped steps with a graph) or an
    IFT backward installed as a hook that solves the adjoint fixed point."""

    def __init__(self, solver, grad="ift", phantom_steps=3, tau=0.7, **solver_kwargs):
        super().__init__()
        self.cell = FNOCell()
        self.solver, self.grad, self.k, self.tau, self.kw = solver, grad, phantom_steps, tau, solver_kwargs
        self.hook = None

    def forward(self, x):
        z0 = torch.zeros(x.shape[0], 4, x.shape[-1], dtype=x.dtype)
        with torch.no_grad():
            z_star = self.solver(lambda z: self.cell(z, x), z0, name="forward", **self.kw)["result"]
        if self.grad == "phantom":
            z = z_star
            for _ in range(self.k):
                z = (1 - self.tau) * z + self.tau * self.cell(z, x)
            return z
        z_star = z_star.requires_grad_()
        new_z = self.cell(z_star, x)

        def backward_hook(grad):
            if self.hook is not None:
                self.hook.remove()  # the solve below backpropagates through new_z again
            return self.solver(lambda y: autograd.grad(new_z, z_star, y, retain_graph=True)[0] + grad,
                               torch.zeros_like(grad), name="backward", **self.kw)["result"]

        self.hook = new_z.register_hook(backward_hook)
        return new_z


def plain_solver(f, x0, threshold=500, eps=1e-13, name="", **_):
    """The plain PyTorch reference: Picard iteration until ||f(z) - z|| < eps."""
    z = x0
    for _ in range(threshold):
        fz = f(z)
        done = float((fz - z).norm()) < eps
        z = fz
        if done:
            break
    return {"result": z}


def _fno_run(solver, grad, **kw):
    torch.manual_seed(0)
    model = ImplicitFNO(solver, grad=grad, **kw)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 2, 16, generator=g, dtype=torch.float64).requires_grad_()
    target = torch.randn(3, 4, 16, generator=g, dtype=torch.float64)
    y = model(x)
    loss = ((y - target) ** 2).sum()
    loss.backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, x.grad.clone()


@pytest.mark.parametrize("grad", ["ift", "phantom"])
def test_implicit_fno_matches_a_plain_solver(grad):
    ours = _fno_run(deq.anderson, grad, threshold=60, eps=1e-11, stop_mode="abs", lam=1e-10)
    ref = _fno_run(plain_solver, grad)
    torch.testing.assert_close(ours[0], ref[0], atol=1e-10, rtol=0)
    for n in ref[1]:
        torch.testing.assert_close(ours[1][n], ref[1][n], atol=1e-8, rtol=1e-8, msg=n)
    torch.testing.assert_close(ours[2], ref[2], atol=1e-8, rtol=1e-8)


def test_implicit_fno_ift_gradient_is_the_limit_of_unrolled_backprop():
    """An independent check of the IFT gradient: backprop through many plain iterations
    of the contraction converges to it."""
    ours = _fno_run(deq.anderson, "ift", threshold=60, eps=1e-11, stop_mode="abs", lam=1e-10)

    def unrolled(f, x0, **_):
        z = x0
        with torch.enable_grad():
            for _ in range(80):
                z = f(z)
        return {"result": z}

    torch.manual_seed(0)
    model = ImplicitFNO(unrolled, grad="phantom", phantom_steps=80, tau=1.0)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 2, 16, generator=g, dtype=torch.float64).requires_grad_()
    target = torch.randn(3, 4, 16, generator=g, dtype=torch.float64)
    ((model(x) - target) ** 2).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[1][n], p.grad, atol=1e-8, rtol=1e-8, msg=n)
    torch.testing.assert_close(ours[2], x.grad, atol=1e-8, rtol=1e-8)
