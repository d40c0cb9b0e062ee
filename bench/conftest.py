"""Benchmark setup: one torch thread, and a markdown summary of ms/iteration at the end."""
import pytest
import torch

torch.set_num_threads(1)

_ROWS = []
_ACTIVE = []
_PROBES = []


@pytest.fixture
def record_probe():
    def add(**row):
        _PROBES.append(row)

    return add


def _probe_summary(tr):
    tr.write_sep("=", "Lipschitz probes: (64 x 9, 4096), rank-16 G, 40 steps (min over rounds, 1 thread)")
    tr.write_line("| run | backend | method | ms | / bare G loop |")
    tr.write_line("|---|---|---|---|---|")
    bare = next((r["ms"] for r in _PROBES if r["backend"] == ""), None)
    for r in _PROBES:
        ratio = f"{r['ms'] / bare:.2f}x" if bare else ""
        tr.write_line(f"| {r['what']} | {r['backend']} | {r['method']} | {r['ms']:.1f} | {ratio} |")


@pytest.fixture
def record_active():
    def add(**row):
        _ACTIVE.append(row)

    return add


def _active_summary(tr):
    tr.write_sep("=", "active sets: heterogeneous batch (64, 1024), full solves to tol (min over rounds, 1 thread)")
    tr.write_line("| solver | compact | ms | f-rows | time / whole-batch | f-rows / whole-batch | sum(n_i)/(B max n_i) |")
    tr.write_line("|---|---|---|---|---|---|---|")
    base = {r["method"]: r for r in _ACTIVE if r["compact"] is False}
    for r in _ACTIVE:
        b = base.get(r["method"])
        t = f"{r['ms'] / b['ms']:.2f}x" if b else ""
        fr = f"{r['f_rows'] / b['f_rows']:.2f}" if b else ""
        wr = "" if r["work_ratio"] is None else f"{r['work_ratio']:.2f}"
        c = "" if r["compact"] is None else ("yes" if r["compact"] else "no")
        tr.write_line(f"| {r['solver']} | {c} | {r['ms']:.1f} | {r['f_rows']} | {t} | {fr} | {wr} |")


@pytest.fixture
def record_row():
    def add(**row):
        _ROWS.append(row)

    return add


def pytest_terminal_summary(terminalreporter):
    if _PROBES:
        _probe_summary(terminalreporter)
    if _ACTIVE:
        _active_summary(terminalreporter)
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
