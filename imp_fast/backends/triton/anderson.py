"""Fused type-II Anderson step on GPU (Triton): 3 launches per iteration (4 when D is
split across programs).

1. ``_anderson_history_kernel`` (grid B x C, D split in C chunks): writes the history
   slot F[:, slot] = f(z), G[:, slot] = f(z) - z, and per-chunk partials (float64) of
   ||g||^2, ||f(z)||^2 (scale-safe, ``common.chunk_sums``), the number of entries
   whose damped Picard update would overflow the storage dtype, and the new Gram row
   g . G_i (i < m) into a scratch buffer.
2. ``_anderson_solve_kernel`` (grid B, one program per sample): reduces the partials
   in a fixed order (deterministic), decides residuals and statuses (the reference's
   codes and test order), writes row/column ``slot`` of H, solves
   (H + lam*H[slot,slot] I) a = 1 **in float64** (H widened; the rule of every
   backend) in registers by LU with partial pivoting as LAPACK does (a zero or
   non-finite pivot marks the system singular), normalises a to sum 1 in float64 and
   writes a per-sample mode (0 frozen, 1 mix, 2 damped Picard fallback; +4 when the
   sample beat its best residual, +8 when its Picard update would overflow) and the
   weights a (rounded to float32). A sample whose system is singular and whose Picard
   update would overflow is flagged NONFINITE here (z and n_iter kept).
3. ``_anderson_mix_kernel`` (grid B x C): copies the old z into best_z when the sample
   improved (return_best); z + beta g for mode 2; for mode 1 the mix
   sum_i a_i (F_i - (1-beta) G_i) goes into a float32 workspace, with per-chunk counts
   of entries that would not be finite in the storage dtype. With C == 1 the same
   program then commits the sample (below).
4. ``_anderson_commit_kernel`` (grid B x C, only when C > 1): per mode-1 sample, the
   mix when all of it is finite in the storage dtype, else the damped Picard update,
   else (that overflows too) NONFINITE with z and n_iter kept.

So every decision the reference makes on the whole sample (is the mix finite? does the
fallback overflow?) is made on the whole sample here too, before z is written.
Accumulation in float32 (norm partials in float64); float16/bfloat16 values are cast to
float32 before any arithmetic and the Gram row uses the stored (rounded) residuals
exactly as the reference does. float64 storage runs the reference step.

History sizes: the fused kernels hold the m x m system in registers for m <= MAX_M
(16); a larger m runs the reference step on the same state (same results, not fused).
Every backend accepts any m >= 1 (the CUDA op solves in shared memory up to m = 64 and
in a global workspace beyond; the CPU op has no limit).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ...state import LoopState, StepParams
from .common import pick_block, rowwise, split_geometry, safe_sums, status_head, storage_bad, supported, to_storage

__all__ = ["anderson_step", "launch_anderson", "MAX_M"]

# History sizes solved in registers by the fused kernels; a larger m runs the reference
# step (documented in the module docstring: every backend accepts any m).
MAX_M = 16
# Elements of one (m x BLOCK) history tile held in registers.
TILE_CAP = 4096


@triton.jit
def _anderson_history_kernel(
    z_ptr, fz_ptr, fz_stride, F_ptr, G_ptr, part_ptr,
    slot, D, BPP, C, beta,
    M: tl.constexpr, MP: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr, DAMP: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.program_id(1)
    b64 = b.to(tl.int64)
    offs = tl.arange(0, BLOCK)
    rows = tl.arange(0, MP)
    hist = b64 * M * D
    acc_h = tl.zeros([MP, BLOCK], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    acc_f = tl.zeros([BLOCK], dtype=tl.float32)
    nbad = tl.zeros([BLOCK], dtype=tl.int32)
    start = c * BPP * BLOCK
    old_rows = (rows < M) & (rows != slot)
    for j in range(0, BPP):
        d = start + j * BLOCK + offs
        msk = d < D
        zf = tl.load(z_ptr + b64 * D + d, mask=msk, other=0.0).to(tl.float32)
        fr = tl.load(fz_ptr + b64 * fz_stride + d, mask=msk, other=0.0)
        ff = fr.to(tl.float32)
        g = ff - zf
        gs = to_storage(g, G_ptr)
        tl.store(F_ptr + hist + slot * D + d, fr.to(F_ptr.dtype.element_ty), mask=msk)
        tl.store(G_ptr + hist + slot * D + d, gs, mask=msk)
        tile_mask = old_rows[:, None] & msk[None, :]
        Gt = tl.load(G_ptr + hist + rows[:, None] * D + d[None, :], mask=tile_mask, other=0.0)
        Gt = tl.where(rows[:, None] == slot, gs.to(tl.float32)[None, :], Gt.to(tl.float32))
        acc_h += Gt * g[None, :]
        acc_g += g * g
        acc_f += ff * ff
        if DAMP:  # entries whose damped Picard update would overflow the storage dtype
            nbad += tl.where(msk, storage_bad(zf + beta * g, z_ptr), 0)
    # Scale-safe norm partials (z and fz are not written by this kernel).
    gsq, fsq = safe_sums(tl.sum(acc_g, axis=0), tl.sum(acc_f, axis=0), z_ptr, fz_ptr, fz_stride,
                         b64, start, D, BPP, BLOCK)
    pbase = part_ptr + (b64 * C + c) * K
    tl.store(pbase, gsq)
    tl.store(pbase + 1, fsq)
    tl.store(pbase + 2, tl.sum(nbad, axis=0).to(tl.float64))
    tl.store(pbase + 3 + rows, tl.sum(acc_h, axis=1).to(tl.float64), mask=rows < M)


@triton.jit
def _anderson_solve_kernel(
    part_ptr, status_ptr, n_iter_ptr, abs_ptr, rel_ptr, abs0_ptr,
    best_abs_ptr, best_rel_ptr, best_res_ptr, H_ptr, coef_ptr, mode_ptr,
    slot, C, tol, divergence, eps, lam,
    STOP_REL: tl.constexpr, BEST: tl.constexpr,
    M: tl.constexpr, MP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, CP: tl.constexpr,
):
    b = tl.program_id(0)
    b64 = b.to(tl.int64)
    cs = tl.arange(0, CP)
    ks = tl.arange(0, KP)
    P = tl.load(part_ptr + (b64 * C + cs[:, None]) * K + ks[None, :],
                mask=(cs[:, None] < C) & (ks[None, :] < K), other=0.0)
    sums = tl.sum(P, axis=0)  # (KP,) float64
    gsq = tl.sum(tl.where(ks == 0, sums, 0.0), axis=0)
    fsq = tl.sum(tl.where(ks == 1, sums, 0.0), axis=0)
    nbad = tl.sum(tl.where(ks == 2, sums, 0.0), axis=0)
    rows = tl.arange(0, MP)
    cols = tl.arange(0, MP)
    # New Gram row: row[i] = sums[3 + i], stored in float32 (H's dtype).
    row = tl.sum(tl.where(ks[None, :] == rows[:, None] + 3, sums[None, :], 0.0), axis=1).to(tl.float32)

    status_old = tl.load(status_ptr + b).to(tl.int32)
    if BEST:
        best_old = tl.load(best_res_ptr + b)
    else:
        best_old = 0.0
    abs0 = tl.load(abs0_ptr + b)
    abs_r, rel_r, running, new_status, still, better = status_head(
        gsq, fsq, status_old, abs0, best_old, tol, divergence, eps, STOP_REL, BEST)

    # Gram matrix: replace row and column `slot` (every sample, as the reference).
    valid = (rows[:, None] < M) & (cols[None, :] < M)
    hptr = H_ptr + b64 * M * M + rows[:, None] * M + cols[None, :]
    Ht = tl.load(hptr, mask=valid, other=0.0)
    Ht = tl.where(rows[:, None] == slot, row[None, :], Ht)
    Ht = tl.where(cols[None, :] == slot, row[:, None], Ht)
    tl.store(hptr, Ht, mask=valid)

    # float64: (H + lam * H[slot, slot] I) a = 1; padding rows/cols (>= M) are the
    # identity with right-hand side 0, so their weights are 0.
    ridge = lam * tl.sum(tl.where(rows == slot, row, 0.0), axis=0).to(tl.float64)
    eye = rows[:, None] == cols[None, :]
    A = tl.where(valid, Ht.to(tl.float64), tl.where(eye, 1.0, 0.0).to(tl.float64))
    A = tl.where(eye & valid, A + ridge, A)
    rhs = tl.where(rows < M, 1.0, 0.0).to(tl.float64)
    n_bad_piv = tl.sum(tl.zeros([MP], dtype=tl.int32), axis=0)
    # LU with partial pivoting, as LAPACK getrf (torch.linalg.lu_factor) does.
    for k in tl.static_range(MP):
        colk = tl.sum(tl.where(cols[None, :] == k, A, 0.0), axis=1)
        cand = tl.where(rows >= k, tl.abs(colk), -1.0)
        # NaN (a sample whose f returned NaN): a valid index all the same (argmax of
        # NaNs is undefined, the interpreter raises); its NaN pivot marks it singular.
        cand = tl.where(cand == cand, cand, 1.7976931348623157e308)
        pr = tl.argmax(cand, axis=0)
        rowk = tl.sum(tl.where(rows[:, None] == k, A, 0.0), axis=0)
        rowp = tl.sum(tl.where(rows[:, None] == pr, A, 0.0), axis=0)
        A = tl.where(rows[:, None] == k, rowp[None, :], tl.where(rows[:, None] == pr, rowk[None, :], A))
        rk = tl.sum(tl.where(rows == k, rhs, 0.0), axis=0)
        rp = tl.sum(tl.where(rows == pr, rhs, 0.0), axis=0)
        rhs = tl.where(rows == k, rp, tl.where(rows == pr, rk, rhs))
        ck = tl.sum(tl.where(rows == k, colk, 0.0), axis=0)
        piv = tl.sum(tl.where(rows == pr, colk, 0.0), axis=0)
        colk = tl.where(rows == k, piv, tl.where(rows == pr, ck, colk))
        # Singular: a zero or non-finite pivot.
        okp = (piv != 0.0) & (tl.abs(piv) <= 1.7976931348623157e308)
        n_bad_piv += tl.where(okp, 0, 1)
        safe = tl.where(okp, piv, 1.0)
        fac = tl.where(rows > k, colk / safe, 0.0)
        A = A - fac[:, None] * rowp[None, :]
        rhs = rhs - fac * rp
    x = tl.zeros([MP], dtype=tl.float64)
    for kk in tl.static_range(MP):
        k = MP - 1 - kk
        rowk = tl.sum(tl.where(rows[:, None] == k, A, 0.0), axis=0)
        piv = tl.sum(tl.where(cols == k, rowk, 0.0), axis=0)
        rk = tl.sum(tl.where(rows == k, rhs, 0.0), axis=0)
        s = tl.sum(tl.where(cols > k, rowk * x, 0.0), axis=0)
        safe = tl.where(piv != 0.0, piv, 1.0)
        x = tl.where(rows == k, (rk - s) / safe, x)
    total = tl.sum(x, axis=0)
    a = x / total
    n_bad = tl.sum(tl.where((rows >= M) | (tl.abs(a) <= 1.7976931348623157e308), 0, 1), axis=0)
    ok = (n_bad_piv + n_bad) == 0
    pic_bad = nbad > 0
    # Singular system and a Picard fallback that overflows: NONFINITE now, z kept.
    dead = still & (~ok) & pic_bad
    new_status = tl.where(dead, 4, new_status)
    still = still & ~dead
    tl.store(abs_ptr + b, abs_r, mask=running)
    tl.store(rel_ptr + b, rel_r, mask=running)
    tl.store(status_ptr + b, new_status.to(tl.int8), mask=running)
    n_old = tl.load(n_iter_ptr + b)
    tl.store(n_iter_ptr + b, n_old + 1, mask=still)
    if BEST:
        tl.store(best_abs_ptr + b, abs_r, mask=better)
        tl.store(best_rel_ptr + b, rel_r, mask=better)
    mode = tl.where(still, tl.where(ok, 1, 2), 0) + tl.where(better, 4, 0) + tl.where(pic_bad, 8, 0)
    tl.store(coef_ptr + b64 * M + rows, tl.where(ok, a, 0.0).to(tl.float32), mask=rows < M)
    tl.store(mode_ptr + b, mode)


@triton.jit
def _commit_chunk(z_ptr, fz_ptr, fz_stride, ws_ptr, b64, start, D, BPP, beta,
                  MIX_OK, HAS_DAMP: tl.constexpr, BLOCK: tl.constexpr):
    """z <- the workspace mix (MIX_OK) or the damped Picard update, over BPP blocks."""
    offs = tl.arange(0, BLOCK)
    mix_v = (tl.zeros([BLOCK], dtype=tl.int32) + MIX_OK.to(tl.int32)) != 0
    for j in range(0, BPP):
        d = start + j * BLOCK + offs
        msk = d < D
        w = tl.load(ws_ptr + b64 * D + d, mask=msk & mix_v, other=0.0)
        zf = tl.load(z_ptr + b64 * D + d, mask=msk, other=0.0).to(tl.float32)
        ff = tl.load(fz_ptr + b64 * fz_stride + d, mask=msk & ~mix_v, other=0.0).to(tl.float32)
        if HAS_DAMP:
            pic = zf + beta * (ff - zf)
        else:
            pic = ff  # beta = 1: exactly f(z), as the reference
        tl.store(z_ptr + b64 * D + d, to_storage(tl.where(mix_v, w, pic), z_ptr), mask=msk)


@triton.jit
def _anderson_mix_kernel(
    z_ptr, fz_ptr, fz_stride, F_ptr, G_ptr, best_z_ptr, coef_ptr, mode_ptr, ws_ptr, mbad_ptr,
    status_ptr, n_iter_ptr,
    D, BPP, C, beta, damp,
    HAS_DAMP: tl.constexpr, BEST: tl.constexpr, COMMIT: tl.constexpr,
    M: tl.constexpr, MP: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.program_id(1)
    b64 = b.to(tl.int64)
    flag = tl.load(mode_ptr + b)
    if flag != 0:
        offs = tl.arange(0, BLOCK)
        rows = tl.arange(0, MP)
        rmask = rows < M
        a = tl.load(coef_ptr + b64 * M + rows, mask=rmask, other=0.0)
        hist = b64 * M * D
        start = c * BPP * BLOCK
        # Per-sample flags broadcast to vectors (the interpreter rejects scalar & vector masks).
        fv = tl.zeros([BLOCK], dtype=tl.int32) + flag
        better_v = (fv & 4) != 0
        mix_v = (fv & 3) == 1
        pic_v = (fv & 3) == 2
        nbad = tl.zeros([BLOCK], dtype=tl.int32)
        for j in range(0, BPP):
            d = start + j * BLOCK + offs
            msk = d < D
            zr = tl.load(z_ptr + b64 * D + d, mask=msk, other=0.0)
            if BEST:
                tl.store(best_z_ptr + b64 * D + d, zr, mask=msk & better_v)
            zf = zr.to(tl.float32)
            tmask = rmask[:, None] & (msk & mix_v)[None, :]
            tptr = hist + rows[:, None] * D + d[None, :]
            Ft = tl.load(F_ptr + tptr, mask=tmask, other=0.0).to(tl.float32)
            mix = tl.sum(a[:, None] * Ft, axis=0)
            if HAS_DAMP:
                Gt = tl.load(G_ptr + tptr, mask=tmask, other=0.0).to(tl.float32)
                mix = mix - damp * tl.sum(a[:, None] * Gt, axis=0)
            tl.store(ws_ptr + b64 * D + d, mix, mask=msk & mix_v)
            nbad += tl.where(msk & mix_v, storage_bad(mix, z_ptr), 0)
            # mode 2: the Picard fallback, known finite (else the sample was frozen)
            ff = tl.load(fz_ptr + b64 * fz_stride + d, mask=msk & pic_v, other=0.0).to(tl.float32)
            if HAS_DAMP:
                pic = zf + beta * (ff - zf)
            else:
                pic = ff  # beta = 1: exactly f(z), as the reference
            tl.store(z_ptr + b64 * D + d, to_storage(pic, z_ptr), mask=msk & pic_v)
        n_mix_bad = tl.sum(nbad, axis=0)
        if COMMIT:
            if (flag & 3) == 1:
                tl.debug_barrier()  # the workspace written above is read back below
                mix_ok = n_mix_bad == 0
                if mix_ok | ((flag & 8) == 0):
                    _commit_chunk(z_ptr, fz_ptr, fz_stride, ws_ptr, b64, start, D, BPP, beta,
                                  mix_ok, HAS_DAMP, BLOCK)
                else:  # mix and Picard fallback both overflow: NONFINITE, z kept
                    tl.store(status_ptr + b, tl.full([], 4, tl.int8))
                    tl.store(n_iter_ptr + b, tl.load(n_iter_ptr + b) - 1)
        else:
            tl.store(mbad_ptr + b64 * C + c, n_mix_bad)


@triton.jit
def _anderson_commit_kernel(
    z_ptr, fz_ptr, fz_stride, ws_ptr, mbad_ptr, mode_ptr, status_ptr, n_iter_ptr,
    D, BPP, C, beta,
    HAS_DAMP: tl.constexpr, BLOCK: tl.constexpr, CP: tl.constexpr,
):
    b = tl.program_id(0)
    c = tl.program_id(1)
    b64 = b.to(tl.int64)
    flag = tl.load(mode_ptr + b)
    if (flag & 3) == 1:
        cs = tl.arange(0, CP)
        n_bad = tl.sum(tl.load(mbad_ptr + b64 * C + cs, mask=cs < C, other=0), axis=0)
        mix_ok = n_bad == 0
        if mix_ok | ((flag & 8) == 0):
            _commit_chunk(z_ptr, fz_ptr, fz_stride, ws_ptr, b64, c * BPP * BLOCK, D, BPP, beta,
                          mix_ok, HAS_DAMP, BLOCK)
        elif c == 0:  # mix and Picard fallback both overflow: NONFINITE, z kept
            tl.store(status_ptr + b, tl.full([], 4, tl.int8))
            tl.store(n_iter_ptr + b, tl.load(n_iter_ptr + b) - 1)


def launch_anderson(st: LoopState, fz: torch.Tensor, p: StepParams, slot: int, *,
                    block=None, splits=None, scratch=None) -> int:
    """Run the Triton Anderson step in place; returns the number of kernel launches (3,
    or 4 when D is split across programs)."""
    z = st.z
    B, D = z.shape
    M = st.F.shape[1]
    fz = rowwise(fz)
    MP = max(2, triton.next_power_of_2(M))
    K = M + 3
    BLOCK = block or pick_block(D, max(16, TILE_CAP // MP))
    C, bpp = split_geometry(B, D, BLOCK, z.device, splits)
    best = st.best_z is not None
    best_res = (st.best_rel if p.stop_rel else st.best_abs) if best else st.abs_res
    best_z = st.best_z if best else z
    best_abs = st.best_abs if best else st.abs_res
    best_rel = st.best_rel if best else st.rel_res
    dev = z.device
    damp = p.beta != 1.0
    KP = triton.next_power_of_2(K)
    CP = max(2, triton.next_power_of_2(C))
    part = torch.empty(B * C * K, dtype=torch.float64, device=dev)
    coef = torch.empty(B * M, dtype=torch.float32, device=dev)
    mode = torch.empty(B, dtype=torch.int32, device=dev)
    ws = torch.empty(B * D, dtype=torch.float32, device=dev)
    mbad = torch.empty(B * C, dtype=torch.int32, device=dev)
    if scratch is not None:  # tests/debugging: expose the per-sample weights and modes
        scratch.update(part=part, coef=coef, mode=mode)
    num_warps = 8 if MP * BLOCK >= 4096 else 4
    _anderson_history_kernel[(B, C)](
        z, fz, fz.stride(0), st.F, st.G, part, slot, D, bpp, C, p.beta,
        M=M, MP=MP, K=K, BLOCK=BLOCK, DAMP=damp, num_warps=num_warps,
    )
    _anderson_solve_kernel[(B,)](
        part, st.status, st.n_iter, st.abs_res, st.rel_res, st.abs0,
        best_abs, best_rel, best_res, st.H, coef, mode,
        slot, C, p.tol, p.divergence, p.eps, p.lam,
        STOP_REL=p.stop_rel, BEST=best, M=M, MP=MP, K=K,
        KP=KP, CP=CP, num_warps=1 if CP * KP <= 512 else 4,
    )
    _anderson_mix_kernel[(B, C)](
        z, fz, fz.stride(0), st.F, st.G, best_z, coef, mode, ws, mbad, st.status, st.n_iter,
        D, bpp, C, p.beta, 1.0 - p.beta,
        HAS_DAMP=damp, BEST=best, COMMIT=(C == 1), M=M, MP=MP, BLOCK=BLOCK, num_warps=num_warps,
    )
    if C == 1:
        return 3
    _anderson_commit_kernel[(B, C)](
        z, fz, fz.stride(0), ws, mbad, mode, st.status, st.n_iter, D, bpp, C, p.beta,
        HAS_DAMP=damp, BLOCK=BLOCK, CP=CP, num_warps=num_warps,
    )
    return 4


def anderson_step(st: LoopState, fz: torch.Tensor, p: StepParams, slot: int) -> None:
    """Backend entry point: Triton kernels, or the reference step for float64 storage,
    empty batches, non-contiguous history buffers and m > MAX_M (same results, not
    fused; see the module docstring)."""
    if (
        not supported(st, fz)
        or st.F.shape[1] > MAX_M
        or not (st.F.is_contiguous() and st.G.is_contiguous() and st.H.is_contiguous())
        or st.H.dtype != torch.float32
    ):
        reference.anderson_step(st, fz, p, slot)
        return
    launch_anderson(st, fz, p, slot)
