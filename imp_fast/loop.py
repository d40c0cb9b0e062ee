"""The batched solve loop: one f evaluation and one fused step per iteration.

Masks, counters, residuals and traces stay on the device; the host reads device
state only at checks (every ``check_every`` iterations, and after the last one) to
stop early, so the loop makes ``ceil(iterations / check_every)`` host syncs, or none
with ``check_every=None``.
"""
from __future__ import annotations


from typing import Any, Callable, Optional, Tuple, Union

import torch

from .backends import broyden as _broyden
from .backends import get_backend
from .result import SolveResult, Status
from .state import LoopState, StepParams, compute_dtype, gather_rows, running_rows
from .validation import (
    check_choice,
    check_f_output,
    check_int,
    check_positive,
    check_tensor,
    reject_unknown,
)

__all__ = ["solve", "picard", "anderson", "METHODS"]

METHODS = ("anderson", "picard", "broyden")
# Broyden keeps this many rank-one updates unless m is given (torchdeq keeps max_iter).
BROYDEN_MEMORY = 30
# Plain ints: torch.compile does not trace tensor comparisons with IntEnum members.
_RUNNING = int(Status.RUNNING)
_MAX_ITER = int(Status.MAX_ITER)
_OPTIONS = (
    "method", "max_iter", "tol", "stop", "m", "beta", "lam", "check_every", "return_best",
    "trace", "backend", "throw", "divergence", "eps", "cuda_graph", "batched", "args", "compact",
)
# Traces start this long and double as iterations run: a large max_iter costs nothing
# up front (a max_iter of 10**9 must not allocate max_iter x B at the start).
_TRACE_CHUNK = 64


def solve(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    method: str = "anderson",
    max_iter: Union[int, torch.Tensor] = 50,
    tol: Union[float, torch.Tensor] = 1e-4,
    stop: str = "rel",
    m: Optional[int] = None,
    beta: float = 1.0,
    lam: float = 1e-4,
    check_every: Optional[int] = 5,
    return_best: bool = False,
    trace: bool = False,
    backend: str = "auto",
    throw: bool = False,
    divergence: float = 1e6,
    eps: float = 1e-9,
    cuda_graph: bool = False,
    batched: bool = True,
    args: Tuple[Any, ...] = (),
    compact: bool = False,
    **unknown,
) -> SolveResult:
    """Find z with f(z) = z for every sample of a batch.

    Args:
        f: maps a tensor shaped like ``z0`` to one of the same shape, dtype and device;
            called on the whole batch once per iteration. It must treat samples
            independently for the batch-invariance guarantee to hold (or use
            ``batched=False``). f must not modify its argument in place (it is the
            solver's live state): a solve whose f does raises a RuntimeError. Under
            ``torch.autocast`` f may return a lower-precision floating dtype; it is
            cast back to the state's dtype (the state keeps z0's dtype and norms stay
            float32 or wider).
        z0: initial guess, batch on dim 0 (never modified).
        method: "anderson" (type-II Anderson acceleration), "picard", or "broyden"
            (limited-memory "good" Broyden, as in the DEQ papers; see
            :mod:`imp_fast.backends.broyden`).
        max_iter: most f evaluations: an int, or a ``(B,)`` integer tensor of
            per-sample budgets (test-time scaling: sample b stops with MAX_ITER after
            ``max_iter[b]`` updates; the loop runs ``max(max_iter)`` iterations).
        tol: a sample converges when its ``stop`` residual is below tol; it is then
            frozen (its z never changes again). A float, or a ``(B,)`` tensor of
            per-sample tolerances (test-time scaling: a sample that needs a precise
            answer gets a small tol, the rest stop early).
        stop: "rel" (||f(z)-z|| / (||f(z)|| + eps)) or "abs" (||f(z)-z||).
        m: history size: Anderson mixes the last m iterates (default 5); Broyden
            keeps the last m rank-one updates of its inverse-Jacobian estimate
            (default ``min(max_iter, 30)``; torchdeq's broyden_solver keeps max_iter).
        beta: damping, z <- (1-beta) z + beta f(z) (Anderson mixes likewise).
        lam: Anderson ridge, relative to the newest residual's squared norm.
        check_every: host checks for early exit every this many iterations;
            None runs exactly max_iter iterations with no host sync (CUDA graphs).
        return_best: return each sample's lowest-residual evaluated iterate instead of
            its last one.
        trace: keep ``(T, B)`` residual traces on the device.
        backend: "auto", "reference", "cpp" or "triton".
        throw: raise :class:`SolveError` listing the failed samples.
        divergence: a sample whose residual exceeds this many times its first
            residual is flagged DIVERGED and frozen.
        eps: added to ||f(z)|| in the relative residual.
        cuda_graph: capture the whole fixed-iteration loop (f included) in a CUDA
            graph on the first call and replay it on later calls with the same f,
            shapes and options (implies ``check_every=None``; CUDA tensors only; f
            must be capturable). See :mod:`imp_fast.graph`.
        batched: True (default): dim 0 is a batch of independent samples, each with
            its own residual, status and Anderson system. False: the whole tensor is
            ONE problem (one status, one residual norm over all entries, one Anderson
            system) — use it when the rows of the state are coupled, e.g. graph
            nodes x features where f mixes nodes; with the per-sample default such
            rows would freeze one by one although they are not independent. The
            result's per-sample tensors then have length 1 (traces ``(T, 1)``).
        args: extra arguments: f is called as ``f(z, *args)``. Every tensor in args
            must have the batch on dim 0 (other values are passed as they are).
            Without ``compact`` this is the same as closing over them.
        compact: active sets. At each check (every ``check_every`` iterations) the
            samples that froze leave the working set: from then on f and the step
            run on the running rows only (z, the Anderson history and the tensors in
            ``args`` are gathered once per check, not per iteration) and the answers
            are scattered back at the end. Statuses, n_iter, residuals, traces and
            ``return_best`` keep their meaning, and the answers equal the
            uncompacted solve for a batch-separable f (bit for bit when f computes a
            row the same way whatever the number of rows; a BLAS matrix product
            rounds by row count, which near tol can move a sample's stop by an
            iteration). It pays when samples need
            very different numbers of iterations; it is wrong for an f that couples
            samples (BatchNorm in training mode, batch statistics): there, leave it
            off. Needs ``check_every`` (an int) and ``batched=True``.

    Returns:
        :class:`SolveResult`. Runs under ``torch.no_grad()``: for gradients use
        :func:`imp_fast.implicit_solve`.
    """
    reject_unknown("solve", unknown, _OPTIONS)
    if cuda_graph:
        from .graph import solve_graphed

        if args or compact or isinstance(max_iter, torch.Tensor) or isinstance(tol, torch.Tensor):
            raise ValueError(
                "cuda_graph=True runs a fixed max_iter and one tol for the whole batch: args=, compact=True and "
                "per-sample max_iter / tol tensors are not supported there (close over the tensors instead)"
            )
        return solve_graphed(
            f, z0, method=method, max_iter=max_iter, tol=tol, stop=stop, m=m, beta=beta, lam=lam,
            return_best=return_best, trace=trace, backend=backend, throw=throw,
            divergence=divergence, eps=eps, batched=batched,
        )
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    check_tensor("z0", z0)
    check_choice("method", method, METHODS)
    check_choice("stop", stop, ("rel", "abs"))
    budget = None
    if isinstance(max_iter, torch.Tensor):
        budget, max_iter = _check_budget(max_iter, z0, batched)
    max_iter = check_int("max_iter", max_iter, minimum=1)
    tol_t = None
    if isinstance(tol, torch.Tensor) and tol.dim() == 0 and not tol.dtype.is_complex:
        tol = float(tol)  # a 0-d tensor is one tolerance for the batch
    if isinstance(tol, torch.Tensor):
        tol_t = _check_tol(tol, z0, batched)
        tol = 0.0  # the steps read st.tol
    else:
        tol = check_positive("tol", tol)
    m = check_int("m", m, minimum=1, allow_none=True)
    if m is None:
        m = min(max_iter, BROYDEN_MEMORY) if method == "broyden" else 5
    beta = check_positive("beta", beta)
    if beta >= 2.0:
        raise ValueError(f"beta must be in (0, 2), got {beta!r}")
    lam = check_positive("lam", lam, allow_zero=True)
    check_every = check_int("check_every", check_every, minimum=1, allow_none=True)
    divergence = check_positive("divergence", divergence)
    if divergence <= 1.0:
        raise ValueError(f"divergence must be > 1 (a factor on the first residual), got {divergence!r}")
    eps = check_positive("eps", eps, allow_zero=True)
    if not isinstance(batched, bool):
        raise TypeError(f"batched must be a bool, got {type(batched).__name__}")
    args = _check_args(args, z0, batched)
    if not isinstance(compact, bool):
        raise TypeError(f"compact must be a bool, got {type(compact).__name__}")
    if compact and check_every is None:
        raise ValueError("compact=True needs check_every (an int): the working set shrinks at checks")
    if compact and not batched:
        raise ValueError("compact=True needs batched=True (with batched=False there is one problem)")
    impl = get_backend(backend, z0.device)
    params = StepParams(tol=tol, beta=beta, stop_rel=(stop == "rel"), divergence=divergence, eps=eps, lam=lam)
    result = run_loop(
        f, z0, impl=impl, params=params, method=method, m=m, max_iter=max_iter, check_every=check_every,
        return_best=return_best, trace=trace, batched=batched, args=args, compact=compact, budget=budget,
        stop=stop, tol_t=tol_t,
    )
    if throw:
        result.raise_on_failure()
    return result


def run_loop(
    f: Callable[..., torch.Tensor],
    z0: torch.Tensor,
    *,
    impl,
    params: StepParams,
    method: str,
    m: int,
    max_iter: int,
    check_every: Optional[int],
    return_best: bool = False,
    trace: bool = False,
    batched: bool = True,
    args: Tuple[Any, ...] = (),
    compact: bool = False,
    budget: Optional[torch.Tensor] = None,
    stop: str = "rel",
    on_step: Optional[Callable[[int, LoopState], None]] = None,
    tol_t: Optional[torch.Tensor] = None,
) -> SolveResult:
    """The loop behind :func:`solve`, on already-checked arguments (internal API).

    Shared with the Lipschitz probes (:mod:`imp_fast.probes`), which run it with
    ``tol=0`` and ``divergence=inf`` (no sample freezes unless it turns non-finite) and
    read the state after every step through ``on_step(k, state)`` (k = 0-based
    iteration; ``state.z`` holds the iterate after the step, ``state.abs_res`` the
    residual of the iterate before it). ``on_step`` is not supported with compaction.
    """
    if on_step is not None and compact:
        raise ValueError("run_loop: on_step does not support compact=True")
    shape = z0.shape
    # batched=False: the whole tensor is one "sample" of the engine.
    B = shape[0] if batched else 1
    with torch.no_grad():
        z = z0.detach().reshape(B, -1).clone(memory_format=torch.contiguous_format)
        st = LoopState.create(z, m=m if method == "anderson" else None, return_best=return_best,
                              broyden_m=m if method == "broyden" else None, tol=tol_t)
        cdt = compute_dtype(z.dtype)
        tr_abs = tr_rel = None
        if trace:
            tr_abs = torch.empty(min(max_iter, _TRACE_CHUNK), B, dtype=cdt, device=z.device)
            tr_rel = torch.empty_like(tr_abs)
        host_syncs = 0
        k = 0
        compiling = torch.compiler.is_compiling()  # once: it costs microseconds per call
        anderson_step, picard_step = impl.anderson_step, impl.picard_step
        is_anderson = method == "anderson"
        broyden_step = None
        if method == "broyden":  # the backend's fused op, else the plain-torch step
            broyden_step = impl.broyden_step or _broyden.broyden_step
        # f must not write into its argument (the live state). Version counters catch
        # it for free; inference tensors have none, so there f gets a copy instead.
        protect = not compiling and st.z.is_inference()
        watch = not compiling and not protect
        autocast_on = not compiling and _autocast_enabled(z.device.type)
        # The working set: `work` is the state f and the steps see. Without compaction
        # it is `st` itself; with it, the running rows (global indices `rows`) of st.
        work, rows, w_args, w_budget = st, None, args, budget
        # Hoisted out of the loop: at small sizes Python work per iteration shows up.
        w_shape, z0_shape = shape, None  # z0_shape: set once the working set shrank (error messages)
        z_in = st.z if st.z.shape == shape else st.z.view(shape)
        z_lo, z_hi = (0, 0) if compiling else _storage_span(st.z)
        flat = z0.dim() == 2 and batched
        for k in range(max_iter):
            if watch:
                version = work.z._version
                fz = f(z_in, *w_args)
                if work.z._version != version:
                    raise RuntimeError(
                        "f modified its input in place (e.g. z.mul_(...), z += ..., z[...] = ...); the "
                        "argument f receives is the solver's live state. Return a new tensor instead "
                        "(z * 0.5 + 1 rather than z.mul_(0.5).add_(1)). The solve was stopped; z0 is unchanged."
                    )
            else:
                fz = f(z_in.clone() if protect else z_in, *w_args)
            if autocast_on and isinstance(fz, torch.Tensor) and fz.dtype != z.dtype and fz.is_floating_point():
                fz = fz.to(z.dtype)  # autocast: f ran in lower precision; the state keeps its dtype
            check_f_output(fz, z_in, w_shape, z0_shape)
            if not flat:
                fz = fz.reshape(work.z.shape)
            if not compiling and z_lo <= fz.data_ptr() < z_hi:
                fz = fz.clone()  # f returned (a view of) its input: we update z in place
            if is_anderson:
                anderson_step(work, fz, params, k % m)
            elif broyden_step is not None:
                broyden_step(work, fz, params, k)
            else:
                picard_step(work, fz, params)
            if k == 0:
                work.abs0.copy_(work.abs_res)
            if on_step is not None:
                on_step(k, work)
            if w_budget is not None:  # per-sample max_iter: out of budget -> MAX_ITER
                work.status.masked_fill_((work.n_iter >= w_budget) & (work.status == _RUNNING), _MAX_ITER)
            if trace:
                if k == tr_abs.shape[0]:
                    tr_abs, tr_rel = _grow(tr_abs, max_iter), _grow(tr_rel, max_iter)
                if rows is None:
                    tr_abs[k].copy_(work.abs_res)
                    tr_rel[k].copy_(work.rel_res)
                else:  # frozen samples keep their last residual, as without compaction
                    tr_abs[k].copy_(tr_abs[k - 1]).index_copy_(0, rows, work.abs_res)
                    tr_rel[k].copy_(tr_rel[k - 1]).index_copy_(0, rows, work.rel_res)
            done = k + 1
            if check_every is not None and (done % check_every == 0 or done == max_iter):
                host_syncs += 1
                if not compact:
                    # Codes are >= 0 and RUNNING is 0: one reduction answers "any running?".
                    if int(work.status.min()) != _RUNNING:
                        break
                    continue
                keep = running_rows(work.status)  # the check's one sync
                if keep.numel() == 0:
                    break
                # Gathering costs a pass over the working state: worth it once a few
                # rows (here 1/8 of the working set, at least one) have frozen.
                if keep.numel() <= work.z.shape[0] - max(1, work.z.shape[0] // 8) and done < max_iter:
                    if rows is not None:
                        work.scatter_into(st, rows)
                    # Broyden: U and V are copied only as far as they are written
                    slots = None if broyden_step is None else _broyden.written_slots(done, m)
                    work = work.gather(keep, broyden_slots=slots)
                    # the batched arguments, the budgets and the global row indices: one gather
                    n_args = len(w_args)
                    moved = gather_rows(w_args + (w_budget, rows), keep)
                    w_args, w_budget = moved[:n_args], moved[n_args]
                    rows = keep if rows is None else moved[n_args + 1]
                    w_shape = (keep.numel(),) + tuple(shape[1:])
                    z0_shape = shape
                    z_in = work.z if work.z.shape == w_shape else work.z.view(w_shape)
                    z_lo, z_hi = (0, 0) if compiling else _storage_span(work.z)
        iterations = k + 1
        if rows is not None:
            work.scatter_into(st, rows)
        st.status.masked_fill_(st.status == _RUNNING, _MAX_ITER)
        if return_best:
            z_out, abs_out, rel_out = st.best_z, st.best_abs, st.best_rel
        else:
            z_out, abs_out, rel_out = st.z, st.abs_res, st.rel_res
    result = SolveResult(
        z=z_out.view(shape),
        status=st.status,
        n_iter=st.n_iter,
        abs_residual=abs_out,
        rel_residual=rel_out,
        trace_abs=None if tr_abs is None else tr_abs[:iterations],
        trace_rel=None if tr_rel is None else tr_rel[:iterations],
        host_syncs=host_syncs,
        iterations=iterations,
        method=method,
        backend=impl.name,
        tol=params.tol if tol_t is None else tol_t,
        stop=stop,
    )
    return result


def _check_budget(max_iter: torch.Tensor, z0: torch.Tensor, batched: bool) -> Tuple[torch.Tensor, int]:
    """A (B,) per-sample max_iter tensor: checked, on z0's device; and its maximum."""
    B = z0.shape[0] if batched else 1
    if max_iter.dtype.is_floating_point or max_iter.dtype == torch.bool or max_iter.is_complex():
        raise TypeError(f"max_iter as a tensor must hold integers, got dtype {max_iter.dtype}")
    if max_iter.shape != (B,):
        raise ValueError(f"max_iter as a tensor must have shape ({B},) (one budget per sample), got {tuple(max_iter.shape)}")
    lo, hi = int(max_iter.min()), int(max_iter.max())
    if lo < 1:
        raise ValueError(f"max_iter must be >= 1 for every sample, got a budget of {lo}")
    return max_iter.to(device=z0.device, dtype=torch.int32), hi


def _check_tol(tol: torch.Tensor, z0: torch.Tensor, batched: bool) -> torch.Tensor:
    """A (B,) per-sample tol tensor: checked (real, >= 0, no NaN), as a float tensor on z0's device."""
    B = z0.shape[0] if batched else 1
    if not (tol.dtype.is_floating_point or tol.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                          torch.uint8)):
        raise TypeError(f"tol as a tensor must hold real numbers, got dtype {tol.dtype}")
    if tol.shape != (B,):
        raise ValueError(f"tol as a tensor must have shape ({B},) (one tolerance per sample), got {tuple(tol.shape)}")
    if tol.device != z0.device:
        raise ValueError(f"tol is on {tol.device}, expected z0's device {z0.device}")
    t = tol.detach().to(torch.float64)
    if bool(torch.isnan(t).any()) or bool((t < 0).any()):
        raise ValueError(f"tol must be >= 0 (and not NaN) for every sample, got min {float(t.min())}")
    return tol.detach().to(compute_dtype(z0.dtype))


def _check_args(args: Any, z0: torch.Tensor, batched: bool) -> Tuple[Any, ...]:
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"args must be a tuple of f's extra arguments, got {type(args).__name__}")
    args = tuple(args)
    if batched:
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and (a.dim() == 0 or a.shape[0] != z0.shape[0]):
                raise ValueError(
                    f"args[{i}] must have the batch on dim 0 ({z0.shape[0]} rows, like z0), got shape "
                    f"{tuple(a.shape)}; close over tensors that are not batched instead of passing them in args"
                )
    return args


def _grow(trace: torch.Tensor, max_iter: int) -> torch.Tensor:
    """The trace with twice the rows (at most max_iter), the old rows copied."""
    rows = min(2 * trace.shape[0], max_iter)
    try:
        out = trace.new_empty(rows, trace.shape[1])
    except RuntimeError as exc:  # out of memory: name the option that asked for it
        raise RuntimeError(
            f"trace=True: cannot grow the residual trace to {rows} x {trace.shape[1]} entries "
            f"({exc}); use trace=False or a smaller max_iter"
        ) from exc
    out[: trace.shape[0]].copy_(trace)
    return out


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cuda":
            return torch.is_autocast_enabled()
        return device_type == "cpu" and torch.is_autocast_cpu_enabled()


def _storage_span(t: torch.Tensor) -> Tuple[int, int]:
    """The address range of t's storage: a tensor shares t's storage exactly when its data
    pointer lies in it (distinct live storages do not overlap; a non-empty view's data
    pointer lies inside its storage)."""
    s = t.untyped_storage()
    return s.data_ptr(), s.data_ptr() + s.nbytes()


def picard(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, **options) -> SolveResult:
    """Damped fixed-point iteration: ``solve(f, z0, method="picard", **options)``."""
    if "method" in options:
        raise TypeError("picard() sets method='picard'; do not pass method")
    return solve(f, z0, method="picard", **options)


def anderson(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, **options) -> SolveResult:
    """Anderson acceleration: ``solve(f, z0, method="anderson", **options)``."""
    if "method" in options:
        raise TypeError("anderson() sets method='anderson'; do not pass method")
    return solve(f, z0, method="anderson", **options)


