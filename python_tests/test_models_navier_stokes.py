"""Navier-Stokes case study (imp_fast.models.navier_stokes): PDE data, implicit FNO, training, CLI."""
import json
import math

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


def test_cli_reproduce_quick(tmp_path):
    rc = imp_fast.cli.main(["reproduce", "navier-stokes", "--quick", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("t", "L", "metric", "residual", "metric_name", "eps"):
        assert key in res
    assert res["t"] == list(common.EVAL_TS)
    for key in ("L", "metric", "residual"):
        assert len(res[key]) == len(res["t"])
        assert all(v is not None and math.isfinite(v) for v in res[key])
    png = (tmp_path / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert list(tmp_path.glob("ns_data_*.pt"))  # data cached in the run folder
