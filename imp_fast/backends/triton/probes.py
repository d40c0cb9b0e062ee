"""The Lipschitz probes' fused finite-difference ratios on GPU (Triton).

``pair_ratios(y, dnorm, status, out)`` writes

    out[b, p] = ||y[(1 + p) B + b] - y[b]||_2 / dnorm[p, b]   (NaN if either row is NONFINITE)

for the stacked probe batch ``y`` ((1 + P) * B, D); see ``reference.pair_ratios`` (the
ground truth) and the C++ twins (csrc/probes.cpp, csrc/cuda/probes.cu).

One launch, one program per (b, p) pair (``pair = b * P + p``, out's layout): the
program walks D in BLOCK-element chunks with masked loads and accumulates the squared
differences in **float64** (float16/bfloat16/float32 loads are cast to float32, which
is exact, then to float64, so the differences and their squares can neither overflow
nor underflow). float64 storage runs in the kernel too: a float64 sum that left the
range where it is exact to rounding (overflow, underflow, exactly zero) is recomputed
scaled by the pair's largest |difference| (the reference's scale-safe norm). The ratio
is formed in float64 and rounded once to ``out``'s dtype. Pairs with a NONFINITE row
load nothing (masked) and get NaN. Only ``out`` is written; no workspace, no host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import pick_block

__all__ = ["pair_ratios", "launch_pair_ratios"]

BLOCK_CAP = 1024
NONFINITE = 4  # Status.NONFINITE
_STORAGE = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _pair_ratios_kernel(
    y_ptr, dnorm_ptr, status_ptr, out_ptr, B, P, D,
    IS_F64: tl.constexpr, BLOCK: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)  # b * P + p
    b = pair // P
    p = pair % P
    r = (1 + p) * B + b
    ok = (tl.load(status_ptr + b).to(tl.int32) != 4) & (tl.load(status_ptr + r).to(tl.int32) != 4)
    # the pair's flag as a vector (the interpreter rejects scalar & vector masks)
    ok_v = (tl.zeros([BLOCK], dtype=tl.int32) + ok.to(tl.int32)) != 0
    offs = tl.arange(0, BLOCK)
    x0_ptr = y_ptr + b * D
    x1_ptr = y_ptr + r * D
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, D, BLOCK):
        d = start + offs
        msk = (d < D) & ok_v
        if IS_F64:
            x0 = tl.load(x0_ptr + d, mask=msk, other=0.0)
            x1 = tl.load(x1_ptr + d, mask=msk, other=0.0)
        else:  # float32 first: exact, and bf16/fp16 arithmetic is avoided
            x0 = tl.load(x0_ptr + d, mask=msk, other=0.0).to(tl.float32).to(tl.float64)
            x1 = tl.load(x1_ptr + d, mask=msk, other=0.0).to(tl.float32).to(tl.float64)
        diff = x1 - x0
        acc += diff * diff
    s = tl.sum(acc, axis=0)
    n = tl.sqrt(s)
    if IS_F64:
        # Scale-safe recomputation where the fast sum over/underflowed (a NaN sum stays
        # NaN: no difference is NaN on this path, so the max below is NaN-free).
        redo = ~((s >= 1.1806906454401013e-271) & (s <= 1.7976931348623157e308)) & (s == s) & ok
        if redo:
            mxv = tl.zeros([BLOCK], dtype=tl.float64)
            for start in range(0, D, BLOCK):
                d = start + offs
                msk = d < D
                x0 = tl.load(x0_ptr + d, mask=msk, other=0.0)
                x1 = tl.load(x1_ptr + d, mask=msk, other=0.0)
                mxv = tl.maximum(mxv, tl.abs(x1 - x0))
            mx = tl.max(mxv, axis=0)
            finite_pos = (mx > 0.0) & (mx <= 1.7976931348623157e308)
            scale = tl.where(finite_pos, mx, 1.0)
            acc2 = tl.zeros([BLOCK], dtype=tl.float64)
            for start in range(0, D, BLOCK):
                d = start + offs
                msk = d < D
                x0 = tl.load(x0_ptr + d, mask=msk, other=0.0)
                x1 = tl.load(x1_ptr + d, mask=msk, other=0.0)
                v = (x1 - x0) / scale
                acc2 += v * v
            n = tl.where(finite_pos, scale * tl.sqrt(tl.sum(acc2, axis=0)), mx)
    dn = tl.load(dnorm_ptr + p * B + b).to(tl.float64)
    ratio = tl.where(ok, n / dn, float("nan"))
    tl.store(out_ptr + pair, ratio.to(out_ptr.dtype.element_ty))


def _check(y: torch.Tensor, dnorm: torch.Tensor, status: torch.Tensor, out: torch.Tensor) -> None:
    """The C++ op's argument checks (csrc/probes_checks.h), as ValueErrors."""
    if y.dim() != 2 or not y.is_contiguous():
        raise ValueError(f"imp_fast.pair_ratios: y must be a contiguous ((1 + P) * B, D) tensor, got shape "
                         f"{tuple(y.shape)} contiguous={y.is_contiguous()}")
    if y.dtype not in _STORAGE:
        raise ValueError(f"imp_fast.pair_ratios: y must be float64, float32, float16 or bfloat16, got {y.dtype}")
    cdt = torch.float64 if y.dtype == torch.float64 else torch.float32
    if dnorm.dim() != 2:
        raise ValueError(f"imp_fast.pair_ratios: dnorm must be a (P, B) tensor, got shape {tuple(dnorm.shape)}")
    P, B = dnorm.shape
    NB = y.shape[0]
    if NB != (1 + P) * B:
        raise ValueError(f"imp_fast.pair_ratios: y has {NB} rows but dnorm's shape {tuple(dnorm.shape)} (P, B) "
                         f"needs (1 + P) * B = {(1 + P) * B}")
    if dnorm.dtype != cdt or not dnorm.is_contiguous() or dnorm.device != y.device:
        raise ValueError(f"imp_fast.pair_ratios: dnorm must be a contiguous {cdt} tensor on {y.device} (the compute "
                         f"dtype of {y.dtype} y), got {dnorm.dtype} on {dnorm.device} "
                         f"contiguous={dnorm.is_contiguous()}")
    if (status.dim() != 1 or status.shape[0] != NB or status.dtype != torch.int8 or not status.is_contiguous()
            or status.device != y.device):
        raise ValueError(f"imp_fast.pair_ratios: status must be a contiguous ({NB},) int8 tensor on {y.device}, "
                         f"got {tuple(status.shape)} {status.dtype} on {status.device} "
                         f"contiguous={status.is_contiguous()}")
    if (out.dim() != 2 or tuple(out.shape) != (B, P) or out.dtype != cdt or not out.is_contiguous()
            or out.device != y.device):
        raise ValueError(f"imp_fast.pair_ratios: out must be a contiguous ({B}, {P}) {cdt} tensor on {y.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device} contiguous={out.is_contiguous()}")


def launch_pair_ratios(y: torch.Tensor, dnorm: torch.Tensor, status: torch.Tensor, out: torch.Tensor,
                       *, block=None) -> int:
    """Check the arguments and run the kernel; returns the number of launches (0 when
    there is no pair). ``block`` forces the chunk size (tests)."""
    _check(y, dnorm, status, out)
    P, B = dnorm.shape
    D = y.shape[1]
    if B * P == 0:
        return 0
    BLOCK = block or pick_block(D, BLOCK_CAP)
    _pair_ratios_kernel[(B * P,)](
        y, dnorm, status, out, B, P, D,
        IS_F64=y.dtype == torch.float64, BLOCK=BLOCK, num_warps=4 if BLOCK >= 512 else 2,
    )
    return 1


def pair_ratios(y: torch.Tensor, dnorm: torch.Tensor, status: torch.Tensor, out: torch.Tensor) -> None:
    """Backend entry point: see the module docstring and ``reference.pair_ratios``."""
    launch_pair_ratios(y, dnorm, status, out)
