"""Drop-in for torchdeq's solver functions, backed by :func:`imp_fast.solve`.

Same names, arguments and return values as ``torchdeq.solver``::

    from imp_fast.compat.torchdeq import anderson_solver   # was: from torchdeq.solver import ...
    z, indexing_list, info = anderson_solver(func, x0, max_iter=50, tol=1e-3)

``info`` has torchdeq's keys and shapes: ``abs_lowest``/``rel_lowest``/``nstep`` of
shape ``(B,)`` and ``abs_trace``/``rel_trace`` of shape ``(B, N)`` with torchdeq's N
(its first column is torchdeq's 1e8 placeholder; after an early stop the trace is
padded with the lowest values, as torchdeq does).

Differences, by design: samples that meet ``tol`` are frozen one by one instead of the
loop waiting for the whole batch; unknown keyword arguments, which torchdeq silently
ignores, still work but trigger one warning naming them; ``get_solver`` raises a
clear error for a solver this package does not provide.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..loop import solve
from ..validation import check_choice

__all__ = ["anderson_solver", "fixed_point_iter", "simple_fixed_point_iter", "get_solver", "SOLVERS"]

_INIT_LOSS = 1e8
_warned: set = set()


def _warn_ignored(func: str, kwargs: dict) -> None:
    new = [k for k in kwargs if (func, k) not in _warned]
    if not new:
        return
    _warned.update((func, k) for k in new)
    warnings.warn(
        f"imp_fast.compat.torchdeq.{func}: ignoring unknown keyword argument(s) "
        f"{', '.join(repr(k) for k in new)} (torchdeq ignores them silently; check for a misspelt option)",
        UserWarning,
        stacklevel=3,
    )


def _as_batch(x0: torch.Tensor) -> Tuple[torch.Tensor, Callable]:
    """torchdeq treats a tensor of dim < 2 as a batch of scalars."""
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
    if x0.dim() >= 2:
        return x0, lambda z: z
    return x0.reshape(-1, 1), lambda z: z.reshape(x0.shape)


def _run(
    func: Callable,
    x0: torch.Tensor,
    *,
    method: str,
    max_iter: int,
    tol: float,
    stop_mode: str,
    indexing: Optional[Sequence[int]],
    tau: float,
    return_final: bool,
    n_trace: int,
    m: int = 5,
    lam: float = 1e-4,
) -> Tuple[torch.Tensor, List[torch.Tensor], Dict[str, torch.Tensor]]:
    check_choice("stop_mode", stop_mode, ("abs", "rel"))
    zb, unbatch = _as_batch(x0)
    shape = x0.shape

    def f(z):
        return func(unbatch(z)).reshape(z.shape)

    # One solve per requested index (torchdeq records the estimate at step k): solving
    # to each index is exact and still cheap next to a training step.
    indexing_list: List[torch.Tensor] = []
    for k in sorted(set(indexing or [])):
        if 1 <= k <= max_iter:
            r = solve(f, zb, method=method, max_iter=k, tol=tol, stop=stop_mode, m=m, lam=lam,
                      beta=tau, check_every=None, backend="auto")
            indexing_list.append(r.z.reshape(shape))
    res = solve(
        f, zb, method=method, max_iter=max_iter, tol=tol, stop=stop_mode, m=m, lam=lam, beta=tau,
        return_best=not return_final, trace=True, check_every=None if return_final else 5, backend="auto",
    )
    if indexing and not indexing_list:
        indexing_list.append(res.z.reshape(shape))
    info = _info(res, n_trace)
    return res.z.reshape(shape), indexing_list, info


def _info(res, n_trace: int) -> Dict[str, torch.Tensor]:
    B = res.status.numel()
    dev = res.status.device
    out = {}
    for mode, tr, low in (("abs", res.trace_abs, res.abs_residual), ("rel", res.trace_rel, res.rel_residual)):
        tr = tr.float().t()  # (B, T)
        init = torch.full((B, 1), _INIT_LOSS, device=dev)
        body = tr[:, -(n_trace - 1):] if n_trace > 1 else tr[:, :0]
        pad = n_trace - 1 - body.shape[1]
        if pad > 0:
            body = torch.cat([body, low.float()[:, None].expand(B, pad)], dim=1)
        out[f"{mode}_trace"] = torch.cat([init, body], dim=1)
        out[f"{mode}_lowest"] = low.float()
    out["nstep"] = res.n_iter.float()
    out["sradius"] = torch.tensor([-1.0])
    try:  # torchdeq's SolverStat when available, so isinstance checks keep working
        from torchdeq.solver.stat import SolverStat

        return SolverStat(**out)
    except Exception:
        return out


def anderson_solver(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None, m=6, lam=1e-4,
                    tau=1.0, return_final=False, **kwargs):
    """torchdeq's ``anderson_solver``: Anderson acceleration (type II) on ``func``."""
    _warn_ignored("anderson_solver", kwargs)
    return _run(func, x0, method="anderson", max_iter=max_iter, tol=tol, stop_mode=stop_mode,
                indexing=indexing, tau=tau, return_final=return_final, n_trace=max(max_iter - 1, 1), m=m, lam=lam)


def fixed_point_iter(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None, tau=1.0,
                     return_final=False, **kwargs):
    """torchdeq's ``fixed_point_iter``: damped Picard iteration with statistics."""
    _warn_ignored("fixed_point_iter", kwargs)
    return _run(func, x0, method="picard", max_iter=max_iter, tol=tol, stop_mode=stop_mode,
                indexing=indexing, tau=tau, return_final=return_final, n_trace=max_iter + 1)


def simple_fixed_point_iter(func, x0, max_iter=50, tau=1.0, indexing=None, **kwargs):
    """torchdeq's ``simple_fixed_point_iter``: max_iter damped steps, final-step statistics.

    torchdeq calls ``func(x, tau=tau)`` here (its DEQ wrapper applies the damping); this
    drop-in applies ``tau`` itself and calls ``func(x)``.
    """
    _warn_ignored("simple_fixed_point_iter", kwargs)
    zb, unbatch = _as_batch(x0)
    res = solve(lambda z: func(unbatch(z)).reshape(z.shape), zb, method="picard", max_iter=max_iter,
                tol=1e-30, beta=tau, check_every=None, backend="auto")
    indexing_list = []
    for k in sorted(set(indexing or [])):
        if 1 <= k <= max_iter:
            r = solve(lambda z: func(unbatch(z)).reshape(z.shape), zb, method="picard", max_iter=k,
                      tol=1e-30, beta=tau, check_every=None, backend="auto")
            indexing_list.append(r.z.reshape(x0.shape))
    info = {
        "abs_lowest": res.abs_residual.float(),
        "rel_lowest": res.rel_residual.float(),
        "abs_trace": res.abs_residual.float()[:, None],
        "rel_trace": res.rel_residual.float()[:, None],
        "nstep": torch.full((zb.shape[0],), float(max_iter), device=zb.device),
        "sradius": torch.tensor([-1.0]),
    }
    return res.z.reshape(x0.shape), indexing_list, info


SOLVERS = {
    "anderson": anderson_solver,
    "fixed_point_iter": fixed_point_iter,
    "simple_fixed_point_iter": simple_fixed_point_iter,
}


def get_solver(key: str) -> Callable:
    """torchdeq's ``get_solver``: a solver function by name."""
    if key not in SOLVERS:
        raise ValueError(
            f"imp_fast.compat.torchdeq has no solver {key!r}; available: {', '.join(SOLVERS)}"
            + (" (broyden is not provided: use 'anderson')" if key == "broyden" else "")
        )
    return SOLVERS[key]
