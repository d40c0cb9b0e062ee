"""Small problems shared by the tests."""
import torch


def contractive_linear(B, D, *, rho=0.7, dtype=torch.float64, seed=0):
    """A (B, D, D) batch of matrices with spectral norm rho and offsets b (B, D)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, D, D, generator=g, dtype=torch.float64)
    A = A * (rho / torch.linalg.matrix_norm(A, 2)[:, None, None])
    b = torch.randn(B, D, generator=g, dtype=torch.float64)
    return A.to(dtype), b.to(dtype)


def op_inputs(st, stage, step):
    """(fz, k): the f(z) of the next step of a custom-op test on the fresh LoopState st,
    and that step's index k. f(z) = tanh(W z + x) in float64 (seed 1, ||W|| ~ 0.4),
    cast to st's dtype. "first": st as given, k = 0. "mid": st advanced by 4 calls of
    ``step(st, fz, k)`` (the plain-torch or reference step; abs0 set after the first, as
    the loop does), then sample 1 frozen CONVERGED and sample 4 NONFINITE, and f(z) of
    the running samples 2 and 3 made NaN / Inf at this step (4 is frozen: unchanged)."""
    from imp_fast.result import Status

    B, D = st.z.shape
    gen = torch.Generator().manual_seed(1)
    W = (torch.randn(D, D, generator=gen, dtype=torch.float64) * (0.4 / D**0.5)).to(st.z.device)
    x = torch.randn(B, D, generator=gen, dtype=torch.float64).to(st.z.device)

    def f(z):
        return torch.tanh(z.double() @ W.T + x).to(st.z.dtype)

    k = 0
    if stage == "mid":
        for k in range(4):
            step(st, f(st.z), k)
            if k == 0:
                st.abs0.copy_(st.abs_res)
        k = 4
        st.status[1] = int(Status.CONVERGED)
        st.status[4] = int(Status.NONFINITE)
        st.cache.clear()
    fz = f(st.z)
    if stage == "mid":
        fz[2, 0] = float("nan")
        fz[3, -1] = float("inf")
        fz[4, 5] = float("nan")
    return fz, k


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
