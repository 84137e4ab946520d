"""Benchmark: large states (issue 13), diffode against diffrax from n = 1e3 to 1e6.

Run from the repository root::

    python -m benchmarks.large_state                 # full run (about 10 minutes)
    python -m benchmarks.large_state --quick         # a small subset
    python -m benchmarks.large_state --json benchmarks/large_state.json

Three groups of cases, each candidate measured in the same run as its peers and
interleaved with them (``benchmarks/_timing.py``):

* explicit: ``y' = -a y``, ``y0 = 1``, Tsit5, rtol = 1e-3, atol = 1e-6, t in
  [0, 1], saved at t = 0 and 1 (and at 11 times in two extra cases), float64 at
  n = 1e3 to 1e6 and float32 at 1e6. diffode's default (stages looped below
  ``diffode.solvers.explicit_rk.UNROLL_MIN_SIZE`` components, unrolled from there) and
  ``Tsit5(stage_loop=True)`` against diffrax ``Tsit5`` + ``PIDController``;
* implicit: ``y' = -a lam y`` with ``lam`` cycling through 1, 10, 100, 1000
  (stiff, diagonal), Kvaerno5, rtol = 1e-4, atol = 1e-6, float64. diffode with
  ``linear_solver=GMRES()`` (matrix-free) at n = 1e3 to 1e5, with the dense
  ``LU()`` and diffrax ``Kvaerno5`` (dense Jacobian and LU) only at n = 1e3;
* gradients: ``jax.grad`` of ``sum(y(1))`` for the explicit problem with respect
  to the scalar ``a``, at n = 1e3 to 1e5: diffode's default sensitivity
  (``Auto``) and ``Direct()`` against diffrax's default
  ``RecursiveCheckpointAdjoint``.

Compile time is trace + lower + compile (``jax.jit(fn).lower(*args).compile()``
after ``jax.clear_caches()``), without the first run, which on large states would
be a sizable part of a first call. Run time is the median per call. Memory is
what XLA plans for one call (``memory_analysis()``: temporaries plus outputs; the
CPU backend keeps no allocator statistics). A case whose planned memory exceeds
``MEMORY_LIMIT`` is recorded as infeasible, with its plan, and not run. Errors
are against the exact solution (``exp(-a lam)``, gradient ``-sum(lam exp(-a lam))``).
"""

from __future__ import annotations

import jax

# The benchmark runs in float64 (and float32 where asked); diffode never switches x64 on.
jax.config.update("jax_enable_x64", True)

import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import diffode  # noqa: E402
from diffode.solvers.explicit_rk import UNROLL_MIN_SIZE  # noqa: E402

from . import _timing  # noqa: E402
from .solve_lv import environment  # noqa: E402

MEMORY_LIMIT = 6 * 2**30  # bytes a case may plan for (temporaries plus outputs)
EXPLICIT_TOL = dict(rtol=1e-3, atol=1e-6)
IMPLICIT_TOL = dict(rtol=1e-4, atol=1e-6)
STIFF_RATES = (1.0, 10.0, 100.0, 1000.0)
REFERENCE = "diffrax"  # ratios are against the diffrax candidate of the same case


# ---------------------------------------------------------------------------
# Problems and candidates. A candidate is (solve(a) -> y at the save times,
# stats(a) -> {name: int}); the benchmark jits both.
# ---------------------------------------------------------------------------


def decay(rates):
    return lambda t, y, a: -a * rates * y


def explicit_candidates(looped: bool):
    import diffrax

    f = decay(1.0)

    def diffode_solver(solver):
        def solve(y0, ts, a):
            return diffode.solve(f, y0, ts, a, solver=solver, **EXPLICIT_TOL)

        return solve

    def diffrax_solve(y0, ts, a):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(f),
            diffrax.Tsit5(),
            ts[0],
            ts[-1],
            None,
            y0,
            a,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(**EXPLICIT_TOL),
        )

    out = {"diffode Tsit5": diffode_solver(diffode.Tsit5())}
    if looped:
        out["diffode Tsit5(stage_loop=True)"] = diffode_solver(diffode.Tsit5(stage_loop=True))
    out["diffrax"] = diffrax_solve
    return out


def implicit_candidates(n: int, dense_ok: bool):
    import diffrax

    f = decay(stiff_rates(n))

    def diffode_solver(linear_solver):
        def solve(y0, ts, a):
            solver = diffode.Kvaerno5(linear_solver=linear_solver)
            return diffode.solve(f, y0, ts, a, solver=solver, **IMPLICIT_TOL)

        return solve

    def diffrax_solve(y0, ts, a):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(f),
            diffrax.Kvaerno5(),
            ts[0],
            ts[-1],
            None,
            y0,
            a,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(**IMPLICIT_TOL),
            max_steps=4096,
        )

    out = {"diffode Kvaerno5 GMRES": diffode_solver(diffode.GMRES())}
    if dense_ok:
        out["diffode Kvaerno5 LU"] = diffode_solver(diffode.LU())
        out["diffrax"] = diffrax_solve
    return out


def gradient_candidates():
    import diffrax

    f = decay(1.0)

    def diffode_grad(sensitivity):
        def loss(a, y0, ts):
            sol = diffode.solve(f, y0, ts, a, sensitivity=sensitivity, **EXPLICIT_TOL)
            return jnp.sum(sol.ys[-1])

        return jax.grad(loss)

    def diffrax_loss(a, y0, ts):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(f),
            diffrax.Tsit5(),
            ts[0],
            ts[-1],
            None,
            y0,
            a,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(**EXPLICIT_TOL),
            adjoint=diffrax.RecursiveCheckpointAdjoint(),
        )
        return jnp.sum(sol.ys[-1])

    return {
        "diffode default (Auto)": diffode_grad(None),
        "diffode Direct": diffode_grad(diffode.Direct()),
        "diffrax": jax.grad(diffrax_loss),
    }


def stiff_rates(n: int) -> np.ndarray:
    return np.resize(np.asarray(STIFF_RATES), n)


def steps_of(sol) -> int:
    return int(sol.stats["num_steps"])


# ---------------------------------------------------------------------------
# Measurement.
# ---------------------------------------------------------------------------


def compile_sample(fn: Callable, args: tuple) -> tuple[float, Any]:
    """Seconds to trace, lower and compile ``fn`` from cold caches, and the executable."""
    jax.clear_caches()
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return time.perf_counter() - t0, compiled


def planned_memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    temp, output = int(m.temp_size_in_bytes), int(m.output_size_in_bytes)
    return dict(temp=temp, output=output, argument=int(m.argument_size_in_bytes), total=temp + output)


def measure(
    fns: dict[str, Callable], args: tuple, compile_repeats: int, run_repeats: int, min_time: float
) -> dict[str, Any]:
    """Compile and run times (interleaved) and planned memory of jitted ``fns`` on ``args``."""
    names = list(fns)
    compile_s: dict[str, list[float]] = {n: [] for n in names}
    memory: dict[str, dict[str, int]] = {}
    for r in range(compile_repeats):
        for n in names if r % 2 == 0 else reversed(names):
            dt, compiled = compile_sample(fns[n], args)
            compile_s[n].append(dt)
            memory[n] = planned_memory(compiled)
    out = {
        n: dict(compile_s=_timing.Timing(tuple(c)).as_dict(), memory_bytes=memory[n])
        for n, c in compile_s.items()
    }
    feasible = {n: fns[n] for n in names if memory[n]["total"] <= MEMORY_LIMIT}
    for n in names:
        if n not in feasible:
            out[n]["infeasible"] = (
                f"plans {memory[n]['total'] / 2**30:.1f} GiB > limit {MEMORY_LIMIT / 2**30:.0f} GiB; not run"
            )
    if feasible:
        rtimes = _timing.run_times(
            {n: (fn, args) for n, fn in feasible.items()}, repeats=run_repeats, min_time=min_time
        )
        for n, t in rtimes.items():
            out[n]["run_s"] = t.as_dict()
    return out


def add_ratios(results: dict[str, Any]) -> None:
    base = results.get(REFERENCE)
    for r in results.values():
        if base is None:
            break
        r["compile_ratio"] = r["compile_s"]["median"] / base["compile_s"]["median"]
        if "run_s" in r and "run_s" in base:
            r["run_ratio"] = r["run_s"]["median"] / base["run_s"]["median"]


def explicit_case(n: int, dtype, num_save: int, looped: bool, reps: tuple[int, int, float]) -> dict[str, Any]:
    y0 = jnp.ones(n, dtype)
    ts = jnp.linspace(0.0, 1.0, num_save, dtype=dtype)
    a = jnp.asarray(1.0, dtype)
    cands = explicit_candidates(looped)
    fns = {name: jax.jit(lambda y0, ts, a, s=s: s(y0, ts, a).ys) for name, s in cands.items()}
    results = measure(fns, (y0, ts, a), *reps)
    exact = np.exp(-np.asarray(ts, np.float64))[:, None]
    for name, s in cands.items():
        sol = jax.jit(s)(y0, ts, a)
        results[name].update(
            num_steps=steps_of(sol),
            max_abs_error=float(np.max(np.abs(np.asarray(sol.ys, np.float64) - exact))),
        )
    add_ratios(results)
    dtype = jnp.dtype(dtype).name
    return dict(group="explicit", n=n, dtype=dtype, num_save=num_save, reps=reps, results=results)


def implicit_case(n: int, dense_ok: bool, reps: tuple[int, int, float], quick: bool) -> dict[str, Any]:
    y0 = jnp.ones(n)
    ts = jnp.array([0.0, 1.0])
    a = jnp.asarray(1.0)
    cands = implicit_candidates(n, dense_ok)
    fns = {name: jax.jit(lambda y0, ts, a, s=s: s(y0, ts, a).ys) for name, s in cands.items()}
    results = measure(fns, (y0, ts, a), *reps)
    exact = np.exp(-stiff_rates(n))
    for name, s in cands.items():
        sol = jax.jit(s)(y0, ts, a)
        error = float(np.max(np.abs(np.asarray(sol.ys[-1]) - exact)))
        results[name].update(num_steps=steps_of(sol), max_abs_error=error)
    add_ratios(results)
    skipped = None
    if quick and not dense_ok:
        skipped = "diffode LU and diffrax Kvaerno5 skipped in --quick"
    elif not dense_ok:
        skipped = (
            "diffode LU and diffrax Kvaerno5 skipped: a dense n x n Jacobian "
            f"({n * n * 8 / 2**30:.1f} GiB) and an O(n^3) LU per factorisation (seconds per solve at n = 1e3 "
            "on this machine, so many minutes or more here)"
        )
    return dict(
        group="implicit", n=n, dtype="float64", num_save=2, reps=reps, results=results, skipped=skipped
    )


def gradient_case(n: int, reps: tuple[int, int, float]) -> dict[str, Any]:
    y0 = jnp.ones(n)
    ts = jnp.array([0.0, 1.0])
    a = jnp.asarray(1.0)
    fns = {name: jax.jit(g) for name, g in gradient_candidates().items()}
    results = measure(fns, (a, y0, ts), *reps)
    exact = -n * np.exp(-1.0)
    for name, fn in fns.items():
        if "run_s" in results[name]:
            results[name]["rel_error"] = float(abs(float(fn(a, y0, ts)) - exact) / abs(exact))
    add_ratios(results)
    return dict(group="gradient", n=n, dtype="float64", num_save=2, reps=reps, results=results)


def plan(quick: bool) -> list[tuple[str, tuple]]:
    """The cases to run, in order: (group, arguments of the group's case function)."""
    # (compile repeats, run repeats, min seconds per run sample)
    fast, slow = ((1, 3, 0.05), (1, 3, 0.05)) if quick else ((3, 7, 0.2), (2, 5, 0.1))
    dense = (1, 3, 0.1)  # the dense-LU implicit cases take seconds per call
    f64, f32 = jnp.float64, jnp.float32
    explicit = (
        [(1000, f64), (100_000, f64)]
        if quick
        else [(1000, f64), (10_000, f64), (100_000, f64), (1_000_000, f64), (1_000_000, f32)]
    )
    cases = [("explicit", (n, dt, 2, not quick, fast)) for n, dt in explicit]
    if not quick:
        cases += [("explicit", (n, dt, 11, False, fast)) for n, dt in [(100_000, f64), (1_000_000, f32)]]
    sizes = [1000] if quick else [1000, 10_000, 100_000]
    for n in sizes:
        dense_ok = n <= 1000 and not quick
        cases.append(("implicit", (n, dense_ok, dense if dense_ok else slow, quick)))
    return cases + [("gradient", (n, slow)) for n in sizes]


CASE_FUNCTIONS = dict(explicit=explicit_case, implicit=implicit_case, gradient=gradient_case)


def run(quick: bool = False) -> dict[str, Any]:
    env = environment()  # before measuring, so that the load average is other processes'
    print("# warm-up compile (discarded)", file=sys.stderr)
    warm = jax.jit(lambda a: diffode.solve(decay(1.0), jnp.ones(4), jnp.array([0.0, 1.0]), a).ys)
    compile_sample(warm, (1.0,))
    cases = []
    t0 = time.perf_counter()
    for group, args in plan(quick):
        print(f"# {group} n={args[0]} ({time.perf_counter() - t0:.0f} s so far)", file=sys.stderr)
        cases.append(CASE_FUNCTIONS[group](*args))
    return dict(
        benchmark="large_state",
        settings=dict(
            quick=quick,
            memory_limit_bytes=MEMORY_LIMIT,
            unroll_min_size=UNROLL_MIN_SIZE,
            explicit_tol=EXPLICIT_TOL,
            implicit_tol=IMPLICIT_TOL,
            ratios_relative_to=REFERENCE,
            reps="(compile repeats, run repeats, min seconds per run sample), per case",
        ),
        environment=env,
        cases=cases,
        total_s=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


def _fmt_ms(r):
    return f"{r['run_s']['median'] * 1e3:.3g}" if "run_s" in r else "not run"


def _fmt_ratio(r, key):
    return f"{r[key]:.2f}" if key in r else "-"


def markdown_table(out: dict[str, Any]) -> str:
    head = (
        "| group | n | dtype | saves | candidate | compile (s) | run (ms) | compile / diffrax "
        "| run / diffrax | memory (MiB) | steps | error |"
    )
    lines = [head, "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in out["cases"]:
        for name, r in c["results"].items():
            err = r.get("max_abs_error", r.get("rel_error"))
            lines.append(
                f"| {c['group']} | {c['n']:.0e} | {c['dtype']} | {c['num_save']} | {name} "
                f"| {r['compile_s']['median']:.2f} | {_fmt_ms(r)} | {_fmt_ratio(r, 'compile_ratio')} "
                f"| {_fmt_ratio(r, 'run_ratio')} | {r['memory_bytes']['total'] / 2**20:.1f} "
                f"| {r.get('num_steps', '-')} | {'-' if err is None else f'{err:.1e}'} |"
            )
    return "\n".join(lines)


def report(out: dict[str, Any]) -> str:
    e = out["environment"]
    lines = [
        f"jax {e['jax']} ({e['backend']}), diffode {e['diffode']} @ {(e['git_commit'] or '?')[:10]}"
        f"{' (diffode/ modified)' if e['diffode_dirty'] else ''}, diffrax {e['diffrax']}; "
        f"{e['cpu_count']} CPUs, load average {e['load_avg_1min']:.1f} at the start.",
        "",
        markdown_table(out),
        "",
    ]
    for c in out["cases"]:
        if c.get("skipped"):
            lines.append(f"{c['group']} n={c['n']:.0e}: {c['skipped']}.")
        for name, r in c["results"].items():
            if "infeasible" in r:
                lines.append(f"{c['group']} n={c['n']:.0e} {name}: {r['infeasible']}.")
    spread = []
    for c in out["cases"]:
        for name, r in c["results"].items():
            if "run_s" in r:
                s = r["run_s"]
                spread.append(
                    f"{c['group']} {c['n']:.0e} {c['dtype']} {name}: "
                    f"{s['min'] * 1e3:.3g}-{s['max'] * 1e3:.3g}"
                )
    lines.append("Run time spread (min-max ms): " + "; ".join(spread) + ".")
    targets = [
        c
        for c in out["cases"]
        if c["group"] == "explicit"
        and c["num_save"] == 2
        and (c["n"], c["dtype"]) in ((100_000, "float64"), (1_000_000, "float32"))
    ]
    for c in targets:
        r = c["results"]["diffode Tsit5"]
        ok = r.get("run_ratio", np.inf) <= 1
        lines.append(
            f"{'PASS' if ok else 'FAIL'} issue 13: explicit n={c['n']:.0e} {c['dtype']} run time "
            f"<= 1x diffrax (ratio {r.get('run_ratio', float('nan')):.2f})"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    _timing.quick_json_main("python -m benchmarks.large_state", __doc__, run, report, argv)


if __name__ == "__main__":
    main()
