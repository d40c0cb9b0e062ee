"""Fused Picard step on GPU (Triton): residual norms, statuses, masks and the update.

Launches per iteration:

* 1 when each sample fits one program (C == 1: large B or small D): the program
  reduces ||f(z) - z||^2 and ||f(z)||^2 over its sample, decides its status, then
  walks D again to move z (and best_z);
* 2 when D is split across C programs per sample (small B, large D), so the grid
  fills the GPU: ``_picard_partial_kernel`` writes per-chunk partial sums, then
  ``_picard_update_kernel`` reduces the C partial sums of its sample in a fixed order
  (deterministic), decides the status (every chunk program computes the same scalars,
  chunk 0 writes them) and moves its chunk.

Matches ``reference.picard_step`` (accumulation in float32; float16/bfloat16 loads are
cast to float32 before any arithmetic). float64 storage runs the reference step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ...state import LoopState, StepParams
from .common import pick_block, rowwise, split_geometry, status_head, supported, to_storage

__all__ = ["picard_step", "launch_picard"]

BLOCK_CAP = 1024


@triton.jit
def _residual_sums(z_ptr, fz_ptr, fz_stride, b64, start, D, BPP, BLOCK: tl.constexpr):
    """sum (f(z) - z)^2 and sum f(z)^2 of sample b64 over BPP blocks from ``start``."""
    offs = tl.arange(0, BLOCK)
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    acc_f = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, BPP):
        d = start + j * BLOCK + offs
        msk = d < D
        zf = tl.load(z_ptr + b64 * D + d, mask=msk, other=0.0).to(tl.float32)
        ff = tl.load(fz_ptr + b64 * fz_stride + d, mask=msk, other=0.0).to(tl.float32)
        g = ff - zf
        acc_g += g * g
        acc_f += ff * ff
    return tl.sum(acc_g, axis=0), tl.sum(acc_f, axis=0)


@triton.jit
def _picard_partial_kernel(
    z_ptr, fz_ptr, fz_stride, status_ptr, best_res_ptr,
    part_ptr, snap_status_ptr, snap_best_ptr,
    D, BPP, C,
    BEST: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.program_id(1)
    b64 = b.to(tl.int64)
    gsq, fsq = _residual_sums(z_ptr, fz_ptr, fz_stride, b64, c * BPP * BLOCK, D, BPP, BLOCK)
    pbase = part_ptr + (b64 * C + c) * 2
    tl.store(pbase, gsq)
    tl.store(pbase + 1, fsq)
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
        gsq, fsq = _residual_sums(z_ptr, fz_ptr, fz_stride, b64, start, D, BPP, BLOCK)
        status_old = tl.load(status_ptr + b).to(tl.int32)
        if BEST:
            best_old = tl.load(best_res_ptr + b)
        else:
            best_old = 0.0
    else:
        cs = tl.arange(0, CP)
        cm = cs < C
        gsq = tl.sum(tl.load(part_ptr + (b64 * C + cs) * 2, mask=cm, other=0.0), axis=0)
        fsq = tl.sum(tl.load(part_ptr + (b64 * C + cs) * 2 + 1, mask=cm, other=0.0), axis=0)
        status_old = tl.load(snap_status_ptr + b)
        if BEST:
            best_old = tl.load(snap_best_ptr + b)
        else:
            best_old = 0.0
    abs0 = tl.load(abs0_ptr + b)
    abs_r, rel_r, running, new_status, still, better = status_head(
        gsq, fsq, status_old, abs0, best_old, tol, divergence, eps, STOP_REL, BEST)
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
    num_warps = 4 if BLOCK >= 512 else 2
    if C == 1:
        dummy = st.abs_res  # part/snapshot pointers are not read when FUSED
        _picard_update_kernel[(B, 1)](
            z, fz, fz.stride(0), best_z, dummy, st.n_iter, dummy,
            st.status, st.n_iter, st.abs_res, st.rel_res, st.abs0, best_abs, best_rel, best_res,
            D, bpp, 1, p.tol, p.beta, p.divergence, p.eps,
            FUSED=True, STOP_REL=p.stop_rel, BEST=best, DAMP=(p.beta != 1.0), BLOCK=BLOCK, CP=2,
            num_warps=num_warps,
        )
        return 1
    part = torch.empty(B * C * 2, dtype=torch.float32, device=z.device)
    snap_status = torch.empty(B, dtype=torch.int32, device=z.device)
    snap_best = torch.empty(B if best else 1, dtype=torch.float32, device=z.device)
    _picard_partial_kernel[(B, C)](
        z, fz, fz.stride(0), st.status, best_res, part, snap_status, snap_best,
        D, bpp, C, BEST=best, BLOCK=BLOCK, num_warps=num_warps,
    )
    _picard_update_kernel[(B, C)](
        z, fz, fz.stride(0), best_z, part, snap_status, snap_best,
        st.status, st.n_iter, st.abs_res, st.rel_res, st.abs0, best_abs, best_rel, best_res,
        D, bpp, C, p.tol, p.beta, p.divergence, p.eps,
        FUSED=False, STOP_REL=p.stop_rel, BEST=best, DAMP=(p.beta != 1.0), BLOCK=BLOCK,
        CP=triton.next_power_of_2(C), num_warps=num_warps,
    )
    return 2


def picard_step(st: LoopState, fz: torch.Tensor, p: StepParams) -> None:
    """Backend entry point: Triton kernels, or the reference step for float64/empty."""
    if not supported(st, fz):
        reference.picard_step(st, fz, p)
        return
    launch_picard(st, fz, p)
