"""CUDA-graph mode: capture a whole fixed-length solve once, then replay it.

``solve_graphed(f, z0, **options)`` runs ``imp_fast.loop.solve(f, z, check_every=None,
**options)`` inside a CUDA graph: the loop makes no host syncs (it runs exactly
``max_iter`` iterations), so the f evaluations and fused steps of every iteration can
be recorded once and replayed with a single launch. The captured graph is cached per
(f, shape, dtype, device, options); a repeated call copies the new ``z0`` into the
graph's static input and replays.

Requirements on ``f`` (checked by trying to capture): it must not synchronise with the
host (no ``.item()``, ``.tolist()``, ``print`` of tensor values, data-dependent Python
control flow, ``nonzero``/boolean-mask indexing), must not create CPU tensors that are
copied to the GPU each call, and must keep its parameters at fixed addresses between
calls (ordinary ``nn.Module`` parameters do).
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Callable, Optional

import torch

from . import loop
from .result import SolveResult

__all__ = ["solve_graphed", "clear_graph_cache", "GRAPH_CACHE_SIZE"]

# Most captured solves kept alive (each holds its own memory pool).
GRAPH_CACHE_SIZE = 8


@dataclasses.dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    f: Callable  # strong reference: keeps id(f) from being reused while cached
    static_z0: torch.Tensor
    out: SolveResult


_cache: "OrderedDict[tuple, _Captured]" = OrderedDict()


def clear_graph_cache() -> None:
    """Drop every captured graph (and the GPU memory its pool holds)."""
    _cache.clear()


def _f_key(f: Callable):
    # A bound method is a new object at each attribute access: key on its parts.
    self_ = getattr(f, "__self__", None)
    func = getattr(f, "__func__", None)
    if self_ is not None and func is not None:
        return ("method", id(self_), id(func))
    return ("callable", id(f))


def _f_name(f: Callable) -> str:
    name = getattr(f, "__qualname__", None) or getattr(f, "__name__", None) or type(f).__name__
    return f"{name!s} ({type(f).__name__})"


def _options_key(options: dict) -> tuple:
    try:
        key = tuple(sorted(options.items()))
        hash(key)
    except TypeError as exc:
        raise TypeError(f"solve_graphed: options must be hashable scalars, got {options!r}") from exc
    return key


def _clone_result(out: SolveResult, *, hit: bool) -> SolveResult:
    def c(t: Optional[torch.Tensor]):
        return None if t is None else t.clone()

    return dataclasses.replace(
        out,
        z=c(out.z),
        status=c(out.status),
        n_iter=c(out.n_iter),
        abs_residual=c(out.abs_residual),
        rel_residual=c(out.rel_residual),
        trace_abs=c(out.trace_abs),
        trace_rel=c(out.trace_rel),
        host_syncs=0,
        extras={**out.extras, "cuda_graph": True, "graph_cache_hit": hit},
    )


def _capture(f: Callable, z0: torch.Tensor, options: dict) -> _Captured:
    static_z0 = torch.empty_like(z0, memory_format=torch.contiguous_format)
    static_z0.copy_(z0.detach())
    # Warm up on a side stream: Triton/cuBLAS compile and allocate their workspaces
    # outside the capture. Argument errors surface here, unchanged.
    side = torch.cuda.Stream(device=z0.device)
    side.wait_stream(torch.cuda.current_stream(z0.device))
    with torch.cuda.stream(side):
        loop.solve(f, static_z0, check_every=None, **options)
    torch.cuda.current_stream(z0.device).wait_stream(side)
    torch.cuda.synchronize(z0.device)

    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = loop.solve(f, static_z0, check_every=None, **options)
    except Exception as exc:
        raise RuntimeError(
            f"solve_graphed: could not capture the solve of f={_f_name(f)} in a CUDA graph "
            f"({type(exc).__name__}: {exc}). Inside a CUDA graph f must not synchronise with the "
            "host (no .item(), .tolist(), .cpu(), printing tensor values, data-dependent Python "
            "branches, nonzero() or boolean-mask indexing), must not create CPU tensors or "
            "copy host data to the GPU on each call, and must keep its parameters at fixed "
            "addresses. Use imp_fast.solve(..., check_every=None) without the graph instead."
        ) from exc
    return _Captured(graph=graph, f=f, static_z0=static_z0, out=out)


def solve_graphed(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, **options) -> SolveResult:
    """Solve with the whole ``max_iter``-iteration loop captured in a CUDA graph.

    Same options as :func:`imp_fast.solve`, except that ``check_every`` is forced to
    None (the graph always runs ``max_iter`` iterations; samples that converge early are
    frozen, so results match an ordinary ``check_every=None`` solve). ``throw=True`` is
    applied after the replay. The returned tensors are fresh clones (a later call does
    not overwrite them); ``host_syncs`` is 0.

    Raises:
        ValueError: z0 is not a CUDA tensor.
        RuntimeError: f cannot be captured (the message says why and what f must avoid).
    """
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"z0 must be a torch.Tensor, got {type(z0).__name__}")
    if z0.device.type != "cuda":
        raise ValueError(
            f"solve_graphed (cuda_graph=True) needs z0 on a CUDA device, got a tensor on {z0.device}"
        )
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    options = dict(options)
    options.pop("check_every", None)
    options.pop("cuda_graph", None)
    throw = bool(options.pop("throw", False))
    key = (_f_key(f), tuple(z0.shape), z0.dtype, z0.device, _options_key(options))
    entry = _cache.get(key)
    hit = entry is not None
    if entry is None:
        entry = _capture(f, z0, options)
        _cache[key] = entry
        while len(_cache) > GRAPH_CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
        entry.static_z0.copy_(z0.detach())
    entry.graph.replay()
    result = _clone_result(entry.out, hit=hit)
    if throw:
        result.raise_on_failure()
    return result
