"""Solver overhead over f at (B, D) = (64, 4096), measured with a cheap f.

With the dense f of test_bench_solve (25 ms per call on one thread) run-to-run noise in
f alone is larger than the solvers' overhead; here f(z) = tanh(U (V^T z) + x) with a
rank-16 W = U V^T (||W||_2 = 0.9) costs about 1 ms. Even so, f's time varies between
calls (its 1 MB outputs are fresh allocations: page faults), so "solve - f alone" is
noisy; the overhead column is measured inside each run instead: wall time minus the
time spent inside f (a timing wrapper around f), per iteration, min over rounds. Rows
appear in the summary under (B, D) = (64, 4096 low-rank f).
"""
import time

import pytest
import torch

import imp_fast
from imp_fast.backends import backend_status

N_ITER = 40
B, D = 64, 4096
LABEL = "4096 low-rank f"
BACKENDS = [b for b, why in backend_status().items() if why is None and b != "triton"]

try:
    from torchdeq.solver import anderson_solver as tdeq_anderson
except Exception:
    tdeq_anderson = None


def _problem():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(D, 16, generator=g)
    V = torch.randn(D, 16, generator=g)
    U = U * (0.9 / torch.linalg.matrix_norm(U @ V.T, 2))
    x = torch.randn(B, D, generator=g)
    return lambda z: torch.tanh(torch.addmm(x, z @ V, U.t()))


class _TimedF:
    """f with a stopwatch: ``seconds`` accumulates the time spent inside f."""

    def __init__(self, f):
        self.f, self.seconds = f, 0.0

    def __call__(self, z):
        t0 = time.perf_counter()
        out = self.f(z)
        self.seconds += time.perf_counter() - t0
        return out


def _run(benchmark, record_row, solve, solver, kind):
    """solve(f) runs N_ITER iterations of a solver on f; records ms/iteration and the
    in-run overhead (wall time not spent in f) per iteration, both min over rounds."""
    f = _TimedF(_problem())
    overheads = []

    def once():
        f.seconds = 0.0
        t0 = time.perf_counter()
        solve(f)
        overheads.append((time.perf_counter() - t0 - f.seconds) / N_ITER)

    benchmark.pedantic(once, rounds=7, iterations=1, warmup_rounds=1)
    ms = 1e3 * benchmark.stats.stats.min / N_ITER
    over = None if kind == "f" else 1e3 * min(overheads)
    benchmark.extra_info["ms_per_iter"] = ms
    benchmark.extra_info["overhead_ms_per_iter"] = over
    record_row(solver=solver, kind=kind, B=B, D=LABEL, ms_per_iter=ms, overhead_ms=over)


def test_overhead_f_alone(benchmark, record_row):
    def loop(f):
        z = torch.zeros(B, D)
        for _ in range(N_ITER):
            z = f(z)

    _run(benchmark, record_row, loop, "f alone", "f")


@pytest.mark.parametrize("backend", BACKENDS)
def test_overhead_imp_fast_anderson(benchmark, record_row, backend):
    def run(f):
        r = imp_fast.solve(f, torch.zeros(B, D), max_iter=N_ITER, tol=1e-30, m=5, backend=backend)
        assert r.iterations == N_ITER and not r.converged.any()

    _run(benchmark, record_row, run, f"imp_fast anderson [{backend}]", "anderson")


@pytest.mark.skipif(tdeq_anderson is None, reason="torchdeq not installed")
def test_overhead_torchdeq_anderson(benchmark, record_row):
    _run(benchmark, record_row,
         lambda f: tdeq_anderson(f, torch.zeros(B, D), max_iter=N_ITER, tol=1e-30, m=5, return_final=True),
         "torchdeq anderson_solver", "anderson")
