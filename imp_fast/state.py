"""The per-sample loop state that every backend's step functions update in place.

A backend implements two fused steps over this state (see ``backends/reference.py``
for the ground truth):

* ``picard_step(state, fz, params)``
* ``anderson_step(state, fz, params, slot)``

Both take the batch's ``fz = f(z)`` (shape ``(B, D)``), update residuals and statuses
of the samples still running, and move only those samples' ``z`` forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

__all__ = ["StepParams", "LoopState", "compute_dtype", "running_rows", "gather_rows"]

# Active sets' row moves in one call each (csrc/rows.cpp) for CPU tensors, eager; the torch
# ops below are the fallback (CUDA, torch.compile, tensor subclasses, no extension).
try:
    from . import _C as _ext
except ImportError:  # not built (the cpp backend reports why)
    _ext = None
_running_rows_cpu = getattr(_ext, "_running_rows", None)
_gather_rows_cpu = getattr(_ext, "_gather_rows", None)
_scatter_rows_cpu = getattr(_ext, "_scatter_rows", None)


def _fast_rows(tensors: Sequence[Optional[torch.Tensor]], idx: torch.Tensor) -> bool:
    """Whether the one-call CPU row moves apply: the extension is there, not tracing, and
    idx and every tensor are plain contiguous CPU tensors (idx int64)."""
    if _gather_rows_cpu is None or type(idx) is not torch.Tensor or not idx.is_cpu or idx.dtype != torch.int64:
        return False
    if torch.compiler.is_compiling():
        return False
    return all(t is None or (type(t) is torch.Tensor and t.is_cpu and t.dim() > 0 and t.is_contiguous())
               for t in tensors)


def running_rows(status: torch.Tensor) -> torch.Tensor:
    """int64 indices of the rows still running (status 0): what a check keeps."""
    if (_running_rows_cpu is not None and type(status) is torch.Tensor and status.is_cpu
            and status.dtype == torch.int8 and status.dim() == 1 and status.is_contiguous()
            and not torch.compiler.is_compiling()):
        return _running_rows_cpu(status)
    return (status == 0).nonzero().squeeze(1)


def _gather_groups(groups: Sequence[Optional[Tuple[torch.Tensor, ...]]], idx: torch.Tensor,
                   prefix: Optional[Sequence[Optional[int]]] = None) -> list:
    """Rows ``idx`` of every group (a tuple of tensors of one shape and dtype, or None):
    each group into one new ``(n, k, ...)`` buffer, returned as its n slices (the layout
    LoopState.create gives its pairs). ``prefix[g]`` (an int): of each row only the first
    ``prefix[g]`` slices along dim 1 are copied, the rest of the row is zero. One call on
    CPU, index_selects elsewhere."""
    if _fast_rows([t for g in groups if g is not None for t in g], idx):
        return _gather_rows_cpu(list(groups), idx, None if prefix is None else list(prefix))
    out = []
    for j, g in enumerate(groups):
        if g is None:
            out.append(None)
            continue
        p = None if prefix is None else prefix[j]
        shape = (len(g), idx.numel()) + tuple(g[0].shape[1:])
        if p is None:
            buf = g[0].new_empty(shape)
            for i, t in enumerate(g):
                torch.index_select(t, 0, idx, out=buf[i])
        else:
            buf = g[0].new_zeros(shape)
            for i, t in enumerate(g):
                buf[i, :, :p] = t[:, :p].index_select(0, idx)
        out.append(tuple(buf.unbind(0)))
    return out


def gather_rows(tensors: Sequence[Any], idx: torch.Tensor) -> Tuple[Any, ...]:
    """``a[idx]`` for every tensor in ``tensors`` (other values are returned as they are):
    the batched arguments of an active-set solve, gathered at a check."""
    tensors = tuple(tensors)
    groups = [(a,) if isinstance(a, torch.Tensor) else None for a in tensors]
    return tuple(a if g is None else g[0] for a, g in zip(tensors, _gather_groups(groups, idx)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms, Gram matrices and mixing weights: float64 for float64 storage, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class StepParams:
    """Scalars shared by all steps of one solve (Python floats/bool: backends pass them
    straight to their kernels, so build them with float()/bool() values)."""

    tol: float
    beta: float
    stop_rel: bool
    divergence: float
    eps: float
    lam: float = 0.0


@dataclass
class LoopState:
    """Device tensors of one solve. Shapes: B samples, D state size, m history slots.

    z:        (B, D) storage dtype, the current iterates (frozen samples never change).
    status:   (B,) int8, :class:`imp_fast.Status` codes, 0 = still running.
    n_iter:   (B,) int32, updates made to each sample.
    abs_res:  (B,) compute dtype, last measured ||f(z) - z||.
    rel_res:  (B,) compute dtype, abs_res / (||f(z)|| + eps). :meth:`create` makes
              abs_res and rel_res the two rows of one (2, B) tensor (best_abs and
              best_rel likewise; G and F the halves of one (2, B, m, D) buffer), which
              the reference backend exploits when it finds it; backends must not rely
              on it (each field is a contiguous tensor of its own shape).
    abs0:     (B,) compute dtype, the first residual (divergence reference; +inf
              before the first step so the first step never flags divergence).
    best_z, best_abs, best_rel: lowest-residual iterate so far (``return_best`` only).
    F, G:     (B, m, D) storage dtype, Anderson ring buffers of f-values and residuals
              f(z) - z; unwritten slots are zero.
    H:        (B, m, m) compute dtype, Gram matrix G G^T, kept current by one new
              row/column per step; unwritten diagonal entries hold a huge value so
              their mixing weights are (numerically) zero.
    U, V:     (B, m, D) compute dtype, limited-memory Broyden: the inverse-Jacobian
              estimate of g(z) = f(z) - z is ``-I + sum_i U_i V_i^T`` over the last m
              rank-one updates (ring buffer; unwritten slots are zero).
    z_prev, g_prev: (B, D) compute dtype, Broyden: the previous iterate and its g.
    tol:      (B,) compute dtype or None: per-sample tolerances (sample b converges
              when its residual is below tol[b]; the scalar ``StepParams.tol`` is then
              not used). None: every sample uses ``StepParams.tol``.
    cache:    backend-private scratch for one solve (views, buffers, argument
              tuples), keyed by the backend; never holds results. Entries derived
              from a field's contents must be invalidated when that field is
              written (the reference backend checks tensor version counters).
    """

    z: torch.Tensor
    status: torch.Tensor
    n_iter: torch.Tensor
    abs_res: torch.Tensor
    rel_res: torch.Tensor
    abs0: torch.Tensor
    best_z: Optional[torch.Tensor] = None
    best_abs: Optional[torch.Tensor] = None
    best_rel: Optional[torch.Tensor] = None
    F: Optional[torch.Tensor] = None
    G: Optional[torch.Tensor] = None
    H: Optional[torch.Tensor] = None
    U: Optional[torch.Tensor] = None
    V: Optional[torch.Tensor] = None
    z_prev: Optional[torch.Tensor] = None
    g_prev: Optional[torch.Tensor] = None
    tol: Optional[torch.Tensor] = None
    # Backend-private, per-solve: e.g. views of the tensors above, made once instead of
    # once per iteration. Never holds results.
    cache: Dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    # Weight of unwritten Gram diagonal entries: large enough that their weight
    # 1/UNSET_DIAG vanishes next to real ones, small enough to stay finite in float32.
    UNSET_DIAG = 1e30

    def tensors(self) -> Dict[str, Optional[torch.Tensor]]:
        """The state's tensor fields by name (``cache`` left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "cache"}

    def clone(self) -> "LoopState":
        """A copy with cloned tensors and an empty cache."""
        return LoopState(**{k: None if v is None else v.clone() for k, v in self.tensors().items()})

    @classmethod
    def create(cls, z: torch.Tensor, *, m: Optional[int], return_best: bool,
               broyden_m: Optional[int] = None, tol: Optional[torch.Tensor] = None) -> "LoopState":
        B, D = z.shape
        cdt = compute_dtype(z.dtype)
        dev = z.device
        res = torch.zeros(2, B, dtype=cdt, device=dev)
        st = cls(
            z=z,
            status=torch.zeros(B, dtype=torch.int8, device=dev),
            n_iter=torch.zeros(B, dtype=torch.int32, device=dev),
            # abs_res and rel_res are the rows of one (2, B) tensor, so a backend may
            # update both with one op (each is still a contiguous (B,) tensor).
            abs_res=res[0],
            rel_res=res[1],
            abs0=torch.full((B,), float("inf"), dtype=cdt, device=dev),
        )
        if return_best:
            st.best_z = z.clone()
            best = torch.full((2, B), float("inf"), dtype=cdt, device=dev)
            st.best_abs, st.best_rel = best[0], best[1]
        if m is not None:
            # G and F as the two halves of one buffer (each a contiguous (B, m, D)
            # tensor): the reference takes both newest entries' norms in one op.
            hist = torch.zeros(2, B, m, D, dtype=z.dtype, device=dev)
            st.G, st.F = hist[0], hist[1]
            st.H = torch.diag_embed(torch.full((B, m), cls.UNSET_DIAG, dtype=cdt, device=dev)).contiguous()
        if broyden_m is not None:
            st.U = torch.zeros(B, broyden_m, D, dtype=cdt, device=dev)
            st.V = torch.zeros(B, broyden_m, D, dtype=cdt, device=dev)
            st.z_prev = torch.zeros(B, D, dtype=cdt, device=dev)
            st.g_prev = torch.zeros(B, D, dtype=cdt, device=dev)
        if tol is not None:
            st.tol = tol.to(device=dev, dtype=cdt).contiguous()
        return st

    # The fields a solve reports (what active sets scatter back); the rest is working
    # memory (history, divergence reference) that frozen samples no longer need.
    RESULT_FIELDS = ("z", "status", "n_iter", "abs_res", "rel_res", "best_z", "best_abs", "best_rel")

    def gather(self, idx: torch.Tensor, *, broyden_slots: Optional[int] = None) -> "LoopState":
        """The rows ``idx`` of this state as a new state of the same layout (empty cache).

        Active sets (``solve(..., compact=True)``): the running samples are gathered at
        a check, and the loop then steps only them. ``broyden_slots``: the number of
        leading slots of U and V that may hold data (the rest are unwritten, i.e. zero):
        only those are copied, the rest of the new U and V is zero (the same result,
        and a shorter copy while the Broyden memory is filling up).
        """
        if broyden_slots is not None and (not isinstance(broyden_slots, int) or broyden_slots < 0):
            raise ValueError(f"broyden_slots must be an int >= 0, got {broyden_slots!r}")
        if broyden_slots is not None and self.U is not None:
            broyden_slots = min(broyden_slots, self.U.shape[1])
        # Built straight into fresh tensors (no zero-filled state made first: at a check of
        # an Anderson solve that halved the gather's cost), keeping create()'s layouts:
        # abs/rel and best_abs/best_rel as rows of one (2, k) tensor, G and F as the halves
        # of one (2, k, m, D) buffer.
        pairs = ((self.abs_res, self.rel_res), (self.best_abs, self.best_rel), (self.G, self.F))
        singles = (self.z, self.status, self.n_iter, self.abs0, self.best_z, self.H, self.U, self.V, self.z_prev,
                   self.g_prev, self.tol)
        prefix = None
        if broyden_slots is not None:  # U and V: only the written slots
            prefix = [None] * len(pairs) + [broyden_slots if t is not None and (t is self.U or t is self.V) else None
                                            for t in singles]
        got = _gather_groups([None if a is None else (a, b) for a, b in pairs]
                             + [None if t is None else (t,) for t in singles], idx, prefix)
        (ar, rr), (ba, br), (G, F) = ((None, None) if g is None else g for g in got[:3])
        z, status, n_iter, abs0, best_z, H, U, V, z_prev, g_prev, tol = (None if g is None else g[0] for g in got[3:])
        return LoopState(z=z, status=status, n_iter=n_iter, abs_res=ar, rel_res=rr, abs0=abs0, best_z=best_z,
                         best_abs=ba, best_rel=br, F=F, G=G, H=H, U=U, V=V, z_prev=z_prev, g_prev=g_prev, tol=tol)

    def scatter_into(self, full: "LoopState", rows: torch.Tensor) -> None:
        """Write this (gathered) state's reported fields back into ``full`` at ``rows``."""
        moves = [(getattr(full, name), t) for name in self.RESULT_FIELDS if (t := getattr(self, name)) is not None]
        if _scatter_rows_cpu is not None and _fast_rows([t for m in moves for t in m], rows):
            _scatter_rows_cpu(moves, rows)  # one call
            return
        for dst, t in moves:
            dst.index_copy_(0, rows, t)
