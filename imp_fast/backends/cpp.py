"""Compiled backend: the per-iteration steps as fused C++ ops (``imp_fast._C``).

Each step is one ``torch.ops.imp_fast`` call: the residual norms, statuses, best-iterate
tracking, ring-buffer and Gram updates, the small per-sample solve and the mixing all
happen inside it (csrc/ops.cpp on CPU, csrc/cuda/ops.cu on CUDA when built with CUDA).
The ops carry schemas that mark what they mutate, and fake kernels registered here,
so they trace under ``torch.compile``.

Numerical rules: the reference backend's (its module docstring): scale-safe norms (the
fast float sums are recomputed in double for a sample whose sum over/underflowed),
rel = 0 at an exact fixed point, an update that would overflow the storage dtype flags
the sample NONFINITE before anything is written, the small Anderson system is solved in
float64. Any history size m >= 1 (the CUDA op solves in shared memory up to m = 64 and
in a global workspace beyond). Per-sample tolerances: every op takes a trailing optional
``tol_t`` ((B,) in the compute dtype; ``LoopState.tol`` when set), with which sample b
converges when its residual is below ``tol_t[b]`` (the scalar ``tol`` is then unused).
Every tensor argument is checked (shape, dtype, device,
contiguity) on CPU and CUDA alike (csrc/checks.h).

Build the extension with ``pip install -e . --no-build-isolation`` (after installing
torch); without it this backend reports itself unavailable and ``auto`` falls back to
the reference backend.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..state import LoopState, StepParams

__all__ = ["NAME", "DEVICES", "picard_step", "anderson_step", "unavailable_reason", "WITH_CUDA"]

NAME = "cpp"

_IMPORT_ERROR: Optional[str] = None
try:
    from .. import _C  # noqa: F401  (loading it registers torch.ops.imp_fast.*)
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = (
        f"imp_fast._C is not built or does not load ({exc}); build it with "
        "`pip install -e . --no-build-isolation` after installing torch"
    )

WITH_CUDA: bool = bool(getattr(_C, "WITH_CUDA", False))
DEVICES = ("cpu", "cuda") if WITH_CUDA else ("cpu",)


def unavailable_reason() -> Optional[str]:
    """None when the compiled ops are loaded, else why not and how to build them."""
    return _IMPORT_ERROR


if _C is not None:

    @torch.library.register_fake("imp_fast::picard_step")
    def _picard_step_fake(z, fz, status, n_iter, abs_res, rel_res, abs0, best_z, best_abs,
                          best_rel, tol, beta, stop_rel, divergence, eps, tol_t=None):
        return None

    @torch.library.register_fake("imp_fast::anderson_step")
    def _anderson_step_fake(z, fz, status, n_iter, abs_res, rel_res, abs0, best_z, best_abs,
                            best_rel, F, G, H, slot, tol, beta, stop_rel, divergence, eps, lam, tol_t=None):
        return None

    # the overloads themselves: skips overload resolution on every call (eager speed)
    _picard_op = torch.ops.imp_fast.picard_step.default
    _anderson_op = torch.ops.imp_fast.anderson_step.default

# Eager CPU fast path (same kernels, no dispatcher argument parsing); see csrc/ops.cpp.
_fast = getattr(_C, "_step_cpu", None)


def _fast_state(st: LoopState, p: StepParams, fz: torch.Tensor):
    """The state as the tuple ``_C._step_cpu`` takes, built once per solve (kept in
    ``st.cache``), or None where the eager fast path does not apply: not CPU, tensor
    subclasses (fake tensors), tracing. There the torch.ops call is used."""
    if _fast is None or type(fz) is not torch.Tensor or not fz.is_cpu:
        return None
    tol_t = st.tol  # per-sample tolerances (B,) or None (scalar p.tol)
    hit = st.cache.get(("cpp", p))
    if hit is not None and hit[0] is st.z and hit[18] is tol_t:
        return hit
    if torch.compiler.is_compiling():
        return None
    tensors = (st.z, st.status, st.n_iter, st.abs_res, st.rel_res, st.abs0, st.best_z, st.best_abs, st.best_rel,
               st.F, st.G, st.H)
    if any(t is not None and type(t) is not torch.Tensor for t in (*tensors, tol_t)):
        return None
    hit = st.cache[("cpp", p)] = (*tensors, float(p.tol), float(p.beta), bool(p.stop_rel), float(p.divergence),
                                  float(p.eps), float(p.lam), tol_t)
    return hit


def picard_step(st: LoopState, fz: torch.Tensor, p: StepParams) -> None:
    """z <- (1 - beta) z + beta f(z) for running samples; residuals and statuses first."""
    state = _fast_state(st, p, fz)
    if state is not None:
        _fast(state, fz)
        return
    _picard_op(
        st.z, fz, st.status, st.n_iter, st.abs_res, st.rel_res, st.abs0,
        st.best_z, st.best_abs, st.best_rel,
        p.tol, p.beta, p.stop_rel, p.divergence, p.eps, st.tol,
    )


def anderson_step(st: LoopState, fz: torch.Tensor, p: StepParams, slot: int) -> None:
    """Type-II Anderson step (see ``reference.anderson_step``), one fused op."""
    state = _fast_state(st, p, fz)
    if state is not None:
        _fast(state, fz, slot)
        return
    _anderson_op(
        st.z, fz, st.status, st.n_iter, st.abs_res, st.rel_res, st.abs0,
        st.best_z, st.best_abs, st.best_rel, st.F, st.G, st.H, slot,
        p.tol, p.beta, p.stop_rel, p.divergence, p.eps, p.lam, st.tol,
    )



# ----------------------------------------------------------------------------------------
# The Lipschitz probes' fused finite-difference ratios (csrc/probes.cpp, csrc/cuda/probes.cu).
# Without the extension pair_ratios is None: the probes run reference.pair_ratios.

__all__ += ["pair_ratios"]

if _C is not None:

    @torch.library.register_fake("imp_fast::pair_ratios")
    def _pair_ratios_fake(y, dnorm, status, out):
        return None

    _pair_ratios_op = torch.ops.imp_fast.pair_ratios.default

    def pair_ratios(y: torch.Tensor, dnorm: torch.Tensor, status: torch.Tensor, out: torch.Tensor) -> None:
        """``out[b, p] = ||y[(1 + p) B + b] - y[b]|| / dnorm[p, b]`` (NaN where either row
        is NONFINITE), one fused op: see ``reference.pair_ratios`` for the semantics.
        Writes only ``out`` (contiguous (B, P), compute dtype); no host sync, no
        (P * B, D) temporaries."""
        _pair_ratios_op(y, dnorm, status, out)

else:
    pair_ratios = None

# --- Broyden (csrc/broyden.cpp, csrc/cuda/broyden.cu): one fused op per iteration,
# matching imp_fast/backends/broyden.py (the plain-torch step). ---
__all__ += ["broyden_step"]

if _C is not None:

    @torch.library.register_fake("imp_fast::broyden_step")
    def _broyden_step_fake(z, fz, status, n_iter, abs_res, rel_res, abs0, best_z, best_abs, best_rel,
                           U, V, z_prev, g_prev, k, tol, beta, stop_rel, divergence, eps, tol_t=None):
        return None

    _broyden_op = torch.ops.imp_fast.broyden_step.default

    def broyden_step(st: LoopState, fz: torch.Tensor, p: StepParams, k: int) -> None:
        """Limited-memory good Broyden step (see ``imp_fast.backends.broyden``), one fused op."""
        _broyden_op(
            st.z, fz, st.status, st.n_iter, st.abs_res, st.rel_res, st.abs0,
            st.best_z, st.best_abs, st.best_rel, st.U, st.V, st.z_prev, st.g_prev, k,
            p.tol, p.beta, p.stop_rel, p.divergence, p.eps, st.tol,
        )

else:  # no extension: the loop runs the plain-torch step
    broyden_step = None
