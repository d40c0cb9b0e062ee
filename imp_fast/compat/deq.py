"""Drop-in for the locuslab/deq solver API (``lib/solvers.py``).

The DEQ code bases (locuslab/deq, deq-flow, the DEQ neural operators, the paper's
implicit FNO) call::

    out = anderson(f, x0, threshold=50, eps=1e-3, stop_mode="rel", beta=1.0, m=6, lam=1e-4, name="forward")
    out = broyden(f, x0, threshold, eps=1e-3, stop_mode="rel", ls=False, name="unknown")
    z = out["result"]

and read ``out['result']``, ``'lowest'``, ``'nstep'``, ``'prot_break'``, ``'abs_trace'``,
``'rel_trace'``, ``'eps'``, ``'threshold'``. Swap the import::

    from imp_fast.compat.deq import anderson, broyden   # was: from lib.solvers import ...

:func:`anderson` runs locuslab's algorithm (see :mod:`imp_fast.compat._loop`): type-II
Anderson with the *absolute* ridge ``lam`` on ``G G^T`` and its bordered system, the
first two iterates ``x0`` and ``f(x0)``, iterate ``k >= 2`` mixed with damping ``beta``,
residuals ``||f(x) - x||`` and ``||f(x) - x|| / (1e-5 + ||f(x)||)``, the lowest-residual
*iterate* returned, ``nstep`` the index k of that iterate, traces of length
``threshold - 2`` padded with the lowest value after an early stop.

Differences from locuslab's ``anderson``:

* states of any shape with the batch on dim 0 ((B, C, H, W), (B, D, L), (B, D), ...;
  locuslab's needs exactly (B, d, L)); ``f`` must return x0's shape (locuslab reshapes
  any output with as many entries, which silently scrambles a channels-last output);
* per sample by default (``per_sample=True``): each sample has its own residual, is
  frozen at its first iterate below ``eps`` and the loop stops when every sample is;
  ``'lowest'`` is then the largest of the samples' lowest residuals, ``'nstep'`` the
  largest of their steps, and the traces hold, per step, the largest residual over
  the batch (a frozen sample counting with its lowest). ``per_sample=False`` is
  locuslab's whole-batch residual: one norm over the whole batch, one lowest, one stop
  (each sample still has its own mixing weights, as in locuslab);
* extra keys: ``'lowest_per_sample'`` and ``'nstep_per_sample'`` (``(B,)`` tensors) and
  ``'converged'`` (``(B,)`` bool);
* norms, Gram matrices and weights are float32 or wider (half-precision states work);
  the host reads one flag per step (locuslab reads two floats);
* a sample whose residual becomes NaN/Inf is frozen at its last lowest iterate and its
  lowest residual reported as NaN; an exactly singular system (``lam=0``) takes a
  damped step instead of failing;
* ``threshold`` must be >= 3 (locuslab's records from its third iterate and fails below);
  unknown keyword arguments warn once (locuslab ignores them silently; ``name`` is
  accepted).

:func:`broyden` runs :func:`imp_fast.solve` with ``method="broyden"`` (limited-memory
good Broyden, restarted when its memory is full); with ``ls=True``, locuslab's Broyden
with its batch-wide Armijo line search (see :func:`broyden`).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Dict

import torch

from . import _loop

__all__ = ["anderson", "broyden"]

def _warn_ignored(func: str, kwargs: dict) -> None:
    _loop.warn_ignored(f"imp_fast.compat.deq.{func}", "locuslab/deq", kwargs, stacklevel=4)


def _check_x0(x0) -> torch.Tensor:
    if not isinstance(x0, torch.Tensor):
        raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
    if x0.dim() < 1 or x0.shape[0] == 0 or x0.numel() == 0:
        raise ValueError(f"x0 must have the batch on dim 0 and at least one entry, got shape {tuple(x0.shape)}")
    if not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point tensor, got dtype {x0.dtype}")
    return x0


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _real(name: str, value, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value!r}")
    return v


def _stop_mode(stop_mode) -> str:
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"stop_mode must be one of ('abs', 'rel'), got {stop_mode!r}")
    return stop_mode


def _wrap(f: Callable, x0: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    B, shape = x0.shape[0], x0.shape

    def g(v: torch.Tensor) -> torch.Tensor:
        out = f(v.view(shape))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"f must return a torch.Tensor, got {type(out).__name__}")
        if out.shape != shape:
            same = out.numel() == x0.numel()
            raise ValueError(
                f"f returned shape {tuple(out.shape)}, expected x0's shape {tuple(shape)}"
                + (" (same number of entries in another layout: reshaping it would scramble the state, so "
                   "return it in x0's layout, e.g. permute a channels-last output back)" if same else "")
            )
        if out.device != x0.device:
            raise ValueError(f"f returned a tensor on {out.device}, expected x0's device {x0.device}")
        if not out.is_floating_point():
            raise TypeError(f"f returned dtype {out.dtype}, expected a floating dtype like x0 ({x0.dtype})")
        return out.reshape(B, -1).to(x0.dtype)

    return g


def _padded(trace_max: list, length: int, fill: float) -> list:
    return trace_max + [fill] * max(length - len(trace_max), 0)


def anderson(f, x0, m=6, lam=1e-4, threshold=50, eps=1e-3, stop_mode="rel", beta=1.0, *,
             per_sample=True, name="unknown", **kwargs) -> Dict:
    """locuslab/deq's ``anderson``: Anderson acceleration with an absolute ridge ``lam``.

    Args:
        f: maps a tensor shaped like ``x0`` to one of the same shape.
        x0: initial guess, batch on dim 0, any shape.
        m: history size. lam: ridge added to ``G G^T`` (absolute, as in locuslab).
        threshold: most f evaluations. eps: tolerance on the ``stop_mode`` residual.
        stop_mode: "rel" or "abs". beta: damping of the mix.
        per_sample: per-sample residuals and freezing (default) or locuslab's one
            residual over the whole batch.
        name: accepted for compatibility (locuslab passes "forward"/"backward").

    Returns:
        locuslab's dict (see the module docstring), plus per-sample tensors.
    """
    _warn_ignored("anderson", kwargs)
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    x0 = _check_x0(x0)
    m = _int("m", m, 1)
    lam = _real("lam", lam, positive=False)
    threshold = _int("threshold", threshold, 3)
    eps = _real("eps", eps, positive=False)
    stop_mode = _stop_mode(stop_mode)
    beta = _real("beta", beta, positive=True)
    if not isinstance(per_sample, bool):
        raise TypeError(f"per_sample must be a bool, got {type(per_sample).__name__}")
    B = x0.shape[0]
    out = _loop.run(_wrap(f, x0), x0.detach().reshape(B, -1), method="anderson", max_iter=threshold, tol=eps,
                    stop_mode=stop_mode, m=m, lam=lam, tau=beta, keep="x", rel_eps=1e-5, per_sample=per_sample)
    alt = "abs" if stop_mode == "rel" else "rel"
    step = out.step[stop_mode]
    nstep = torch.where(step > 0, step - 1, 0)  # locuslab counts the iterate index k
    low = out.lowest[stop_mode]
    # One transfer for every host-side number of the dict.
    tr_stop, tr_alt = out.trace[stop_mode].amax(dim=0), out.trace[alt].amax(dim=0)
    lows = torch.stack([low.max(), out.lowest[alt].max()]).tolist()
    length = threshold - 2
    return {
        "result": out.value.view(x0.shape),
        "lowest": lows[0],
        "nstep": int(nstep.max()),
        "prot_break": False,
        f"{stop_mode}_trace": _padded(tr_stop.tolist(), length, lows[0]),
        f"{alt}_trace": _padded(tr_alt.tolist(), length, lows[1]),
        "eps": eps,
        "threshold": threshold,
        "lowest_per_sample": low,
        "nstep_per_sample": nstep,
        "converged": out.converged,
    }


def broyden(f, x0, threshold, eps=1e-3, stop_mode="rel", ls=False, name="unknown", *, per_sample=True,
            **kwargs) -> Dict:
    """locuslab/deq's ``broyden``.

    ``ls=False`` (locuslab's default): :func:`imp_fast.solve` with ``method="broyden"``
    (the engine's limited-memory good Broyden with the backend's step; memory
    ``min(threshold, 30)``). ``ls=True``: locuslab's Broyden with its Armijo line search
    (the algorithm torchdeq's ``broyden_solver`` took over; :mod:`imp_fast.compat._loop`,
    memory ``threshold``): one step size for the whole batch, so the samples are coupled
    and nothing freezes; the batch stops when its largest ``stop_mode`` residual (the
    whole-batch residual with ``per_sample=False``, as in locuslab) is below ``eps``.
    """
    from .. import loop

    _warn_ignored("broyden", kwargs)
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    x0 = _check_x0(x0)
    threshold = _int("threshold", threshold, 1)
    eps = _real("eps", eps, positive=True)
    stop_mode = _stop_mode(stop_mode)
    if not isinstance(per_sample, bool):
        raise TypeError(f"per_sample must be a bool, got {type(per_sample).__name__}")
    numpy_bool = getattr(getattr(ls, "dtype", None), "kind", "") == "b"
    if not isinstance(ls, (bool, numbers.Integral)) and not numpy_bool:
        raise TypeError(f"ls must be a bool, got {type(ls).__name__} ({ls!r})")
    alt = "abs" if stop_mode == "rel" else "rel"
    if ls:
        B = x0.shape[0]
        out = _loop.run(_wrap(f, x0), x0.detach().reshape(B, -1), method="broyden", max_iter=threshold, tol=eps,
                        stop_mode=stop_mode, rel_eps=1e-9, per_sample=per_sample, ls=True)
        nstep = out.step[stop_mode]  # the step of the lowest residual (k = f evaluations after g(x0))
        low = out.lowest[stop_mode]
        tr_stop, tr_alt = out.trace[stop_mode].amax(dim=0), out.trace[alt].amax(dim=0)
        lows = torch.stack([low.max(), out.lowest[alt].max()]).tolist()
        return {
            "result": out.value.view(x0.shape),
            "lowest": lows[0],
            "nstep": int(nstep.max()),
            "prot_break": False,
            f"{stop_mode}_trace": _padded(tr_stop.tolist(), threshold + 1, lows[0]),
            f"{alt}_trace": _padded(tr_alt.tolist(), threshold + 1, lows[1]),
            "eps": eps,
            "threshold": threshold,
            "lowest_per_sample": low,
            "nstep_per_sample": nstep,
            "converged": out.converged,
        }
    r = loop.solve(f, x0, method="broyden", max_iter=threshold, tol=eps, stop=stop_mode, return_best=True,
                   trace=True, check_every=1, eps=1e-9, batched=per_sample)
    traces = {"abs": r.trace_abs, "rel": r.trace_rel}  # (T, B'), B' = B or 1
    low = {"abs": r.abs_residual, "rel": r.rel_residual}
    # The step of each sample's lowest residual: the first minimum of its trace.
    nstep = torch.nan_to_num(traces[stop_mode], nan=math.inf).argmin(dim=0)
    lows = torch.stack([low[stop_mode].max(), low[alt].max()]).tolist()
    from ..result import Status

    return {
        "result": r.z,
        "lowest": lows[0],
        "nstep": int(nstep.max()),
        "prot_break": bool((r.status == int(Status.DIVERGED)).any()),
        f"{stop_mode}_trace": _padded(traces[stop_mode].amax(dim=1).tolist(), threshold + 1, lows[0]),
        f"{alt}_trace": _padded(traces[alt].amax(dim=1).tolist(), threshold + 1, lows[1]),
        "eps": eps,
        "threshold": threshold,
        "lowest_per_sample": low[stop_mode],
        "nstep_per_sample": nstep,
        "converged": r.converged,
    }
