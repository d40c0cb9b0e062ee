"""Active sets (issue 18): a batch whose samples need very different iteration counts.

f(z; s, x) = tanh(s * (z W) + x), W symmetric with ||W||_2 = 0.995, per-sample scale s
from 0.2 to 1.0, x ~ 0.1 N(0, 1), (B, D) = (64, 1024), tol 1e-6 (rel), cpp backend,
check_every 5 (imp_fast.demo.make_heterogeneous_problem, also `imp-fast demo --adaptive`).
Picard needs 8..~190 iterations per sample and Anderson (m=5) 7..~70, so
on the whole batch most f work goes to samples that are already done. Each row is a
full solve to tol; "f-rows" counts the rows f was evaluated on. torchdeq's solvers on
the same batch (they stop when the whole batch meets tol) are shown beside them.
test_active_sets_interleaved measures the targets' ratios with whole-batch and compacted
solves alternating round after round, beside the floor (f alone on the compacted solve's
working-set sizes).

Run: ``pytest bench/test_bench_active_sets.py --benchmark-only``.
"""
import time

import pytest
import torch
from conftest import interleaved_round

import imp_fast
from imp_fast.backends import backend_status
from imp_fast.demo import make_heterogeneous_problem

B, D, TOL, MAX_ITER = 64, 1024, 1e-6, 3000
BACKEND = "cpp" if backend_status()["cpp"] is None else "reference"

try:
    from torchdeq.solver import anderson_solver as tdeq_anderson
    from torchdeq.solver import broyden_solver as tdeq_broyden
    from torchdeq.solver import fixed_point_iter as tdeq_fpi
except Exception:  # torchdeq is an optional baseline
    tdeq_anderson = tdeq_broyden = tdeq_fpi = None


def heterogeneous_batch():
    p = make_heterogeneous_problem(B, D)
    rows = [0]

    def f(z, s, x):
        rows[0] += z.shape[0]
        return p.f(z, s, x)

    return f, (p.s, p.x), rows


@pytest.mark.parametrize("method", ["picard", "anderson", "broyden"])
@pytest.mark.parametrize("compact", [False, True], ids=["whole-batch", "compact"])
def test_active_sets(benchmark, record_active, method, compact):
    f, args, rows = heterogeneous_batch()
    z0 = torch.zeros(B, D)

    def run():
        rows[0] = 0
        return imp_fast.solve(f, z0, args=args, method=method, tol=TOL, max_iter=MAX_ITER,
                              m=5 if method == "anderson" else None,
                              compact=compact, backend=BACKEND)

    r = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    assert r.ok
    n = r.n_iter
    record_active(solver=f"imp_fast {method} [{BACKEND}]", method=method, compact=compact,
                  ms=1e3 * benchmark.stats.stats.min, f_rows=rows[0], iterations=r.iterations,
                  n_min=int(n.min()), n_max=int(n.max()), work_ratio=float(n.sum()) / (B * int(n.max())))


@pytest.mark.skipif(tdeq_anderson is None, reason="torchdeq not installed")
@pytest.mark.parametrize("method", ["picard", "anderson", "broyden"])
def test_torchdeq_same_batch(benchmark, record_active, method):
    f, args, rows = heterogeneous_batch()
    fn = {"anderson": tdeq_anderson, "broyden": tdeq_broyden, "picard": tdeq_fpi}[method]
    kw = dict(m=5) if method == "anderson" else {}

    def run():
        rows[0] = 0
        return fn(lambda z: f(z, *args), torch.zeros(B, D), max_iter=MAX_ITER, tol=TOL, stop_mode="rel", **kw)

    _, _, info = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    record_active(solver=f"torchdeq {dict(anderson='anderson_solver', broyden='broyden_solver').get(method, 'fixed_point_iter')}",
                  method=method, compact=None, ms=1e3 * benchmark.stats.stats.min, f_rows=rows[0],
                  iterations=rows[0] // B, n_min=None, n_max=None, work_ratio=None)


TARGETS = {"picard": "<= 0.35x", "anderson": "<= 0.5x", "broyden": ""}


@pytest.mark.parametrize("method", ["picard", "anderson", "broyden"])
def test_active_sets_interleaved(benchmark, record_interleaved, method):
    """The issue's ratio, robust to machine drift: whole-batch and compacted solves of the
    same batch alternate round after round (see conftest.interleaved_round). A third run,
    "f alone", evaluates f on exactly the working-set sizes the compacted solve used, with
    no solver: the least a compacted solve can cost (its ratio to the whole-batch solve is
    the floor of the target's ratio with this f). A fourth, "f alone on the ideal working
    sets", evaluates each sample exactly as often as it needs (n_i + 1 times): the floor of
    any active-set scheme, whatever its check schedule, with no solver work at all. Last,
    that floor plus the work both solves share (the steps skip frozen rows, so the
    whole-batch solve's time outside f, timed inside each run, is paid by the compacted one
    too)."""
    f, args, _ = heterogeneous_batch()
    z0 = torch.zeros(B, D)
    kw = dict(args=args, method=method, tol=TOL, max_iter=MAX_ITER, m=5 if method == "anderson" else None,
              backend=BACKEND)
    sizes = []
    r = imp_fast.solve(lambda z, *a: sizes.append(z.shape[0]) or f(z, *a), z0, compact=True, **kw)
    zs = r.z
    # The ideal working sets: sample i evaluated exactly n_i + 1 times (its n_i updates and
    # the evaluation that finds it converged), i.e. frozen rows leave at once, at no cost.
    evals = (r.n_iter + 1).tolist()
    ideal = [sum(e > t for e in evals) for t in range(max(evals))]

    def f_alone(sizes):  # on the fixed points (values in the range the solve's iterates take)
        with torch.no_grad():
            for k in sizes:
                f(zs[:k], *(a[:k] for a in args))

    inside_f = []  # the whole-batch solve's time inside f, per round

    def timed_f(z, *a):
        t0 = time.perf_counter()
        out = f(z, *a)
        inside_f[-1] += time.perf_counter() - t0
        return out

    def whole_solve():
        inside_f.append(0.0)
        return imp_fast.solve(timed_f, z0, compact=False, **kw)

    runs = {"whole": whole_solve, "compact": lambda: imp_fast.solve(f, z0, compact=True, **kw),
            "f": lambda: f_alone(sizes), "f ideal": lambda: f_alone(ideal)}
    times = {}
    benchmark.pedantic(interleaved_round, args=(runs, times), rounds=7, iterations=1, warmup_rounds=1)
    times = {k: v[1:] for k, v in times.items()}  # the warm-up round's times
    whole = min(times["whole"])
    record_interleaved(table="active sets", run=f"compact {method} [{BACKEND}]", baseline="whole-batch",
                       ms=1e3 * min(times["compact"]), base_ms=1e3 * whole, target=TARGETS[method],
                       rounds=len(times["compact"]))
    record_interleaved(table="active sets", run=f"f alone on the compact {method} working sets",
                       baseline="whole-batch", ms=1e3 * min(times["f"]), base_ms=1e3 * whole, target="(floor)",
                       rounds=len(times["f"]))
    record_interleaved(table="active sets", run=f"f alone on the ideal {method} working sets ({sum(ideal)} rows)",
                       baseline="whole-batch", ms=1e3 * min(times["f ideal"]), base_ms=1e3 * whole,
                       target="(floor, any check schedule)", rounds=len(times["f ideal"]))
    # The steps skip frozen rows, so the step work (and the loop around f) is the same in
    # both solves: the whole-batch solve's time outside f (measured inside each run, as in
    # test_bench_overhead), added to the ideal floor.
    shared = [w - fi for w, fi in zip(times["whole"], inside_f[1:])]
    record_interleaved(table="active sets", run=f"ideal {method} floor + the solver work both solves do",
                       baseline="whole-batch", ms=1e3 * (min(times["f ideal"]) + min(shared)),
                       base_ms=1e3 * whole, target="(floor with the steps)", rounds=len(shared))
