"""Fused Picard step on GPU (Triton): residual norms, statuses, masks and the update.

Launches per iteration:

* 1 when each sample fits one program (C == 1: large B or small D): the program
  reduces ||f(z) - z||^2 and ||f(z)||^2 over its sample (and counts entries whose
  damped update would overflow the storage dtype), decides its status, then walks D
  again to move z (and best_z);
* 2 when D is split across C programs per sample (small B, large D), so the grid
  fills the GPU: ``_picard_partial_kernel`` writes per-chunk partial sums (float64)
  and overflow counts, then ``_picard_update_kernel`` reduces the C partials of its
  sample in a fixed order (deterministic), decides the status (every chunk program
  computes the same scalars, chunk 0 writes them) and moves its chunk.

Matches ``reference.picard_step`` and its numerical rules (accumulation in float32,
scale-safe: sums that left the exact range are recomputed in float64; float16/bfloat16
loads are cast to float32 before any arithmetic; an update that would overflow the
storage dtype flags the sample NONFINITE and leaves its z). float64 storage runs the
reference step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ...state import LoopState, StepParams
from .common import chunk_sums, pick_block, rowwise, split_geometry, status_head, supported, to_storage

__all__ = ["picard_step", "launch_picard"]

BLOCK_CAP = 1024


@triton.jit
def _picard_partial_kernel(
    z_ptr, fz_ptr, fz_stride, status_ptr, best_res_ptr,
    part_ptr, snap_status_ptr, snap_best_ptr,
    D, BPP, C, beta,
    BEST: tl.constexpr, DAMP: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.program_id(1)
    b64 = b.to(tl.int64)
    gsq, fsq, nbad = chunk_sums(z_ptr, fz_ptr, fz_stride, b64, c * BPP * BLOCK, D, BPP, beta, BLOCK, DAMP)
    pbase = part_ptr + (b64 * C + c) * 3
    tl.store(pbase, gsq)
    tl.store(pbase + 1, fsq)
    tl.store(pbase + 2, nbad.to(tl.float64))
    # Snapshot the pre-step per-sample state the update kernel decides from: its
    # chunk-0 program overwrites status/best in place while other chunks still read.
    first = c == 0
    tl.store(snap_status_ptr + b, tl.load(status_ptr + b).to(tl.int32), mask=first)
    if BEST:
        tl.store(snap_best_ptr + b, tl.load(best_res_ptr + b), mask=first)


@triton.jit
def _picard_update_kernel(
    z_ptr, fz_ptr, fz_stride, best_z_ptr,
    part_ptr, snap_status_ptr, snap_best_ptr,
    status_ptr, n_iter_ptr, abs_ptr, rel_ptr, abs0_ptr, best_abs_ptr, best_rel_ptr, best_res_ptr,
    D, BPP, C, tol, beta, divergence, eps,
    FUSED: tl.constexpr, STOP_REL: tl.constexpr, BEST: tl.constexpr, DAMP: tl.constexpr,
    BLOCK: tl.constexpr, CP: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.program_id(1)
    b64 = b.to(tl.int64)
    offs = tl.arange(0, BLOCK)
    start = c * BPP * BLOCK
    if FUSED:
        # One program per sample: reduce over all of D here (pass 1).
        gsq, fsq, nbad = chunk_sums(z_ptr, fz_ptr, fz_stride, b64, start, D, BPP, beta, BLOCK, DAMP)
        status_old = tl.load(status_ptr + b).to(tl.int32)
        if BEST:
            best_old = tl.load(best_res_ptr + b)
        else:
            best_old = 0.0
    else:
        cs = tl.arange(0, CP)
        cm = cs < C
        gsq = tl.sum(tl.load(part_ptr + (b64 * C + cs) * 3, mask=cm, other=0.0), axis=0)
        fsq = tl.sum(tl.load(part_ptr + (b64 * C + cs) * 3 + 1, mask=cm, other=0.0), axis=0)
        nbad = tl.sum(tl.load(part_ptr + (b64 * C + cs) * 3 + 2, mask=cm, other=0.0), axis=0)
        status_old = tl.load(snap_status_ptr + b)
        if BEST:
            best_old = tl.load(snap_best_ptr + b)
        else:
            best_old = 0.0
    abs0 = tl.load(abs0_ptr + b)
    abs_r, rel_r, running, new_status, still, better = status_head(
        gsq, fsq, status_old, abs0, best_old, tol, divergence, eps, STOP_REL, BEST)
    # An update that overflows the storage dtype: NONFINITE, z and n_iter kept.
    overflow = still & (nbad > 0)
    new_status = tl.where(overflow, 4, new_status)
    still = still & (nbad == 0)
    first = c == 0
    tl.store(abs_ptr + b, abs_r, mask=first & running)
    tl.store(rel_ptr + b, rel_r, mask=first & running)
    tl.store(status_ptr + b, new_status.to(tl.int8), mask=first & running)
    n_old = tl.load(n_iter_ptr + b)
    tl.store(n_iter_ptr + b, n_old + 1, mask=first & still)
    if BEST:
        tl.store(best_abs_ptr + b, abs_r, mask=first & better)
        tl.store(best_rel_ptr + b, rel_r, mask=first & better)
    if still | better:
        # Per-sample flags broadcast to vectors (the interpreter rejects scalar & vector masks).
        still_v = (tl.zeros([BLOCK], dtype=tl.int32) + still.to(tl.int32)) != 0
        better_v = (tl.zeros([BLOCK], dtype=tl.int32) + better.to(tl.int32)) != 0
        for j in range(0, BPP):
            d = start + j * BLOCK + offs
            msk = d < D
            zr = tl.load(z_ptr + b64 * D + d, mask=msk, other=0.0)
            if BEST:
                tl.store(best_z_ptr + b64 * D + d, zr, mask=msk & better_v)
            zf = zr.to(tl.float32)
            ff = tl.load(fz_ptr + b64 * fz_stride + d, mask=msk & still_v, other=0.0).to(tl.float32)
            if DAMP:
                znew = zf + beta * (ff - zf)
            else:
                znew = ff  # beta = 1: exactly f(z), as the reference
            tl.store(z_ptr + b64 * D + d, to_storage(znew, z_ptr), mask=msk & still_v)


def launch_picard(st: LoopState, fz: torch.Tensor, p: StepParams, *, block=None, splits=None) -> int:
    """Run the Triton Picard step in place; returns the number of kernel launches."""
    z = st.z
    B, D = z.shape
    fz = rowwise(fz)
    BLOCK = block or pick_block(D, BLOCK_CAP)
    C, bpp = split_geometry(B, D, BLOCK, z.device, splits)
    best = st.best_z is not None
    best_res = (st.best_rel if p.stop_rel else st.best_abs) if best else st.abs_res
    best_z = st.best_z if best else z
    best_abs = st.best_abs if best else st.abs_res
    best_rel = st.best_rel if best else st.rel_res
    damp = p.beta != 1.0
    num_warps = 4 if BLOCK >= 512 else 2
    if C == 1:
        dummy = st.abs_res  # part/snapshot pointers are not read when FUSED
        _picard_update_kernel[(B, 1)](
            z, fz, fz.stride(0), best_z, dummy, st.n_iter, dummy,
            st.status, st.n_iter, st.abs_res, st.rel_res, st.abs0, best_abs, best_rel, best_res,
            D, bpp, 1, p.tol, p.beta, p.divergence, p.eps,
            FUSED=True, STOP_REL=p.stop_rel, BEST=best, DAMP=damp, BLOCK=BLOCK, CP=2,
            num_warps=num_warps,
        )
        return 1
    part = torch.empty(B * C * 3, dtype=torch.float64, device=z.device)
    snap_status = torch.empty(B, dtype=torch.int32, device=z.device)
    snap_best = torch.empty(B if best else 1, dtype=torch.float32, device=z.device)
    _picard_partial_kernel[(B, C)](
        z, fz, fz.stride(0), st.status, best_res, part, snap_status, snap_best,
        D, bpp, C, p.beta, BEST=best, DAMP=damp, BLOCK=BLOCK, num_warps=num_warps,
    )
    _picard_update_kernel[(B, C)](
        z, fz, fz.stride(0), best_z, part, snap_status, snap_best,
        st.status, st.n_iter, st.abs_res, st.rel_res, st.abs0, best_abs, best_rel, best_res,
        D, bpp, C, p.tol, p.beta, p.divergence, p.eps,
        FUSED=False, STOP_REL=p.stop_rel, BEST=best, DAMP=damp, BLOCK=BLOCK,
        CP=triton.next_power_of_2(C), num_warps=num_warps,
    )
    return 2


def picard_step(st: LoopState, fz: torch.Tensor, p: StepParams) -> None:
    """Backend entry point: Triton kernels, or the reference step for float64/empty."""
    if not supported(st, fz):
        reference.picard_step(st, fz, p)
        return
    launch_picard(st, fz, p)
