"""Implicit gradients (imp_fast.autograd.implicit_solve): ift / jfb / phantom / unroll."""
import warnings

import pytest
import torch
from torch import nn

from imp_fast.autograd import AdjointError, AdjointWarning, implicit_solve
from imp_fast.result import Status

F64 = torch.float64
TIGHT = dict(tol=1e-12, stop="abs", max_iter=300, backend="reference")


def _contraction(n, k, scale=0.5, dtype=F64):
    W = torch.randn(n, k, dtype=dtype)
    return scale * W / torch.linalg.matrix_norm(W, 2)


def _tanh_params(D=5, X=3, dtype=F64):
    W = _contraction(D, D, 0.6, dtype).requires_grad_()
    U = torch.randn(D, X, dtype=dtype).requires_grad_()
    b = (0.1 * torch.randn(D, dtype=dtype)).requires_grad_()
    return W, U, b


def _tanh_G(W, U, b):
    return lambda z, x: torch.tanh(z @ W.T + x @ U.T + b)


class TanhMLP(nn.Module):
    """G(z, x) = tanh(W z + U x + b), ||W|| < 1 at init."""

    def __init__(self, D, X, dtype=F64):
        super().__init__()
        self.W = nn.Parameter(_contraction(D, D, 0.6, dtype))
        self.U = nn.Parameter(torch.randn(D, X, dtype=dtype))
        self.b = nn.Parameter(0.1 * torch.randn(D, dtype=dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T + self.b)


def _picard_unrolled(G, x, z0, n, damping=1.0):
    z = z0
    for _ in range(n):
        z = (1 - damping) * z + damping * G(z, x) if damping != 1.0 else G(z, x)
    return z


def _rel_close(a, b, tol):
    return (a - b).norm() <= tol * b.norm().clamp_min(1e-300)


# ---------------------------------------------------------------- gradcheck (ift)


@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_gradcheck_linear(method):
    D, X, B = 4, 3, 2
    A = _contraction(D, D, 0.5).requires_grad_()
    Bm = torch.randn(D, X, dtype=F64, requires_grad=True)
    x = torch.randn(B, X, dtype=F64, requires_grad=True)
    z0 = torch.zeros(B, D, dtype=F64)

    def fn(x, A, Bm):
        G = lambda z, x: z @ A.T + x @ Bm.T
        return implicit_solve(G, x, z0, method=method, **TIGHT)

    assert torch.autograd.gradcheck(fn, (x, A, Bm))


def test_gradcheck_tanh_mlp():
    D, X, B = 5, 3, 3
    W, U, b = _tanh_params(D, X)
    x = torch.randn(B, X, dtype=F64, requires_grad=True)
    z0 = torch.zeros(B, D, dtype=F64)

    def fn(x, W, U, b):
        return implicit_solve(_tanh_G(W, U, b), x, z0, **TIGHT)

    assert torch.autograd.gradcheck(fn, (x, W, U, b))


def test_gradcheck_tanh_module_same_shape_state():
    # G an nn.Module: its parameters are found without params=; state shaped like x.
    G = TanhMLP(4, 4)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: implicit_solve(G, x, **TIGHT), (x,))
    z = implicit_solve(G, x, **TIGHT)
    z.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in G.parameters())


# ---------------------------------------------------------------- ift vs references


def test_ift_matches_300_step_unroll():
    D, X, B = 6, 3, 4
    G = TanhMLP(D, X)
    x = torch.randn(B, X, dtype=F64, requires_grad=True)
    z0 = torch.zeros(B, D, dtype=F64)
    w = torch.randn(B, D, dtype=F64)
    params = list(G.parameters())

    z = implicit_solve(G, x, z0, **TIGHT)
    g_ift = torch.autograd.grad((w * z).sum(), [x] + params)
    z_ref = _picard_unrolled(G, x, z0, 300)
    g_ref = torch.autograd.grad((w * z_ref).sum(), [x] + params)
    assert torch.allclose(z, z_ref, atol=1e-10)
    for a, b in zip(g_ift, g_ref):
        assert _rel_close(a, b, 1e-6)

    # backward="unroll" is that same reference computation
    z_u = implicit_solve(G, x, z0, backward="unroll", max_iter=300)
    g_u = torch.autograd.grad((w * z_u).sum(), [x] + params)
    for a, b in zip(g_u, g_ref):
        assert torch.allclose(a, b, rtol=0, atol=1e-13)


def test_ift_matches_analytic_linear():
    # z = A z + B x  =>  z* = (I - A)^{-1} B x; L = <w, z*>: dL/dx = B^T u, dL/dA = u z*^T,
    # dL/dB = u x^T with u = (I - A)^{-T} w.
    D, X, Bsz = 5, 3, 4
    A = _contraction(D, D, 0.7).requires_grad_()
    Bm = torch.randn(D, X, dtype=F64, requires_grad=True)
    x = torch.randn(Bsz, X, dtype=F64, requires_grad=True)
    w = torch.randn(Bsz, D, dtype=F64)
    G = lambda z, x: z @ A.T + x @ Bm.T
    z = implicit_solve(G, x, torch.zeros(Bsz, D, dtype=F64), **TIGHT)
    gx, gA, gB = torch.autograd.grad((w * z).sum(), [x, A, Bm])

    with torch.no_grad():
        M = torch.eye(D, dtype=F64) - A
        z_true = torch.linalg.solve(M, (x @ Bm.T).T).T
        u = torch.linalg.solve(M.T, w.T).T  # (B, D)
        assert torch.allclose(z, z_true, atol=1e-10)
        assert _rel_close(gx, u @ Bm, 1e-8)
        assert _rel_close(gA, u.T @ z_true, 1e-8)
        assert _rel_close(gB, u.T @ x, 1e-8)


def test_ift_closure_captured_tensors_get_gradients():
    # A plain closure over leaf tensors: every one of them gets the IFT gradient,
    # equal to backprop through a 400-step unroll (float64).
    W, U, b = _tanh_params()
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    z0 = torch.zeros(2, 5, dtype=F64)
    z = implicit_solve(_tanh_G(W, U, b), x, z0, **TIGHT)
    (z * torch.arange(1.0, 6.0, dtype=F64)).sum().backward()
    got = [t.grad.clone() for t in (x, W, U, b)]
    for t in (x, W, U, b):
        t.grad = None
    (_picard_unrolled(_tanh_G(W, U, b), x, z0, 400) * torch.arange(1.0, 6.0, dtype=F64)).sum().backward()
    for g, t in zip(got, (x, W, U, b)):
        assert _rel_close(g, t.grad, 1e-6)


def test_params_option_is_deprecated_and_harmless():
    W, U, b = _tanh_params()
    x = torch.randn(2, 3, dtype=F64)
    z0 = torch.zeros(2, 5, dtype=F64)
    with pytest.warns(DeprecationWarning, match="params= is no longer needed"):
        z = implicit_solve(_tanh_G(W, U, b), x, z0, params=[W], **TIGHT)
    z.sum().backward()
    assert W.grad is not None and U.grad is not None and b.grad is not None


def test_ift_partial_params_and_non_leaf_param():
    # Only some params require grad; one param is a non-leaf (computed from a leaf).
    W, U, b = _tanh_params()
    U.requires_grad_(False)
    raw = torch.tensor(0.9, dtype=F64, requires_grad=True)
    Ws = raw * W  # non-leaf tensor G closes over
    x = torch.randn(3, 3, dtype=F64)
    z0 = torch.zeros(3, 5, dtype=F64)
    G = _tanh_G(Ws, U, b)
    z = implicit_solve(G, x, z0, **TIGHT)
    z.sum().backward()
    g_raw, g_W, g_b = raw.grad.clone(), W.grad.clone(), b.grad.clone()
    raw.grad = W.grad = b.grad = None
    _picard_unrolled(_tanh_G(raw * W, U, b), x, z0, 300).sum().backward()
    for a, r in ((g_raw, raw.grad), (g_W, W.grad), (g_b, b.grad)):
        assert _rel_close(a, r, 1e-6)


def test_ift_no_grad_needed_returns_plain_solution():
    W, U, b = _tanh_params()
    x = torch.randn(2, 3, dtype=F64)
    with torch.no_grad():
        z = implicit_solve(_tanh_G(W, U, b), x, torch.zeros(2, 5, dtype=F64), **TIGHT)
    assert z.grad_fn is None and not z.requires_grad


def test_return_result_and_adjoint_result():
    G = TanhMLP(5, 3)
    x = torch.randn(3, 3, dtype=F64, requires_grad=True)
    z, res = implicit_solve(G, x, torch.zeros(3, 5, dtype=F64), return_result=True, **TIGHT)
    assert res.ok and torch.equal(res.z, z)
    assert "adjoint" not in res.extras
    z.sum().backward()
    adj = res.extras["adjoint"]
    assert adj.ok and adj.status.shape == (3,)


def test_z0_not_modified_and_gets_no_grad():
    G = TanhMLP(5, 3)
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    z0 = torch.randn(2, 5, dtype=F64, requires_grad=True)
    before = z0.detach().clone()
    implicit_solve(G, x, z0, **TIGHT).sum().backward()
    assert torch.equal(z0.detach(), before)
    assert z0.grad is None


def test_float32_ift_close_to_float64():
    G64 = TanhMLP(6, 3)
    G32 = TanhMLP(6, 3, dtype=torch.float32)
    G32.load_state_dict({k: v.float() for k, v in G64.state_dict().items()})
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    x32 = x.detach().float().requires_grad_()
    implicit_solve(G64, x, torch.zeros(4, 6, dtype=F64), tol=1e-10, max_iter=100).sum().backward()
    implicit_solve(G32, x32, torch.zeros(4, 6), tol=1e-6, max_iter=100).sum().backward()
    assert _rel_close(x32.grad.double(), x.grad, 1e-4)


# ---------------------------------------------------------------- jfb / phantom / unroll


def test_jfb_equals_one_step_gradient():
    G = TanhMLP(5, 3)
    x = torch.randn(3, 3, dtype=F64, requires_grad=True)
    z0 = torch.zeros(3, 5, dtype=F64)
    params = [x] + list(G.parameters())
    z, res = implicit_solve(G, x, z0, backward="jfb", return_result=True, **TIGHT)
    assert torch.allclose(z, res.z, atol=1e-11)  # one step from z*: equal up to the residual
    g = torch.autograd.grad(z.sum(), params)
    g_ref = torch.autograd.grad(G(res.z.detach(), x).sum(), params)
    for a, b in zip(g, g_ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("k,d", [(1, 1.0), (3, 0.5), (5, 0.8)])
def test_phantom_equals_k_unrolled_steps_from_fixed_point(k, d):
    G = TanhMLP(5, 3)
    x = torch.randn(3, 3, dtype=F64, requires_grad=True)
    z0 = torch.zeros(3, 5, dtype=F64)
    params = [x] + list(G.parameters())
    z, res = implicit_solve(
        G, x, z0, backward="phantom", phantom_k=k, phantom_damping=d, return_result=True, **TIGHT
    )
    g = torch.autograd.grad(z.sum(), params)
    z_ref = _picard_unrolled(G, x, res.z.detach(), k, damping=d)
    g_ref = torch.autograd.grad(z_ref.sum(), params)
    assert torch.allclose(z, z_ref, rtol=0, atol=0)
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=0, atol=1e-14)


def test_unroll_damped_and_result():
    G = TanhMLP(5, 3)
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    z0 = torch.zeros(2, 5, dtype=F64, requires_grad=True)
    z, res = implicit_solve(G, x, z0, backward="unroll", beta=0.7, max_iter=20, return_result=True, tol=1e-30)
    z_ref = _picard_unrolled(G, x, z0, 20, damping=0.7)
    assert torch.equal(z, z_ref)
    assert res.iterations == 20 and bool((res.status == Status.MAX_ITER).all())
    z.sum().backward()
    assert z0.grad is not None  # unroll differentiates through z0 too


# ---------------------------------------------------------------- memory


def _count_saved(fn):
    n = [0]

    def pack(t):
        n[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return n[0], out


def _slow_G():
    # contraction factor 0.99: nowhere near tol=1e-14 after 100 iterations
    D, X = 6, 3
    Q, _ = torch.linalg.qr(torch.randn(D, D, dtype=F64))
    A = (0.99 * Q).requires_grad_()
    Bm = torch.randn(D, X, dtype=F64, requires_grad=True)
    return (lambda z, x: z @ A.T + torch.tanh(x @ Bm.T)), [A, Bm]


@pytest.mark.parametrize("mode", ["ift", "jfb", "phantom"])
def test_memory_does_not_grow_with_max_iter(mode):
    G, params = _slow_G()
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    z0 = torch.zeros(2, 6, dtype=F64)
    counts = []
    for it in (10, 100):
        n, (z, res) = _count_saved(
            lambda: implicit_solve(
                G, x, z0, method="picard", max_iter=it, tol=1e-14, stop="abs",
                backward=mode, return_result=True, backend="reference", on_adjoint_failure="ignore",
            )
        )
        assert res.iterations == it and bool((res.status == Status.MAX_ITER).all())
        z.sum().backward()
        counts.append(n)
    assert counts[0] == counts[1] and counts[0] > 0


def test_memory_unroll_grows_with_max_iter():
    G, params = _slow_G()
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    z0 = torch.zeros(2, 6, dtype=F64)
    n10, _ = _count_saved(lambda: implicit_solve(G, x, z0, backward="unroll", max_iter=10))
    n100, _ = _count_saved(lambda: implicit_solve(G, x, z0, backward="unroll", max_iter=100))
    assert n100 > 5 * n10 > 0


# ---------------------------------------------------------------- adjoint failure


def _adjoint_fails(**kw):
    G = TanhMLP(5, 3)
    x = torch.randn(3, 3, dtype=F64, requires_grad=True)
    z = implicit_solve(G, x, torch.zeros(3, 5, dtype=F64), b_max_iter=2, b_tol=1e-14, **TIGHT, **kw)
    z.pow(2).sum().backward()
    return x


def test_adjoint_nonconvergence_warns():
    with pytest.warns(AdjointWarning, match="adjoint .* did not converge"):
        x = _adjoint_fails(on_adjoint_failure="warn")
    assert x.grad is not None  # still returns the approximate gradient


def test_adjoint_nonconvergence_raises():
    with pytest.raises(AdjointError, match="adjoint") as info:
        _adjoint_fails(on_adjoint_failure="raise")
    assert not info.value.result.ok


def test_adjoint_nonconvergence_ignored():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = _adjoint_fails(on_adjoint_failure="ignore")
    assert x.grad is not None


def test_adjoint_options_used():
    G = TanhMLP(5, 3)
    x = torch.randn(3, 3, dtype=F64, requires_grad=True)
    z, res = implicit_solve(
        G, x, torch.zeros(3, 5, dtype=F64), b_method="picard", b_max_iter=7, b_tol=1e-3,
        return_result=True, on_adjoint_failure="ignore", **TIGHT,
    )
    z.sum().backward()
    adj = res.extras["adjoint"]
    assert adj.method == "picard" and adj.tol == 1e-3 and adj.iterations <= 7


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(backward="exact"), ValueError, "backward"),
        (dict(method="newton"), ValueError, "method"),
        (dict(phantom_k=0), ValueError, "phantom_k"),
        (dict(phantom_damping=1.5), ValueError, "phantom_damping"),
        (dict(on_adjoint_failure="explode"), ValueError, "on_adjoint_failure"),
        (dict(b_tol=-1.0), ValueError, "b_tol"),
        (dict(b_max_iter=0), ValueError, "b_max_iter"),
        (dict(b_method="x"), ValueError, "b_method"),
        (dict(tol=0), ValueError, "tol"),
        (dict(max_iter=2.5), TypeError, "max_iter"),
        (dict(params=[1.0]), TypeError, r"params\[0\]"),
        (dict(params=torch.zeros(2)), TypeError, "params"),
        (dict(return_result="yes"), TypeError, "return_result"),
        (dict(max_iters=5), TypeError, "max_iter"),
    ],
)
def test_bad_options(kw, exc, match):
    G = TanhMLP(3, 3)
    with pytest.raises(exc, match=match):
        implicit_solve(G, torch.randn(2, 3, dtype=F64), **kw)


def test_bad_inputs():
    G = TanhMLP(5, 3)
    x = torch.randn(2, 3, dtype=F64)
    with pytest.raises(TypeError, match="G must be callable"):
        implicit_solve(3, x)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        implicit_solve(G, [1.0, 2.0])
    with pytest.raises(ValueError, match="same batch size"):
        implicit_solve(G, x, torch.zeros(3, 5, dtype=F64))
    with pytest.raises(RuntimeError) as info:
        implicit_solve(G, x)  # state has width 5, x has width 3: G's matmul fails
    if hasattr(info.value, "add_note"):
        assert "pass z0" in "".join(info.value.__notes__)
    with pytest.raises(ValueError, match="pass z0"):
        implicit_solve(lambda z, x: torch.zeros(2, 5, dtype=F64) + z.sum(), x)


def test_ift_gradient_batch_invariant():
    # each sample's gradient does not depend on which other samples share its batch
    G = TanhMLP(5, 3)
    x = torch.randn(4, 3, dtype=F64)
    w = torch.randn(4, 5, dtype=F64)
    z0 = torch.zeros(4, 5, dtype=F64)
    opts = dict(tol=1e-10, stop="abs", max_iter=100, backend="reference")
    xb = x.clone().requires_grad_()
    (w * implicit_solve(G, xb, z0, **opts)).sum().backward()
    for i in range(4):
        xi = x[i : i + 1].clone().requires_grad_()
        (w[i : i + 1] * implicit_solve(G, xi, z0[i : i + 1], **opts)).sum().backward()
        assert torch.allclose(xi.grad, xb.grad[i : i + 1], rtol=0, atol=1e-12)
