"""torch.distributed plumbing for ``imp-fast reproduce`` (DDP under torchrun; no launcher of our own).

Run a case study on N processes with ``torchrun --nproc_per_node N $(which imp-fast) reproduce ...``.
torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`session`
joins that process group (gloo for CPU tensors, plus nccl for CUDA tensors when torch sees
a GPU) and leaves it at the end. Without those variables (a plain ``imp-fast`` call) no
group is made and every helper here is the identity: the single-process run is unchanged.

How the case studies use it (one recipe whatever the world size):

* training: every rank draws the same global minibatch (same generator, same seed) and
  trains on its own contiguous :func:`shard` of it; the local mean loss is scaled by
  :func:`shard_weight` so that DDP's gradient average equals the gradient of the global
  minibatch's mean loss. N processes share each step's work; the recipe (global batch,
  learning rate, steps) stays the one of the single-process run.
* evaluation: the test set is split into contiguous shards, each rank evaluates its own,
  and :func:`reduce_shards` combines the per-shard statistics (sample-weighted means,
  maxima) on every rank.
* files: rank 0 alone reads and writes the run folder (checkpoints, data caches,
  results.json, PNG); :func:`rank0_call` hands its result (or its error) to every rank.

Helpers work the same when the caller made the process group itself (any
``torch.distributed.init_process_group`` before them).
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import pickle
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "is_distributed", "rank", "world_size", "is_rank0", "init_from_env", "cleanup", "session", "barrier",
    "shard", "shard_weight", "wrap", "broadcast_object", "all_gather_object", "average", "broadcast_module",
    "rank0_call", "reduce_shards", "Rank0Error",
]

_OWNED = False  # True while a process group made by init_from_env is alive


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_rank0() -> bool:
    return rank() == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment, if any.

    Returns True when this call made the group (then :func:`cleanup` leaves it), False
    when there is nothing to join (no WORLD_SIZE, or WORLD_SIZE 1) or a group already exists.
    Backend: ``gloo`` for CPU tensors (the case studies train on the CPU); with a visible
    GPU ``cpu:gloo,cuda:nccl`` so that CUDA tensors go through nccl, on device LOCAL_RANK.
    """
    global _OWNED
    if dist.is_available() and dist.is_initialized():
        return False
    if _env_int("WORLD_SIZE", 1) <= 1:
        return False
    if not dist.is_available():  # pragma: no cover - torch built without distributed
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise RuntimeError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {name} is not set: start the "
                               f"processes with torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0) % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend)  # env:// rendezvous from torchrun's variables
    _OWNED = True
    return True


def cleanup() -> None:
    """Leave the process group made by :func:`init_from_env` (a caller's own group is left alone)."""
    global _OWNED
    if _OWNED and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


@contextlib.contextmanager
def session():
    """``with session():`` joins torchrun's process group for the block (no-op on one process)."""
    made = init_from_env()
    try:
        yield
    finally:
        if made:
            cleanup()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ----------------------------------------------------------------------------------------
# data shards


def shard(n: int, r: Optional[int] = None, w: Optional[int] = None) -> slice:
    """This rank's contiguous part of ``range(n)``: sizes differ by at most one, the first
    ``n % w`` ranks take the extra item (the split of ``torch.tensor_split``). May be empty."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    r = rank() if r is None else r
    w = world_size() if w is None else w
    q, extra = divmod(n, w)
    start = r * q + min(r, extra)
    return slice(start, start + q + (1 if r < extra else 0))


def shard_weight(n_local: int, n_global: int) -> float:
    """Factor for a rank's mean loss over ``n_local`` of ``n_global`` samples such that
    DDP's average of the ranks' gradients is the gradient of the global mean loss."""
    return n_local * world_size() / n_global


# ----------------------------------------------------------------------------------------
# models


def wrap(module: nn.Module, **ddp_kwargs) -> nn.Module:
    """``module`` in :class:`torch.nn.parallel.DistributedDataParallel` under a process group,
    ``module`` itself otherwise. Call the wrapper's forward once per backward.

    Buffers are not re-broadcast each forward: the case studies' buffers are constants
    (blur transfer function, attention mask), identical on every rank; DDP still
    broadcasts parameters and buffers from rank 0 when it wraps.
    """
    if not is_distributed():
        return module
    ddp = nn.parallel.DistributedDataParallel
    params = inspect.signature(ddp.__init__).parameters
    kw = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    p = next(module.parameters(), None)
    if p is not None and p.device.type == "cuda":
        kw["device_ids"] = [p.device.index]
    kw.update(ddp_kwargs)
    return ddp(module, **kw)


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy ``src``'s parameters and persistent buffers into every rank's ``module`` (in place)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in module.state_dict().values():
            dist.broadcast(t, src=src)


# ----------------------------------------------------------------------------------------
# objects and reductions


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``src``'s ``obj`` on every rank (pickled; fine for small objects and tensors of a few MB)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def average(value: Union[float, torch.Tensor]) -> float:
    """Mean of a scalar over the ranks (the value itself on one process)."""
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0]) / world_size()


class Rank0Error(RuntimeError):
    """Stands for an exception rank 0 raised that could not be sent as it was."""


def rank0_call(fn: Callable[[], Any]) -> Any:
    """Run ``fn()`` on rank 0 only and return its result on every rank.

    When ``fn`` raises on rank 0, every rank raises: rank 0 its own exception, the others
    a copy of it (or a :class:`Rank0Error` with its text) whose ``from_rank0`` attribute
    is True, so that only rank 0 needs to report it.
    """
    if not is_distributed():
        return fn()
    payload = None
    err: Optional[BaseException] = None
    if is_rank0():
        try:
            payload = ("ok", fn())
        except Exception as exc:  # sent to the other ranks, re-raised below
            err = exc
            try:
                pickle.dumps(exc)
                payload = ("error", exc)
            except Exception:
                payload = ("error", Rank0Error(f"{type(exc).__name__}: {exc}"))
    payload = broadcast_object(payload)
    if err is not None:
        raise err
    if payload[0] == "error":
        exc = payload[1]
        exc.from_rank0 = True
        raise exc
    return payload[1]


Stat = Union[float, Sequence[float], Dict[str, Any]]


def _combine(parts: List[tuple], how: str, key: str):
    vals = [v for _, v in parts]
    if how == "first":
        return vals[0]
    first = vals[0]
    if isinstance(first, dict):
        return {k: _combine([(n, v[k]) for n, v in parts], how, key) for k in first}
    if isinstance(first, (list, tuple)):
        return [_combine([(n, v[i]) for n, v in parts], how, key) for i in range(len(first))]
    xs = [float(v) for v in vals]
    if how == "max":
        return math.nan if any(math.isnan(x) for x in xs) else max(xs)
    if how == "mean":
        total = sum(n for n, _ in parts)
        return sum(n * x for (n, _), x in zip(parts, xs)) / total
    raise ValueError(f"how[{key!r}] must be 'mean', 'max' or 'first', got {how!r}")


def reduce_shards(n_local: int, stats: Optional[Dict[str, Stat]], how: Dict[str, str]) -> Dict[str, Stat]:
    """Combine per-shard statistics of an evaluation split by :func:`shard`.

    ``stats`` maps names to floats, lists of floats or dicts of those, computed by this
    rank on its ``n_local`` samples (``None`` when its shard is empty); ``how`` says per
    name how shards combine: ``"mean"`` (a mean over samples: weighted by shard size),
    ``"max"`` (a maximum over samples) or ``"first"`` (the same on every shard). Returns the
    combined dict on every rank; on one process, ``stats`` itself.
    """
    if not is_distributed():
        if stats is None:
            raise ValueError("stats is None but there is no other shard")
        return stats
    parts = [(n, s) for n, s in all_gather_object((n_local if stats is not None else 0, stats)) if n > 0]
    if not parts:
        raise ValueError("every shard is empty")
    return {k: _combine([(n, s[k]) for n, s in parts], how.get(k, "first"), k) for k in parts[0][1]}
