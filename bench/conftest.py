"""Benchmark setup: one torch thread, fixed glibc malloc thresholds, and markdown
summaries at the end."""
import ctypes
import ctypes.util
import sys
import time

import pytest
import torch

torch.set_num_threads(1)


def _pin_malloc_thresholds() -> bool:
    """Fixed glibc malloc thresholds for the whole benchmark process.

    torch's CPU allocator has no cache: every tensor is a malloc. glibc serves allocations
    above a *dynamic* threshold with fresh mmaps and returns freed memory at the top of
    the heap to the OS (trim), so whether a 9 MB tensor freed in one iteration is reused
    in the next, or faulted in page by page again, depends on the heap's history: the
    same bare ``y = G(y)`` loop measured 130 ms with no page faults and 230 ms with
    94 000, depending on what ran before it in the process. With the thresholds fixed
    (mmap only above 32 MB, no trimming) freed memory is reused, as a caching allocator
    would, and every row of a table pays the same allocator costs.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc
        return False


MALLOC_PINNED = _pin_malloc_thresholds()

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


_INTERLEAVED = []


def interleaved_round(runs, times):
    """One round of ``runs`` (name -> callable), one after another, each time appended to
    ``times[name]``. Used by the interleaved tables: the runs of a ratio alternate round
    after round, so both sides see the same state of this shared machine (it drifts by
    10-20% within a minute, more than the differences measured), and the ratio is taken
    between their minima."""
    for name, fn in runs.items():
        t0 = time.perf_counter()
        fn()
        times.setdefault(name, []).append(time.perf_counter() - t0)


@pytest.fixture
def record_interleaved():
    def add(**row):
        _INTERLEAVED.append(row)

    return add


def _interleaved_summary(tr):
    tr.write_sep("=", "interleaved ratios (runs alternate round after round; min over rounds, 1 thread)")
    tr.write_line("| table | run | baseline | ms | baseline ms | ratio | target | rounds |")
    tr.write_line("|---|---|---|---|---|---|---|---|")
    for r in _INTERLEAVED:
        tr.write_line(f"| {r['table']} | {r['run']} | {r['baseline']} | {r['ms']:.1f} | {r['base_ms']:.1f} | "
                      f"{r['ms'] / r['base_ms']:.2f}x | {r['target']} | {r['rounds']} |")


@pytest.fixture
def record_row():
    def add(**row):
        _ROWS.append(row)

    return add


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(
        "glibc malloc thresholds pinned (mmap above 32 MB, no trim)" if MALLOC_PINNED
        else "glibc malloc thresholds NOT pinned (not glibc): page-fault costs vary between runs")
    if _PROBES:
        _probe_summary(terminalreporter)
    if _ACTIVE:
        _active_summary(terminalreporter)
    if _INTERLEAVED:
        _interleaved_summary(terminalreporter)
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
