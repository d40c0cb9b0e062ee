"""The imp-fast command line."""
import subprocess
import sys

import pytest

from imp_fast.cli import main


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "imp_fast" in out and "torch" in out
    for name in ("reference", "cpp", "triton"):
        assert name in out


def test_demo_prints_a_table_with_speedups(capsys):
    assert main(["demo", "--batch", "2", "--dim", "16", "--repeats", "1", "--max-iter", "300"]) == 0
    out = capsys.readouterr().out
    assert "| imp_fast anderson | reference |" in out
    assert "| imp_fast picard | reference |" in out
    assert "ms/iter" in out


def test_console_script_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "imp_fast.cli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and "imp_fast" in res.stdout


def test_unknown_command_fails_cleanly():
    with pytest.raises(SystemExit) as ei:
        main(["frobnicate"])
    assert ei.value.code == 2
