"""Implicit gradients: differentiate through a fixed point z* = G(z*, x).

:func:`implicit_solve` finds z* with the batched engine (:func:`imp_fast.solve`, no
graph) and attaches one of four gradients to it:

- ``"ift"`` (default): exact implicit-function-theorem gradient. G is evaluated ONCE
  more at z* with the graph (``fz = G(z*, x)``); backward replaces the gradient
  arriving at z* by the adjoint fixed point ``u = J^T u + grad`` (``J = dG/dz`` at z*,
  solved with the same engine from vector-Jacobian products of that one graph), then
  lets ordinary autograd carry ``u`` through ``fz``'s graph. So the gradient reaches
  every tensor G's output depends on — module parameters, tensors a closure captures,
  every tensor in x — however G is written. Memory does not depend on how many forward
  iterations were run: only the one graph of G at z* is kept.
- ``"jfb"``: Jacobian-free backprop, the gradient of one application of G at z*.
- ``"phantom"``: phantom gradient, backprop through k damped steps started at z*.
- ``"unroll"``: plain backprop through ``max_iter`` damped Picard steps (reference
  only: memory grows with ``max_iter``).

Second-order gradients (``create_graph=True``): "jfb", "phantom" and "unroll" are
ordinary graphs and support them; "ift" raises a RuntimeError naming create_graph
rather than return a gradient that silently lacks its graph.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Optional, Tuple

import torch
from torch.utils._pytree import tree_leaves

from .loop import METHODS, _autocast_enabled, solve
from .result import SolveError, SolveResult, Status
from .validation import check_choice, check_int, check_positive, check_tensor, reject_unknown

__all__ = [
    "implicit_solve",
    "jacobian_frobenius_estimate",
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
    m=None,
    beta=1.0,
    lam=1e-4,
    check_every=5,
    backend="auto",
    batched=True,
    return_best=False,
    compact=False,
    backward="ift",
    b_method=None,
    b_max_iter=None,
    b_tol=None,
    phantom_k=5,
    phantom_damping=0.5,
    on_adjoint_failure="warn",
    jac_reg=False,
    jac_reg_samples=1,
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


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


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
    if not isinstance(o["tol"], torch.Tensor):  # a (B,) tensor: checked by solve
        o["tol"] = check_positive("tol", o["tol"])
    check_choice("stop", o["stop"], ("rel", "abs"))
    o["m"] = check_int("m", o["m"], minimum=1, allow_none=True)
    o["beta"] = check_positive("beta", o["beta"])
    if o["beta"] >= 2.0:
        raise ValueError(f"beta must be in (0, 2), got {o['beta']!r}")
    o["lam"] = check_positive("lam", o["lam"], allow_zero=True)
    o["check_every"] = check_int("check_every", o["check_every"], minimum=1, allow_none=True)
    if not isinstance(o["backend"], str):
        raise ValueError(f"backend must be 'auto', 'reference', 'cpp' or 'triton', got {o['backend']!r}")
    _check_bool("batched", o["batched"])
    _check_bool("return_best", o["return_best"])
    _check_bool("compact", o["compact"])
    if o["compact"] and (o["check_every"] is None or not o["batched"]):
        raise ValueError("compact=True needs check_every (an int) and batched=True")
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
    _check_bool("jac_reg", o["jac_reg"])
    o["jac_reg_samples"] = check_int("jac_reg_samples", o["jac_reg_samples"], minimum=1)
    _check_bool("return_result", o["return_result"])
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


_NO_X = object()  # implicit_solve(G, z0=...) without x: G is called as G(z)


def implicit_solve(
    G: Callable[..., torch.Tensor],
    x: Any = _NO_X,
    z0: Optional[torch.Tensor] = None,
    *,
    method: str = "anderson",
    max_iter: int = 50,
    tol: float = 1e-4,
    stop: str = "rel",
    m: Optional[int] = None,
    beta: float = 1.0,
    lam: float = 1e-4,
    check_every: Optional[int] = 5,
    backend: str = "auto",
    batched: bool = True,
    return_best: bool = False,
    compact: bool = False,
    backward: str = "ift",
    b_method: Optional[str] = None,
    b_max_iter: Optional[int] = None,
    b_tol: Optional[float] = None,
    phantom_k: int = 5,
    phantom_damping: float = 0.5,
    on_adjoint_failure: str = "warn",
    jac_reg: bool = False,
    jac_reg_samples: int = 1,
    return_result: bool = False,
    params: Optional[Iterable[torch.Tensor]] = None,
    **unknown,
):
    """Differentiable fixed point ``z* = G(z*, x)`` of a batch.

    Args:
        G: ``G(z, x) -> z'`` (or ``G(z)`` when x is omitted) with ``z'`` shaped like
            ``z``, same device and dtype (under ``torch.autocast`` a lower-precision
            dtype is cast back to the state's). Any callable: an ``nn.Module``, a
            closure over modules or tensors, a bound method, a ``functools.partial``.
            Gradients reach every tensor G's output depends on.
        x: the input injected at every step: a tensor, any pytree of tensors (tuple,
            list, dict — e.g. node features, an edge index and edge weights), or
            omitted / ``None``-free (then G is called as ``G(z)`` and z0 is required).
            Every tensor in it that requires grad receives its gradient.
        z0: initial guess of the state. Defaults to ``zeros_like(x)`` when x is a
            tensor; required otherwise, or when the state's shape differs from x's.
            It is only a starting point: it never receives a gradient and may be
            passed with a graph attached (e.g. the previous step's output) — except
            with ``backward="unroll"``, which differentiates through it.

    Keyword options (forward solve, as in :func:`imp_fast.solve`):
        method ("anderson" | "picard" | "broyden"), max_iter (50), tol (1e-4; or a (B,)
        tensor of per-sample tolerances, used by the adjoint solve too unless b_tol), stop
        ("rel" | "abs"), m (None: 5 for Anderson, min(max_iter, 30) for Broyden), beta
        (1.0), lam (1e-4), check_every (5), backend ("auto").
        batched (True): dim 0 holds independent samples, each with its own status
            and residual; ``False`` makes the whole tensor one problem (one residual,
            one status, one Anderson system) — use it when the state's rows are
            coupled (graph nodes x features with message passing across nodes).
        return_best (False): return each sample's lowest-residual iterate when the
            solve stops short of tol, as the DEQ codebases' solvers do.
        compact (False): active sets for the forward solve (see
            :func:`imp_fast.solve`): samples that converged leave the working set at
            each check, and G runs on the running rows of z and x only. Needs x to be
            one tensor batched on dim 0 and G to treat samples independently (not
            with BatchNorm-style batch statistics). The "ift" adjoint solve is
            compacted too: its VJPs come from the forward's graph of G while the whole
            batch runs, and from G evaluated again on the running rows (once per
            check that shrinks the working set) after that.

    Gradient options:
        backward: "ift" (exact implicit gradient, default), "jfb", "phantom" or
            "unroll" (see the module docstring).
        b_method, b_max_iter, b_tol: the adjoint solve's method / max_iter / tol for
            "ift"; None (default) uses the forward's. The adjoint also uses the
            forward's stop, m, beta, lam, check_every, batched and backend.
        phantom_k (5), phantom_damping (0.5): "phantom" runs
            ``z <- (1-d) z + d G(z, x)`` k times with grad, from z*.
        on_adjoint_failure: "warn" (:class:`AdjointWarning`, default), "raise"
            (:class:`AdjointError`) or "ignore", when the adjoint solve of some sample
            did not converge.
        jac_reg (False): also estimate the Jacobian regulariser of Bai et al. (2021),
            ``||dG/dz||_F^2 / D`` at z* averaged over the batch (the normalisation of
            torchdeq's ``jac_loss_estimate``), by Hutchinson's estimator with
            ``jac_reg_samples`` (1) Gaussian probe vectors. It is differentiable and
            returned in ``result.jac_loss`` (needs ``return_result=True``, or read it
            from ``ImplicitLayer.last_result``) for the caller to add to the loss with
            a weight. None when gradients are disabled.
        return_result: also return the forward :class:`SolveResult`. With "ift", after
            backward its ``extras["adjoint"]`` holds the adjoint solve's result.
        params: deprecated and no longer needed: every tensor G uses gets its
            gradient. Accepted (and checked) for backward compatibility.

    Notes:
        G is called many times in the forward solve (under ``no_grad``) and, when
        gradients are enabled, once more at z* with the graph: it should be
        deterministic and free of side effects (no dropout, no BatchNorm running-stat
        updates). The "ift" gradient is exact at a fixed point; check ``result.ok``
        (``return_result=True``) if the forward solve may stop short of tol. For
        inference wrap the call in ``torch.no_grad()``: then no graph is built.

    Returns:
        ``z`` (or ``(z, result)``). With "ift" z is z* (its gradient flows through
        ``G(z*, x)``). With "jfb" z is G(z*, x) and with "phantom" it is the k-th damped
        step from z*: both equal z* up to the solve's residual (one step away). With
        "unroll" z is the last of ``max_iter`` damped Picard steps ``z <- (1-beta) z +
        beta G(z, x)`` from z0 (method, tol and check_every are ignored: no early stop;
        ``result`` reports its residual).
    """
    reject_unknown("implicit_solve", unknown, DEFAULTS)
    o = validate_options("implicit_solve", dict(
        method=method, max_iter=max_iter, tol=tol, stop=stop, m=m, beta=beta, lam=lam,
        check_every=check_every, backend=backend, batched=batched, return_best=return_best,
        compact=compact, backward=backward, b_method=b_method, b_max_iter=b_max_iter, b_tol=b_tol,
        phantom_k=phantom_k, phantom_damping=phantom_damping, on_adjoint_failure=on_adjoint_failure,
        jac_reg=jac_reg, jac_reg_samples=jac_reg_samples, return_result=return_result, params=params,
    ))
    if o["params"] is not None:
        warnings.warn(
            "implicit_solve: params= is no longer needed (the gradient reaches every tensor G uses) "
            "and will be removed; it is ignored",
            DeprecationWarning,
            stacklevel=2,
        )
    if not callable(G):
        raise TypeError(f"G must be callable as G(z, x), got {type(G).__name__}")
    has_x = x is not _NO_X
    z0, z0_default = _initial_state(x if has_x else None, z0, has_x)
    call = _make_call(G, x, has_x, z0_default)

    mode = o["backward"]
    fwd = dict(
        method=o["method"], max_iter=o["max_iter"], tol=o["tol"], stop=o["stop"], m=o["m"],
        beta=o["beta"], lam=o["lam"], check_every=o["check_every"], backend=o["backend"],
        batched=o["batched"], return_best=o["return_best"],
    )
    grad_on = torch.is_grad_enabled()
    jac_loss = None
    if mode == "unroll":
        z, result = _unroll(call, z0, o)
        if grad_on and o["jac_reg"]:
            z_req = z.detach().requires_grad_(True)
            with torch.enable_grad():
                jac_loss = jacobian_frobenius_estimate(call(z_req), z_req, o["jac_reg_samples"], o["batched"])
    else:
        if o["compact"]:
            if not (isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == z0.shape[0]):
                raise ValueError(
                    "compact=True needs x to be one tensor batched on dim 0 like z0 (its rows are gathered "
                    "with z's); close over other inputs, or leave compact off"
                )
            call_x = _make_call(G, None, True, z0_default)  # G(z, x_rows) on the working rows
            result = solve(call_x, z0.detach(), args=(x.detach(),), compact=True, **fwd)
        else:
            result = solve(call, z0.detach(), **fwd)
        z_star = result.z
        if not grad_on:
            z = z_star
        elif mode == "ift":
            z_req = z_star.detach().requires_grad_(True)
            fz = call(z_req)  # the one graph of G at z*: adjoint VJPs and parameter grads
            if o["jac_reg"]:
                jac_loss = jacobian_frobenius_estimate(fz, z_req, o["jac_reg_samples"], o["batched"])
            bwd = dict(fwd, return_best=False)
            for key, name in (("method", "b_method"), ("max_iter", "b_max_iter"), ("tol", "b_tol")):
                if o[name] is not None:
                    bwd[key] = o[name]
            spec = _Adjoint(z_req, bwd, o["on_adjoint_failure"], result,
                            (call_x, x.detach()) if o["compact"] else None)
            z = _ImplicitGrad.apply(fz, z_star, spec)
        else:
            zs = z_star.detach()
            if o["jac_reg"]:
                zs = zs.requires_grad_(True)
            z = gz = call(zs)
            if o["jac_reg"]:
                jac_loss = jacobian_frobenius_estimate(gz, zs, o["jac_reg_samples"], o["batched"])
            if mode == "phantom":
                d = o["phantom_damping"]
                z = zs if d == 1.0 else zs.detach()
                for i in range(o["phantom_k"]):
                    gz = gz if i == 0 else call(z)
                    z = gz if d == 1.0 else (1.0 - d) * z + d * gz
    result.jac_loss = jac_loss
    return (z, result) if o["return_result"] else z


def _initial_state(x: Any, z0: Optional[torch.Tensor], has_x: bool) -> Tuple[torch.Tensor, bool]:
    """z0 checked against x, or zeros_like(x) when x is a tensor."""
    if has_x and x is None:
        raise TypeError("x must be a tensor or a pytree of tensors; omit it to call G(z) without an input")
    if has_x and not isinstance(x, torch.Tensor):
        leaves = tree_leaves(x)
        if not any(isinstance(t, torch.Tensor) for t in leaves):
            raise TypeError(
                f"x must be a torch.Tensor or a pytree (tuple/list/dict) of tensors, got {type(x).__name__} "
                "holding no tensor"
            )
    if z0 is None:
        if not has_x:
            raise TypeError("z0 is required when x is omitted (G is called as G(z))")
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"z0 is required when x is a {type(x).__name__} (a pytree): the state's shape cannot be "
                "inferred; pass z0, e.g. torch.zeros(batch, width)"
            )
        check_tensor("x", x)
        return torch.zeros_like(x, memory_format=torch.contiguous_format), True
    check_tensor("z0", z0)
    if isinstance(x, torch.Tensor):
        if x.dim() >= 1 and x.shape[0] != z0.shape[0]:
            raise ValueError(
                f"z0 and x must have the same batch size (dim 0), got z0 {tuple(z0.shape)} and x {tuple(x.shape)}"
            )
        if x.device != z0.device:
            raise ValueError(f"z0 is on {z0.device} but x is on {x.device}; put them on the same device")
    return z0, False


def _make_call(G: Callable, x: Any, has_x: bool, z0_default: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """z -> G(z, x) (or G(z)), with autocast outputs cast back and a hint about z0."""

    def call(z: torch.Tensor, *rows_of_x: torch.Tensor) -> torch.Tensor:
        try:
            out = G(z, *rows_of_x) if rows_of_x else (G(z, x) if has_x else G(z))
        except (RuntimeError, ValueError, IndexError) as exc:
            if z0_default and hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note(
                    f"(imp_fast.implicit_solve: z0 defaulted to zeros_like(x), shape {tuple(z.shape)}; "
                    "if the state's shape differs from x's, pass z0)"
                )
            raise
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"G must return a torch.Tensor, got {type(out).__name__}")
        if out.shape != z.shape:
            hint = (
                f"; the state defaults to zeros_like(x) of shape {tuple(z.shape)}: pass z0 with the state's "
                "shape when it differs from x's" if z0_default else ""
            )
            raise ValueError(f"G returned shape {tuple(out.shape)}, expected the state's shape {tuple(z.shape)}{hint}")
        if out.dtype != z.dtype and out.is_floating_point() and _autocast_enabled(z.device.type):
            out = out.to(z.dtype)  # autocast: G ran in lower precision; the state keeps its dtype
        return out

    return call


def jacobian_frobenius_estimate(
    fz: torch.Tensor, z: torch.Tensor, n_samples: int = 1, batched: bool = True
) -> torch.Tensor:
    """Hutchinson estimate of ``||dG/dz||_F^2 / D`` at z, averaged over the batch.

    ``fz = G(z)`` must have been computed with ``z.requires_grad``. For Gaussian v,
    ``E ||J^T v||^2 = ||J||_F^2``; the estimate is ``sum_b ||J_b^T v_b||^2 / (B D)``
    averaged over ``n_samples`` probes (torchdeq's ``jac_loss_estimate`` normalisation;
    with ``batched=False`` the whole tensor is one sample). Differentiable
    (``create_graph=True``): add ``weight * estimate`` to the loss to keep G
    contractive (Bai et al., "Stabilizing Equilibrium Models by Jacobian
    Regularization", 2021).
    """
    check_int("n_samples", n_samples, minimum=1)
    if not z.requires_grad or fz.grad_fn is None:
        raise ValueError("jacobian_frobenius_estimate: fz must be computed from z with z.requires_grad=True")
    total = fz.new_zeros((), dtype=torch.float64 if fz.dtype == torch.float64 else torch.float32)
    for _ in range(n_samples):
        v = torch.randn_like(fz)
        (vj,) = torch.autograd.grad(fz, z, v, retain_graph=True, create_graph=True)
        total = total + vj.float().pow(2).sum() if vj.dtype != torch.float64 else total + vj.pow(2).sum()
    return total / (n_samples * z.numel())


class _Adjoint:
    """What the backward of one "ift" solve needs besides the graph (no tensors that
    hold the output: see the cycle note in implicit_solve)."""

    __slots__ = ("z_req", "options", "on_failure", "result", "compact")

    def __init__(self, z_req: torch.Tensor, options: dict, on_failure: str, result: SolveResult,
                 compact: Optional[Tuple[Callable, torch.Tensor]] = None):
        self.z_req = z_req
        self.options = options
        self.on_failure = on_failure
        self.result = result
        self.compact = compact  # (G(z, x_rows), x) when the adjoint runs on active sets


class _ImplicitGrad(torch.autograd.Function):
    """Returns z* (the forward solution); backward turns the incoming gradient g into
    the adjoint fixed point u = J^T u + g and hands u to ``fz = G(z*, x)``, whose graph
    then delivers the parameter / input gradients by ordinary autograd."""

    @staticmethod
    def forward(ctx, fz: torch.Tensor, z_star: torch.Tensor, spec: _Adjoint):
        ctx.save_for_backward(fz)
        ctx.spec = spec
        # A fresh tensor: not result.z itself (result -> z -> this node -> spec -> result
        # would be a reference cycle holding the graph), and not a view (users may
        # modify the output in place).
        return z_star.clone(memory_format=torch.contiguous_format)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "implicit_solve(backward='ift') does not support create_graph=True (double backward, "
                "e.g. a gradient penalty): its adjoint solve is not differentiable, and returning a "
                "gradient without its graph would silently drop the penalty. Use backward='jfb', "
                "'phantom' or 'unroll' for second-order terms."
            )
        (fz,) = ctx.saved_tensors
        spec: _Adjoint = ctx.spec
        z_req = spec.z_req
        grad = grad.contiguous()

        def vjp(u: torch.Tensor) -> torch.Tensor:
            (g,) = torch.autograd.grad(fz, z_req, grad_outputs=u, retain_graph=True, allow_unused=True)
            return torch.zeros_like(u) if g is None else g

        # Adjoint fixed point u = J^T u + grad, started at grad (first Neumann term).
        if spec.compact is None:
            adj = solve(lambda u: vjp(u) + grad, grad, **spec.options)
        else:
            adj = solve(_compact_adjoint_f(spec, vjp), grad, args=(z_req.detach(), spec.compact[1], grad),
                        compact=True, **spec.options)
        spec.result.extras["adjoint"] = adj
        _report_adjoint(adj, spec.on_failure)
        return adj.z.to(fz.dtype), None, None


def _compact_adjoint_f(spec: _Adjoint, vjp: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """The adjoint map on active sets: ``f(u, z_rows, x_rows, g_rows) = J_rows^T u + g_rows``.

    While the working set is the whole batch, the rows are the very tensors passed in
    ``args`` and the forward's graph of G at z* gives the VJP. Once the solve gathers the
    running rows (at a check), G is evaluated again on those rows of z* and x with a graph,
    once per working set, and the VJPs come from that smaller graph: each sample's
    adjoint stops costing anything after it converged (G treats samples independently,
    as compact requires).
    """
    call_x, _ = spec.compact
    full_z = None
    cache: dict = {}

    def f(u: torch.Tensor, zs: torch.Tensor, xs: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
        nonlocal full_z
        if full_z is None:
            full_z = zs  # the first call sees the whole batch (args as passed)
        if zs is full_z:
            return vjp(u) + gs
        if cache.get("key") is not zs:
            with torch.enable_grad():
                zr = zs.detach().requires_grad_(True)
                cache.update(key=zs, z=zr, fz=call_x(zr, xs))
        (g,) = torch.autograd.grad(cache["fz"], cache["z"], grad_outputs=u, retain_graph=True, allow_unused=True)
        return gs if g is None else g + gs

    return f


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
            f"{adj.status.numel()} samples (tol={adj.tol_text()}, stop={adj.stop!r}; {adj.summary()}); the "
            "gradient is approximate. Raise b_max_iter / b_tol, or check that G is contractive in z.\n  "
            + "\n  ".join(lines)
        ),
        stacklevel=3,
    )


def _unroll(call: Callable, z0: torch.Tensor, o: dict) -> Tuple[torch.Tensor, SolveResult]:
    """max_iter damped Picard steps with the full graph; a SolveResult for the last one."""
    beta = o["beta"]
    z = z0
    for _ in range(o["max_iter"]):
        gz = call(z)
        z = gz if beta == 1.0 else (1.0 - beta) * z + beta * gz
    with torch.no_grad():
        B = z.shape[0] if o["batched"] else 1
        fz = call(z)
        cdt = torch.float64 if z.dtype == torch.float64 else torch.float32
        abs_r = (fz - z).reshape(B, -1).to(cdt).norm(dim=1)
        rel_r = abs_r / (fz.reshape(B, -1).to(cdt).norm(dim=1) + 1e-9)
        r = rel_r if o["stop"] == "rel" else abs_r
        status = torch.full((B,), int(Status.MAX_ITER), dtype=torch.int8, device=z.device)
        status[r < o["tol"]] = int(Status.CONVERGED)
        status[~torch.isfinite(r)] = int(Status.NONFINITE)
    result = SolveResult(
        z=z.detach(), status=status,
        n_iter=torch.full((B,), o["max_iter"], dtype=torch.int32, device=z.device),
        abs_residual=abs_r, rel_residual=rel_r, trace_abs=None, trace_rel=None,
        host_syncs=0, iterations=o["max_iter"], method="picard", backend="unroll",
        tol=o["tol"], stop=o["stop"],
    )
    return z, result
