"""Reference backend: each step written with plain PyTorch ops.

This is the ground truth every other backend is tested against, and the fallback on
any device. It is also written to be cheap in op count, since at small sizes the
per-op dispatch cost is what a solve spends its time on: constants are cached, no
Python scalars go through ``torch.where``, casts happen only when dtypes differ.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from ..result import Status
from ..state import LoopState, StepParams

__all__ = ["picard_step", "anderson_step", "NAME"]

NAME = "reference"

_consts: Dict[Tuple, Tuple[torch.Tensor, ...]] = {}


def _codes(device: torch.device) -> Tuple[torch.Tensor, ...]:
    key = ("codes", device)
    if key not in _consts:
        _consts[key] = tuple(
            torch.tensor(int(s), dtype=torch.int8, device=device)
            for s in (Status.RUNNING, Status.CONVERGED, Status.DIVERGED, Status.NONFINITE)
        )
    return _consts[key]


def _eye_ones(m: int, B: int, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    key = ("eye", m, B, dtype, device)
    if key not in _consts:
        _consts[key] = (torch.eye(m, dtype=dtype, device=device), torch.ones(B, m, dtype=dtype, device=device))
    return _consts[key]


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def _residuals_and_status(st: LoopState, fz: torch.Tensor, p: StepParams):
    """Shared head of every step: residuals, new statuses, masks.

    Returns (g, still) where g = f(z) - z in compute dtype and still is the (B,) mask
    of samples that keep running, i.e. whose z moves this step.
    """
    cdt = st.abs_res.dtype
    g = _cast(fz, cdt) - _cast(st.z, cdt)
    abs_r = torch.linalg.vector_norm(g, dim=1)
    rel_r = abs_r / (torch.linalg.vector_norm(fz, dim=1, dtype=cdt) + p.eps)
    res = rel_r if p.stop_rel else abs_r
    running = st.status == 0
    zero, conv, div, nonfin = _codes(st.status.device)
    # Test order fixes the precedence NONFINITE > CONVERGED > DIVERGED; (x - x) != 0
    # is True exactly for NaN and +-Inf (cheaper than isfinite).
    code = torch.where(abs_r > p.divergence * st.abs0, div, zero)
    code = torch.where(res < p.tol, conv, code)
    code = torch.where((abs_r - abs_r) != 0, nonfin, code)
    # where(..., out=x) with x also an input is safe: it is elementwise.
    if st.best_z is not None:
        better = running & (res < (st.best_rel if p.stop_rel else st.best_abs))
        torch.where(better[:, None], st.z, st.best_z, out=st.best_z)
        torch.where(better, abs_r, st.best_abs, out=st.best_abs)
        torch.where(better, rel_r, st.best_rel, out=st.best_rel)
    torch.where(running, abs_r, st.abs_res, out=st.abs_res)
    torch.where(running, rel_r, st.rel_res, out=st.rel_res)
    torch.where(running, code, st.status, out=st.status)
    still = st.status == 0
    st.n_iter.add_(still)
    return g, still


def picard_step(st: LoopState, fz: torch.Tensor, p: StepParams) -> None:
    """z <- (1 - beta) z + beta f(z) for running samples; residuals and statuses first."""
    g, still = _residuals_and_status(st, fz, p)
    z_new = _cast(torch.add(_cast(st.z, g.dtype), g, alpha=p.beta), st.z.dtype)
    torch.where(still[:, None], z_new, st.z, out=st.z)


def anderson_step(st: LoopState, fz: torch.Tensor, p: StepParams, slot: int) -> None:
    """Type-II Anderson step with ring buffers and an incrementally updated Gram matrix.

    Writes (f(z), g) into history slot ``slot``, refreshes row/column ``slot`` of the
    Gram matrix H = G G^T, solves (H + lam*||g||^2 I) a = 1 and normalises a to sum 1
    (the bordered system's solution), then mixes
    z <- sum_i a_i (F_i - (1 - beta) G_i). A sample whose small system is singular or
    whose mix is not finite takes the damped Picard step z + beta g instead.
    """
    g, still = _residuals_and_status(st, fz, p)
    F, G, H = st.F, st.G, st.H
    cdt = H.dtype
    B, m = H.shape[0], H.shape[1]
    F.select(1, slot).copy_(fz)
    G.select(1, slot).copy_(g)
    # vecdot beats bmm for this (B, m, D) x (B, D) product on CPU at every size tried.
    row = torch.linalg.vecdot(_cast(G, cdt), g.unsqueeze(1))  # (B, m): G_i . g
    H.select(1, slot).copy_(row)
    H.select(2, slot).copy_(row)
    eye, ones = _eye_ones(m, B, cdt, H.device)
    # Ridge relative to the newest residual's squared norm, i.e. to the Gram's scale.
    ridge = (p.lam * row.select(1, slot)).view(B, 1, 1)
    a, info = torch.linalg.solve_ex(torch.addcmul(H, ridge, eye), ones)
    a = (a / a.sum(dim=1, keepdim=True)).unsqueeze(1)
    mix = torch.bmm(a, _cast(F, cdt))
    if p.beta != 1.0:
        mix = torch.baddbmm(mix, a, _cast(G, cdt), alpha=-(1.0 - p.beta))
    mix = mix.squeeze(1)
    s = mix.sum(dim=1)
    ok = (info == 0) & ((s - s) == 0)
    z_new = torch.where(ok[:, None], mix, torch.add(_cast(st.z, cdt), g, alpha=p.beta))
    torch.where(still[:, None], _cast(z_new, st.z.dtype), st.z, out=st.z)
