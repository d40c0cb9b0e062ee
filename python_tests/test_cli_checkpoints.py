"""imp-fast reproduce with bad files in --out: corrupt checkpoints give one clear error
(issue 13, item 6), and checkpoints and data caches are loaded without running code
(weights_only; item 7)."""
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from imp_fast.cli import main
from imp_fast.models import common

# checkpoint each case's --quick run looks for in --out
CKPT = {
    "looped-transformer": "looped_transformer_quick.pt",
    "deblur": "deblur_pgd.pt",
    "navier-stokes": "navier_stokes_fno.pt",
    "lp": "implicit_d16_quick.pt",
}


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _real_checkpoint() -> bytes:
    m = torch.nn.Linear(64, 64)
    return _torch_bytes({"model": m.state_dict(), "meta": {"a": 1}, "train_seconds": 1.0})


BAD_FILES = {
    "garbage": lambda: bytes(range(256)) * 4,
    "text": lambda: b"this is not a checkpoint\n",
    "empty": lambda: b"",
    "truncated": lambda: _real_checkpoint()[:700],
    "truncated-tail": lambda: _real_checkpoint()[:-40],
    "list": lambda: _torch_bytes([1, 2, 3]),
    "tensor": lambda: _torch_bytes(torch.zeros(3)),
    "dict-without-model": lambda: _torch_bytes({"meta": {"seed": 0}}),
    "model-not-a-state-dict": lambda: _torch_bytes({"model": [1, 2], "meta": {}}),
}


def _check_clean_error(err: str, path) -> None:
    assert "Traceback" not in err, err
    assert str(path) in err, err
    assert "--retrain" in err and "delete" in err, err
    assert len(err.strip().splitlines()) <= 2, err


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_checkpoint_is_reported_with_how_to_retrain(tmp_path, capsys, kind):
    ckpt = tmp_path / CKPT["looped-transformer"]
    data = BAD_FILES[kind]()
    ckpt.write_bytes(data)
    rc = main(["reproduce", "looped-transformer", "--quick", "--out", str(tmp_path)])
    assert rc == 1
    _check_clean_error(capsys.readouterr().err, ckpt)
    assert ckpt.read_bytes() == data  # left as it was for the user to look at
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("case", ["deblur", "navier-stokes", "lp"])
def test_every_case_reports_a_corrupt_checkpoint(tmp_path, capsys, case):
    ckpt = tmp_path / CKPT[case]
    ckpt.write_bytes(b"\x80\x04garbage" * 20)
    assert main(["reproduce", case, "--quick", "--out", str(tmp_path)]) == 1
    _check_clean_error(capsys.readouterr().err, ckpt)


def test_checkpoint_directory_in_place_of_the_file(tmp_path, capsys):
    ckpt = tmp_path / CKPT["looped-transformer"]
    ckpt.mkdir()
    assert main(["reproduce", "looped-transformer", "--quick", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    _check_clean_error(err, ckpt)
    assert "cannot be read" in err


def test_console_script_exits_nonzero_without_traceback(tmp_path):
    ckpt = tmp_path / CKPT["looped-transformer"]
    ckpt.write_bytes(_real_checkpoint()[:500])
    res = subprocess.run([sys.executable, "-m", "imp_fast.cli", "reproduce", "looped-transformer", "--quick",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res
    _check_clean_error(res.stderr, ckpt)


def test_retrain_replaces_a_corrupt_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / CKPT["looped-transformer"]
    ckpt.write_bytes(b"")
    assert main(["reproduce", "looped-transformer", "--quick", "--steps", "2", "--retrain", "--out",
                 str(tmp_path)]) == 0
    state = torch.load(ckpt, weights_only=True)
    assert state["meta"]["steps"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [ckpt.name, "results.json", "looped_transformer_scaling.png"])  # no temporary file left behind


def test_checkpoint_that_does_not_fit_the_model(tmp_path):
    ckpt = tmp_path / "m.pt"
    assert common.load_or_train(ckpt, torch.nn.Linear(2, 2), lambda: [1.0], False, {"a": 1})["trained"]
    other = torch.nn.Linear(3, 3)
    w = other.weight.detach().clone()
    with pytest.raises(common.CheckpointError, match=r"does not fit the model.*--retrain"):
        common.load_or_train(ckpt, other, lambda: [1.0], False, {"a": 1})
    assert torch.equal(other.weight, w)  # not half-loaded


def test_saved_checkpoint_is_weights_only_with_json_meta(tmp_path):
    ckpt = tmp_path / "m.pt"
    common.load_or_train(ckpt, torch.nn.Linear(2, 2), lambda: [2.0, 1.0], False,
                         {"t_range": (2, 6), "name": "x", "lr": 1e-3, "flag": True})
    state = torch.load(ckpt, weights_only=True)
    assert state["meta"] == {"t_range": [2, 6], "name": "x", "lr": 1e-3, "flag": True}
    json.dumps(state["meta"])
    assert set(state["model"]) == {"weight", "bias"}
    # the tuple in the meta compares equal to the list stored: the checkpoint is reused
    info = common.load_or_train(ckpt, torch.nn.Linear(2, 2), lambda: [0.0], False,
                                {"t_range": (2, 6), "name": "x", "lr": 1e-3, "flag": True})
    assert info["trained"] is False and info["loss_first"] == 2.0


# ----------------------------------------------------------------------------------------
# item 7: a crafted pickle must not run


class _Exploit:
    """Unpickling this calls open(path, "w"): it creates a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("where", ["model", "meta"])
def test_crafted_checkpoint_does_not_run_code(tmp_path, capsys, where):
    marker = tmp_path / "pwned.txt"
    ckpt = tmp_path / CKPT["looped-transformer"]
    payload = {"model": {}, "meta": {}}
    payload[where] = _Exploit(marker)
    torch.save(payload, ckpt)
    rc = main(["reproduce", "looped-transformer", "--quick", "--out", str(tmp_path)])
    assert not marker.exists(), "loading the checkpoint ran code"
    assert rc == 1
    err = capsys.readouterr().err
    _check_clean_error(err, ckpt)
    assert "could run code" in err


def test_crafted_navier_stokes_data_cache_is_not_unpickled(tmp_path, capsys):
    from imp_fast.models import navier_stokes as ns

    marker = tmp_path / "pwned.txt"
    path = tmp_path / "cache.pt"
    torch.save({"meta": {}, "x": _Exploit(marker)}, path)
    x, y = ns.cached_data(path, 3, 0, 5)
    assert not marker.exists(), "loading the data cache ran code"
    assert x.shape == y.shape == (3, 1, 32, 32)
    assert str(path) in capsys.readouterr().err  # the bad cache is named, then regenerated
    blob = torch.load(path, weights_only=True)
    assert torch.equal(blob["x"], x)
    x2, _ = ns.cached_data(path, 3, 0, 5)  # reused now
    assert torch.equal(x2, x) and "loaded cached data" in capsys.readouterr().out


def test_crafted_lp_data_cache_is_not_unpickled(tmp_path, capsys):
    from imp_fast.models import lp

    marker = tmp_path / "pwned.txt"
    torch.save({"key": {}, "train": _Exploit(marker)}, tmp_path / "lp_data.pt")
    train, test = lp.load_or_make_data(tmp_path, 4, 2, 0)
    assert not marker.exists(), "loading the data cache ran code"
    assert train["y"].shape == (4, lp.N_VARS) and test["y"].shape == (2, lp.N_VARS)
    assert "lp_data.pt" in capsys.readouterr().err


def test_corrupt_data_cache_is_regenerated(tmp_path, capsys):
    from imp_fast.models import lp

    (tmp_path / "lp_data.pt").write_bytes(b"")
    train, _ = lp.load_or_make_data(tmp_path, 4, 2, 0)
    assert "regenerating" in capsys.readouterr().err
    assert torch.equal(torch.load(tmp_path / "lp_data.pt", weights_only=True)["train"]["y"], train["y"])


def test_interrupted_save_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    ckpt = tmp_path / "m.pt"
    good = _real_checkpoint()
    ckpt.write_bytes(good)

    def boom(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        common.save_torch_file({"x": 1}, ckpt)
    assert ckpt.read_bytes() == good
    assert os.listdir(tmp_path) == ["m.pt"]
