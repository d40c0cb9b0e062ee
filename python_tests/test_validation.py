"""Bad input gets a clear error naming the argument; the caller's tensor is untouched."""
import pytest
import torch

import imp_fast


def f_ok(z):
    return 0.5 * z


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(tol=0.0), ValueError, "tol"),
        (dict(tol=-1e-3), ValueError, "tol"),
        (dict(tol=float("nan")), ValueError, "tol"),
        (dict(m=0), ValueError, "m must be >= 1"),
        (dict(m=2.5), TypeError, "m must be an int"),
        (dict(max_iter=0), ValueError, "max_iter"),
        (dict(method="newton"), ValueError, "method"),
        (dict(stop="max"), ValueError, "stop"),
        (dict(backend="cuda-magic"), ValueError, "backend"),
        (dict(beta=0.0), ValueError, "beta"),
        (dict(beta=2.5), ValueError, "beta"),
        (dict(lam=-1.0), ValueError, "lam"),
        (dict(check_every=0), ValueError, "check_every"),
        (dict(divergence=0.5), ValueError, "divergence"),
        (dict(tolerance=1e-3), TypeError, "did you mean 'tol'"),
        (dict(max_iters=3), TypeError, "'max_iters'"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, exc, words):
    z0 = torch.ones(2, 3)
    with pytest.raises(exc, match=words):
        imp_fast.solve(f_ok, z0, **kwargs)
    assert torch.equal(z0, torch.ones(2, 3))


@pytest.mark.parametrize(
    "z0,exc,words",
    [
        ([[1.0, 2.0]], TypeError, "z0 must be a torch.Tensor, got list"),
        (torch.tensor(1.0), ValueError, "batch dimension"),
        (torch.ones(2, 3, dtype=torch.int64), TypeError, "floating point"),
        (torch.ones(0, 3), ValueError, "empty"),
    ],
)
def test_bad_z0(z0, exc, words):
    with pytest.raises(exc, match=words):
        imp_fast.solve(f_ok, z0)


def test_f_not_callable():
    with pytest.raises(TypeError, match="f must be callable"):
        imp_fast.solve(3, torch.ones(2, 2))


@pytest.mark.parametrize(
    "f,exc,words",
    [
        (lambda z: z[:, :2], ValueError, r"f returned shape \(2, 2\), expected the shape of z0 \(2, 3\)"),
        (lambda z: z.double(), TypeError, "f returned dtype torch.float64"),
        (lambda z: z.tolist(), TypeError, "f must return a torch.Tensor"),
        (lambda z: torch.ones(2, 3, device="meta"), ValueError, "f returned a tensor on meta"),
    ],
)
def test_f_output_checked(f, exc, words):
    z0 = torch.ones(2, 3)
    with pytest.raises(exc, match=words):
        imp_fast.solve(f, z0, backend="reference")
    assert torch.equal(z0, torch.ones(2, 3))


def test_exception_inside_f_leaves_z0_untouched():
    z0 = torch.ones(2, 3)
    calls = {"n": 0}

    def f(z):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return 0.9 * z + 1

    with pytest.raises(KeyboardInterrupt):
        imp_fast.anderson(f, z0, backend="reference")
    assert torch.equal(z0, torch.ones(2, 3))


def test_shortcuts_reject_method():
    with pytest.raises(TypeError, match="picard"):
        imp_fast.picard(f_ok, torch.ones(1, 1), method="anderson")


def test_explicit_unavailable_backend_is_a_clear_error():
    from imp_fast.backends import BackendUnavailable, backend_status

    missing = [b for b, why in backend_status().items() if why is not None]
    if not missing:
        pytest.skip("every backend is available here")
    with pytest.raises(BackendUnavailable, match=f"backend {missing[0]!r} is not available"):
        imp_fast.solve(f_ok, torch.ones(1, 1), backend=missing[0])


def test_cuda_graph_needs_a_cuda_tensor():
    with pytest.raises(ValueError, match="CUDA"):
        imp_fast.solve(f_ok, torch.ones(2, 2), cuda_graph=True)
