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


def test_unconditioned_tokens_follow_the_probabilities():
    tok = lt.sample_tokens(4000, torch.Generator().manual_seed(0), hard_radius=None)
    assert tok.shape == (4000, lt.N_CELLS)
    assert abs((tok == lt.WALL).float().mean() - lt.P_WALL) < 0.01
    assert abs((tok == lt.SOURCE).float().mean() - lt.P_SOURCE) < 0.01


def test_sampled_rows_are_ambiguous_at_the_hard_radius_and_deterministic():
    tok = lt.sample_tokens(300, torch.Generator().manual_seed(0))
    assert tok.shape == (300, lt.N_CELLS)
    assert torch.equal(tok, lt.sample_tokens(300, torch.Generator().manual_seed(0)))
    assert lt.ambiguous_rows(tok, lt.HARD_RADIUS).all()
    # most unconditioned rows are not ambiguous, so the condition does select
    free = lt.sample_tokens(2000, torch.Generator().manual_seed(1), hard_radius=None)
    assert lt.ambiguous_rows(free, lt.HARD_RADIUS).float().mean() < 0.3


@pytest.mark.parametrize("cells,radius,expected", [
    # cells 3 and 12 both see "....." but only the left one reaches the source
    ("S.....#.........", 2, True),
    ("S.....#........S", 2, False),  # every open cell reachable: labels all equal
    ("S.....#.........", 6, False),  # radius 6 tells the two segments apart
    ("..S..#..S..#..S.", 2, False),  # a source in every segment
])
def test_ambiguous_rows_on_hand_made_cases(cells, radius, expected):
    assert bool(lt.ambiguous_rows(_t(cells).unsqueeze(0), radius)[0]) is expected


def test_no_model_labels_a_hard_row_within_the_hard_radius():
    """Two cells with equal radius-2 views get equal outputs after 2 loops, whatever the
    weights; their labels differ, so the row is wrong at t <= 2."""
    torch.manual_seed(0)
    model = lt.LoopedTransformer().eval()
    tok = _t("S.....#.........").unsqueeze(0)  # cells 3 and 12 both see "....."
    out = model.logits_per_t(tok, ts=(1, 2))
    lab = lt.reachability_labels(tok)[0]
    assert lab[3] != lab[12]
    for t in (1, 2):
        torch.testing.assert_close(out[t][0, 3], out[t][0, 12])


def test_sample_tokens_rejects_bad_arguments():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="hard_radius"):
        lt.sample_tokens(4, g, hard_radius=8)
    with pytest.raises(ValueError, match="n must be"):
        lt.sample_tokens(-1, g)


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
    losses = lt.train(model, steps=60, batch=32, t_range=(8, 13), grad_loops=3, log=None)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


def trend_failures(res):
    """What is wrong with a probe result (empty: nothing): accuracy rises with the loops
    (token accuracy +0.15 from t = 1, sequence accuracy from 0 to >= 0.8; the rows cannot
    be solved within 2 loops), separation rises >= 1.3x, the residual falls 100x and
    does not rise over the last loops."""
    bad = []
    tok, seq, sep, r = res["token_accuracy"], res["sequence_accuracy"], res["separation"], res["residual"]
    if not tok[-1] >= tok[0] + 0.15:
        bad.append(f"token accuracy {tok[0]:.3f} -> {tok[-1]:.3f}")
    if not (seq[0] == 0.0 and seq[-1] >= 0.8):
        bad.append(f"sequence accuracy {seq[0]:.3f} -> {seq[-1]:.3f}")
    if not sep[-1] >= 1.3 * sep[0]:
        bad.append(f"separation {sep[0]:.2f} -> {sep[-1]:.2f}")
    if not r[-1] <= 0.01 * r[0]:
        bad.append(f"residual fell only {r[0]:.3g} -> {r[-1]:.3g}")
    if not r[-1] <= r[-2]:
        bad.append(f"residual rose {r[-2]:.3g} -> {r[-1]:.3g}")
    return bad


def test_reproduce_looped_transformer_quick_writes_results_and_png(tmp_path, capsys):
    # --steps 150: the quick recipe's 30 steps check the plumbing; 150 (about 5 s) learn the task
    assert main(["reproduce", "looped-transformer", "--quick", "--steps", "150", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| t | token accuracy | sequence accuracy | separation | residual |" in out
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["t"] == [1, 2, 4, 8, 16, 32]
    for key in ("token_accuracy", "sequence_accuracy", "separation", "residual"):
        assert len(res[key]) == 6 and all(math.isfinite(v) for v in res[key])
    assert all(0.0 <= v <= 1.0 for v in res["token_accuracy"] + res["sequence_accuracy"])
    assert all(0.0 <= v <= lt.N_CELLS for v in res["separation"])
    bad = trend_failures(res)
    assert bad == [], bad
    png = tmp_path / "looped_transformer_scaling.png"
    assert png.exists() and png.stat().st_size > 1000

    # the checks fail an untrained model, and the trained one once its z-path is made expansive
    torch.manual_seed(0)
    model = lt.LoopedTransformer()
    bad = trend_failures(lt.probe(model, 256, seed=1))
    assert any("accuracy" in b for b in bad), bad
    model.load_state_dict(torch.load(tmp_path / "looped_transformer_quick.pt", weights_only=True)["model"])
    assert trend_failures(lt.probe(model, 256, seed=1)) == []
    with torch.no_grad():
        model.inject.weight[:, :model.d].mul_(8.0)
    bad = trend_failures(lt.probe(model, 256, seed=1))
    assert any("residual" in b for b in bad), bad


def test_reproduce_reuses_its_checkpoint_only_for_the_same_data(tmp_path, capsys, monkeypatch):
    args = ["reproduce", "looped-transformer", "--quick", "--out", str(tmp_path)]
    assert main(args) == 0
    assert main(args) == 0
    assert "loaded checkpoint" in capsys.readouterr().out
    monkeypatch.setattr(lt, "P_WALL", 0.3)  # another row distribution: the checkpoint does not apply
    assert main(args) == 0
    assert "made with other settings: retraining" in capsys.readouterr().out
