"""The probes' fused finite-difference ratios (``pair_ratios``) on the compiled (cpp: CPU,
and CUDA where built with it) and Triton (interpreter on CPU, GPU where present)
backends, against the ground truth ``reference.pair_ratios`` and against closed forms.

    out[b, p] = ||y[(1 + p) B + b] - y[b]|| / dnorm[p, b]   (NaN if either row is NONFINITE)
"""
import math

import pytest
import torch

from imp_fast import Status
from imp_fast.backends import cpp, get_backend, reference

try:
    from imp_fast.backends import triton as triton_be

    _triton_why = triton_be.unavailable_reason()
except Exception as exc:  # pragma: no cover
    triton_be, _triton_why = None, f"{type(exc).__name__}: {exc}"

_cpp_why = cpp.unavailable_reason() or (None if cpp.pair_ratios is not None else "imp_fast._C predates pair_ratios")
HAS_CUDA = torch.cuda.is_available()
NONFINITE = int(Status.NONFINITE)
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DT_IDS = ["f64", "f32", "f16", "bf16"]


def _gpu(reason_ok, why):
    return [pytest.mark.gpu, pytest.mark.skipif(not (HAS_CUDA and reason_ok), reason=why)]


# (backend, device) cases
CASES = [
    pytest.param(("cpp", "cpu"), marks=pytest.mark.skipif(_cpp_why is not None, reason=str(_cpp_why)), id="cpp-cpu"),
    pytest.param(("triton", "cpu"), marks=pytest.mark.skipif(_triton_why is not None or HAS_CUDA,
                                                           reason="triton interpreter run (no GPU here) unavailable"),
                 id="triton-cpu"),
    pytest.param(("cpp", "cuda"),
                 marks=_gpu(_cpp_why is None and cpp.WITH_CUDA, "needs imp_fast._C built with CUDA and a GPU"),
                 id="cpp-cuda"),
    pytest.param(("triton", "cuda"), marks=_gpu(_triton_why is None, "needs triton and a GPU"), id="triton-cuda"),
]


def _fn(backend):
    return cpp.pair_ratios if backend == "cpp" else triton_be.pair_ratios


def _cdt(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inputs(B, P, D, dtype, device="cpu", seed=0, statuses=True):
    g = torch.Generator().manual_seed(seed)
    NB = (1 + P) * B
    y = (torch.randn(NB, D, generator=g, dtype=torch.float64) * 3).to(dtype)
    dnorm = (torch.rand(P, B, generator=g, dtype=torch.float64) + 0.25).to(_cdt(dtype))
    status = torch.zeros(NB, dtype=torch.int8)
    if statuses:  # running / converged / diverged (never NaN), and some NONFINITE rows
        status = torch.randint(0, 4, (NB,), generator=g).to(torch.int8)
        status[status == 2] = 0
        if NB > 2:
            status[NB // 2] = NONFINITE
    return y.to(device), dnorm.to(device), status.to(device)


def _ref(y, dnorm, status):
    P, B = dnorm.shape
    out = torch.empty(B, P, dtype=dnorm.dtype, device=y.device)
    reference.pair_ratios(y, dnorm, status, out)
    return out


def _tol(dtype):
    return dict(rtol=1e-10, atol=0) if dtype == torch.float64 else dict(rtol=1e-5, atol=0)


SHAPES = [(3, 2, 37), (1, 4, 1000), (5, 1, 1025), (1, 1, 7), (4, 3, 2051), (2, 8, 1)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("B,P,D", SHAPES)
def test_matches_reference(case, dtype, B, P, D):
    backend, device = case
    y, dnorm, status = _inputs(B, P, D, dtype, device, seed=B * 100 + P * 10 + D)
    out = torch.full((B, P), -1.0, dtype=_cdt(dtype), device=device)
    assert _fn(backend)(y, dnorm, status, out) is None
    exp = _ref(y, dnorm, status)
    torch.testing.assert_close(out, exp, equal_nan=True, **_tol(dtype))
    assert not (out == -1).any()


@pytest.mark.skipif(_triton_why is not None or HAS_CUDA, reason="triton interpreter run unavailable")
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("block", [16, 64])
def test_triton_small_blocks(dtype, block):
    """Many chunks per program, D not a multiple of the block (masked tail)."""
    y, dnorm, status = _inputs(3, 2, 101, dtype)
    out = torch.empty(3, 2, dtype=_cdt(dtype))
    assert triton_be.launch_pair_ratios(y, dnorm, status, out, block=block) == 1
    torch.testing.assert_close(out, _ref(y, dnorm, status), equal_nan=True, **_tol(dtype))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_nan_rows_propagate_only_to_their_pairs(case, dtype):
    backend, device = case
    B, P, D = 4, 3, 33
    y, dnorm, status = _inputs(B, P, D, dtype, device, statuses=False)
    y[(1 + 1) * B + 2, 5] = float("nan")  # sample 2 under perturbation 1
    y[0, 7] = float("nan")  # unperturbed sample 0: all its pairs
    y[(1 + 2) * B + 3, 0] = float("inf")  # an infinite difference: ratio +inf
    out = torch.empty(B, P, dtype=_cdt(dtype), device=device)
    _fn(backend)(y, dnorm, status, out)
    nan = torch.zeros(B, P, dtype=torch.bool)
    nan[2, 1] = True
    nan[0, :] = True
    assert torch.equal(out.isnan().cpu(), nan)
    assert out[3, 2].item() == float("inf")
    torch.testing.assert_close(out, _ref(y, dnorm, status), equal_nan=True, **_tol(dtype))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_nonfinite_status_gives_nan_other_statuses_do_not(case, dtype):
    backend, device = case
    B, P, D = 3, 2, 20
    y, dnorm, _ = _inputs(B, P, D, dtype, device, statuses=False)
    clean = torch.empty(B, P, dtype=_cdt(dtype), device=device)
    _fn(backend)(y, dnorm, torch.zeros((1 + P) * B, dtype=torch.int8, device=device), clean)
    assert torch.isfinite(clean).all()
    status = torch.zeros((1 + P) * B, dtype=torch.int8)
    status[1] = NONFINITE  # unperturbed sample 1: its whole row of out
    status[(1 + 0) * B + 2] = NONFINITE  # sample 2 under perturbation 0
    status[0] = int(Status.CONVERGED)
    status[(1 + 1) * B + 2] = int(Status.CONVERGED)
    status[(1 + 1) * B + 0] = int(Status.DIVERGED)
    out = torch.empty(B, P, dtype=_cdt(dtype), device=device)
    _fn(backend)(y, dnorm, status.to(device), out)
    nan = torch.zeros(B, P, dtype=torch.bool)
    nan[1, :] = True
    nan[2, 0] = True
    assert torch.equal(out.isnan().cpu(), nan)
    assert torch.equal(out[~nan.to(device)], clean[~nan.to(device)])  # other statuses change nothing


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_writes_in_place_into_a_slice(case, dtype):
    """out is ratios[k] of the probes' (T, B, P) tensor: a contiguous view at a non-zero
    offset. Only that slice is written; y, dnorm and status are not."""
    backend, device = case
    T, B, P, D = 5, 3, 4, 50
    y, dnorm, status = _inputs(B, P, D, dtype, device)
    before = (y.clone(), dnorm.clone(), status.clone())
    ratios = torch.full((T, B, P), -7.0, dtype=_cdt(dtype), device=device)
    k = 2
    view = ratios[k]
    assert view.storage_offset() == k * B * P and view.is_contiguous()
    _fn(backend)(y, dnorm, status, view)
    torch.testing.assert_close(ratios[k], _ref(y, dnorm, status), equal_nan=True, **_tol(dtype))
    others = torch.cat([ratios[:k], ratios[k + 1:]])
    assert (others == -7.0).all()
    for a, b in zip((y, dnorm, status), before):
        assert torch.equal(a, b)


def _closed_form_inputs(B, P, D, dtype, scale):
    """y rows whose pair differences have exact norms: row (1 + p) B + b differs from row b
    by (3, 12, 4) * scale * k at three positions (k = 1 + b + 2 p), so its norm is
    13 * scale * k; dnorm[p, b] = 2 ** -(p + 1)."""
    assert D >= 3
    NB = (1 + P) * B
    g = torch.Generator().manual_seed(3)
    y = torch.zeros(NB, D, dtype=torch.float64)
    base = torch.randint(-64, 65, (B, D), generator=g).to(torch.float64) * (scale if scale < 1 else 1)
    exact = torch.empty(B, P, dtype=torch.float64)
    for p in range(P):
        for b in range(B):
            k = 1 + b + 2 * p
            row = base[b].clone()
            row[0] += 3 * scale * k
            row[D // 2] -= 12 * scale * k
            row[D - 1] += 4 * scale * k
            y[(1 + p) * B + b] = row
            exact[b, p] = 13 * scale * k / 2.0 ** -(p + 1)
    y[:B] = base
    dnorm = torch.tensor([[2.0 ** -(p + 1)] * B for p in range(P)], dtype=_cdt(dtype))
    return y, dnorm, exact


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_closed_form(case, dtype):
    """Ratios computed by hand in float64 (13 = ||(3, 12, 4)||) on inputs exactly
    representable in every storage dtype."""
    backend, device = case
    B, P, D = 3, 2, 9
    y, dnorm, exact = _closed_form_inputs(B, P, D, dtype, 1.0)
    yd = y.to(dtype)
    assert torch.equal(yd.double(), y)  # small integers: exact in bf16 too
    out = torch.empty(B, P, dtype=_cdt(dtype), device=device)
    _fn(backend)(yd.to(device), dnorm.to(device), torch.zeros((1 + P) * B, dtype=torch.int8, device=device), out)
    # 13 k 2^(p+1) is exact in float32: the ops' result is exactly the closed form
    assert torch.equal(out.cpu().double(), exact)
    assert exact[2, 1].item() == 13 * 5 * 4  # k = 1 + 2 + 2, dnorm = 1/4


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scale", [1e200, 1e-200], ids=["huge", "tiny"])
def test_closed_form_float64_extremes(case, scale):
    """float64 differences whose squares overflow (1e200) or underflow (1e-200): the
    scale-safe norm still gives 13 * scale * k to rounding."""
    backend, device = case
    B, P, D = 2, 2, 17
    y, dnorm, exact = _closed_form_inputs(B, P, D, torch.float64, scale)
    out = torch.empty(B, P, dtype=torch.float64, device=device)
    _fn(backend)(y.to(device), dnorm.to(device), torch.zeros((1 + P) * B, dtype=torch.int8, device=device), out)
    torch.testing.assert_close(out.cpu(), exact, rtol=1e-13, atol=0)
    torch.testing.assert_close(out, _ref(y.to(device), dnorm.to(device),
                                         torch.zeros((1 + P) * B, dtype=torch.int8, device=device)),
                               rtol=1e-13, atol=0)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["f16", "f32"])
def test_differences_beyond_the_storage_range(case, dtype):
    """y0 = -M, y1 = +M with M near the dtype's max: the differences 2M (and their
    squares) overflow the storage dtype but not the float64 accumulation;
    ||.|| = 2 M sqrt(D), and with dnorm = 2 sqrt(D) the ratio is exactly M."""
    backend, device = case
    M = 60000.0 if dtype == torch.float16 else 3.0e38
    D = 4
    y = torch.tensor([[-M] * D, [M] * D], dtype=dtype)
    dnorm = torch.full((1, 1), 2 * math.sqrt(D), dtype=torch.float32)
    out = torch.empty(1, 1, dtype=torch.float32, device=device)
    _fn(backend)(y.to(device), dnorm.to(device), torch.zeros(2, dtype=torch.int8, device=device), out)
    assert out.item() == y[1, 0].float().item()


# ----------------------------------------------------------------------------------------
# argument checks


def _good(B=2, P=3, D=5, dtype=torch.float32):
    y, dnorm, status = _inputs(B, P, D, dtype, statuses=False)
    return y, dnorm, status, torch.empty(B, P, dtype=_cdt(dtype))


BAD = {
    "y_1d": (lambda y, d, s, o: (y.reshape(-1), d, s, o), r"y must be a contiguous \(\(1 \+ P\) \* B, D\)"),
    "y_noncontig": (lambda y, d, s, o: (y.t().contiguous().t(), d, s, o), r"y must be a contiguous"),
    "y_int": (lambda y, d, s, o: (y.to(torch.int32), d, s, o), r"y must be float64, float32, float16 or bfloat16"),
    "y_rows": (lambda y, d, s, o: (y[:-1], d, s[:-1], o), r"y has 7 rows but dnorm's shape .*needs"),
    "dnorm_1d": (lambda y, d, s, o: (y, d.reshape(-1), s, o), r"dnorm must be a \(P, B\) tensor"),
    "dnorm_transposed_shape": (lambda y, d, s, o: (y, d.t().contiguous(), s, o), r"y has 8 rows but dnorm's shape"),
    "dnorm_dtype": (lambda y, d, s, o: (y, d.double(), s, o), r"dnorm must be a contiguous (torch\.)?[Ff]loat"),
    "dnorm_noncontig": (lambda y, d, s, o: (y, d.t().contiguous().t(), s, o), r"dnorm must be a contiguous"),
    "status_dtype": (lambda y, d, s, o: (y, d, s.to(torch.int32), o), r"status must be a contiguous \(8,\) int8"),
    "status_len": (lambda y, d, s, o: (y, d, s[:-1], o), r"status must be a contiguous \(8,\) int8"),
    "out_shape": (lambda y, d, s, o: (y, d, s, o.t().contiguous()), r"out must be a contiguous \(2, 3\)"),
    "out_dtype": (lambda y, d, s, o: (y, d, s, o.double()), r"out must be a contiguous \(2, 3\)"),
    "out_noncontig": (lambda y, d, s, o: (y, d, s, torch.empty(3, 2).t()), r"out must be a contiguous \(2, 3\)"),
}


@pytest.mark.parametrize("backend", [
    pytest.param("cpp", marks=pytest.mark.skipif(_cpp_why is not None, reason=str(_cpp_why))),
    pytest.param("triton", marks=pytest.mark.skipif(_triton_why is not None or HAS_CUDA, reason="no interpreter")),
])
@pytest.mark.parametrize("bad", sorted(BAD))
def test_bad_arguments_raise_clear_errors(backend, bad):
    make, msg = BAD[bad]
    y, dnorm, status, out = make(*_good())
    with pytest.raises((RuntimeError, ValueError), match=msg):
        _fn(backend)(y, dnorm, status, out)


@pytest.mark.parametrize("case", CASES)
def test_empty(case):
    backend, device = case
    for B, P in [(0, 3), (3, 0)]:
        y = torch.randn((1 + P) * B, 4, device=device)
        out = torch.empty(B, P, device=device)
        _fn(backend)(y, torch.ones(P, B, device=device), torch.zeros((1 + P) * B, dtype=torch.int8, device=device),
                     out)


# ----------------------------------------------------------------------------------------
# the compiled op: registration, opcheck, fake kernel, functionalization

needs_cpp = pytest.mark.skipif(_cpp_why is not None, reason=str(_cpp_why))


@needs_cpp
def test_backends_expose_pair_ratios():
    assert get_backend("cpp", torch.device("cpu")).pair_ratios is cpp.pair_ratios
    if _triton_why is None and not HAS_CUDA:
        assert get_backend("triton", torch.device("cpu")).pair_ratios is triton_be.pair_ratios


def _op():
    return torch.ops.imp_fast.pair_ratios.default


@needs_cpp
def test_schema_mutates_only_out():
    args = _op()._schema.arguments
    assert [a.name for a in args] == ["y", "dnorm", "status", "out"]
    assert [a.alias_info is not None and a.alias_info.is_write for a in args] == [False, False, False, True]
    assert len(_op()._schema.returns) == 0


@needs_cpp
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("in_slice", [False, True], ids=["out", "out_slice"])
def test_opcheck(dtype, in_slice):
    y, dnorm, status = _inputs(3, 2, 37, dtype)
    if dtype in (torch.float32, torch.float64):
        y.requires_grad_(True)  # so that the autograd registration check runs
    out = torch.zeros(4, 3, 2, dtype=_cdt(dtype))[1] if in_slice else torch.zeros(3, 2, dtype=_cdt(dtype))
    result = torch.library.opcheck(_op(), (y, dnorm, status, out))
    assert result == {
        "test_schema": "SUCCESS",
        "test_autograd_registration": "SUCCESS",
        "test_faketensor": "SUCCESS",
        "test_aot_dispatch_dynamic": "SUCCESS",
    }


@needs_cpp
def test_fake_kernel_is_registered():
    y, dnorm, status = _inputs(3, 2, 37, torch.float32)
    args = [t.to("meta") for t in (y, dnorm, status, torch.empty(3, 2))]
    assert _op()(*args) is None


@needs_cpp
def test_not_differentiable_no_graph():
    y, dnorm, status = _inputs(3, 2, 37, torch.float32)
    y.requires_grad_(True)
    out = torch.empty(3, 2)
    _op()(y, dnorm, status, out)
    assert not out.requires_grad and out.grad_fn is None


@needs_cpp
def test_functionalized_op_writes_back_out():
    """Under torch.compile (aot_eager, fullgraph) the op is functionalized; out (a slice
    of a (T, B, P) tensor) must come back exactly as the eager call wrote it."""
    y, dnorm, status = _inputs(3, 2, 37, torch.float32)
    eager = torch.zeros(4, 3, 2)
    cpp.pair_ratios(y, dnorm, status, eager[1])

    def step(y, dnorm, status, ratios):
        torch.ops.imp_fast.pair_ratios(y, dnorm, status, ratios[1])

    compiled = torch.zeros(4, 3, 2)
    torch._dynamo.reset()
    torch.compile(step, backend="aot_eager", fullgraph=True)(y, dnorm, status, compiled)
    assert torch.equal(compiled.nan_to_num(), eager.nan_to_num())
    assert torch.equal(compiled.isnan(), eager.isnan())
    assert (eager[1] != 0).any()


@needs_cpp
def test_deterministic_across_thread_counts():
    y, dnorm, status = _inputs(16, 3, 3000, torch.float32)
    outs = []
    n0 = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = torch.empty(16, 3)
            cpp.pair_ratios(y, dnorm, status, out)
            outs.append(out)
    finally:
        torch.set_num_threads(n0)
    assert torch.equal(outs[0].nan_to_num(), outs[1].nan_to_num())
