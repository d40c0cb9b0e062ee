"""ImplicitLayer: a fixed-point layer z* = G(z*, x) usable inside any nn.Module."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .autograd import DEFAULTS, implicit_solve, validate_options
from .result import SolveResult
from .validation import check_int, check_positive, reject_unknown

__all__ = ["ImplicitLayer"]


class ImplicitLayer(nn.Module):
    """Deep-equilibrium layer: ``forward(x)`` returns the fixed point ``z* = G(z*, x)``.

    Args:
        G: the operator ``G(z, x) -> z'``. An ``nn.Module`` is registered as the
            submodule ``G``, so its parameters are this layer's (optimisers, ``.to()``,
            ``state_dict`` see them). A plain callable is also accepted; pass the
            tensors it uses as ``params=[...]`` (any ``nn.Parameter`` among them is
            registered on the layer too).
        eval_max_iter, eval_tol: max_iter / tol used in eval mode (``layer.eval()``);
            None (default) keeps the training values. Test-time scaling: a larger
            ``eval_max_iter`` runs more iterations at inference only.
        **options: any keyword option of :func:`imp_fast.autograd.implicit_solve`
            (method, max_iter, tol, stop, m, beta, lam, check_every, backend, backward,
            b_method, b_max_iter, b_tol, phantom_k, phantom_damping,
            on_adjoint_failure, return_result, params); checked here, at construction.

    ``forward(x, z0=None)`` returns z* (``(z*, result)`` when ``return_result=True``).
    z0 defaults to ``zeros_like(x)``; pass it when the state's shape differs from x's.
    The latest forward's :class:`SolveResult` is kept in ``last_result`` for
    monitoring (with "ift", ``last_result.extras["adjoint"]`` after backward).
    """

    def __init__(
        self,
        G: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        eval_max_iter: Optional[int] = None,
        eval_tol: Optional[float] = None,
        **options,
    ):
        super().__init__()
        if not callable(G):
            raise TypeError(f"G must be callable as G(z, x), got {type(G).__name__}")
        unknown = {k: v for k, v in options.items() if k not in DEFAULTS}
        reject_unknown("ImplicitLayer", unknown, tuple(DEFAULTS) + ("eval_max_iter", "eval_tol"))
        self.options = validate_options("ImplicitLayer", options)
        self.eval_max_iter = check_int("eval_max_iter", eval_max_iter, minimum=1, allow_none=True)
        self.eval_tol = None if eval_tol is None else check_positive("eval_tol", eval_tol)
        if isinstance(G, nn.Module):
            self.G = G
        else:
            self._G_fn = G  # a plain function: not a submodule
        extra = self.options["params"] or ()
        registered = [p for p in extra if isinstance(p, nn.Parameter)]
        if registered:
            self.extra_params = nn.ParameterList(registered)
        self.last_result: Optional[SolveResult] = None

    @property
    def operator(self) -> Callable:
        """The G this layer solves for (the submodule, or the plain function)."""
        return self.G if "G" in self._modules else self._G_fn

    def solve_options(self) -> dict:
        """The options the next forward will use (depends on train/eval mode)."""
        o = dict(self.options)
        if not self.training:
            if self.eval_max_iter is not None:
                o["max_iter"] = self.eval_max_iter
            if self.eval_tol is not None:
                o["tol"] = self.eval_tol
        return o

    def forward(self, x: torch.Tensor, z0: Optional[torch.Tensor] = None):
        o = self.solve_options()
        want_result = o.pop("return_result")
        z, result = implicit_solve(self.operator, x, z0, return_result=True, **o)
        self.last_result = result
        return (z, result) if want_result else z

    def extra_repr(self) -> str:
        o = self.options
        keys = ["method", "max_iter", "tol", "stop", "backward"]
        if o["method"] == "anderson":
            keys.append("m")
        if o["beta"] != 1.0:
            keys.append("beta")
        if o["backward"] == "phantom":
            keys += ["phantom_k", "phantom_damping"]
        keys += [k for k in ("b_method", "b_max_iter", "b_tol") if o[k] is not None]
        if o["backend"] != DEFAULTS["backend"]:
            keys.append("backend")
        parts = [f"{k}={o[k]!r}" for k in keys]
        if self.eval_max_iter is not None:
            parts.append(f"eval_max_iter={self.eval_max_iter}")
        if self.eval_tol is not None:
            parts.append(f"eval_tol={self.eval_tol!r}")
        if "G" not in self._modules:
            parts.append(f"G={getattr(self._G_fn, '__name__', type(self._G_fn).__name__)}")
        return ", ".join(parts)
