"""imp_fast: fast, trustworthy batched fixed-point solves for implicit models.

Entry points:
    solve, picard, anderson      batched Picard / Anderson with per-sample statuses
    SolveResult, Status, SolveError
    implicit_solve, ImplicitLayer  implicit gradients (IFT adjoint, JFB, phantom, unroll)
    imp_fast.compat.torchdeq     drop-in for torchdeq's solver functions
"""
from .autograd import BACKWARD_MODES, AdjointError, AdjointWarning, implicit_solve
from .layer import ImplicitLayer
from .loop import METHODS, anderson, picard, solve
from .result import SolveError, SolveResult, Status

__version__ = "0.1.0"

__all__ = [
    "solve",
    "picard",
    "anderson",
    "SolveResult",
    "SolveError",
    "Status",
    "METHODS",
    "implicit_solve",
    "ImplicitLayer",
    "AdjointError",
    "AdjointWarning",
    "BACKWARD_MODES",
    "__version__",
]
