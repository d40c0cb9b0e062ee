"""Benchmark setup: one torch thread, and a markdown summary of ms/iteration at the end."""
import pytest
import torch

torch.set_num_threads(1)

_ROWS = []


@pytest.fixture
def record_row():
    def add(**row):
        _ROWS.append(row)

    return add


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    tr = terminalreporter
    tr.write_sep("=", "ms per iteration (min over rounds, 1 thread)")
    sizes = sorted({(r["B"], r["D"]) for r in _ROWS}, key=str)
    for B, D in sizes:
        rows = [r for r in _ROWS if (r["B"], r["D"]) == (B, D)]
        f_only = next((r["ms_per_iter"] for r in rows if r["solver"] == "f alone"), None)
        base = {r["kind"]: r["ms_per_iter"] for r in rows if r["solver"].startswith("torchdeq")}
        tr.write_line(f"\n(B, D) = ({B}, {D})")
        tr.write_line("| solver | ms/iter | overhead over f (ms) | speedup vs torchdeq |")
        tr.write_line("|---|---|---|---|")
        for r in rows:
            if r.get("overhead_ms") is not None:  # measured inside the run (time not spent in f)
                over = f"{r['overhead_ms']:.4f}"
            else:
                over = "" if f_only is None or r["solver"] == "f alone" else f"{r['ms_per_iter'] - f_only:.4f}"
            b = base.get(r["kind"])
            sp = f"{b / r['ms_per_iter']:.2f}x" if b and r["solver"] != "f alone" else ""
            tr.write_line(f"| {r['solver']} | {r['ms_per_iter']:.4f} | {over} | {sp} |")
