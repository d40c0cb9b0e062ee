"""Drop-in for torchdeq's solver functions.

Same names, arguments and return values as ``torchdeq.solver``::

    from imp_fast.compat.torchdeq import anderson_solver   # was: from torchdeq.solver import ...
    z, indexing_list, info = anderson_solver(func, x0, max_iter=50, tol=1e-3)

or, for code that builds its DEQ with ``torchdeq.get_deq``, register them and name them
in the config::

    from imp_fast.compat.torchdeq import register_solvers
    register_solvers()                    # adds 'imp_fast_anderson', 'imp_fast_broyden', ...
    deq = get_deq(f_solver="imp_fast_anderson", b_solver="imp_fast_anderson", ...)

What matches torchdeq (tested side by side with torchdeq itself):

* the iterates: Anderson with torchdeq's *absolute* ridge ``lam`` (``G G^T + lam I``),
  its bordered system, its two undamped starting evaluations and ``tau`` mixing;
  ``fixed_point_iter``'s damped map ``tau f(x) + (1 - tau) x`` and its residuals; the
  value returned is ``f(x)`` at the lowest residual, as in torchdeq; ``broyden_solver``'s
  limited-memory good Broyden on ``g(x) = f(x) - x`` (``g(x0)`` first, then
  ``x += update`` and one evaluation per step, its Sherman-Morrison pairs with NaN
  entries zeroed, ``LBFGS_thres`` pairs kept as a ring overwritten at slot
  ``(nstep - 1) % LBFGS_thres``, residuals ``||g(x)||`` and
  ``||g(x)|| / (||g(x) + x|| + 1e-9)``); it returns the lowest-residual *iterate* ``x``,
  not ``f(x)``, as torchdeq's does;
* ``info``: ``abs_lowest``/``rel_lowest``/``nstep`` ``(B,)`` and ``abs_trace``/
  ``rel_trace`` ``(B, N)`` (N = ``max(max_iter - 1, 1)`` for Anderson, ``max_iter + 1``
  for fixed_point_iter and broyden_solver, first column torchdeq's 1e8 placeholder,
  padded with the lowest values after an early stop); ``nstep`` counts steps as
  torchdeq does (its Anderson's first recorded step is 3, Broyden's and Picard's 1);
  dtypes (float64 info for float64 states); a ``SolverStat`` when torchdeq is importable;
* ``return_final=True`` runs every iteration and returns the final value (for Broyden,
  torchdeq's "no progress" test can still end the batch after step 30, and does here
  too: see below);
* ``max_iter=0`` (and, for Anderson, 1 or 2) returns ``x0`` itself with torchdeq's
  placeholder info, and ``indexing`` then holds ``[x0]``;
* ``broyden_solver``'s ``indexing`` keeps torchdeq's offset: index ``i`` holds the
  lowest-residual iterate after step ``i - 1`` (torchdeq tests ``nstep + 1 in indexing``;
  index 1 never matches), where Anderson's and fixed_point_iter's hold step ``i``;
* ``indexing`` accepts numpy integers and integral floats (a step is recorded when it
  equals one of them); a 0-d ``x0`` is a batch of one and comes back shaped ``(1,)``;
  a 1-d ``x0`` is a batch of scalars;
* ``simple_fixed_point_iter`` runs exactly ``max_iter`` steps (on :func:`imp_fast.solve`,
  with no host sync), accepts the ``tol``/``stop_mode`` that torchdeq's DEQ classes pass
  it, takes a list of tensors as the state (torchdeq's ``no_stat`` path for multi-tensor
  states), and when autograd is recording it runs as a plain differentiable loop, as
  torchdeq's does.

Remaining differences, by design:

* per-sample freezing: a sample whose stop-mode residual falls below ``tol`` is frozen
  there, and the loop ends when every sample has (torchdeq keeps iterating converged
  samples until the whole batch is below tol at the same step, so it may return a
  later, lower-residual value for them, with their ``*_lowest``/``nstep``/trace from
  that later step). A sample's answer therefore does not depend on its batch, and f is
  never evaluated more often than in torchdeq (Anderson with ``max_iter <= 2`` does not
  evaluate it at all; torchdeq evaluates it twice and discards both; Broyden with
  ``max_iter=0`` does not evaluate it, torchdeq evaluates ``g(x0)`` once);
* Broyden's "no progress" break: after step 30, torchdeq stops the batch when the
  batch's largest stop-mode residual is below ``3 tol`` and, at each of the last 30
  steps, the largest residual over the batch is within 1.3x of the smallest. For a
  batch of one that is "below 3 tol after step 30", and the drop-in applies it per
  sample: a sample whose residual is below ``3 tol`` at a step > 30 is frozen there
  like one below ``tol`` (so its answer is torchdeq's for it alone, and the batch
  never runs longer than torchdeq's). With ``return_final=True`` nothing freezes and
  torchdeq's batch-wide test ends the loop exactly as in torchdeq;
* ``broyden_solver(ls=True)`` runs torchdeq's Armijo line search, which picks one step
  size for the whole batch from the norm over all samples: the samples are coupled
  there, so nothing freezes and the batch stops as torchdeq's does (its largest
  stop-mode residual below ``tol``, the "no progress" rule, or max_iter), with the
  search's arithmetic in the compute dtype as torchdeq's (float16/bfloat16 states search
  in float32);
* Gram matrices, norms and weights (and Broyden's pairs, steps and residuals) are
  float32 or wider (torchdeq works in x0's dtype and cannot run Anderson on bfloat16);
  sums are accumulated in another order, so iterates agree to rounding, not bit for
  bit (float64 Broyden iterates agreed to ~1e-15 in the tests);
* a sample whose residual becomes NaN/Inf is frozen: it returns its last lowest value
  and reports NaN ``abs_lowest``/``rel_lowest`` (torchdeq's masked update turns its value
  into NaN too and keeps iterating the batch to ``max_iter``: a NaN in the batch also
  disables its Broyden "no progress" break);
* an exactly singular Anderson system (``lam=0`` with repeated residuals) takes a damped
  step instead of raising;
* ``func`` must return x0's shape (torchdeq reshapes any output with the same number of
  entries, e.g. (B, H, W, C) for a (B, C, H, W) state, which silently scrambles it); a
  floating output of another dtype is cast to x0's dtype (torchdeq's Anderson does the
  same through its buffers);
* arguments are checked: ``max_iter`` a non-negative int (numpy ints too), ``m >= 1``
  (torchdeq fails with an IndexError for m = 1; here m = 1 is Picard), ``lam >= 0``,
  ``tau > 0``, ``tol >= 0``, ``LBFGS_thres`` ``None`` or an int ``>= 1`` (torchdeq
  fails with ZeroDivisionError for 0), ``ls`` a bool, ``indexing`` integral values;
  errors name the argument;
* unknown keyword arguments, which torchdeq ignores silently, still run but warn once
  naming them (``simple_fixed_point_iter`` accepts ``tol`` and ``stop_mode`` silently);
* ``anderson_solver``/``fixed_point_iter``/``broyden_solver`` also accept a list of
  tensors as the state (torchdeq's fail); ``simple_fixed_point_iter`` also accepts
  0-d/1-d states (torchdeq's fails computing its statistics);
* ``simple_fixed_point_iter`` calls ``func(x)`` and applies ``tau`` itself (torchdeq calls
  ``func(x, tau=tau)``, which its DEQ wrappers implement the same way); outside autograd
  recording it runs on :func:`imp_fast.solve`, which freezes a sample whose f returns
  NaN/Inf at its last finite state (its info residuals are NaN; torchdeq carries the
  NaN on);
* ``get_solver`` raises a ``ValueError`` naming the available solvers for an unknown
  name (torchdeq's asserts).
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, List, Tuple

import torch

from ..loop import solve
from . import _loop

__all__ = [
    "anderson_solver",
    "broyden_solver",
    "fixed_point_iter",
    "simple_fixed_point_iter",
    "get_solver",
    "register_solvers",
    "SOLVERS",
]

_INIT_LOSS = _loop.INIT_LOSS
def _warn_ignored(func: str, kwargs: dict) -> None:
    _loop.warn_ignored(f"imp_fast.compat.torchdeq.{func}", "torchdeq", kwargs, stacklevel=4)


# ----------------------------------------------------------------------------- checks


def _int_like(name: str, value, *, minimum: int) -> int:
    """An int, numpy integer or other integral type (not bool, not float: torchdeq's
    ``range(max_iter)`` rejects floats too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _real(name: str, value, *, minimum: float, strict: bool = False, finite: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    v = float(value)
    if math.isnan(v) or (finite and not math.isfinite(v)) or v < minimum or (strict and v == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(f"{name} must be {'finite and ' if finite else ''}{bound}, got {value!r}")
    return v


def _check_indexing(indexing) -> Tuple[int, ...]:
    """torchdeq records a step k when ``k in indexing``: numpy integers and integral
    floats (4.0) match; a value that can never equal a step (2.5) is an error here."""
    if indexing is None:
        return ()
    if isinstance(indexing, (str, bytes)) or not hasattr(indexing, "__iter__"):
        raise TypeError(
            f"indexing must be a list of steps (ints), got {type(indexing).__name__} ({indexing!r})"
        )
    steps = []
    for v in (indexing.tolist() if isinstance(indexing, torch.Tensor) else indexing):
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool):
            raise TypeError(f"indexing must hold integral step numbers, got the bool {v!r}")
        if isinstance(v, numbers.Integral):
            steps.append(int(v))
        elif isinstance(v, numbers.Real) and math.isfinite(float(v)) and float(v).is_integer():
            steps.append(int(v))
        else:
            raise ValueError(
                f"indexing must hold integral step numbers (ints, numpy integers or floats like 4.0), "
                f"got {v!r} ({type(v).__name__}) in {list(indexing)!r}"
            )
    return tuple(steps)


def _check_stop_mode(stop_mode) -> str:
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"stop_mode must be one of ('abs', 'rel'), got {stop_mode!r}")
    return stop_mode


# ---------------------------------------------------------------------- state layout


class _Layout:
    """How torchdeq sees a state as a batch: a tensor of dim >= 2 is (B, ...); dim < 2 a
    batch of scalars (B = numel); a list/tuple of tensors is concatenated along dim 1
    (each part flattened the same way), as torchdeq's multi-tensor wrappers do."""

    def __init__(self, x0):
        if isinstance(x0, torch.Tensor):
            self.parts = None
            self.shape = x0.shape
            self._check_dtype(x0, "x0")
            self.dtype, self.device = x0.dtype, x0.device
            self.B = x0.shape[0] if x0.dim() >= 2 else x0.numel()
        elif isinstance(x0, (list, tuple)) and x0 and all(isinstance(t, torch.Tensor) for t in x0):
            self.parts = [t.shape for t in x0]
            self.kind = type(x0)
            for i, t in enumerate(x0):
                self._check_dtype(t, f"x0[{i}]")
            self.dtype, self.device = x0[0].dtype, x0[0].device
            bs = [t.shape[0] if t.dim() >= 2 else t.numel() for t in x0]
            for i, t in enumerate(x0):
                if t.dtype != self.dtype or t.device != self.device:
                    raise TypeError(
                        f"x0[{i}] has dtype {t.dtype} on {t.device}; every tensor of a list state must share "
                        f"x0[0]'s dtype {self.dtype} and device {self.device}"
                    )
                if bs[i] != bs[0]:
                    raise ValueError(
                        f"x0[{i}] has batch size {bs[i]}, x0[0] has {bs[0]}: every tensor of a list state "
                        f"must have the batch on dim 0"
                    )
            self.sizes = [t[0].numel() if t.dim() >= 2 else 1 for t in x0]
            self.B = bs[0]
        else:
            raise TypeError(f"x0 must be a torch.Tensor or a list of tensors, got {type(x0).__name__}")
        if self.B == 0:
            raise ValueError(f"x0 is empty (shape {self._describe(x0)}); need at least one sample")

    @staticmethod
    def _check_dtype(t: torch.Tensor, name: str) -> None:
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")

    @staticmethod
    def _describe(x) -> str:
        if isinstance(x, torch.Tensor):
            return str(tuple(x.shape))
        return "[" + ", ".join(str(tuple(t.shape)) for t in x) + "]"

    @staticmethod
    def _flat(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(-1, 1)

    def pack(self, x) -> torch.Tensor:
        if self.parts is None:
            return self._flat(x)
        return torch.cat([self._flat(t) for t in x], dim=1)

    def unpack(self, v: torch.Tensor, *, result: bool = False):
        """(B, D) -> the state's layout. ``result``: torchdeq's answers for a 0-d x0
        come back shaped (1,)."""
        if self.parts is None:
            if result and len(self.shape) == 0:
                return v.reshape(1)
            return v.reshape(self.shape)
        out = [p.reshape(s) for p, s in zip(v.split(self.sizes, dim=1), self.parts)]
        return self.kind(out)

    def wrap(self, func: Callable, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """f on packed (B, D) states, checking that func keeps the state's layout."""

        def f(v: torch.Tensor) -> torch.Tensor:
            out = func(self.unpack(v))
            return self.pack(self.check_output(out, name))

        return f

    def check_output(self, out, name: str):
        if self.parts is None:
            self._check_one(out, self.shape, name, "x0")
            return out.to(self.dtype) if out.dtype != self.dtype else out
        if not isinstance(out, (list, tuple)) or len(out) != len(self.parts):
            got = f"a {type(out).__name__}" + (f" of length {len(out)}" if isinstance(out, (list, tuple)) else "")
            raise TypeError(f"{name} must return a list of {len(self.parts)} tensors like x0, got {got}")
        res = []
        for i, (o, s) in enumerate(zip(out, self.parts)):
            self._check_one(o, s, f"{name} output [{i}]", f"x0[{i}]")
            res.append(o.to(self.dtype) if o.dtype != self.dtype else o)
        return res

    def _check_one(self, out, shape, name: str, ref: str) -> None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{name} must return a torch.Tensor, got {type(out).__name__}")
        if out.shape != shape:
            same = out.numel() == math.prod(shape)
            raise ValueError(
                f"{name} returned shape {tuple(out.shape)}, expected {ref}'s shape {tuple(shape)}"
                + (" (same number of entries in another layout: reshaping it would scramble the state, so "
                   "return it in x0's layout, e.g. permute a channels-last output back)" if same else "")
            )
        if out.device != self.device:
            raise ValueError(f"{name} returned a tensor on {out.device}, expected {ref}'s device {self.device}")
        if not out.is_floating_point():
            raise TypeError(f"{name} returned dtype {out.dtype}, expected a floating dtype like {ref} ({self.dtype})")


# ------------------------------------------------------------------------ solvers


def _info_from_loop(out: _loop.LoopOut, stop_mode: str, n_trace: int) -> Dict[str, torch.Tensor]:
    B = out.value.shape[0]
    dev = out.value.device
    # torchdeq's info starts as float32 placeholders; recorded residuals (in x0's dtype)
    # promote it: float64 for float64 states.
    dtype = torch.promote_types(torch.float32, out.value.dtype) if out.recorded else torch.float32
    info = {}
    for mode in ("abs", "rel"):
        low = out.lowest[mode].to(dtype) if out.recorded else torch.full((B,), _INIT_LOSS, device=dev)
        body = out.trace[mode].to(dtype)
        pad = n_trace - 1 - body.shape[1]
        parts = [torch.full((B, 1), _INIT_LOSS, dtype=dtype, device=dev), body]
        if pad > 0:
            parts.append(low[:, None].expand(B, pad))
        info[f"{mode}_trace"] = torch.cat(parts, dim=1)
        info[f"{mode}_lowest"] = low
    info["nstep"] = out.step[stop_mode].to(torch.float32)
    return _stat(info)


def _stat(info: dict):
    try:  # torchdeq's SolverStat when available, so isinstance checks keep working
        from torchdeq.solver.stat import SolverStat
    except Exception:
        info.setdefault("sradius", torch.tensor([-1.0]))
        return info
    return SolverStat(**info)


def _run(func, x0, *, method: str, max_iter, tol, stop_mode, indexing, tau, return_final,
         m: int = 6, lam: float = 1e-4, lbfgs=None, ls=False):
    if not callable(func):
        raise TypeError(f"func must be callable, got {type(func).__name__}")
    layout = _Layout(x0)
    max_iter = _int_like("max_iter", max_iter, minimum=0)
    tol = _real("tol", tol, minimum=0.0, finite=False)
    stop_mode = _check_stop_mode(stop_mode)
    steps = _check_indexing(indexing)
    tau = _real("tau", tau, minimum=0.0, strict=True)
    if method == "anderson":
        m = _int_like("m", m, minimum=1)
        lam = _real("lam", lam, minimum=0.0)
    loop_steps = steps
    if method == "broyden":
        lbfgs = 0 if lbfgs is None else _int_like("LBFGS_thres", lbfgs, minimum=1)
        numpy_bool = type(ls).__module__ == "numpy" and getattr(getattr(ls, "dtype", None), "kind", "") == "b"
        if ls is not None and not isinstance(ls, (bool, numbers.Integral)) and not numpy_bool:
            raise TypeError(f"ls must be a bool, got {type(ls).__name__} ({ls!r})")
        # torchdeq's broyden_solver keeps the state after step s when s + 1 is in indexing.
        loop_steps = tuple(s - 1 for s in steps)
    out = _loop.run(
        layout.wrap(func, "func"), layout.pack(x0).detach(), method=method, max_iter=max_iter, tol=tol,
        stop_mode=stop_mode, m=m, lam=lam, tau=tau, return_final=bool(return_final), keep="f",
        rel_eps=1e-9, per_sample=True, indexing=loop_steps, lbfgs=lbfgs or 0, ls=bool(ls),
    )
    n_trace = max(max_iter - 1, 1) if method == "anderson" else max_iter + 1
    info = _info_from_loop(out, stop_mode, n_trace)
    # torchdeq returns x0 itself (not a copy) when it recorded no step.
    z = layout.unpack(out.value, result=True) if out.recorded else x0
    indexing_list = [layout.unpack(v, result=True) for _, v in out.snapshots]
    if indexing is not None and len(steps) and not indexing_list:
        indexing_list.append(z)  # torchdeq: "at least return the lowest value"
    return z, indexing_list, info


def anderson_solver(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None, m=6, lam=1e-4,
                    tau=1.0, return_final=False, **kwargs):
    """torchdeq's ``anderson_solver``: Anderson acceleration (type II) on ``func``.

    ``lam`` is torchdeq's absolute ridge on the Gram matrix ``G G^T``; see the module
    docstring for what matches torchdeq and what differs.
    """
    _warn_ignored("anderson_solver", kwargs)
    return _run(func, x0, method="anderson", max_iter=max_iter, tol=tol,
                stop_mode=stop_mode, indexing=indexing, tau=tau, return_final=return_final, m=m, lam=lam)


def fixed_point_iter(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None, tau=1.0,
                     return_final=False, **kwargs):
    """torchdeq's ``fixed_point_iter``: damped Picard iteration with statistics."""
    _warn_ignored("fixed_point_iter", kwargs)
    return _run(func, x0, method="picard", max_iter=max_iter, tol=tol,
                stop_mode=stop_mode, indexing=indexing, tau=tau, return_final=return_final)


def broyden_solver(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None, LBFGS_thres=None, ls=False,
                   return_final=False, **kwargs):
    """torchdeq's ``broyden_solver``: limited-memory good Broyden on ``g(x) = f(x) - x``.

    Returns the lowest-residual *iterate* (not ``f`` of it), as torchdeq does.
    ``LBFGS_thres`` is the number of Broyden pairs kept (a ring; ``None``: ``max_iter``).
    ``ls=True`` runs torchdeq's batch-wide Armijo line search (no per-sample freezing
    then). See the module docstring for what matches torchdeq and what differs.
    """
    _warn_ignored("broyden_solver", kwargs)
    return _run(func, x0, method="broyden", max_iter=max_iter, tol=tol, stop_mode=stop_mode, indexing=indexing,
                tau=1.0, return_final=return_final, lbfgs=LBFGS_thres, ls=ls)


def simple_fixed_point_iter(func, x0, max_iter=50, tau=1.0, indexing=None, tol=None, stop_mode=None, **kwargs):
    """torchdeq's ``simple_fixed_point_iter``: exactly ``max_iter`` damped steps, final-step
    statistics (``abs``/``rel`` of the last step, ``nstep = max_iter``).

    ``tol`` and ``stop_mode`` are accepted and ignored, as in torchdeq (its DEQ classes
    pass them to every solver). ``x0`` may be a list of tensors (torchdeq's multi-tensor
    ``no_stat`` path: ``func`` takes and returns the list). Without autograd recording the
    steps run on :func:`imp_fast.solve` (no host sync); with it (torchdeq's loop is then
    differentiable through every step) they run as a plain loop of the same steps.
    """
    _warn_ignored("simple_fixed_point_iter", kwargs)
    if not callable(func):
        raise TypeError(f"func must be callable, got {type(func).__name__}")
    layout = _Layout(x0)
    max_iter = _int_like("max_iter", max_iter, minimum=0)
    tau = _real("tau", tau, minimum=0.0, strict=True)
    steps = set(_check_indexing(indexing))

    def damped(x_flat, out):
        out = layout.pack(layout.check_output(out, "func"))
        return out if tau == 1.0 else tau * out + (1 - tau) * x_flat

    indexing_list: List = []
    if max_iter == 0:
        xf = layout.pack(x0)
        return x0, indexing_list, _final_stat(xf, xf, 0)
    if torch.is_grad_enabled():
        # torchdeq's loop, differentiable through every step.
        x = layout.pack(x0)
        fx = x
        for k in range(max_iter):
            x = fx
            fx = damped(x, func(layout.unpack(x)))
            if k + 1 in steps:
                indexing_list.append(layout.unpack(fx, result=True))
        return layout.unpack(fx, result=True), indexing_list, _final_stat(x, fx, max_iter)

    snaps: Dict[int, torch.Tensor] = {}
    calls = [0]

    def f(z):
        # Call c receives the state after c - 1 steps: keep the ones asked for.
        done = calls[0]
        calls[0] += 1
        if done in steps and done >= 1:
            snaps[done] = z.clone()
        return damped(z, func(layout.unpack(z)))

    res = solve(f, layout.pack(x0).detach(), method="picard", max_iter=max_iter, beta=1.0, stop="abs",
                tol=torch.finfo(torch.float64).tiny, divergence=1e300, eps=1e-8, check_every=None,
                backend="auto")
    if max_iter in steps:
        snaps[max_iter] = res.z
    indexing_list = [layout.unpack(snaps[k], result=True) for k in sorted(snaps)]
    info = _stat({
        "abs_lowest": res.abs_residual.float(),
        "rel_lowest": res.rel_residual.float(),
        "abs_trace": res.abs_residual.float()[:, None],
        "rel_trace": res.rel_residual.float()[:, None],
        "nstep": torch.full((layout.B,), float(max_iter), device=res.z.device),
    })
    return layout.unpack(res.z, result=True), indexing_list, info


def _final_stat(x: torch.Tensor, fx: torch.Tensor, nstep: int):
    """torchdeq's ``SolverStat.from_final_step`` on packed (B, D) states."""
    with torch.no_grad():
        abs_r = (fx - x).norm(dim=1)
        rel_r = abs_r / (fx.norm(dim=1) + 1e-8)
    B = x.shape[0]
    return _stat({
        "abs_lowest": abs_r, "rel_lowest": rel_r, "abs_trace": abs_r[:, None], "rel_trace": rel_r[:, None],
        "nstep": nstep * torch.ones(B, device=x.device),
    })


SOLVERS = {
    "anderson": anderson_solver,
    "broyden": broyden_solver,
    "fixed_point_iter": fixed_point_iter,
    "simple_fixed_point_iter": simple_fixed_point_iter,
}


def get_solver(key: str) -> Callable:
    """torchdeq's ``get_solver``: a solver function by name."""
    if key not in SOLVERS:
        raise ValueError(
            f"imp_fast.compat.torchdeq has no solver {key!r}; available: {', '.join(SOLVERS)}"
        )
    return SOLVERS[key]


def register_solvers(prefix: str = "imp_fast_") -> List[str]:
    """Register these solvers in torchdeq's registry (``torchdeq.solver.register_solver``)
    under ``prefix + name``, e.g. ``'imp_fast_anderson'``, and return the names.

    ``prefix=""`` replaces torchdeq's own ``'anderson'``, ``'broyden'``,
    ``'fixed_point_iter'`` and ``'simple_fixed_point_iter'`` for every DEQ built
    afterwards (torchdeq resolves the names when a DEQ is constructed). With a prefix,
    note that torchdeq's DEQ classes switch to the multi-tensor ``no_stat`` path only for
    the exact name ``'simple_fixed_point_iter'``: pass ``no_stat=True`` yourself for
    ``'imp_fast_simple_fixed_point_iter'`` with list states.
    """
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
    try:
        from torchdeq.solver import register_solver
    except ImportError as exc:
        raise ImportError("register_solvers needs torchdeq installed (pip install torchdeq)") from exc
    names = []
    for key, fn in SOLVERS.items():
        register_solver(prefix + key, fn)
        names.append(prefix + key)
    return names
