"""Argument checks shared by the public entry points: one clear error per mistake."""
from __future__ import annotations

import difflib
import math
from typing import Any, Iterable, Optional, Tuple

import torch

SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_tensor(name: str, value: Any, *, min_dim: int = 1) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() < min_dim:
        raise ValueError(
            f"{name} must have a batch dimension (dim 0), got a {value.dim()}-d tensor of shape "
            f"{tuple(value.shape)}; use {name}.reshape(1, -1) for a single sample"
        )
    if value.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be floating point ({', '.join(str(d) for d in SUPPORTED_DTYPES)}), got {value.dtype}"
        )
    if value.shape[0] == 0 or value.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(value.shape)}); need at least one sample with one entry")
    return value


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return v


def check_int(name: str, value: Any, *, minimum: int, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        kind = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def reject_unknown(func: str, kwargs: dict, known: Iterable[str]) -> None:
    """Raise TypeError naming each unknown keyword argument, with a suggestion."""
    if not kwargs:
        return
    known = sorted(known)
    parts = []
    for k in kwargs:
        hint = suggest_option(k, known)
        parts.append(f"{k!r}" + (f" (did you mean {hint!r}?)" if hint else ""))
    raise TypeError(
        f"{func}() got unknown keyword argument(s) {', '.join(parts)}; accepted options are: {', '.join(known)}"
    )


def suggest_option(name: str, known: Iterable[str]) -> Optional[str]:
    """The known option a misspelt ``name`` most likely meant, or None.

    Spellings from other libraries first ('maxiter' -> 'max_iter', 'tolerance' ->
    'tol'): names equal once underscores and case are ignored, then a prefix of at
    least three letters, then the closest by edit distance.
    """
    def norm(s: str) -> str:
        return s.replace("_", "").replace("-", "").lower()

    known = list(known)
    by_norm = {norm(o): o for o in known}
    n = norm(str(name))
    if n in by_norm:
        return by_norm[n]
    prefix = [o for o in known if min(len(norm(o)), len(n)) >= 3 and (n.startswith(norm(o)) or norm(o).startswith(n))]
    if prefix:
        return max(prefix, key=lambda o: len(o))
    close = difflib.get_close_matches(n, list(by_norm), n=1, cutoff=0.6)
    return by_norm[close[0]] if close else None


def check_f_output(fz: Any, z: torch.Tensor, shape: Tuple[int, ...],
                   z0_shape: Optional[Tuple[int, ...]] = None) -> None:
    """f must return a tensor with z's shape, dtype and device. ``z0_shape``: given once an
    active set shrank (shape is then the working set's), for the error message."""
    if not isinstance(fz, torch.Tensor):
        raise TypeError(f"f must return a torch.Tensor, got {type(fz).__name__}")
    if fz.shape != shape:
        if z0_shape is not None:
            raise ValueError(
                f"f returned shape {tuple(fz.shape)}, expected {tuple(shape)}: the shape of z0 {tuple(z0_shape)} "
                f"with only the {shape[0]} samples still running (compact=True)")
        raise ValueError(f"f returned shape {tuple(fz.shape)}, expected the shape of z0 {tuple(shape)}")
    if fz.dtype != z.dtype:
        raise TypeError(f"f returned dtype {fz.dtype}, expected z0's dtype {z.dtype}")
    if fz.device != z.device:
        raise ValueError(f"f returned a tensor on {fz.device}, expected z0's device {z.device}")
