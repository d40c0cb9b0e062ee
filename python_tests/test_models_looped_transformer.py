"""imp_fast.models.looped_transformer: reachability labels, locality, training, reproduce --quick."""
import json
import math

import pytest
import torch

from imp_fast.cli import main
from imp_fast.models import looped_transformer as lt


def _t(s):
    return torch.tensor([{".": 0, "#": 1, "S": 2}[ch] for ch in s])


@pytest.mark.parametrize("cells,expected", [
    ("................", "0000000000000000"),
    ("S...............", "1111111111111111"),
    ("..S..#..........", "1111100000000000"),
    ("....#..S.#......", "0000011110000000"),
    ("#S#.#S..S#.....#", "0100011110000000"),
    ("################", "0000000000000000"),
    ("...............S", "1111111111111111"),
    ("S#..............", "1000000000000000"),
])
def test_reachability_labels_on_hand_made_cases(cells, expected):
    lab = lt.reachability_labels(_t(cells))
    assert lab.tolist() == [int(c) for c in expected]
    # batched call agrees
    assert lt.reachability_labels(_t(cells).unsqueeze(0))[0].tolist() == lab.tolist()


def test_sampled_tokens_follow_the_probabilities():
    tok = lt.sample_tokens(4000, torch.Generator().manual_seed(0))
    assert tok.shape == (4000, lt.N_CELLS)
    assert abs((tok == lt.WALL).float().mean() - 0.2) < 0.01
    assert abs((tok == lt.SOURCE).float().mean() - 0.08) < 0.01


def test_information_travels_one_cell_per_loop():
    torch.manual_seed(0)
    model = lt.LoopedTransformer().eval()
    tok = lt.sample_tokens(4, torch.Generator().manual_seed(1))
    tok2 = tok.clone()
    tok2[:, 0] = (tok[:, 0] + 1) % 3
    for t in (1, 3):
        a = model.logits_per_t(tok, ts=(t,))[t]
        b = model.logits_per_t(tok2, ts=(t,))[t]
        assert torch.equal(a[:, t + 1:], b[:, t + 1:])  # cells farther than t cannot know yet
        assert not torch.allclose(a[:, :t + 1], b[:, :t + 1])


def test_quick_training_lowers_the_loss():
    torch.manual_seed(0)
    model = lt.LoopedTransformer()
    losses = lt.train(model, steps=40, batch=32, t_range=(4, 9), grad_loops=3, log=None)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


def test_reproduce_looped_transformer_quick_writes_results_and_png(tmp_path, capsys):
    assert main(["reproduce", "looped-transformer", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| t | token accuracy | sequence accuracy | separation |" in out
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["t"] == [1, 2, 4, 8, 16, 32]
    for key in ("token_accuracy", "sequence_accuracy", "separation"):
        assert len(res[key]) == 6 and all(math.isfinite(v) for v in res[key])
    assert all(0.0 <= v <= 1.0 for v in res["token_accuracy"] + res["sequence_accuracy"])
    assert all(0.0 <= v <= lt.N_CELLS for v in res["separation"])
    png = tmp_path / "looped_transformer_scaling.png"
    assert png.exists() and png.stat().st_size > 1000
