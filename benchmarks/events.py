"""Benchmark: a dosing schedule (oral doses into a two-compartment model) solved with
``diffode.Event(times=..., terminal=False, apply=...)`` against diffrax, which has no
state changes and is run the way its users write them: one ``diffeqsolve`` per
interval between doses, the dose added in between (a Python loop under ``jit``).

Run from the repository root::

    python -m benchmarks.events [--quick] [--json PATH]

Model: gut ``A' = -ka A``, central ``C' = ka A - ke C``, doses of ``D`` into the gut
every 24 / n_doses hours from t = 0, 97 saves on [0, 24], Tsit5 at rtol 1e-8,
atol 1e-10, float64. Measured for n_doses = 4 and 16: compile time and run time
(medians, interleaved, ``jax.block_until_ready``) of the solve and of the gradient of
a sum of squares with respect to ``(ka, ke, D)``; the error of the central amount
against the Bateman function (closed form); diffode with ``Direct`` (the default here
is ``ForwardSensitivity``, also timed) and ``InterpolatingAdjoint``, diffrax with
``RecursiveCheckpointAdjoint`` (its default).
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)  # the benchmark runs in float64

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import diffode  # noqa: E402

from . import _timing  # noqa: E402

TS = np.linspace(0.0, 24.0, 97)
RTOL, ATOL = 1e-8, 1e-10
P = (1.3, 0.4, 100.0)  # ka, ke, dose


def rhs(t, y, args):
    ka, ke = args[0], args[1]
    return jnp.stack([-ka * y[0], ka * y[0] - ke * y[1]])


def bateman(p, times):
    ka, ke, dose = p
    s = TS[:, None] - times[None, :]
    one = dose * ka / (ka - ke) * (np.exp(-ke * np.maximum(s, 0)) - np.exp(-ka * np.maximum(s, 0)))
    return np.sum(np.where(s >= 0, one, 0.0), axis=1)


def diffode_solve(times, method=None):
    def run(p):
        ev = diffode.Event(times=times, terminal=False, apply=lambda t, y, a: y + jnp.stack([a[2], 0.0]))
        return diffode.solve(rhs, jnp.zeros(2), TS, p, events=ev, sensitivity=method, rtol=RTOL, atol=ATOL,
                             max_steps=4096).ys[:, 1]

    return run


def diffrax_solve(times):
    import diffrax

    term = diffrax.ODETerm(rhs)
    bounds = list(times) + [TS[-1]]

    def run(p):
        y = jnp.zeros(2)
        out = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            y = y + jnp.stack([p[2], 0.0])
            last = b == TS[-1]
            saves = TS[(TS >= a) & ((TS <= b) if last else (TS < b))]
            sol = diffrax.diffeqsolve(term, diffrax.Tsit5(), a, b, None, y, p,
                                      saveat=diffrax.SaveAt(ts=jnp.asarray(np.append(saves, b))),
                                      stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL), max_steps=4096)
            out.append(sol.ys[:-1, 1] if not last else sol.ys[:-1, 1])
            y = sol.ys[-1]
        return jnp.concatenate(out)

    return run


def candidates(n_doses: int) -> dict:
    times = np.arange(n_doses) * (24.0 / n_doses)
    solves = {
        "diffode": diffode_solve(times),
        "diffrax (a solve per interval)": None,
    }
    try:
        solves["diffrax (a solve per interval)"] = diffrax_solve(times)
    except ImportError:
        del solves["diffrax (a solve per interval)"]
    out = {f"solve: {k}": (jax.jit(v), (jnp.asarray(P),)) for k, v in solves.items()}
    grads = {"diffode Direct": diffode_solve(times, diffode.Direct()),
             "diffode ForwardSensitivity": diffode_solve(times, diffode.ForwardSensitivity()),
             "diffode InterpolatingAdjoint": diffode_solve(times, diffode.InterpolatingAdjoint())}
    if "diffrax (a solve per interval)" in solves:
        grads["diffrax RecursiveCheckpoint"] = solves["diffrax (a solve per interval)"]
    for k, v in grads.items():
        out[f"grad: {k}"] = (jax.jit(jax.grad(lambda p, v=v: jnp.sum(v(p) ** 2))), (jnp.asarray(P),))
    return out, times


def run(quick: bool = False) -> dict:
    results = {}
    for n_doses in (4, 16):
        cands, times = candidates(n_doses)
        ref = bateman(P, times)
        errors = {k: float(np.max(np.abs(np.asarray(fn(*args)) - ref))) for k, (fn, args) in cands.items()
                  if k.startswith("solve")}
        comp = _timing.compile_times(cands, repeats=1 if quick else 3)
        rt = _timing.run_times(cands, repeats=3 if quick else 7)
        results[str(n_doses)] = {k: dict(compile_s=comp[k].median, run_ms=1e3 * rt[k].median,
                                         error=errors.get(k)) for k in cands}
    return results


def report(results: dict) -> str:
    lines = []
    for n, rows in results.items():
        lines += [f"\n{n} doses", "| candidate | compile (s) | run (ms) | max error vs Bateman |", "|---|---:|---:|---:|"]
        for k, r in rows.items():
            err = "" if r["error"] is None else f"{r['error']:.1e}"
            lines.append(f"| {k} | {r['compile_s']:.2f} | {r['run_ms']:.3f} | {err} |")
    return "\n".join(lines)


if __name__ == "__main__":
    _timing.quick_json_main("python -m benchmarks.events", __doc__, run, report)
