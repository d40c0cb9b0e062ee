"""Backend registry: which implementation of the per-iteration steps a solve uses.

``backend="auto"`` picks triton for CUDA tensors (when Triton is importable), the
compiled ``cpp`` ops for CPU tensors (when ``imp_fast._C`` is built), else
``reference``. Asking for a backend by name that is not available is an error that
says why; "auto" falling back from cpp warns once.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ["Backend", "BACKENDS", "get_backend", "backend_status", "BackendUnavailable"]

BACKENDS = ("reference", "cpp", "triton")


class BackendUnavailable(RuntimeError):
    """A backend named explicitly cannot run here (reason in the message)."""


@dataclass(frozen=True)
class Backend:
    """The fused ops of one implementation (see ``imp_fast.state``).

    ``picard_step`` and ``anderson_step`` every backend has. ``broyden_step`` and
    ``pair_ratios`` (the probes' fused finite-difference ratios) are optional: where a
    backend has none, the plain-torch ones run (``imp_fast.backends.broyden`` and
    ``imp_fast.backends.reference.pair_ratios``)."""

    name: str
    picard_step: Callable
    anderson_step: Callable
    devices: Tuple[str, ...]  # device types it runs on
    broyden_step: Optional[Callable] = None
    pair_ratios: Optional[Callable] = None


# Module holding each backend: it defines picard_step, anderson_step, NAME, and
# optionally broyden_step, pair_ratios, DEVICES (default ("cpu", "cuda")) and
# unavailable_reason() -> str | None.
_MODULES: Dict[str, str] = {
    "reference": "imp_fast.backends.reference",
    "cpp": "imp_fast.backends.cpp",
    "triton": "imp_fast.backends.triton",
}
_cache: Dict[str, Tuple[Optional[Backend], Optional[str]]] = {}
_warned_auto = False


def _load(name: str) -> Tuple[Optional[Backend], Optional[str]]:
    if name not in _cache:
        try:
            mod = importlib.import_module(_MODULES[name])
            why = getattr(mod, "unavailable_reason", lambda: None)()
            if why:
                _cache[name] = (None, why)
            else:
                devs = tuple(getattr(mod, "DEVICES", ("cpu", "cuda")))
                _cache[name] = (
                    Backend(mod.NAME, mod.picard_step, mod.anderson_step, devs,
                            getattr(mod, "broyden_step", None), getattr(mod, "pair_ratios", None)),
                    None,
                )
        except Exception as exc:  # a missing backend is reported, never a crash at import
            _cache[name] = (None, f"{type(exc).__name__}: {exc}")
    return _cache[name]


def backend_status() -> Dict[str, Optional[str]]:
    """Map each backend name to None (available) or the reason it is not."""
    return {name: _load(name)[1] for name in BACKENDS}


def get_backend(name: str, device: torch.device) -> Backend:
    """Resolve ``name`` ("auto" or one of BACKENDS) for tensors on ``device``."""
    global _warned_auto
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            be, _ = _load("triton")
            if be is not None:
                return be
            be, _ = _load("cpp")
            if be is not None and "cuda" in be.devices:
                return be
        elif device.type == "cpu":
            be, why = _load("cpp")
            if be is not None:
                return be
            if not _warned_auto:
                _warned_auto = True
                warnings.warn(
                    "imp_fast: compiled backend 'cpp' unavailable, using 'reference' "
                    f"({why}). Build it with `pip install -e . --no-build-isolation`; "
                    "`imp-fast info` shows the backends.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return _load("reference")[0]
    be, why = _load(name)
    if be is None:
        raise BackendUnavailable(f"backend {name!r} is not available: {why}")
    if device.type not in be.devices:
        raise BackendUnavailable(
            f"backend {name!r} runs on {be.devices} tensors, got a tensor on {device.type!r}"
        )
    return be
