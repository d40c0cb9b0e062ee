"""What a solve returns: per-sample statuses, residuals, counters and traces."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import List, Optional, Union

import torch

__all__ = ["Status", "SolveResult", "SolveError"]


class Status(enum.IntEnum):
    """Per-sample outcome of a solve (stored as int8 on the device).

    RUNNING only appears inside the loop; every sample of a finished solve has one of
    the other four codes.
    """

    RUNNING = 0
    CONVERGED = 1
    MAX_ITER = 2
    DIVERGED = 3
    NONFINITE = 4


_MESSAGES = {
    Status.RUNNING: "still running",
    Status.CONVERGED: "converged: residual below tol",
    Status.MAX_ITER: "max_iter reached before the residual fell below tol",
    Status.DIVERGED: "diverged: residual grew past `divergence` times its initial value",
    Status.NONFINITE: "f returned NaN/Inf (or the update overflowed); frozen at the last finite iterate",
}


@dataclass
class SolveResult:
    """Result of :func:`imp_fast.solve`.

    Tensors stay on the solve's device; reading them on the host (``messages()``,
    ``ok``, ``summary()``) synchronises, the solve itself did not.

    Attributes:
        z: the solution, same shape/dtype/device as ``z0``.
        status: ``(B,)`` int8 codes, see :class:`Status`.
        n_iter: ``(B,)`` int32, updates each sample took (a converged sample's z is
            the iterate ``z_{n_iter}`` whose residual met tol).
        abs_residual, rel_residual: ``(B,)`` ``||f(z)-z||`` and that over
            ``||f(z)|| + eps``, of the last evaluated iterate (or of the best one when
            ``return_best=True``), in float32 (float64 for float64 storage).
        trace_abs, trace_rel: ``(T, B)`` residual per iteration when ``trace=True``.
        host_syncs: how many times the solve read device state on the host.
        iterations: loop iterations run (f evaluations on the whole batch).
        jac_loss: :func:`imp_fast.implicit_solve` with ``jac_reg=True`` only: the
            differentiable Jacobian-regulariser estimate at z* (else None).
    """

    z: torch.Tensor
    status: torch.Tensor
    n_iter: torch.Tensor
    abs_residual: torch.Tensor
    rel_residual: torch.Tensor
    trace_abs: Optional[torch.Tensor]
    trace_rel: Optional[torch.Tensor]
    host_syncs: int
    iterations: int
    method: str
    backend: str
    tol: Union[float, torch.Tensor]  # a (B,) tensor when the solve had per-sample tolerances
    stop: str
    extras: dict = field(default_factory=dict)
    jac_loss: Optional[torch.Tensor] = None

    @property
    def converged(self) -> torch.Tensor:
        """``(B,)`` bool mask of converged samples (on the device)."""
        return self.status == Status.CONVERGED

    @property
    def ok(self) -> bool:
        """True when every sample converged (one host sync)."""
        return bool(self.converged.all())

    def tol_text(self) -> str:
        """``tol`` for messages: the number, or the range of per-sample tolerances."""
        if isinstance(self.tol, torch.Tensor):
            return f"per-sample in [{float(self.tol.min()):g}, {float(self.tol.max()):g}]"
        return f"{self.tol:g}"

    @property
    def residual(self) -> torch.Tensor:
        """The residual that ``tol`` applied to (``stop`` mode)."""
        return self.rel_residual if self.stop == "rel" else self.abs_residual

    def messages(self) -> List[str]:
        """One human-readable line per sample."""
        codes = self.status.tolist()
        res = self.residual.tolist()
        its = self.n_iter.tolist()
        return [
            f"sample {i}: {_MESSAGES[Status(c)]} ({self.stop} residual {r:.3g} after {n} iterations)"
            for i, (c, r, n) in enumerate(zip(codes, res, its))
        ]

    def summary(self) -> str:
        """Counts of each status, e.g. ``'7 converged, 1 max_iter'``."""
        counts = torch.bincount(self.status.long().cpu(), minlength=len(Status)).tolist()
        parts = [f"{n} {Status(c).name.lower()}" for c, n in enumerate(counts) if n]
        return ", ".join(parts) if parts else "empty batch"

    def raise_on_failure(self) -> "SolveResult":
        """Raise :class:`SolveError` unless every sample converged; return self otherwise."""
        if not self.ok:
            raise SolveError(self)
        return self


class SolveError(RuntimeError):
    """Raised by ``solve(..., throw=True)`` when some samples did not converge.

    ``.result`` holds the full :class:`SolveResult` (nothing is lost).
    """

    MAX_LISTED = 10

    def __init__(self, result: SolveResult):
        self.result = result
        failed = (~result.converged).nonzero().flatten().tolist()
        msgs = result.messages()
        lines = [msgs[i] for i in failed[: self.MAX_LISTED]]
        if len(failed) > self.MAX_LISTED:
            lines.append(f"... and {len(failed) - self.MAX_LISTED} more")
        head = (
            f"{result.method} solve failed for {len(failed)} of {result.status.numel()} samples "
            f"(tol={result.tol_text()}, stop={result.stop!r}; {result.summary()}):"
        )
        super().__init__("\n  ".join([head] + lines))
