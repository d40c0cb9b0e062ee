"""Lipschitz probes: the paper's empirical L_t of x -> y_t(x), and the contraction of G in y.

* :func:`lipschitz_trace` runs y_t = G(y_{t-1}, x) on the inputs x and on P perturbed
  copies x + eps d_p, all stacked in ONE batch, and records at every t, on the device
  inside the loop, the finite-difference ratios
  ``||r(y_t(x + eps d)) - r(y_t(x))|| / ||eps d||`` (r = a readout, default identity)
  together with the fixed-point residual ``||G(y_t, x) - y_t||``.
* :func:`fourier_directions` builds unit-norm real Fourier-mode probe directions for
  2-D fields at radial-frequency percentiles (the paper's deblurring probe).
* :func:`contraction_estimate` estimates the per-sample spectral norm of dG/dz by power
  iteration on J^T J with Jacobian-vector products (mu(x) in the paper: how close G is
  to losing contraction).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch

from .backends import get_backend
from .backends import reference as _ref
from .loop import run_loop
from .result import Status
from .state import LoopState, StepParams, compute_dtype
from .validation import (
    SUPPORTED_DTYPES,
    check_choice,
    check_int,
    check_positive,
    check_tensor,
    reject_unknown,
)

__all__ = ["LipschitzTrace", "lipschitz_trace", "fourier_directions", "contraction_estimate"]

PROBE_METHODS = ("picard", "anderson")
REDUCTIONS = ("max", "mean")
_TRACE_OPTIONS = (
    "directions", "n_probes", "eps", "t_max", "z0", "method", "beta", "m", "lam", "readout",
    "reduce", "dtype", "generator", "backend",
)


@dataclass
class LipschitzTrace:
    """What :func:`lipschitz_trace` returns (tensors on the probe's device).

    t:        (t_max,) int64, the iteration counts 1..t_max.
    L:        (t_max,) L_t, the ratios reduced by ``reduce`` over samples and directions.
    ratios:   (t_max, B, P) ||r(y_t(x + eps d_p)) - r(y_t(x))|| / ||eps d_p|| per sample b
              and direction p (NaN where an iterate of the pair went non-finite).
    residual: (t_max, B) fixed-point residual ||G(y_t, x) - y_t|| of the unperturbed samples.
    y:        the unperturbed final iterate y_{t_max}, shaped like the state (B, ...).
    eps, reduce, method: the settings used; backend: the backend whose steps and
              pair-ratio op ran ("reference", "cpp" or "triton").
    """

    t: torch.Tensor
    L: torch.Tensor
    ratios: torch.Tensor
    residual: torch.Tensor
    y: torch.Tensor
    eps: float
    reduce: str
    method: str
    backend: str = "reference"

    def L_at(self, t: int) -> float:
        """L_t at one iteration count t (1-based), as a Python float."""
        t = check_int("t", t, minimum=1)
        if t > self.L.shape[0]:
            raise ValueError(f"t must be <= t_max = {self.L.shape[0]}, got {t}")
        return float(self.L[t - 1])


# ----------------------------------------------------------------------------------------
# argument handling


def _check_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype) or dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"dtype must be None or one of {', '.join(str(d) for d in SUPPORTED_DTYPES)}, got {dtype!r}"
        )
    return dtype


def _check_generator(generator) -> Optional[torch.Generator]:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _check_callable(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    return value


def _random_directions(x: torch.Tensor, P: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """P random unit directions shared by every sample: (P, *x.shape[1:])."""
    shape = (P,) + tuple(x.shape[1:])
    gen_dev = generator.device if generator is not None else x.device
    d = torch.randn(shape, generator=generator, device=gen_dev, dtype=torch.float64)
    d = d / torch.linalg.vector_norm(d.reshape(P, -1), dim=1).reshape((P,) + (1,) * (d.dim() - 1))
    return d.to(device=x.device, dtype=x.dtype)


def _perturbations(x: torch.Tensor, directions, n_probes: int, eps: float, generator) -> torch.Tensor:
    """eps * d as a (P, *x.shape) tensor in x's dtype/device."""
    if directions is None:
        d = _random_directions(x, n_probes, generator)
    else:
        check_tensor("directions", directions)
        shared = tuple(directions.shape[1:]) == tuple(x.shape[1:]) and directions.dim() == x.dim()
        per_sample = tuple(directions.shape[1:]) == tuple(x.shape) and directions.dim() == x.dim() + 1
        if not (shared or per_sample):
            raise ValueError(
                f"directions must have shape (P, *x.shape[1:]) = (P, {', '.join(map(str, x.shape[1:]))}) "
                f"(one set for all samples) or (P, *x.shape) = (P, {', '.join(map(str, x.shape))}) "
                f"(per sample), got {tuple(directions.shape)}"
            )
        if directions.device != x.device:
            raise ValueError(f"directions are on {directions.device}, expected x's device {x.device}")
        d = directions.to(x.dtype)
        nrm = torch.linalg.vector_norm(d.reshape(d.shape[0], -1), dim=1)
        if not bool(torch.isfinite(d).all()) or bool((nrm == 0).any()):
            raise ValueError("directions must be finite and nonzero (each direction needs a positive norm)")
    step = eps * d
    if step.dim() == x.dim():
        step = step.unsqueeze(1).expand((step.shape[0],) + tuple(x.shape))
    return step


def _warn_small_perturbation(x: torch.Tensor, dx: torch.Tensor) -> None:
    """Warn when ||x' - x|| / ||x|| is so small that rounding in x's dtype dominates."""
    cdt = compute_dtype(x.dtype)
    fin = torch.finfo(x.dtype)
    threshold = min(1e4 * fin.eps, 0.1)  # float32: ~1.2e-3; float64: ~2e-12
    B = x.shape[0]
    xn = torch.linalg.vector_norm(x.reshape(B, -1), dim=1, dtype=cdt)
    dn = torch.linalg.vector_norm(dx.reshape(dx.shape[0], B, -1), dim=2, dtype=cdt)  # (P, B)
    rel = dn / xn
    rel = torch.where(xn > 0, rel, torch.full_like(rel, float("inf")))
    smallest = float(rel.min())
    if smallest < threshold:
        warnings.warn(
            f"lipschitz_trace: the perturbation eps*||d|| is only {smallest:.2e} of ||x|| for some "
            f"sample/direction; in {x.dtype} (machine eps {fin.eps:.1e}) rounding noise then dominates the "
            f"finite-difference ratio. Use a larger eps (>= 0.05 relative to the input scale) or "
            f"dtype=torch.float64 for the probe.",
            UserWarning,
            stacklevel=4,  # _warn_small_perturbation <- _run_trace <- public function <- caller
        )


# ----------------------------------------------------------------------------------------
# the probe loop (shared with imp_fast.scaling)


def _run_trace(
    G, x, *, directions, n_probes, eps, t_max, z0, method, beta, m, lam, readout, reduce, dtype,
    generator, backend: str = "auto", keep: Sequence[int] = (), func: str = "lipschitz_trace",
) -> Tuple[LipschitzTrace, Dict[int, torch.Tensor]]:
    _check_callable("G", G)
    check_tensor("x", x)
    n_probes = check_int("n_probes", n_probes, minimum=1)
    eps = check_positive("eps", eps)
    t_max = check_int("t_max", t_max, minimum=1)
    check_choice("method", method, PROBE_METHODS)
    beta = check_positive("beta", beta)
    if beta >= 2.0:
        raise ValueError(f"beta must be in (0, 2), got {beta!r}")
    m = check_int("m", m, minimum=1)
    lam = check_positive("lam", lam, allow_zero=True)
    readout = _check_callable("readout", readout, allow_none=True)
    check_choice("reduce", reduce, REDUCTIONS)
    dtype = _check_dtype(dtype)
    generator = _check_generator(generator)
    impl = get_backend(backend, x.device)  # the solve's backends, "auto" as in solve
    if z0 is not None:
        check_tensor("z0", z0)
        if z0.shape[0] != x.shape[0]:
            raise ValueError(f"z0 must have x's batch size {x.shape[0]} on dim 0, got shape {tuple(z0.shape)}")
        if z0.device != x.device:
            raise ValueError(f"z0 is on {z0.device}, expected x's device {x.device}")

    with torch.no_grad():
        x = x.detach()
        if dtype is not None:
            x = x.to(dtype)
        B = x.shape[0]
        step = _perturbations(x, directions, n_probes, eps, generator)  # (P, B, ...)
        P = step.shape[0]
        xs = torch.cat([x.unsqueeze(0), x.unsqueeze(0) + step], dim=0)  # (1+P, B, ...)
        # The realised perturbation after rounding in the probe dtype: the ratio's denominator.
        dx = xs[1:] - xs[:1]
        _warn_small_perturbation(x, dx)
        cdt = compute_dtype(x.dtype)
        dnorm = torch.linalg.vector_norm(dx.reshape(P, B, -1), dim=2, dtype=cdt)  # (P, B)
        if bool((dnorm == 0).any()):
            raise ValueError(
                f"eps={eps} is so small that x + eps*d rounds to x in {x.dtype}; use a larger eps or "
                f"dtype=torch.float64"
            )
        xs = xs.reshape((B * (1 + P),) + tuple(x.shape[1:]))

        z0_missing = z0 is None
        if z0 is None:
            z0 = torch.zeros_like(x)
        else:
            z0 = z0.detach().to(x.dtype)
        state_shape = tuple(z0.shape[1:])
        NB = B * (1 + P)
        shape = (NB,) + state_shape
        zs = z0.unsqueeze(0).expand((1 + P,) + tuple(z0.shape)).reshape(shape)
        dev = x.device
        ratios = torch.empty(t_max, B, P, dtype=cdt, device=dev)
        residual = torch.empty(t_max, B, dtype=cdt, device=dev)
        keep_set = set(int(t) for t in keep)
        kept: Dict[int, torch.Tensor] = {}
        pair_ratios = impl.pair_ratios or _ref.pair_ratios

        def call_G(z: torch.Tensor) -> torch.Tensor:
            fz = G(z, xs)
            if not isinstance(fz, torch.Tensor):
                raise TypeError(f"G must return a torch.Tensor, got {type(fz).__name__}")
            if tuple(fz.shape) != shape:
                hint = (
                    "; the state's shape differs from x's, so pass z0 with the state's shape"
                    if z0_missing else ""
                )
                raise ValueError(
                    f"G returned shape {tuple(fz.shape)}, expected the state shape {shape} "
                    f"(B*(1+P) = {B}*{1 + P} stacked samples){hint}"
                )
            if fz.dtype != z.dtype:
                raise TypeError(
                    f"G returned dtype {fz.dtype}, expected the probe dtype {z.dtype} "
                    f"(with dtype=..., G must accept and return that dtype, e.g. a module cast by .double())"
                )
            return fz

        final: Dict[str, torch.Tensor] = {}

        def on_step(k: int, st: LoopState) -> None:
            # After step k: st.z = y_{k+1}; st.abs_res = ||G(y_k) - y_k||, free from the step.
            if k > 0:
                residual[k - 1].copy_(st.abs_res[:B])
            if k == t_max:  # the extra step only gave the residual of y_t_max
                return
            y = st.z.view(shape)
            if readout is None:
                r = y
            else:
                r = readout(y)
                if not isinstance(r, torch.Tensor) or r.dim() < 1 or r.shape[0] != NB:
                    got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
                    raise ValueError(
                        f"readout must return a tensor with the batch ({NB} stacked samples) on dim 0, got {got}"
                    )
            # One fused pass over the stacked batch: the P pair distances of every sample.
            pair_ratios(r.reshape(NB, -1).contiguous(), dnorm, st.status, ratios[k])
            if (k + 1) in keep_set:
                kept[k + 1] = r.reshape((1 + P, B) + tuple(r.shape[1:]))[0].clone()
            if k == t_max - 1:
                final["y"] = st.z[:B].clone()
                final["status"] = st.status.clone()

        # tol=0 and divergence=inf: no sample freezes unless it turns non-finite (or
        # reaches an exact fixed point, where freezing changes nothing). No host sync.
        # t_max + 1 steps: the last one only measures ||G(y_t_max) - y_t_max|| (its G
        # evaluation is needed anyway; the step itself is cheap next to G).
        params = StepParams(tol=0.0, beta=beta, stop_rel=False, divergence=math.inf, eps=1e-9, lam=lam)
        run_loop(
            call_G, zs, impl=impl, params=params, method=method, m=m, max_iter=t_max + 1, check_every=None,
            on_step=on_step,
        )
        y = final["y"]

        n_bad = int((final["status"] == int(Status.NONFINITE)).sum())
        if n_bad:
            warnings.warn(
                f"{func}: {n_bad} of {NB} stacked samples became non-finite (G returned NaN/Inf); "
                f"their ratios are NaN from then on",
                RuntimeWarning,
                stacklevel=3,
            )
        flat = ratios.reshape(t_max, B * P)
        L = flat.amax(dim=1) if reduce == "max" else flat.mean(dim=1)
        trace = LipschitzTrace(
            t=torch.arange(1, t_max + 1, device=dev),
            L=L,
            ratios=ratios,
            residual=residual,
            y=y[:B].reshape((B,) + state_shape).clone(),
            eps=eps,
            reduce=reduce,
            method=method,
            backend=impl.name,
        )
    return trace, kept


def lipschitz_trace(
    G: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    directions: Optional[torch.Tensor] = None,
    n_probes: int = 4,
    eps: float = 0.05,
    t_max: int = 50,
    z0: Optional[torch.Tensor] = None,
    method: str = "picard",
    beta: float = 1.0,
    m: int = 5,
    lam: float = 1e-4,
    readout: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    reduce: str = "max",
    dtype: Optional[torch.dtype] = None,
    generator: Optional[torch.Generator] = None,
    backend: str = "auto",
    **unknown,
) -> LipschitzTrace:
    """Empirical Lipschitz constant L_t of x -> r(y_t(x)) for t = 1..t_max, in one run.

    The inputs x (B samples) and the P perturbed inputs x + eps*d_p are stacked into one
    batch of B*(1+P) samples (order: all of x, then x + eps*d_1, ...), and
    y_t = G(y_{t-1}, x) is iterated from y_0 = z0 on that batch. After every step the
    ratio ``||r(y_t(x + eps d)) - r(y_t(x))|| / ||eps d||`` is computed on the device
    (one pair difference per iteration, no host sync inside the loop); norms are per
    sample, L2 over all non-batch dims, in float32 or wider. The denominator is the
    perturbation actually realised in the probe dtype, ``(x + eps d) - x``.

    Args:
        G: ``G(z, x) -> z'`` with z's shape, dtype and device; called on the whole stacked
            batch. Samples must be treated independently (no batch-coupled ops such as
            BatchNorm in training mode).
        x: inputs, batch on dim 0.
        directions: probe directions, shape ``(P, *x.shape[1:])`` (the same P directions
            for every sample) or ``(P, *x.shape)`` (per sample); used as given (not
            normalised): the perturbation is ``eps * d``. Default: ``n_probes`` random
            unit directions drawn from ``generator``, shared by all samples (so a sample's
            numbers do not depend on the rest of the batch).
        n_probes: number of random directions when ``directions`` is None.
        eps: perturbation scale. Too small a perturbation relative to ||x|| in float32
            makes the ratio rounding noise: a UserWarning says so (use eps >= 0.05
            relative to the input scale, or ``dtype=torch.float64``).
        t_max: iterations; L_t is recorded for t = 1..t_max.
        z0: initial state y_0, shape (B, *state). Default ``zeros_like(x)``; required
            when the state's shape differs from x's.
        method: "picard" (y <- (1-beta) y + beta G(y, x)) or "anderson" (imp_fast's
            type-II Anderson update with history ``m`` and ridge ``lam``, run with tol=0
            so no sample ever freezes; each stacked sample has its own mixing).
        beta: damping in (0, 2).
        m, lam: Anderson history size and ridge.
        readout: ``r(y)`` whose Lipschitz constant is measured (e.g. a decoder), applied
            to the stacked batch; default identity.
        reduce: "max" or "mean" of the ratios over samples and directions, giving L.
        dtype: run the probe in this dtype (x, z0 and the directions are cast to it; G and
            readout must accept it, e.g. a module cast with ``.double()``).
        generator: torch.Generator for the random directions.
        backend: "auto", "reference", "cpp" or "triton", as in :func:`imp_fast.solve`:
            the probe runs the solve's loop with that backend's fused Picard/Anderson
            step (tol=0, so no sample freezes) and its fused pair-ratio op ("auto": cpp
            on CPU, triton on CUDA). float64 probes run on cpp too.

    Returns:
        :class:`LipschitzTrace` with ``t``, ``L`` (t_max,), ``ratios`` (t_max, B, P),
        ``residual`` (t_max, B) = ||G(y_t, x) - y_t|| (t_max + 1 evaluations of G in all)
        and the final unperturbed ``y``. Runs under ``torch.no_grad()``.
    """
    reject_unknown("lipschitz_trace", unknown, _TRACE_OPTIONS)
    trace, _ = _run_trace(
        G, x, directions=directions, n_probes=n_probes, eps=eps, t_max=t_max, z0=z0, method=method,
        beta=beta, m=m, lam=lam, readout=readout, reduce=reduce, dtype=dtype, generator=generator,
        backend=backend,
    )
    return trace


# ----------------------------------------------------------------------------------------
# Fourier directions


def _radial_grid(H: int, W: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ky = torch.fft.fftfreq(H, d=1.0 / H, dtype=torch.float64)
    kx = torch.fft.fftfreq(W, d=1.0 / W, dtype=torch.float64)
    KY, KX = torch.meshgrid(ky, kx, indexing="ij")
    return KY, KX, torch.sqrt(KY ** 2 + KX ** 2)


def _check_k_max(k_max: Optional[float]) -> Optional[float]:
    if k_max is None:
        return None
    if isinstance(k_max, bool) or not isinstance(k_max, (int, float)) or not math.isfinite(k_max) or k_max < 1:
        raise ValueError(f"k_max must be None or a finite number >= 1 (the band's largest |k|), got {k_max!r}")
    return float(k_max)


def fourier_radii(H: int, W: int, frequencies: Iterable[float], *, k_max: Optional[float] = None) -> torch.Tensor:
    """The radial frequencies |k| (integer cycles per field) that :func:`fourier_directions`
    picks: for each percentile q, the entry at index round(q * (n - 1)) of the sorted |k|
    of the n nonzero modes of an H x W grid, or of those with |k| <= ``k_max`` when given
    (percentiles of a band, e.g. the band the inputs live in)."""
    k_max = _check_k_max(k_max)
    _, _, R = _radial_grid(H, W)
    r = R.flatten()
    keep = r > 0
    if k_max is not None:
        keep &= r <= k_max + 1e-9
    r = torch.sort(r[keep]).values
    n = r.numel()
    return torch.stack([r[int(round(q * (n - 1)))] for q in frequencies])


def fourier_directions(
    shape: Sequence[int],
    frequencies: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    *,
    k_max: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Unit-norm real 2-D Fourier modes, one per radial-frequency percentile.

    For fields of shape ``(..., H, W)``, percentile q picks a mode k = (k_y, k_x) whose
    |k| is the q-quantile of the |k| of all nonzero modes of the H x W grid (see
    :func:`fourier_radii`), and returns ``cos(2 pi (k_y i / H + k_x j / W))`` repeated
    over the leading dims and normalised to unit L2 norm over the whole ``shape``.

    ``k_max`` restricts the percentiles to the band 0 < |k| <= k_max: use it when the
    inputs are band-limited (a model never trained on modes outside the band has no
    reason to respond to them, so full-grid percentiles would probe only its noise floor).

    Returns:
        (P, *shape) tensor, P = len(frequencies), usable as ``directions`` of
        :func:`lipschitz_trace` (shape = x.shape[1:]).
    """
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (tuple, list)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise TypeError(f"shape must be a tuple of ints (..., H, W), got {shape!r}")
    shape = tuple(shape)
    if len(shape) < 2 or any(s < 1 for s in shape) or shape[-1] * shape[-2] < 2:
        raise ValueError(f"shape must be (..., H, W) with positive sizes and H*W >= 2, got {shape}")
    try:
        freqs = [float(q) for q in frequencies]
    except TypeError:
        raise TypeError(f"frequencies must be a sequence of numbers in [0, 1], got {frequencies!r}") from None
    if not freqs or any(not (0.0 <= q <= 1.0) or math.isnan(q) for q in freqs):
        raise ValueError(f"frequencies must be a non-empty sequence of percentiles in [0, 1], got {frequencies!r}")
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(str(d) for d in SUPPORTED_DTYPES)}, got {dtype!r}")
    H, W = shape[-2], shape[-1]
    KY, KX, R = _radial_grid(H, W)
    radii = fourier_radii(H, W, freqs, k_max=k_max)
    iy = torch.arange(H, dtype=torch.float64).view(H, 1)
    ix = torch.arange(W, dtype=torch.float64).view(1, W)
    out = []
    for rq in radii:
        # Deterministic choice among the modes on that ring: smallest |k_y|, then k_x >= 0.
        cand = torch.nonzero(torch.isclose(R, rq), as_tuple=False)
        best = min(cand.tolist(), key=lambda ij: (abs(KY[ij[0], ij[1]].item()), -KX[ij[0], ij[1]].item()))
        ky, kx = KY[best[0], best[1]].item(), KX[best[0], best[1]].item()
        mode = torch.cos(2 * math.pi * (ky * iy / H + kx * ix / W))
        full = mode.expand(shape)
        out.append(full / torch.linalg.vector_norm(full))
    return torch.stack(out).to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------
# contraction of G in z


def contraction_estimate(
    G: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    z: torch.Tensor,
    *,
    n_iter: int = 50,
    tol: float = 1e-6,
    finite_difference: bool = False,
    fd_eps: float = 1e-4,
    generator: Optional[torch.Generator] = None,
    **unknown,
) -> torch.Tensor:
    """Per-sample spectral norm ||dG/dz (z, x)||_2 by power iteration on J^T J.

    J v comes from ``torch.func.jvp`` (or, with ``finite_difference=True``, from
    ``(G(z + h v, x) - G(z, x)) / h`` with h = fd_eps, a cross-check that also works where
    forward-mode AD does not), J^T u from ``torch.func.vjp`` (linearised once). With a
    batched G the Jacobian is block diagonal across samples, so the iteration vectors
    are normalised per sample and each sample gets its own estimate. Stops when every
    sample's estimate changed by less than ``tol`` (relative) or after ``n_iter`` steps
    (one host sync per step). Values < 1 mean G contracts in z at (z, x).

    Returns:
        (B,) tensor (float32, or float64 for float64 z): ||J v|| for the final unit v,
        a lower bound on sigma_max that converges to it.
    """
    reject_unknown("contraction_estimate", unknown, ("n_iter", "tol", "finite_difference", "fd_eps", "generator"))
    _check_callable("G", G)
    check_tensor("x", x)
    check_tensor("z", z)
    if z.shape[0] != x.shape[0]:
        raise ValueError(f"z must have x's batch size {x.shape[0]} on dim 0, got shape {tuple(z.shape)}")
    n_iter = check_int("n_iter", n_iter, minimum=1)
    tol = check_positive("tol", tol, allow_zero=True)
    if not isinstance(finite_difference, bool):
        raise TypeError(f"finite_difference must be a bool, got {type(finite_difference).__name__}")
    fd_eps = check_positive("fd_eps", fd_eps)
    generator = _check_generator(generator)

    B = z.shape[0]
    cdt = compute_dtype(z.dtype)
    x = x.detach()
    z = z.detach()

    def f(zz: torch.Tensor) -> torch.Tensor:
        return G(zz, x)

    def pnorm(v: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(v.reshape(B, -1), dim=1, dtype=cdt)

    def unit(v: torch.Tensor) -> torch.Tensor:
        n = pnorm(v).clamp_min(torch.finfo(cdt).tiny)
        return (v.to(cdt) / n.view((B,) + (1,) * (v.dim() - 1))).to(z.dtype)

    with torch.no_grad():
        fz, vjp_fn = torch.func.vjp(f, z)
        if not isinstance(fz, torch.Tensor) or fz.shape != z.shape:
            got = tuple(fz.shape) if isinstance(fz, torch.Tensor) else type(fz).__name__
            raise ValueError(f"G must return z's shape {tuple(z.shape)}, got {got}")
        fz = fz.detach()
        gen_dev = generator.device if generator is not None else z.device
        v = unit(torch.randn(z.shape, generator=generator, device=gen_dev, dtype=cdt).to(z.device, z.dtype))
        sigma = torch.zeros(B, dtype=cdt, device=z.device)
        for _ in range(n_iter):
            if finite_difference:
                Jv = (f(z + fd_eps * v).detach() - fz) / fd_eps
            else:
                _, Jv = torch.func.jvp(f, (z,), (v,))
                Jv = Jv.detach()
            new_sigma = pnorm(Jv)
            (w,) = vjp_fn(Jv.to(fz.dtype))
            w = w.detach()
            converged = bool(((new_sigma - sigma).abs() <= tol * new_sigma.abs()).all())
            sigma = new_sigma
            if converged:
                break
            wn = pnorm(w)
            # A sample with J^T J v = 0 keeps its v (its sigma is 0).
            v = torch.where((wn > 0).view((B,) + (1,) * (z.dim() - 1)), unit(w), v)
    return sigma
