"""imp_fast.models.lp: LP data, graph batching, Table 1 sizes, training, reproduce --quick."""
import json
import math

import numpy as np
import pytest
import torch

from imp_fast.cli import main
from imp_fast.models import lp


@pytest.fixture(scope="module")
def small_data():
    torch.set_num_threads(1)
    return lp.make_dataset(60, seed=3)


def test_generated_lps_are_feasible_and_labels_satisfy_constraints(small_data):
    d = small_data
    assert d["y"].shape == (60, lp.N_VARS) and d["rows"].shape == (60, lp.NNZ)
    for i in range(d["y"].shape[0]):
        inst = {k: v[i].numpy() for k, v in d.items()}
        A = lp.dense_A(inst)
        assert np.count_nonzero(A) == lp.NNZ  # 100 distinct nonzeros
        y, b, eq = inst["y"], inst["b"], inst["eq"]
        Ay = A @ y
        assert np.all(Ay[~eq] <= b[~eq] + 1e-6)
        assert np.allclose(Ay[eq], b[eq], atol=1e-6)
        assert np.all(y >= inst["l"] - 1e-7) and np.all(y <= inst["u"] + 1e-7)
        assert np.all(inst["l"] <= inst["u"])
    # the generator's distribution: some equality rows, tiny costs
    assert 0.1 < d["eq"].double().mean() < 0.5
    assert d["c"].abs().max() <= 0.01


def test_infeasible_lp_is_rejected():
    inst = dict(rows=np.array([0, 0]), cols=np.array([0, 1]), vals=np.array([1.0, 1.0]),
                eq=np.array([False] * lp.M_CONS), b=np.full(lp.M_CONS, -5.0), c=np.zeros(lp.N_VARS),
                l=np.zeros(lp.N_VARS), u=np.ones(lp.N_VARS))
    assert lp.solve_lp(inst) is None  # y0 + y1 <= -5 with y >= 0


def test_graph_batching_round_trips(small_data):
    rows, cols = small_data["rows"][:7], small_data["cols"][:7]
    r, c = lp.batch_graphs(rows, cols)
    assert r.shape == (7 * lp.NNZ,) and int(r.max()) < 7 * lp.M_CONS and int(c.max()) < 7 * lp.N_VARS
    # edges of instance i only touch instance i's nodes
    inst = torch.arange(7).repeat_interleave(lp.NNZ)
    assert torch.equal(r // lp.M_CONS, inst) and torch.equal(c // lp.N_VARS, inst)
    r2, c2 = lp.split_graphs(r, c, 7)
    assert torch.equal(r2, rows) and torch.equal(c2, cols)


def test_message_passing_matches_dense_matrix_product():
    torch.manual_seed(0)
    conv = lp.BipartiteConv(4)
    B, m, n, E = 3, lp.M_CONS, lp.N_VARS, lp.NNZ
    rows = torch.stack([torch.randperm(m * n)[:E] for _ in range(B)])
    rows, cols = rows // n, rows % n
    vals = torch.randn(B, E)
    hc, hv = torch.randn(B * m, 4), torch.randn(B * n, 4)
    r, c = lp.batch_graphs(rows, cols)
    out = conv(hv, hc, c, r, vals.reshape(-1))  # v -> c
    # dense reference: agg_i = sum_j A_ij msg([hv_j, hc_i])
    ref = []
    for b in range(B):
        A = torch.zeros(m, n)
        A[rows[b], cols[b]] = vals[b]
        hcb, hvb = hc[b * m:(b + 1) * m], hv[b * n:(b + 1) * n]
        pair = torch.cat([hvb.unsqueeze(0).expand(m, n, 4), hcb.unsqueeze(1).expand(m, n, 4)], dim=-1)
        agg = (A.unsqueeze(-1) * conv.msg(pair)).sum(1)
        ref.append(hcb + conv.upd(torch.cat([hcb, agg], dim=-1)))
    torch.testing.assert_close(out, torch.cat(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d,explicit,implicit", [(4, 580, 722), (8, 2088, 2350), (16, 7888, 8390), (32, 30624, 31606)])
def test_parameter_counts_equal_table_1(d, explicit, implicit):
    assert lp.n_params(lp.LPGNN(d, implicit=False)) == explicit
    assert lp.n_params(lp.LPGNN(d, implicit=True)) == implicit
    assert lp.PAPER_TABLE[d]["explicit_params"] == explicit and lp.PAPER_TABLE[d]["implicit_params"] == implicit


def test_implicit_model_is_batch_invariant(small_data):
    torch.manual_seed(0)
    model = lp.LPGNN(8, implicit=True).eval()
    x = lp.flat_features(small_data)[:5]
    rows, cols = small_data["rows"][:5], small_data["cols"][:5]
    with torch.no_grad():
        full = model(x, rows, cols, T=3)
        single = torch.cat([model(x[i:i + 1], rows[i:i + 1], cols[i:i + 1], T=3) for i in range(5)])
    torch.testing.assert_close(full, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implicit", [False, True])
def test_quick_training_lowers_the_loss(small_data, implicit):
    torch.manual_seed(0)
    model = lp.LPGNN(8, implicit=implicit)
    losses = lp.train_model(model, small_data, epochs=6, batch=20, lr=3e-3, t_range=(3, 5), grad_steps=2,
                            log=None)
    assert losses[-1] < losses[0]


def trend_failures(error, L, residual):
    """What is wrong with an LP scaling probe, t = 0..12 (empty: nothing): the error falls
    to <= 0.6x its t = 0 value and is not above its t = 1 value at the end; L_t rises >= 1.5x
    from t = 1 for some feature; the residual ||G(y_t) - y_t|| falls to <= 0.3x its t = 0
    value and ends below its t = 1 value."""
    bad = []
    if not (error[-1] <= 0.6 * error[0] and error[-1] <= error[1] + 0.01):
        bad.append(f"error {error[0]:.3f} (t = 0), {error[1]:.3f} (t = 1) -> {error[-1]:.3f}")
    rise = max(L[f][-1] / max(L[f][1], 1e-12) for f in lp.FEATURES)
    if not rise >= 1.5:
        bad.append(f"L_t rose at most {rise:.2f}x from t = 1")
    if not (residual[-1] <= 0.3 * residual[0] and residual[-1] <= residual[1]):
        bad.append(f"residual {residual[0]:.3g} (t = 0), {residual[1]:.3g} (t = 1) -> {residual[-1]:.3g}")
    return bad


def test_reproduce_lp_quick_writes_results_and_png(tmp_path, capsys):
    assert main(["reproduce", "lp", "--quick", "--table", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| t | error |" in out and "| residual |" in out and "Table 1 analogue" in out
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("t", "error", "L", "residual", "params", "table"):
        assert key in res
    assert res["t"] == list(range(13)) and len(res["error"]) == 13 and len(res["residual"]) == 13
    assert set(res["L"]) == set(lp.FEATURES)
    for name in lp.FEATURES:
        assert len(res["L"][name]) == 13 and res["L"][name][0] == 0.0
        assert all(math.isfinite(v) for v in res["L"][name])
    assert all(math.isfinite(v) and v >= 0 for v in res["error"] + res["residual"])
    # the trend: error falls, L_t rises, the iteration moves less and less
    bad = trend_failures(res["error"], res["L"], res["residual"])
    assert bad == [], bad
    assert [r["embedding"] for r in res["table"]] == [4, 8, 16, 32]
    for r in res["table"]:
        assert r["implicit_params"] == lp.PAPER_TABLE[r["embedding"]]["implicit_params"]
        assert r["explicit_params"] == lp.PAPER_TABLE[r["embedding"]]["explicit_params"]
        assert math.isfinite(r["implicit_error"]) and math.isfinite(r["explicit_error"])
    png = tmp_path / "lp_scaling.png"
    assert png.exists() and png.stat().st_size > 1000
    assert (tmp_path / "lp_data.pt").exists()  # cached for the next run

    # the checks fail an untrained model, and the trained one made expansive in y
    train, test = lp.load_or_make_data(tmp_path, 60, 16, 0)
    torch.manual_seed(0)
    model = lp.LPGNN(16, implicit=True)
    _, error, L, residual = lp.scaling_probe(model, test, t_max=12, n_dirs=2)
    bad = trend_failures(error, L, residual)
    assert any("error" in b for b in bad) and any("L_t" in b for b in bad), bad
    model.load_state_dict(torch.load(tmp_path / "implicit_d16_quick.pt", weights_only=True)["model"])
    with torch.no_grad():
        model.yfeat[0].weight.mul_(3.0)
        model.convs[1].upd[0].weight.mul_(3.0)
    _, error, L, residual = lp.scaling_probe(model, test, t_max=12, n_dirs=2)
    bad = trend_failures(error, L, residual)
    assert any("residual" in b for b in bad) and any("error" in b for b in bad), bad
