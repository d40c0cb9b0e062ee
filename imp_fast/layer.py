"""ImplicitLayer: a fixed-point layer z* = G(z*, x) usable inside any nn.Module."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from .autograd import _NO_X, DEFAULTS, implicit_solve, validate_options
from .result import SolveResult
from .validation import check_int, check_positive, reject_unknown

__all__ = ["ImplicitLayer"]


class ImplicitLayer(nn.Module):
    """Deep-equilibrium layer: ``forward(x)`` returns the fixed point ``z* = G(z*, x)``.

    Args:
        G: the operator ``G(z, x) -> z'`` (``G(z)`` when forward gets no x). An
            ``nn.Module`` is registered as the submodule ``G``, so its parameters are
            this layer's (optimisers, ``.to()``, ``state_dict`` see them). Any other
            callable works too — a closure over modules, a bound method, a
            ``functools.partial`` — and every tensor it uses gets its gradient; only
            registration for optimisers is up to you then (``params=`` registers any
            ``nn.Parameter`` listed in it on the layer; it is otherwise deprecated).
        eval_max_iter, eval_tol: max_iter / tol used in eval mode (``layer.eval()``);
            None (default) keeps the training values. Test-time scaling: a larger
            ``eval_max_iter`` runs more iterations at inference only.
        warm_start: start each forward from the previous forward's fixed point when
            it has the shape, dtype and device of this forward's initial state (the
            ``z0`` passed, or ``zeros_like(x)``); otherwise from that initial state.
            Useful when consecutive inputs are close (time steps, fine-tuning on a
            fixed batch); ``reset_warm_start()`` forgets the stored point. The stored
            point is detached: it carries no gradient.
        **options: any keyword option of :func:`imp_fast.autograd.implicit_solve`
            (method, max_iter, tol, stop, m, beta, lam, check_every, backend, batched,
            return_best, compact, backward, b_method, b_max_iter, b_tol, phantom_k,
            phantom_damping, on_adjoint_failure, jac_reg, jac_reg_samples,
            return_result, params); checked here, at construction.

    ``forward(x=None, z0=None)`` returns z* (``(z*, result)`` when
    ``return_result=True``). x may be a tensor or any pytree of tensors; z0 defaults
    to ``zeros_like(x)`` and is required when the state's shape differs from x's or x
    is not a tensor. z0 is an initial guess only (reusing the previous output without
    detaching it is fine: it carries no gradient, except with backward="unroll"). The
    latest forward's :class:`SolveResult` is kept in ``last_result`` for monitoring
    (with "ift", ``last_result.extras["adjoint"]`` after backward; with
    ``jac_reg=True``, ``last_result.jac_loss``, also available as :attr:`jac_loss`).
    """

    def __init__(
        self,
        G: Callable[..., torch.Tensor],
        *,
        eval_max_iter: Optional[int] = None,
        eval_tol: Optional[float] = None,
        warm_start: bool = False,
        **options,
    ):
        super().__init__()
        if not callable(G):
            raise TypeError(f"G must be callable as G(z, x), got {type(G).__name__}")
        unknown = {k: v for k, v in options.items() if k not in DEFAULTS}
        reject_unknown("ImplicitLayer", unknown, tuple(DEFAULTS) + ("eval_max_iter", "eval_tol", "warm_start"))
        extra = options.pop("params", None)
        self.options = validate_options("ImplicitLayer", options)
        self.eval_max_iter = check_int("eval_max_iter", eval_max_iter, minimum=1, allow_none=True)
        self.eval_tol = None if eval_tol is None else check_positive("eval_tol", eval_tol)
        if not isinstance(warm_start, bool):
            raise TypeError(f"warm_start must be a bool, got {type(warm_start).__name__}")
        self.warm_start = warm_start
        self._warm: Optional[torch.Tensor] = None
        if isinstance(G, nn.Module):
            self.G = G
        else:
            self._G_fn = G  # a plain function: not a submodule
        if extra is not None:
            registered = [p for p in validate_options("ImplicitLayer", {"params": extra})["params"]
                          if isinstance(p, nn.Parameter)]
            if registered:
                self.extra_params = nn.ParameterList(registered)
        self.last_result: Optional[SolveResult] = None

    @property
    def operator(self) -> Callable:
        """The G this layer solves for (the submodule, or the plain function)."""
        return self.G if "G" in self._modules else self._G_fn

    @property
    def jac_loss(self) -> Optional[torch.Tensor]:
        """The latest forward's Jacobian-regulariser estimate (``jac_reg=True``), or None."""
        return None if self.last_result is None else self.last_result.jac_loss

    def reset_warm_start(self) -> None:
        """Forget the stored fixed point: the next forward starts from its z0."""
        self._warm = None

    def solve_options(self) -> dict:
        """The options the next forward will use (depends on train/eval mode)."""
        o = dict(self.options)
        o.pop("params", None)
        if not self.training:
            if self.eval_max_iter is not None:
                o["max_iter"] = self.eval_max_iter
            if self.eval_tol is not None:
                o["tol"] = self.eval_tol
        return o

    def forward(self, x: Any = _NO_X, z0: Optional[torch.Tensor] = None):
        o = self.solve_options()
        want_result = o.pop("return_result")
        if self.warm_start and self._warm is not None:
            template = z0 if z0 is not None else (x if isinstance(x, torch.Tensor) else None)
            w = self._warm
            if template is not None and (w.shape, w.dtype, w.device) == (template.shape, template.dtype, template.device):
                z0 = w
        z, result = implicit_solve(self.operator, x, z0, return_result=True, **o)
        self.last_result = result
        if self.warm_start:
            self._warm = result.z.detach()
        return (z, result) if want_result else z

    def extra_repr(self) -> str:
        o = self.options
        keys = ["method", "max_iter", "tol", "stop", "backward"]
        if o["m"] is not None:
            keys.append("m")
        if o["beta"] != 1.0:
            keys.append("beta")
        if o["backward"] == "phantom":
            keys += ["phantom_k", "phantom_damping"]
        keys += [k for k in ("b_method", "b_max_iter", "b_tol") if o[k] is not None]
        keys += [k for k in ("batched", "return_best", "compact", "jac_reg") if o[k] != DEFAULTS[k]]
        if o["backend"] != DEFAULTS["backend"]:
            keys.append("backend")
        parts = [f"{k}={o[k]!r}" for k in keys]
        if self.eval_max_iter is not None:
            parts.append(f"eval_max_iter={self.eval_max_iter}")
        if self.eval_tol is not None:
            parts.append(f"eval_tol={self.eval_tol!r}")
        if self.warm_start:
            parts.append("warm_start=True")
        if "G" not in self._modules:
            parts.append(f"G={getattr(self._G_fn, '__name__', type(self._G_fn).__name__)}")
        return ", ".join(parts)
