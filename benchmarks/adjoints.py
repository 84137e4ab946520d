"""Benchmark: gradient of an ODE solve, every diffode sensitivity method against diffrax's.

Lotka-Volterra (``diffode/problems.py``), Tsit5, rtol = atol = 1e-6, t in [0, 10],
100 save points, float64; the loss is ``sum(ys**2)`` and the gradient is taken
with respect to the 4 parameters. Run from the repository root::

    python -m benchmarks.adjoints [--quick] [--json PATH]

Candidates, measured in the same run and interleaved (``benchmarks/_timing.py``):

* diffode: ``Direct()`` (every step stored), ``Direct(checkpoints=16)``,
  ``ForwardSensitivity()`` (with and without error control on the
  sensitivities), ``BacksolveAdjoint()``, ``InterpolatingAdjoint()``,
  ``Auto()`` under ``jax.grad``, and plain ``jax.jacfwd`` through the solve;
* diffrax: ``RecursiveCheckpointAdjoint`` (its default), ``BacksolveAdjoint``
  under ``jax.grad``, and ``ForwardMode`` under ``jax.jacfwd``.

Compile time is the median first call after ``jax.clear_caches()``; run time
the median per-call time. Every gradient is compared with the reference from
the hand-written forward sensitivity equations (``diffode/problems.py``). Targets
are reported, not asserted.
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)

import sys  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import diffode  # noqa: E402

from . import _timing  # noqa: E402
from .solve_lv import environment  # noqa: E402
from diffode.problems import lotka_volterra, lotka_volterra_sensitivities  # noqa: E402

NUM_SAVE = 100
RTOL = ATOL = 1e-6


def diffode_grad(method, ts, f) -> Callable:
    def loss(args, y0):
        sol = diffode.solve(f, y0, ts, args, rtol=RTOL, atol=ATOL, sensitivity=method)
        return jnp.sum(sol.ys**2)

    return jax.grad(loss)


def diffode_jacfwd(ts, f) -> Callable:
    def loss(args, y0):
        return jnp.sum(diffode.solve(f, y0, ts, args, rtol=RTOL, atol=ATOL).ys ** 2)

    return jax.jacfwd(loss)


def diffrax_grad(adjoint_name, ts, f, forward=False) -> Callable:
    import diffrax

    adjoint = getattr(diffrax, adjoint_name)()

    def loss(args, y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(f), diffrax.Tsit5(), ts[0], ts[-1], None, y0, args, saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL), adjoint=adjoint,
        )
        return jnp.sum(sol.ys**2)

    return jax.jacfwd(loss) if forward else jax.grad(loss)


def candidates(ts, f) -> dict[str, Callable]:
    return {
        "diffode Direct": diffode_grad(diffode.Direct(), ts, f),
        "diffode Direct(checkpoints=16)": diffode_grad(diffode.Direct(checkpoints=16), ts, f),
        "diffode ForwardSensitivity": diffode_grad(diffode.ForwardSensitivity(), ts, f),
        "diffode ForwardSensitivity(error_control=False)": diffode_grad(
            diffode.ForwardSensitivity(error_control=False), ts, f),
        "diffode BacksolveAdjoint": diffode_grad(diffode.BacksolveAdjoint(), ts, f),
        "diffode InterpolatingAdjoint": diffode_grad(diffode.InterpolatingAdjoint(), ts, f),
        "diffode Auto": diffode_grad(diffode.Auto(), ts, f),
        "diffode jacfwd": diffode_jacfwd(ts, f),
        "diffrax RecursiveCheckpointAdjoint": diffrax_grad("RecursiveCheckpointAdjoint", ts, f),
        "diffrax BacksolveAdjoint": diffrax_grad("BacksolveAdjoint", ts, f),
        "diffrax ForwardMode": diffrax_grad("ForwardMode", ts, f, forward=True),
    }


def reference_gradient(ts) -> np.ndarray:
    ys, _, dys_dp, _ = lotka_volterra_sensitivities(np.asarray(ts))
    return np.einsum("tj,tjk->k", 2 * ys, dys_dp)


def run(quick: bool = False) -> dict[str, Any]:
    env = environment()
    p = lotka_volterra(jnp.float64)
    ts = p.ts(NUM_SAVE)
    fns = {n: jax.jit(g) for n, g in candidates(ts, p.f).items()}
    pairs = {n: (fn, (p.args, p.y0)) for n, fn in fns.items()}
    reps_c, reps_r = (3, 5) if quick else (5, 7)
    print(f"# compile: 1 + {reps_c} interleaved cold first calls each ...", file=sys.stderr)
    ctimes = _timing.compile_times(pairs, repeats=reps_c, warmup=1)
    print(f"# run: {reps_r} interleaved repeats each ...", file=sys.stderr)
    rtimes = _timing.run_times(pairs, repeats=reps_r, min_time=0.05 if quick else 0.2)
    ref = reference_gradient(ts)
    results = {}
    for n, fn in fns.items():
        g = np.asarray(fn(p.args, p.y0))
        results[n] = dict(compile_s=ctimes[n].as_dict(), run_s=rtimes[n].as_dict(),
                          rel_error=float(np.abs(g - ref).max() / np.abs(ref).max()))
    return dict(benchmark="adjoints", environment=env, results=results, reference_gradient=ref.tolist())


def report(out: dict[str, Any]) -> str:
    r = out["results"]
    lines = ["| candidate | compile (s) | run (ms) | max rel. error vs reference |", "|---|---:|---:|---:|"]
    for n, x in r.items():
        lines.append(f"| {n} | {x['compile_s']['median']:.3f} | {x['run_s']['median'] * 1e3:.3f} | {x['rel_error']:.1e} |")
    dx = {n: x for n, x in r.items() if n.startswith("diffrax")}
    do = {n: x for n, x in r.items() if n.startswith("diffode") and n != "diffode Auto"}
    best_dx = min(dx, key=lambda n: dx[n]["run_s"]["median"])
    best_do = min(do, key=lambda n: do[n]["run_s"]["median"])
    rdx, rdo = dx[best_dx]["run_s"]["median"], do[best_do]["run_s"]["median"]
    auto = r["diffode Auto"]
    cdef = r["diffrax RecursiveCheckpointAdjoint"]["compile_s"]["median"]
    lines += [
        "",
        f"{'PASS' if rdo <= 0.5 * rdx else 'FAIL'} fastest diffode ({best_do}, {rdo * 1e3:.3f} ms) <= 0.5 x fastest "
        f"diffrax ({best_dx}, {rdx * 1e3:.3f} ms): ratio {rdo / rdx:.2f}",
        f"{'PASS' if auto['run_s']['median'] <= rdx else 'FAIL'} Auto ({auto['run_s']['median'] * 1e3:.3f} ms) <= "
        f"fastest diffrax: ratio {auto['run_s']['median'] / rdx:.2f}",
        f"{'PASS' if auto['compile_s']['median'] <= 0.5 * cdef else 'FAIL'} Auto compile "
        f"({auto['compile_s']['median']:.3f} s) <= 0.5 x diffrax default adjoint compile ({cdef:.3f} s): "
        f"ratio {auto['compile_s']['median'] / cdef:.2f}",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    _timing.quick_json_main("python -m benchmarks.adjoints", __doc__, run, report, argv)


if __name__ == "__main__":
    main()
