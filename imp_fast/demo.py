"""The built-in batched DEQ problem used by ``imp-fast demo`` and the benchmarks.

f(z) = tanh(W z + x) with the spectral norm of W set to ``rho`` (< 1, so f is a
contraction and the fixed point is unique), a fixed seed, and a batch of inputs x.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .backends import backend_status
from .loop import solve

__all__ = ["DEQProblem", "make_problem", "run_demo", "format_table"]


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


def run_demo(batch: int = 8, dim: int = 256, *, max_iter: int = 500, tol: float = 1e-5,
             repeats: int = 3, device: str = "cpu", include_torchdeq: bool = True) -> List[Dict]:
    """Solve the built-in stiff problem (symmetric W, rho 0.97) with every available
    backend and method, and torchdeq's solvers when installed; one row each."""
    prob = make_problem(batch, dim, rho=0.97, symmetric=True, x_scale=0.5, device=device)
    rows: List[Dict] = []
    backends = [b for b, why in backend_status().items() if why is None]
    if device == "cpu" and "triton" in backends and not _interpreting():
        backends.remove("triton")
    for method in ("picard", "anderson"):
        for be in backends:
            holder = {}

            def run(be=be, method=method):
                holder["r"] = solve(prob.f, prob.z0(), method=method, max_iter=max_iter, tol=tol, stop="rel", backend=be)

            secs = _time(run, repeats)
            r = holder["r"]
            rows.append(dict(solver=f"imp_fast {method}", backend=be, iters=r.iterations,
                             converged=int(r.converged.sum()), residual=float(r.rel_residual.max()),
                             ms_per_iter=1e3 * secs / r.iterations, total_ms=1e3 * secs))
    if include_torchdeq:
        try:
            from torchdeq.solver import anderson_solver, fixed_point_iter
        except Exception:
            anderson_solver = fixed_point_iter = None
        for name, fn in (("torchdeq fixed_point_iter", fixed_point_iter), ("torchdeq anderson", anderson_solver)):
            if fn is None:
                continue
            holder = {}

            def run(fn=fn):
                holder["r"] = fn(prob.f, prob.z0(), max_iter=max_iter, tol=tol, stop_mode="rel")

            secs = _time(run, repeats)
            z, _, info = holder["r"]
            iters = int(info["nstep"].max())
            rows.append(dict(solver=name, backend="torchdeq", iters=iters,
                             converged=int((info["rel_lowest"] < tol).sum()),
                             residual=float(info["rel_lowest"].max()),
                             ms_per_iter=1e3 * secs / max(iters, 1), total_ms=1e3 * secs))
    base = {}
    for row in rows:
        kind = "anderson" if "anderson" in row["solver"] else "picard"
        if row["backend"] == "torchdeq":
            base[kind] = row["total_ms"]
    for row in rows:
        kind = "anderson" if "anderson" in row["solver"] else "picard"
        row["speedup"] = base[kind] / row["total_ms"] if kind in base else float("nan")
    return rows


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def format_table(rows: List[Dict], batch: Optional[int] = None, dim: Optional[int] = None) -> str:
    """Markdown table of demo rows."""
    head = "| solver | backend | iters | converged | max rel residual | ms/iter | total ms | speedup vs torchdeq |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        sp = "" if r["speedup"] != r["speedup"] else f"{r['speedup']:.2f}x"
        lines.append(
            f"| {r['solver']} | {r['backend']} | {r['iters']} | {r['converged']} | {r['residual']:.2e} | "
            f"{r['ms_per_iter']:.3f} | {r['total_ms']:.2f} | {sp} |"
        )
    return "\n".join(lines)
