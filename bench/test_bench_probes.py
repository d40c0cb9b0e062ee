"""Lipschitz probes (issue 15): the probe's cost over the bare loop of G it wraps.

The stacked probe batch of :func:`imp_fast.lipschitz_trace`: B = 64 inputs and P = 8
directions, so 64 x 9 = 576 rows of D = 4096, a cheap rank-16 G
(``tanh((z U) V + x)``, ||U V||_2 = 0.9), t_max = 40. "bare G loop" is
``for t in range(40): y = G(y, xs)`` on the same stacked batch: the least any probe can
cost. A probe adds one step per iteration (the backend's fused Picard or Anderson step,
tol 0), one fused pair-ratio pass and one more evaluation of G (the residual of y_40).
Times are the minimum over rounds, one thread, all rows from one run; the targets' ratios
are also measured interleaved (test_probe_ratios_interleaved: the bare loop and the cpp
probes alternate round after round, so drift of this shared machine hits both alike).

Run: ``pytest bench/test_bench_probes.py --benchmark-only``.
"""
import pytest
import torch
from conftest import interleaved_round

import imp_fast
from imp_fast.backends import backend_status

B, P, D, RANK, T = 64, 8, 4096, 16, 40
BACKENDS = [b for b in ("reference", "cpp") if backend_status()[b] is None]


def _problem():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(D, RANK, generator=g) / D ** 0.5
    V = torch.randn(RANK, D, generator=g) / RANK ** 0.5
    V *= 0.9 / torch.linalg.matrix_norm(U @ V, ord=2)
    x = torch.randn(B, D, generator=g)
    d = torch.randn(P, D, generator=g)
    d /= d.norm(dim=1, keepdim=True)

    def G(z, x):
        return torch.tanh(torch.addmm(x, z @ U, V))

    return G, x, d


def _stacked_inputs(x, d):
    """x and its P perturbations x + 0.05 d_p stacked as the probe stacks them: (B (1 + P), D)."""
    return torch.cat([x, (x.unsqueeze(0) + 0.05 * d.unsqueeze(1)).reshape(P * B, D)])


def _bare_loop(G, x, d):
    """``for t in range(T): y = G(y, xs)`` on the probe's stacked batch, as a callable."""
    xs = _stacked_inputs(x, d)

    def run():
        with torch.no_grad():
            y = torch.zeros_like(xs)
            for _ in range(T):
                y = G(y, xs)
        return y

    return run


def _floor_loop(G, x, d, m=None):
    """The least memory traffic a probe of the issue's design adds to the bare loop, as a
    callable: the solve keeps its state in place (each iteration writes f(y) into the
    state buffer: the Picard step's minimum, without its residual sums or the ratio
    pass), and with ``m`` also reads the (B, m, D) f-value and residual histories once
    per iteration (Anderson's Gram row and mix need every history row; here only read,
    never written). No solver arithmetic: a floor, not a probe."""
    xs = _stacked_inputs(x, d)
    # read as one dot of the two halves: torch.dot streams at memory bandwidth (BLAS),
    # torch.sum does not (here 2x slower than the read itself)
    hist = None if m is None else torch.randn(2, xs.shape[0] * m * D)

    def run():
        with torch.no_grad():
            y = torch.zeros_like(xs)
            for _ in range(T):
                y.copy_(G(y, xs))
                if hist is not None:
                    torch.dot(hist[0], hist[1])
        return y

    return run


def test_bare_G_loop(benchmark, record_probe):
    benchmark.pedantic(_bare_loop(*_problem()), rounds=5, iterations=1, warmup_rounds=1)
    record_probe(what="bare G loop (40 G evaluations)", backend="", method="", ms=1e3 * benchmark.stats.stats.min)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["picard", "anderson"])
def test_probe(benchmark, record_probe, backend, method):
    G, x, d = _problem()

    def run():
        return imp_fast.lipschitz_trace(G, x, directions=d, eps=0.05, t_max=T, method=method, m=5,
                                        backend=backend)

    tr = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    assert tr.backend == backend and bool(torch.isfinite(tr.L).all())
    record_probe(what="lipschitz_trace", backend=backend, method=method, ms=1e3 * benchmark.stats.stats.min)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the cpp extension is not built")
def test_probe_ratios_interleaved(benchmark, record_interleaved):
    """The issue's ratios, robust to machine drift: the bare G loop and the cpp probes
    alternate round after round (see conftest.interleaved_round)."""
    G, x, d = _problem()

    def probe(method):
        return lambda: imp_fast.lipschitz_trace(G, x, directions=d, eps=0.05, t_max=T, method=method, m=5,
                                                backend="cpp")

    runs = {"bare": _bare_loop(G, x, d), "picard": probe("picard"), "anderson": probe("anderson"),
            "floor picard": _floor_loop(G, x, d), "floor anderson": _floor_loop(G, x, d, m=5)}
    times = {}
    benchmark.pedantic(interleaved_round, args=(runs, times), rounds=5, iterations=1, warmup_rounds=1)
    times = {k: v[1:] for k, v in times.items()}  # the warm-up round's times
    floors = {"picard": "bare G loop + state kept in place (a copy per iteration)",
              "anderson": "... + one read of the m = 5 F and G histories per iteration"}
    for method, target in (("picard", "<= 1.15x"), ("anderson", "<= 1.6x")):
        record_interleaved(table="probes", run=f"lipschitz_trace cpp {method}", baseline="bare G loop",
                           ms=1e3 * min(times[method]), base_ms=1e3 * min(times["bare"]), target=target,
                           rounds=len(times[method]))
        record_interleaved(table="probes", run=floors[method], baseline="bare G loop",
                           ms=1e3 * min(times[f"floor {method}"]), base_ms=1e3 * min(times["bare"]),
                           target="(floor)", rounds=len(times[f"floor {method}"]))
