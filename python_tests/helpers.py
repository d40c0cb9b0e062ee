"""Small problems shared by the tests."""
import torch


def contractive_linear(B, D, *, rho=0.7, dtype=torch.float64, seed=0):
    """A (B, D, D) batch of matrices with spectral norm rho and offsets b (B, D)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, D, D, generator=g, dtype=torch.float64)
    A = A * (rho / torch.linalg.matrix_norm(A, 2)[:, None, None])
    b = torch.randn(B, D, generator=g, dtype=torch.float64)
    return A.to(dtype), b.to(dtype)


def linear_map(A, b):
    """f(z) = A z + b per sample; elementwise-per-sample, so batch invariant."""
    return lambda z: torch.einsum("bij,bj->bi", A, z) + b
