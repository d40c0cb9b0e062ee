"""Limited-memory "good" Broyden step (as in the DEQ papers), in plain PyTorch.

The root of g(z) = f(z) - z is sought with an estimate of the inverse Jacobian of g,
``J^-1 ~ -I + sum_i U_i V_i^T`` over the last m rank-one updates (ring buffer in
``LoopState.U/V``). Per sample b still running, at iteration k:

* residuals and statuses exactly as the Picard step (same head);
* k > 0: with dz = z_k - z_{k-1}, dg = g_k - g_{k-1}:
  ``v = J^-T dz``, ``u = (dz - J^-1 dg) / (v . dg)`` (Sherman-Morrison update of the
  "good" Broyden method) written to slot (k - 1) mod m — or zeros when v . dg is 0 or
  the update is not finite, which leaves the estimate unchanged. When all m slots are
  used the estimate restarts from -I (restarted Broyden: dropping only the oldest
  update makes the newer ones inconsistent, and that diverged in tests where the
  restarted and the full-memory methods converge);
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

__all__ = ["broyden_step", "written_slots"]


def written_slots(done: int, m: int) -> int:
    """How many leading slots of U and V may hold data after the steps k = 0 .. done - 1
    (every backend's Broyden step): the step at k >= 1 writes slot (k - 1) mod m, and
    at a restart (k > 1, slot 0) zeroes them all first. Slots from there on are zero.
    Active sets copy only these at a check."""
    if done <= 1:
        return 0
    return (done - 2) % m + 1


def broyden_step(st: LoopState, fz: torch.Tensor, p: StepParams, k: int) -> None:
    """One Broyden iteration of every running sample (see the module docstring)."""
    g = _plain_head(st, fz, p)
    cdt = st.abs_res.dtype
    running = (st.status == 0).unsqueeze(1)
    z = _cast(st.z, cdt)
    U, V = st.U, st.V
    m = U.shape[1]
    slot = (k - 1) % m
    if k > 1 and slot == 0:  # memory full: restart from -I (see the module docstring)
        U.zero_()
        V.zero_()
    # One pass over V for both V.dg and V.g, one over U for U.dz (each (B, m, D)); then
    # J^-1 x = -x + U^T (V x) and J^-T x = -x + V^T (U x) for the stacked vectors.
    dz = z - st.z_prev
    dg = g - st.g_prev
    Vx = torch.bmm(V, torch.stack((dg, g), dim=2))  # (B, m, 2): V.dg, V.g
    jdg_jg = torch.bmm(Vx.transpose(1, 2), U) - torch.stack((dg, g), dim=1)  # (B, 2, D): J^-1 dg, J^-1 g
    step = -jdg_jg[:, 1]
    if k > 0:
        v = torch.bmm(torch.bmm(U, dz.unsqueeze(2)).transpose(1, 2), V).squeeze(1) - dz  # J^-T dz
        u = (dz - jdg_jg[:, 0]) / torch.linalg.vecdot(v, dg).unsqueeze(1)
        ok = running & torch.isfinite(u).all(dim=1, keepdim=True) & torch.isfinite(v).all(dim=1, keepdim=True)
        u = torch.where(ok, u, torch.zeros((), dtype=cdt, device=z.device))
        v = torch.where(ok, v, torch.zeros((), dtype=cdt, device=z.device))
        U[:, slot] = u  # rows that are not running never read their history again
        V[:, slot] = v
        step = step - u * torch.linalg.vecdot(v, g).unsqueeze(1)  # the new update's share of -J^-1 g
    step = torch.where(torch.isfinite(step).all(dim=1, keepdim=True), step, g)  # fall back to Picard
    z_new = z + step if p.beta == 1.0 else z + p.beta * step
    torch.where(running, z, st.z_prev, out=st.z_prev)
    torch.where(running, g, st.g_prev, out=st.g_prev)
    _plain_move(st, z_new)
