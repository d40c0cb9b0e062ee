"""Shared pieces of the Triton steps: the residual/status head and launch geometry.

The status head is a ``@triton.jit`` helper inlined into the finishing kernel of each
step; it reproduces ``reference._residuals_and_status`` for one sample: same codes,
same test order (non-finite first, then ``res < tol``, then divergence), same numerical
rules (see the reference module's docstring): scale-safe norms (``chunk_sums``: float32
sums, recomputed in float64 when they left the exact range), rel = 0 at an exact fixed
point, and updates that would overflow the storage dtype are detected before anything
is written (``storage_bad``).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ...state import LoopState

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Largest finite float32: |x| <= FLT_MAX is False for NaN and +-Inf.
FLT_MAX = 3.4028234663852886e38

# Most D-splits per sample (size of the partial-sum tile the finishing kernel reduces).
MAX_SPLITS = 256


# Squared-norm sums (float32 accumulation) outside [SUM_LO, FLT_MAX] may have
# overflowed or lost precision to underflow: such a chunk's sums are recomputed in
# float64 (see ``chunk_sums``). Same bound as the C++ ops (csrc/step_common.h).
SUM_LO = 8.271806125530277e-25  # 2^-80


@triton.jit
def storage_bad(x, ptr):
    """int32 1 where float32 ``x`` rounds to a non-finite value of ``ptr``'s element type
    (the value ``to_storage`` would store), else 0."""
    u = to_storage(x, ptr).to(tl.float32)
    return tl.where(tl.abs(u) <= 3.4028234663852886e38, 0, 1)


@triton.jit
def safe_sums(gsq, fsq, z_ptr, fz_ptr, fz_stride, b64, start, D, BPP, BLOCK: tl.constexpr):
    """float32 sums (sum (f - z)^2, sum f^2) of BPP blocks of sample b64 from ``start``,
    returned as float64, scale-safe: a sum outside [SUM_LO, FLT_MAX] (overflow,
    underflow, or exactly zero) is recomputed in float64 from z and fz, where squares
    of float32 values neither overflow nor underflow (rare). Callers must not have
    written z or fz of these blocks (the recomputation reads the step's inputs)."""
    gsq64 = gsq.to(tl.float64)
    fsq64 = fsq.to(tl.float64)
    redo_g = ~((gsq >= 8.271806125530277e-25) & (gsq <= 3.4028234663852886e38))
    redo_f = ~((fsq >= 8.271806125530277e-25) & (fsq <= 3.4028234663852886e38))
    if redo_g | redo_f:
        offs = tl.arange(0, BLOCK)
        acc_g64 = tl.zeros([BLOCK], dtype=tl.float64)
        acc_f64 = tl.zeros([BLOCK], dtype=tl.float64)
        for j in range(0, BPP):
            d = start + j * BLOCK + offs
            msk = d < D
            zd = tl.load(z_ptr + b64 * D + d, mask=msk, other=0.0).to(tl.float64)
            fd = tl.load(fz_ptr + b64 * fz_stride + d, mask=msk, other=0.0).to(tl.float64)
            gd = fd - zd
            acc_g64 += gd * gd
            acc_f64 += fd * fd
        gsq64 = tl.where(redo_g, tl.sum(acc_g64, axis=0), gsq64)
        fsq64 = tl.where(redo_f, tl.sum(acc_f64, axis=0), fsq64)
    return gsq64, fsq64


@triton.jit
def chunk_sums(z_ptr, fz_ptr, fz_stride, b64, start, D, BPP, beta,
               BLOCK: tl.constexpr, DAMP: tl.constexpr):
    """Scale-safe sums over BPP blocks of sample b64 from ``start`` (see ``safe_sums``):
    (sum (f - z)^2, sum f^2) as float64, and the number of entries whose damped update
    z + beta (f - z) (DAMP only; else 0) overflows the storage dtype."""
    offs = tl.arange(0, BLOCK)
    acc_g = tl.zeros([BLOCK], dtype=tl.float32)
    acc_f = tl.zeros([BLOCK], dtype=tl.float32)
    nbad = tl.zeros([BLOCK], dtype=tl.int32)
    for j in range(0, BPP):
        d = start + j * BLOCK + offs
        msk = d < D
        zf = tl.load(z_ptr + b64 * D + d, mask=msk, other=0.0).to(tl.float32)
        ff = tl.load(fz_ptr + b64 * fz_stride + d, mask=msk, other=0.0).to(tl.float32)
        g = ff - zf
        acc_g += g * g
        acc_f += ff * ff
        if DAMP:
            nbad += tl.where(msk, storage_bad(zf + beta * g, z_ptr), 0)
    gsq64, fsq64 = safe_sums(tl.sum(acc_g, axis=0), tl.sum(acc_f, axis=0), z_ptr, fz_ptr, fz_stride,
                             b64, start, D, BPP, BLOCK)
    return gsq64, fsq64, tl.sum(nbad, axis=0)


@triton.jit
def status_head(gsq, fsq, status_old, abs0, best_old, tol, divergence, eps,
                STOP_REL: tl.constexpr, BEST: tl.constexpr):
    """Residuals and statuses of one sample from its two finished float64 squared norms.

    Returns (abs_r, rel_r, running, new_status, still, better) where ``running`` means
    the sample was running before this step (its residuals are recorded), ``still``
    that it is running after it (its z moves), ``better`` that it beat its best.
    rel_r is 0 where abs_r is 0 (an exact fixed point is converged whatever eps).
    """
    abs_r = tl.sqrt(gsq).to(tl.float32)
    nf = tl.sqrt(fsq).to(tl.float32)
    rel_r = tl.where(abs_r == 0.0, 0.0, abs_r / (nf + eps))
    if STOP_REL:
        res = rel_r
    else:
        res = abs_r
    code = tl.where(res < tol, 1, tl.where(abs_r > divergence * abs0, 3, 0))
    code = tl.where(abs_r <= 3.4028234663852886e38, code, 4)
    running = status_old == 0
    new_status = tl.where(running, code, status_old)
    still = new_status == 0
    if BEST:
        better = running & (res < best_old)
    else:
        better = running & (abs_r < 0.0)  # always False (sqrt >= 0, NaN < 0 is False)
    return abs_r, rel_r, running, new_status, still, better


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Programs that fill the device: 4 per SM on CUDA; few under the interpreter."""
    if device.type == "cuda" and not INTERPRET:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return 4 * _sm_count(idx)
    return 1  # interpreter: programs run one after another, fewer is faster


def split_geometry(B: int, D: int, block: int, device: torch.device, splits=None):
    """Split each sample's D into C chunks of BPP blocks of ``block`` elements.

    Small B and large D get many splits so that B*C programs fill the GPU; a large B
    gets one program per sample (C == 1). ``splits`` forces C (tests).
    Returns (C, BPP).
    """
    nblocks = triton.cdiv(D, block)
    if splits is None:
        C = max(1, min(nblocks, triton.cdiv(target_programs(device), max(B, 1)), MAX_SPLITS))
    else:
        C = max(1, min(int(splits), nblocks, MAX_SPLITS))
    bpp = triton.cdiv(nblocks, C)
    C = triton.cdiv(nblocks, bpp)
    return C, bpp


def pick_block(D: int, cap: int) -> int:
    """Power-of-two block no larger than cap and no larger than D needs (min 16)."""
    return max(16, min(cap, triton.next_power_of_2(max(D, 1))))


def supported(st: LoopState, fz: torch.Tensor) -> bool:
    """Whether the Triton kernels handle this state (else the reference step runs).

    float64 storage (float64 compute dtype), empty batches and per-sample tolerances
    (``st.tol``) go to the reference step; everything else (float32, float16,
    bfloat16 with one tol) runs in the kernels.
    """
    z = st.z
    return (
        st.tol is None
        and z.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and z.dim() == 2
        and z.numel() > 0
        and z.is_contiguous()
        and fz.dtype == z.dtype
        and fz.shape == z.shape
    )


def rowwise(fz: torch.Tensor) -> torch.Tensor:
    """fz with unit stride along D (a copy only when f returned a strided view)."""
    if fz.stride(1) != 1 and fz.shape[1] > 1:
        fz = fz.contiguous()
    return fz


@triton.jit
def to_storage(x, ptr):
    """Cast float32 ``x`` to the element dtype of ``ptr``, rounding to nearest even.

    For bfloat16 the rounding is done on the bits first (the Triton interpreter
    truncates on fp32 -> bf16 casts; on GPU this equals the native cvt.rn), so both
    match torch's ``.to(torch.bfloat16)``.
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(ptr.dtype.element_ty)
