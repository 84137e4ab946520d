"""The adjoint benchmark harness (``python -m benchmarks.adjoints``) runs, writes its table,
CSV and plot, computes gradients that agree with its references, and records a failing
candidate as a table entry instead of crashing."""

import csv
import os

from benchmarks import adjoints


def test_quick_run_writes_results_and_survives_a_failure(tmp_path, monkeypatch):
    def broken(case):
        raise RuntimeError("this candidate always fails")

    monkeypatch.setitem(adjoints.METHODS, "broken candidate", broken)
    rows = adjoints.run(
        ["lotka_volterra", "pkpd"],
        ["diffode Direct", "diffode Auto", "jax odeint", "broken"],
        quick=True,
        out=str(tmp_path),
    )
    assert {r["method"] for r in rows} == {
        "diffode Direct",
        "diffode Direct(checkpoints=16)",
        "diffode Auto",
        "jax odeint",
        "broken candidate",
    }  # --methods keeps names that contain a filter
    for r in rows:
        if r["method"] == "broken candidate":
            assert r["status"].startswith("failed: RuntimeError")
        else:
            # rtol 1e-6 solves against SciPy references at 1e-12: errors ~1e-5 at most.
            assert (
                r["status"] == "ok" and r["grad_rel_error"] < 1e-3 and r["run_ms"] > 0 and r["compile_s"] > 0
            )
    text = (tmp_path / "RESULTS.md").read_text()
    assert "### Lotka-Volterra" in text and "### PK/PD" in text and "failed: RuntimeError" in text
    assert text.count("<!-- begin adjoints -->") == 1
    with open(tmp_path / "adjoints.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)
    assert os.path.getsize(tmp_path / "adjoints_run.png") > 0


def test_merge_replaces_only_the_rows_measured_again(tmp_path):
    first = adjoints.run(["lotka_volterra"], ["diffode Auto", "jax odeint"], quick=True, out=str(tmp_path))
    kept = next(r for r in first if r["method"] == "jax odeint")
    rows = adjoints.run(["lotka_volterra"], ["diffode Auto"], quick=True, out=str(tmp_path), merge=True)
    assert [r["method"] for r in rows] == ["diffode Auto", "jax odeint"]
    again = next(r for r in rows if r["method"] == "jax odeint")
    assert (
        again["run_ms"] == kept["run_ms"] and again["reference"] == kept["reference"]
    )  # read back from the CSV
    assert "Lotka-Volterra: reference SciPy Radau" in (tmp_path / "RESULTS.md").read_text()


def test_ensembles_benchmark_runs_and_agrees_with_diffrax():
    """``python -m benchmarks.ensembles`` at a tiny size: every mode and candidate is measured,
    the report renders, and each diffode result agrees with diffrax's. Both solve Lotka-Volterra
    at rtol = atol = 1e-6, so their saves and gradients differ by the tolerance's effect on
    ~10 periods of integration, measured ~1e-5 relative; 1e-3 leaves room without hiding a
    wrong gradient (a sign error or a dropped term is O(1))."""
    from benchmarks import ensembles

    out = ensembles.run(quick=True, sizes=(3,), problems=("lotka_volterra",))
    rows = out["results"]
    assert {r["mode"] for r in rows} == set(ensembles.MODES)
    for r in rows:
        assert r["members"] == 3 and r["members_per_s"] > 0
        if r["candidate"].startswith("diffode"):
            assert r["agreement"] is not None and r["agreement"] < 1e-3, r
    assert "members" in ensembles.report(out)
