"""The built-in batched DEQ problem used by ``imp-fast demo`` and the benchmarks.

f(z) = tanh(W z + x) with the spectral norm of W set to ``rho`` (< 1, so f is a
contraction and the fixed point is unique), a fixed seed, and a batch of inputs x.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .backends import backend_status
from .loop import solve

__all__ = [
    "DEQProblem", "make_problem", "run_demo", "format_table",
    "HeterogeneousProblem", "make_heterogeneous_problem", "run_adaptive_demo", "format_adaptive_table",
]


@dataclass
class DEQProblem:
    W: torch.Tensor
    x: torch.Tensor

    def f(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(torch.addmm(self.x, z, self.W.t()))

    def z0(self) -> torch.Tensor:
        return torch.zeros_like(self.x)


def make_problem(batch: int = 8, dim: int = 256, *, rho: float = 0.9, seed: int = 0,
                 symmetric: bool = False, x_scale: float = 1.0,
                 dtype: torch.dtype = torch.float32, device: str = "cpu") -> DEQProblem:
    """A seeded instance of f(z) = tanh(W z + x) with ||W||_2 = rho.

    A random Gaussian W has spectral radius about half its norm, so Picard converges
    fast; ``symmetric=True`` makes the spectral radius equal rho (a stiffer problem,
    where Anderson acceleration pays off), and a small ``x_scale`` keeps tanh near its
    linear regime.
    """
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    if symmetric:
        W = W + W.t()
    W = W * (rho / torch.linalg.matrix_norm(W, 2))
    x = x_scale * torch.randn(batch, dim, generator=g, dtype=torch.float64)
    return DEQProblem(W.to(dtype=dtype, device=device), x.to(dtype=dtype, device=device))


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _counted(run: Callable[[Callable], object], f: Callable) -> Tuple[object, int]:
    """run(f') with f' counting its calls: (result, f evaluations)."""
    n = [0]

    def g(z):
        n[0] += 1
        return f(z)

    return run(g), n[0]


def _num(x: float) -> str:
    """1e-4 as '1e-4', other numbers as %g."""
    if x > 0 and math.log10(x).is_integer():
        return f"1e{int(math.log10(x))}"
    return f"{x:g}"


def _lam_text(lam: float, relative: bool) -> str:
    if relative:
        return f"lam={_num(lam)} relative (ridge lam*||g_k||^2)"
    return f"lam={_num(lam)} absolute (ridge lam)" + (", torchdeq's default" if lam == 1e-4 else "")


def run_demo(batch: int = 8, dim: int = 256, *, max_iter: int = 500, tol: float = 1e-5,
             repeats: int = 3, device: str = "cpu", include_torchdeq: bool = True, m: int = 5,
             lam: float = 1e-4, torchdeq_lams: Sequence[float] = (1e-4, 1e-8),
             check_every: int = 5, backends: Optional[Sequence[str]] = None,
             broyden_m: int = 30) -> List[Dict]:
    """Solve the built-in stiff problem (symmetric W, rho 0.97) with every available
    backend and method (Picard, Anderson, Broyden with ``broyden_m`` rank-one updates of
    memory), and torchdeq's solvers when installed; one row each.

    Every row uses the same tol and stop mode (relative residual) and every Anderson
    row the same history size ``m``. ``lam`` means different things: imp_fast's ridge
    is relative (``lam * ||g_k||^2``, g_k the newest residual), torchdeq's absolute
    (``lam`` added to ``G G^T``), and no single number converts one into the other. So
    torchdeq's Anderson runs once per value in ``torchdeq_lams`` (its default 1e-4, and
    1e-8, small enough not to slow it down on this problem), and so does the drop-in
    :func:`imp_fast.compat.torchdeq.anderson_solver`, which follows torchdeq's meaning.
    Each row states its settings (``settings``), its f evaluations (``f_evals``: calls
    of f on the batch) and the evaluation at which its last sample met tol
    (``evals_to_tol``, None if one did not); ``speedup`` compares total time with the
    torchdeq row named in ``baseline`` (same method; imp_fast Anderson rows against
    torchdeq at the smallest lam, drop-in rows against torchdeq at the same lam).
    ``backends`` restricts the imp_fast rows to those backends (default: every one
    available here).
    """
    prob = make_problem(batch, dim, rho=0.97, symmetric=True, x_scale=0.5, device=device)
    rows: List[Dict] = []
    common = f"tol={_num(tol)} rel"
    available = [b for b, why in backend_status().items() if why is None]
    if device == "cpu" and "triton" in available and not _interpreting():
        available.remove("triton")
    if backends is not None:
        unknown = [b for b in backends if b not in available]
        if unknown:
            raise ValueError(f"backends {unknown} not available here (available: {available})")
    backends = available if backends is None else list(backends)
    torchdeq_lams = tuple(torchdeq_lams)
    td_anderson = f"torchdeq anderson, lam={_num(min(torchdeq_lams))}" if torchdeq_lams else None
    td_broyden = "torchdeq broyden_solver"
    for method in ("picard", "anderson", "broyden"):
        for be in backends:
            def run(fn, be=be, method=method):
                return solve(fn, prob.z0(), method=method, max_iter=max_iter, tol=tol, stop="rel",
                             m=m if method == "anderson" else broyden_m, lam=lam, check_every=check_every, backend=be)

            r, n_evals = _counted(run, prob.f)
            secs = _time(lambda: run(prob.f), repeats)
            done = bool(r.converged.all())
            settings = f"{common}, host check every {check_every} evals"
            if method == "anderson":
                settings = f"m={m}, {_lam_text(lam, True)}, " + settings
            elif method == "broyden":
                settings = f"memory m={broyden_m} rank-one updates, no line search, " + settings
            base = {"picard": "torchdeq fixed_point_iter", "anderson": td_anderson, "broyden": td_broyden}[method]
            rows.append(dict(solver=f"imp_fast {method}", backend=be, settings=settings, f_evals=n_evals,
                             evals_to_tol=int(r.n_iter.max()) + 1 if done else None,
                             converged=int(r.converged.sum()), residual=float(r.rel_residual.max()),
                             ms_per_iter=1e3 * secs / n_evals, total_ms=1e3 * secs, baseline=base))
    if include_torchdeq:
        from .compat import torchdeq as drop_in

        try:
            from torchdeq.solver import anderson_solver, broyden_solver, fixed_point_iter
        except Exception:
            anderson_solver = broyden_solver = fixed_point_iter = None
        runs = []
        if fixed_point_iter is not None:
            runs.append(("torchdeq fixed_point_iter", "torchdeq", fixed_point_iter, {}, common,
                         "torchdeq fixed_point_iter"))
            runs.append((td_broyden, "torchdeq", broyden_solver, {},
                         f"memory max_iter={max_iter} rank-one updates, no line search, {common}", td_broyden))
        runs.append(("imp_fast compat broyden_solver", "compat", drop_in.broyden_solver, {},
                     f"memory max_iter={max_iter} rank-one updates, no line search, {common}",
                     td_broyden if broyden_solver is not None else None))
        for td_lam in torchdeq_lams:
            label = f"torchdeq anderson, lam={_num(td_lam)}"
            settings = f"m={m}, {_lam_text(td_lam, False)}, {common}"
            if anderson_solver is not None:
                runs.append((label, "torchdeq", anderson_solver, dict(m=m, lam=td_lam), settings, label))
            runs.append((f"imp_fast compat anderson_solver, lam={_num(td_lam)}", "compat", drop_in.anderson_solver,
                         dict(m=m, lam=td_lam), settings, label if anderson_solver is not None else None))
        for name, backend, fn, kw, settings, baseline in runs:
            def run(f, fn=fn, kw=kw):
                return fn(f, prob.z0(), max_iter=max_iter, tol=tol, stop_mode="rel", **kw)

            (z, _, info), n_evals = _counted(run, prob.f)
            secs = _time(lambda: run(prob.f), repeats)
            conv = info["rel_lowest"] < tol
            # torchdeq's broyden_solver evaluates f at x0 before its first step and does not
            # count that evaluation in nstep (its Anderson and Picard count every one).
            first = 1 if fn in (broyden_solver, drop_in.broyden_solver) else 0
            rows.append(dict(solver=name, backend=backend, settings=settings + ", host check every eval",
                             f_evals=n_evals,
                             evals_to_tol=int(info["nstep"].max()) + first if bool(conv.all()) else None,
                             converged=int(conv.sum()), residual=float(info["rel_lowest"].max()),
                             ms_per_iter=1e3 * secs / max(n_evals, 1), total_ms=1e3 * secs, baseline=baseline))
    total = {r["solver"]: r["total_ms"] for r in rows if r["backend"] == "torchdeq"}
    for row in rows:
        base = total.get(row["baseline"])
        row["speedup"] = base / row["total_ms"] if base is not None else float("nan")
    return rows


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def format_table(rows: List[Dict], batch: Optional[int] = None, dim: Optional[int] = None) -> str:
    """Markdown table of demo rows, then the settings of each row and what its speedup
    is measured against."""
    head = ("| solver | backend | f evals | evals to tol | converged | max rel residual | ms/iter | total ms "
            "| speedup vs torchdeq |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        sp = "" if r["speedup"] != r["speedup"] else f"{r['speedup']:.2f}x"
        to_tol = "-" if r["evals_to_tol"] is None else str(r["evals_to_tol"])
        lines.append(
            f"| {r['solver']} | {r['backend']} | {r['f_evals']} | {to_tol} | {r['converged']} | {r['residual']:.2e} | "
            f"{r['ms_per_iter']:.3f} | {r['total_ms']:.2f} | {sp} |"
        )
    lines.append("")
    lines.append("Settings (every row: same problem, same tol and stop mode):")
    seen = set()
    for r in rows:
        key = (r["solver"], r["settings"])
        if key in seen:
            continue
        seen.add(key)
        vs = f"; speedup vs '{r['baseline']}'" if r["speedup"] == r["speedup"] and r["baseline"] != r["solver"] else ""
        lines.append(f"- {r['solver']}: {r['settings']}{vs}")
    lines.append("imp_fast's lam is relative to the newest residual's squared norm, torchdeq's (and the compat "
                 "drop-in's) is an absolute ridge: no single value converts one into the other, so torchdeq runs "
                 "at its default lam and at a small one.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# --adaptive: a batch of easy and hard samples, with and without active sets


@dataclass
class HeterogeneousProblem:
    """f(z; s, x) = tanh(s * (z W) + x): per-sample scales s make some samples contract
    fast and others slowly (W symmetric, ||W||_2 = rho)."""

    W: torch.Tensor
    s: torch.Tensor
    x: torch.Tensor

    def f(self, z: torch.Tensor, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(s[:, None] * (z @ self.W) + x)

    def z0(self) -> torch.Tensor:
        return torch.zeros_like(self.x)


def make_heterogeneous_problem(batch: int = 64, dim: int = 1024, *, rho: float = 0.995, s_min: float = 0.2,
                               x_scale: float = 0.1, seed: int = 0, dtype: torch.dtype = torch.float32,
                               device: str = "cpu") -> HeterogeneousProblem:
    """The active-set benchmark's batch: scales s from ``s_min`` to 1 across the batch
    (at the defaults Picard needs 8..182 iterations per sample at tol 1e-6, Anderson 7..63)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    W = A + A.t()
    W = W * (rho / torch.linalg.matrix_norm(W, 2))
    s = torch.linspace(s_min, 1.0, batch, dtype=torch.float64)
    x = x_scale * torch.randn(batch, dim, generator=g, dtype=torch.float64)
    return HeterogeneousProblem(*(t.to(dtype=dtype, device=device) for t in (W, s, x)))


def run_adaptive_demo(batch: int = 64, dim: int = 1024, *, tol: float = 1e-6, max_iter: int = 3000,
                      repeats: int = 3, check_every: int = 5, backend: str = "auto",
                      include_torchdeq: bool = True) -> List[Dict]:
    """Solve the heterogeneous batch with each method, on the whole batch and with
    ``compact=True``; rows with per-sample iterations, f-rows evaluated and time (and
    torchdeq's solvers on the same batch, which stop when the whole batch meets tol)."""
    prob = make_heterogeneous_problem(batch, dim)
    args = (prob.s, prob.x)
    rows: List[Dict] = []
    for method in ("picard", "anderson", "broyden"):
        for compact in (False, True):
            count = [0]

            def f(z, s, x):
                count[0] += z.shape[0]
                return prob.f(z, s, x)

            def run(fn=prob.f, method=method, compact=compact):
                return solve(fn, prob.z0(), args=args, method=method, tol=tol, max_iter=max_iter, m=5 if method == "anderson" else None,
                             check_every=check_every, compact=compact, backend=backend)

            r = run(f)
            secs = _time(run, repeats)
            n = r.n_iter
            rows.append(dict(solver=f"imp_fast {method}", compact=compact, backend=r.backend,
                             n_min=int(n.min()), n_max=int(n.max()), n_mean=float(n.float().mean()),
                             f_rows=count[0], converged=int(r.converged.sum()), total_ms=1e3 * secs,
                             work_ratio=float(n.sum()) / (batch * int(n.max()))))
    if include_torchdeq:
        try:
            from torchdeq.solver import anderson_solver, broyden_solver, fixed_point_iter
        except Exception:
            return rows
        for name, fn, kw in (("torchdeq fixed_point_iter", fixed_point_iter, {}),
                             ("torchdeq anderson_solver", anderson_solver, dict(m=5)),
                             ("torchdeq broyden_solver", broyden_solver, {})):
            count = [0]

            def f(z, count=count):
                count[0] += z.shape[0]
                return prob.f(z, *args)

            def run(g=lambda z: prob.f(z, *args), fn=fn, kw=kw):
                return fn(g, prob.z0(), max_iter=max_iter, tol=tol, stop_mode="rel", **kw)

            _, _, info = run(f)
            secs = _time(run, repeats)
            conv = info["rel_lowest"] < tol
            rows.append(dict(solver=name, compact=None, backend="torchdeq", n_min=None, n_max=None, n_mean=None,
                             f_rows=count[0], converged=int(conv.sum()), total_ms=1e3 * secs, work_ratio=None))
    return rows


def format_adaptive_table(rows: List[Dict]) -> str:
    """Markdown table of :func:`run_adaptive_demo` rows; time and f-rows also relative to
    the same method on the whole batch."""
    lines = ["| solver | active sets | iterations per sample (min / mean / max) | f-rows | converged | total ms "
             "| time vs whole batch |", "|" + "---|" * 7]
    whole = {r["solver"]: r for r in rows if r["compact"] is False}
    for r in rows:
        its = "-" if r["n_min"] is None else f"{r['n_min']} / {r['n_mean']:.1f} / {r['n_max']}"
        c = "-" if r["compact"] is None else ("yes" if r["compact"] else "no")
        w = whole.get(r["solver"])
        rel = f"{r['total_ms'] / w['total_ms']:.2f}x" if w is not None else ""
        lines.append(f"| {r['solver']} | {c} | {its} | {r['f_rows']} | {r['converged']} | {r['total_ms']:.1f} | {rel} |")
    lines.append("")
    lines.append("f-rows: rows of the batch f was evaluated on. With active sets the samples that converged leave "
                 "the working set at each host check; the ideal f-work ratio is sum(n_i) / (B max n_i).")
    return "\n".join(lines)

