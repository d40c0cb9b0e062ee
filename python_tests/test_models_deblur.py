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


def convergence_failures(ts, psnr_t, residual, blurred_psnr, L=None):
    """What is wrong with a deblurring scaling curve (empty list: nothing), at quick scale:
    the residual ||G(y_t) - y_t|| falls 100x from t = 1 and never rises again from t = 20
    on (1% + 1e-6 slack for rounding), PSNR rises >= 2 dB above both t = 1 and the blurred
    input and does not fall back > 1.5 dB from its best (drift past the trained horizon);
    with L: L_t rises >= 2x from t = 1 and saturates (L_200 <= 1.1 L_100)."""
    ts = list(ts)
    bad = []
    if not residual[-1] <= 0.01 * residual[0]:
        bad.append(f"residual fell only {residual[0]:.3g} -> {residual[-1]:.3g}")
    i20 = ts.index(20)
    for t, a, b in zip(ts[i20 + 1:], residual[i20:], residual[i20 + 1:]):
        if b > 1.01 * a + 1e-6:
            bad.append(f"residual rose to {b:.3g} at t = {t}")
    if not psnr_t[-1] >= psnr_t[0] + 2.0:
        bad.append(f"PSNR {psnr_t[0]:.2f} (t = 1) -> {psnr_t[-1]:.2f}")
    if not psnr_t[-1] >= blurred_psnr + 2.0:
        bad.append(f"PSNR {psnr_t[-1]:.2f} not 2 dB above the blurred input {blurred_psnr:.2f}")
    if not psnr_t[-1] >= max(psnr_t) - 1.5:
        bad.append(f"PSNR fell from its best {max(psnr_t):.2f} to {psnr_t[-1]:.2f}")
    if L is not None:
        if not L[-1] >= 2.0 * L[0]:
            bad.append(f"L_t rose only {L[0]:.3g} -> {L[-1]:.3g}")
        if not L[-1] <= 1.1 * L[ts.index(100)]:
            bad.append(f"L_t still growing: L_100 {L[ts.index(100)]:.3g}, L_{ts[-1]} {L[-1]:.3g}")
    return bad


def _curve(G, x, y):
    out = common.metric_and_residual(G, x, y, imp_fast.psnr, z0=torch.zeros_like(x), ts=deblur.EVAL_TS)
    return out["metric"], out["residual"]


@pytest.mark.parametrize("variant", ["pgd", "hqs"])
def test_contraction_loss_keeps_the_iteration_at_its_fixed_point(variant):
    """The quick recipe converges past its training horizon (T < 30, evaluated to t = 200);
    the same recipe without the contraction-aware loss, and the untrained operator (plain
    Landweber-like iteration), drift: the checks tell them apart."""
    cfg = deblur.SETTINGS["quick"]
    x, y = deblur.make_data(cfg["n_train"], seed=0)
    xt, yt = deblur.make_data(cfg["n_test"], seed=1)
    blurred = float(imp_fast.psnr(xt, yt))
    models = {}
    for name, weight in (("contraction", cfg["contraction"]), ("without", 0.0), ("untrained", None)):
        torch.manual_seed(0)
        G = deblur.DeblurG(variant)
        if weight is not None:
            losses = deblur.train_deblur(G, x, y, steps=cfg["steps"], batch=cfg["batch"], lr=cfg["lr"],
                                         t_range=cfg["t_range"], contraction=weight, n_power=cfg["n_power"])
            assert len(losses) == cfg["steps"] and all(math.isfinite(v) for v in losses)
        models[name] = G.eval()
    ok = convergence_failures(deblur.EVAL_TS, *_curve(models["contraction"], xt, yt), blurred)
    assert ok == [], ok
    for name in ("without", "untrained"):
        bad = convergence_failures(deblur.EVAL_TS, *_curve(models[name], xt, yt), blurred)
        assert any("residual rose" in b for b in bad), (name, bad)
    # the trained operator contracts at its fixed point; without the loss it does not
    assert float(deblur.contraction_at(models["contraction"], xt, 200).max()) < 1.0
    assert float(deblur.contraction_at(models["without"], xt, 200).max()) > 1.0


def test_contraction_penalty_estimates_the_spectral_norm():
    """Warm-started power iteration: one step per call, the steps add up across calls
    towards ||dG/dz||_2 (imp_fast.contraction_estimate; power iteration approaches it from
    below), and the penalty is differentiable in G's parameters."""
    torch.manual_seed(0)
    G = deblur.DeblurG("pgd")
    x, _ = deblur.make_data(3, seed=2)
    z = torch.rand_like(x)
    pen = common.ContractionPenalty(3, x.shape[1:], rho=0.5, weight=1.0, n_power=1)
    idx = torch.arange(3)
    ref = imp_fast.contraction_estimate(G, x, z, n_iter=200, tol=1e-8)
    loss = pen(G, x, z, idx)
    first = pen.last_sigma.clone()
    for _ in range(29):
        loss = pen(G, x, z, idx)
    gap_first, gap = (ref - first) / ref, (ref - pen.last_sigma) / ref
    assert bool((gap > -1e-4).all()) and bool((gap < 0.02).all()), (gap, ref)
    assert bool((gap < 0.5 * gap_first).all()), (gap_first, gap)  # the warm start carries over
    G.zero_grad()
    loss.backward()
    assert float(G.D.R[0].weight.grad.abs().sum()) > 0 and G.raw.grad is not None
    big = common.ContractionPenalty(3, x.shape[1:], rho=10.0, weight=1.0)
    assert float(big(G, x, z, idx).detach()) == 0.0  # below rho: no penalty


def test_cli_reproduce_quick(tmp_path):
    rc = imp_fast.cli.main(["reproduce", "deblur", "--quick", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("t", "L", "metric", "residual", "blurred_psnr", "metric_name", "eps", "sigma_at_t_max", "paper_L1"):
        assert key in res
    assert res["t"] == list(deblur.EVAL_TS)
    for key in ("L", "metric", "residual"):
        assert len(res[key]) == len(res["t"])
        assert all(v is not None and math.isfinite(v) for v in res[key])
    assert res["eps"] == 0.05 and math.isfinite(res["blurred_psnr"])
    # the trend: L_t rises from t = 1 and saturates, PSNR rises, residuals fall and keep falling
    bad = convergence_failures(res["t"], res["metric"], res["residual"], res["blurred_psnr"], L=res["L"])
    assert bad == [], bad
    assert res["sigma_at_t_max"]["max"] < 1.0
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
