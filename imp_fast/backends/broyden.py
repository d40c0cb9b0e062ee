"""Limited-memory "good" Broyden step (as in the DEQ papers), in plain PyTorch.

The root of g(z) = f(z) - z is sought with an estimate of the inverse Jacobian of g,
``J^-1 ~ -I + sum_i U_i V_i^T`` over the last m rank-one updates (ring buffer in
``LoopState.U/V``). Per sample b still running, at iteration k:

* residuals and statuses exactly as the Picard step (same head);
* k > 0: with dz = z_k - z_{k-1}, dg = g_k - g_{k-1}:
  ``v = J^-T dz``, ``u = (dz - J^-1 dg) / (v . dg)`` (Sherman-Morrison update of the
  "good" Broyden method) written to slot (k - 1) mod m — or zeros when v . dg is 0 or
  the update is not finite, which leaves the estimate unchanged;
* the step ``z <- z + beta * (-J^-1 g)`` (at k = 0 it is the damped Picard step); an
  update that is not finite falls back to the damped Picard update, and one that
  overflows the storage dtype flags the sample NONFINITE (it keeps its last iterate).

Everything but z is kept in the compute dtype (float32, float64 for float64 storage).
This is the ground truth for the compiled Broyden ops; backends without one run it.
"""
from __future__ import annotations

import torch

from ..state import LoopState, StepParams
from .reference import _cast, _plain_head, _plain_move

__all__ = ["broyden_step"]


def _inv_jac(U: torch.Tensor, V: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(-I + sum_i U_i V_i^T) x per sample: x (B, D), U and V (B, m, D)."""
    return torch.bmm(torch.bmm(V, x.unsqueeze(2)).transpose(1, 2), U).squeeze(1) - x


def _inv_jac_t(U: torch.Tensor, V: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x^T (-I + sum_i U_i V_i^T), as a (B, D) tensor."""
    return torch.bmm(torch.bmm(U, x.unsqueeze(2)).transpose(1, 2), V).squeeze(1) - x


def broyden_step(st: LoopState, fz: torch.Tensor, p: StepParams, k: int) -> None:
    """One Broyden iteration of every running sample (see the module docstring)."""
    g = _plain_head(st, fz, p)
    cdt = st.abs_res.dtype
    running = (st.status == 0).unsqueeze(1)
    z = _cast(st.z, cdt)
    U, V = st.U, st.V
    if k > 0:
        dz = z - st.z_prev
        dg = g - st.g_prev
        v = _inv_jac_t(U, V, dz)
        den = torch.linalg.vecdot(v, dg).unsqueeze(1)
        u = (dz - _inv_jac(U, V, dg)) / den
        ok = running & torch.isfinite(u).all(dim=1, keepdim=True) & torch.isfinite(v).all(dim=1, keepdim=True)
        slot = (k - 1) % U.shape[1]
        zero = torch.zeros((), dtype=cdt, device=z.device)
        U[:, slot] = torch.where(ok, u, torch.where(running, zero, U[:, slot]))
        V[:, slot] = torch.where(ok, v, torch.where(running, zero, V[:, slot]))
    step = -_inv_jac(U, V, g)
    step = torch.where(torch.isfinite(step).all(dim=1, keepdim=True), step, g)  # fall back to Picard
    z_new = z + step if p.beta == 1.0 else z + p.beta * step
    torch.where(running, z, st.z_prev, out=st.z_prev)
    torch.where(running, g, st.g_prev, out=st.g_prev)
    _plain_move(st, z_new)
