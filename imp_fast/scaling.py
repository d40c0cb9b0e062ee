"""Test-time scaling curves: L_t and an accuracy metric against the iteration count t.

:func:`scaling_curve` makes ONE probe run (see :func:`imp_fast.probes.lipschitz_trace`)
up to max(ts), keeps the unperturbed readouts r(y_t) at the requested ts, and scores
them with ``metric(r(y_t), target)`` after the loop. :func:`plot_scaling_curve` draws
both against t (log-x, two y axes).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch

from .probes import _run_trace
from .validation import reject_unknown

__all__ = ["ScalingCurve", "scaling_curve", "plot_scaling_curve", "relative_l2", "psnr"]

_OPTIONS = (
    "z0", "readout", "directions", "n_probes", "eps", "method", "beta", "m", "lam", "reduce", "dtype",
    "generator", "metric_name", "backend",
)


def relative_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ||pred - target|| / ||target|| (norms over non-batch dims)."""
    _check_pair(pred, target)
    B = pred.shape[0]
    cdt = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    p = pred.reshape(B, -1).to(cdt)
    t = target.reshape(B, -1).to(cdt)
    return (torch.linalg.vector_norm(p - t, dim=1) / torch.linalg.vector_norm(t, dim=1)).mean()


def psnr(pred: torch.Tensor, target: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """Mean over samples of 10 log10(data_range^2 / MSE) in dB (higher is better)."""
    _check_pair(pred, target)
    if not (isinstance(data_range, (int, float)) and data_range > 0):
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    B = pred.shape[0]
    cdt = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    mse = ((pred.reshape(B, -1).to(cdt) - target.reshape(B, -1).to(cdt)) ** 2).mean(dim=1)
    return (10.0 * torch.log10(data_range ** 2 / mse)).mean()


def _check_pair(pred, target) -> None:
    for name, v in (("pred", pred), ("target", target)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")


@dataclass
class ScalingCurve:
    """L_t and metric(r(y_t), target) at the iteration counts ``t`` (plain Python lists).

    residual: the largest fixed-point residual ||G(y_t, x) - y_t|| over samples at each t.
    """

    t: List[int]
    L: List[float]
    metric: List[float]
    residual: List[float]
    metric_name: str = "metric"
    eps: float = 0.05
    reduce: str = "max"
    method: str = "picard"

    def to_dict(self) -> dict:
        """JSON-ready dict (non-finite floats become None)."""
        d = asdict(self)
        for k in ("L", "metric", "residual"):
            d[k] = [v if math.isfinite(v) else None for v in d[k]]
        return d

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self) -> str:
        """Markdown table: t, L_t, metric, residual."""
        lines = [
            f"| t | L_t ({self.reduce}) | {self.metric_name} | residual |",
            "|---:|---:|---:|---:|",
        ]
        for t, L, m, r in zip(self.t, self.L, self.metric, self.residual):
            lines.append(f"| {t} | {L:.4g} | {m:.4g} | {r:.3g} |")
        return "\n".join(lines)


def _check_ts(ts) -> List[int]:
    try:
        ts = list(ts)
    except TypeError:
        raise TypeError(f"ts must be a sequence of ints >= 1, got {type(ts).__name__}") from None
    if not ts:
        raise ValueError("ts must be a non-empty sequence of ints >= 1")
    out = []
    for t in ts:
        if isinstance(t, torch.Tensor) and t.numel() == 1 and not t.is_floating_point():
            t = int(t)
        if isinstance(t, bool) or not isinstance(t, int):
            raise TypeError(f"ts must hold ints, got {t!r} ({type(t).__name__})")
        out.append(int(t))
    if out[0] < 1 or any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"ts must be strictly increasing ints >= 1, got {out}")
    return out


def _to_float(name: str, v) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{name} must return a float or a 0-d tensor, got a tensor of shape {tuple(v.shape)}")
        return float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must return a float or a 0-d tensor, got {type(v).__name__}")
    return float(v)


def scaling_curve(
    G: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    target: torch.Tensor,
    metric: Callable[[torch.Tensor, torch.Tensor], Union[float, torch.Tensor]],
    ts: Sequence[int],
    *,
    z0: Optional[torch.Tensor] = None,
    readout: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    directions: Optional[torch.Tensor] = None,
    n_probes: int = 4,
    eps: float = 0.05,
    method: str = "picard",
    beta: float = 1.0,
    m: int = 5,
    lam: float = 1e-4,
    reduce: str = "max",
    dtype: Optional[torch.dtype] = None,
    generator: Optional[torch.Generator] = None,
    metric_name: Optional[str] = None,
    backend: str = "auto",
    **unknown,
) -> ScalingCurve:
    """L_t and ``metric(readout(y_t), target)`` for each t in ``ts``, from one run.

    Runs the stacked probe of :func:`imp_fast.probes.lipschitz_trace` once up to
    ``t_max = max(ts)`` (same arguments and meaning), keeping the unperturbed readouts
    at the requested t only; the metric is evaluated after the loop.

    Args:
        target: what ``readout(y_t)`` of the unperturbed samples is compared with.
        metric: ``metric(pred, target) -> float or 0-d tensor``, e.g. :func:`relative_l2`
            or :func:`psnr` (use ``functools.partial`` for options).
        ts: strictly increasing ints >= 1.
        metric_name: label for tables and plots (default: the metric's ``__name__``).
        backend: the backend whose steps and pair-ratio op run the probe (as in
            :func:`imp_fast.solve`; "auto" picks cpp on CPU, triton on CUDA).
    """
    reject_unknown("scaling_curve", unknown, _OPTIONS)
    if not callable(metric):
        raise TypeError(f"metric must be callable, got {type(metric).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    ts = _check_ts(ts)
    if metric_name is None:
        metric_name = getattr(metric, "__name__", None) or getattr(getattr(metric, "func", None), "__name__", "metric")
    trace, kept = _run_trace(
        G, x, directions=directions, n_probes=n_probes, eps=eps, t_max=ts[-1], z0=z0, method=method,
        beta=beta, m=m, lam=lam, readout=readout, reduce=reduce, dtype=dtype, generator=generator,
        backend=backend, keep=ts, func="scaling_curve",
    )
    with torch.no_grad():
        metrics = [_to_float("metric", metric(kept[t], target)) for t in ts]
        idx = torch.tensor([t - 1 for t in ts], device=trace.L.device)
        L = trace.L.index_select(0, idx).tolist()
        res = trace.residual.index_select(0, idx).amax(dim=1).tolist()
    return ScalingCurve(
        t=ts, L=L, metric=metrics, residual=res, metric_name=str(metric_name), eps=trace.eps,
        reduce=trace.reduce, method=trace.method,
    )


def plot_scaling_curve(curve: ScalingCurve, path, title: Optional[str] = None, *, log_metric: bool = False) -> None:
    """Write a PNG of L_t (left axis) and the metric (right axis) against t (log-x).

    ``log_metric=True`` puts the metric axis on a log scale (errors that fall by
    decades). Needs matplotlib (the ``plot`` extra); pyplot's global state is not used.
    """
    if not isinstance(curve, ScalingCurve):
        raise TypeError(f"curve must be a ScalingCurve, got {type(curve).__name__}")
    if not isinstance(log_metric, bool):
        raise TypeError(f"log_metric must be a bool, got {type(log_metric).__name__}")
    try:
        from matplotlib.figure import Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plot_scaling_curve needs matplotlib: install the `plot` extra "
            "(pip install imp_fast[plot]) or pip install matplotlib"
        ) from e
    # Figure + Agg canvas directly: no pyplot, so no global backend/state is touched.
    fig = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    c1, c2 = "tab:blue", "tab:red"
    ax.plot(curve.t, curve.L, "o-", color=c1, ms=3, label=f"L_t ({curve.reduce})")
    ax.set_xscale("log")
    ax.set_xlabel("iterations t")
    ax.set_ylabel(f"empirical Lipschitz L_t ({curve.reduce})", color=c1)
    ax.tick_params(axis="y", labelcolor=c1)
    ax.grid(True, which="both", alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(curve.t, curve.metric, "s--", color=c2, ms=3, label=curve.metric_name)
    ax2.set_ylabel(curve.metric_name, color=c2)
    ax2.tick_params(axis="y", labelcolor=c2)
    if log_metric:
        ax2.set_yscale("log")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center right", fontsize="small")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
