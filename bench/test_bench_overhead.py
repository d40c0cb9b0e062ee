"""Solver overhead over f at (B, D) = (64, 4096), measured with a cheap f.

With the dense f of test_bench_solve (25 ms per call on one thread) run-to-run noise in
f alone is larger than the solvers' overhead; here f(z) = tanh(U (V^T z) + x) with a
rank-16 W = U V^T (||W||_2 = 0.9) costs under 1 ms, so "solve - f alone" is the
solver's own per-iteration cost. Rows appear in the summary under (B, D) = (64, 4096*)
"""
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


def _run(benchmark, record_row, fn, solver, kind):
    benchmark.pedantic(fn, rounds=7, iterations=1, warmup_rounds=1)
    ms = 1e3 * benchmark.stats.stats.min / N_ITER
    benchmark.extra_info["ms_per_iter"] = ms
    record_row(solver=solver, kind=kind, B=B, D=LABEL, ms_per_iter=ms)


def test_overhead_f_alone(benchmark, record_row):
    f = _problem()

    def loop():
        z = torch.zeros(B, D)
        for _ in range(N_ITER):
            z = f(z)

    _run(benchmark, record_row, loop, "f alone", "f")


@pytest.mark.parametrize("backend", BACKENDS)
def test_overhead_imp_fast_anderson(benchmark, record_row, backend):
    f = _problem()

    def run():
        r = imp_fast.solve(f, torch.zeros(B, D), max_iter=N_ITER, tol=1e-30, m=5, backend=backend)
        assert r.iterations == N_ITER and not r.converged.any()

    _run(benchmark, record_row, run, f"imp_fast anderson [{backend}]", "anderson")


@pytest.mark.skipif(tdeq_anderson is None, reason="torchdeq not installed")
def test_overhead_torchdeq_anderson(benchmark, record_row):
    f = _problem()
    _run(benchmark, record_row,
         lambda: tdeq_anderson(f, torch.zeros(B, D), max_iter=N_ITER, tol=1e-30, m=5, return_final=True),
         "torchdeq anderson_solver", "anderson")
