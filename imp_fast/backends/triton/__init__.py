"""Triton backend: fused GPU kernels for the per-iteration steps.

* ``picard.py``: Picard step, 1 launch (one program per sample) or 2 (D split across
  programs, partial sums + finishing kernel).
* ``anderson.py``: Anderson step, 3 launches (history + partial sums, per-sample
  statuses/Gram update/small float64 solve, mix), plus a commit launch when D is split
  across programs (the mix's finiteness is decided on the whole sample before z is
  written). History sizes m > 16 run the reference step (any m works on every backend).
* ``probes.py``: the Lipschitz probes' fused finite-difference ratios (``pair_ratios``),
  1 launch, one program per (sample, perturbation) pair, float64 accumulation.
* ``common.py``: the shared residual/status head and launch geometry.

Runs on CUDA tensors; with ``TRITON_INTERPRET=1`` set before this package is imported
the kernels also run (slowly) on CPU tensors under the Triton interpreter, for tests.
float64 storage runs the reference steps (documented in each module).
"""
from __future__ import annotations

import os

import torch

NAME = "triton"
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICES = ("cpu", "cuda") if _INTERPRET else ("cuda",)

_import_error = None
try:
    from .picard import picard_step, launch_picard  # noqa: F401
    from .anderson import anderson_step, launch_anderson  # noqa: F401
    from .probes import pair_ratios, launch_pair_ratios  # noqa: F401
except Exception as exc:  # triton missing or broken: reported, never raised at import
    _import_error = f"{type(exc).__name__}: {exc}"

    def picard_step(st, fz, p):  # pragma: no cover - only reached if misused
        raise RuntimeError(f"triton backend unavailable: {_import_error}")

    def anderson_step(st, fz, p, slot):  # pragma: no cover
        raise RuntimeError(f"triton backend unavailable: {_import_error}")

    def pair_ratios(y, dnorm, status, out):  # pragma: no cover
        raise RuntimeError(f"triton backend unavailable: {_import_error}")

__all__ = ["NAME", "DEVICES", "picard_step", "anderson_step", "pair_ratios", "unavailable_reason"]


def unavailable_reason():
    """None when the backend can run here, else why not."""
    if _import_error is not None:
        return f"triton is not importable ({_import_error})"
    if not _INTERPRET and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 before import to run the kernels on CPU)"
    return None
