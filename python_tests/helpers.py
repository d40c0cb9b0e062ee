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


def assert_compiled_op_writes_back(opov, args, *, min_changed):
    """Run the custom op ``opov`` eagerly and under torch.compile (aot_eager: the op is
    functionalized, runs on copies, and every argument its schema marks mutable is
    copied back). Every mutable argument must equal what the eager call wrote, at least
    ``min_changed`` of them must really have moved (so the comparison means something),
    and the read-only tensor arguments must be untouched."""
    schema = opov._schema
    mutable = [i for i, a in enumerate(schema.arguments)
               if a.alias_info is not None and a.alias_info.is_write and args[i] is not None]
    assert mutable, "the op mutates its state"
    tensor_idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def clone(a):
        return a.clone() if isinstance(a, torch.Tensor) else a

    eager = [clone(a) for a in args]
    opov(*eager)

    def step(*tensors):
        full = list(args)
        for i, t in zip(tensor_idx, tensors):
            full[i] = t
        opov(*full)

    compiled = [clone(a) for a in args]
    torch._dynamo.reset()
    torch.compile(step, backend="aot_eager", fullgraph=True)(*[compiled[i] for i in tensor_idx])
    changed = 0
    for i in mutable:
        torch.testing.assert_close(compiled[i], eager[i], rtol=0, atol=0, equal_nan=True)
        changed += not torch.equal(eager[i].nan_to_num(), args[i].nan_to_num())
    assert changed >= min_changed, (changed, min_changed)
    for i in set(tensor_idx) - set(mutable):
        torch.testing.assert_close(compiled[i], args[i], rtol=0, atol=0, equal_nan=True)


def _cpp_devices():
    """Devices the compiled ops are tested on: CPU, and CUDA (gpu-marked) where
    imp_fast._C was built with CUDA and a GPU is present."""
    import pytest

    from imp_fast.backends import cpp

    return ["cpu"] + [
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(
                    not (cpp.WITH_CUDA and torch.cuda.is_available()),
                    reason="needs imp_fast._C built with CUDA and a GPU",
                ),
            ],
        )
    ]


CPP_DEVICES = _cpp_devices()
