"""Ensembles: diffode against diffrax under ``jax.vmap``, from 1 to 100,000 members.

Run from the repository root::

    python -m benchmarks.ensembles                          # sizes 1, 100, 1000, 10000, 100000
    python -m benchmarks.ensembles --quick                  # sizes 1 and 100, fewer repetitions
    python -m benchmarks.ensembles --sizes 1000 10000 --problems lotka_volterra
    python -m benchmarks.ensembles --json ensembles.json --results

Two problems, float64, one shared initial state, per-member parameters (each parameter
scaled by its own factor drawn uniformly from [0.5, 1.5], seed 0):

``lotka_volterra``
    ``p = [1.5, 1, 3, 1]``, ``y0 = [1, 1]``, ``t`` in [0, 10], 100 saves; ``Tsit5`` in
    both libraries (diffrax with ``PIDController``), rtol = atol = 1e-6.
``robertson``
    Rate constants ``k = [0.04, 3e7, 1e4]``, ``y0 = [1, 0, 0]``, saves at 0 and 20
    times log-spaced over [1e-4, 1e5]; diffode ``Rodas5P`` against diffrax
    ``Kvaerno5``, rtol = 1e-6, atol = 1e-10.

For each size, three measurements, each a ``jax.jit`` function of the ``(members, p)``
parameters (``benchmarks/_timing.py`` has the conventions: cold first calls after
``jax.clear_caches()`` for compile time, calibrated repeats for run time, candidates
interleaved, ``jax.block_until_ready`` before every timer stops):

* ``solve``: the saves of every member (``jax.vmap`` of one solve);
* ``reverse``: ``jax.grad`` of ``sum(ys**2)`` over the whole batch with respect to every
  member's parameters: diffode's default sensitivity (``Auto``) and ``Direct`` against
  diffrax ``RecursiveCheckpointAdjoint``;
* ``forward``: every member's ``jax.jacfwd`` of its own ``sum(ys**2)``, under ``jax.vmap``:
  diffode ``ForwardSensitivity`` against diffrax ``ForwardMode``.

Reported: compile and run medians, members per second (members / run time) and the
ratio of each diffode candidate's run time to diffrax's in the same measurement. A
candidate whose single call would take more than ``--limit`` seconds (60 by default;
predicted from its time at the previous size, linearly in the members) is skipped with
a note, and stays skipped at larger sizes. Each diffode result is compared with
diffrax's (largest difference relative to the largest value: both solve to the same
tolerances, so they agree to about that, not exactly). Nothing is asserted: the script
exits 0 whatever it measures.
"""

from __future__ import annotations

import jax

# The benchmark runs in float64; diffode itself never switches x64 on.
jax.config.update("jax_enable_x64", True)

import argparse  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import diffode  # noqa: E402
from diffode.problems import lotka_volterra, robertson  # noqa: E402

from . import _timing  # noqa: E402
from .solve_lv import environment  # noqa: E402

SIZES_FULL = (1, 100, 1_000, 10_000, 100_000)
SIZES_QUICK = (1, 100)
MODES = ("solve", "reverse", "forward")
MAX_STEPS = 4096  # both libraries' default
LIMIT_S = 60.0


@dataclass(frozen=True)
class Setup:
    name: str
    f: Callable
    y0: Any
    args: Any  # the unscaled parameters, shape (p,)
    ts: Any
    rtol: float
    atol: float
    diffode_solver: Callable
    diffrax_solver: Callable
    solver_names: tuple[str, str]


def setups() -> dict[str, Setup]:
    import diffrax

    lv = lotka_volterra(jnp.float64)
    rob = robertson(jnp.float64)
    return {
        "lotka_volterra": Setup(
            name="lotka_volterra",
            f=lv.f,
            y0=lv.y0,
            args=lv.args,
            ts=lv.ts(100),
            rtol=1e-6,
            atol=1e-6,
            diffode_solver=diffode.Tsit5,
            diffrax_solver=diffrax.Tsit5,
            solver_names=("Tsit5", "Tsit5"),
        ),
        "robertson": Setup(
            name="robertson",
            f=rob.f,
            y0=rob.y0,
            args=rob.args,
            ts=jnp.concatenate([jnp.zeros(1), jnp.logspace(-4.0, 5.0, 20)]),
            rtol=1e-6,
            atol=1e-10,
            diffode_solver=diffode.Rodas5P,
            diffrax_solver=diffrax.Kvaerno5,
            solver_names=("Rodas5P", "Kvaerno5"),
        ),
    }


def member_args(s: Setup, members: int) -> jax.Array:
    scale = np.random.default_rng(0).uniform(0.5, 1.5, (members, s.args.shape[0]))
    return jnp.asarray(np.asarray(s.args) * scale)


# ---------------------------------------------------------------------------
# Candidates: one member's solve as a function of its parameters, batched per measurement.
# ---------------------------------------------------------------------------


def diffode_member(s: Setup, sensitivity=None, stats: bool = False) -> Callable:
    """One member's saves (or, with ``stats``, its attempted steps) from its parameters."""
    solver = s.diffode_solver()

    def member(a):
        sol = diffode.solve(
            s.f,
            s.y0,
            s.ts,
            a,
            solver=solver,
            rtol=s.rtol,
            atol=s.atol,
            max_steps=MAX_STEPS,
            sensitivity=sensitivity,
        )
        return sol.stats["num_steps"] if stats else sol.ys

    return member


def diffrax_member(s: Setup, adjoint=None, stats: bool = False) -> Callable:
    """One member's saves (or, with ``stats``, its attempted steps) from its parameters."""
    import diffrax

    term, solver = diffrax.ODETerm(s.f), s.diffrax_solver()
    options = dict(
        saveat=diffrax.SaveAt(ts=s.ts),
        stepsize_controller=diffrax.PIDController(rtol=s.rtol, atol=s.atol),
        max_steps=MAX_STEPS,
    )
    if adjoint is not None:
        options["adjoint"] = adjoint

    def member(a):
        sol = diffrax.diffeqsolve(term, solver, s.ts[0], s.ts[-1], None, s.y0, a, **options)
        return sol.stats["num_steps"] if stats else sol.ys

    return member


def batched(mode: str, member: Callable) -> Callable:
    """The timed function of a ``(members, p)`` batch for ``mode``."""
    if mode == "solve":
        return jax.jit(jax.vmap(member))
    if mode == "reverse":
        return jax.jit(jax.grad(lambda a: jnp.sum(jax.vmap(member)(a) ** 2)))
    return jax.jit(jax.vmap(jax.jacfwd(lambda a: jnp.sum(member(a) ** 2))))


def candidates(s: Setup) -> dict[str, dict[str, Callable]]:
    """``mode -> {name: member function}``; the diffrax candidate is each mode's reference."""
    import diffrax

    d, x = s.solver_names
    return {
        "solve": {f"diffode {d}": diffode_member(s), f"diffrax {x}": diffrax_member(s)},
        "reverse": {
            f"diffode {d} Auto": diffode_member(s),
            f"diffode {d} Direct": diffode_member(s, diffode.Direct()),
            f"diffrax {x} RecursiveCheckpoint": diffrax_member(s, diffrax.RecursiveCheckpointAdjoint()),
        },
        "forward": {
            f"diffode {d} ForwardSensitivity": diffode_member(s, diffode.ForwardSensitivity()),
            f"diffrax {x} ForwardMode": diffrax_member(s, diffrax.ForwardMode()),
        },
    }


def steps_of(s: Setup, members: int) -> dict[str, Any]:
    """Attempted steps per member (mean and max: a batch runs as many iterations as its
    slowest member), from an untimed solve of each library."""
    a = member_args(s, members)
    out = {}
    for lib, member in (
        ("diffode", diffode_member(s, stats=True)),
        ("diffrax", diffrax_member(s, stats=True)),
    ):
        n = np.asarray(jax.jit(jax.vmap(member))(a))
        out[lib] = dict(mean=float(n.mean()), max=int(n.max()))
    return out


def agreement(value, reference) -> float:
    """Largest difference relative to the largest magnitude of ``reference``."""
    v, r = np.asarray(value), np.asarray(reference)
    return float(np.max(np.abs(v - r)) / max(np.max(np.abs(r)), 1e-300))


# ---------------------------------------------------------------------------


def run(
    quick: bool = False,
    sizes: tuple[int, ...] | None = None,
    problems: tuple[str, ...] | None = None,
    limit: float = LIMIT_S,
) -> dict[str, Any]:
    sizes = tuple(sizes or (SIZES_QUICK if quick else SIZES_FULL))
    all_setups = setups()
    problems = tuple(problems or all_setups)
    env = environment()  # before measuring, so that the load average is other processes'
    compile_repeats = 1 if quick else 3
    run_repeats = 3 if quick else 5
    min_time = 0.05 if quick else 0.2
    warm = False  # one discarded compile round, once per process (_timing's convention)
    results: list[dict[str, Any]] = []
    notes: list[str] = []
    for pname in problems:
        s = all_setups[pname]
        cands = candidates(s)
        last: dict[str, tuple[int, float]] = {}  # name -> (members, seconds per call) at the last size
        skipped: set[str] = set()
        for members in sizes:
            a = member_args(s, members)
            row_steps = steps_of(s, members)
            for mode in MODES:
                pairs, reference = {}, None
                for name, member in cands[mode].items():
                    if reference is None and name.startswith("diffrax"):
                        reference = name
                    if name in skipped:
                        continue
                    if name in last:
                        m0, t0 = last[name]
                        predicted = t0 * members / m0
                        if predicted > limit:
                            skipped.add(name)
                            notes.append(
                                f"{pname}, {mode}, {name}: skipped from {members:,} members on (a call would take "
                                f"about {predicted:.3g} s, from {t0:.3g} s at {m0:,}; the limit is {limit:g} s)"
                            )
                            continue
                    pairs[name] = (batched(mode, member), (a,))
                if not pairs:
                    continue
                print(
                    f"# {pname}, {members} members, {mode}: {', '.join(pairs)}", file=sys.stderr, flush=True
                )
                big = members >= 10_000
                ctimes = _timing.compile_times(
                    pairs, repeats=1 if big else compile_repeats, warmup=0 if warm else 1
                )
                warm = True
                rtimes = _timing.run_times(pairs, repeats=3 if big else run_repeats, min_time=min_time)
                values = {n: np.asarray(jax.block_until_ready(fn(*args))) for n, (fn, args) in pairs.items()}
                for name in pairs:
                    t = rtimes[name].median
                    last[name] = (members, t)
                    results.append(
                        dict(
                            problem=pname,
                            members=members,
                            mode=mode,
                            candidate=name,
                            compile_s=ctimes[name].as_dict(),
                            run_s=rtimes[name].as_dict(),
                            members_per_s=members / t,
                            run_ratio=(t / rtimes[reference].median) if reference in rtimes else None,
                            agreement=(
                                agreement(values[name], values[reference])
                                if reference in values and name != reference
                                else None
                            ),
                            steps=row_steps["diffode" if name.startswith("diffode") else "diffrax"]
                            if mode == "solve"
                            else None,
                        )
                    )
    return dict(
        benchmark="ensembles",
        problems={
            n: dict(
                rtol=all_setups[n].rtol,
                atol=all_setups[n].atol,
                num_save=int(all_setups[n].ts.shape[0]),
                t_span=[float(all_setups[n].ts[0]), float(all_setups[n].ts[-1])],
                solvers=list(all_setups[n].solver_names),
            )
            for n in problems
        },
        settings=dict(
            quick=quick,
            sizes=list(sizes),
            compile_repeats=compile_repeats,
            run_repeats=run_repeats,
            run_min_time_s=min_time,
            repeats_from_10000_members="compile 1, run 3",
            limit_s=limit,
            max_steps=MAX_STEPS,
        ),
        environment=env,
        results=results,
        notes=notes,
    )


def report(out: dict[str, Any]) -> str:
    e, st = out["environment"], out["settings"]
    lines = [
        "Members per second under `jax.vmap` (float64, one shared initial state, every member's "
        "parameters scaled in [0.5, 1.5]); `run / diffrax` compares each candidate with the diffrax "
        "candidate of the same measurement (below 1: diffode is faster).",
        f"jax {e['jax']} ({e['backend']}, {len(e['devices'])} device(s)), diffode {e['diffode']} @ "
        f"{(e['git_commit'] or '?')[:10]}{' (diffode/ modified)' if e['diffode_dirty'] else ''}, diffrax "
        f"{e['diffrax']}; {e['cpu_count']} CPUs, {e['platform']}.",
        f"Compile: median of {st['compile_repeats']} cold first call(s) (1 from 10,000 members); run: median of "
        f"{st['run_repeats']} repeats (3 from 10,000 members). Steps: attempted steps per member, mean / max "
        "(the batch's loop runs as many iterations as its slowest member).",
    ]
    load, ncpu = e.get("load_avg_1min"), e.get("cpu_count") or 1
    if load is not None and load > 0.5 * ncpu:
        lines.append(
            f"Note: 1-min load average was {load:.2f} on {ncpu} CPUs at the start; other processes may "
            "have inflated the timings."
        )
    for pname, p in out["problems"].items():
        lines += [
            "",
            f"### {pname}: diffode {p['solvers'][0]} against diffrax {p['solvers'][1]}, rtol = {p['rtol']:g}, "
            f"atol = {p['atol']:g}, {p['num_save']} saves on [{p['t_span'][0]:g}, {p['t_span'][1]:g}]",
            "",
            "| members | measurement | candidate | compile (s) | run (ms) | members / s | run / diffrax "
            "| agreement | steps |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in out["results"]:
            if r["problem"] != pname:
                continue
            ratio = "" if r["run_ratio"] is None else f"{r['run_ratio']:.2f}"
            agree = "" if r["agreement"] is None else f"{r['agreement']:.1e}"
            steps = "" if r["steps"] is None else f"{r['steps']['mean']:.0f} / {r['steps']['max']}"
            lines.append(
                f"| {r['members']:,} | {r['mode']} | {r['candidate']} | {r['compile_s']['median']:.2f} "
                f"| {r['run_s']['median'] * 1e3:.3g} | {r['members_per_s']:,.0f} | {ratio} | {agree} | {steps} |"
            )
    if out["notes"]:
        lines += ["", *[f"- {n}" for n in out["notes"]]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ensembles", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="sizes 1 and 100, fewer repetitions (a smoke run)")
    ap.add_argument(
        "--sizes", type=int, nargs="+", help=f"members per batch (default {' '.join(map(str, SIZES_FULL))})"
    )
    ap.add_argument("--problems", nargs="+", choices=sorted(setups()), help="default: all")
    ap.add_argument(
        "--limit", type=float, default=LIMIT_S, help="skip a candidate whose call would take longer (s)"
    )
    _timing.add_output_options(ap)
    a = ap.parse_args(argv)
    out = run(quick=a.quick, sizes=a.sizes, problems=a.problems, limit=a.limit)
    text = report(out)
    print(text, flush=True)
    _timing.write_outputs(a, "ensembles", out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
