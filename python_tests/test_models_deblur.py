"""Deblurring case study (imp_fast.models.deblur): data, blur operator, operator G, training, CLI."""
import json
import math

import pytest
import torch

import imp_fast
import imp_fast.cli
from imp_fast.models import common, deblur


def test_blur_is_symmetric():
    A = deblur.Blur().double()
    g = torch.Generator().manual_seed(1)
    u = torch.randn(3, 1, 32, 32, generator=g, dtype=torch.float64)
    v = torch.randn(3, 1, 32, 32, generator=g, dtype=torch.float64)
    lhs = (A(u) * v).sum()
    rhs = (u * A.adjoint(v)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-6, atol=1e-6)
    assert torch.allclose((A(u) * v).sum(), (u * A(v)).sum(), rtol=1e-6, atol=1e-6)


def test_blur_equals_direct_circular_convolution():
    k = deblur.gaussian_kernel(32, 1.0)
    assert math.isclose(float(k.sum()), 1.0, rel_tol=1e-12)
    u = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    direct = torch.zeros_like(u)
    for i in range(32):
        for j in range(32):
            if k[i, j] > 1e-14:
                direct += k[i, j] * torch.roll(u, shifts=(i, j), dims=(-2, -1))
    got = deblur.Blur()(u.float()).double()
    assert torch.allclose(got, direct, atol=1e-5)


def test_images_piecewise_constant_in_unit_range():
    y = deblur.make_images(6, seed=0)
    assert y.shape == (6, 1, 32, 32) and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    for img in y:
        assert 2 <= img.unique().numel() <= 7  # background + at most 6 shapes
        # piecewise constant: most neighbouring pixels are equal
        same = (img[:, 1:, :] == img[:, :-1, :]).float().mean()
        assert same > 0.7


def test_data_shapes_and_determinism():
    x1, y1 = deblur.make_data(4, seed=5)
    x2, y2 = deblur.make_data(4, seed=5)
    x3, _ = deblur.make_data(4, seed=6)
    assert x1.shape == y1.shape == (4, 1, 32, 32)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    # x = A y + noise with noise std 0.02
    noise = x1 - deblur.Blur()(y1)
    assert 0.01 < float(noise.std()) < 0.03


@pytest.mark.parametrize("variant", ["pgd", "hqs"])
def test_operator_shapes_and_near_nonexpansive_at_init(variant):
    torch.manual_seed(0)
    G = deblur.DeblurG(variant)
    x, _ = deblur.make_data(2, seed=0)
    y = torch.rand_like(x)
    assert G(y, x).shape == x.shape
    # The data step is non-expansive (||A|| = 1, gamma = 1 / the HQS factor b/(A^2+b) <= 1) and
    # D = I - R starts near the identity, so G is close to non-expansive in y at initialisation.
    mu = imp_fast.contraction_estimate(G, x, y, n_iter=10)
    assert bool((mu < 1.05).all()), mu


def test_quick_training_lowers_loss_and_iteration_settles():
    common.setup(0)
    x, y = deblur.make_data(32, seed=0)
    G = deblur.DeblurG("pgd")
    mse = torch.nn.functional.mse_loss
    before = common.eval_loss(G, mse, x, y, z0_fn=torch.zeros_like, T=6)
    losses = common.train(G, mse, x, y, z0_fn=torch.zeros_like, steps=30, batch=8,
                          lr=3e-3, t_range=(3, 8), k_grad=3, seed=0)
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    after = common.eval_loss(G, mse, x, y, z0_fn=torch.zeros_like, T=6)
    assert after < 0.9 * before, (before, after)
    # Within its training horizon the trained iteration settles: ||G(y_t) - y_t|| at t = 7
    # (what the last step of a T = 8 solve moves) is far below the first step ||G(0) - 0||.
    with torch.no_grad():
        xb = x[:4]
        res = imp_fast.solve(lambda z: G(z, xb), torch.zeros_like(xb), method="picard", max_iter=7,
                             tol=1e-30, stop="abs", check_every=None)
        assert bool(torch.isfinite(res.z).all())
        first = torch.linalg.vector_norm(G(torch.zeros_like(xb), xb).reshape(4, -1), dim=1)
        last = torch.linalg.vector_norm((G(res.z, xb) - res.z).reshape(4, -1), dim=1)
    assert bool((last < 0.1 * first).all()), (first, last)


def test_cli_reproduce_quick(tmp_path):
    rc = imp_fast.cli.main(["reproduce", "deblur", "--quick", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("t", "L", "metric", "residual", "blurred_psnr", "metric_name", "eps"):
        assert key in res
    assert res["t"] == list(common.EVAL_TS)
    for key in ("L", "metric", "residual"):
        assert len(res[key]) == len(res["t"])
        assert all(v is not None and math.isfinite(v) for v in res[key])
    assert res["eps"] == 0.05 and math.isfinite(res["blurred_psnr"])
    png = (tmp_path / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert (tmp_path / "deblur_pgd.pt").exists() and res["trained"] is True


def test_checkpoint_reused_unless_retrain_or_settings_change(tmp_path):
    calls = []
    m = torch.nn.Linear(2, 2)

    def fit():
        calls.append(1)
        return [1.0, 0.5]

    ckpt = tmp_path / "m.pt"
    assert common.load_or_train(ckpt, m, fit, False, {"a": 1})["trained"] is True
    w = m.weight.detach().clone()
    torch.nn.init.zeros_(m.weight)
    assert common.load_or_train(ckpt, m, fit, False, {"a": 1})["trained"] is False
    assert torch.equal(m.weight, w) and len(calls) == 1
    common.load_or_train(ckpt, m, fit, True, {"a": 1})
    common.load_or_train(ckpt, m, fit, False, {"a": 2})
    assert len(calls) == 3
