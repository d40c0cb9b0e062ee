"""Fuzzing: statuses stay truthful on random maps, shapes, dtypes, backends and NaN/Inf.

Hypothesis draws a batch of per-sample maps (contractive or not: s * tanh(Q z) + x
with Lipschitz constant s up to 1.6, linear rho * Q z + b with spectral radius rho up
to 3, and the shift z + c, which has no fixed point; Q a random signed permutation, so
the maps are cheap at any D and their spectra known), odd shapes (D = 1, D not a
multiple of any block size, 3-d and 4-d states, non-contiguous z0), magnitudes whose
squares over- or underflow the dtype's norms, every storage dtype, every available backend and both methods, and injects NaN/+-Inf into some
samples' f at some call. Every map is evaluated in float64 and rounded to the storage
dtype, so it is deterministic and sample-independent, and the checks recompute
everything independently from f in float64:

* CONVERGED: the residual at the returned z, recomputed in float64 from f(z), is below
  tol (slack: 1e-3 relative, for the engine's float32 norm rounding; the recomputation
  sees the same storage-dtype values of f(z) the engine saw, so low-precision dtypes
  need no more);
* DIVERGED: that residual exceeds `divergence` times the one at z0 (same slack);
* NONFINITE (not injected): f(z) has a NaN/Inf, or ||f(z) - z|| exceeds the compute
  dtype's range, or the damped update z + beta (f(z) - z) overflows the storage dtype
  (to within 1e-3 of its largest value: the engine rounds the update its own way);
* MAX_ITER: every iteration moved the sample (n_iter == max_iter);
* the shift map (no fixed point) is never CONVERGED with stop="abs";
* z is finite everywhere (z0 is): no status leaves an infinite iterate behind;
* an injection hits only its sample: that sample, if still running at that call, is
  NONFINITE with n_iter = call - 1, and every other sample's result equals the
  injection-free solve's (batch invariance);
* no exception.

Runtime: the reference and cpp backends take most examples; the Triton interpreter
(about 0.25 s per Anderson iteration on CPU) gets a few small ones, so the file runs in
well under a minute on two cores.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import imp_fast
from imp_fast import Status
from imp_fast.backends import BackendUnavailable, backend_status, get_backend

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

AVAILABLE = [name for name, why in backend_status().items() if why is None]
FAST = [b for b in AVAILABLE if b != "triton"]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
SLACK = 1e-3
KINDS = ("tanh", "linear", "shift")


def _device(backend):
    try:
        get_backend(backend, torch.device("cpu"))
        return torch.device("cpu")
    except BackendUnavailable:
        return torch.device("cuda")


class Problem:
    """Per-sample maps on flattened states; evaluated in float64, rounded to dtype."""

    def __init__(self, kinds, D, dtype, seed, scale):
        g = torch.Generator().manual_seed(seed)
        B = len(kinds)
        self.kinds, self.dtype, self.D = kinds, dtype, D
        self.perm = torch.stack([torch.randperm(D, generator=g) for _ in range(B)])  # (B, D)
        self.sign = torch.where(torch.rand(B, D, generator=g) < 0.5, -1.0, 1.0).double()
        self.coef = torch.empty(B, 1, dtype=torch.float64)
        self.off = torch.randn(B, D, generator=g, dtype=torch.float64) * scale
        for b, kind in enumerate(kinds):
            if kind == "tanh":
                self.coef[b] = 0.1 + 1.5 * torch.rand((), generator=g, dtype=torch.float64)  # Lipschitz 0.1..1.6
            elif kind == "linear":
                self.coef[b] = 0.2 + 2.8 * torch.rand((), generator=g, dtype=torch.float64)  # spectral radius
            else:
                self.off[b] = self.off[b] / self.off[b].norm().clamp_min(1e-300) * scale  # ||c|| = scale
        self.calls = 0
        self.inject = {}  # call -> [(sample, index, value)]

    def clean(self, z):
        """f on (B, ...) z, no injections (the reference for the checks)."""
        shape = z.shape
        zz = z.reshape(shape[0], -1).double().cpu()
        Qz = torch.gather(zz, 1, self.perm[: zz.shape[0]]) * self.sign[: zz.shape[0]]
        out = torch.empty_like(zz)
        for b, kind in enumerate(self.kinds[: zz.shape[0]]):
            if kind == "tanh":
                out[b] = self.coef[b] * torch.tanh(Qz[b]) + self.off[b]
            elif kind == "linear":
                out[b] = self.coef[b] * Qz[b] + self.off[b]
            else:
                out[b] = zz[b] + self.off[b]
        return out.to(self.dtype).to(z.device).reshape(shape)

    def __call__(self, z):
        self.calls += 1
        out = self.clean(z)
        for b, j, v in self.inject.get(self.calls, ()):
            out.view(out.shape[0], -1)[b, j] = v
        return out


def _compute_max(dtype):
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max


def _check_truthful(prob, z0, r, *, tol, stop, eps, beta, divergence, max_iter, injected, best, scale):
    B = z0.shape[0]
    z = r.z.reshape(B, -1).cpu()
    assert torch.isfinite(z).all(), "a status left a non-finite z behind"
    fz = prob.clean(r.z).reshape(B, -1).cpu()
    z64, f64 = z.double(), fz.double()
    with torch.no_grad():
        g64 = f64 - z64
    abs_t = g64.norm(dim=1)
    rel_t = torch.where(abs_t == 0, torch.zeros_like(abs_t), abs_t / (f64.norm(dim=1) + eps))
    res_t = rel_t if stop == "rel" else abs_t
    f0 = prob.clean(z0).reshape(B, -1).cpu().double()
    abs0_t = (f0 - z0.reshape(B, -1).cpu().double()).norm(dim=1)
    cdt = torch.float64 if prob.dtype == torch.float64 else torch.float32
    upd = z.to(cdt) + beta * (fz.to(cdt) - z.to(cdt))
    smax = torch.finfo(prob.dtype).max
    status, n_iter = r.status.cpu().tolist(), r.n_iter.cpu().tolist()
    assert all(n <= r.iterations for n in n_iter)
    for b in range(B):
        s, n = Status(status[b]), n_iter[b]
        assert s != Status.RUNNING
        if b in injected:
            continue
        if s == Status.CONVERGED:
            # (return_best: the best iterate's residual is at most the converged one's)
            assert res_t[b] < tol * (1 + SLACK), (b, prob.kinds[b], float(res_t[b]), tol)
            # z + c has no fixed point: with ||c|| = scale >= 1 > tol its residual never
            # meets an absolute tol. (Rounded to float32/16, z + c does have fixed
            # points, or nearly: z so large that the entries of c fall below half its
            # ulp. Anderson's extrapolation finds them; the residual check above is the
            # truth there.)
            assert not (prob.kinds[b] == "shift" and stop == "abs" and scale >= 1 and prob.dtype == torch.float64), \
                "z + c has no fixed point"
        elif best:
            continue  # the returned z is the best iterate, not the one the status is about
        elif s == Status.DIVERGED:
            assert abs_t[b] > divergence * abs0_t[b] * (1 - SLACK), (b, float(abs_t[b]), float(abs0_t[b]))
        elif s == Status.NONFINITE:
            f_bad = not bool(torch.isfinite(fz[b]).all())
            res_bad = not bool(abs_t[b] <= _compute_max(prob.dtype))
            upd_bad = beta != 1.0 and bool(upd[b].double().abs().max() >= smax * (1 - SLACK))
            assert f_bad or res_bad or upd_bad, (b, prob.kinds[b], "NONFINITE without a NaN/Inf or an overflow")
        elif s == Status.MAX_ITER:
            assert n == max_iter and r.iterations == max_iter


def _strategy_problem(draw, backends):
    backend = draw(st.sampled_from(backends))
    small = backend == "triton"
    method = draw(st.sampled_from(["picard", "anderson"]))
    dtype = draw(st.sampled_from(DTYPES))
    B = draw(st.integers(1, 3 if small else 5))
    shape_kind = draw(st.sampled_from(["flat", "3d", "4d"]))
    if shape_kind == "flat":
        D = draw(st.sampled_from([1, 2, 3, 17, 37] + ([] if small else [300, 1031])))
        tail = (D,)
    elif shape_kind == "3d":
        tail = (draw(st.integers(1, 5)), draw(st.integers(1, 7)))
    else:
        tail = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 5)))
    D = math.prod(tail)
    kinds = tuple(draw(st.sampled_from(KINDS)) for _ in range(B))
    return backend, method, dtype, B, tail, D, kinds, small


@st.composite
def problems(draw, backends):
    backend, method, dtype, B, tail, D, kinds, small = _strategy_problem(draw, backends)
    seed = draw(st.integers(0, 2**20))
    # magnitudes of z0, the offsets and c; the extremes push the norms of float32/
    # bfloat16 (squares past 3e38 or below 1e-38) and float64 states out of range
    extreme = {torch.float64: [1e150, 1e-160], torch.float32: [1e18, 1e-21], torch.bfloat16: [1e18, 1e-21]}
    scale = draw(st.sampled_from([1.0, 1.0, 1e-3, 30.0] + extreme.get(dtype, [])))
    max_iter = draw(st.integers(1, 8 if small and method == "anderson" else 40))
    opts = dict(
        method=method,
        max_iter=max_iter,
        tol=TOL[dtype],
        stop=draw(st.sampled_from(["rel", "abs"])),
        beta=draw(st.sampled_from([1.0, 1.0, 0.7, 1.5])),
        divergence=draw(st.sampled_from([1e6, 1e3])),
        check_every=draw(st.sampled_from([None, 1, 5])),
        return_best=draw(st.booleans()),
    )
    if method == "anderson":
        opts["m"] = draw(st.integers(1, 6))
    # injections: (sample, call, value); the flat index is drawn per injection
    n_inj = draw(st.integers(0, min(B, 2)))
    inj = []
    for b in draw(st.permutations(range(B)))[:n_inj]:
        inj.append((b, draw(st.integers(1, max_iter)), draw(st.integers(0, D - 1)),
                    draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))))
    noncontig = draw(st.booleans())
    return backend, dtype, B, tail, kinds, seed, scale, opts, inj, noncontig


def _run(example):
    backend, dtype, B, tail, kinds, seed, scale, opts, inj, noncontig = example
    dev = _device(backend)
    D = math.prod(tail)
    prob = Problem(kinds, D, dtype, seed, scale)
    g = torch.Generator().manual_seed(seed + 1)
    base = (torch.randn((B,) + tail, generator=g, dtype=torch.float64) * scale).to(dtype)
    if noncontig:  # same values, strided storage
        big = torch.zeros((B,) + tail + (2,), dtype=dtype)
        big[..., 0] = base
        z0 = big[..., 0]
        assert not z0.is_contiguous() or D * B <= 1
    else:
        z0 = base
    z0 = z0.to(dev)
    kw = dict(opts, eps=1e-9 if opts["stop"] == "rel" else 0.0, backend=backend)
    clean = imp_fast.solve(prob, z0, **kw)
    assert clean.backend == backend
    checks = dict(tol=kw["tol"], stop=kw["stop"], eps=kw["eps"], beta=kw["beta"], divergence=kw["divergence"],
                  max_iter=kw["max_iter"], best=kw["return_best"], scale=scale)
    _check_truthful(prob, z0, clean, injected=(), **checks)
    if not inj:
        return
    prob.calls = 0
    for b, call, j, v in inj:
        prob.inject.setdefault(call, []).append((b, j, v))
    hit = imp_fast.solve(prob, z0, **kw)
    injected = {b for b, *_ in inj}
    _check_truthful(prob, z0, hit, injected=injected, **checks)
    status, n_iter = hit.status.cpu(), hit.n_iter.cpu()
    for b, call, j, v in inj:
        first = min(c for bb, c, *_ in inj if bb == b)  # the earliest injection into b
        if call != first:
            continue
        if n_iter[b] >= call - 1 and hit.iterations >= call:  # running at that call: hit
            assert int(status[b]) == Status.NONFINITE and int(n_iter[b]) == call - 1, (b, call, status, n_iter)
        else:  # frozen before that call: untouched
            assert int(n_iter[b]) == int(clean.n_iter[b]) and int(status[b]) == int(clean.status[b])
    others = [b for b in range(B) if b not in injected]
    if others:
        o = torch.tensor(others)
        assert torch.equal(hit.status.cpu()[o], clean.status.cpu()[o])
        assert torch.equal(hit.n_iter.cpu()[o], clean.n_iter.cpu()[o])
        assert torch.equal(hit.z.reshape(B, -1).cpu()[o], clean.z.reshape(B, -1).cpu()[o])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problems(FAST))
def test_statuses_are_truthful(example):
    _run(example)


@pytest.mark.skipif("triton" not in AVAILABLE, reason="triton backend unavailable")
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problems(["triton"]))
def test_statuses_are_truthful_triton(example):
    _run(example)
