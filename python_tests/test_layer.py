"""ImplicitLayer: registration, train/eval options, repr, training a small DEQ."""
import copy

import pytest
import torch
from torch import nn

from imp_fast.autograd import implicit_solve
from imp_fast.layer import ImplicitLayer

F64 = torch.float64


class Cell(nn.Module):
    """G(z, x) = tanh(W z + x + b): x is already lifted to the state width."""

    def __init__(self, H, scale=0.3, dtype=torch.float32):
        super().__init__()
        W = torch.randn(H, H, dtype=dtype)
        self.W = nn.Parameter(scale * W / torch.linalg.matrix_norm(W, 2))
        self.b = nn.Parameter(torch.zeros(H, dtype=dtype))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x + self.b)


def test_parameters_registered_and_state_dict():
    G = Cell(4)
    layer = ImplicitLayer(G, max_iter=20)
    assert layer.G is G
    assert {id(p) for p in layer.parameters()} == {id(p) for p in G.parameters()}
    assert set(layer.state_dict()) == {"G.W", "G.b"}
    clone = copy.deepcopy(layer)
    x = torch.randn(3, 4)
    assert torch.equal(clone(x), layer(x))


def test_forward_matches_implicit_solve_and_grads():
    G = Cell(5, dtype=F64)
    layer = ImplicitLayer(G, tol=1e-12, stop="abs", max_iter=200)
    x = torch.randn(3, 5, dtype=F64, requires_grad=True)
    z = layer(x)
    z_ref = implicit_solve(G, x, tol=1e-12, stop="abs", max_iter=200)
    assert torch.equal(z, z_ref)
    z.sum().backward()
    assert x.grad is not None and G.W.grad is not None and G.b.grad is not None
    assert layer.last_result.ok and layer.last_result.extras["adjoint"].ok


def test_return_result_and_z0():
    G = Cell(4)
    layer = ImplicitLayer(G, return_result=True, tol=1e-6)
    x = torch.randn(2, 4)
    z, res = layer(x, torch.ones(2, 4))
    assert res.ok and z.shape == (2, 4)


def test_train_eval_options():
    layer = ImplicitLayer(Cell(4), max_iter=7, tol=1e-3, eval_max_iter=40, eval_tol=1e-9, method="picard",
                          check_every=1)
    x = torch.randn(2, 4)
    layer.train()
    assert layer.solve_options()["max_iter"] == 7
    layer(x)
    assert layer.last_result.tol == 1e-3 and layer.last_result.iterations <= 7
    layer.eval()
    with torch.no_grad():
        z = layer(x)
    assert not z.requires_grad
    assert layer.last_result.tol == 1e-9 and 7 < layer.last_result.iterations <= 40
    assert layer.solve_options()["max_iter"] == 40
    assert layer.options["max_iter"] == 7  # training options untouched


def test_repr():
    r = repr(ImplicitLayer(Cell(3), max_iter=12, backward="phantom", phantom_k=3, eval_max_iter=50))
    assert "ImplicitLayer(" in r and "max_iter=12" in r and "backward='phantom'" in r
    assert "phantom_k=3" in r and "eval_max_iter=50" in r and "(G): Cell()" in r


def test_plain_function_with_params():
    W = nn.Parameter(0.3 * torch.eye(3, dtype=F64))
    layer = ImplicitLayer(lambda z, x: torch.tanh(z @ W.T + x), params=[W], tol=1e-10, stop="abs", max_iter=100)
    assert [id(p) for p in layer.parameters()] == [id(W)]
    x = torch.randn(2, 3, dtype=F64)
    layer(x).sum().backward()
    assert W.grad is not None and W.grad.abs().sum() > 0
    assert "G=<lambda>" in repr(layer)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(backward="nope"), ValueError, "backward"),
        (dict(eval_max_iter=0), ValueError, "eval_max_iter"),
        (dict(eval_tol=-1.0), ValueError, "eval_tol"),
        (dict(max_iters=9), TypeError, "ImplicitLayer.*max_iters.*did you mean 'max_iter'.*eval_tol"),
    ],
)
def test_bad_options_at_construction(kw, exc, match):
    with pytest.raises(exc, match=match):
        ImplicitLayer(Cell(3), **kw)
    with pytest.raises(TypeError, match="G must be callable"):
        ImplicitLayer(42)


@pytest.mark.parametrize("backward", ["ift", "phantom"])
def test_deq_mlp_training_lowers_loss(backward):
    torch.manual_seed(0)
    X, H, N = 3, 24, 128
    x = torch.randn(N, X)
    y = torch.sin(x @ torch.tensor([1.5, -1.0, 0.5])).unsqueeze(1) + 0.5 * x[:, :1] * x[:, 1:2]
    model = nn.Sequential(
        nn.Linear(X, H),
        ImplicitLayer(Cell(H, scale=0.5), max_iter=30, tol=1e-4, backward=backward, eval_max_iter=60),
        nn.Linear(H, 1),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.MSELoss()
    with torch.no_grad():
        initial = loss_fn(model(x), y).item()
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        final = loss_fn(model(x), y).item()
    print(f"{backward}: loss {initial:.4f} -> {final:.4f}")
    assert final < 0.3 * initial, (initial, final)
    assert model[1].last_result.ok
