"""Reference backend: each step written with plain PyTorch ops.

This is the ground truth every other backend is tested against, and the fallback on
any device. The numerical rules every backend follows (tests check each of them against
independent float64 computations, on every backend):

* Norms are per sample, L2 over D, **scale-safe**: correct up to rounding for any finite
  input however large or small its entries (no overflow of the sum of squares, no
  underflow), rounded to the compute dtype (float64 for float64 storage, else
  float32). Non-finite entries give a non-finite norm. Here: float32 and narrower
  inputs are reduced in float64; float64 inputs are scaled by their largest magnitude.
* rel = abs / (||f(z)|| + eps), and rel = 0 where abs = 0: an exact fixed point is
  converged whatever eps (even eps = 0 with f(z) = 0).
* Status tests in this order: abs not finite -> NONFINITE (f returned NaN/Inf; or, in
  the extreme, ||f(z) - z|| itself exceeds the compute dtype's range); res < tol ->
  CONVERGED; abs > divergence * abs0 -> DIVERGED.
* The update of a sample still running: the Anderson mix when it is usable (below),
  else the damped Picard update z + beta (f(z) - z) (exactly f(z) for beta = 1). If
  that update, rounded to the storage dtype, has a non-finite entry (e.g. float16
  overflow with beta > 1), the sample is flagged NONFINITE instead and keeps its z
  (the last finite iterate) and its n_iter.
* Anderson: the Gram matrix H = G G^T is kept in the compute dtype, not rescaled. The
  bordered system (H + lam * H_ss I) a = 1 (s the newest slot) is formed and solved
  **in float64 on every backend** (H's entries widened, ridge lam * H_ss in float64, LU
  with partial pivoting), the weights a / sum(a) normalised in float64 and rounded to
  the compute dtype. The mix sum_i a_i (F_i - (1 - beta) G_i) is used when every entry
  of it, rounded to the storage dtype, is finite; otherwise (singular system: a zero
  pivot makes the weights non-finite; a Gram entry that overflowed, i.e. residual
  norms beyond ~1.8e19 in float32; an extrapolation that overflows) the sample takes
  the damped Picard update that step.

Each step exists in two forms that compute the same thing (tests check it):

* ``plain_picard_step`` / ``plain_anderson_step`` state the semantics straightforwardly;
  torch.compile traces them.
* ``picard_step`` / ``anderson_step`` (eager) are written for op count, since at small
  sizes per-op dispatch is what a solve spends its time on: constants (status codes,
  tol, eps, ...) are cached 0-dim tensors, because an op with a Python-scalar operand
  first wraps it in a tensor (about 1 us each at (8, 256)); views and scratch buffers
  are made once per solve (``LoopState.cache``); the running mask and divergence bound
  are reused until the status / abs0 tensors are written (version counters); results
  go in place into the state with ``out=``; the small system is solved with an in-place
  LU and two triangular solves.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch

from ..result import Status
from ..state import LoopState, StepParams

__all__ = ["picard_step", "anderson_step", "plain_picard_step", "plain_anderson_step", "pair_ratios", "NAME"]

NAME = "reference"

_consts: Dict[Tuple, Tuple[torch.Tensor, ...]] = {}
_MAX_CONSTS = 256  # many distinct (params, dtype, device) keys: start over, do not grow


def _cached(key: Tuple, make) -> Tuple[torch.Tensor, ...]:
    hit = _consts.get(key)
    if hit is None:
        if len(_consts) >= _MAX_CONSTS:
            _consts.clear()
        hit = _consts[key] = make()
    return hit


def _codes(device: torch.device) -> Tuple[torch.Tensor, ...]:
    """0-dim int8 status codes: RUNNING, CONVERGED, DIVERGED, NONFINITE."""
    return _cached(("codes", device), lambda: tuple(
        torch.tensor(int(s), dtype=torch.int8, device=device)
        for s in (Status.RUNNING, Status.CONVERGED, Status.DIVERGED, Status.NONFINITE)
    ))


def _scalars(p: StepParams, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, ...]:
    """0-dim tensors tol, eps, divergence, +inf, 0 in the compute dtype."""
    return _cached(("scalars", p, dtype, device), lambda: tuple(
        torch.tensor(v, dtype=dtype, device=device) for v in (p.tol, p.eps, p.divergence, float("inf"), 0.0)
    ))


def _ridge_eye_ones(m: int, B: int, lam: float, dtype: torch.dtype, device: torch.device):
    """lam * I (m, m) and the (B, m, 1) right-hand side of ones, cached."""
    return _cached(("ridge_eye", m, B, lam, dtype, device), lambda: (
        torch.eye(m, dtype=dtype, device=device).mul_(lam),
        torch.ones(B, m, 1, dtype=dtype, device=device),
    ))


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


class _Cols(NamedTuple):
    """(B, 1) views of the per-sample state (a view op costs about 1 us: made once).
    ``res``/``best``: (2, B, 1) views over (abs, rel) when LoopState.create packed them
    into one (2, B) tensor (else None); ``scratch`` (2, B, 1) holds a step's new
    residuals, ``new_abs``/``new_rel`` are its rows; ``code`` (B, 1) the new codes."""

    status: torch.Tensor
    n_iter: torch.Tensor
    abs_res: torch.Tensor
    rel_res: torch.Tensor
    abs0: torch.Tensor
    best_abs: Optional[torch.Tensor]
    best_rel: Optional[torch.Tensor]
    res: Optional[torch.Tensor]
    best: Optional[torch.Tensor]
    new_abs: torch.Tensor
    new_rel: torch.Tensor
    scratch: torch.Tensor
    code: torch.Tensor


def _adjacent(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    """b directly follows a in one storage (how LoopState.create lays out its pairs).
    Never while tracing (torch.compile): data pointers are not available there, and the
    unpacked path is traced instead."""
    if a is None or b is None or a.dtype != b.dtype or torch.compiler.is_compiling():
        return False
    if not (a.is_contiguous() and b.is_contiguous()):
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    return b.data_ptr() - a.data_ptr() == a.numel() * a.element_size()


def _pair(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(2, B, 1) view over a and b when b directly follows a in one storage, else None."""
    return a.as_strided((2, a.numel(), 1), (a.numel(), 1, 1)) if _adjacent(a, b) else None


def _cols(st: LoopState) -> _Cols:
    c = st.cache.get("cols")
    if c is None:
        def col(t):
            return None if t is None else t.unsqueeze(1)

        scratch = torch.empty(2, st.z.shape[0], 1, dtype=st.abs_res.dtype, device=st.z.device)
        c = st.cache["cols"] = _Cols(
            *(col(t) for t in (st.status, st.n_iter, st.abs_res, st.rel_res, st.abs0, st.best_abs, st.best_rel)),
            _pair(st.abs_res, st.rel_res), _pair(st.best_abs, st.best_rel), scratch[0], scratch[1], scratch,
            torch.empty(st.z.shape[0], 1, dtype=st.status.dtype, device=st.z.device),
        )
    return c


def _slot_views(st: LoopState, slot: int) -> Tuple[torch.Tensor, ...]:
    """F_i and G_i (B, D), G_i as (B, 1, D), H's row i and column i (B, m), H_ii (B, 1, 1),
    and (G_i, F_i) as one (2, B, D) view when LoopState.create put G and F in one buffer
    with G first (else None)."""
    hit = st.cache.get(slot)
    if hit is None:
        g_i, f_i = st.G.select(1, slot), st.F.select(1, slot)
        gf_i = None
        if _adjacent(st.G, st.F):
            gf_i = g_i.as_strided((2,) + tuple(g_i.shape), (st.G.numel(),) + g_i.stride())
        hit = st.cache[slot] = (f_i, g_i, g_i.unsqueeze(1), st.H.select(1, slot), st.H.select(2, slot),
                                st.H[:, slot:slot + 1, slot:slot + 1], gf_i)
    return hit


def _versioned(st: LoopState, key: str, source: torch.Tensor, make):
    """make() cached until ``source`` is written to (tensor version counters count
    in-place writes, so a stale value is never used). Inference-mode tensors have no
    version counter, and tracing gains nothing from it: there make() runs every time."""
    track = st.cache.get("track_versions")
    if track is None:
        track = st.cache["track_versions"] = not (source.is_inference() or torch.compiler.is_compiling())
    if not track:
        return make()
    hit = st.cache.get(key)
    if hit is None or hit[0] != source._version:
        hit = st.cache[key] = (source._version, make())
    return hit[1]


class _Consts(NamedTuple):
    tol: torch.Tensor
    eps: torch.Tensor
    divergence: torch.Tensor
    inf: torch.Tensor
    fzero: torch.Tensor
    running: torch.Tensor
    converged: torch.Tensor
    diverged: torch.Tensor
    nonfinite: torch.Tensor


def _consts_for(st: LoopState, p: StepParams) -> _Consts:
    """The step's 0-dim constants, looked up once per solve (kept in ``st.cache``)."""
    c = st.cache.get(p)
    if c is None:
        c = st.cache[p] = _Consts(*_scalars(p, st.abs_res.dtype, st.z.device), *_codes(st.status.device))
    return c


SOLVE_DTYPE = torch.float64  # the small Anderson system is solved in float64 on every backend


def _safe_norms(x: torch.Tensor, out: torch.Tensor, buf: Optional[torch.Tensor] = None) -> torch.Tensor:
    """L2 norms of x over its last dim into ``out`` (x's shape with last dim 1), scale-safe.

    Inputs narrower than float64 are reduced in float64 (the sum of squares of float32
    values can neither overflow nor underflow there), through ``buf`` (float64, shaped
    like out) when given. float64 inputs are divided by their largest magnitude first.
    A NaN entry gives NaN, an infinite one +inf.
    """
    if x.dtype != torch.float64:
        if out.dtype == torch.float64:
            return torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float64, out=out)
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float64, out=buf)
        return out.copy_(n)
    s = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True)  # max |x|, NaN-propagating
    d = torch.where(s > 0, s, torch.ones_like(s))
    n = torch.linalg.vector_norm(x / d, dim=-1, keepdim=True).mul_(d)
    return torch.where(s < float("inf"), n, s, out=out)  # s NaN or inf: the norm is s


def _storage_finite(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1) bool: every entry of row b of x, rounded to ``dtype``, is finite."""
    return torch.isfinite(_cast(x, dtype)).all(dim=1, keepdim=True)


def _residuals_and_status(st: LoopState, fz: torch.Tensor, p: StepParams, c: _Consts, cols: _Cols,
                          g_out=None, gf_out=None) -> torch.Tensor:
    """Shared head of every step: residuals, statuses, best iterate.

    Returns g = f(z) - z in compute dtype. Per-sample quantities are (B, 1) columns so
    that masks broadcast over (B, D) without reshapes. With ``g_out`` (a (B, D) view of
    the Anderson residual history) g is also stored there, written in place when the
    storage dtype is the compute dtype. With ``gf_out`` too (the (2, B, D) view over
    (G_i, F_i), F_i already holding fz), both norms come from one op.
    """
    cdt = st.abs_res.dtype
    abs_r, rel_r = cols.new_abs, cols.new_rel
    buf = _norm_buffer(st, cols) if cdt != torch.float64 else None
    if g_out is not None and g_out.dtype == cdt and fz.dtype == cdt and st.z.dtype == cdt:
        g = torch.sub(fz, st.z, out=g_out)
        if gf_out is not None:  # (||g||, ||fz||) into the (2, B, 1) scratch
            _safe_norms(gf_out, cols.scratch, buf)
        else:
            _safe_norms(g, abs_r, None if buf is None else buf[0])
            _safe_norms(fz, rel_r, None if buf is None else buf[1])
    else:
        g = _cast(fz, cdt) - _cast(st.z, cdt)
        if g_out is not None:
            g_out.copy_(g)
        if buf is not None:  # both norms in float64 into buf, one copy into the scratch
            torch.linalg.vector_norm(g, dim=1, keepdim=True, dtype=torch.float64, out=buf[0])
            torch.linalg.vector_norm(fz, dim=1, keepdim=True, dtype=torch.float64, out=buf[1])
            cols.scratch.copy_(buf)
        else:
            _safe_norms(g, abs_r)
            _safe_norms(fz, rel_r)
    torch.div(abs_r, rel_r.add_(c.eps), out=rel_r)
    if p.eps == 0.0:  # abs = 0 and f(z) = 0: 0/0; an exact fixed point is converged (rel 0)
        torch.where(abs_r > c.fzero, rel_r, abs_r, out=rel_r)
    res = rel_r if p.stop_rel else abs_r
    # The mask of running samples, and the divergence bound, change only when the
    # status / abs0 are written: reuse them until then.
    running = _versioned(st, "running", st.status, lambda: cols.status == c.running)
    bound = _versioned(st, "bound", st.abs0, lambda: cols.abs0 * c.divergence)
    # Test order fixes the precedence NONFINITE > CONVERGED > DIVERGED. A norm is >= 0
    # or NaN, so `abs_r < inf` is False exactly for NaN and +inf.
    code = cols.code
    torch.where(abs_r > bound, c.diverged, c.running, out=code)
    tol = c.tol if st.tol is None else st.tol.view(-1, 1)  # per-sample tolerances: a column
    torch.where(res < tol, c.converged, code, out=code)
    torch.where(abs_r < c.inf, code, c.nonfinite, out=code)
    # where(..., out=x) with x also an input is safe: it is elementwise.
    if st.best_z is not None:
        better = running & (res < (cols.best_rel if p.stop_rel else cols.best_abs))
        torch.where(better, st.z, st.best_z, out=st.best_z)
        if cols.best is not None:
            torch.where(better, cols.scratch, cols.best, out=cols.best)
        else:
            torch.where(better, abs_r, cols.best_abs, out=cols.best_abs)
            torch.where(better, rel_r, cols.best_rel, out=cols.best_rel)
    if cols.res is not None:  # abs_res and rel_res in one op
        torch.where(running, cols.scratch, cols.res, out=cols.res)
    else:
        torch.where(running, abs_r, cols.abs_res, out=cols.abs_res)
        torch.where(running, rel_r, cols.rel_res, out=cols.rel_res)
    torch.where(running, code, cols.status, out=cols.status)
    return g


def _norm_buffer(st: LoopState, cols: _Cols) -> torch.Tensor:
    """(2, B, 1) float64 scratch for the norms of float32-compute states (per solve)."""
    buf = st.cache.get("norm64")
    if buf is None:
        buf = st.cache["norm64"] = torch.empty(cols.scratch.shape, dtype=torch.float64, device=st.z.device)
    return buf


def _flag_overflow(st: LoopState, z_new: torch.Tensor, c: _Consts, cols: _Cols) -> None:
    """Samples still running whose update z_new has a non-finite entry once rounded to the
    storage dtype become NONFINITE (and so keep their z and n_iter)."""
    bad = _storage_finite(z_new, st.z.dtype).logical_not_().logical_and_(cols.status == c.running)
    torch.where(bad, c.nonfinite, cols.status, out=cols.status)


def _count_and_move(st: LoopState, z_new: torch.Tensor, c: _Consts, cols: _Cols) -> None:
    """n_iter += 1 and z <- z_new for the samples still running after this step's checks."""
    still = cols.status == c.running
    if st.cache.get("track_versions"):
        st.cache["running"] = (st.status._version, still)  # the next step's running mask
    cols.n_iter.add_(still)
    torch.where(still, _cast(z_new, st.z.dtype), st.z, out=st.z)


def picard_step(st: LoopState, fz: torch.Tensor, p: StepParams) -> None:
    """z <- (1 - beta) z + beta f(z) for running samples; residuals and statuses first.

    With beta = 1 the update is f(z), finite whenever the residual is; otherwise an
    update that overflows the storage dtype flags the sample NONFINITE instead."""
    if torch.compiler.is_compiling():
        return plain_picard_step(st, fz, p)
    c, cols = _consts_for(st, p), _cols(st)
    g = _residuals_and_status(st, fz, p, c, cols)
    z_new = _picard_update(st, fz, g, p.beta)
    if p.beta != 1.0:
        _flag_overflow(st, z_new, c, cols)
    _count_and_move(st, z_new, c, cols)


def _picard_update(st: LoopState, fz: torch.Tensor, g: torch.Tensor, beta: float) -> torch.Tensor:
    """(1 - beta) z + beta f(z) = z + beta g; exactly f(z) when beta is 1."""
    return fz if beta == 1.0 else torch.add(_cast(st.z, g.dtype), g, alpha=beta)


def anderson_step(st: LoopState, fz: torch.Tensor, p: StepParams, slot: int) -> None:
    """Type-II Anderson step with ring buffers and an incrementally updated Gram matrix.

    Writes (f(z), g) into history slot ``slot``, refreshes row/column ``slot`` of the
    Gram matrix H = G G^T, solves (H + lam*||g||^2 I) a = 1 in float64 and normalises a
    to sum 1 (the bordered system's solution), then mixes
    z <- sum_i a_i (F_i - (1 - beta) G_i). A sample whose small system is singular or
    whose mix is not finite in the storage dtype takes the damped Picard step z + beta g
    instead (and is flagged NONFINITE if that overflows; see the module docstring).

    This is the eager form, written for op count (see the module docstring); it computes
    what :func:`plain_anderson_step` states plainly, which is what torch.compile traces.
    """
    if torch.compiler.is_compiling():
        return plain_anderson_step(st, fz, p, slot)
    F, G, H = st.F, st.G, st.H
    cdt = H.dtype
    B, m, D = G.shape
    c, cols = _consts_for(st, p), _cols(st)
    f_i, g_i, g_i3, h_row, h_col, h_ii, gf_i = _slot_views(st, slot)
    f_i.copy_(fz)
    g = _residuals_and_status(st, fz, p, c, cols, g_out=g_i, gf_out=gf_i)
    if g is not g_i:
        g_i3 = g.unsqueeze(1)
    # Row `slot` of H is G_j . g, written in place; the column is its copy. (vecdot
    # beats bmm for this (B, m, D) x (B, 1, D) product on CPU at every size tried.)
    if G.dtype == cdt:
        torch.linalg.vecdot(G, g_i3, out=h_row)
    else:
        h_row.copy_(torch.linalg.vecdot(G.to(cdt), g_i3))
    h_col.copy_(h_row)
    lam_eye, ones, lu, piv, info, y, a, a_row, a_col, mix, mix3 = _anderson_buffers(st, p.lam)
    # float64: H + lam * H_ss I (H's entries and the ridge widened exactly; lam_eye is
    # float64, so the op promotes). With P A = L U and a right-hand side of ones
    # (P 1 = 1), two triangular solves give A^-1 1: cheaper than solve_ex, which also
    # permutes and copies. `lu` is column-major, so LAPACK factorises it in place. A zero
    # pivot divides by zero below: non-finite weights, hence a non-finite mix.
    torch.addcmul(H, h_ii, lam_eye, out=lu)
    torch.linalg.lu_factor_ex(lu, out=(lu, piv, info))
    torch.linalg.solve_triangular(lu, ones, upper=False, unitriangular=True, out=y)
    torch.linalg.solve_triangular(lu, y, upper=True, out=a)
    # normalised in float64, rounded to the compute dtype (a_col: a (B, m, 1) view of a_row)
    torch.div(a, a.sum(dim=1, keepdim=True), out=a_col)
    torch.bmm(a_row, _cast(F, cdt), out=mix3)
    if p.beta != 1.0:
        torch.baddbmm(mix3, a_row, _cast(G, cdt), alpha=-(1.0 - p.beta), out=mix3)
    # One test covers a singular system, overflowed Gram entries and an overflowing
    # extrapolation: the mix rounded to the storage dtype is not finite.
    torch.where(_storage_finite(mix, st.z.dtype), mix, _picard_update(st, fz, g, p.beta), out=mix)
    if p.beta != 1.0:
        _flag_overflow(st, mix, c, cols)
    _count_and_move(st, mix, c, cols)


def _anderson_buffers(st: LoopState, lam: float) -> Tuple[torch.Tensor, ...]:
    """Per-solve constants and scratch: lam*I and ones (B, m, 1) in float64, the float64
    LU factors (column-major), pivots, info, the two triangular solves' results
    (float64), the normalised weights as a (B, 1, m) compute-dtype row with its (B, m, 1)
    transpose view, and the mix (B, D) with its (B, 1, D) view."""
    key = ("anderson", lam)
    hit = st.cache.get(key)
    if hit is None:
        B, m, D = st.G.shape
        cdt, dev, sdt = st.H.dtype, st.H.device, SOLVE_DTYPE
        lam_eye, ones = _ridge_eye_ones(m, B, lam, sdt, dev)
        lu = torch.empty(B, m, m, dtype=sdt, device=dev).mT
        piv = torch.empty(B, m, dtype=torch.int32, device=dev)
        info = torch.empty(B, dtype=torch.int32, device=dev)
        y, a = torch.empty(B, m, 1, dtype=sdt, device=dev), torch.empty(B, m, 1, dtype=sdt, device=dev)
        a_row = torch.empty(B, 1, m, dtype=cdt, device=dev)
        mix = torch.empty(B, D, dtype=cdt, device=dev)
        hit = st.cache[key] = (lam_eye, ones, lu, piv, info, y, a, a_row, a_row.mT, mix, mix.unsqueeze(1))
    return hit


# ----------------------------------------------------------------------------------------
# Plain form: the steps written straightforwardly. They state the semantics the eager
# steps above implement with fewer ops (tests check the two agree), and they are what
# torch.compile traces (no out= into strided views, no data pointers, no version
# counters).


def _plain_norm(x: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """Scale-safe per-row L2 norm (see :func:`_safe_norms`) in the compute dtype."""
    if x.dtype != torch.float64:
        return torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).to(cdt)
    s = torch.linalg.vector_norm(x, ord=float("inf"), dim=1)
    d = torch.where(s > 0, s, torch.ones_like(s))
    n = torch.linalg.vector_norm(x / d[:, None], dim=1) * d
    return torch.where(s < float("inf"), n, s)


def _plain_head(st: LoopState, fz: torch.Tensor, p: StepParams) -> torch.Tensor:
    """Residuals, statuses and best iterate; returns g."""
    cdt = st.abs_res.dtype
    g = _cast(fz, cdt) - _cast(st.z, cdt)
    abs_r = _plain_norm(g, cdt)
    rel_r = abs_r / (_plain_norm(fz, cdt) + p.eps)
    rel_r = torch.where(abs_r == 0, torch.zeros_like(rel_r), rel_r)  # exact fixed point
    res = rel_r if p.stop_rel else abs_r
    running = st.status == 0
    zero, conv, div, nonfin = _codes(st.status.device)
    # Precedence NONFINITE > CONVERGED > DIVERGED; (x - x) != 0 is True for NaN and Inf.
    code = torch.where(abs_r > p.divergence * st.abs0, div, zero)
    code = torch.where(res < (p.tol if st.tol is None else st.tol), conv, code)
    code = torch.where((abs_r - abs_r) != 0, nonfin, code)
    if st.best_z is not None:
        better = running & (res < (st.best_rel if p.stop_rel else st.best_abs))
        torch.where(better[:, None], st.z, st.best_z, out=st.best_z)
        torch.where(better, abs_r, st.best_abs, out=st.best_abs)
        torch.where(better, rel_r, st.best_rel, out=st.best_rel)
    torch.where(running, abs_r, st.abs_res, out=st.abs_res)
    torch.where(running, rel_r, st.rel_res, out=st.rel_res)
    torch.where(running, code, st.status, out=st.status)
    return g


def _plain_move(st: LoopState, z_new: torch.Tensor) -> None:
    """Flag running samples whose update overflows the storage dtype NONFINITE; count
    and move the others."""
    z_new = _cast(z_new, st.z.dtype)
    _, _, _, nonfin = _codes(st.status.device)
    bad = (st.status == 0) & ~torch.isfinite(z_new).all(dim=1)
    st.status.copy_(torch.where(bad, nonfin, st.status))
    still = st.status == 0
    st.n_iter.add_(still)
    torch.where(still[:, None], z_new, st.z, out=st.z)


def plain_picard_step(st: LoopState, fz: torch.Tensor, p: StepParams) -> None:
    """Plain form of :func:`picard_step`."""
    g = _plain_head(st, fz, p)
    _plain_move(st, _picard_update(st, fz, g, p.beta))


def plain_anderson_step(st: LoopState, fz: torch.Tensor, p: StepParams, slot: int) -> None:
    """Plain form of :func:`anderson_step`."""
    g = _plain_head(st, fz, p)
    F, G, H = st.F, st.G, st.H
    cdt = H.dtype
    B, m = H.shape[0], H.shape[1]
    F[:, slot] = fz
    G[:, slot] = g.to(G.dtype)
    row = torch.linalg.vecdot(_cast(G, cdt), g.unsqueeze(1))  # (B, m): G_i . g
    H[:, slot] = row
    H[:, :, slot] = row
    sdt = SOLVE_DTYPE
    eye = torch.eye(m, dtype=sdt, device=H.device)
    ridge = (p.lam * row[:, slot].to(sdt)).view(B, 1, 1)  # relative to the newest residual
    x, info = torch.linalg.solve_ex(H.to(sdt) + ridge * eye, torch.ones(B, m, dtype=sdt, device=H.device))
    a = (x / x.sum(dim=1, keepdim=True)).to(cdt).unsqueeze(1)
    mix = torch.bmm(a, _cast(F, cdt))
    if p.beta != 1.0:
        mix = mix - (1.0 - p.beta) * torch.bmm(a, _cast(G, cdt))
    mix = mix.squeeze(1)
    ok = (info == 0)[:, None] & torch.isfinite(_cast(mix, st.z.dtype)).all(dim=1, keepdim=True)
    _plain_move(st, torch.where(ok, mix, _picard_update(st, fz, g, p.beta)))


def pair_ratios(y: torch.Tensor, dnorm: torch.Tensor, status: torch.Tensor, out: torch.Tensor) -> None:
    """The probes' finite-difference ratios of one iteration, written to ``out``.

    ``y`` is the stacked probe batch flattened to ``((1 + P) * B, D)`` (rows ``0..B-1``
    the unperturbed samples, rows ``(1 + p) * B + b`` sample b under perturbation p),
    ``dnorm`` the ``(P, B)`` norms of the realised input perturbations, ``status`` the
    ``((1 + P) * B,)`` int8 statuses. Writes the ``(B, P)`` ratios
    ``out[b, p] = ||y[(1 + p) B + b] - y[b]|| / dnorm[p, b]`` in ``out``'s dtype (the
    compute dtype), NaN where either row of the pair is NONFINITE. Norms are scale-safe:
    differences in float32 or wider, squares summed in float64 (float64 rows: scaled by
    their largest entry, as the steps' residual norms). The compiled backends' fused
    ops match this.
    """
    P, B = dnorm.shape
    if y.dtype == torch.float64:
        yc = y.view(1 + P, B, -1)
        r = _plain_norm((yc[1:] - yc[:1]).reshape(P * B, -1), torch.float64)
    else:  # float32 differences cannot overflow; their squares are summed in float64
        yc = y.view(1 + P, B, -1)
        if y.dtype != torch.float32:
            yc = yc.float()
        r = torch.linalg.vector_norm((yc[1:] - yc[:1]).reshape(P * B, -1), dim=1, dtype=torch.float64)
    r = r.view(P, B) / dnorm.to(torch.float64)
    bad = (status == int(Status.NONFINITE)).view(1 + P, B)
    r = r.masked_fill(bad[1:] | bad[:1], float("nan"))
    out.copy_(r.t())
