"""Shared helpers for the deblurring and Navier-Stokes case studies.

Truncated-gradient training (T ~ U[t_lo, t_hi) iterations, no-grad Picard solve with
:func:`imp_fast.solve` then the last k steps with grad), checkpoints in the run folder,
and the evaluation report (scaling curve table, results.json, PNG).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..loop import solve
from ..scaling import ScalingCurve, plot_scaling_curve, scaling_curve

EVAL_TS = (1, 2, 5, 10, 20, 50, 100)
FREQUENCIES = (0.1, 0.3, 0.5, 0.7, 0.9)


def setup(seed: int, threads: int = 1) -> None:
    """One torch thread (small FFTs/convs are much slower with two on a loaded box) and seeds."""
    torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)


def add_common_arguments(parser: argparse.ArgumentParser, case: str, *, steps: bool = True) -> None:
    """Options every case study shares; ``steps=False`` for a case that counts epochs."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny data and a few training steps (seconds; used by the tests)")
    parser.add_argument("--out", default=os.path.join("runs", case), help="run folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="train even if a checkpoint exists in --out")
    if steps:
        parser.add_argument("--steps", type=int, default=None, help="training steps (default: per case)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def start_run(args: argparse.Namespace, settings: Dict[str, Dict]) -> "tuple[Dict, Path]":
    """Seeds and threads, the quick/default settings (with --steps applied), the run folder."""
    setup(args.seed, getattr(args, "threads", 1))
    cfg = dict(settings["quick" if args.quick else "default"])
    if args.steps is not None:
        cfg["steps"] = args.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return cfg, out


def progress(iterable, **kwargs):
    """tqdm bar on a TTY, the bare iterable otherwise (or without tqdm)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, disable=not sys.stderr.isatty(), **kwargs)


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
) -> List[float]:
    """Adam + cosine decay, T ~ U[t_range) per step, gradient through the last k_grad steps.

    Returns the per-step training losses.
    """
    gen = torch.Generator().manual_seed(seed)
    params = list(G.parameters()) if params is None else list(params)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=lr * 0.05)
    n = x_train.shape[0]
    losses: List[float] = []
    bar = progress(range(steps), desc=desc)
    for _ in bar:
        idx = torch.randint(0, n, (min(batch, n),), generator=gen)
        T = int(torch.randint(t_range[0], t_range[1], (1,), generator=gen))
        x, y = x_train[idx], y_train[idx]
        z = truncated_forward(G, x, z0_fn(x), T, k_grad)
        pred = z if readout is None else readout(z)
        loss = loss_fn(pred, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.4f}", T=T)
    return losses


def load_or_train(ckpt: Path, module: torch.nn.Module, train_fn: Callable[[], List[float]], retrain: bool,
                  meta: Dict) -> Dict:
    """Load ``module``'s weights from ``ckpt`` when it exists with the same meta (unless
    retrain); otherwise run ``train_fn`` and save. Returns info for results.json."""
    if ckpt.exists() and not retrain:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state.get("meta") == meta:
            module.load_state_dict(state["model"])
            print(f"loaded checkpoint {ckpt}")
            return {"checkpoint": str(ckpt), "trained": False, "train_seconds": state.get("train_seconds"),
                    "loss_first": state.get("loss_first"), "loss_last": state.get("loss_last")}
        print(f"checkpoint {ckpt} was made with other settings: retraining")
    t0 = time.perf_counter()
    losses = train_fn()
    secs = time.perf_counter() - t0
    k = max(1, len(losses) // 10)
    first = sum(losses[:k]) / k
    last = sum(losses[-k:]) / k
    torch.save({"model": module.state_dict(), "meta": meta, "train_seconds": secs, "loss_first": first,
                "loss_last": last}, ckpt)
    print(f"trained {len(losses)} steps in {secs:.1f} s: loss {first:.4g} -> {last:.4g} (mean of first/last "
          f"{k}); saved {ckpt}")
    return {"checkpoint": str(ckpt), "trained": True, "train_seconds": secs, "loss_first": first,
            "loss_last": last}


def evaluate(G, x, target, metric, *, z0, readout=None, directions, eps=0.05, ts: Sequence[int] = EVAL_TS,
             metric_name: str, dtype=None) -> ScalingCurve:
    """L_t (max over samples and directions) and the metric at each t, one probe run."""
    return scaling_curve(G, x, target, metric, list(ts), z0=z0, readout=readout, directions=directions,
                         eps=eps, reduce="max", dtype=dtype, metric_name=metric_name)


def report(out: Path, case: str, curve: ScalingCurve, *, title: str, extra: Dict, log_metric: bool = False,
           extra_columns: Optional[Dict[str, List[float]]] = None) -> Dict:
    """Print the markdown table, write results.json and scaling.png in ``out``."""
    cols = extra_columns or {}
    head = f"| t | L_t (max) | {curve.metric_name} |" + "".join(f" {c} |" for c in cols) + " residual |"
    lines = [head, "|---:" * (4 + len(cols)) + "|"]
    for i, (t, L, m, r) in enumerate(zip(curve.t, curve.L, curve.metric, curve.residual)):
        lines.append(f"| {t} | {L:.4g} | {m:.4g} |" + "".join(f" {v[i]:.4g} |" for v in cols.values())
                     + f" {r:.3g} |")
    table = "\n".join(lines)
    print(table)
    results = {"case": case, **curve.to_dict(), **extra}
    for c, v in cols.items():
        results[c] = list(v)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    extra_L = {c: v for c, v in cols.items() if c.startswith("L_t")}
    if extra_L:
        plot_with_extra_L(curve, out / "scaling.png", extra_L, title=title, log_metric=log_metric)
    else:
        plot_scaling_curve(curve, out / "scaling.png", title=title, log_metric=log_metric)
    print(f"wrote {out / 'results.json'} and {out / 'scaling.png'}")
    return results


def eval_loss(G, loss_fn, x, y, *, z0_fn, readout=None, T: int = 10) -> float:
    """loss_fn(readout(y_T), y) with y_T after exactly T steps from z0_fn(x), no grad."""
    with torch.no_grad():
        z = truncated_forward(G, x, z0_fn(x), T, 0)
        return float(loss_fn(z if readout is None else readout(z), y))


def plot_with_extra_L(curve: ScalingCurve, path, extra_L: Dict[str, List[float]], *, title: str,
                      log_metric: bool = False) -> None:
    """Like :func:`imp_fast.plot_scaling_curve`, with more L_t series on the left axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(curve.t, curve.L, "o-", color="tab:blue", ms=3, label=f"L_t ({curve.reduce})")
    for (name, L), c in zip(extra_L.items(), ("tab:green", "tab:purple", "tab:orange")):
        ax.plot(curve.t, L, "^-", color=c, ms=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("iterations t")
    ax.set_ylabel("empirical Lipschitz L_t (max)")
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
    ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, format="png")
