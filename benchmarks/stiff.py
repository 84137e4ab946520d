"""Work-precision benchmark on the stiff problems of the Test Set for IVP Solvers.

Usage (from the repository root)::

    python -m benchmarks.stiff                      # full run (rtol = 1e-4, 1e-5, ..., 1e-10)
    python -m benchmarks.stiff --quick              # rtol = 1e-4, 1e-7, 1e-10, fewer repetitions
    python -m benchmarks.stiff --json out.json --plot out.png

Problems: HIRES, ROBER, VDPOL (eps = 1e-6), OREGO and POLLU from F. Mazzia and
C. Magherini, "Test Set for Initial Value Problem Solvers", release 2.4,
University of Bari, 2008 (``diffode/problems.py`` holds the equations and the
published end-time references). Every solve runs from ``t0`` to ``t1`` in
float64 and keeps only ``y(t1)``.

Candidates, measured in the same run and interleaved (``benchmarks/_timing.py``):

* diffode ``Radau5``, ``Rodas5``, ``Rodas5P`` and ``Kvaerno5``, default
  settings, Jacobians by ``jax.jacfwd``;
* diffrax ``Kvaerno5`` with ``PIDController(rtol, atol)`` (its defaults);
* SciPy ``solve_ivp`` ``Radau`` and ``BDF``, with the right-hand side and its
  ``jax.jacfwd`` Jacobian as jitted JAX functions (warm: run time only).

Every JAX candidate is one ``jax.jit`` function of ``(y0, args, rtol, atol)``:
the tolerances are traced, so one compilation serves all tolerances. All get
``max_steps = 100_000`` and ``throw=False``; a failed solve is reported with its
status and left out of the comparisons.

Measured per candidate, problem and tolerance:

* compile time (per candidate and problem): median wall time of the first call
  after ``jax.clear_caches()`` (after one discarded warm-up round), at the
  loosest tolerance. As everywhere in ``benchmarks/``, that first call includes
  one execution; the table also gives the warm run time at that tolerance;
* run time: median over repeats of the mean time per blocked call;
* steps: accepted steps (SciPy reports only those); ``attempted`` adds
  rejected ones where a library reports them;
* fevals: evaluations of ``f``, not counting Jacobians (``jacfwd``/``jvp``):
  counted exactly for the JAX candidates (an ``io_callback`` in ``f`` whose
  ``custom_jvp`` rule does not count, so differentiated calls are excluded; a
  separate, untimed run), SciPy's ``nfev`` otherwise; ``jac`` is the number of
  Jacobian evaluations where reported;
* accuracy, in correct significant digits against the published reference
  ``r`` at ``t1``, with ``e_i = |y_i(t1) - r_i|``:

  - ``scd = -log10(max_i e_i / |r_i|)``, the test set's "scd": the worst
    relative error over all components. Components whose reference is exactly
    zero would enter with their absolute error (none of these five has one).
    Components near zero are *not* treated specially, so the tiny ones
    dominate where they are resolved worst (ROBER's y2 = 8e-14, POLLU's
    y16 = 4e-17);
  - ``mescd = -log10(max_i e_i / (atol/rtol + |r_i|))``, the test set's "mixed
    error" digits: components below ``atol/rtol`` (fixed per problem here, see
    ``ATOL_OVER_RTOL``) count with their absolute error relative to that floor,
    i.e. the error measure the solvers were asked to control. The plot uses it.

The target check at the end ("at equal tolerances, the faster of Radau5 and
Rodas5 runs in at most half of diffrax Kvaerno5's time (median over the
problems), with no more compile time") is reported, not asserted: the script
exits 0 whatever it says.
"""

from __future__ import annotations

import jax

# The benchmark runs in float64; diffode itself never switches x64 on.
jax.config.update("jax_enable_x64", True)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import io_callback  # noqa: E402

import diffode  # noqa: E402
from diffode.problems import TESTSET, Problem  # noqa: E402
from diffode.problems import TESTSET_ATOL_OVER_RTOL as ATOL_OVER_RTOL  # noqa: E402

from . import _timing  # noqa: E402
from .solve_lv import environment  # noqa: E402

RTOLS_FULL = (1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10)
RTOLS_QUICK = (1e-4, 1e-7, 1e-10)
MAX_STEPS = 100_000

# atol = rtol * ATOL_OVER_RTOL[problem]; see diffode/problems.py.

# The diffode candidates: name -> solver class.
DIFFODE_SOLVERS = {
    "Radau5": diffode.Radau5,
    "Rodas5": diffode.Rodas5,
    "Rodas5P": diffode.Rodas5P,
    "Kvaerno5": diffode.Kvaerno5,
}
REFERENCE = "diffrax Kvaerno5"
TARGET_PAIR = ("Radau5", "Rodas5")


# ---------------------------------------------------------------------------
# Candidates. A JAX candidate factory takes the problem and returns
# solve(y0, args, rtol, atol) -> (y1, stats), stats a dict of int arrays with
# "status" (0 = success) and whatever counters the library reports.
# ---------------------------------------------------------------------------


def make_diffode(solver_cls) -> Callable:
    def factory(p: Problem, f: Callable) -> Callable:
        ts = jnp.asarray([p.t0, p.t1])
        solver = solver_cls()

        def solve(y0, args, rtol, atol):
            sol = diffode.solve(
                f, y0, ts, args, solver=solver, rtol=rtol, atol=atol, max_steps=MAX_STEPS, throw=False
            )
            st = sol.stats
            stats = dict(
                status=sol.status,
                steps=st["num_accepted"],
                attempted=st["num_steps"],
                fevals_reported=st["num_fevals"],
            )
            if "num_jac_evals" in st:
                stats["jac"] = st["num_jac_evals"]
            if "num_lu_decomps" in st:
                stats["lu"] = st["num_lu_decomps"]
            return sol.ys[-1], stats

        return solve

    return factory


def make_diffrax_kvaerno5(p: Problem, f: Callable) -> Callable:
    import diffrax

    term = diffrax.ODETerm(f)
    solver = diffrax.Kvaerno5()

    def solve(y0, args, rtol, atol):
        sol = diffrax.diffeqsolve(
            term,
            solver,
            p.t0,
            p.t1,
            None,
            y0,
            args,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=MAX_STEPS,
            throw=False,
        )
        status = jnp.where(sol.result == diffrax.RESULTS.successful, 0, 1)
        return sol.ys[-1], dict(
            status=status, steps=sol.stats["num_accepted_steps"], attempted=sol.stats["num_steps"]
        )

    return solve


def jax_candidates() -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    for name, solver_cls in DIFFODE_SOLVERS.items():
        out[name] = make_diffode(solver_cls)
    out[REFERENCE] = make_diffrax_kvaerno5
    return out


def scipy_candidate(method: str, p: Problem) -> tuple[Callable, Callable]:
    """``(run, stats)``: ``run(rtol, atol)`` returns ``y(t1)``; ``stats(rtol, atol)`` a dict."""
    from scipy.integrate import solve_ivp

    f = jax.jit(p.f)
    jac = jax.jit(jax.jacfwd(p.f, argnums=1))
    y0 = np.asarray(p.y0)
    fn = lambda t, y: np.asarray(f(t, y, p.args))  # noqa: E731
    jn = lambda t, y: np.asarray(jac(t, y, p.args))  # noqa: E731
    fn(p.t0, y0), jn(p.t0, y0)  # compile both before any timing

    def solve(rtol, atol):
        return solve_ivp(fn, (p.t0, p.t1), y0, method=method, rtol=rtol, atol=atol, jac=jn)

    def run(rtol, atol):
        return solve(rtol, atol).y[:, -1]

    def stats(rtol, atol):
        sol = solve(rtol, atol)
        return sol.y[:, -1], dict(
            status=0 if sol.success else 1,
            steps=len(sol.t) - 1,
            attempted=None,
            fevals=int(sol.nfev),
            jac=int(sol.njev),
            lu=int(sol.nlu),
        )

    return run, stats


# ---------------------------------------------------------------------------
# Exact evaluation counting (as in solve_lv, extended to differentiated f):
# the primal f bumps a Python counter through io_callback; its custom_jvp rule
# calls the plain f, so Jacobian-vector products and jacfwd do not count. One
# untimed compilation per candidate and problem (the tolerances are traced).
# ---------------------------------------------------------------------------


def counted_solver(factory, p: Problem) -> Callable[..., tuple[Any, dict[str, int], int]]:
    """A jitted ``solve`` on a counting copy of ``f``; returns ``(y1, stats, fevals)`` per call.

    The callback receives the state, so a solver that evaluates ``f`` on several
    stages at once (``vmap``, as Radau5 does) counts one evaluation per stage.
    """
    calls = [0]
    n = int(p.y0.shape[0])

    def bump(y):
        calls[0] += int(np.size(y)) // n

    @jax.custom_jvp
    def counted(t, y, a):
        io_callback(bump, None, y, ordered=False)
        return p.f(t, y, a)

    @counted.defjvp
    def _counted_jvp(primals, tangents):
        return jax.jvp(p.f, primals, tangents)

    fn = jax.jit(factory(p, counted))

    def call(*args):
        before = calls[0]
        y1, stats = jax.block_until_ready(fn(*args))
        jax.effects_barrier()
        return y1, {k: int(v) for k, v in stats.items()}, calls[0] - before

    return call


# ---------------------------------------------------------------------------
# Accuracy.
# ---------------------------------------------------------------------------


def _digits(x: float) -> float:
    return float("inf") if x == 0 else -math.log10(x)


def scd(y, ref) -> float:
    """Test-set scd: ``-log10`` of the max relative error (absolute where ``ref_i == 0``)."""
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(y)):
        return float("nan")
    err = np.abs(y - ref)
    scale = np.where(ref == 0, 1.0, np.abs(ref))
    return _digits(float(np.max(err / scale)))


def mescd(y, ref, atol_over_rtol: float) -> float:
    """Test-set mixed-error digits: ``-log10 max_i |y_i - r_i| / (atol/rtol + |r_i|)``."""
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(y)):
        return float("nan")
    return _digits(float(np.max(np.abs(y - ref) / (atol_over_rtol + np.abs(ref)))))


# ---------------------------------------------------------------------------


def run(
    quick: bool = False,
    compile_repeats: int | None = None,
    run_repeats: int | None = None,
    problems: tuple[str, ...] | None = None,
    rtols: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    compile_repeats = compile_repeats or (2 if quick else 5)
    run_repeats = run_repeats or (3 if quick else 5)
    min_time = 0.02 if quick else 0.2
    rtols = tuple(rtols or (RTOLS_QUICK if quick else RTOLS_FULL))

    env = environment()
    factories = jax_candidates()
    makes = [m for m in TESTSET if problems is None or m.__name__ in problems]
    results: dict[str, Any] = {}
    for make in makes:
        p = make()
        ratio = ATOL_OVER_RTOL[p.name]
        tol = lambda r: (jnp.asarray(r, jnp.float64), jnp.asarray(r * ratio, jnp.float64))  # noqa: E731
        timed = {
            n: jax.jit(lambda y0, a, r, at, s=fac(p, p.f): s(y0, a, r, at)[0]) for n, fac in factories.items()
        }
        loose = (p.y0, p.args) + tol(rtols[0])

        # One discarded warm-up round on the first problem only: it absorbs the
        # process's one-time costs; every sample is cold (caches cleared) anyway.
        warmup = 1 if not results else 0
        print(
            f"# {p.name}: compile time, {warmup} + {compile_repeats} interleaved cold first calls each ...",
            file=sys.stderr,
            flush=True,
        )
        ctimes = _timing.compile_times(
            {n: (fn, loose) for n, fn in timed.items()}, repeats=compile_repeats, warmup=warmup
        )
        with_stats = {n: counted_solver(fac, p) for n, fac in factories.items()}
        scipy_fns = {f"scipy {m}": scipy_candidate(m, p) for m in ("Radau", "BDF")}

        per_tol = []
        for rtol in rtols:
            print(
                f"# {p.name}: rtol = {rtol:g}: statistics, then run time, {run_repeats} interleaved "
                "repeats ...",
                file=sys.stderr,
                flush=True,
            )
            targs = (p.y0, p.args) + tol(rtol)
            # Statistics first (untimed runs). A SciPy statistics run is a full
            # solve, so its wall time tells whether calibration can be skipped
            # (one call per sample when a call already lasts min_time).
            row: dict[str, Any] = {}
            wall: dict[str, float] = {}
            for n in factories:
                y1, st, fev = with_stats[n](*targs)
                if "fevals_reported" in st and st["fevals_reported"] != fev:
                    print(
                        f"# WARNING: {n} reports num_fevals={st['fevals_reported']} on {p.name} but {fev} "
                        "were counted",
                        file=sys.stderr,
                    )
                row[n] = dict(st, fevals=fev, y1=np.asarray(y1).tolist())
            for n, (_, stats_fn) in scipy_fns.items():
                t_start = time.perf_counter()
                y1, st = stats_fn(rtol, rtol * ratio)
                wall[n] = time.perf_counter() - t_start
                row[n] = dict(st, y1=np.asarray(y1).tolist())
            pairs = {n: (fn, targs) for n, fn in timed.items()}
            pairs.update({n: (fns[0], (rtol, rtol * ratio)) for n, fns in scipy_fns.items()})
            numbers = {n: (1 if wall.get(n, 0.0) >= min_time else None) for n in pairs}
            rts = _timing.run_times(pairs, repeats=run_repeats, number=numbers, min_time=min_time)
            for n, r in row.items():
                r["run_s"] = rts[n].as_dict()
            for r in row.values():
                ok = r["status"] == 0 and np.all(np.isfinite(r["y1"]))
                r["ok"] = bool(ok)
                r["scd"] = scd(r["y1"], p.reference) if ok else float("nan")
                r["mescd"] = mescd(r["y1"], p.reference, ratio) if ok else float("nan")
            per_tol.append(dict(rtol=rtol, atol=rtol * ratio, results=row))

        results[p.name] = dict(
            t1=p.t1,
            n=int(p.y0.shape[0]),
            atol_over_rtol=ratio,
            compile_s={n: t.as_dict() for n, t in ctimes.items()},
            tolerances=per_tol,
        )

    return dict(
        benchmark="stiff",
        settings=dict(
            quick=quick,
            rtols=list(rtols),
            atol_over_rtol=ATOL_OVER_RTOL,
            max_steps=MAX_STEPS,
            compile_repeats=compile_repeats,
            compile_warmup="1 (first problem only)",
            run_repeats=run_repeats,
            run_min_time_s=min_time,
        ),
        environment=env,
        results=results,
        targets=targets(results),
    )


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's target, per problem: the faster of Radau5 / Rodas5 against diffrax Kvaerno5.

    Run time: per problem, the median over tolerances (where both it and diffrax
    succeeded) of min(Radau5, Rodas5) / diffrax; the target is a median over
    problems <= 0.5. Compile: per problem, the compile time of whichever of the
    two was faster at run time (median over tolerances) against diffrax's; the
    target is a median over problems <= 1.
    """
    have = [n for n in TARGET_PAIR if all(n in r["compile_s"] for r in results.values())]
    if not have or not results:
        why = f"not measured: no diffode {' / '.join(TARGET_PAIR)}"
        return [dict(name="run time", passed=None, text=why)]
    run_ratios, compile_ratios, notes = {}, {}, []
    for pname, r in results.items():
        # Ratios to diffrax at the tolerances where diffrax succeeded, per solver.
        by_solver: dict[str, dict[float, float]] = {n: {} for n in have}
        for row in r["tolerances"]:
            res = row["results"]
            if res[REFERENCE]["ok"]:
                for n in have:
                    if res[n]["ok"]:
                        base = res[REFERENCE]["run_s"]["median"]
                        by_solver[n][row["rtol"]] = res[n]["run_s"]["median"] / base
        # At each tolerance, the faster of the two that succeeded.
        rtols = sorted({t for d in by_solver.values() for t in d}, reverse=True)
        per_tol = [min(d[t] for d in by_solver.values() if t in d) for t in rtols]
        if not per_tol:
            notes.append(f"{pname}: no tolerance where diffrax and one of {'/'.join(have)} both succeeded")
            continue
        run_ratios[pname] = float(np.median(per_tol))
        faster = min(
            (n for n in have if by_solver[n]), key=lambda n: float(np.median(list(by_solver[n].values())))
        )
        compile_ratios[pname] = r["compile_s"][faster]["median"] / r["compile_s"][REFERENCE]["median"]
    if not run_ratios:
        return [dict(name="run time", passed=None, text="; ".join(notes))]
    mr, mc = float(np.median(list(run_ratios.values()))), float(np.median(list(compile_ratios.values())))
    fmt = lambda d: ", ".join(f"{k} {v:.2f}" for k, v in d.items())  # noqa: E731
    excluded = f"; excluded: {'; '.join(notes)}" if notes else ""
    return [
        dict(
            name="run time",
            passed=mr <= 0.5,
            median=mr,
            per_problem=run_ratios,
            text=f"median over problems of min({'/'.join(have)}) / {REFERENCE} = {mr:.3f} <= 0.5 "
            f"({fmt(run_ratios)}){excluded}",
        ),
        dict(
            name="compile time",
            passed=mc <= 1.0,
            median=mc,
            per_problem=compile_ratios,
            text=f"median over problems of compile(faster) / compile({REFERENCE}) = {mc:.2f} <= 1 "
            f"({fmt(compile_ratios)})",
        ),
    ]


# ---------------------------------------------------------------------------
# Reporting.
# ---------------------------------------------------------------------------


def _fmt_int(x) -> str:
    return "n/a" if x is None else str(x)


def tables(out: dict[str, Any]) -> str:
    lines = []
    for pname, r in out["results"].items():
        lines.append(f"### {pname} (n = {r['n']}, t1 = {r['t1']:g}, atol = {r['atol_over_rtol']:g} * rtol)")
        lines.append("")
        lines.append(
            "Compile (s, median of cold first calls at rtol = "
            f"{r['tolerances'][0]['rtol']:g}): "
            + ", ".join(f"{n} {c['median']:.2f}" for n, c in r["compile_s"].items())
        )
        lines.append("")
        head = (
            "| rtol | candidate | run (ms) | run / diffrax | steps | attempted | fevals | jac | scd | mescd |"
        )
        lines += [head, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in r["tolerances"]:
            res = row["results"]
            base = res[REFERENCE]["run_s"]["median"] if res[REFERENCE]["ok"] else None
            for n, x in res.items():
                t = x["run_s"]["median"]
                rel = "n/a" if base is None or not x["ok"] else f"{t / base:.3f}"
                acc = (
                    f"{x['scd']:.2f} | {x['mescd']:.2f}" if x["ok"] else f"FAILED (status {x['status']}) | -"
                )
                lines.append(
                    f"| {row['rtol']:.0e} | {n} | {t * 1e3:.2f} | {rel} | {x['steps']} "
                    f"| {_fmt_int(x['attempted'])} | {x['fevals']} | {_fmt_int(x.get('jac'))} | {acc} |"
                )
        lines.append("")
    return "\n".join(lines)


def report(out: dict[str, Any]) -> str:
    e, s = out["environment"], out["settings"]
    lines = [
        "Stiff Test Set problems (Mazzia and Magherini, release 2.4), float64, y(t1) only; "
        f"rtol in {s['rtols']}, atol = rtol * {s['atol_over_rtol']}.",
        f"jax {e['jax']} ({e['backend']}), diffode {e['diffode']} @ {(e['git_commit'] or '?')[:10]}"
        f"{' (diffode/ modified)' if e['diffode_dirty'] else ''}, diffrax {e['diffrax']}, "
        f"scipy {e['scipy']}; {e['cpu_count']} CPUs, {e['platform']}.",
        f"Compile: median of {s['compile_repeats']} cold first calls (after {s['compile_warmup']} "
        f"discarded); run: median of {s['run_repeats']} repeats.",
        "",
        tables(out),
    ]
    load, ncpu = e.get("load_avg_1min"), e.get("cpu_count") or 1
    if load is not None and load > 0.5 * ncpu:
        lines.append(
            f"Note: 1-min load average was {load:.2f} on {ncpu} CPUs at the start; "
            "other processes may have inflated the timings."
        )
    for t in out["targets"]:
        verdict = "n/a " if t["passed"] is None else ("PASS" if t["passed"] else "FAIL")
        lines.append(f"{verdict} {t['name']}: {t['text']}")
    return "\n".join(lines)


def plot(out: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(out["results"])
    ncols = min(3, len(names) + 1)
    nrows = -(-(len(names) + 1) // ncols)  # one extra panel holds the legend
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), squeeze=False)
    axes = axes.ravel()
    handles = {}
    colors = {n: f"C{i}" for i, n in enumerate(out["results"][names[0]]["tolerances"][0]["results"])}
    for ax, pname in zip(axes, names):
        r = out["results"][pname]
        for n in r["tolerances"][0]["results"]:
            pts = [
                (row["results"][n]["mescd"], row["results"][n]["run_s"]["median"])
                for row in r["tolerances"]
                if row["results"][n]["ok"]
            ]
            if pts:
                x, y = zip(*pts)
                style = "--s" if n.startswith("scipy") else "-o"
                (handles[n],) = ax.plot(x, np.asarray(y) * 1e3, style, ms=4, color=colors[n], label=n)
        ax.set_yscale("log")
        ax.set_title(f"{pname.upper()} (atol = {r['atol_over_rtol']:g} rtol)")
        ax.set_xlabel("mescd (correct digits)")
        ax.set_ylabel("run time (ms)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[len(names) :]:
        ax.axis("off")
    axes[len(names)].legend(
        list(handles.values()),
        list(handles),
        loc="center",
        fontsize=10,
        title="rtol = " + ", ".join(f"{t:g}" for t in out["settings"]["rtols"]),
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stiff", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument("--results", action="store_true", help="write the report into its section of RESULTS.md")
    ap.add_argument("--plot", metavar="PATH", help="save a work-precision plot (PNG, SVG, ...) to PATH")
    ap.add_argument("--quick", action="store_true", help="3 tolerances and fewer repetitions (a few minutes)")
    ap.add_argument("--problems", help="comma-separated subset of: " + ",".join(m.__name__ for m in TESTSET))
    ap.add_argument("--compile-repeats", type=int, default=None, help="cold first calls per candidate")
    ap.add_argument("--run-repeats", type=int, default=None, help="run-time repeats per candidate")
    a = ap.parse_args(argv)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffrax/equinox deprecation chatter
        out = run(
            quick=a.quick,
            compile_repeats=a.compile_repeats,
            run_repeats=a.run_repeats,
            problems=tuple(a.problems.split(",")) if a.problems else None,
        )
    out["settings"]["wall_s"] = time.perf_counter() - start
    sys.stderr.flush()
    text = report(out)
    print(text, flush=True)
    if a.results:
        _timing.write_section("stiff", text)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(_json_safe(out), fh, indent=2)
            fh.write("\n")
        print(f"# wrote {a.json}", file=sys.stderr)
    if a.plot:
        plot(out, a.plot)
        print(f"# wrote {a.plot}", file=sys.stderr)
    print(f"# total {out['settings']['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
