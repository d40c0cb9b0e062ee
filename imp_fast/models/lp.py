"""Linear programming: implicit GNN on the LP bipartite graph vs an explicit GNN (paper Table 1).

Data: random feasible LPs ``min c^T y  s.t.  A y (<= | =) b,  l <= y <= u`` with m = 10
constraints and n = 50 variables (100 nonzeros of A ~ N(0, 1), P(equality) = 0.3,
c ~ U(-1, 1) * 0.01, b ~ U(-1, 1), bounds from sorted pairs of N(0, 10)), labelled by
``scipy.optimize.linprog`` (HiGHS); infeasible/unbounded draws are rejected. The data
set is cached in the run folder (``lp_data.pt``) after the first generation.

Graph: constraint nodes (features b, is_equality), variable nodes (c, l, u) and one edge
per nonzero A_ij. Every instance has a fixed sparsity pattern stored as edge index lists
(``rows``, ``cols``); a batch is one disjoint graph, made by offsetting node indices
(:func:`batch_graphs` / :func:`split_graphs`). Message passing is scatter/gather with
``index_add_`` (:class:`BipartiteConv`).

Models (parameter counts equal the paper's Table 1 exactly):

* explicit GNN, 29 d^2 + 29 d parameters: node encoders (2 -> d -> d, 3 -> d -> d), four
  bipartite convolutions v->c, c->v, v->c, c->v with separate weights, each a message
  MLP on [h_src, h_dst] (2d -> d -> d) whose output is weighted by A_ij and summed at
  the destination, and an update MLP on [h_dst, message sum] (2d -> d -> d) added
  residually (LeakyReLU activations); readout MLP d -> d -> d -> d -> 1 (last layer without bias).
* implicit GNN G(y, x), 29 d^2 + 59 d + 22 parameters: the same layers, but the
  variable features carry the current iterate y: y is lifted to 5 channels
  (y itself and 4 learned features of a 1 -> 3 -> 4 tanh MLP, 22 parameters) that are
  concatenated to the variable features wherever a convolution reads them (6 reads,
  +5 d each). The readout is the new y. Iterated y_t = G(y_{t-1}, x), y_0 = 0.

Feature scaling (as the paper's recipe): c x 100, l and u x 0.1, labels x 0.1. The error
is ``||y - y*|| / (||y*|| + 1)`` per LP in the original units, averaged over the test set.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..cli import positive_float, positive_int
from . import common, distributed

M_CONS = 10
N_VARS = 50
NNZ = 100
P_EQ = 0.3
C_SCALE, LU_SCALE, Y_SCALE = 100.0, 0.1, 0.1
N_YFEAT = 5
FEATURES = ("A", "b", "c", "l", "u")
# the paper's Table 1
PAPER_TABLE = {
    4: {"explicit_params": 580, "explicit_error": 0.397, "implicit_params": 722, "implicit_error": 0.218},
    8: {"explicit_params": 2088, "explicit_error": 0.273, "implicit_params": 2350, "implicit_error": 0.177},
    16: {"explicit_params": 7888, "explicit_error": 0.283, "implicit_params": 8390, "implicit_error": 0.152},
    32: {"explicit_params": 30624, "explicit_error": 0.318, "implicit_params": 31606, "implicit_error": 0.156},
}


# ----------------------------------------------------------------------------------------
# data


def generate_lp(rng: np.random.Generator, m: int = M_CONS, n: int = N_VARS, nnz: int = NNZ):
    """One random LP (may be infeasible): dict of numpy arrays."""
    flat = rng.choice(m * n, size=nnz, replace=False)
    flat.sort()
    rows, cols = flat // n, flat % n
    vals = rng.standard_normal(nnz)
    eq = rng.random(m) < P_EQ
    c = rng.uniform(-1, 1, n) * 0.01
    b = rng.uniform(-1, 1, m)
    lu = np.sort(rng.normal(0.0, 10.0, size=(n, 2)), axis=1)
    return dict(rows=rows, cols=cols, vals=vals, eq=eq, b=b, c=c, l=lu[:, 0], u=lu[:, 1])


def dense_A(lp, m: int = M_CONS, n: int = N_VARS) -> np.ndarray:
    A = np.zeros((m, n))
    A[np.asarray(lp["rows"]), np.asarray(lp["cols"])] = np.asarray(lp["vals"])
    return A


def solve_lp(lp) -> Optional[np.ndarray]:
    """The optimum y* by scipy's HiGHS, or None when not solved to optimality."""
    from scipy.optimize import linprog

    A = dense_A(lp)
    eq = np.asarray(lp["eq"], dtype=bool)
    kw = {}
    if (~eq).any():
        kw.update(A_ub=A[~eq], b_ub=np.asarray(lp["b"])[~eq])
    if eq.any():
        kw.update(A_eq=A[eq], b_eq=np.asarray(lp["b"])[eq])
    res = linprog(np.asarray(lp["c"]), bounds=list(zip(lp["l"], lp["u"])), method="highs", **kw)
    return res.x if res.status == 0 else None


def make_dataset(n_samples: int, seed: int) -> Dict[str, torch.Tensor]:
    """n_samples feasible LPs with labels, as stacked tensors (instance on dim 0)."""
    rng = np.random.default_rng(seed)
    out: Dict[str, list] = {k: [] for k in ("rows", "cols", "vals", "eq", "b", "c", "l", "u", "y")}
    while len(out["y"]) < n_samples:
        lp = generate_lp(rng)
        y = solve_lp(lp)
        if y is None:
            continue
        for k in lp:
            out[k].append(lp[k])
        out["y"].append(y)
    data = {}
    for k, v in out.items():
        arr = np.stack(v)
        if k in ("rows", "cols"):
            data[k] = torch.as_tensor(arr, dtype=torch.long)
        elif k == "eq":
            data[k] = torch.as_tensor(arr, dtype=torch.bool)
        else:
            data[k] = torch.as_tensor(arr, dtype=torch.float64)
    return data


def load_or_make_data(out_dir: Path, n_train: int, n_test: int, seed: int, log=print):
    """Cached (train, test) in out_dir/lp_data.pt (a weights-only file); regenerated when
    sizes or seed differ or the file is unreadable. Distributed: rank 0 loads or makes it,
    every rank gets it."""
    path = Path(out_dir) / "lp_data.pt"
    key = dict(n_train=n_train, n_test=n_test, seed=seed)

    def make():
        t0 = time.time()
        train = make_dataset(n_train, seed)
        test = make_dataset(n_test, seed + 10_000)
        log(f"generated {n_train} train / {n_test} test feasible LPs with linprog labels in {time.time() - t0:.1f} s"
            f" -> {path}")
        return {"train": train, "test": test}

    def check(blob):
        def ok(d, n):
            return (isinstance(d, dict) and set(d) == {"rows", "cols", "vals", "eq", "b", "c", "l", "u", "y"}
                    and all(isinstance(v, torch.Tensor) and v.shape[0] == n for v in d.values()))
        return ok(blob.get("train"), n_train) and ok(blob.get("test"), n_test)

    blob = common.load_or_make_cache(path, key, make, check, what="cached LPs")
    return blob["train"], blob["test"]


def subset(data: Dict[str, torch.Tensor], idx) -> Dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in data.items()}


# ----------------------------------------------------------------------------------------
# graphs: flat per-LP feature vector + edge index lists, batched by offsetting

# flat layout of x (one row per LP): [A values (NNZ), b (m), eq (m), c (n), l (n), u (n)]
_SIZES = {"A": NNZ, "b": M_CONS, "eq": M_CONS, "c": N_VARS, "l": N_VARS, "u": N_VARS}
SLICES = {}
_o = 0
for _k, _s in _SIZES.items():
    SLICES[_k] = slice(_o, _o + _s)
    _o += _s
X_DIM = _o


def flat_features(data: Dict[str, torch.Tensor], dtype=torch.float32) -> torch.Tensor:
    """Scaled model inputs, one flat row per LP (see SLICES)."""
    return torch.cat(
        [data["vals"], data["b"], data["eq"].to(torch.float64), data["c"] * C_SCALE,
         data["l"] * LU_SCALE, data["u"] * LU_SCALE], dim=1,
    ).to(dtype)


def feature_direction(name: str, n_dirs: int, generator: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """(n_dirs, X_DIM) random unit directions that are zero outside feature group ``name``."""
    d = torch.zeros(n_dirs, X_DIM, dtype=torch.float64)
    sl = SLICES[name]
    r = torch.randn(n_dirs, sl.stop - sl.start, generator=generator, dtype=torch.float64)
    d[:, sl] = r / r.norm(dim=1, keepdim=True)
    return d.to(dtype)


def batch_graphs(rows: torch.Tensor, cols: torch.Tensor, m: int = M_CONS, n: int = N_VARS):
    """Per-instance edge lists (B, E) -> one disjoint graph's flat edge lists (B*E,).

    Constraint node k of instance i becomes i*m + k, variable node j becomes i*n + j.
    """
    B = rows.shape[0]
    off = torch.arange(B, device=rows.device).unsqueeze(1)
    return (rows + off * m).reshape(-1), (cols + off * n).reshape(-1)


def split_graphs(rows_flat: torch.Tensor, cols_flat: torch.Tensor, B: int, m: int = M_CONS, n: int = N_VARS):
    """Inverse of :func:`batch_graphs`: back to per-instance (B, E) local indices."""
    r = rows_flat.reshape(B, -1)
    c = cols_flat.reshape(B, -1)
    off = torch.arange(B, device=r.device).unsqueeze(1)
    return r - off * m, c - off * n


# ----------------------------------------------------------------------------------------
# models


def mlp(sizes: Sequence[int], last_bias: bool = True) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i in range(len(sizes) - 1):
        last = i == len(sizes) - 2
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=(last_bias or not last)))
        if not last:
            layers.append(nn.LeakyReLU(0.05))
    return nn.Sequential(*layers)


class BipartiteConv(nn.Module):
    """h_dst <- h_dst + upd([h_dst, sum_{edges} A_e * msg([h_src, h_dst])]).

    ``src_extra`` / ``dst_extra``: widths of extra channels concatenated to the source /
    destination features wherever they are read (the implicit model's y features).
    """

    def __init__(self, d: int, src_extra: int = 0, dst_extra: int = 0):
        super().__init__()
        self.msg = mlp([2 * d + src_extra + dst_extra, d, d])
        self.upd = mlp([2 * d + dst_extra, d, d])

    def forward(self, h_src, h_dst, src_idx, dst_idx, w, src_x=None, dst_x=None):
        s = h_src if src_x is None else torch.cat([h_src, src_x], dim=-1)
        t = h_dst if dst_x is None else torch.cat([h_dst, dst_x], dim=-1)
        m = self.msg(torch.cat([s.index_select(0, src_idx), t.index_select(0, dst_idx)], dim=-1))
        agg = torch.zeros(h_dst.shape[0], m.shape[1], dtype=m.dtype, device=m.device)
        agg.index_add_(0, dst_idx, m * w.unsqueeze(-1))
        return h_dst + self.upd(torch.cat([t, agg], dim=-1))


class LPGNN(nn.Module):
    """Explicit (implicit=False) or implicit (implicit=True) GNN on batched LP graphs.

    Inputs: x (B, X_DIM) flat scaled features and per-LP edge lists rows, cols (B, NNZ).
    Explicit: ``forward(x, rows, cols) -> y`` (B, n) in scaled units.
    Implicit: ``G(y, x, rows, cols) -> y'``; ``forward(x, rows, cols, T)`` iterates T times.
    """

    def __init__(self, d: int, implicit: bool):
        super().__init__()
        self.d, self.implicit = d, implicit
        k = N_YFEAT if implicit else 0
        self.enc_c = mlp([2, d, d])
        self.enc_v = mlp([3, d, d])
        # v->c, c->v, v->c, c->v
        self.convs = nn.ModuleList([
            BipartiteConv(d, src_extra=k), BipartiteConv(d, dst_extra=k),
            BipartiteConv(d, src_extra=k), BipartiteConv(d, dst_extra=k),
        ])
        self.head = mlp([d, d, d, d, 1], last_bias=False)
        if implicit:
            self.yfeat = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, N_YFEAT - 1))

    def _encode(self, x, rows, cols):
        B = x.shape[0]
        hc = self.enc_c(torch.stack([x[:, SLICES["b"]], x[:, SLICES["eq"]]], dim=-1).reshape(B * M_CONS, 2))
        hv = self.enc_v(torch.stack([x[:, SLICES["c"]], x[:, SLICES["l"]], x[:, SLICES["u"]]], dim=-1)
                        .reshape(B * N_VARS, 3))
        r, c = batch_graphs(rows, cols)
        return hc, hv, r, c, x[:, SLICES["A"]].reshape(-1)

    def _trunk(self, hc, hv, r, c, w, yx=None):
        hc = self.convs[0](hv, hc, c, r, w, src_x=yx)
        hv = self.convs[1](hc, hv, r, c, w, dst_x=yx)
        hc = self.convs[2](hv, hc, c, r, w, src_x=yx)
        hv = self.convs[3](hc, hv, r, c, w, dst_x=yx)
        return self.head(hv).reshape(-1, N_VARS)

    def G(self, y, x, rows, cols):
        assert self.implicit
        hc, hv, r, c, w = self._encode(x, rows, cols)
        yv = y.reshape(-1, 1)
        yx = torch.cat([yv, torch.tanh(self.yfeat(yv))], dim=-1)
        return self._trunk(hc, hv, r, c, w, yx)

    def forward(self, x, rows, cols, T: int = 8):
        if not self.implicit:
            hc, hv, r, c, w = self._encode(x, rows, cols)
            return self._trunk(hc, hv, r, c, w)
        y = torch.zeros(x.shape[0], N_VARS, dtype=x.dtype, device=x.device)
        for _ in range(T):
            y = self.G(y, x, rows, cols)
        return y

    def trajectory(self, x, rows, cols, T: int) -> List[torch.Tensor]:
        """[y_0 = 0, y_1, ..., y_T] (scaled units), no grad."""
        with torch.no_grad():
            y = torch.zeros(x.shape[0], N_VARS, dtype=x.dtype, device=x.device)
            ys = [y]
            for _ in range(T):
                y = self.G(y, x, rows, cols)
                ys.append(y)
        return ys


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lp_error(y_pred_scaled: torch.Tensor, y_true: torch.Tensor) -> float:
    """mean ||y - y*|| / (||y*|| + 1) in original units."""
    y = y_pred_scaled.to(torch.float64) / Y_SCALE
    t = y_true.to(torch.float64)
    return float(((y - t).norm(dim=1) / (t.norm(dim=1) + 1.0)).mean())


# ----------------------------------------------------------------------------------------
# training


class _BatchLoss(nn.Module):
    """One minibatch's training loss as a module forward (what DDP wraps): implicit, T
    iterations from y_0 = 0, the last ``grad_steps`` with a graph and a loss on each;
    explicit, one pass."""

    def __init__(self, model: LPGNN, grad_steps: int):
        super().__init__()
        self.model, self.grad_steps = model, grad_steps

    def forward(self, x, yt, rows, cols, T: int):
        model = self.model
        if not model.implicit:
            return ((model(x, rows, cols) - yt) ** 2).sum(1).mean()
        y = torch.zeros_like(yt)
        with torch.no_grad():
            for _ in range(T - self.grad_steps):
                y = model.G(y, x, rows, cols)
        loss = 0.0
        for _ in range(self.grad_steps):
            y = model.G(y, x, rows, cols)
            loss = loss + ((y - yt) ** 2).sum(1).mean()
        return loss / self.grad_steps


def train_model(model: LPGNN, train, *, epochs: int, batch: int = 50, lr: float = 1e-2, t_range=(6, 13),
                grad_steps: int = 4, seed: int = 0, log=print, tag: str = "") -> List[float]:
    """AdamW with cosine decay; implicit: T ~ U[t_range), gradient through the last grad_steps
    iterations, loss on each of those iterates (explicit: one pass). Returns the per-epoch mean losses.

    Under torch.distributed every rank draws the same permutation and T and trains on its
    shard of each minibatch (DDP averages the gradients): the single-process recipe."""
    g = torch.Generator().manual_seed(seed)
    x_all = flat_features(train)
    y_all = (train["y"] * Y_SCALE).float()
    N = x_all.shape[0]
    steps = epochs * max(1, N // batch)
    common.check_world_size(batch)
    step = distributed.wrap(_BatchLoss(model, grad_steps))
    part = distributed.shard(batch)
    weight = distributed.shard_weight(part.stop - part.start, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    t0 = time.time()
    for ep in range(epochs):
        perm = torch.randperm(N, generator=g)
        tot, nb = 0.0, 0
        for i in range(0, N - batch + 1, batch):
            idx = perm[i:i + batch]
            T = int(torch.randint(t_range[0], t_range[1], (1,), generator=g)) if model.implicit else 0
            if distributed.is_distributed():
                idx = idx[part]
            loss = step(x_all[idx], y_all[idx], train["rows"][idx], train["cols"][idx], T)
            if distributed.is_distributed():
                loss = loss * weight
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            tot += distributed.average(loss.detach())
            nb += 1
        losses.append(tot / max(nb, 1))
        if log and (ep % max(1, epochs // 5) == 0 or ep == epochs - 1):
            log(f"  {tag} epoch {ep + 1}/{epochs} loss {losses[-1]:.4f} ({time.time() - t0:.0f} s)")
    return losses


def evaluate_error(model: LPGNN, data, T: int = 8) -> float:
    """Mean test error after T iterations (under torch.distributed: each rank its shard, combined)."""
    model.eval()
    n = data["y"].shape[0]
    part = distributed.shard(n) if distributed.is_distributed() else slice(0, n)
    k = part.stop - part.start
    err = None
    if k > 0:
        local = subset(data, part) if distributed.is_distributed() else data
        with torch.no_grad():
            y = model(flat_features(local), local["rows"], local["cols"], T)
        err = lp_error(y, local["y"])
    return distributed.reduce_shards(k, None if err is None else {"error": err}, {"error": "mean"})["error"]


# ----------------------------------------------------------------------------------------
# probes


def scaling_probe(model: LPGNN, data, t_max: int = 12, n_dirs: int = 4, eps: float = 0.1, seed: int = 0,
                  backend: str = "auto"):
    """Error, L_t per perturbed feature group and the fixed-point residual for t = 0..t_max
    (t = 0: y_0 = 0, L_0 = 0). Returns ``(ts, errors, L, residual)``; ``residual[t]`` is
    the largest ``||G(y_t, x) - y_t||`` over the LPs (scaled units).

    Under torch.distributed each rank probes its shard of the LPs (same directions on
    every rank); errors are combined as sample-weighted means, L_t and residuals as maxima.
    ``backend`` runs the probe's steps and pair ratios (as in :func:`imp_fast.solve`)."""
    if not distributed.is_distributed():
        return _scaling_probe(model, data, t_max, n_dirs, eps, seed, backend)
    part = distributed.shard(data["y"].shape[0])
    k = part.stop - part.start
    stats = None
    if k > 0:
        ts, errors, L, residual = _scaling_probe(model, subset(data, part), t_max, n_dirs, eps, seed, backend)
        stats = {"t": ts, "error": errors, "L": L, "residual": residual}
    got = distributed.reduce_shards(k, stats, {"t": "first", "error": "mean", "L": "max", "residual": "max"})
    return got["t"], got["error"], got["L"], got["residual"]


def _scaling_probe(model: LPGNN, data, t_max: int, n_dirs: int, eps: float, seed: int, backend: str):
    from imp_fast import lipschitz_trace

    model.eval()
    x = flat_features(data)
    ys = model.trajectory(x, data["rows"], data["cols"], t_max + 1)  # y_{t+1} = G(y_t): residual at t_max too
    residual = [float((ys[t + 1] - ys[t]).norm(dim=1).max()) for t in range(t_max + 1)]
    ys = ys[:t_max + 1]
    errors = [lp_error(y, data["y"]) for y in ys]
    md = copy.deepcopy(model).double()
    rows, cols = data["rows"], data["cols"]
    B = x.shape[0]

    def G(z, xx):
        k = xx.shape[0] // B
        return md.G(z, xx, rows.repeat(k, 1), cols.repeat(k, 1))

    g = torch.Generator().manual_seed(seed)
    L: Dict[str, List[float]] = {}
    for name in FEATURES:
        dirs = feature_direction(name, n_dirs, g)
        tr = lipschitz_trace(G, x.double(), directions=dirs, eps=eps, t_max=t_max,
                             z0=torch.zeros(B, N_VARS, dtype=torch.float64), reduce="max", dtype=torch.float64,
                             backend=backend)
        L[name] = [0.0] + [float(v) for v in tr.L]
    return list(range(t_max + 1)), errors, L, residual


def plot(path: Path, ts, errors, L, title: str, residual: Optional[Sequence[float]] = None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax1.plot(ts, errors, "o-", color="C3", label="test error")
    ax1.set_xlabel("iterations t")
    ax1.set_ylabel("test error ||y-y*||/(||y*||+1)", color="C3")
    ax1.grid(alpha=0.3)
    if residual is not None:
        ax1r = ax1.twinx()
        ax1r.plot(ts, residual, "s--", color="C7", ms=3, label="residual ||G(y_t) - y_t|| (max)")
        ax1r.set_yscale("log")
        ax1r.set_ylabel("fixed-point residual (max)", color="C7")
        h1, l1 = ax1.get_legend_handles_labels()
        h2, l2 = ax1r.get_legend_handles_labels()
        ax1.legend(h1 + h2, l1 + l2, fontsize=7)
    for name in FEATURES:
        ax2.plot(ts[1:], L[name][1:], "o-", label=f"L_t ({name})", ms=3)
    ax2.set_yscale("log")
    ax2.set_xlabel("iterations t")
    ax2.set_ylabel("empirical Lipschitz L_t (max)")
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser, "lp", steps=False)
    parser.add_argument("--table", action="store_true",
                        help="also train implicit and explicit GNNs at embeddings 4, 8, 16, 32 (Table 1)")
    parser.add_argument("--embedding", type=positive_int, default=16,
                        help="embedding size of the scaling-curve model, >= 1 (default %(default)s)")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="training epochs, >= 1 (default 40; quick 20, its --table models 2)")
    parser.add_argument("--lr", type=positive_float, default=1e-2,
                        help="peak learning rate (one-cycle AdamW), > 0 (default %(default)s)")


def _fmt_row(vals, fmt="{:.3f}"):
    return " | ".join(fmt.format(v) for v in vals)


def run(args: argparse.Namespace) -> int:
    common.setup(args.seed, args.threads)
    out = common.prepare_out(args.out)
    quick = bool(args.quick)
    n_train, n_test = (60, 16) if quick else (1000, 200)
    # quick: minibatches of 10 (6 steps per epoch over the 60 LPs) and 20 epochs, enough for
    # the trend (error falls, L_t rises with t); the --table models, whose errors are not
    # compared at quick scale, train 2 epochs there
    batch = 10 if quick else 50
    epochs = args.epochs if args.epochs is not None else (20 if quick else 40)
    table_epochs = args.epochs if args.epochs is not None else (2 if quick else 40)
    d = args.embedding
    t_max = 12
    t_start = time.time()
    train, test = load_or_make_data(out, n_train, n_test, args.seed)

    ckpt = out / f"implicit_d{d}{'_quick' if quick else ''}.pt"
    model = LPGNN(d, implicit=True)
    losses: List[float] = []

    def train_fn() -> List[float]:
        print(f"training implicit GNN (embedding {d}, {n_params(model)} params, {epochs} epochs)")
        losses.extend(train_model(model, train, epochs=epochs, batch=batch, lr=args.lr, seed=args.seed,
                                  tag=f"implicit d={d}"))
        return losses

    meta = {"seed": args.seed, "embedding": d, "implicit": True, "epochs": epochs, "lr": args.lr, "n_train": n_train,
            "batch": batch}
    common.load_or_train(ckpt, model, train_fn, args.retrain, meta)
    ts, errors, L, residual = scaling_probe(model, test, t_max=t_max, n_dirs=2 if quick else 4, seed=args.seed,
                                            backend=args.backend)

    print(f"\nImplicit GNN (embedding {d}, {n_params(model)} params), {n_test} test LPs; "
          f"error = ||y - y*|| / (||y*|| + 1); L_t = max finite-difference ratio per perturbed feature "
          f"(scaled units, eps 0.1, float64); residual = max over LPs of ||G(y_t, x) - y_t|| (scaled units); "
          f"t = 0 is y_0 = 0 (L_0 = 0)")
    print("| t | error | " + " | ".join(f"L_t ({f})" for f in FEATURES) + " | residual |")
    print("|---:|---:|" + "---:|" * len(FEATURES) + "---:|")
    for i, t in enumerate(ts):
        print(f"| {t} | {errors[i]:.3f} | " + " | ".join(f"{L[f][i]:.3g}" for f in FEATURES)
              + f" | {residual[i]:.3g} |")

    results = {
        "case": "lp", "quick": quick, "seed": args.seed, "embedding": d, "params": n_params(model),
        "n_train": n_train, "n_test": n_test, "epochs": epochs, "train_loss": losses,
        "t": ts, "error": errors, "L": L, "residual": residual,
    }

    if args.table:
        rows_out = []
        for dd in (4, 8, 16, 32):
            row = {"embedding": dd}
            for kind in ("explicit", "implicit"):
                torch.manual_seed(args.seed)
                mdl = LPGNN(dd, implicit=(kind == "implicit"))
                path = out / f"table_{kind}_d{dd}{'_quick' if quick else ''}.pt"
                meta = {"seed": args.seed, "embedding": dd, "implicit": kind == "implicit", "epochs": table_epochs,
                        "lr": args.lr, "n_train": n_train, "batch": batch}
                info = common.load_or_train(path, mdl, lambda: train_model(
                    mdl, train, epochs=table_epochs, batch=batch, lr=args.lr, seed=args.seed, tag=f"{kind} d={dd}",
                    log=print), args.retrain, meta)
                if info["trained"]:
                    row[f"{kind}_train_s"] = round(info["train_seconds"], 1)
                row[f"{kind}_params"] = n_params(mdl)
                row[f"{kind}_error"] = evaluate_error(mdl, test, T=8)
            rows_out.append(row)
        print("\nTable 1 analogue (test error at 8 iterations; explicit GNN: one pass through its 4 layers); "
              "paper's numbers in parentheses")
        print("| embedding | " + " | ".join(str(r["embedding"]) for r in rows_out) + " |")
        print("|---|" + "---:|" * len(rows_out))
        print("| explicit GNN params | " + " | ".join(
            f"{r['explicit_params']:,} ({PAPER_TABLE[r['embedding']]['explicit_params']:,})" for r in rows_out) + " |")
        print("| explicit GNN error | " + " | ".join(
            f"{r['explicit_error']:.3f} ({PAPER_TABLE[r['embedding']]['explicit_error']:.3f})" for r in rows_out) + " |")
        print("| implicit GNN params | " + " | ".join(
            f"{r['implicit_params']:,} ({PAPER_TABLE[r['embedding']]['implicit_params']:,})" for r in rows_out) + " |")
        print("| implicit GNN error | " + " | ".join(
            f"{r['implicit_error']:.3f} ({PAPER_TABLE[r['embedding']]['implicit_error']:.3f})" for r in rows_out) + " |")
        results["table"] = rows_out
        results["paper_table"] = PAPER_TABLE

    png = out / "lp_scaling.png"
    results["png"] = str(png)
    results["world_size"] = distributed.world_size()
    results["wall_s"] = round(time.time() - t_start, 1)
    if not distributed.is_rank0():
        return 0
    plot(png, ts, errors, L, f"LP, implicit GNN (embedding {d}): error and L_t vs iterations", residual=residual)
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {out / 'results.json'} and {png} ({results['wall_s']} s)")
    return 0
