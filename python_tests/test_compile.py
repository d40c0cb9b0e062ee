"""torch.compile with the inductor backend (on CPU it generates and compiles C++).

- ``imp_fast.solve(f, z0, check_every=None, backend=...)`` traces as ONE graph
  (fullgraph=True: no host sync, what CUDA-graph capture needs) for the reference
  backend (plain PyTorch steps) and the cpp backend (the fused torch.ops.imp_fast ops,
  functionalized and re-inplaced by inductor), and the compiled solve returns what the
  eager one does: z, per-sample statuses (a mix of converged and max_iter) and
  iteration counts.
- An ``ImplicitLayer`` inside a model compiled with ``torch.compile(model)`` (graph
  breaks allowed: the host checks of the forward solve and the adjoint solve of "ift"
  break the graph) gives the eager output and gradients (parameters and input).

Inductor compiles C++, so the problems are small and the tests few; the slowest
(reference Anderson: its unrolled plain steps make the largest graph) is marked slow.
float64, so that compiled and eager agree to rounding and no sample's convergence
iteration can move.
"""
import pytest
import torch
import torch._dynamo.testing
from torch import nn

import imp_fast
from imp_fast.backends import backend_status

# torch 2.13's inductor calls the deprecated torch.jit.script_method internally
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

HAVE_CPP = backend_status()["cpp"] is None
needs_cpp = pytest.mark.skipif(not HAVE_CPP, reason=f"imp_fast._C not available: {backend_status()['cpp']}")

B, D = 6, 12
MAX_ITER = 4  # > m = 2: the Anderson ring buffer wraps


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _problem():
    """f(z) = tanh(s_b W z + x_b), contraction s_b from 0.05 to 0.95 across the batch:
    in MAX_ITER steps the first samples converge (and freeze), the last do not."""
    g = torch.Generator().manual_seed(0)
    W = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    s = torch.linspace(0.05, 0.95, B, dtype=torch.float64)[:, None]
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    return (lambda z: torch.tanh(s * (z @ W.T) + x)), torch.zeros(B, D, dtype=torch.float64)


@pytest.mark.parametrize(
    "backend,method",
    [
        pytest.param("reference", "anderson", marks=pytest.mark.slow),
        pytest.param("cpp", "anderson", marks=needs_cpp),
        pytest.param("cpp", "picard", marks=needs_cpp),
    ],
)
def test_solve_compiles_to_one_graph_and_matches_eager(backend, method):
    f, z0 = _problem()

    def run(z0):
        r = imp_fast.solve(f, z0, method=method, m=2, max_iter=MAX_ITER, tol=1e-3, check_every=None,
                           return_best=True, backend=backend)
        return r.z, r.status, r.n_iter, r.abs_residual

    eager = run(z0)
    statuses = set(eager[1].tolist())
    assert statuses == {int(imp_fast.Status.CONVERGED), int(imp_fast.Status.MAX_ITER)}, statuses

    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(run, backend=counter, fullgraph=True)(z0)
    assert counter.frame_count == 1
    if backend == "cpp":  # the steps are in the graph as the fused ops, one per iteration
        step_op = getattr(torch.ops.imp_fast, f"{method}_step").default
        assert sum(n.target is step_op for n in counter.graphs[0].graph.nodes) == MAX_ITER
    torch.testing.assert_close(compiled[0], eager[0])
    assert torch.equal(compiled[1], eager[1])
    assert torch.equal(compiled[2], eager[2])
    torch.testing.assert_close(compiled[3], eager[3])
    assert torch.equal(z0, torch.zeros_like(z0))  # the caller's z0 is never modified


class _Cell(nn.Module):
    """G(z, x) = tanh(W z + x + b) with ||W|| = 0.5: contractive in z."""

    def __init__(self, h):
        super().__init__()
        self.W = nn.Parameter(0.5 * torch.linalg.qr(torch.randn(h, h))[0])
        self.b = nn.Parameter(0.1 * torch.randn(h))

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x + self.b)


def _model(backward):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 16),
        imp_fast.ImplicitLayer(_Cell(16), max_iter=40, tol=1e-8, backward=backward, on_adjoint_failure="raise"),
        nn.Linear(16, 1),
    ).double()


def _train_step(model, params_of, x, y):
    x = x.clone().requires_grad_(True)
    out = model(x)
    loss = nn.functional.mse_loss(out, y)
    loss.backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in params_of.named_parameters()}


@pytest.mark.parametrize("backward", [pytest.param("ift", marks=pytest.mark.slow), "jfb"])
def test_implicit_layer_compiled_model_matches_eager(backward):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randn(8, 1, generator=g, dtype=torch.float64)

    eager_model = _model(backward)
    out_e, gx_e, grads_e = _train_step(eager_model, eager_model, x, y)

    model = _model(backward)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    out_c, gx_c, grads_c = _train_step(torch.compile(model, backend=counter), model, x, y)

    assert counter.frame_count >= 1  # something was compiled
    res = model[1].last_result
    assert res is not None and res.ok, res.summary()
    if backward == "ift":
        adj = res.extras.get("adjoint")
        assert adj is not None and adj.ok  # the adjoint solve ran in the compiled model's backward
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(gx_c, gx_e)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) == 6
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], msg=lambda m, n=name: f"{n}: {m}")
