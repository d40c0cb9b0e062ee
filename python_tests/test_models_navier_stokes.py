"""Navier-Stokes case study (imp_fast.models.navier_stokes): PDE data, implicit FNO, training, CLI."""
import json
import math

import pytest
import torch

import imp_fast
import imp_fast.cli
from imp_fast.models import common
from imp_fast.models import navier_stokes as ns


def test_forcing_spectrum_and_std():
    f = ns.gaussian_forcing(3, seed=0)
    assert f.shape == (3, 32, 32) and f.dtype == torch.float64
    assert torch.allclose(f.std(dim=(-2, -1)), torch.full((3,), 0.5, dtype=torch.float64))
    assert float(f.mean(dim=(-2, -1)).abs().max()) < 1e-12
    power = torch.fft.fft2(f).abs().sum(0)
    k = torch.fft.fftfreq(32, d=1.0 / 32, dtype=torch.float64)
    kk = torch.sqrt(k.view(-1, 1) ** 2 + k.view(1, -1) ** 2)
    outside = (kk == 0) | (kk > 4)
    assert float(power[outside].max()) < 1e-9 * float(power.max())


def test_solver_reaches_steady_state():
    f = ns.gaussian_forcing(3, seed=1)
    solver = ns.VorticitySolver()
    w = solver.run(f, steps=1500)
    assert w.shape == f.shape and bool(torch.isfinite(w).all())
    dwdt = solver.time_derivative(w, f)
    ratio = torch.linalg.vector_norm(dwdt.reshape(3, -1), dim=1) / torch.linalg.vector_norm(w.reshape(3, -1), dim=1)
    assert float(ratio.max()) < 1e-5, ratio
    assert float(w.std()) > 0.1  # a nontrivial field
    # the advection term matters (the steady state is not the linear response)
    lin = torch.fft.irfft2(torch.fft.rfft2(f) / (-solver.lin), s=(32, 32))
    assert float(torch.linalg.vector_norm(w - lin)) > 1e-2 * float(torch.linalg.vector_norm(w))


def test_data_shapes_and_determinism():
    x1, y1 = ns.make_data(3, seed=4, steps=100)
    x2, y2 = ns.make_data(3, seed=4, steps=100)
    x3, _ = ns.make_data(3, seed=5, steps=100)
    assert x1.shape == y1.shape == (3, 1, 32, 32) and x1.dtype == torch.float32
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)


def test_fno_contractive_at_init():
    torch.manual_seed(0)
    G = ns.ImplicitFNO(width=8, modes=4)
    x = ns.gaussian_forcing(3, seed=0).unsqueeze(1).float()
    z = torch.rand(3, 8, 32, 32)
    assert G(z, x).shape == z.shape and G.decode(z).shape == x.shape
    mu = imp_fast.contraction_estimate(G, x, z, n_iter=30)
    assert bool((mu < 1.0).all()), mu
    res = imp_fast.solve(lambda zz: G(zz, x), G.z0(x), method="anderson", max_iter=100, tol=1e-5)
    assert res.ok


def test_quick_training_lowers_loss():
    common.setup(0)
    x, y = ns.make_data(16, seed=0, steps=300)
    G = ns.ImplicitFNO(width=8, modes=4)
    before = common.eval_loss(G, imp_fast.relative_l2, x, y, z0_fn=G.z0, readout=G.decode, T=6)
    losses = common.train(G, imp_fast.relative_l2, x, y, z0_fn=G.z0, readout=G.decode, steps=25, batch=8,
                          lr=1e-2, t_range=(3, 8), k_grad=3, seed=0)
    assert all(math.isfinite(v) for v in losses)
    after = common.eval_loss(G, imp_fast.relative_l2, x, y, z0_fn=G.z0, readout=G.decode, T=6)
    assert after < 0.8 * before, (before, after)


def trend_failures(ts, L, err, residual):
    """What is wrong with a Navier-Stokes scaling curve at quick scale (empty: nothing): L_t
    rises >= 1.5x from t = 1, the rel. L2 error falls >= 10%, the residual falls 1000x
    and never rises from t = 20 on (1% + 1e-5 slack for float32 rounding)."""
    ts = list(ts)
    bad = []
    if not L[-1] >= 1.5 * L[0]:
        bad.append(f"L_t rose only {L[0]:.3g} -> {L[-1]:.3g}")
    if not err[-1] <= 0.9 * err[0]:
        bad.append(f"error fell only {err[0]:.3g} -> {err[-1]:.3g}")
    if not residual[-1] <= 1e-3 * residual[0]:
        bad.append(f"residual fell only {residual[0]:.3g} -> {residual[-1]:.3g}")
    i20 = ts.index(20)
    for t, a, b in zip(ts[i20 + 1:], residual[i20:], residual[i20 + 1:]):
        if b > 1.01 * a + 1e-5:
            bad.append(f"residual rose to {b:.3g} at t = {t}")
    return bad


def _quick_model_and_data():
    cfg = ns.SETTINGS["quick"]
    x, y = ns.make_data(cfg["n_train"] + cfg["n_test"], seed=0, steps=cfg["solver_steps"])
    return cfg, x[:cfg["n_train"]], y[:cfg["n_train"]], x[cfg["n_train"]:], y[cfg["n_train"]:]


def test_untrained_or_expansive_models_fail_the_trend_checks():
    cfg, x, y, xt, yt = _quick_model_and_data()
    d = imp_fast.fourier_directions((1, 32, 32), common.FREQUENCIES, k_max=ns.K_MAX)

    def failures(G):
        c = common.evaluate(G, xt, yt, imp_fast.relative_l2, z0=G.z0(xt), readout=G.decode, directions=d,
                            metric_name="rel. L2")
        return trend_failures(c.t, c.L, c.metric, c.residual)

    common.setup(0)
    G = ns.ImplicitFNO(cfg["width"], cfg["modes"]).eval()
    bad = failures(G)  # untrained: the output hardly depends on x, nothing improves with t
    assert any("L_t rose only" in b for b in bad) and any("error fell only" in b for b in bad), bad
    common.train(G, imp_fast.relative_l2, x, y, z0_fn=G.z0, readout=G.decode, steps=cfg["steps"], batch=cfg["batch"],
                 lr=cfg["lr"], t_range=(3, 10), k_grad=3, seed=0)
    G.eval()
    assert failures(G) == []
    with torch.no_grad():  # an expansive z-path: the iteration leaves its fixed point
        G.pointwise.weight.mul_(6.0)
    bad = failures(G)
    assert any("residual" in b for b in bad), bad


def test_target_lipschitz_matches_the_linear_response_for_small_forcing():
    """For a weak forcing the steady state is nearly the linear response f_k / (nu |k|^2 + alpha):
    the true map's ratio along a Fourier mode is its gain at that |k|."""
    x = 0.01 * ns.gaussian_forcing(2, seed=3).unsqueeze(1).float()
    for k in (1.0, 6.0):
        d = torch.zeros(1, 1, 32, 32, dtype=torch.float64)
        d[0, 0] = torch.cos(k * torch.arange(32, dtype=torch.float64) * 2 * math.pi / 32).view(1, 32)
        d = d / d.norm()
        L = ns.target_lipschitz(x, d, eps=0.01, steps=1500)
        assert L == pytest.approx(1.0 / (ns.NU * k * k + ns.ALPHA), rel=0.02), (k, L)


def test_cli_reproduce_quick(tmp_path):
    rc = imp_fast.cli.main(["reproduce", "navier-stokes", "--quick", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("t", "L", "metric", "residual", "metric_name", "eps", "L_t full grid", "L_target"):
        assert key in res
    assert res["t"] == list(common.EVAL_TS)
    for key in ("L", "metric", "residual", "L_t full grid"):
        assert len(res[key]) == len(res["t"])
        assert all(v is not None and math.isfinite(v) for v in res[key])
    # the trend: L_t (forcing band) rises from t = 1, the error falls, the residual falls
    bad = trend_failures(res["t"], res["L"], res["metric"], res["residual"])
    assert bad == [], bad
    # the true map is far less sensitive on the full grid's (high |k|) modes than on the forcing band
    assert res["L_target"]["full_grid"] < 0.5 * res["L_target"]["band"]
    png = (tmp_path / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert list(tmp_path.glob("ns_data_*.pt"))  # data cached in the run folder
