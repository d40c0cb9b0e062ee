"""Lipschitz probes on every backend: the probe runs the solve's loop with the chosen
backend's fused step and pair-ratio op, and its numbers equal an independent
side-by-side loop (Picard) and the reference backend (Anderson) on every backend."""
import warnings

import pytest
import torch

import imp_fast
from imp_fast import lipschitz_trace, scaling_curve
from imp_fast.backends import backend_status

F64 = torch.float64
AVAILABLE = [b for b, why in backend_status().items() if why is None]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def _problem(dtype, B=3, D=12, n_in=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=F64)
    W = (0.7 * W / torch.linalg.matrix_norm(W, ord=2)).to(dtype)
    U = torch.randn(D, n_in, generator=g, dtype=F64).to(dtype)
    x = torch.randn(B, n_in, generator=g, dtype=F64).to(dtype)
    d = torch.randn(2, n_in, generator=g, dtype=F64).to(dtype)

    class Block(torch.nn.Module):  # G written as users write it: a module closed over
        def forward(self, z, x):
            return torch.tanh(z @ W.T.to(z.dtype) + x @ U.T.to(z.dtype))

    block = Block()
    return (lambda z, x: block(z, x)), x, d, torch.zeros(B, D, dtype=dtype)


def _side_by_side(G, x, z0, d, eps, T, beta):
    """Independent ground truth: x and each x + eps d_p iterated separately in float64."""
    x, z0, d = x.double(), z0.double(), d.double()
    P = d.shape[0]
    out = torch.empty(T, x.shape[0], P, dtype=F64)
    res = torch.empty(T, x.shape[0], dtype=F64)
    y = z0.clone()
    ys = [z0.clone() for _ in range(P)]
    for t in range(T):
        y = (1 - beta) * y + beta * G(y, x)
        res[t] = torch.linalg.vector_norm(G(y, x) - y, dim=1)
        for p in range(P):
            xp = x + eps * d[p]
            ys[p] = (1 - beta) * ys[p] + beta * G(ys[p], xp)
            out[t, :, p] = torch.linalg.vector_norm(ys[p] - y, dim=1) / torch.linalg.vector_norm(xp - x, dim=1)
    return out, res, y


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_picard_probe_matches_side_by_side_loop(backend, dtype):
    G, x, d, z0 = _problem(dtype)
    eps, T, beta = 0.1, 8, 0.8
    tr = lipschitz_trace(G, x, directions=d, eps=eps, t_max=T, z0=z0, beta=beta, backend=backend)
    assert tr.backend == backend
    exp, res, y = _side_by_side(G, x, z0, d, eps, T, beta)
    # float32: the iterates themselves carry float32 rounding; compare loosely there.
    tol = TOL[F64] if dtype == F64 else dict(rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(tr.ratios.double(), exp, **tol)
    torch.testing.assert_close(tr.residual.double(), res, **tol)
    torch.testing.assert_close(tr.y.double(), y, **tol)


@pytest.mark.parametrize("backend", [b for b in AVAILABLE if b != "reference"])
@pytest.mark.parametrize("method", ["picard", "anderson"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_backend_probe_equals_reference(backend, method, dtype):
    G, x, d, z0 = _problem(dtype, seed=1)
    kw = dict(directions=d, eps=0.05, t_max=10, z0=z0, method=method, m=3)
    ref = lipschitz_trace(G, x, backend="reference", **kw)
    got = lipschitz_trace(G, x, backend=backend, **kw)
    assert got.backend == backend and got.method == method
    torch.testing.assert_close(got.ratios, ref.ratios, **TOL[dtype])
    torch.testing.assert_close(got.L, ref.L, **TOL[dtype])
    torch.testing.assert_close(got.residual, ref.residual, **TOL[dtype])
    torch.testing.assert_close(got.y, ref.y, **TOL[dtype])


@pytest.mark.parametrize("backend", AVAILABLE)
def test_readout_and_scaling_curve_on_backend(backend):
    G, x, d, z0 = _problem(F64, seed=2)
    R = torch.randn(12, 2, dtype=F64, generator=torch.Generator().manual_seed(9))
    readout = lambda y: y @ R  # noqa: E731
    kw = dict(directions=d, eps=0.1, z0=z0, readout=readout)
    tr = lipschitz_trace(G, x, t_max=6, backend=backend, **kw)
    ref = lipschitz_trace(G, x, t_max=6, backend="reference", **kw)
    torch.testing.assert_close(tr.ratios, ref.ratios, **TOL[F64])
    target = torch.zeros(3, 2, dtype=F64)
    metric = lambda a, b: torch.linalg.vector_norm(a - b)  # noqa: E731
    curve = scaling_curve(G, x, target, metric, [2, 6], backend=backend, **kw)
    assert curve.L == pytest.approx([float(ref.L[1]), float(ref.L[5])], rel=1e-10)
    _, _, y6 = _side_by_side(G, x, z0, d, 0.1, 6, 1.0)
    assert curve.metric[1] == pytest.approx(float(torch.linalg.vector_norm(y6 @ R)), rel=1e-9)


def test_auto_backend_is_the_solves():
    G, x, d, z0 = _problem(torch.float32)
    tr = lipschitz_trace(G, x, directions=d, t_max=2, z0=z0)
    expected = "cpp" if "cpp" in AVAILABLE else "reference"
    assert tr.backend == expected


def test_nonfinite_pair_only_on_backend():
    # A sample whose G turns NaN gets NaN ratios; its neighbours keep finite ones.
    def G(y, x):
        out = 0.5 * y + x
        return torch.where(x > 10, torch.full_like(out, float("nan")), out)

    x = torch.tensor([[1.0], [20.0]], dtype=F64)
    for backend in AVAILABLE:
        with pytest.warns(RuntimeWarning, match="non-finite"):
            tr = lipschitz_trace(G, x, directions=torch.ones(1, 1, dtype=F64), t_max=3, backend=backend)
        assert bool(torch.isfinite(tr.ratios[:, 0]).all()), backend
        assert bool(torch.isnan(tr.ratios[:, 1]).all()), backend
        # y_t = sum_{k<t} 0.5^k (x + eps d): ratio_t = sum_{k<t} 0.5^k exactly.
        torch.testing.assert_close(tr.ratios[:, 0, 0], torch.tensor([1.0, 1.5, 1.75], dtype=F64))


def test_exact_fixed_point_is_not_nan():
    # G constant in y: y_1 is already the fixed point; a sample frozen there (tol = 0
    # reached exactly) must keep its finite ratio, not turn NaN.
    G = lambda y, x: x.clone()  # noqa: E731
    x = torch.randn(2, 3, dtype=F64)
    for backend in AVAILABLE:
        for method in ("picard", "anderson"):
            tr = lipschitz_trace(G, x, t_max=4, method=method, backend=backend)
            torch.testing.assert_close(tr.ratios, torch.ones_like(tr.ratios), rtol=1e-12, atol=0)
            assert float(tr.residual.abs().max()) == 0.0


def test_bad_backend():
    G, x, d, z0 = _problem(F64)
    with pytest.raises(ValueError, match="backend must be"):
        lipschitz_trace(G, x, t_max=2, backend="fast")
    with pytest.raises(TypeError, match="did you mean|unexpected|unknown"):
        lipschitz_trace(G, x, t_max=2, backends="cpp")


def test_g_modifying_its_input_is_caught():
    x = torch.randn(2, 3)

    def G(y, x):
        return y.mul_(0.5).add_(x)

    with pytest.raises(RuntimeError, match="in place"):
        lipschitz_trace(G, x, t_max=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_probe_loop_makes_no_host_sync_on_gpu():
    """The syncs of a probe do not grow with t_max: none inside the loop."""
    G, x, d, z0 = _problem(torch.float32)
    x, d, z0 = x.cuda(), d.cuda(), z0.cuda()
    W = torch.randn(12, 12, device="cuda") * 0.05
    Gc = lambda z, x: torch.tanh(z @ W + x.sum(1, keepdim=True))  # noqa: E731

    def syncs(t_max):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                lipschitz_trace(Gc, x, directions=d, t_max=t_max, z0=z0)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(m.message) for m in w)

    for method_t in (5, 40):
        assert syncs(method_t) == syncs(5)
