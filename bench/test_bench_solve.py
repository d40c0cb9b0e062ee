"""Throughput of full solves: imp_fast backends against a plain torch loop and torchdeq.

f(z) = tanh(W z + x) with ||W||_2 = 0.9 at (B, D) = (8, 256) and (64, 4096). Every
solver runs exactly N_ITER iterations (tol far below reach), so time / N_ITER is the
cost of one iteration; "f alone" is the floor. Run: ``pytest bench/ --benchmark-only``.
"""
import pytest

import imp_fast
from imp_fast.backends import backend_status
from imp_fast.demo import make_problem

N_ITER = 60
SIZES = [(8, 256), (64, 4096)]
BACKENDS = [b for b, why in backend_status().items() if why is None and b != "triton"]

try:
    from torchdeq.solver import anderson_solver as tdeq_anderson
    from torchdeq.solver import fixed_point_iter as tdeq_fpi
except Exception:  # torchdeq is an optional baseline
    tdeq_anderson = tdeq_fpi = None


def _rounds(D):
    return 40 if D <= 256 else 5


def _run(benchmark, record_row, fn, *, solver, kind, B, D):
    benchmark.pedantic(fn, rounds=_rounds(D), iterations=1, warmup_rounds=1)
    ms = 1e3 * benchmark.stats.stats.min / N_ITER
    benchmark.extra_info["ms_per_iter"] = ms
    record_row(solver=solver, kind=kind, B=B, D=D, ms_per_iter=ms)


@pytest.mark.parametrize("B,D", SIZES)
def test_f_alone(benchmark, record_row, B, D):
    p = make_problem(B, D)

    def loop():
        z = p.z0()
        for _ in range(N_ITER):
            z = p.f(z)
        return z

    _run(benchmark, record_row, loop, solver="f alone", kind="f", B=B, D=D)


@pytest.mark.parametrize("B,D", SIZES)
def test_plain_damped_loop(benchmark, record_row, B, D):
    """What a hand-written loop with a per-sample residual costs (no statuses, no freeze)."""
    p = make_problem(B, D)

    def loop():
        z = p.z0()
        for _ in range(N_ITER):
            fz = p.f(z)
            res = (fz - z).norm(dim=1)
            z = fz
        return z, res

    _run(benchmark, record_row, loop, solver="plain torch loop", kind="picard", B=B, D=D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["picard", "anderson"])
@pytest.mark.parametrize("B,D", SIZES)
def test_imp_fast(benchmark, record_row, B, D, method, backend):
    p = make_problem(B, D)

    def run():
        r = imp_fast.solve(p.f, p.z0(), method=method, max_iter=N_ITER, tol=1e-30, m=5, backend=backend)
        assert r.iterations == N_ITER
        return r

    _run(benchmark, record_row, run, solver=f"imp_fast {method} [{backend}]", kind=method, B=B, D=D)


@pytest.mark.skipif(tdeq_anderson is None, reason="torchdeq not installed")
@pytest.mark.parametrize("name", ["anderson", "picard"])
@pytest.mark.parametrize("B,D", SIZES)
def test_torchdeq(benchmark, record_row, B, D, name):
    p = make_problem(B, D)
    fn = tdeq_anderson if name == "anderson" else tdeq_fpi

    def run():
        # return_final keeps torchdeq from stopping early; tol is unreachable anyway.
        return fn(p.f, p.z0(), max_iter=N_ITER, tol=1e-30, m=5, return_final=True)

    _run(benchmark, record_row, run, solver=f"torchdeq {'anderson_solver' if name == 'anderson' else 'fixed_point_iter'}",
         kind=name, B=B, D=D)
