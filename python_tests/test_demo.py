"""The demo's comparison table: matched settings, stated per row."""
import sys

import pytest

from imp_fast.demo import format_table, run_demo

# The reference backend only: Triton rows would run under its interpreter here (slow).
SMALL = dict(batch=2, dim=16, max_iter=300, tol=1e-5, repeats=1, backends=("reference",))


@pytest.fixture(scope="module")
def rows():
    pytest.importorskip("torchdeq.solver")
    return run_demo(**SMALL)


def _row(rows, solver, backend=None):
    hits = [r for r in rows if r["solver"] == solver and (backend is None or r["backend"] == backend)]
    assert hits, f"no row {solver!r} ({backend}) in {[r['solver'] for r in rows]}"
    return hits[0]


def test_rows_for_every_solver_and_both_torchdeq_lams(rows):
    for solver in ("imp_fast picard", "imp_fast anderson"):
        _row(rows, solver, "reference")
    _row(rows, "torchdeq fixed_point_iter", "torchdeq")
    for lam in ("1e-4", "1e-8"):
        _row(rows, f"torchdeq anderson, lam={lam}", "torchdeq")
        _row(rows, f"imp_fast compat anderson_solver, lam={lam}", "compat")


def test_anderson_rows_share_m_tol_and_stop_mode_and_state_the_meaning_of_lam(rows):
    anderson = [r for r in rows if "anderson" in r["solver"]]
    assert len(anderson) >= 5
    for r in rows:
        assert "tol=1e-5 rel" in r["settings"], r
    for r in anderson:
        assert "m=5" in r["settings"], r
    for r in anderson:
        meaning = "relative" if r["solver"].startswith("imp_fast anderson") else "absolute"
        assert f"lam=1e-4 {meaning}" in r["settings"] or f"lam=1e-8 {meaning}" in r["settings"], r


def test_drop_in_takes_as_many_f_evaluations_as_torchdeq_at_the_same_lam(rows):
    for lam in ("1e-4", "1e-8"):
        ours = _row(rows, f"imp_fast compat anderson_solver, lam={lam}")
        theirs = _row(rows, f"torchdeq anderson, lam={lam}")
        assert ours["f_evals"] == theirs["f_evals"] > 0
        assert ours["speedup"] == pytest.approx(theirs["total_ms"] / ours["total_ms"])


def test_broyden_rows_side_by_side_with_torchdeq(rows):
    theirs = _row(rows, "torchdeq broyden_solver", "torchdeq")
    ours = _row(rows, "imp_fast broyden", "reference")
    drop_in = _row(rows, "imp_fast compat broyden_solver", "compat")
    assert ours["baseline"] == drop_in["baseline"] == "torchdeq broyden_solver"
    # The drop-in runs torchdeq's algorithm: the same evaluations to tol on this batch.
    assert drop_in["f_evals"] == theirs["f_evals"] > 0
    assert drop_in["converged"] == theirs["converged"] == 2
    # f evaluations until every sample met tol: the engine's Broyden needs no more
    assert drop_in["evals_to_tol"] == theirs["evals_to_tol"] <= theirs["f_evals"]
    assert ours["converged"] == 2 and ours["evals_to_tol"] <= theirs["evals_to_tol"]


def test_imp_fast_anderson_is_timed_against_the_small_lam_torchdeq_row(rows):
    r = _row(rows, "imp_fast anderson", "reference")
    assert r["baseline"] == "torchdeq anderson, lam=1e-8"
    assert r["speedup"] == pytest.approx(_row(rows, "torchdeq anderson, lam=1e-8")["total_ms"] / r["total_ms"])
    assert r["f_evals"] % 5 == 0 and "host check every 5 evals" in r["settings"]


def test_table_prints_each_rows_settings_and_baseline(rows):
    text = format_table(rows)
    assert "| imp_fast anderson | reference |" in text and "| imp_fast picard | reference |" in text
    for r in rows:
        assert f"- {r['solver']}: {r['settings']}" in text
    assert "speedup vs 'torchdeq anderson, lam=1e-8'" in text
    assert "no single value converts one into the other" in text


def test_without_torchdeq_the_rows_have_no_baseline(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdeq.solver", None)  # import fails
    monkeypatch.setitem(sys.modules, "torchdeq.solver.stat", None)
    rows = run_demo(**SMALL, torchdeq_lams=(1e-8,))
    assert not any(r["backend"] == "torchdeq" for r in rows)
    compat = _row(rows, "imp_fast compat anderson_solver, lam=1e-8", "compat")
    assert compat["baseline"] is None and compat["speedup"] != compat["speedup"]
    format_table(rows)


def test_unavailable_backend_is_named():
    with pytest.raises(ValueError, match="'nope'"):
        run_demo(**{**SMALL, "backends": ("nope",)}, include_torchdeq=False)


def test_adaptive_demo_rows_and_table():
    from imp_fast.demo import format_adaptive_table, run_adaptive_demo

    rows = run_adaptive_demo(12, 48, tol=1e-5, max_iter=500, repeats=1, include_torchdeq=False)
    assert [(r["solver"], r["compact"]) for r in rows] == [
        (f"imp_fast {m}", c) for m in ("picard", "anderson", "broyden") for c in (False, True)
    ]
    for whole, comp in zip(rows[::2], rows[1::2]):
        assert comp["converged"] == whole["converged"] == 12
        assert comp["f_rows"] < whole["f_rows"]  # active sets evaluate fewer rows
        assert comp["n_max"] > comp["n_min"]  # the batch is heterogeneous
    table = format_adaptive_table(rows)
    assert "| imp_fast picard | yes |" in table and "f-rows" in table
