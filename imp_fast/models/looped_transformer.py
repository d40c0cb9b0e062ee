"""Looped transformer on segment reachability: accuracy and input separation vs loops t.

Task: a row of 16 cells, each empty (0), wall (1, p 0.2) or source (2, p 0.08). The label
of a cell is 1 when the cell is not a wall and its wall-delimited segment holds a
source, else 0. Rows are drawn conditioned on being unsolvable in two loops (two cells
with identical 5-cell neighbourhoods but different labels), so that, as in the paper,
accuracy has to be bought with loops. Model: one pre-LN transformer block (d = 32, 2 heads, attention masked to
|i - j| <= 1, so information travels one cell per loop) looped with input injection,
z_t = Block(Linear([z_{t-1}, e])), z_0 = 0, e the token embedding; the readout is
Linear(LN(z_t)) -> one logit per cell. Training: AdamW 1e-3, T ~ U[8, 32], gradient
through the last 6 loops (the first T - 6 loops run without a graph).

Probe: flip one input token (a random cell to a random different token); separation =
Hamming distance between the predicted output sequences of the original and flipped
inputs, per t. Also token and sequence accuracy per t, and the fixed-point residual
||G(z_t, e) - z_t|| (largest over the rows).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from . import common, distributed

N_CELLS = 16
P_WALL, P_SOURCE = 0.2, 0.08
HARD_RADIUS = 2  # rows no model solves within this many loops (see sample_tokens)
EMPTY, WALL, SOURCE = 0, 1, 2
TS = (1, 2, 4, 8, 16, 32)


# ----------------------------------------------------------------------------------------
# data


def sample_tokens(n: int, generator: torch.Generator, length: int = N_CELLS, *,
                  hard_radius: Optional[int] = HARD_RADIUS) -> torch.Tensor:
    """(n, length) long tokens: each cell a wall with probability P_WALL, a source with
    P_SOURCE, else empty.

    With ``hard_radius = r`` (default 2, used for training and evaluation) a row is kept
    only when two of its cells have identical neighbourhoods of radius r (tokens at
    distance <= r, row ends included) but different labels. The model's output at a
    cell after t loops depends only on that cell's radius-t neighbourhood, so no model
    labels such a row right within r loops: the row needs information to travel further.
    (About 9% of unconditioned rows qualify for r = 2.) ``None`` keeps every row.
    Rejection sampling, deterministic given ``generator``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2, got {length!r}")
    if hard_radius is not None and (isinstance(hard_radius, bool) or not isinstance(hard_radius, int)
                                    or not 0 <= hard_radius < length // 2):
        raise ValueError(f"hard_radius must be None or an int in [0, {length // 2}), got {hard_radius!r}")
    rows: List[torch.Tensor] = []
    have = 0
    while True:
        u = torch.rand(max(12 * (n - have), 256), length, generator=generator)
        tok = torch.full(u.shape, EMPTY, dtype=torch.long)
        tok[u < P_WALL] = WALL
        tok[(u >= P_WALL) & (u < P_WALL + P_SOURCE)] = SOURCE
        if hard_radius is not None:
            tok = tok[ambiguous_rows(tok, hard_radius)]
        rows.append(tok)
        have += tok.shape[0]
        if have >= n:
            return torch.cat(rows)[:n]


def ambiguous_rows(tokens: torch.Tensor, radius: int) -> torch.Tensor:
    """(n,) bool: the row has two cells with equal radius-``radius`` neighbourhoods
    (positions past the row ends read as a fourth token) and different labels."""
    n, L = tokens.shape
    lab = reachability_labels(tokens)
    padded = torch.nn.functional.pad(tokens, (radius, radius), value=3)
    code = torch.zeros(n, L, dtype=torch.long)
    for k in range(2 * radius + 1):  # base-4 code of each window
        code = code * 4 + padded[:, k:k + L]
    same_view = code[:, :, None] == code[:, None, :]
    other_label = lab[:, :, None] != lab[:, None, :]
    return (same_view & other_label).flatten(1).any(1)


def reachability_labels(tokens: torch.Tensor) -> torch.Tensor:
    """1 where the cell is not a wall and its wall-delimited segment holds a source."""
    tokens = torch.as_tensor(tokens)
    single = tokens.dim() == 1
    if single:
        tokens = tokens.unsqueeze(0)
    B, L = tokens.shape
    wall = tokens == WALL
    seg = torch.cumsum(wall.long(), dim=1)  # segment id (walls open a new id)
    src = (tokens == SOURCE).long()
    # per (sample, segment id) source count
    counts = torch.zeros(B, L + 1, dtype=torch.long)
    counts.scatter_add_(1, seg, src)
    lab = (counts.gather(1, seg) > 0) & ~wall
    lab = lab.long()
    return lab[0] if single else lab


# ----------------------------------------------------------------------------------------
# model


class LoopedTransformer(nn.Module):
    def __init__(self, d: int = 32, heads: int = 2, n_tokens: int = 3, length: int = N_CELLS, window: int = 1):
        super().__init__()
        self.d = d
        self.embed = nn.Embedding(n_tokens, d)
        self.inject = nn.Linear(2 * d, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.ln_out = nn.LayerNorm(d)
        self.out = nn.Linear(d, 1)
        i = torch.arange(length)
        # True = masked out
        self.register_buffer("mask", (i[:, None] - i[None, :]).abs() > window, persistent=False)

    def G(self, z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """One loop: z' = Block(Linear([z, e])) (pre-LN)."""
        h = self.inject(torch.cat([z, e], dim=-1))
        a = self.ln1(h)
        h = h + self.attn(a, a, a, attn_mask=self.mask[: h.shape[1], : h.shape[1]], need_weights=False)[0]
        return h + self.mlp(self.ln2(h))

    def readout(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln_out(z)).squeeze(-1)

    def forward(self, tokens: torch.Tensor, T: int, grad_loops: int = None) -> torch.Tensor:
        e = self.embed(tokens)
        z = torch.zeros_like(e)
        k = T if grad_loops is None else min(grad_loops, T)
        with torch.no_grad():
            for _ in range(T - k):
                z = self.G(z, e.detach())
        for _ in range(k):
            z = self.G(z, e)
        return self.readout(z)

    def logits_per_t(self, tokens: torch.Tensor, ts=TS) -> Dict[int, torch.Tensor]:
        return self.loops(tokens, ts)[0]

    def loops(self, tokens: torch.Tensor, ts=TS) -> Tuple[Dict[int, torch.Tensor], Dict[int, torch.Tensor]]:
        """Logits after t loops and the fixed-point residual ||G(z_t, e) - z_t|| per row
        (norm over cells and channels) for each t in ``ts``, no grad."""
        logits, residual = {}, {}
        with torch.no_grad():
            e = self.embed(tokens)
            z = torch.zeros_like(e)
            for t in range(1, max(ts) + 1):
                z = self.G(z, e)
                if t in ts:
                    logits[t] = self.readout(z)
                    residual[t] = torch.linalg.vector_norm((self.G(z, e) - z).flatten(1), dim=1)
        return logits, residual


# ----------------------------------------------------------------------------------------
# training and probe


def train(model: LoopedTransformer, *, steps: int, batch: int = 64, lr: float = 1e-3, t_range=(8, 33),
          grad_loops: int = 6, seed: int = 0, log=print) -> List[float]:
    """AdamW, T ~ U[t_range), gradient through the last ``grad_loops`` loops; fresh rows each step.

    Under torch.distributed every rank draws the same rows and T and trains on its shard of
    the rows (DDP averages the gradients): the single-process recipe. Returns the per-step
    losses (of the whole batch)."""
    g = torch.Generator().manual_seed(seed)
    common.check_world_size(batch)
    net = distributed.wrap(model)
    part = distributed.shard(batch)
    weight = distributed.shard_weight(part.stop - part.start, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    lossf = nn.BCEWithLogitsLoss()
    losses = []
    t0 = time.time()
    for s in range(steps):
        tok = sample_tokens(batch, g)
        lab = reachability_labels(tok).float()
        T = int(torch.randint(t_range[0], t_range[1], (1,), generator=g))
        if distributed.is_distributed():
            tok, lab = tok[part], lab[part]
        loss = lossf(net(tok, T, grad_loops), lab)
        if distributed.is_distributed():
            loss = loss * weight
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(distributed.average(loss.detach()))
        if log and (s % max(1, steps // 10) == 0 or s == steps - 1):
            log(f"  step {s + 1}/{steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} ({time.time() - t0:.0f} s)")
    return losses


def flip_one(tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    B, L = tokens.shape
    pos = torch.randint(0, L, (B,), generator=generator)
    shift = torch.randint(1, 3, (B,), generator=generator)
    out = tokens.clone()
    out[torch.arange(B), pos] = (tokens[torch.arange(B), pos] + shift) % 3
    return out


def probe(model: LoopedTransformer, n: int, seed: int, ts=TS):
    """Token/sequence accuracy and separation per t on ``n`` fresh rows (deterministic in seed).

    Under torch.distributed every rank draws the same rows and flips, probes its shard of
    them, and the shards' means are combined weighted by their sizes."""
    g = torch.Generator().manual_seed(seed)
    tok = sample_tokens(n, g)
    tok2 = flip_one(tok, g)
    part = distributed.shard(n) if distributed.is_distributed() else slice(0, n)
    k = part.stop - part.start
    stats = _probe_rows(model, tok[part], tok2[part], ts) if k > 0 else None
    how = {"token_accuracy": "mean", "sequence_accuracy": "mean", "separation": "mean",
           "target_separation": "mean", "residual": "max"}
    return dict(t=list(ts), **distributed.reduce_shards(k, stats, how))


def _probe_rows(model: LoopedTransformer, tok: torch.Tensor, tok2: torch.Tensor, ts) -> Dict[str, object]:
    lab = reachability_labels(tok)
    model.eval()
    a, res = model.loops(tok, ts)
    b = model.logits_per_t(tok2, ts)
    tok_acc, seq_acc, sep = [], [], []
    for t in ts:
        pa, pb = (a[t] > 0).long(), (b[t] > 0).long()
        tok_acc.append(float((pa == lab).float().mean()))
        seq_acc.append(float((pa == lab).all(1).float().mean()))
        sep.append(float((pa != pb).sum(1).float().mean()))
    true_sep = float((reachability_labels(tok2) != lab).sum(1).float().mean())
    return dict(token_accuracy=tok_acc, sequence_accuracy=seq_acc, separation=sep, target_separation=true_sep,
                residual=[float(res[t].max()) for t in ts])


def plot(path: Path, res, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with_residual = "residual" in res
    fig = Figure(figsize=(10, 3.8) if with_residual else (6.5, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1) if with_residual else fig.add_subplot(1, 1, 1)
    ax.plot(res["t"], res["token_accuracy"], "o-", label="token accuracy", color="C0")
    ax.plot(res["t"], res["sequence_accuracy"], "s-", label="sequence accuracy", color="C2")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("loops t")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax2 = ax.twinx()
    ax2.plot(res["t"], res["separation"], "^-", color="C3", label="separation (Hamming)")
    ax2.axhline(res["target_separation"], color="C3", ls=":", lw=1, label="separation of true labels")
    ax2.set_ylabel("separation (cells)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center right")
    ax.grid(alpha=0.3)
    if with_residual:
        ax3 = fig.add_subplot(1, 2, 2)
        ax3.plot(res["t"], res["residual"], "s-", color="C7", ms=4)
        ax3.set_xscale("log", base=2)
        ax3.set_yscale("log")
        ax3.set_xlabel("loops t")
        ax3.set_ylabel("residual ||G(z_t, e) - z_t|| (max over rows)")
        ax3.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser, "looped-transformer", probes=False)  # --steps default 3000, quick 30


def run(args: argparse.Namespace) -> int:
    common.setup(args.seed, args.threads)
    out = common.prepare_out(args.out)
    quick = bool(args.quick)
    steps = args.steps if args.steps is not None else (30 if quick else 3000)
    t_start = time.time()
    model = LoopedTransformer()
    n_par = sum(p.numel() for p in model.parameters())
    ckpt = out / f"looped_transformer{'_quick' if quick else ''}.pt"
    losses: List[float] = []

    def train_fn() -> List[float]:
        print(f"training looped transformer ({n_par} params, {steps} steps, T ~ U[8, 32], grad through last 6 loops)")
        losses.extend(train(model, steps=steps, seed=args.seed))
        return losses

    # The data distribution is part of the meta: a checkpoint trained on other rows is retrained.
    meta = {"seed": args.seed, "steps": steps, "n_cells": N_CELLS, "p_wall": P_WALL, "p_source": P_SOURCE,
            "hard_radius": HARD_RADIUS}
    info = common.load_or_train(ckpt, model, train_fn, args.retrain, meta)
    res = probe(model, 256 if quick else 2000, seed=args.seed + 1)
    print(f"\nLooped transformer, segment reachability ({N_CELLS} cells), {256 if quick else 2000} test rows; "
          f"separation = mean Hamming distance between outputs after flipping one input token "
          f"(true labels differ in {res['target_separation']:.2f} cells on average); residual = max over rows "
          f"of ||G(z_t, e) - z_t|| (norm over cells and channels)")
    print("| t | token accuracy | sequence accuracy | separation | residual |")
    print("|---:|---:|---:|---:|---:|")
    for i, t in enumerate(res["t"]):
        print(f"| {t} | {res['token_accuracy'][i]:.3f} | {res['sequence_accuracy'][i]:.3f} | "
              f"{res['separation'][i]:.2f} | {res['residual'][i]:.3g} |")
    if not distributed.is_rank0():
        return 0
    png = out / "looped_transformer_scaling.png"
    plot(png, res, "Looped transformer: accuracy and separation vs loops")
    results = {"case": "looped-transformer", "quick": quick, "seed": args.seed, "params": n_par, "steps": steps,
               "train_loss": losses, **info, **res, "png": str(png), "world_size": distributed.world_size(),
               "wall_s": round(time.time() - t_start, 1)}
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nwrote {out / 'results.json'} and {png} ({results['wall_s']} s)")
    return 0
