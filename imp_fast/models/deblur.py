"""Image deblurring: implicit PGD / HQS with a learned residual denoiser (L_t and PSNR vs t).

Data: 32x32 grey piecewise-constant images (3-6 random disks, rectangles, diamonds on a
random background, values in [0, 1]), blurred by a circular Gaussian (sigma 1 px) done
by FFT, plus Gaussian noise (std 0.02). The blur A is symmetric (A^T = A).

Operator (a regular G: contractive-ish in y, Lipschitz in x):
    PGD:  G(y, x) = D(y - gamma A^T (A y - x)),            gamma > 0 learned
    HQS:  G(y, x) = D((A^T A + b I)^{-1} (A^T x + b y)),   b > 0 learned, solved by FFT
with D(z) = z - R(z), R a 3-layer 16-channel conv net (circular padding).
"""
from __future__ import annotations

import argparse
import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..probes import fourier_directions
from ..scaling import psnr
from . import common

SIZE = 32
SIGMA = 1.0
NOISE = 0.02


# ----------------------------------------------------------------------------------------
# data


def make_images(n: int, size: int = SIZE, *, seed: int = 0) -> torch.Tensor:
    """(n, 1, size, size) piecewise-constant images in [0, 1]: 3-6 shapes on a background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32) + 0.5,
                            torch.arange(size, dtype=torch.float32) + 0.5, indexing="ij")
    imgs = torch.empty(n, 1, size, size)
    for i in range(n):
        img = torch.full((size, size), float(torch.rand(1, generator=g)) * 0.4)
        for _ in range(int(torch.randint(3, 7, (1,), generator=g))):
            kind = int(torch.randint(0, 3, (1,), generator=g))
            cy, cx = (torch.rand(2, generator=g) * size).tolist()
            r = float(2.0 + torch.rand(1, generator=g) * size / 4)
            if kind == 0:  # disk
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
            elif kind == 1:  # axis-aligned rectangle
                ry = float(2.0 + torch.rand(1, generator=g) * size / 4)
                mask = ((yy - cy).abs() <= ry) & ((xx - cx).abs() <= r)
            else:  # diamond
                mask = (yy - cy).abs() + (xx - cx).abs() <= r
            img = torch.where(mask, torch.rand(1, generator=g), img)
        imgs[i, 0] = img
    return imgs


def gaussian_kernel(size: int = SIZE, sigma: float = SIGMA) -> torch.Tensor:
    """(size, size) circular Gaussian point-spread function centred at (0, 0), sum 1."""
    d = torch.arange(size, dtype=torch.float64)
    d = torch.minimum(d, size - d)  # circular distance to 0
    k = torch.exp(-(d.view(-1, 1) ** 2 + d.view(1, -1) ** 2) / (2 * sigma ** 2))
    return k / k.sum()


class Blur(nn.Module):
    """Circular Gaussian blur A u = k (*) u by FFT. The kernel is even, so its transfer
    function is real and A is symmetric: ``adjoint`` is A itself."""

    def __init__(self, size: int = SIZE, sigma: float = SIGMA):
        super().__init__()
        tf = torch.fft.rfft2(gaussian_kernel(size, sigma)).real  # real: the kernel is even
        self.register_buffer("tf", tf.float())
        self.size = size

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        s = (u.shape[-2], u.shape[-1])
        return torch.fft.irfft2(torch.fft.rfft2(u) * self.tf.to(u.dtype), s=s)

    adjoint = forward

    def normal_solve(self, r: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(A^T A + b I)^{-1} r by FFT."""
        s = (r.shape[-2], r.shape[-1])
        tf = self.tf.to(r.dtype)
        return torch.fft.irfft2(torch.fft.rfft2(r) / (tf * tf + b), s=s)


def make_data(n: int, *, seed: int = 0, noise: float = NOISE) -> Tuple[torch.Tensor, torch.Tensor]:
    """(blurred noisy x, clean y), both (n, 1, 32, 32); deterministic in seed."""
    y = make_images(n, seed=seed)
    g = torch.Generator().manual_seed(seed + 10_000)
    with torch.no_grad():
        x = Blur()(y) + noise * torch.randn(y.shape, generator=g)
    return x, y


# ----------------------------------------------------------------------------------------
# model


class Denoiser(nn.Module):
    """D(z) = z - R(z), R: conv3x3(1->c) ReLU conv3x3(c->c) ReLU conv3x3(c->1), circular padding."""

    def __init__(self, channels: int = 16):
        super().__init__()
        kw = dict(kernel_size=3, padding=1, padding_mode="circular")
        self.R = nn.Sequential(nn.Conv2d(1, channels, **kw), nn.ReLU(), nn.Conv2d(channels, channels, **kw),
                               nn.ReLU(), nn.Conv2d(channels, 1, **kw))
        with torch.no_grad():  # start close to D = identity
            self.R[-1].weight.mul_(0.1)
            self.R[-1].bias.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z - self.R(z)


def _inv_softplus(v: float) -> float:
    return math.log(math.expm1(v))


class DeblurG(nn.Module):
    """G(y, x) for ``variant`` "pgd" (gamma learned) or "hqs" (b learned)."""

    def __init__(self, variant: str = "pgd", channels: int = 16):
        super().__init__()
        if variant not in ("pgd", "hqs"):
            raise ValueError(f"variant must be 'pgd' or 'hqs', got {variant!r}")
        self.variant = variant
        self.A = Blur()
        self.D = Denoiser(channels)
        # gamma (PGD step) starts at 1.0 (||A||=1, so the data step is non-expansive);
        # b (HQS penalty) starts at 0.1.
        self.raw = nn.Parameter(torch.tensor(_inv_softplus(1.0 if variant == "pgd" else 0.1)))

    @property
    def coef(self) -> torch.Tensor:
        return F.softplus(self.raw)

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        c = self.coef.to(y.dtype)
        if self.variant == "pgd":
            v = y - c * self.A.adjoint(self.A(y) - x)
        else:
            v = self.A.normal_solve(self.A.adjoint(x) + c * y, c)
        return self.D(v)


# ----------------------------------------------------------------------------------------
# reproduce


SETTINGS = {
    # name: n_train, n_test, steps, batch, lr
    "default": dict(n_train=1024, n_test=64, steps=1200, batch=16, lr=2e-3),
    "quick": dict(n_train=32, n_test=2, steps=6, batch=4, lr=2e-3),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser, "deblur")
    parser.add_argument("--variant", choices=("pgd", "hqs"), default="pgd",
                        help="PGD step (default) or half-quadratic splitting")


def _mse(pred, target):
    return F.mse_loss(pred, target)


def run(args: argparse.Namespace) -> int:
    cfg, out = common.start_run(args, SETTINGS)
    x_tr, y_tr = make_data(cfg["n_train"], seed=args.seed)
    x_te, y_te = make_data(cfg["n_test"], seed=args.seed + 1)
    G = DeblurG(args.variant)
    ts = common.EVAL_TS
    t_range = (5, 60) if not args.quick else (2, 6)
    meta = {"variant": args.variant, "seed": args.seed, "t_range": list(t_range), **cfg}

    def train_fn():
        return common.train(G, _mse, x_tr, y_tr, z0_fn=torch.zeros_like, steps=cfg["steps"], batch=cfg["batch"],
                            lr=cfg["lr"], t_range=t_range, k_grad=3, seed=args.seed, desc=f"deblur-{args.variant}")

    info = common.load_or_train(out / f"deblur_{args.variant}.pt", G, train_fn, args.retrain, meta)
    G.eval()
    # Probe x + eps * A d with d a unit Fourier mode; float64 since ||A d|| is small at high frequency.
    Gd = DeblurG(args.variant).double()
    Gd.load_state_dict(G.state_dict())
    Gd.eval()
    with torch.no_grad():
        d = fourier_directions((1, SIZE, SIZE), common.FREQUENCIES, dtype=torch.float64)
        directions = Gd.A(d)
        blurred_psnr = float(psnr(x_te.double(), y_te.double()))
    curve = common.evaluate(Gd, x_te.double(), y_te.double(), psnr, z0=torch.zeros_like(x_te.double()),
                            directions=directions, ts=ts, metric_name="PSNR (dB)", dtype=torch.float64)
    print(f"\ndeblur ({args.variant}), {cfg['n_test']} held-out images, blurred input PSNR {blurred_psnr:.2f} dB, "
          f"learned {'gamma' if args.variant == 'pgd' else 'b'} = {float(G.coef.detach()):.4g}")
    extra = {"variant": args.variant, "quick": bool(args.quick), "blurred_psnr": blurred_psnr,
             "n_train": cfg["n_train"], "n_test": cfg["n_test"], "steps": cfg["steps"],
             "coef": float(G.coef.detach()), "seed": args.seed, **info}
    common.report(out, "deblur", curve, title=f"deblurring ({args.variant}): L_t and PSNR vs t "
                  f"(blurred input {blurred_psnr:.1f} dB)", extra=extra)
    return 0
