"""Lipschitz probes: exact L_t on linear maps, the paper's 1/x example, in-loop vs
re-run equality, contraction estimates against explicit Jacobians, Fourier directions,
warnings and argument errors."""
import math
import warnings

import pytest
import torch

from imp_fast.probes import (
    LipschitzTrace,
    contraction_estimate,
    fourier_directions,
    fourier_radii,
    lipschitz_trace,
)

F64 = torch.float64


def _linear(s=6, n=4, B=3, rho=0.8, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(s, s, generator=g, dtype=F64)
    A = rho * A / torch.linalg.matrix_norm(A, ord=2)
    Bm = torch.randn(s, n, generator=g, dtype=F64)
    x = torch.randn(B, n, generator=g, dtype=F64)

    def G(y, x):
        return y @ A.T + x @ Bm.T

    return A, Bm, x, G


def _expected_linear(A, Bm, d, t_max):
    """||(sum_{k<t} A^k) B d|| / ||d|| for t = 1..t_max, d: (P, n) -> (t_max, P)."""
    S = torch.zeros_like(A)
    Ak = torch.eye(A.shape[0], dtype=A.dtype)
    out = []
    for _ in range(t_max):
        S = S + Ak
        Ak = Ak @ A
        out.append(torch.linalg.vector_norm(d @ (S @ Bm).T, dim=1) / torch.linalg.vector_norm(d, dim=1))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------
# L_t values


@pytest.mark.parametrize("eps", [0.05, 3.0])
def test_linear_exact_all_t(eps):
    A, Bm, x, G = _linear()
    B, n = x.shape
    d = torch.randn(3, n, dtype=F64)  # shared directions, not unit
    T = 25
    tr = lipschitz_trace(G, x, directions=d, eps=eps, t_max=T, z0=torch.zeros(B, A.shape[0], dtype=F64))
    assert isinstance(tr, LipschitzTrace)
    assert tr.ratios.shape == (T, B, 3) and tr.L.shape == (T,) and tr.residual.shape == (T, B)
    assert tr.t.tolist() == list(range(1, T + 1))
    exp = _expected_linear(A, Bm, d, T)  # (T, P), same for every sample (linear map)
    torch.testing.assert_close(tr.ratios, exp[:, None, :].expand(T, B, 3), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tr.L, exp.amax(dim=1), rtol=1e-10, atol=1e-12)
    # L_t tends to the fixed-point map's ||(I - A)^{-1} B d|| / ||d|| (0.8^25 ~ 4e-3 left).
    lim = torch.linalg.solve(torch.eye(A.shape[0], dtype=F64) - A, Bm @ d.T).norm(dim=0) / d.norm(dim=1)
    torch.testing.assert_close(tr.L[-1], lim.max(), rtol=0.02, atol=0)


def test_linear_per_sample_directions_and_mean():
    A, Bm, x, G = _linear(B=2)
    d = torch.randn(2, *x.shape, dtype=F64)  # (P, B, n)
    T = 8
    tr = lipschitz_trace(G, x, directions=d, eps=0.1, t_max=T, reduce="mean", z0=torch.zeros(2, A.shape[0], dtype=F64))
    for b in range(2):
        exp = _expected_linear(A, Bm, d[:, b], T)
        torch.testing.assert_close(tr.ratios[:, b, :], exp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tr.L, tr.ratios.reshape(T, -1).mean(dim=1))


def test_linear_readout_and_residual():
    A, Bm, x, G = _linear()
    C = torch.randn(2, A.shape[0], dtype=F64)
    d = torch.randn(2, x.shape[1], dtype=F64)
    T = 10
    z0 = torch.zeros(x.shape[0], A.shape[0], dtype=F64)
    tr = lipschitz_trace(G, x, directions=d, t_max=T, z0=z0, readout=lambda y: y @ C.T)
    S = torch.zeros_like(A)
    Ak = torch.eye(A.shape[0], dtype=F64)
    y = z0.clone()
    for t in range(T):
        S = S + Ak
        Ak = Ak @ A
        exp = torch.linalg.vector_norm(d @ (C @ S @ Bm).T, dim=1) / torch.linalg.vector_norm(d, dim=1)
        torch.testing.assert_close(tr.ratios[t], exp[None].expand(x.shape[0], 2), rtol=1e-10, atol=1e-12)
        y = G(y, x)
        torch.testing.assert_close(tr.residual[t], torch.linalg.vector_norm(G(y, x) - y, dim=1))
    torch.testing.assert_close(tr.y, y)


def test_inverse_example_L1_and_limit():
    """Paper: G(y, x) = y - eta (x y - 1) has fixed point 1/x; L_t -> |d(1/x)/dx| = 1/x^2."""
    eta = 0.5
    x = torch.tensor([[0.5], [1.0], [1.5]], dtype=F64)

    def G(y, x):
        return y - eta * (x * y - 1)

    d = torch.ones(1, 1, dtype=F64)
    tr = lipschitz_trace(G, x, directions=d, eps=1e-5, t_max=120)
    # y_1 = G(0, x) = eta does not depend on x: L_1 is G(0, .)'s Lipschitz constant, 0.
    h = 1e-5
    lip_G0 = ((G(torch.zeros_like(x), x + h) - G(torch.zeros_like(x), x)).abs() / h).squeeze(1)
    torch.testing.assert_close(tr.ratios[0, :, 0], lip_G0, atol=1e-12, rtol=0)
    # y_2 = 2 eta - eta^2 x is linear in x: L_2 = eta^2 exactly (the first x-dependence).
    torch.testing.assert_close(tr.ratios[1, :, 0], torch.full((3,), eta ** 2, dtype=F64))
    # Closed form y_t = (1 - (1 - eta x)^t) / x: compare every t with its finite difference.
    t = torch.arange(1, 121, dtype=F64)[:, None]
    yt = lambda xx: (1 - (1 - eta * xx) ** t) / xx
    fd = ((yt(x[:, 0] + 1e-5) - yt(x[:, 0])) / 1e-5).abs()
    torch.testing.assert_close(tr.ratios[:, :, 0], fd, rtol=1e-6, atol=1e-9)
    # Large t: within a few % of 1/x^2 (the steep end converges slowest: |1 - eta x| = 0.75).
    torch.testing.assert_close(tr.ratios[-1, :, 0], 1 / x[:, 0] ** 2, rtol=0.01, atol=0)
    # L_t grows towards max 1/x^2 = 4 and the error falls.
    assert tr.L[0] < tr.L[9] < tr.L[-1]
    assert abs(float(tr.L[-1]) - 4.0) < 0.04
    assert float(tr.residual[-1].max()) < 1e-10
    torch.testing.assert_close(tr.y, 1 / x, rtol=1e-10, atol=0)
    assert tr.L_at(2) == pytest.approx(eta ** 2) and tr.L_at(120) == float(tr.L[-1])
    with pytest.raises(ValueError, match="t_max = 120"):
        tr.L_at(121)


@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_in_loop_equals_rerun(method):
    torch.manual_seed(1)
    W = 0.4 * torch.randn(5, 5)
    U = torch.randn(5, 3)

    def G(z, x):
        return torch.tanh(z @ W.T + x @ U.T)

    x = torch.randn(4, 3)
    z0 = torch.zeros(4, 5)
    kw = dict(n_probes=3, eps=0.1, z0=z0, method=method, beta=0.8, m=3, generator=None)
    full = lipschitz_trace(G, x, t_max=12, **{**kw, "generator": torch.Generator().manual_seed(5)})
    for t in (1, 2, 5, 9, 12):
        part = lipschitz_trace(G, x, t_max=t, **{**kw, "generator": torch.Generator().manual_seed(5)})
        assert torch.equal(full.ratios[t - 1], part.ratios[-1])
        assert torch.equal(full.ratios[:t], part.ratios)
        assert torch.equal(full.residual[:t], part.residual)
        assert torch.equal(full.L[:t], part.L)
    assert torch.equal(full.y, part.y)


def test_matches_manual_side_by_side_loop():
    """Independent check: run x and x + eps d through plain Picard, compare the ratios."""
    torch.manual_seed(2)
    W = 0.5 * torch.randn(4, 4, dtype=F64)

    def G(z, x):
        return torch.tanh(z @ W.T + x)

    x = torch.randn(3, 4, dtype=F64)
    d = torch.randn(2, 4, dtype=F64)
    eps, T, beta = 0.05, 15, 0.7
    tr = lipschitz_trace(G, x, directions=d, eps=eps, t_max=T, beta=beta)
    for p in range(2):
        xp = x + eps * d[p]
        y, yp = torch.zeros_like(x), torch.zeros_like(x)
        for t in range(T):
            y = (1 - beta) * y + beta * G(y, x)
            yp = (1 - beta) * yp + beta * G(yp, xp)
            exp = torch.linalg.vector_norm(yp - y, dim=1) / torch.linalg.vector_norm(xp - x, dim=1)
            torch.testing.assert_close(tr.ratios[t, :, p], exp, rtol=1e-9, atol=1e-12)


def test_random_directions_reproducible_and_batch_invariant():
    torch.manual_seed(3)
    W = 0.5 * torch.randn(6, 6)

    def G(z, x):
        return torch.tanh(z @ W.T + x)

    x = torch.randn(5, 6)
    a = lipschitz_trace(G, x, t_max=6, generator=torch.Generator().manual_seed(0))
    b = lipschitz_trace(G, x, t_max=6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.ratios, b.ratios)
    assert a.ratios.shape == (6, 5, 4)
    # Directions are shared across samples: a sample's numbers do not depend on the batch.
    c = lipschitz_trace(G, x[2:3], t_max=6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(c.ratios[:, 0], a.ratios[:, 2], rtol=1e-5, atol=1e-6)


def test_dtype_float64_probe_and_image_shape():
    # State with the shape of x (images), float32 input, probe in float64.
    x = torch.rand(2, 1, 8, 8)

    def G(y, x):
        assert y.dtype == F64 and x.dtype == F64
        return 0.5 * torch.roll(y, 1, dims=-1) + x

    d = fourier_directions(x.shape[1:], dtype=F64)
    tr = lipschitz_trace(G, x, directions=d, t_max=4, dtype=F64, eps=1e-6)
    assert tr.ratios.dtype == F64 and tr.y.dtype == F64
    # Linear in x: ratio_t = ||sum_{k<t} (0.5 R)^k d|| / ||d|| (R = roll), for every sample.
    v, acc = d.clone(), torch.zeros_like(d)
    for t in range(4):
        acc = acc + v
        v = 0.5 * torch.roll(v, 1, dims=-1)
        exp = torch.linalg.vector_norm(acc.reshape(5, -1), dim=1)
        torch.testing.assert_close(tr.ratios[t], exp[None].expand(2, 5), rtol=1e-7, atol=0)
    torch.testing.assert_close(tr.ratios[0], torch.ones(2, 5, dtype=F64))


def test_nonfinite_marks_nan_and_warns():
    def G(y, x):
        out = 0.5 * y + x
        return torch.where(x > 10, torch.full_like(out, float("nan")), out)

    x = torch.tensor([[1.0], [20.0]], dtype=F64)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        tr = lipschitz_trace(G, x, directions=torch.ones(1, 1, dtype=F64), t_max=3)
    assert bool(torch.isfinite(tr.ratios[:, 0]).all())
    assert bool(torch.isnan(tr.ratios[:, 1]).all())


# ---------------------------------------------------------------------------------------
# warnings and errors


def test_small_eps_warns_in_float32_not_float64():
    x = torch.randn(4, 16)

    def G(y, x):
        return 0.5 * y + x

    with pytest.warns(UserWarning, match="dtype=torch.float64") as rec:
        lipschitz_trace(G, x, eps=1e-5, t_max=2)
    assert rec[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lipschitz_trace(G, x, eps=0.05 * float(x.norm(dim=1).min()), t_max=2)
        lipschitz_trace(G, x, eps=1e-5, t_max=2, dtype=F64)


def test_bad_arguments():
    x = torch.randn(2, 3)

    def G(y, x):
        return 0.5 * y + x

    with pytest.raises(TypeError, match="G must be callable"):
        lipschitz_trace(3, x)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lipschitz_trace(G, [1.0, 2.0])
    with pytest.raises(ValueError, match="eps"):
        lipschitz_trace(G, x, eps=0)
    with pytest.raises(ValueError, match="t_max"):
        lipschitz_trace(G, x, t_max=0)
    with pytest.raises(ValueError, match="n_probes"):
        lipschitz_trace(G, x, n_probes=0)
    with pytest.raises(ValueError, match="method"):
        lipschitz_trace(G, x, method="newton")
    with pytest.raises(ValueError, match="reduce"):
        lipschitz_trace(G, x, reduce="min")
    with pytest.raises(ValueError, match="beta"):
        lipschitz_trace(G, x, beta=2.5)
    with pytest.raises(TypeError, match="dtype"):
        lipschitz_trace(G, x, dtype=torch.int32)
    with pytest.raises(TypeError, match="generator"):
        lipschitz_trace(G, x, generator=0)
    with pytest.raises(TypeError, match="readout must be callable"):
        lipschitz_trace(G, x, readout="id")
    with pytest.raises(TypeError, match=r"'t_mx' \(did you mean 't_max'\?\)"):
        lipschitz_trace(G, x, t_mx=3)
    with pytest.raises(ValueError, match=r"directions must have shape \(P, \*x.shape\[1:\]\)"):
        lipschitz_trace(G, x, directions=torch.randn(2, 4))
    with pytest.raises(ValueError, match="nonzero"):
        lipschitz_trace(G, x, directions=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="z0 must have x's batch size 2"):
        lipschitz_trace(G, x, z0=torch.zeros(3, 3))
    # State shape differs from x and z0 left out: the error says to pass z0.
    Wt = torch.randn(5, 3)
    with pytest.raises(ValueError, match="pass z0"):
        lipschitz_trace(lambda y, x: y @ Wt.T, x, t_max=2)
    with pytest.raises(TypeError, match="probe dtype"):
        lipschitz_trace(lambda y, x: (0.5 * y + x).float(), x, t_max=2, dtype=F64)
    with pytest.raises(ValueError, match="readout must return a tensor with the batch"):
        lipschitz_trace(G, x, t_max=2, readout=lambda y: y.sum())


# ---------------------------------------------------------------------------------------
# Fourier directions


def test_fourier_directions_unit_norm_and_frequencies():
    shape = (2, 16, 12)
    qs = (0.1, 0.3, 0.5, 0.7, 0.9)
    d = fourier_directions(shape, qs, dtype=F64, device="cpu")
    assert d.shape == (5,) + shape and d.dtype == F64
    torch.testing.assert_close(torch.linalg.vector_norm(d.reshape(5, -1), dim=1), torch.ones(5, dtype=F64))
    # The requested radial frequencies: percentiles of |k| over the nonzero modes.
    ky = torch.fft.fftfreq(16, d=1 / 16, dtype=F64)
    kx = torch.fft.fftfreq(12, d=1 / 12, dtype=F64)
    R = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    r = R.flatten()
    r = r[r > 0]
    expected = torch.stack([torch.quantile(r, q, interpolation="nearest") for q in qs])
    radii = fourier_radii(16, 12, qs)
    torch.testing.assert_close(radii, expected)
    assert bool((radii[1:] > radii[:-1]).all())
    for p in range(5):
        spec = torch.fft.fft2(d[p, 0]).abs()
        assert torch.allclose(d[p, 0], d[p, 1])  # same mode in every leading channel
        on = spec > 1e-9 * spec.max()
        # All energy on modes of radius |k| = radii[p] (the pair +k, -k).
        assert bool(torch.isclose(R[on], radii[p]).all()), (p, R[on], radii[p])
        assert 1 <= int(on.sum()) <= 2


def test_fourier_directions_k_max_takes_percentiles_of_the_band():
    qs = (0.1, 0.5, 0.9)
    radii = fourier_radii(32, 32, qs, k_max=4)
    ky = torch.fft.fftfreq(32, d=1 / 32, dtype=F64)
    R = torch.sqrt(ky[:, None] ** 2 + ky[None, :] ** 2).flatten()
    band = R[(R > 0) & (R <= 4)]
    expected = torch.stack([torch.quantile(band, q, interpolation="nearest") for q in qs])
    torch.testing.assert_close(radii, expected)
    assert float(radii.max()) <= 4.0 < float(fourier_radii(32, 32, qs)[0])  # full grid starts above the band
    d = fourier_directions((1, 32, 32), qs, k_max=4, dtype=F64)
    for p in range(len(qs)):
        spec = torch.fft.fft2(d[p, 0]).abs()
        on = spec > 1e-9 * spec.max()
        R2 = torch.sqrt(ky[:, None] ** 2 + ky[None, :] ** 2)
        assert bool(torch.isclose(R2[on], radii[p]).all())
    with pytest.raises(ValueError, match="k_max"):
        fourier_directions((8, 8), k_max=0.5)
    with pytest.raises(ValueError, match="k_max"):
        fourier_radii(8, 8, qs, k_max=float("nan"))


def test_fourier_directions_default_dtype_and_errors():
    d = fourier_directions((8, 8))
    assert d.shape == (5, 8, 8) and d.dtype == torch.float32
    with pytest.raises(ValueError, match="frequencies"):
        fourier_directions((8, 8), (0.5, 1.5))
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W\)"):
        fourier_directions((8,))
    with pytest.raises(TypeError, match="shape"):
        fourier_directions("8x8")


# ---------------------------------------------------------------------------------------
# contraction estimate


def _tanh_layer(n=6, scale=0.6, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    W = scale * torch.randn(n, n, generator=g, dtype=dtype) / math.sqrt(n) * 2
    U = torch.randn(n, n, generator=g, dtype=dtype)

    def G(z, x):
        return torch.tanh(z @ W.T + x @ U.T)

    return G


def _explicit_sigma(G, x, z):
    out = []
    for b in range(x.shape[0]):
        J = torch.autograd.functional.jacobian(lambda zz: G(zz[None], x[b : b + 1])[0], z[b])
        out.append(torch.linalg.svdvals(J.reshape(z[b].numel(), -1))[0])
    return torch.stack(out)


def test_contraction_matches_explicit_jacobian():
    G = _tanh_layer()
    x = torch.randn(4, 6, dtype=F64)
    z = torch.randn(4, 6, dtype=F64)
    exp = _explicit_sigma(G, x, z)
    est = contraction_estimate(G, x, z, n_iter=500, tol=1e-13, generator=torch.Generator().manual_seed(0))
    assert est.shape == (4,) and est.dtype == F64
    torch.testing.assert_close(est, exp, rtol=1e-5, atol=1e-10)
    fd = contraction_estimate(G, x, z, n_iter=500, tol=1e-13, finite_difference=True, fd_eps=1e-6,
                              generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fd, exp, rtol=1e-3, atol=1e-6)


def test_contraction_image_state_float32_and_linear():
    # Linear G on a (B, C, H, W) state: sigma_max of the known matrix.
    A = torch.randn(12, 12)
    A = 0.9 * A / torch.linalg.matrix_norm(A, ord=2)

    def G(z, x):
        return (z.reshape(z.shape[0], -1) @ A.T).reshape(z.shape) + x

    x = torch.randn(3, 3, 2, 2)
    z = torch.randn(3, 3, 2, 2)
    est = contraction_estimate(G, x, z, n_iter=300, tol=1e-7)
    assert est.dtype == torch.float32
    torch.testing.assert_close(est, torch.full((3,), 0.9), rtol=1e-3, atol=0)
    fd = contraction_estimate(G, x, z, n_iter=300, tol=1e-7, finite_difference=True, fd_eps=1e-2)
    torch.testing.assert_close(fd, torch.full((3,), 0.9), rtol=1e-2, atol=0)


def test_contraction_bad_arguments():
    G = _tanh_layer()
    x = torch.randn(2, 6, dtype=F64)
    with pytest.raises(ValueError, match="batch size"):
        contraction_estimate(G, x, torch.randn(3, 6, dtype=F64))
    with pytest.raises(ValueError, match="n_iter"):
        contraction_estimate(G, x, x, n_iter=0)
    with pytest.raises(ValueError, match="fd_eps"):
        contraction_estimate(G, x, x, finite_difference=True, fd_eps=0.0)
    with pytest.raises(TypeError, match="finite_difference"):
        contraction_estimate(G, x, x, finite_difference="yes")
    with pytest.raises(TypeError, match="unknown keyword"):
        contraction_estimate(G, x, x, iters=3)
