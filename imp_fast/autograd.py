"""Implicit gradients: differentiate through a fixed point z* = G(z*, x).

:func:`implicit_solve` finds z* with the batched engine (:func:`imp_fast.solve`, no
graph) and attaches one of four gradients to it:

- ``"ift"`` (default): exact implicit-function-theorem gradient. Backward solves the
  adjoint fixed point ``u = J^T u + grad_out`` (``J = dG/dz`` at z*) with the same
  engine, using vector-Jacobian products of ONE re-evaluation of G at z*, then one more
  VJP gives the gradients for x and G's parameters. Memory does not depend on how many
  forward iterations were run: only z*, x (and the parameters' references) are kept.
- ``"jfb"``: Jacobian-free backprop, the gradient of one application of G at z*.
- ``"phantom"``: phantom gradient, backprop through k damped steps started at z*.
- ``"unroll"``: plain backprop through ``max_iter`` damped Picard steps (reference
  only: memory grows with ``max_iter``).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .loop import METHODS, solve
from .result import SolveError, SolveResult, Status
from .validation import check_choice, check_int, check_positive, check_tensor, reject_unknown

__all__ = [
    "implicit_solve",
    "BACKWARD_MODES",
    "AdjointError",
    "AdjointWarning",
]

BACKWARD_MODES = ("ift", "jfb", "phantom", "unroll")
ADJOINT_FAILURE = ("warn", "raise", "ignore")

# Keyword options of implicit_solve (besides G, x, z0): defaults. ImplicitLayer reuses it.
DEFAULTS = dict(
    method="anderson",
    max_iter=50,
    tol=1e-4,
    stop="rel",
    m=5,
    beta=1.0,
    lam=1e-4,
    check_every=5,
    backend="auto",
    backward="ift",
    b_method=None,
    b_max_iter=None,
    b_tol=None,
    phantom_k=5,
    phantom_damping=0.5,
    on_adjoint_failure="warn",
    return_result=False,
    params=None,
)


class AdjointWarning(RuntimeWarning):
    """The adjoint (backward) solve of an ``"ift"`` gradient did not converge."""


class AdjointError(SolveError):
    """Raised in backward with ``on_adjoint_failure="raise"``; ``.result`` is the adjoint solve."""

    def __init__(self, result: SolveResult):
        super().__init__(result)
        self.args = ("implicit_solve backward: adjoint " + self.args[0],)


def validate_options(func: str, options: dict) -> dict:
    """Check implicit_solve's keyword options; return them completed with defaults.

    Raises a TypeError/ValueError naming the argument at fault. Used by
    :func:`implicit_solve` and by :class:`imp_fast.layer.ImplicitLayer` (at construction,
    so mistakes surface before the first forward).
    """
    unknown = {k: v for k, v in options.items() if k not in DEFAULTS}
    reject_unknown(func, unknown, DEFAULTS)
    o = dict(DEFAULTS)
    o.update(options)
    check_choice("method", o["method"], METHODS)
    o["max_iter"] = check_int("max_iter", o["max_iter"], minimum=1)
    o["tol"] = check_positive("tol", o["tol"])
    check_choice("stop", o["stop"], ("rel", "abs"))
    o["m"] = check_int("m", o["m"], minimum=1)
    o["beta"] = check_positive("beta", o["beta"])
    if o["beta"] >= 2.0:
        raise ValueError(f"beta must be in (0, 2), got {o['beta']!r}")
    o["lam"] = check_positive("lam", o["lam"], allow_zero=True)
    o["check_every"] = check_int("check_every", o["check_every"], minimum=1, allow_none=True)
    if not isinstance(o["backend"], str):
        raise ValueError(f"backend must be 'auto', 'reference', 'cpp' or 'triton', got {o['backend']!r}")
    check_choice("backward", o["backward"], BACKWARD_MODES)
    if o["b_method"] is not None:
        check_choice("b_method", o["b_method"], METHODS)
    if o["b_max_iter"] is not None:
        o["b_max_iter"] = check_int("b_max_iter", o["b_max_iter"], minimum=1)
    if o["b_tol"] is not None:
        o["b_tol"] = check_positive("b_tol", o["b_tol"])
    o["phantom_k"] = check_int("phantom_k", o["phantom_k"], minimum=1)
    o["phantom_damping"] = check_positive("phantom_damping", o["phantom_damping"])
    if o["phantom_damping"] > 1.0:
        raise ValueError(f"phantom_damping must be in (0, 1], got {o['phantom_damping']!r}")
    check_choice("on_adjoint_failure", o["on_adjoint_failure"], ADJOINT_FAILURE)
    if not isinstance(o["return_result"], bool):
        raise TypeError(f"return_result must be a bool, got {type(o['return_result']).__name__}")
    if o["params"] is not None:
        o["params"] = _check_params(o["params"])
    return o


def _check_params(params: Any) -> Tuple[torch.Tensor, ...]:
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors (e.g. a list), not a single tensor; use params=[t]")
    try:
        items = tuple(params)
    except TypeError:
        raise TypeError(f"params must be an iterable of tensors, got {type(params).__name__}") from None
    for i, p in enumerate(items):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
    return items


def _collect_params(G: Callable, extra: Optional[Tuple[torch.Tensor, ...]]) -> List[torch.Tensor]:
    """G's parameters (if an nn.Module) plus ``params=``, deduplicated, requiring grad."""
    found: List[torch.Tensor] = []
    seen = set()
    if isinstance(G, nn.Module):
        found.extend(G.parameters())
    if extra:
        found.extend(extra)
    out = []
    for p in found:
        if id(p) not in seen and p.requires_grad:
            seen.add(id(p))
            out.append(p)
    return out


def implicit_solve(
    G: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    z0: Optional[torch.Tensor] = None,
    *,
    method: str = "anderson",
    max_iter: int = 50,
    tol: float = 1e-4,
    stop: str = "rel",
    m: int = 5,
    beta: float = 1.0,
    lam: float = 1e-4,
    check_every: Optional[int] = 5,
    backend: str = "auto",
    backward: str = "ift",
    b_method: Optional[str] = None,
    b_max_iter: Optional[int] = None,
    b_tol: Optional[float] = None,
    phantom_k: int = 5,
    phantom_damping: float = 0.5,
    on_adjoint_failure: str = "warn",
    return_result: bool = False,
    params: Optional[Iterable[torch.Tensor]] = None,
    **unknown,
):
    """Differentiable fixed point ``z* = G(z*, x)`` of a batch.

    Args:
        G: ``G(z, x) -> z'`` with ``z'`` shaped like ``z`` (same dtype and device). Batch
            on dim 0; samples must be treated independently. If G is an ``nn.Module``
            its parameters receive gradients.
        x: the input injected at every step (a tensor with a batch dim 0).
        z0: initial state. Defaults to ``zeros_like(x)``; the state may have a
            different shape from x (e.g. a hidden width), in which case z0 is required.
            z0 receives no gradient except with ``backward="unroll"``.

    Keyword options (forward solve, as in :func:`imp_fast.solve`):
        method ("anderson" | "picard"), max_iter (50), tol (1e-4), stop ("rel" |
        "abs"), m (5), beta (1.0), lam (1e-4), check_every (5), backend ("auto").

    Gradient options:
        backward: "ift" (exact implicit gradient, default), "jfb", "phantom" or
            "unroll" (see the module docstring).
        b_method, b_max_iter, b_tol: the adjoint solve's method / max_iter / tol for
            "ift"; None (default) uses the forward's. The adjoint also uses the
            forward's stop, m, beta, lam, check_every and backend.
        phantom_k (5), phantom_damping (0.5): "phantom" runs
            ``z <- (1-d) z + d G(z, x)`` k times with grad, from z*.
        on_adjoint_failure: "warn" (:class:`AdjointWarning`, default), "raise"
            (:class:`AdjointError`) or "ignore", when the adjoint solve of some sample
            did not converge.
        params: extra tensors G uses whose gradients are wanted with "ift" (an
            iterable of tensors). The "ift" gradient only reaches x, the parameters of
            G when G is an nn.Module, and these: tensors that a plain function G closes
            over cannot be discovered and get NO gradient unless listed here. (The other
            modes backprop through G directly, so every tensor G uses gets its gradient.)
        return_result: also return the forward :class:`SolveResult`. With "ift", after
            backward its ``extras["adjoint"]`` holds the adjoint solve's result.

    Notes:
        G is called many times in the forward solve (under ``no_grad``) and, with
        "ift", once more in backward to build the VJP graph at z*: it should be
        deterministic and free of side effects (no dropout, no BatchNorm running-stat
        updates). The "ift" gradient is computed once-differentiably: double backward
        (``create_graph=True``) through it is not supported. The "ift" gradient is exact
        at a fixed point; check ``result.ok`` (``return_result=True``) if the forward
        solve may stop short of tol.

    Returns:
        ``z`` (or ``(z, result)``). With "ift" z is z*. With "jfb" z is G(z*, x) and
        with "phantom" it is the k-th damped step from z*: both equal z* up to the
        solve's residual (one step away). With "unroll" z is the last of ``max_iter``
        damped Picard steps ``z <- (1-beta) z + beta G(z, x)`` from z0 (method, tol
        and check_every are ignored: no early stop; ``result`` reports its residual).
    """
    reject_unknown("implicit_solve", unknown, DEFAULTS)
    o = validate_options("implicit_solve", dict(
        method=method, max_iter=max_iter, tol=tol, stop=stop, m=m, beta=beta, lam=lam,
        check_every=check_every, backend=backend, backward=backward, b_method=b_method,
        b_max_iter=b_max_iter, b_tol=b_tol, phantom_k=phantom_k, phantom_damping=phantom_damping,
        on_adjoint_failure=on_adjoint_failure, return_result=return_result, params=params,
    ))
    if not callable(G):
        raise TypeError(f"G must be callable as G(z, x), got {type(G).__name__}")
    check_tensor("x", x)
    if z0 is None:
        z0 = torch.zeros_like(x)
        z0_default = True
    else:
        check_tensor("z0", z0)
        z0_default = False
        if z0.shape[0] != x.shape[0]:
            raise ValueError(
                f"z0 and x must have the same batch size (dim 0), got z0 {tuple(z0.shape)} and x {tuple(x.shape)}"
            )
        if z0.device != x.device:
            raise ValueError(f"z0 is on {z0.device} but x is on {x.device}; put them on the same device")

    def G_checked(z, xx):
        if z0_default:
            try:
                out = G(z, xx)
            except (RuntimeError, ValueError, IndexError) as exc:
                if hasattr(exc, "add_note"):  # Python >= 3.11
                    exc.add_note(
                        f"(imp_fast.implicit_solve: z0 defaulted to zeros_like(x), shape {tuple(z.shape)}; "
                        "if the state's shape differs from x's, pass z0)"
                    )
                raise
        else:
            out = G(z, xx)
        if isinstance(out, torch.Tensor) and out.shape != z.shape and z0_default:
            raise ValueError(
                f"G returned shape {tuple(out.shape)} but the state defaults to zeros_like(x) of shape "
                f"{tuple(z.shape)}; pass z0 with the state's shape when it differs from x's"
            )
        return out

    mode = o["backward"]
    fwd = dict(
        method=o["method"], max_iter=o["max_iter"], tol=o["tol"], stop=o["stop"], m=o["m"],
        beta=o["beta"], lam=o["lam"], check_every=o["check_every"], backend=o["backend"],
    )

    if mode == "unroll":
        z, result = _unroll(G_checked, x, z0, o)
    elif mode == "ift":
        params = _collect_params(G, o["params"])
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        if not needs_grad:
            result = solve(lambda z: G_checked(z, x), z0, **fwd)
            z = result.z
        else:
            bwd = dict(fwd)
            if o["b_method"] is not None:
                bwd["method"] = o["b_method"]
            if o["b_max_iter"] is not None:
                bwd["max_iter"] = o["b_max_iter"]
            if o["b_tol"] is not None:
                bwd["tol"] = o["b_tol"]
            spec = _Spec(G_checked, fwd, bwd, params, o["on_adjoint_failure"])
            z = _IFT.apply(spec, z0, x, *params)
            result = spec.result
    else:
        result = solve(lambda z: G_checked(z, x), z0, **fwd)
        zs = result.z.detach()
        if mode == "jfb":
            z = G_checked(zs, x)
        else:  # phantom
            d = o["phantom_damping"]
            z = zs
            for _ in range(o["phantom_k"]):
                gz = G_checked(z, x)
                z = gz if d == 1.0 else (1.0 - d) * z + d * gz
    return (z, result) if o["return_result"] else z


class _Spec:
    """Non-tensor state shared by _IFT's forward and backward."""

    __slots__ = ("G", "fwd", "bwd", "params", "on_failure", "result")

    def __init__(self, G, fwd, bwd, params, on_failure):
        self.G = G
        self.fwd = fwd
        self.bwd = bwd
        self.params = params  # the very tensors G uses (identity matters for autograd.grad)
        self.on_failure = on_failure
        self.result: Optional[SolveResult] = None


class _IFT(torch.autograd.Function):
    """z* = fixed point of G(., x); grads for (x, *params) by the adjoint fixed point."""

    @staticmethod
    def forward(ctx, spec: _Spec, z0: torch.Tensor, x: torch.Tensor, *params: torch.Tensor):
        G = spec.G
        res = solve(lambda z: G(z, x), z0, **spec.fwd)
        spec.result = res
        ctx.spec = spec
        ctx.save_for_backward(res.z, x)
        return res.z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z: torch.Tensor):
        spec: _Spec = ctx.spec
        z_star, x = ctx.saved_tensors
        need_x = ctx.needs_input_grad[2]
        need_p = ctx.needs_input_grad[3:]
        wrt_params = [p for p, n in zip(spec.params, need_p) if n]
        if not need_x and not wrt_params:
            return (None, None, None) + (None,) * len(spec.params)
        grad_z = grad_z.contiguous()
        with torch.enable_grad():
            z_req = z_star.detach().requires_grad_(True)
            x_req = x.detach().requires_grad_(need_x)
            fz = spec.G(z_req, x_req)

        def vjp_z(u: torch.Tensor) -> torch.Tensor:
            (g,) = torch.autograd.grad(fz, z_req, grad_outputs=u, retain_graph=True, allow_unused=True)
            return torch.zeros_like(u) if g is None else g

        # Adjoint fixed point u = J^T u + grad_z, started at grad_z (first Neumann term).
        adj = solve(lambda u: vjp_z(u) + grad_z, grad_z, **spec.bwd)
        if spec.result is not None:
            spec.result.extras["adjoint"] = adj
        _report_adjoint(adj, spec.on_failure)
        u = adj.z
        inputs = ([x_req] if need_x else []) + wrt_params
        grads = torch.autograd.grad(fz, inputs, grad_outputs=u, retain_graph=False, allow_unused=True)
        grads = list(grads)
        gx = grads.pop(0) if need_x else None
        if need_x and gx is None:
            gx = torch.zeros_like(x)
        out_p = []
        for p, n in zip(spec.params, need_p):
            if n:
                g = grads.pop(0)
                out_p.append(torch.zeros_like(p) if g is None else g)
            else:
                out_p.append(None)
        return (None, None, gx, *out_p)


def _report_adjoint(adj: SolveResult, on_failure: str) -> None:
    if on_failure == "ignore" or adj.ok:
        return
    if on_failure == "raise":
        raise AdjointError(adj)
    failed = (~adj.converged).nonzero().flatten().tolist()
    msgs = adj.messages()
    lines = [msgs[i] for i in failed[:5]] + ([f"... and {len(failed) - 5} more"] if len(failed) > 5 else [])
    warnings.warn(
        AdjointWarning(
            f"implicit_solve backward: adjoint {adj.method} solve did not converge for {len(failed)} of "
            f"{adj.status.numel()} samples (tol={adj.tol:g}, stop={adj.stop!r}; {adj.summary()}); the "
            "gradient is approximate. Raise b_max_iter / b_tol, or check that G is contractive in z.\n  "
            + "\n  ".join(lines)
        ),
        stacklevel=3,
    )


def _unroll(G: Callable, x: torch.Tensor, z0: torch.Tensor, o: dict) -> Tuple[torch.Tensor, SolveResult]:
    """max_iter damped Picard steps with the full graph; a SolveResult for the last one."""
    beta = o["beta"]
    z = z0
    for _ in range(o["max_iter"]):
        gz = G(z, x)
        z = gz if beta == 1.0 else (1.0 - beta) * z + beta * gz
    with torch.no_grad():
        B = z.shape[0]
        fz = G(z, x)
        cdt = torch.float64 if z.dtype == torch.float64 else torch.float32
        abs_r = (fz - z).reshape(B, -1).to(cdt).norm(dim=1)
        rel_r = abs_r / (fz.reshape(B, -1).to(cdt).norm(dim=1) + 1e-9)
        r = rel_r if o["stop"] == "rel" else abs_r
        status = torch.full((B,), int(Status.MAX_ITER), dtype=torch.int8, device=z.device)
        status[r < o["tol"]] = int(Status.CONVERGED)
        status[~torch.isfinite(r)] = int(Status.NONFINITE)
    result = SolveResult(
        z=z, status=status,
        n_iter=torch.full((B,), o["max_iter"], dtype=torch.int32, device=z.device),
        abs_residual=abs_r, rel_residual=rel_r, trace_abs=None, trace_rel=None,
        host_syncs=0, iterations=o["max_iter"], method="picard", backend="unroll",
        tol=o["tol"], stop=o["stop"],
    )
    return z, result
