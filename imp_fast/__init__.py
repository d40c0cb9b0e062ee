"""imp_fast: fast, trustworthy batched fixed-point solves for implicit models.

Entry points:
    solve, picard, anderson      batched Picard / Anderson with per-sample statuses
    SolveResult, Status, SolveError
    implicit_solve, ImplicitLayer  implicit gradients (IFT adjoint, JFB, phantom, unroll)
    lipschitz_trace, contraction_estimate, scaling_curve   test-time scaling probes
    imp_fast.compat.torchdeq     drop-in for torchdeq's solver functions
"""
from .autograd import BACKWARD_MODES, AdjointError, AdjointWarning, implicit_solve
from .graph import clear_graph_cache, solve_graphed
from .layer import ImplicitLayer
from .loop import METHODS, anderson, picard, solve
from .probes import LipschitzTrace, contraction_estimate, fourier_directions, fourier_radii, lipschitz_trace
from .scaling import ScalingCurve, plot_scaling_curve, psnr, relative_l2, scaling_curve
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
    "solve_graphed",
    "clear_graph_cache",
    "implicit_solve",
    "ImplicitLayer",
    "AdjointError",
    "AdjointWarning",
    "BACKWARD_MODES",
    "lipschitz_trace",
    "LipschitzTrace",
    "fourier_directions",
    "fourier_radii",
    "contraction_estimate",
    "scaling_curve",
    "ScalingCurve",
    "plot_scaling_curve",
    "relative_l2",
    "psnr",
    "__version__",
]
