"""Reference backend: each step written with plain PyTorch ops.

This is the ground truth every other backend is tested against, and the fallback on
any device. It is also written to be cheap in op count, since at small sizes the
per-op dispatch cost is what a solve spends its time on.
"""
from __future__ import annotations

import torch

from ..result import Status
from ..state import LoopState, StepParams, compute_dtype

__all__ = ["picard_step", "anderson_step", "NAME"]

NAME = "reference"

_CONVERGED = int(Status.CONVERGED)
_DIVERGED = int(Status.DIVERGED)
_NONFINITE = int(Status.NONFINITE)


def _residuals_and_status(st: LoopState, fz: torch.Tensor, p: StepParams):
    """Shared head of every step: residuals, new statuses, masks.

    Returns (g, still_running) where g = f(z) - z in compute dtype and
    still_running is the (B,) mask of samples whose z moves this step.
    """
    cdt = compute_dtype(st.z.dtype)
    g = fz.to(cdt) - st.z.to(cdt)
    abs_r = torch.linalg.vector_norm(g, dim=1)
    rel_r = abs_r / (torch.linalg.vector_norm(fz, dim=1, dtype=cdt) + p.eps)
    res = rel_r if p.stop_rel else abs_r
    running = st.status == 0
    # One code per sample; NaN compares False everywhere, so order the tests so NaN
    # and Inf residuals land on NONFINITE.
    code = torch.where(
        res < p.tol,
        _CONVERGED,
        torch.where(abs_r > p.divergence * st.abs0, _DIVERGED, 0),
    )
    code = torch.where(torch.isfinite(abs_r), code, _NONFINITE).to(torch.int8)
    if st.best_z is not None:
        better = running & (res < (st.best_rel if p.stop_rel else st.best_abs))
        st.best_z.copy_(torch.where(better[:, None], st.z, st.best_z))
        st.best_abs.copy_(torch.where(better, abs_r, st.best_abs))
        st.best_rel.copy_(torch.where(better, rel_r, st.best_rel))
    st.abs_res.copy_(torch.where(running, abs_r, st.abs_res))
    st.rel_res.copy_(torch.where(running, rel_r, st.rel_res))
    st.status.copy_(torch.where(running, code, st.status))
    still = st.status == 0
    st.n_iter.add_(still)
    return g, still


def picard_step(st: LoopState, fz: torch.Tensor, p: StepParams) -> None:
    """z <- (1 - beta) z + beta f(z) for running samples; residuals and statuses first."""
    g, still = _residuals_and_status(st, fz, p)
    z_new = (st.z.to(g.dtype) + p.beta * g).to(st.z.dtype)
    st.z.copy_(torch.where(still[:, None], z_new, st.z))


def anderson_step(st: LoopState, fz: torch.Tensor, p: StepParams, slot: int) -> None:
    """Type-II Anderson step with ring buffers and an incrementally updated Gram matrix.

    Writes (f(z), g) into history slot ``slot``, refreshes row/column ``slot`` of the
    Gram matrix H = G G^T, solves (H + lam*||g||^2 I) a = 1 and normalises a to sum 1
    (the bordered system's solution), then mixes
    z <- sum_i a_i (F_i - (1 - beta) G_i). A sample whose small system is singular or
    whose mix is not finite takes a damped Picard step instead.
    """
    g, still = _residuals_and_status(st, fz, p)
    F, G, H = st.F, st.G, st.H
    cdt = H.dtype
    F[:, slot] = fz
    G[:, slot] = g
    row = torch.bmm(G.to(cdt), g.unsqueeze(2)).squeeze(2)  # (B, m): g . G_i
    H[:, slot, :] = row
    H[:, :, slot] = row
    # Ridge relative to the newest residual's squared norm, i.e. to the Gram's scale.
    ridge = (p.lam * row[:, slot]).view(-1, 1, 1)
    eye = torch.eye(H.shape[1], dtype=cdt, device=H.device)
    a, info = torch.linalg.solve_ex(torch.addcmul(H, ridge, eye), torch.ones_like(row))
    a = a / a.sum(dim=1, keepdim=True)
    a3 = a.unsqueeze(1)
    mix = torch.bmm(a3, F.to(cdt))
    if p.beta != 1.0:
        mix = torch.baddbmm(mix, a3, G.to(cdt), alpha=-(1.0 - p.beta))
    mix = mix.squeeze(1)
    ok = (info == 0) & torch.isfinite(mix.sum(dim=1))
    picard = st.z.to(cdt) + p.beta * g
    z_new = torch.where(ok[:, None], mix, picard).to(st.z.dtype)
    st.z.copy_(torch.where(still[:, None], z_new, st.z))
