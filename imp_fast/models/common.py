"""Shared helpers for the case studies.

Truncated-gradient training (T ~ U[t_lo, t_hi) iterations, no-grad Picard solve with
:func:`imp_fast.solve` then the last k steps with grad), checkpoints and data caches in
the run folder (loaded with ``torch.load(weights_only=True)``: tensors and plain values
only, never code; written atomically), and the evaluation report (scaling curve table,
results.json, PNG). Distributed runs (torchrun) go through :mod:`.distributed`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..cli import output_dir, positive_int, seed_int
from ..backends import BACKENDS, BackendUnavailable, get_backend
from ..loop import solve
from ..scaling import ScalingCurve, scaling_curve
from . import distributed

EVAL_TS = (1, 2, 5, 10, 20, 50, 100)
FREQUENCIES = (0.1, 0.3, 0.5, 0.7, 0.9)


def setup(seed: int, threads: int = 1) -> None:
    """One torch thread (small FFTs/convs are much slower with two on a loaded box) and seeds."""
    torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)


class ReproduceError(RuntimeError):
    """A reproduce run cannot go on (a bad file in the run folder, an unusable setting).

    The CLI prints the message (one line or two, no traceback) and exits with status 1.
    ``all_ranks``: every rank of a distributed run raises the same error (rank 0 reports it).
    """

    def __init__(self, message: str, *, all_ranks: bool = False):
        super().__init__(message)
        self.all_ranks = all_ranks

    def __reduce__(self):  # picklable with the keyword (rank0_call sends errors to the other ranks)
        return (_make_error, (type(self), str(self), self.all_ranks))


def _make_error(cls, message, all_ranks):
    return cls(message, all_ranks=all_ranks)


class CheckpointError(ReproduceError):
    """A checkpoint or data cache in the run folder cannot be used."""


def probe_backend(value: str) -> str:
    """argparse type of --backend: a backend name that can run the case studies' probes here
    (they run on CPU tensors), so a run does not train for minutes and then fail."""
    names = ("auto",) + BACKENDS
    if value not in names:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(names)}, got {value!r}")
    if value != "auto":
        try:
            get_backend(value, torch.device("cpu"))
        except BackendUnavailable as exc:
            raise argparse.ArgumentTypeError(f"{exc}; the case studies run on the CPU") from None
    return value


def add_common_arguments(parser: argparse.ArgumentParser, case: str, *, steps: bool = True,
                         probes: bool = True) -> None:
    """Options every case study shares; ``steps=False`` for a case that counts epochs,
    ``probes=False`` for one that runs no Lipschitz probe (no ``--backend`` then).

    Values are checked when the command line is parsed (argparse error, exit status 2).
    """
    parser.add_argument("--quick", action="store_true",
                        help="tiny data and a few training steps (seconds; used by the tests)")
    parser.add_argument("--out", type=output_dir, default=os.path.join("runs", case),
                        help="run folder, made if missing; must be writable (default: %(default)s)")
    parser.add_argument("--seed", type=seed_int, default=0, help="random seed, an integer in [0, 2**32)")
    parser.add_argument("--retrain", action="store_true",
                        help="train even if a checkpoint exists in --out (and overwrite it)")
    if steps:
        parser.add_argument("--steps", type=positive_int, default=None,
                            help="training steps, >= 1 (default: per case)")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch threads per process, >= 1 (default 1)")
    if probes:
        parser.add_argument("--backend", type=probe_backend, default="auto", metavar="{auto,reference,cpp,triton}",
                            help="backend of the Lipschitz probes' fused steps and pair ratios, as in "
                                 "imp_fast.solve (default auto: cpp on CPU, triton on CUDA); checked "
                                 "before training")


def prepare_out(out) -> Path:
    """Make the run folder and check that a file can be written there (rank 0 does it;
    every rank gets its error). Raises :class:`ReproduceError` naming --out."""
    out = Path(out)

    def make():
        try:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=out, prefix=".imp_fast_write_test_"):
                pass
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise ReproduceError(f"--out {str(out)!r}: cannot write there ({why}); choose a writable folder") \
                from None
        return out

    return distributed.rank0_call(make)


def start_run(args: argparse.Namespace, settings: Dict[str, Dict]) -> "tuple[Dict, Path]":
    """Seeds and threads, the quick/default settings (with --steps applied), the run folder."""
    setup(args.seed, getattr(args, "threads", 1))
    cfg = dict(settings["quick" if args.quick else "default"])
    if args.steps is not None:
        cfg["steps"] = args.steps
    out = prepare_out(args.out)
    return cfg, out


def check_world_size(batch: int, what: str = "training batch") -> None:
    """Each rank trains on a shard of every minibatch, so there can be at most ``batch`` ranks."""
    w = distributed.world_size()
    if w > batch:
        raise ReproduceError(f"{w} processes but the {what} holds {batch} samples: each process trains on a "
                             f"shard of every batch, so run at most {batch} processes (torchrun --nproc_per_node)",
                             all_ranks=True)


def progress(iterable, **kwargs):
    """tqdm bar on a TTY, the bare iterable otherwise (or without tqdm)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, disable=not (sys.stderr.isatty() and distributed.is_rank0()), **kwargs)


def truncated_forward(G: Callable, x: torch.Tensor, z0: torch.Tensor, T: int, k: int) -> torch.Tensor:
    """y_T of y_t = G(y_{t-1}, x) from z0, with the gradient through the last k steps only.

    The first T - k steps run in :func:`imp_fast.solve` (Picard, no graph, exactly T - k
    steps: no early exit, no host syncs); memory does not grow with T.
    """
    k = min(k, T)
    z = z0
    if T - k > 0:
        res = solve(lambda zz: G(zz, x), z0.detach(), method="picard", max_iter=T - k, tol=1e-30,
                    stop="abs", check_every=None, backend="reference", divergence=1e30)
        z = res.z.detach()
    for _ in range(k):
        z = G(z, x)
    return z


class ContractionPenalty:
    """Contraction-aware loss: ``weight * mean_b relu(sigma_b - rho)^2`` with sigma_b the
    spectral norm of dG/dz at sample b's last training iterate z_T.

    sigma_b is found by power iteration on J^T J (J = dG/dz at z_T; a forward-mode JVP and
    a VJP per step), warm-started from a vector kept per training sample, so that the few
    steps taken at each visit of a sample add up over training; the last factor
    ``||J v||`` is differentiable in G's parameters. ``sigma < 1`` along the trajectory
    makes ``||G(y_{t+1}) - y_{t+1}|| <= sigma ||G(y_t) - y_t||`` there: the residual
    cannot grow, whatever the horizon. (A penalty on the spectral radius alone, e.g. the
    growth of the Picard residual, leaves transient growth of a non-normal J.)

    Call as ``penalty(G, x, z, idx)``; ``idx`` are the samples' rows in the training set.
    ``last_sigma`` holds the batch's estimates (detached) after each call.
    """

    def __init__(self, n_samples: int, state_shape, *, rho: float, weight: float, n_power: int = 1,
                 seed: int = 0):
        if not 0 < rho:
            raise ValueError(f"rho must be > 0, got {rho!r}")
        g = torch.Generator().manual_seed(seed)
        self.v = torch.randn((n_samples,) + tuple(state_shape), generator=g)
        self.rho, self.weight, self.n_power = float(rho), float(weight), int(n_power)
        self.last_sigma: Optional[torch.Tensor] = None

    @staticmethod
    def _unit(v: torch.Tensor) -> torch.Tensor:
        n = torch.linalg.vector_norm(v.flatten(1), dim=1).clamp_min(1e-30)
        return v / n.view((-1,) + (1,) * (v.dim() - 1))

    def __call__(self, G: Callable, x: torch.Tensor, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        z = z.detach()
        f = lambda zz: G(zz, x)  # noqa: E731
        v = self._unit(self.v[idx].to(z))
        for _ in range(self.n_power):
            with torch.enable_grad():
                zr = z.clone().requires_grad_(True)
                fz = f(zr)
            with torch.no_grad():
                _, jv = torch.func.jvp(f, (z,), (v,))
            (jtjv,) = torch.autograd.grad(fz, zr, jv)
            v = self._unit(jtjv.detach())
        self.v[idx] = v.detach().to(self.v.dtype)
        _, jv = torch.func.jvp(f, (z,), (v,))  # differentiable in G's parameters
        sigma = torch.linalg.vector_norm(jv.flatten(1), dim=1)
        self.last_sigma = sigma.detach()
        return self.weight * torch.relu(sigma - self.rho).pow(2).mean()


class _TruncatedLoss(torch.nn.Module):
    """One training step's loss as a module forward (what DDP wraps: one forward per backward)."""

    def __init__(self, G: torch.nn.Module, loss_fn, z0_fn, readout, k_grad: int, regularizer=None):
        super().__init__()
        self.G = G
        if isinstance(readout, torch.nn.Module) and readout is not G:
            self.readout_module = readout  # registered, so that DDP syncs its parameters too
        self.loss_fn, self.z0_fn, self.readout, self.k_grad = loss_fn, z0_fn, readout, k_grad
        self.regularizer = regularizer

    def forward(self, x: torch.Tensor, y: torch.Tensor, T: int, idx: torch.Tensor) -> torch.Tensor:
        z = truncated_forward(self.G, x, self.z0_fn(x), T, self.k_grad)
        pred = z if self.readout is None else self.readout(z)
        loss = self.loss_fn(pred, y)
        if self.regularizer is not None:
            loss = loss + self.regularizer(self.G, x, z, idx)
        return loss


def train(
    G: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    z0_fn: Callable[[torch.Tensor], torch.Tensor],
    readout: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    params=None,
    steps: int,
    batch: int,
    lr: float,
    t_range=(5, 60),
    k_grad: int = 3,
    seed: int = 0,
    clip: float = 1.0,
    desc: str = "train",
    regularizer: Optional[Callable[..., torch.Tensor]] = None,
) -> List[float]:
    """Adam + cosine decay, T ~ U[t_range) per step, gradient through the last k_grad steps.

    ``regularizer(G, x, z_T, idx)`` (optional, e.g. a :class:`ContractionPenalty`) is added
    to the loss; ``idx`` are the minibatch's rows of ``x_train``.

    ``loss_fn`` must be a mean over samples. Under torch.distributed every rank draws the
    same minibatch and T, trains on its shard of the minibatch (DDP averages the
    gradients), so the run follows the single-process recipe. Returns the per-step
    training losses (of the whole minibatch).
    """
    gen = torch.Generator().manual_seed(seed)
    params = list(G.parameters()) if params is None else list(params)
    n = x_train.shape[0]
    nb = min(batch, n)
    check_world_size(nb)
    step = distributed.wrap(_TruncatedLoss(G, loss_fn, z0_fn, readout, k_grad, regularizer))
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=lr * 0.05)
    part = distributed.shard(nb)
    weight = distributed.shard_weight(part.stop - part.start, nb)
    losses: List[float] = []
    bar = progress(range(steps), desc=desc)
    for _ in bar:
        idx = torch.randint(0, n, (nb,), generator=gen)
        T = int(torch.randint(t_range[0], t_range[1], (1,), generator=gen))
        if distributed.is_distributed():
            idx = idx[part]
        loss = step(x_train[idx], y_train[idx], T, idx)
        if distributed.is_distributed():
            loss = loss * weight
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        losses.append(distributed.average(loss.detach()))
        if hasattr(bar, "set_postfix"):
            post = {"loss": f"{losses[-1]:.4f}", "T": T}
            sigma = getattr(regularizer, "last_sigma", None)
            if sigma is not None:
                post["sigma"] = f"{float(sigma.max()):.3f}"
            bar.set_postfix(**post)
    return losses


CHECKPOINT_FORMAT = "imp_fast.models checkpoint v1"


def _plain(meta: Dict) -> Dict:
    """``meta`` as plain JSON values (tuples become lists), as stored in checkpoints."""
    try:
        return json.loads(json.dumps(meta))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint meta must hold plain JSON values (str, int, float, bool, None, lists, "
                        f"dicts): {exc}") from None


def load_torch_file(path, what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; any failure (unreadable, empty,
    truncated, not a torch file, or objects other than tensors and plain values) is a
    :class:`CheckpointError` that names the file."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # e.g. torch's note on the pickle protocol of a foreign file
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if isinstance(exc, OSError) and exc.errno not in (None, errno.EINVAL):  # EINVAL: torch's truncated zip
            why = f"cannot be read ({exc.strerror})"
        else:
            detail = next((ln.split("WeightsUnpickler error:", 1)[1].strip() for ln in text.splitlines()
                           if "WeightsUnpickler error:" in ln), "").split(". Please use")[0]
            if "global" in detail.lower():  # a class or function reference: what a crafted pickle needs
                why = (f"holds Python objects other than tensors and plain values, refused because loading them "
                       f"could run code ({detail[:160]})")
            elif isinstance(exc, EOFError):
                why = "is empty or truncated"
            else:
                first = "" if "Weights only load failed" in text else (text.splitlines() or [""])[0][:120]
                why = f"is corrupt, truncated or not a torch file ({type(exc).__name__}{': ' + first if first else ''})"
        raise CheckpointError(f"{what} {str(path)!r} {why}") from None


def save_torch_file(obj: Any, path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: an interrupted or
    failed save never leaves a truncated file at ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


RETRAIN_HINT = "rerun with --retrain to train afresh and overwrite it, or delete the file"


def read_checkpoint(ckpt, module: torch.nn.Module) -> Dict:
    """The checkpoint dict at ``ckpt`` after checking that it fits ``module`` (same keys and
    shapes). Raises :class:`CheckpointError` (with how to retrain) when it cannot be used."""
    ckpt = Path(ckpt)
    try:
        state = load_torch_file(ckpt, "checkpoint")
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {RETRAIN_HINT}") from None

    def bad(why):
        return CheckpointError(f"checkpoint {str(ckpt)!r} {why}; {RETRAIN_HINT}")

    if not isinstance(state, dict):
        raise bad(f"is not an imp-fast checkpoint (it holds a {type(state).__name__}, not a dict)")
    missing = [k for k in ("model", "meta") if k not in state]
    if missing:
        raise bad(f"is not an imp-fast checkpoint (no {' or '.join(repr(k) for k in missing)} entry)")
    weights, meta = state["model"], state["meta"]
    if not isinstance(meta, dict):
        raise bad(f"is not an imp-fast checkpoint ('meta' is a {type(meta).__name__}, not a dict)")
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise bad("is not an imp-fast checkpoint ('model' is not a state dict of tensors)")
    return state


def _fits(state: Dict, module: torch.nn.Module) -> Optional[str]:
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state["model"].items()}
    if want.keys() != have.keys():
        miss, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
        return (f"does not fit the model (missing {miss[:3]}{'...' if len(miss) > 3 else ''}, "
                f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})")
    for k, s in want.items():
        if have[k] != s:
            return f"does not fit the model ({k} has shape {list(have[k])}, the model's is {list(s)})"
    return None


def _float_or_none(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def load_or_train(ckpt: Path, module: torch.nn.Module, train_fn: Callable[[], List[float]], retrain: bool,
                  meta: Dict) -> Dict:
    """Load ``module``'s weights from ``ckpt`` when it exists with the same meta (unless
    retrain); otherwise run ``train_fn`` and save. Returns info for results.json.

    The file is loaded with ``weights_only=True``; ``meta`` must hold plain JSON values.
    A file that cannot be used (corrupt, truncated, empty, not a checkpoint, not of this
    model) raises :class:`CheckpointError`, which says to use --retrain or delete it.
    Distributed: rank 0 reads and writes the file; the loaded weights are broadcast.
    """
    ckpt = Path(ckpt)
    meta = _plain(meta)

    def try_load():
        if retrain or not (ckpt.exists() or ckpt.is_symlink()):
            return None
        state = read_checkpoint(ckpt, module)
        if state["meta"] != meta:
            print(f"checkpoint {ckpt} was made with other settings: retraining")
            return None
        why = _fits(state, module)
        if why is not None:
            raise CheckpointError(f"checkpoint {str(ckpt)!r} {why}; {RETRAIN_HINT}")
        module.load_state_dict(state["model"])
        print(f"loaded checkpoint {ckpt}")
        return {"checkpoint": str(ckpt), "trained": False,
                **{k: _float_or_none(state.get(k)) for k in ("train_seconds", "loss_first", "loss_last")}}

    info = distributed.rank0_call(try_load)
    if info is not None:
        distributed.broadcast_module(module)
        return info
    t0 = time.perf_counter()
    losses = train_fn()
    secs = time.perf_counter() - t0
    k = max(1, len(losses) // 10)
    first = sum(losses[:k]) / k
    last = sum(losses[-k:]) / k

    def save():
        try:
            save_torch_file({"format": CHECKPOINT_FORMAT, "model": module.state_dict(), "meta": meta,
                             "train_seconds": secs, "loss_first": first, "loss_last": last}, ckpt)
        except OSError as exc:
            raise ReproduceError(f"cannot write checkpoint {str(ckpt)!r} ({exc.strerror or exc})") from None
        print(f"trained {len(losses)} steps in {secs:.1f} s: loss {first:.4g} -> {last:.4g} (mean of first/last "
              f"{k}); saved {ckpt}")

    distributed.rank0_call(save)
    return {"checkpoint": str(ckpt), "trained": True, "train_seconds": secs, "loss_first": first,
            "loss_last": last}


def load_or_make_cache(path, key: Dict, make: Callable[[], Dict], check: Callable[[Dict], bool],
                       what: str = "data cache", key_name: str = "key") -> Dict:
    """A data cache in the run folder: ``{key_name: key, **make()}`` saved at ``path``,
    reused when its key matches (and ``check(blob)`` accepts it), regenerated when the key
    differs. A cache that is unreadable or not of the expected form is regenerated with a
    note naming it; it is loaded weights-only, never unpickled as code. Rank 0 loads or
    makes it; every rank gets the data."""
    path = Path(path)
    key = _plain(key)

    def get():
        if path.exists() or path.is_symlink():
            try:
                blob = load_torch_file(path, what)
                if isinstance(blob, dict) and blob.get(key_name) == key:
                    if not check(blob):
                        raise CheckpointError(f"{what} {str(path)!r} does not hold the expected data")
                    print(f"loaded {what} {path}")
                    return blob
            except CheckpointError as exc:
                print(f"{exc}: regenerating it", file=sys.stderr)
        blob = {key_name: key, **make()}
        try:
            save_torch_file(blob, path)
        except OSError as exc:
            raise ReproduceError(f"cannot write {what} {str(path)!r} ({exc.strerror or exc})") from None
        return blob

    return distributed.rank0_call(get)


def evaluate(G, x, target, metric, *, z0, readout=None, directions, eps=0.05, ts: Sequence[int] = EVAL_TS,
             metric_name: str, dtype=None, backend: str = "auto") -> ScalingCurve:
    """L_t (max over samples and directions) and the metric at each t, one probe run.

    ``metric`` must be a mean over samples. Under torch.distributed each rank probes its
    shard of the samples (``x``, ``target``, ``z0`` on dim 0) and the shards are combined
    (L_t and residual: max; metric: sample-weighted mean), the same curve on every rank.
    """
    if not distributed.is_distributed():
        return scaling_curve(G, x, target, metric, list(ts), z0=z0, readout=readout, directions=directions,
                             eps=eps, reduce="max", dtype=dtype, metric_name=metric_name, backend=backend)
    part = distributed.shard(x.shape[0])
    n = part.stop - part.start
    curve = None
    if n > 0:
        curve = scaling_curve(G, x[part], target[part], metric, list(ts), z0=None if z0 is None else z0[part],
                              readout=readout, directions=directions, eps=eps, reduce="max", dtype=dtype,
                              metric_name=metric_name, backend=backend)
    stats = None if curve is None else dataclasses.asdict(curve)
    how = {"L": "max", "residual": "max", "metric": "mean"}
    return ScalingCurve(**distributed.reduce_shards(n, stats, how))


def metric_and_residual(G, x, target, metric, *, z0, readout=None, ts: Sequence[int] = EVAL_TS,
                        dtype=None) -> Dict[str, List[float]]:
    """``metric(readout(y_t), target)`` and the largest fixed-point residual
    ``||G(y_t, x) - y_t||`` over samples at each t in ``ts``: the plain iteration, no
    probes (cheaper than :func:`evaluate` when L_t is probed on a subset of the samples).
    Also ``residual_every_t``: the largest residual at every t = 1..max(ts).

    Under torch.distributed each rank takes its shard of the samples; shards combine as in
    :func:`evaluate` (metric: sample-weighted mean, residual: max).
    """
    ts = sorted(int(t) for t in ts)
    n = x.shape[0]
    part = distributed.shard(n) if distributed.is_distributed() else slice(0, n)
    k = part.stop - part.start
    stats = None
    if k > 0:
        xs, ys, z = x[part], target[part], z0[part]
        if dtype is not None:
            xs, ys, z = xs.to(dtype), ys.to(dtype), z.to(dtype)
        metric_t, every = [], []
        with torch.no_grad():
            fz = G(z, xs)
            for t in range(1, ts[-1] + 1):
                z = fz
                fz = G(z, xs)
                every.append(torch.linalg.vector_norm((fz - z).flatten(1), dim=1).max())
                if t in ts:
                    metric_t.append(float(metric(z if readout is None else readout(z), ys)))
        every = torch.stack(every).tolist()
        stats = {"metric": metric_t, "residual": [every[t - 1] for t in ts], "residual_every_t": every}
    return distributed.reduce_shards(k, stats, {"metric": "mean", "residual": "max", "residual_every_t": "max"})


def report(out: Path, case: str, curve: ScalingCurve, *, title: str, extra: Dict, log_metric: bool = False,
           extra_columns: Optional[Dict[str, List[float]]] = None) -> Dict:
    """Print the markdown table, write results.json (with ``world_size``) and scaling.png in
    ``out`` (rank 0 only under torch.distributed)."""
    cols = extra_columns or {}
    head = f"| t | L_t (max) | {curve.metric_name} |" + "".join(f" {c} |" for c in cols) + " residual |"
    lines = [head, "|---:" * (4 + len(cols)) + "|"]
    for i, (t, L, m, r) in enumerate(zip(curve.t, curve.L, curve.metric, curve.residual)):
        lines.append(f"| {t} | {L:.4g} | {m:.4g} |" + "".join(f" {v[i]:.4g} |" for v in cols.values())
                     + f" {r:.3g} |")
    table = "\n".join(lines)
    print(table)
    results = {"case": case, **curve.to_dict(), **extra, "world_size": distributed.world_size()}
    for c, v in cols.items():
        results[c] = list(v)
    if not distributed.is_rank0():
        return results
    (out / "results.json").write_text(json.dumps(results, indent=2))
    extra_L = {c: v for c, v in cols.items() if c.startswith("L_t")}
    plot_with_extra_L(curve, out / "scaling.png", extra_L, title=title, log_metric=log_metric)
    print(f"wrote {out / 'results.json'} and {out / 'scaling.png'}")
    return results


def eval_loss(G, loss_fn, x, y, *, z0_fn, readout=None, T: int = 10) -> float:
    """loss_fn(readout(y_T), y) with y_T after exactly T steps from z0_fn(x), no grad."""
    with torch.no_grad():
        z = truncated_forward(G, x, z0_fn(x), T, 0)
        return float(loss_fn(z if readout is None else readout(z), y))


def plot_with_extra_L(curve: ScalingCurve, path, extra_L: Dict[str, List[float]], *, title: str,
                      log_metric: bool = False) -> None:
    """Two panels: like :func:`imp_fast.plot_scaling_curve` (with more L_t series on the
    left axis) on the left; the fixed-point residual ||G(y_t, x) - y_t|| against t on the right."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(curve.t, curve.L, "o-", color="tab:blue", ms=3, label=f"L_t ({curve.reduce})")
    for (name, L), c in zip(extra_L.items(), ("tab:green", "tab:purple", "tab:orange")):
        ax.plot(curve.t, L, "^-", color=c, ms=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("iterations t")
    ax.set_ylabel(f"empirical Lipschitz L_t ({curve.reduce})")
    ax.grid(True, which="both", alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(curve.t, curve.metric, "s--", color="tab:red", ms=3, label=curve.metric_name)
    ax2.set_ylabel(curve.metric_name, color="tab:red")
    ax2.tick_params(axis="y", labelcolor="tab:red")
    if log_metric:
        ax2.set_yscale("log")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center right", fontsize="small")
    ax3 = fig.add_subplot(1, 2, 2)
    res = [r if r is not None and r > 0 else float("nan") for r in curve.residual]
    ax3.plot(curve.t, res, "s-", color="tab:gray", ms=3)
    ax3.set_xscale("log")
    ax3.set_yscale("log")
    ax3.set_xlabel("iterations t")
    ax3.set_ylabel("residual ||G(y_t, x) - y_t|| (max)")
    ax3.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, format="png")
