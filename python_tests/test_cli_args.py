"""imp-fast argument checks (issue 13, item 8): every numeric option of demo and of the four
reproduce cases is checked when the command line is parsed (argparse error naming the
option, exit status 2, nothing run), and an unusable --out is reported before training."""
import os

import pytest

import imp_fast.cli as cli
from imp_fast.cli import build_parser, main
from imp_fast.models import common
from imp_fast.models import looped_transformer as lt

CASES = ["deblur", "navier-stokes", "lp", "looped-transformer"]

NOT_POSITIVE_INT = ["0", "-5", "1.5", "abc", ""]
NOT_POSITIVE_FLOAT = ["0", "-1e-3", "nan", "inf", "-inf", "abc"]

BAD = [(["demo"], opt, v) for opt in ("--batch", "--dim", "--max-iter", "--repeats", "--threads")
       for v in NOT_POSITIVE_INT]
BAD += [(["demo"], "--tol", v) for v in NOT_POSITIVE_FLOAT]
BAD += [(["demo"], "--device", v) for v in ("tpu", "not a device", "cuda:99")]
for case in CASES:
    base = ["reproduce", case, "--quick"]
    BAD += [(base, "--threads", v) for v in NOT_POSITIVE_INT]
    BAD += [(base, "--seed", v) for v in ("-1", str(2 ** 32), "1.0", "x")]
    if case != "lp":
        BAD += [(base, "--steps", v) for v in NOT_POSITIVE_INT]
    if case != "looped-transformer":  # the cases that run Lipschitz probes choose their backend
        BAD += [(base, "--backend", v) for v in ("fast", "CPP", "")]
BAD += [(["reproduce", "lp", "--quick"], opt, v) for opt in ("--embedding", "--epochs") for v in NOT_POSITIVE_INT]
BAD += [(["reproduce", "lp", "--quick"], "--lr", v) for v in NOT_POSITIVE_FLOAT]


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if a command body starts (the error must come from parsing)."""
    def refuse(*a, **k):
        raise AssertionError("the command ran although an argument was bad")

    monkeypatch.setattr(cli, "_demo", refuse)
    monkeypatch.setattr(cli, "_reproduce", refuse)


@pytest.mark.parametrize("argv,opt,value", BAD, ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_numeric_option_is_a_parse_error_naming_it(tmp_path, capsys, argv, opt, value):
    with pytest.raises(SystemExit) as ei:
        main(argv + ["--out", str(tmp_path)] * (argv[0] == "reproduce") + [f"{opt}={value}"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {opt}:" in err, err
    assert "Traceback" not in err
    assert not os.listdir(tmp_path)  # nothing written


def test_negative_steps_do_not_train_or_save(tmp_path, capsys):
    """The issue's example: --steps -5 (separate argument) trained 0 steps and saved the model."""
    with pytest.raises(SystemExit) as ei:
        main(["reproduce", "deblur", "--quick", "--steps", "-5", "--out", str(tmp_path)])
    assert ei.value.code == 2
    assert "argument --steps: must be a positive integer (>= 1), got -5" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("argv,opt", [(["demo"], "--batch"), (["demo"], "--threads"),
                                      (["reproduce", "looped-transformer"], "--threads")])
def test_zero_is_rejected_before_any_work(tmp_path, capsys, nothing_runs, argv, opt):
    with pytest.raises(SystemExit) as ei:
        main(argv + ["--out", str(tmp_path)] * (argv[0] == "reproduce") + [opt, "0"])
    assert ei.value.code == 2 and f"argument {opt}:" in capsys.readouterr().err


def test_good_values_parse_to_numbers(tmp_path):
    p = build_parser()
    a = p.parse_args(["demo", "--batch", "1", "--dim", "3", "--max-iter", "1", "--tol", "1e-3", "--repeats", "1",
                      "--threads", "2", "--device", "cpu"])
    assert (a.batch, a.dim, a.max_iter, a.tol, a.repeats, a.threads, a.device) == (1, 3, 1, 1e-3, 1, 2, "cpu")
    a = p.parse_args(["reproduce", "lp", "--embedding", "4", "--epochs", "1", "--lr", "0.5", "--seed", "0",
                      "--threads", "1", "--out", str(tmp_path / "new" / "dir")])
    assert (a.embedding, a.epochs, a.lr, a.seed, a.threads) == (4, 1, 0.5, 0, 1)
    a = p.parse_args(["reproduce", "deblur", "--steps", "1", "--seed", str(2 ** 32 - 1), "--out", str(tmp_path)])
    assert (a.steps, a.seed) == (1, 2 ** 32 - 1)
    assert not (tmp_path / "new").exists()  # parsing makes no folder


# ----------------------------------------------------------------------------------------
# --out


@pytest.mark.parametrize("case", CASES)
def test_out_that_is_a_file_is_a_parse_error(tmp_path, capsys, nothing_runs, case):
    f = tmp_path / "file.txt"
    f.write_text("x")
    for out in (f, f / "sub"):
        with pytest.raises(SystemExit) as ei:
            main(["reproduce", case, "--quick", "--out", str(out)])
        assert ei.value.code == 2
        err = capsys.readouterr().err
        assert "argument --out:" in err and str(f) in err and "not a folder" in err, err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write to read-only folders")
def test_read_only_out_is_a_parse_error(tmp_path, capsys, nothing_runs):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        for out in (ro, ro / "sub"):
            with pytest.raises(SystemExit) as ei:
                main(["reproduce", "deblur", "--quick", "--out", str(out)])
            assert ei.value.code == 2 and "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_unwritable_out_found_at_run_time_is_reported_before_training(tmp_path, capsys, monkeypatch):
    """Parsing cannot see everything (a read-only file system, root-squashed NFS): the run
    writes a probe file first and stops with one message naming --out, before training."""
    monkeypatch.setattr(common, "output_dir", str)  # let the path through parsing
    monkeypatch.setattr(lt, "train", lambda *a, **k: pytest.fail("trained although --out is unusable"))
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    rc = main(["reproduce", "looped-transformer", "--quick", "--out", str(blocker / "sub")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "--out" in err and str(blocker / "sub") in err and "Traceback" not in err


def test_prepare_out_makes_the_folder_and_reports_a_file(tmp_path):
    out = common.prepare_out(tmp_path / "a" / "b")
    assert out.is_dir() and not os.listdir(out)  # the write probe is removed
    (tmp_path / "f").write_text("")
    with pytest.raises(common.ReproduceError, match="--out"):
        common.prepare_out(tmp_path / "f")


@pytest.mark.parametrize("case", ["deblur", "navier-stokes", "lp"])
def test_backend_option_is_parsed_for_the_probing_cases(case):
    """--backend is parsed for each case that runs Lipschitz probes; the looped
    transformer runs no Lipschitz probe and has no such option."""
    args = build_parser().parse_args(["reproduce", case, "--quick", "--backend", "reference"])
    assert args.backend == "reference"
    assert build_parser().parse_args(["reproduce", case, "--quick"]).backend == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["reproduce", "looped-transformer", "--quick", "--backend", "cpp"])


def test_unavailable_backend_is_refused_before_training(monkeypatch, tmp_path, capsys, nothing_runs):
    """A backend that cannot run here (e.g. triton without a GPU) is a parse error, not a
    traceback after minutes of training."""
    from imp_fast.backends import BackendUnavailable

    def unavailable(name, device):
        raise BackendUnavailable(f"backend {name!r} is not available: no CUDA device")

    monkeypatch.setattr(common, "get_backend", unavailable)
    with pytest.raises(SystemExit) as ei:
        main(["reproduce", "deblur", "--quick", "--out", str(tmp_path), "--backend", "triton"])
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "argument --backend: backend 'triton' is not available" in err and "Traceback" not in err
    assert not os.listdir(tmp_path)
