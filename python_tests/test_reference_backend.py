"""The reference steps' per-solve caches (views, masks, bounds in LoopState.cache) never
go stale: edits to the state between steps are honoured, inference mode works."""
import pytest
import torch

import imp_fast
from imp_fast.backends import reference
from imp_fast.result import Status
from imp_fast.state import LoopState, StepParams

P = StepParams(tol=1e-30, beta=1.0, stop_rel=True, divergence=1e6, eps=1e-9, lam=1e-4)


def _f(z):
    return torch.tanh(0.5 * z.roll(1, dims=1) + 0.3)


def _step(method, st, k):
    fz = _f(st.z)
    if method == "anderson":
        reference.anderson_step(st, fz, P, k % st.H.shape[1])
    else:
        reference.picard_step(st, fz, P)
    if k == 0:
        st.abs0.copy_(st.abs_res)


@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_status_written_between_steps_freezes_the_sample(method):
    st = LoopState.create(torch.zeros(3, 10), m=3 if method == "anderson" else None, return_best=False)
    for k in range(2):
        _step(method, st, k)
    st.status[1] = int(Status.CONVERGED)  # the caller freezes sample 1 by hand
    z1, n1 = st.z[1].clone(), int(st.n_iter[1])
    for k in range(2, 5):
        _step(method, st, k)
    assert torch.equal(st.z[1], z1) and int(st.n_iter[1]) == n1
    assert st.n_iter.tolist() == [5, n1, 5]


@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_abs0_written_between_steps_moves_the_divergence_bound(method):
    st = LoopState.create(torch.zeros(2, 10), m=3 if method == "anderson" else None, return_best=False)
    for k in range(2):
        _step(method, st, k)
    assert st.status.tolist() == [0, 0]
    st.abs0[0] = 1e-12  # now sample 0's residual is far past divergence * abs0
    _step(method, st, 2)
    assert st.status.tolist() == [int(Status.DIVERGED), 0]


@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_inference_mode_matches_no_grad(method):
    z0 = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    want = imp_fast.solve(_f, z0, method=method, backend="reference", tol=1e-6, max_iter=40)
    with torch.inference_mode():
        got = imp_fast.solve(_f, z0, method=method, backend="reference", tol=1e-6, max_iter=40)
    assert torch.equal(got.z, want.z)
    assert torch.equal(got.n_iter, want.n_iter) and torch.equal(got.status, want.status)


def test_singular_float32_system_falls_back_to_damped_picard():
    """Exactly singular bordered system (zero Gram, lam = 0): the zero pivot makes the
    weights non-finite, so the sample takes z + beta g."""
    z = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    st = LoopState.create(z.clone(), m=2, return_best=False)
    st.H.zero_()
    fz = z + 1.0
    p = StepParams(tol=1e-30, beta=0.5, stop_rel=False, divergence=1e6, eps=1e-9, lam=0.0)
    reference.anderson_step(st, fz, p, 1)  # slot 1; slot 0's row/col of H stays zero
    torch.testing.assert_close(st.z, z + 0.5 * (fz - z))


def test_clone_copies_tensors_and_starts_an_empty_cache():
    st = LoopState.create(torch.zeros(2, 5), m=2, return_best=True)
    _step("anderson", st, 0)
    assert st.cache
    c = st.clone()
    assert c.cache == {}
    for name, t in st.tensors().items():
        if t is not None:
            assert torch.equal(getattr(c, name), t) and getattr(c, name).data_ptr() != t.data_ptr()


def _mixed_state(dtype, m, best, D=23, B=6):
    """Random z, samples 0-1 frozen (converged / diverged), the rest running."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(B, D, generator=gen, dtype=torch.float64).to(dtype)
    st = LoopState.create(z, m=m, return_best=best)
    st.status[0], st.status[1] = int(Status.CONVERGED), int(Status.DIVERGED)
    W = torch.randn(D, D, generator=gen, dtype=torch.float64) * (0.4 / D ** 0.5)
    x = torch.randn(B, D, generator=gen, dtype=torch.float64)

    def f(zz):
        out = torch.tanh(zz.double() @ W.T + x)
        out[2, 0] = float("nan")  # sample 2 meets NaN: flagged, frozen at its last finite z
        return out.to(dtype)

    return st, f


@pytest.mark.parametrize("method", ["anderson", "picard"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("best", [False, True])
@pytest.mark.parametrize("beta", [1.0, 0.7])
def test_eager_steps_match_their_plain_form(method, dtype, best, beta):
    """The op-count-optimised eager steps compute what the plain steps state."""
    m = 3 if method == "anderson" else None
    a, f = _mixed_state(dtype, m, best)
    b = a.clone()
    p = StepParams(tol=1e-5, beta=beta, stop_rel=True, divergence=1e6, eps=1e-9, lam=1e-4)
    for k in range(7):
        if method == "anderson":
            reference.anderson_step(a, f(a.z), p, k % 3)
            reference.plain_anderson_step(b, f(b.z), p, k % 3)
        else:
            reference.picard_step(a, f(a.z), p)
            reference.plain_picard_step(b, f(b.z), p)
        if k == 0:
            a.abs0.copy_(a.abs_res)
            b.abs0.copy_(b.abs_res)
    assert torch.equal(a.status, b.status) and torch.equal(a.n_iter, b.n_iter)
    assert a.status.tolist()[:3] == [int(Status.CONVERGED), int(Status.DIVERGED), int(Status.NONFINITE)]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype != torch.float16 else dict(rtol=2e-3, atol=2e-3)
    for name, t in a.tensors().items():
        if t is not None:
            torch.testing.assert_close(t.double(), getattr(b, name).double(), equal_nan=True, msg=name, **tol)


@pytest.mark.parametrize("method", ["anderson", "picard"])
def test_torch_compile_fullgraph_traces_the_plain_steps(method):
    W = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)) * 0.05
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))

    def run(z0):
        r = imp_fast.solve(lambda z: torch.tanh(z @ W.T + x), z0, method=method, max_iter=12, tol=1e-6,
                           check_every=None, backend="reference")
        return r.z, r.status, r.n_iter

    eager = run(torch.zeros(4, 16))
    compiled = torch.compile(run, fullgraph=True, backend="eager")(torch.zeros(4, 16))
    torch.testing.assert_close(compiled[0], eager[0])
    assert torch.equal(compiled[1], eager[1]) and torch.equal(compiled[2], eager[2])


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)], ids=["float64", "float32"])
@pytest.mark.parametrize("beta", [1.0, 0.8])
def test_steps_match_a_float64_hand_computation(dtype, rtol, beta):
    """The ground truth itself, against numpy in float64 (not against another form of the
    same code): one Picard and one Anderson step with a half-filled history."""
    np = pytest.importorskip("numpy")
    B, D, m, lam, eps = 3, 7, 3, 1e-3, 1e-9
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(B, D, generator=gen, dtype=torch.float64).to(dtype)
    fz = torch.randn(B, D, generator=gen, dtype=torch.float64).to(dtype)
    Fh = torch.randn(B, 2, D, generator=gen, dtype=torch.float64).to(dtype)
    Gh = torch.randn(B, 2, D, generator=gen, dtype=torch.float64).to(dtype)
    p = StepParams(tol=1e-30, beta=beta, stop_rel=True, divergence=1e6, eps=eps, lam=lam)
    zn, fn, Fn, Gn = (t.double().numpy() for t in (z, fz, Fh, Gh))

    # Picard
    st = LoopState.create(z.clone(), m=None, return_best=False)
    reference.picard_step(st, fz, p)
    g = fn - zn
    np.testing.assert_allclose(st.abs_res.double().numpy(), np.linalg.norm(g, axis=1), rtol=rtol)
    np.testing.assert_allclose(st.rel_res.double().numpy(),
                               np.linalg.norm(g, axis=1) / (np.linalg.norm(fn, axis=1) + eps), rtol=rtol)
    np.testing.assert_allclose(st.z.double().numpy(), zn + beta * g, rtol=rtol, atol=rtol)
    assert st.n_iter.tolist() == [1] * B and st.status.tolist() == [0] * B

    # Anderson, slot 2 of 3 (slots 0, 1 written)
    st = LoopState.create(z.clone(), m=m, return_best=False)
    st.F[:, :2], st.G[:, :2] = Fh, Gh
    st.H[:, :2, :2] = (Gh.double() @ Gh.double().transpose(1, 2)).to(st.H.dtype)
    reference.anderson_step(st, fz, p, 2)
    for b in range(B):
        Gb = np.concatenate([Gn[b], g[b][None]])
        Fb = np.concatenate([Fn[b], fn[b][None]])
        H = Gb @ Gb.T
        x = np.linalg.solve(H + lam * H[2, 2] * np.eye(m), np.ones(m))
        a = x / x.sum()
        np.testing.assert_allclose(st.H[b].double().numpy(), H, rtol=rtol, atol=rtol * np.abs(H).max())
        np.testing.assert_allclose(st.z[b].double().numpy(), a @ (Fb - (1 - beta) * Gb), rtol=rtol * 10,
                                   atol=rtol * 10)
