"""The solve loop behind the drop-ins (:mod:`.torchdeq`, :mod:`.deq`).

torchdeq's ``anderson_solver``/``fixed_point_iter`` and locuslab/deq's ``anderson``
share one algorithm, which this module runs for a whole batch on the device:

* Anderson (type II) with torchdeq's/locuslab's *absolute* ridge: the mixing weights
  solve the bordered system ``[[0, 1^T], [1, G G^T + lam I]] [mu; alpha] = [1; 0]``
  over the last ``n = min(k, m)`` residuals. (:func:`imp_fast.solve` scales its ridge
  by the newest residual's squared norm; the two meanings cannot be converted into
  each other by one number, so the drop-ins run this loop instead.) The first two
  iterates are ``x0`` and ``f(x0)`` (an undamped step) and are not recorded; iterate
  ``k >= 2`` is ``tau * alpha F + (1 - tau) * alpha X`` and is recorded at step
  ``k + 1`` (the number of f evaluations made so far).
* Picard as in torchdeq's ``fixed_point_iter``: ``fx = tau f(x) + (1 - tau) x``; the
  residual is ``fx - x`` (of the damped map), recorded at step ``k + 1``.
* Broyden as in torchdeq's ``broyden_solver`` (no line search): ``g(x) = f(x) - x`` is
  evaluated at ``x0`` first; step ``k >= 1`` is ``x_k = x_{k-1} + u_{k-1}`` with
  ``u = -(-I + U V^T) g`` (``u_0 = g(x0)``), records ``||g(x_k)||`` and
  ``||g(x_k)|| / (||g(x_k) + x_k|| + eps)`` at step k and keeps the iterate ``x_k``;
  then the good-Broyden (Sherman-Morrison) pair ``vT = dx^T (-I + U V^T)``,
  ``u = (dx - (-I + U V^T) dg) / (vT . dg)`` (NaN entries zeroed) goes to ring slot
  ``(k - 1) % L`` of an ``L``-column memory (``L`` = torchdeq's ``LBFGS_thres``).
  torchdeq's "no progress" break (after step 30, batch max below ``3 tol`` and, at each
  of the last 30 steps, batch max / batch min below 1.3) is, for a batch of one, "after
  step 30, the residual is below ``3 tol``": a sample meeting that is frozen like one
  below ``tol`` (with ``return_final``, nothing freezes and torchdeq's batch-wide rule
  ends the loop, as in torchdeq).
* Broyden with torchdeq's line search (``ls=True``): each step's length ``s`` along the
  Broyden direction is torchdeq's backtracking Armijo search (scipy's
  ``scalar_search_armijo``: ``phi(s) = ||g(x + s u)||^2`` over the *whole batch*, ``phi``
  infinite when any entry is not finite, sufficient decrease ``phi(s) <= (1 - 1e-4 s)
  phi(0)``, quadratic then cubic interpolation, ``s`` not below 0.01, else ``s = 1``),
  with torchdeq's evaluation reuse. One step size for the whole batch couples the
  samples, so nothing freezes: the batch runs as in torchdeq, until its largest
  stop-mode residual is below ``tol`` (or the "no progress" rule, or max_iter). The
  search's arithmetic is torchdeq's: 0-d tensors in the compute dtype.

What a step records follows torchdeq's ``update_state``: each of the two residuals
(abs and rel) keeps its own lowest value and step; the stop-mode one also selects the
value returned (``f(x_k)`` for torchdeq, the iterate ``x_k`` for locuslab).

Beyond both libraries: a sample whose stop-mode residual falls below ``tol`` is frozen
there (it is the sample's lowest residual, so its answer does not depend on the other
samples of the batch), the loop ends when every sample has frozen (one host check per
step, as in both libraries, so f is never evaluated more often than there); a sample
whose residual is not finite is frozen at its last lowest value and reported with NaN
lowest residuals; Gram matrices, norms and weights (and Broyden's ``U``/``V`` memory
and steps) are float32 or wider (bfloat16 and float16 states work); an exactly singular
Anderson system falls back to a damped step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, List, Tuple

import warnings

import torch

__all__ = ["LoopOut", "run", "INIT_LOSS"]

# torchdeq's and locuslab's initial "lowest" residual: a step whose residual is not
# below it is never recorded as the lowest.
INIT_LOSS = 1e8


@dataclass
class LoopOut:
    """Result of :func:`run`. B samples, T recorded steps.

    value:      (B, D) storage dtype, each sample's value at its lowest stop-mode
                residual (the starting point when no step was lower).
    lowest:     {"abs": (B,), "rel": (B,)} compute dtype, lowest residual of each kind
                (NaN for a sample whose residual became non-finite).
    step:       {"abs": (B,), "rel": (B,)} int64, the step each lowest was recorded at
                (0: none).
    trace:      {"abs": (B, T), "rel": (B, T)} the residual of each recorded step; a
                frozen sample shows its lowest value from the step after it froze on.
    converged:  (B,) bool, met tol.
    nonfinite:  (B,) bool, its residual became NaN/Inf.
    snapshots:  [(step, (B, D))] ``value`` as it was after each step in ``indexing``.
    n_evals:    f evaluations made.
    recorded:   T.
    """

    value: torch.Tensor
    lowest: dict
    step: dict
    trace: dict
    converged: torch.Tensor
    nonfinite: torch.Tensor
    snapshots: List[Tuple[int, torch.Tensor]]
    n_evals: int
    recorded: int


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def run(
    f: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    *,
    method: str,
    max_iter: int,
    tol: float,
    stop_mode: str,
    m: int = 6,
    lam: float = 1e-4,
    tau: float = 1.0,
    return_final: bool = False,
    keep: str = "f",
    rel_eps: float = 1e-9,
    per_sample: bool = True,
    indexing: Iterable[int] = (),
    lbfgs: int = 0,
    ls: bool = False,
) -> LoopOut:
    """Run the loop on ``x0`` of shape (B, D); ``f`` maps (B, D) to (B, D) in x0's dtype.

    ``keep``: "f" returns/records ``f(x_k)`` at the lowest step (torchdeq), "x" the
    iterate ``x_k`` (locuslab). ``per_sample=False`` takes every norm over the whole
    batch (locuslab's whole-batch residual): one residual, one lowest and one stop for
    all samples, while each sample keeps its own Anderson weights. ``return_final``
    (torchdeq): no freezing, no early stop, every step counts as the lowest.
    ``lbfgs``: Broyden's memory (columns of ``U``/``V``; 0 means ``max_iter``).
    Broyden keeps the iterate (``keep`` is ignored) and is per sample only unless ``ls``.
    ``ls``: Broyden with torchdeq's batch-wide Armijo line search (module docstring).
    """
    if method not in ("anderson", "picard", "broyden"):
        raise ValueError(f"method must be 'anderson', 'picard' or 'broyden', got {method!r}")
    if method == "broyden" and not per_sample and not ls:
        # per-sample freezing needs per-sample residuals; with the line search nothing
        # freezes and a whole-batch residual is locuslab's
        raise ValueError("method='broyden' runs per sample only (except with ls=True)")
    if ls and method != "broyden":
        raise ValueError("ls=True is Broyden's line search")
    with torch.no_grad():
        return _Loop(f, x0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, return_final=return_final,
                     keep=keep, rel_eps=rel_eps, per_sample=per_sample, indexing=indexing).run(
            method, m=m, lam=lam, tau=tau, lbfgs=lbfgs, ls=ls)


class _Loop:
    def __init__(self, f, x0, *, max_iter, tol, stop_mode, return_final, keep, rel_eps, per_sample, indexing):
        self.f = f
        self.x0 = x0
        self.B, self.D = x0.shape
        self.sdt = x0.dtype
        self.cdt = compute_dtype(x0.dtype)
        self.dev = x0.device
        self.max_iter = max_iter
        self.tol = tol
        self.stop_mode = stop_mode
        self.return_final = return_final
        self.keep = keep
        self.rel_eps = rel_eps
        self.per_sample = per_sample
        self.indexing = set(indexing)
        # One batch-wide decision per step (Broyden's line search): no sample freezes and
        # the loop stops when the batch's largest residual is below tol, as in torchdeq.
        self.coupled = False
        B, cdt, dev = self.B, self.cdt, self.dev
        self.value = x0
        self.lowest = {k: torch.full((B,), INIT_LOSS, dtype=cdt, device=dev) for k in ("abs", "rel")}
        self.step = {k: torch.zeros(B, dtype=torch.int64, device=dev) for k in ("abs", "rel")}
        self.trace = {"abs": [], "rel": []}
        self.active = torch.ones(B, dtype=torch.bool, device=dev)
        self.converged = torch.zeros(B, dtype=torch.bool, device=dev)
        self.nonfinite = torch.zeros(B, dtype=torch.bool, device=dev)
        self.snapshots: List[Tuple[int, torch.Tensor]] = []
        self.n_evals = 0
        self.nan = torch.tensor(float("nan"), dtype=cdt, device=dev)

    def call(self, x: torch.Tensor) -> torch.Tensor:
        self.n_evals += 1
        return self.f(x)

    def _norms(self, g: torch.Tensor, fx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        a = torch.linalg.vector_norm(g, dim=1)
        n = torch.linalg.vector_norm(fx, dim=1, dtype=self.cdt)
        if not self.per_sample:  # one norm over every entry of the batch
            a = torch.linalg.vector_norm(a).expand(self.B)
            n = torch.linalg.vector_norm(n).expand(self.B)
        return a, a / (n + self.rel_eps)

    def record(self, s: int, g: torch.Tensor, f_rec: torch.Tensor, cand: torch.Tensor,
               stall_tol: float = -math.inf) -> bool:
        """Record step s: g = f_rec - x in compute dtype, f_rec the (damped) f-value for
        the relative residual, cand the value kept if this is the lowest. A sample whose
        stop-mode residual is below ``stall_tol`` (but not ``tol``) is frozen too, without
        counting as converged. Returns True when the loop should go on."""
        abs_r, rel_r = self._norms(g, f_rec)
        diff = {"abs": abs_r, "rel": rel_r}
        was_active = self.active
        for mode in ("rel", "abs"):
            better = was_active & ((diff[mode] < self.lowest[mode]) | self.return_final)
            self.lowest[mode] = torch.where(better, diff[mode], self.lowest[mode])
            self.step[mode] = torch.where(better, s, self.step[mode])
            if mode == self.stop_mode:
                self.value = torch.where(better[:, None], cand, self.value)
        if self.coupled:  # nothing freezes, but a residual that was not finite is reported
            self.nonfinite |= (abs_r - abs_r) != 0
        if not (self.return_final or self.coupled):
            res = diff[self.stop_mode]
            bad = was_active & ((abs_r - abs_r) != 0)  # NaN or Inf
            conv = was_active & (res < self.tol) & ~bad
            self.converged |= conv
            self.nonfinite |= bad
            for mode in ("abs", "rel"):
                self.lowest[mode] = torch.where(bad, self.nan, self.lowest[mode])
            self.active = was_active & ~conv & ~bad
            if stall_tol > self.tol:
                self.active = self.active & ~(res < stall_tol)
        for mode in ("abs", "rel"):
            # A sample frozen before this step shows its lowest value (torchdeq pads its
            # trace with the lowest values after the batch stops).
            self.trace[mode].append(torch.where(was_active, diff[mode], self.lowest[mode]))
        if s in self.indexing:
            self.snapshots.append((s, self.value))
        if self.return_final:
            return True
        if self.coupled:  # torchdeq: go on unless the batch's largest residual is below tol
            return not bool(diff[self.stop_mode].max() < self.tol)
        return bool(self.active.any())  # the one host sync of the step

    def finish(self) -> LoopOut:
        B = self.B
        trace = {k: (torch.stack(v, dim=1) if v else torch.zeros(B, 0, dtype=self.cdt, device=self.dev))
                 for k, v in self.trace.items()}
        if self.coupled:  # as for a frozen non-finite sample: NaN lowest residuals
            for mode in ("abs", "rel"):
                self.lowest[mode] = torch.where(self.nonfinite, self.nan, self.lowest[mode])
            self.converged = (self.lowest[self.stop_mode] < self.tol) & ~self.nonfinite
        elif self.return_final:
            self.converged = (self.lowest[self.stop_mode] < self.tol)
            self.nonfinite = ~torch.isfinite(self.lowest["abs"])
        return LoopOut(self.value, self.lowest, self.step, trace, self.converged, self.nonfinite,
                       self.snapshots, self.n_evals, len(self.trace["abs"]))

    # ------------------------------------------------------------------ Picard

    def run(self, method: str, *, m: int, lam: float, tau: float, lbfgs: int = 0, ls: bool = False) -> LoopOut:
        if method == "picard":
            return self._picard(tau)
        if method == "broyden":
            return self._broyden(lbfgs, ls)
        return self._anderson(m, lam, tau)

    def _picard(self, tau: float) -> LoopOut:
        x = self.x0
        for k in range(self.max_iter):
            fx = self.call(x)
            if tau != 1.0:
                fx = tau * fx + (1 - tau) * x
            g = fx.to(self.cdt) - x.to(self.cdt)
            go = self.record(k + 1, g, fx, fx)
            x = torch.where(self.active[:, None], fx, x)
            if not go:
                break
        return self.finish()

    # ---------------------------------------------------------------- Anderson

    def _anderson(self, m: int, lam: float, tau: float) -> LoopOut:
        if self.max_iter <= 2:
            # Both libraries record nothing before their third evaluation: the answer
            # is x0 whatever f does, so f is not evaluated.
            return self.finish()
        B, D, sdt, cdt, dev = self.B, self.D, self.sdt, self.cdt, self.dev
        X = torch.zeros(B, m, D, dtype=sdt, device=dev)
        G = torch.zeros(B, m, D, dtype=sdt, device=dev)  # residuals f(x_i) - x_i
        H = torch.zeros(B, m, m, dtype=cdt, device=dev)  # Gram G G^T, one row/column per step

        def push(k: int, x: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
            slot = k % m
            g = fx.to(cdt) - x.to(cdt)
            X[:, slot] = x
            G[:, slot] = g
            row = torch.linalg.vecdot(G.to(cdt), G[:, slot:slot + 1].to(cdt))  # (B, m)
            H[:, slot, :] = row
            H[:, :, slot] = row
            return g

        x = self.x0
        fx = self.call(x)
        push(0, x, fx)
        x = fx  # the second iterate is f(x0), undamped, in both libraries
        fx = self.call(x)
        push(1, x, fx)
        # The bordered system [[0, 1^T], [1, H + lam I]], rebuilt in place each step.
        A = torch.zeros(B, m + 1, m + 1, dtype=cdt, device=dev)
        A[:, 0, 1:] = 1
        A[:, 1:, 0] = 1
        rhs = torch.zeros(B, m + 1, 1, dtype=cdt, device=dev)
        rhs[:, 0] = 1
        for k in range(2, self.max_iter):
            n = min(k, m)
            An = A[:, :n + 1, :n + 1]
            block = An[:, 1:, 1:]
            block.copy_(H[:, :n, :n])
            if lam:
                block.diagonal(dim1=1, dim2=2).add_(lam)
            sol, info = torch.linalg.solve_ex(An, rhs[:, :n + 1])
            alpha = sol[:, 1:, 0]  # (B, n)
            Xn, Gn = X[:, :n].to(cdt), G[:, :n].to(cdt)
            mix = torch.bmm(alpha.unsqueeze(1), Xn).squeeze(1)
            mix = mix + tau * torch.bmm(alpha.unsqueeze(1), Gn).squeeze(1)
            # An exactly singular system (lam = 0 and repeated residuals): damped step
            # from the newest iterate instead (torchdeq raises there).
            newest = (k - 1) % m
            s = mix.sum(dim=1)
            ok = (info == 0) & ((s - s) == 0)
            step = X[:, newest].to(cdt) + tau * G[:, newest].to(cdt)
            mix = torch.where(ok[:, None], mix, step).to(sdt)
            x_new = torch.where(self.active[:, None], mix, x)
            fx = self.call(x_new)
            g = push(k, x_new, fx)
            go = self.record(k + 1, g, fx, fx if self.keep == "f" else x_new)
            x = x_new
            if not go:
                break
        return self.finish()

    # ----------------------------------------------------------------- Broyden

    # torchdeq's "no progress" break: from step 31 on, with the residual below 3 tol and
    # the batch's residuals within a factor 1.3 of each other over the last 30 steps.
    STALL_AFTER, STALL_WINDOW, STALL_FACTOR, STALL_RATIO = 30, 30, 3.0, 1.3

    def _broyden(self, lbfgs: int, ls: bool = False) -> LoopOut:
        self.coupled = ls
        if self.max_iter == 0:
            # torchdeq evaluates g(x0) and records nothing: the answer is x0.
            return self.finish()
        B, D, sdt, cdt, dev = self.B, self.D, self.sdt, self.cdt, self.dev
        L = min(lbfgs or self.max_iter, self.max_iter)  # slots >= max_iter are never written
        U = torch.zeros(B, L, D, dtype=cdt, device=dev)   # torchdeq's Us, transposed: (B, L, D)
        VT = torch.zeros(B, L, D, dtype=cdt, device=dev)

        def matvec(n: int, v: torch.Tensor) -> torch.Tensor:
            """(-I + U V^T) v over the first n memory columns."""
            if n == 0:
                return -v
            vtv = torch.bmm(VT[:, :n], v.unsqueeze(2))                       # (B, n, 1)
            return -v + torch.bmm(U[:, :n].transpose(1, 2), vtv).squeeze(2)  # (B, D)

        def rmatvec(n: int, v: torch.Tensor) -> torch.Tensor:
            """v^T (-I + U V^T) over the first n memory columns."""
            if n == 0:
                return -v
            vtu = torch.bmm(U[:, :n], v.unsqueeze(2))                        # (B, n, 1)
            return -v + torch.bmm(vtu.transpose(1, 2), VT[:, :n]).squeeze(1)

        stall = self.tol * self.STALL_FACTOR
        x = self.x0
        xc = x.to(cdt)
        gx = self.call(x).to(cdt) - xc
        update = -matvec(0, gx)
        for k in range(1, self.max_iter + 1):
            if ls:
                x_new, gx_new = self._line_search(xc, gx, update)
                xc_new = x_new.to(cdt)
            else:
                # Frozen samples keep their iterate (and so their g and memory).
                x_new = torch.where(self.active[:, None], (xc + update).to(sdt), x)
                xc_new = x_new.to(cdt)
                gx_new = self.call(x_new).to(cdt) - xc_new
            dx, dg = xc_new - xc, gx_new - gx
            go = self.record(k, gx_new, gx_new + xc_new, x_new,
                             stall_tol=stall if k > self.STALL_AFTER else -math.inf)
            x, xc, gx = x_new, xc_new, gx_new
            if (self.return_final or self.coupled) and k > self.STALL_AFTER and self._batch_stalled(stall):
                break
            if not go or k == self.max_iter:
                break
            n = min(k - 1, L)
            vT = rmatvec(n, dx)
            u = (dx - matvec(n, dg)) / torch.linalg.vecdot(vT, dg)[:, None]
            vT = torch.nan_to_num(vT, nan=0.0, posinf=math.inf, neginf=-math.inf)
            u = torch.nan_to_num(u, nan=0.0, posinf=math.inf, neginf=-math.inf)
            slot = (k - 1) % L
            keep = self.active[:, None]  # a frozen sample's memory stops changing too
            U[:, slot] = torch.where(keep, u, U[:, slot])
            VT[:, slot] = torch.where(keep, vT, VT[:, slot])
            update = -matvec(min(k, L), gx)
        return self.finish()

    # torchdeq's (scipy's) Armijo search: sufficient-decrease constant, smallest step.
    ARMIJO_C1, ARMIJO_AMIN = 1e-4, 1e-2

    def _line_search(self, xc: torch.Tensor, g0: torch.Tensor, update: torch.Tensor
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """torchdeq's ``line_search(update, x0, g0, g, on=True)``: the next iterate
        ``x0 + s update`` (storage dtype) and its g (compute dtype), with ``s`` from the
        batch-wide Armijo search of :meth:`_armijo`. Evaluations are reused as torchdeq
        reuses them: ``phi`` at the step size it last evaluated costs nothing, and the
        final g is that evaluation's when ``s`` is that step size. The objective values
        are 0-d tensors of the compute dtype (x0's dtype for float32/float64, as in
        torchdeq), so the search's arithmetic and decisions are torchdeq's."""
        sdt, cdt = self.sdt, self.cdt
        # torchdeq's phi(0) is the plain norm of g0 (NaN stays NaN); later values are
        # inf when any entry is not finite
        last = {"s": 0, "x": None, "g": g0, "phi": torch.linalg.vector_norm(g0) ** 2}

        def at(s) -> Tuple[torch.Tensor, torch.Tensor]:
            x = (xc + s * update).to(sdt)
            return x, self.call(x).to(cdt) - x.to(cdt)

        def phi(s):
            if s == last["s"]:
                return last["phi"]
            x, g = at(s)
            value = torch.linalg.vector_norm(g) ** 2 if bool(torch.isfinite(g).all()) else math.inf
            last.update(s=s, x=x, g=g, phi=value)
            return value

        s = self._armijo(phi, last["phi"])
        if s is None:  # no step length found: torchdeq takes the full step
            s = 1.0
        if s == last["s"] and last["x"] is not None:
            return last["x"], last["g"]
        return at(s)

    @classmethod
    def _armijo(cls, phi, phi0: torch.Tensor):
        """scipy's ``scalar_search_armijo`` as torchdeq runs it (``derphi0 = -phi0``,
        ``alpha0 = 1``, ``amin = 0.01``, 0-d tensor arithmetic): the step size, or None
        when none is found. One host sync per comparison, as there."""
        c1, amin = cls.ARMIJO_C1, cls.ARMIJO_AMIN
        derphi0, alpha0 = -phi0, 1
        phi_a0 = phi(alpha0)
        if phi_a0 <= phi0 + c1 * alpha0 * derphi0:
            return alpha0
        alpha1 = -derphi0 * alpha0 ** 2 / 2.0 / (phi_a0 - phi0 - derphi0 * alpha0)
        phi_a1 = phi(alpha1)
        while alpha1 > amin:
            factor = alpha0 ** 2 * alpha1 ** 2 * (alpha1 - alpha0)
            a = alpha0 ** 2 * (phi_a1 - phi0 - derphi0 * alpha1) - alpha1 ** 2 * (phi_a0 - phi0 - derphi0 * alpha0)
            a = a / factor
            b = -alpha0 ** 3 * (phi_a1 - phi0 - derphi0 * alpha1) + alpha1 ** 3 * (phi_a0 - phi0 - derphi0 * alpha0)
            b = b / factor
            alpha2 = (-b + torch.sqrt(torch.abs(b ** 2 - 3 * a * derphi0))) / (3.0 * a)
            phi_a2 = phi(alpha2)
            if phi_a2 <= phi0 + c1 * alpha2 * derphi0:
                return alpha2
            if (alpha1 - alpha2) > alpha1 / 2.0 or (1 - alpha2 / alpha1) < 0.96:
                alpha2 = alpha1 / 2.0
            alpha0, alpha1 = alpha1, alpha2
            phi_a0, phi_a1 = phi_a1, phi_a2
        return None

    def _batch_stalled(self, stall: float) -> bool:
        """torchdeq's batch-wide "no progress" test (with ``return_final`` or the line
        search: there no sample freezes, so the batch stops as torchdeq's does). One
        host check."""
        last = self.trace[self.stop_mode][-self.STALL_WINDOW:]
        tr = torch.stack(last)                                  # (30, B)
        progress = tr.max(dim=1).values / tr.min(dim=1).values  # per step: batch max / min
        return bool((last[-1].max() < stall) & (progress.max() < self.STALL_RATIO))


_warned: set = set()


def warn_ignored(qualname: str, library: str, kwargs: dict, stacklevel: int = 3) -> None:
    """Warn once per (function, name) about keyword arguments the drop-in ignores (the
    original library ignores them silently: a misspelt option would go unnoticed)."""
    new = [k for k in kwargs if (qualname, k) not in _warned]
    if not new:
        return
    _warned.update((qualname, k) for k in new)
    warnings.warn(
        f"{qualname}: ignoring unknown keyword argument(s) {', '.join(repr(k) for k in new)} "
        f"({library} ignores them silently; check for a misspelt option)",
        UserWarning,
        stacklevel=stacklevel,
    )

