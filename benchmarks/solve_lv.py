"""Benchmark: diffode Tsit5 vs diffrax Tsit5 (and jax.experimental.ode.odeint)
on Lotka-Volterra, float64, rtol = atol = 1e-6, 100 save points.

Run from the repository root::

    python -m benchmarks.solve_lv                 # full run
    python -m benchmarks.solve_lv --quick         # fewer repetitions
    python -m benchmarks.solve_lv --json out.json # also write the results as JSON

Measured per candidate (each a ``jax.jit`` function of ``(y0, args)`` returning
the saved states; see ``benchmarks/_timing.py`` for the timing conventions):

* compile time: median wall time of the first call after ``jax.clear_caches()``
  (after one discarded warm-up round);
* run time: median over repeats of the mean time per (blocked) call;
* steps and right-hand-side evaluations, counted exactly at run time;
* max abs error over the save points against SciPy DOP853 at rtol = atol = 1e-13.

The target checks at the end are reported, not asserted: the script exits 0
whatever they say.
"""

from __future__ import annotations

import jax

# The benchmark runs in float64; diffode itself never switches x64 on.
jax.config.update("jax_enable_x64", True)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import io_callback  # noqa: E402

import diffode  # noqa: E402
from diffode.problems import lotka_volterra, lotka_volterra_reference  # noqa: E402

from . import _timing  # noqa: E402

NUM_SAVE = 100

RTOL = ATOL = 1e-6
REF_TOL = 1e-13
REFERENCE = "diffrax"  # ratios are relative to this candidate

# ---------------------------------------------------------------------------
# Candidates. Each factory takes the right-hand side f(t, y, args) and the save
# times and returns solve(y0, args) -> (ys, stats), stats a dict of int arrays
# (possibly empty). The timed function keeps only ys; stats are read from a
# separate (untimed) call.
# ---------------------------------------------------------------------------


def make_diffode(f, ts):
    solver = diffode.Tsit5()

    def solve(y0, args):
        sol = diffode.solve(f, y0, ts, args, solver=solver, rtol=RTOL, atol=ATOL)
        return sol.ys, dict(num_steps=sol.stats["num_steps"], num_fevals=sol.stats["num_fevals"])

    return solve


def make_diffrax(f, ts):
    import diffrax

    term = diffrax.ODETerm(f)
    solver = diffrax.Tsit5()
    controller = diffrax.PIDController(rtol=RTOL, atol=ATOL)
    saveat = diffrax.SaveAt(ts=ts)

    def solve(y0, args):
        sol = diffrax.diffeqsolve(
            term, solver, ts[0], ts[-1], None, y0, args, saveat=saveat, stepsize_controller=controller
        )
        # diffrax's num_steps counts attempted steps (accepted + rejected), like diffode's.
        return sol.ys, dict(num_steps=sol.stats["num_steps"])

    return solve


def make_odeint(f, ts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from jax.experimental.ode import odeint

    def solve(y0, args):
        # odeint: Dormand-Prince 5(4) with its own controller; reports no statistics.
        return odeint(lambda y, t, a: f(t, y, a), y0, ts, args, rtol=RTOL, atol=ATOL), {}

    return solve


def candidates() -> dict[str, Callable]:
    out: dict[str, Callable] = {"diffode": make_diffode, "diffrax": make_diffrax}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jax.experimental.ode import odeint  # noqa: F401
    except Exception as e:  # removed from newer JAX: skip the third reference
        print(
            f"# jax.experimental.ode.odeint unavailable ({type(e).__name__}: {e}); skipped", file=sys.stderr
        )
    else:
        out["odeint"] = make_odeint
    return out


# ---------------------------------------------------------------------------
# Exact evaluation counting: an io_callback increments a Python counter each
# time the right-hand side actually runs. It is compiled into a separate,
# untimed function, so it never affects the timings. (Formulas such as
# "6 * num_steps + 2" for Tsit5 depend on each library's bookkeeping of the
# first-same-as-last stage and of the initial step selection; counting avoids
# guessing: e.g. diffrax 0.7.2 spends 6 per attempted step plus 1.)
# ---------------------------------------------------------------------------


def count_fevals(factory, f, ts, y0, args) -> int:
    calls = [0]

    def bump():
        calls[0] += 1

    def counted(t, y, a):
        io_callback(bump, None, ordered=False)
        return f(t, y, a)

    fn = jax.jit(factory(counted, ts))
    jax.block_until_ready(fn(y0, args))
    jax.effects_barrier()
    return calls[0]


def reference_solution(ts) -> np.ndarray:
    """SciPy DOP853 at rtol = atol = 1e-13 (the shared reference of diffode/problems.py)."""
    return np.asarray(lotka_volterra_reference(ts))


# ---------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import diffrax
    import scipy

    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--", "diffode"], cwd=root, capture_output=True, text=True
            ).stdout.strip()
        )
    except Exception:
        commit, dirty = None, None
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=commit,
        diffode_dirty=dirty,
        python=platform.python_version(),
        platform=platform.platform(),
        machine=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        load_avg_1min=os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        jax=jax.__version__,
        backend=jax.default_backend(),
        devices=[str(d) for d in jax.devices()],
        diffode=diffode.__version__,
        diffrax=diffrax.__version__,
        scipy=scipy.__version__,
        numpy=np.__version__,
    )


def run(
    quick: bool = False, compile_repeats: int | None = None, run_repeats: int | None = None
) -> dict[str, Any]:
    compile_repeats = compile_repeats or (3 if quick else 5)
    run_repeats = run_repeats or (5 if quick else 7)
    min_time = 0.05 if quick else 0.2

    env = environment()  # before measuring, so that the load average is other processes'
    p = lotka_volterra(jnp.float64)
    y0, args, ts = p.y0, p.args, p.ts(NUM_SAVE)
    factories = candidates()

    timed = {n: jax.jit(lambda y0, a, s=fac(p.f, ts): s(y0, a)[0]) for n, fac in factories.items()}
    with_stats = {n: jax.jit(fac(p.f, ts)) for n, fac in factories.items()}
    pairs = {n: (fn, (y0, args)) for n, fn in timed.items()}

    print(f"# compile time: 1 + {compile_repeats} interleaved cold first calls each ...", file=sys.stderr)
    ctimes = _timing.compile_times(pairs, repeats=compile_repeats, warmup=1)
    print(f"# run time: {run_repeats} interleaved repeats each ...", file=sys.stderr)
    rtimes = _timing.run_times(pairs, repeats=run_repeats, min_time=min_time)

    ref = reference_solution(ts)
    results: dict[str, Any] = {}
    for n, fac in factories.items():
        ys, stats = jax.block_until_ready(with_stats[n](y0, args))
        stats = {k: int(v) for k, v in stats.items()}
        fevals = count_fevals(fac, p.f, ts, y0, args)
        if "num_fevals" in stats and stats["num_fevals"] != fevals:
            print(
                f"# WARNING: {n} reports num_fevals={stats['num_fevals']} but {fevals} were counted",
                file=sys.stderr,
            )
        results[n] = dict(
            compile_s=ctimes[n].as_dict(),
            run_s=rtimes[n].as_dict(),
            num_steps=stats.get("num_steps"),
            fevals=fevals,
            fevals_reported=stats.get("num_fevals"),
            max_abs_error=float(np.max(np.abs(np.asarray(ys) - ref))),
        )
    base = results[REFERENCE]
    for r in results.values():
        r["compile_ratio"] = r["compile_s"]["median"] / base["compile_s"]["median"]
        r["run_ratio"] = r["run_s"]["median"] / base["run_s"]["median"]

    d, x = results["diffode"], results["diffrax"]
    fe_dev = d["fevals"] / x["fevals"] - 1
    targets = [
        dict(
            name="run time",
            passed=d["run_s"]["median"] <= x["run_s"]["median"],
            text=f"diffode {d['run_s']['median'] * 1e3:.3f} ms <= diffrax {x['run_s']['median'] * 1e3:.3f} ms "
            f"(ratio {d['run_ratio']:.2f})",
        ),
        dict(
            name="compile time",
            passed=d["compile_s"]["median"] <= 0.5 * x["compile_s"]["median"],
            text=f"diffode {d['compile_s']['median']:.3f} s <= 0.5 x diffrax {x['compile_s']['median']:.3f} s "
            f"= {0.5 * x['compile_s']['median']:.3f} s (ratio {d['compile_ratio']:.2f})",
        ),
        dict(
            name="fevals",
            passed=abs(fe_dev) <= 0.10,
            text=f"|{d['fevals']} / {x['fevals']} - 1| = {abs(fe_dev):.3f} <= 0.10",
        ),
    ]
    return dict(
        benchmark="solve_lv",
        problem=dict(
            name=p.name,
            y0=np.asarray(y0).tolist(),
            args=np.asarray(args).tolist(),
            t_span=[float(ts[0]), float(ts[-1])],
            num_save=int(ts.shape[0]),
            dtype="float64",
            rtol=RTOL,
            atol=ATOL,
            reference=f"scipy DOP853 rtol=atol={REF_TOL:g}",
        ),
        settings=dict(
            quick=quick,
            compile_repeats=compile_repeats,
            compile_warmup=1,
            run_repeats=run_repeats,
            run_min_time_s=min_time,
            ratios_relative_to=REFERENCE,
        ),
        environment=env,
        results=results,
        targets=targets,
    )


def markdown_table(out: dict[str, Any]) -> str:
    head = (
        "| candidate | compile (s, median) | run (ms, median) | compile / diffrax | run / diffrax "
        "| num_steps | fevals | max error |"
    )
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for n, r in out["results"].items():
        steps = "n/a" if r["num_steps"] is None else str(r["num_steps"])
        lines.append(
            f"| {n} | {r['compile_s']['median']:.3f} | {r['run_s']['median'] * 1e3:.3f} "
            f"| {r['compile_ratio']:.2f} | {r['run_ratio']:.2f} | {steps} | {r['fevals']} "
            f"| {r['max_abs_error']:.2e} |"
        )
    return "\n".join(lines)


def report(out: dict[str, Any]) -> str:
    e, s, p = out["environment"], out["settings"], out["problem"]
    lines = [
        f"Lotka-Volterra, float64, rtol = atol = {p['rtol']:g}, {p['num_save']} save points on "
        f"[{p['t_span'][0]:g}, {p['t_span'][1]:g}]; error vs {p['reference']}.",
        f"jax {e['jax']} ({e['backend']}), diffode {e['diffode']} @ {(e['git_commit'] or '?')[:10]}"
        f"{' (diffode/ modified)' if e['diffode_dirty'] else ''}, diffrax {e['diffrax']}; "
        f"{e['cpu_count']} CPUs, {e['platform']}.",
        f"Compile: median of {s['compile_repeats']} cold first calls (after {s['compile_warmup']} discarded); run: median of {s['run_repeats']} "
        f"repeats (calls per repeat: "
        + ", ".join(f"{n} {r['run_s']['number']}" for n, r in out["results"].items())
        + ").",
        "",
        markdown_table(out),
        "",
        "Spread (min-max): "
        + "; ".join(
            f"{n} compile {r['compile_s']['min']:.3f}-{r['compile_s']['max']:.3f} s, "
            f"run {r['run_s']['min'] * 1e3:.3f}-{r['run_s']['max'] * 1e3:.3f} ms"
            for n, r in out["results"].items()
        )
        + ".",
    ]
    load, ncpu = e.get("load_avg_1min"), e.get("cpu_count") or 1
    if load is not None and load > 0.5 * ncpu:
        lines.append(
            f"Note: 1-min load average was {load:.2f} on {ncpu} CPUs at the start; "
            "other processes may have inflated the timings."
        )
    lines.append("")
    lines += [f"{'PASS' if t['passed'] else 'FAIL'} {t['name']}: {t['text']}" for t in out["targets"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.solve_lv", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument("--results", action="store_true", help="write the report into its section of RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument("--compile-repeats", type=int, default=None, help="cold first calls per candidate")
    ap.add_argument("--run-repeats", type=int, default=None, help="run-time repeats per candidate")
    a = ap.parse_args(argv)
    out = run(quick=a.quick, compile_repeats=a.compile_repeats, run_repeats=a.run_repeats)
    sys.stderr.flush()
    text = report(out)
    print(text, flush=True)
    if a.results:
        _timing.write_section("solve_lv", text)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=2)
            fh.write("\n")
        print(f"# wrote {a.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
