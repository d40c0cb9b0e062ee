"""torch.library.opcheck for every custom op of imp_fast._C (torch.ops.imp_fast.*).

The ops (csrc/ops.cpp, TORCH_LIBRARY(imp_fast, ...)) are the fused per-iteration steps
of the solve; they mutate the loop state in place and return nothing. opcheck checks,
on realistic states (first step and mid-solve with a mix of frozen / running /
non-finite samples, float32 and float64, with and without the optional best-iterate
tensors, with and without an input that requires grad):

- test_schema: every tensor the kernel writes is declared mutable (``Tensor(a!)``) and
  none that is read only is written;
- test_autograd_registration: the ops have a kernel at the Autograd key (the steps are
  not differentiable: a fallthrough), not an accidental one at the CPU key;
- test_faketensor: the fake kernels registered in imp_fast/backends/cpp.py run under
  FakeTensorMode (what torch.compile traces with);
- test_aot_dispatch_dynamic: the ops trace through AOTAutograd with dynamic shapes.

opcheck compares outputs only, and these ops return none, so one more test checks that
under functionalization (torch.compile, aot_eager) every mutated input is written back
exactly as in eager. A last test fails when an op is registered without a case here.
Skipped when the extension is not built.
"""
import warnings

import pytest
import torch

from imp_fast.backends import cpp, reference
from imp_fast.state import LoopState, StepParams

if cpp.unavailable_reason() is not None:
    pytest.skip(cpp.unavailable_reason(), allow_module_level=True)

from helpers import CPP_DEVICES, assert_compiled_op_writes_back, op_inputs  # noqa: E402

B, D, M = 6, 37, 3  # D: not a multiple of any vector width
PARAMS = StepParams(tol=1e-4, beta=0.8, stop_rel=True, divergence=1e6, eps=1e-9, lam=1e-4)
OPS = ("picard_step", "anderson_step")
# ops whose opcheck cases live in their own test module
OPS_ELSEWHERE = {"pair_ratios": "test_pair_ratios.py", "broyden_step": "test_broyden_cpp.py"}

DEVICES = CPP_DEVICES


def _state(op, dtype, best, stage, device="cpu"):
    """(state, fz, slot): the loop state before one step of ``op`` and that step's f(z).

    "first": the solve's first step (fresh state, empty history, abs0 = +inf).
    "mid": after 4 reference steps (history ring buffer wrapped once), with one sample
    frozen CONVERGED, one frozen NONFINITE, and two running samples whose f(z) turns
    NaN / Inf at this step (they become NONFINITE).
    """
    anderson = op == "anderson_step"
    st = LoopState.create(torch.zeros(B, D, dtype=dtype, device=device), m=M if anderson else None, return_best=best)

    def step(s_, fz_, k_):
        if anderson:
            reference.anderson_step(s_, fz_, PARAMS, k_ % M)
        else:
            reference.picard_step(s_, fz_, PARAMS)

    fz, k = op_inputs(st, stage, step)
    return st, fz, k % M


def _args(op, st, fz, slot):
    p = PARAMS
    head = (st.z, fz, st.status, st.n_iter, st.abs_res, st.rel_res, st.abs0, st.best_z, st.best_abs, st.best_rel)
    if op == "picard_step":
        return head + (p.tol, p.beta, p.stop_rel, p.divergence, p.eps)
    return head + (st.F, st.G, st.H, slot, p.tol, p.beta, p.stop_rel, p.divergence, p.eps, p.lam)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stage", ["first", "mid"])
@pytest.mark.parametrize("best", [False, True], ids=["no_best", "best"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, dtype, best, stage, device):
    st, fz, slot = _state(op, dtype, best, stage, device)
    # An input that requires grad, in half the cases, so that opcheck's autograd
    # registration check runs (it is skipped when no input requires grad).
    if stage == "mid":
        fz.requires_grad_(True)
    args = _args(op, st, fz, slot)
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    result = torch.library.opcheck(getattr(torch.ops.imp_fast, op).default, args)
    assert result == {
        "test_schema": "SUCCESS",
        "test_autograd_registration": "SUCCESS",
        "test_faketensor": "SUCCESS",
        "test_aot_dispatch_dynamic": "SUCCESS",
    }
    # opcheck works on copies: the caller's tensors are untouched
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("op", OPS)
def test_opcheck_low_precision_storage(op, dtype):
    st, fz, slot = _state(op, dtype, True, "mid")
    result = torch.library.opcheck(getattr(torch.ops.imp_fast, op).default, _args(op, st, fz, slot))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("best", [False, True], ids=["no_best", "best"])
@pytest.mark.parametrize("op", OPS)
def test_functionalized_op_writes_back_every_mutated_input(op, best):
    """Under torch.compile the op is functionalized (auto_functionalized): it runs on
    copies and the results are copied back into each argument its schema marks
    mutable. Every such argument must then equal what the eager call wrote."""
    st, fz, slot = _state(op, torch.float64, best, "mid")
    args = _args(op, st, fz, slot)
    # z, status, n_iter, residuals, ... really move, so the comparison means something
    assert_compiled_op_writes_back(getattr(torch.ops.imp_fast, op).default, args, min_changed=5)


@pytest.mark.parametrize("best", [False, True], ids=["no_best", "best"])
@pytest.mark.parametrize("op", OPS)
def test_fake_kernel_is_registered(op, best):
    """The registered fake kernel itself runs on meta tensors. (opcheck's fake-tensor
    check alone would also pass with no fake kernel: on CPU, FakeTensorMode falls back
    to running the real kernel on zeros.)"""
    st, fz, slot = _state(op, torch.float32, best, "first")
    args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in _args(op, st, fz, slot)]
    assert getattr(torch.ops.imp_fast, op).default(*args) is None


@pytest.mark.parametrize("op", OPS)
def test_steps_are_not_differentiable(op):
    """The steps run on detached state; an f(z) that requires grad attaches no graph to
    the state and raises no autograd warning (the Autograd key falls through)."""
    st, fz, slot = _state(op, torch.float32, True, "first")
    fz.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        getattr(torch.ops.imp_fast, op)(*_args(op, st, fz, slot))
    for name, t in st.tensors().items():
        if t is not None:
            assert not t.requires_grad and t.grad_fn is None, name
    assert int(st.n_iter.sum()) == B  # the step ran



def test_every_registered_op_has_a_case():
    registered = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("imp_fast::"))
    covered = sorted(OPS + tuple(OPS_ELSEWHERE))
    assert registered == covered, (
        f"ops registered in torch.ops.imp_fast: {registered}; covered by opcheck tests: {covered}. "
        "Give every new op a case here, or in its own module listed in OPS_ELSEWHERE (realistic inputs for opcheck)."
    )
