"""Scaling curves: L_t and a metric against t from one probe run; metrics; the PNG plot."""
import functools
import json

import pytest
import torch

from imp_fast.probes import lipschitz_trace
from imp_fast.scaling import ScalingCurve, plot_scaling_curve, psnr, relative_l2, scaling_curve

F64 = torch.float64


def _linear_problem(s=5, n=3, B=4, rho=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(s, s, generator=g, dtype=F64)
    A = rho * A / torch.linalg.matrix_norm(A, ord=2)
    Bm = torch.randn(s, n, generator=g, dtype=F64)
    x = torch.randn(B, n, generator=g, dtype=F64)

    def G(y, x):
        return y @ A.T + x @ Bm.T

    y_star = torch.linalg.solve(torch.eye(s, dtype=F64) - A, Bm @ x.T).T
    return A, Bm, x, G, y_star


def test_linear_L_t_and_falling_metric():
    A, Bm, x, G, y_star = _linear_problem()
    d = torch.randn(2, x.shape[1], dtype=F64)
    ts = [1, 2, 4, 8, 16, 32]
    z0 = torch.zeros(x.shape[0], A.shape[0], dtype=F64)
    curve = scaling_curve(G, x, y_star, relative_l2, ts, z0=z0, directions=d, eps=0.1)
    assert isinstance(curve, ScalingCurve)
    assert curve.t == ts and curve.metric_name == "relative_l2"
    # Exact L_t = max_p ||(sum_{k<t} A^k) B d_p|| / ||d_p||.
    S, Ak, exp = torch.zeros_like(A), torch.eye(A.shape[0], dtype=F64), {}
    for t in range(1, 33):
        S, Ak = S + Ak, Ak @ A
        exp[t] = float((torch.linalg.vector_norm(d @ (S @ Bm).T, dim=1) / d.norm(dim=1)).max())
    assert curve.L == pytest.approx([exp[t] for t in ts], rel=1e-10)
    # Metric = relative error of y_t, falls with t (y_t - y* = -A^t y*).
    m = curve.metric
    assert all(b < a for a, b in zip(m, m[1:]))
    assert m[-1] < 1e-3
    y = z0
    for t in range(1, 9):
        y = G(y, x)
        if t in ts:
            assert curve.metric[ts.index(t)] == pytest.approx(float(relative_l2(y, y_star)), rel=1e-12)
    # Residuals fall too, and equal the trace's.
    tr = lipschitz_trace(G, x, z0=z0, directions=d, eps=0.1, t_max=32)
    assert curve.residual == pytest.approx([float(tr.residual[t - 1].max()) for t in ts], rel=1e-12)
    assert curve.L == pytest.approx([float(tr.L[t - 1]) for t in ts], rel=0, abs=0)


def test_inverse_example_with_readout_and_psnr_and_anderson():
    eta = 0.5
    x = torch.linspace(0.5, 1.9, 15, dtype=F64)[:, None]  # (x = 2 would be exact at t = 1)

    def G(y, x):
        return y - eta * (x * y - 1)

    ts = [1, 3, 10, 30, 100]
    common = dict(directions=torch.ones(1, 1, dtype=F64), eps=1e-5)
    c = scaling_curve(G, x, 1 / x, relative_l2, ts, **common)
    assert c.L[0] == pytest.approx(0.0, abs=1e-9)
    assert c.L[-1] == pytest.approx(4.0, rel=0.01)  # max 1/x^2 at x = 0.5
    assert all(b < a for a, b in zip(c.metric, c.metric[1:]))
    # A readout (here doubling) scales L_t; psnr with options through functools.partial.
    # (up to t = 30: later some samples hit 1/x to the last bit and their PSNR is inf)
    p = scaling_curve(G, x, 2 / x, functools.partial(psnr, data_range=4.0), ts[:-1], readout=lambda y: 2 * y,
                      **common)
    assert p.metric_name == "psnr"
    assert p.L == pytest.approx([2 * v for v in c.L[:-1]], rel=1e-6, abs=1e-9)
    assert all(b > a for a, b in zip(p.metric, p.metric[1:]))
    a = scaling_curve(G, x, 1 / x, relative_l2, [5, 20], method="anderson", **common)
    assert a.method == "anderson" and a.metric[-1] < 1e-6


def test_to_dict_and_table():
    A, Bm, x, G, y_star = _linear_problem()
    z0 = torch.zeros(x.shape[0], A.shape[0], dtype=F64)
    curve = scaling_curve(G, x, y_star, relative_l2, [1, 5], z0=z0, n_probes=2,
                          generator=torch.Generator().manual_seed(0), metric_name="rel. L2")
    d = json.loads(json.dumps(curve.to_dict()))
    assert d["t"] == [1, 5] and len(d["L"]) == 2 and d["metric_name"] == "rel. L2"
    assert json.loads(curve.to_json())["metric"] == d["metric"]
    tab = curve.table()
    lines = tab.splitlines()
    assert lines[0].startswith("| t | L_t (max) | rel. L2 |") and len(lines) == 4
    assert lines[2].startswith("| 1 |")


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    curve = ScalingCurve(t=[1, 2, 5, 10], L=[0.5, 1.0, 1.8, 2.0], metric=[0.9, 0.5, 0.1, 0.01], residual=[1, 0.5, 0.1, 0.01])
    out = tmp_path / "curve.png"
    plot_scaling_curve(curve, out, title="test")
    data = out.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    out2 = tmp_path / "curve_log.png"
    plot_scaling_curve(curve, out2, log_metric=True)
    assert out2.stat().st_size > 1000
    with pytest.raises(TypeError, match="ScalingCurve"):
        plot_scaling_curve({"t": [1]}, tmp_path / "x.png")


def test_metrics():
    t = torch.ones(2, 4)
    assert float(relative_l2(t, t)) == 0.0
    assert float(relative_l2(t * 1.5, t)) == pytest.approx(0.5)
    assert float(psnr(t * 0.9, t)) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="shape"):
        relative_l2(t, torch.ones(2, 3))
    with pytest.raises(ValueError, match="data_range"):
        psnr(t, t, data_range=0)


def test_bad_arguments():
    x = torch.randn(2, 3, dtype=F64)

    def G(y, x):
        return 0.5 * y + x

    tgt = 2 * x
    with pytest.raises(ValueError, match="strictly increasing"):
        scaling_curve(G, x, tgt, relative_l2, [3, 2])
    with pytest.raises(ValueError, match="strictly increasing"):
        scaling_curve(G, x, tgt, relative_l2, [0, 2])
    with pytest.raises(ValueError, match="non-empty"):
        scaling_curve(G, x, tgt, relative_l2, [])
    with pytest.raises(TypeError, match="ints"):
        scaling_curve(G, x, tgt, relative_l2, [1.5])
    with pytest.raises(TypeError, match="metric must be callable"):
        scaling_curve(G, x, tgt, "rel", [1])
    with pytest.raises(TypeError, match="target"):
        scaling_curve(G, x, None, relative_l2, [1])
    with pytest.raises(ValueError, match="metric must return a float or a 0-d tensor"):
        scaling_curve(G, x, tgt, lambda p, t: (p - t).abs(), [1])
    with pytest.raises(TypeError, match=r"'tss'"):
        scaling_curve(G, x, tgt, relative_l2, [1], tss=[2])
    with pytest.raises(ValueError, match="eps"):
        scaling_curve(G, x, tgt, relative_l2, [1], eps=-1.0)
