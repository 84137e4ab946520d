"""Benchmark: derivatives of a steady state, implicit function theorem against integrating.

Model: ``diffode.problems.enzyme_chain(n=64)`` (64 states, 254 parameters in the
dict ``args``), float64. The loss is ``L(args) = sum(y*(args)**2)``, with
``f(t, y*, args) = 0``. Run from the repository root::

    python -m benchmarks.steady_state [--quick] [--json PATH]

A. Gradient of ``L`` with respect to all of ``args``:

* diffode ``steady_state`` under ``jax.grad`` (derivative by the implicit
  function theorem) with ``Newton()`` (dense LU, the default),
  ``Newton(linear_solver=GMRES(rtol=1e-10))``, ``PseudoTransient()`` and
  ``IntegrateToSteady()``;
* the baseline "integrate and differentiate": ``diffode.solve`` with
  ``Rodas5P`` at rtol 1e-10, atol 1e-12 over ``[0, T_LONG]`` and
  ``sensitivity=Direct()``, the loss on ``ys[-1]``;
* diffrax: ``diffeqsolve`` to ``t1 = inf`` with ``Event(steady_state_event())``
  and ``ImplicitAdjoint()`` (Tsit5, PIDController rtol 1e-10, atol 1e-12).

B. Hessian of ``L`` with respect to ``V`` (63 entries; the other parameters
fixed):

* F-1 (diffode): ``jax.hessian`` through ``steady_state`` (one factorisation of
  ``df/dy`` at ``y*`` reused for every solve; Pasquier and Primeau 2019);
* naive, unrolled Newton: ``NEWTON_UNROLL`` full Newton steps from ``y0``
  (``jnp.linalg.solve`` with ``jax.jacfwd``, a Python loop), ``jax.hessian``
  through the iterations;
* naive, nested IFT: a ``jax.custom_jvp`` whose rule solves with
  ``J = jax.jacfwd(f)(y*)``, differentiated again by JAX. Two variants: with
  ``jax.scipy.linalg.lu_factor``/``lu_solve``, so the second derivative goes
  through the ``lu`` primitive's own derivative (the factorisation is
  differentiated), and with ``jnp.linalg.solve``, which JAX itself implements
  with ``lax.custom_linear_solve`` on a stop-gradient LU (so within one call
  its derivative reuses the factors; every nested call factorises afresh).

For every Hessian the ``lu`` primitives in its jaxpr are counted (top level and
inside loop bodies), as are the LAPACK ``getrf`` calls left in the compiled
(optimised) HLO.

Compile time is the median first call after ``jax.clear_caches()``; run time
the median per-call time; all candidates of a part are interleaved
(``benchmarks/_timing.py``). Targets are reported, not asserted.

Time it on a quiet machine: on the 2-core CI machine, with other jobs running,
single calls of the long solve took up to 70x and of the Hessians up to 90x
longer than on the quiet machine. ``XLA_FLAGS``, the load average at the start
and the end, and the cores that other processes kept busy during the run (from
``/proc/stat``) are recorded with the results.
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)

import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import jax.scipy.linalg as jsl  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import diffode  # noqa: E402
from diffode.problems import enzyme_chain  # noqa: E402

from . import _timing  # noqa: E402
from .solve_lv import environment  # noqa: E402

N_STATES = 64
T_LONG = 1000.0  # max|f(y(T_LONG))| is checked and reported (must be <= 1e-10)
LONG_MAX_STEPS = 2048  # Rodas5P takes about 600 steps to T_LONG
LONG_RTOL, LONG_ATOL = 1e-10, 1e-12
NEWTON_UNROLL = 10  # full Newton steps from y0 reach max|f| ~ 1e-16 after 8
HESS_PARAM = "V"
BASELINE = "diffode long solve + Direct"
DIFFRAX = "diffrax Event(steady_state_event) + ImplicitAdjoint (Tsit5)"
F1 = "F-1 (diffode)"


def problem():
    return enzyme_chain(N_STATES)


# --------------------------------------------------------------------------- A


def steady_grad(f, y0, method) -> Callable:
    def loss(args):
        return jnp.sum(diffode.steady_state(f, y0, args, method=method).y ** 2)

    return jax.grad(loss)


def long_solve(f, y0, args, sensitivity=None):
    return diffode.solve(
        f,
        y0,
        jnp.array([0.0, T_LONG]),
        args,
        solver=diffode.Rodas5P(),
        rtol=LONG_RTOL,
        atol=LONG_ATOL,
        sensitivity=sensitivity,
        max_steps=LONG_MAX_STEPS,
    )


def long_solve_grad(f, y0) -> Callable:
    def loss(args):
        return jnp.sum(long_solve(f, y0, args, diffode.Direct()).ys[-1] ** 2)

    return jax.grad(loss)


def diffrax_solve(f, y0, args):
    import diffrax

    return diffrax.diffeqsolve(
        diffrax.ODETerm(f),
        diffrax.Tsit5(),
        0.0,
        jnp.inf,
        0.01,
        y0,
        args,
        stepsize_controller=diffrax.PIDController(rtol=LONG_RTOL, atol=LONG_ATOL),
        event=diffrax.Event(diffrax.steady_state_event()),
        adjoint=diffrax.ImplicitAdjoint(),
        max_steps=16384,
    )


def diffrax_grad(f, y0) -> Callable:
    def loss(args):
        return jnp.sum(diffrax_solve(f, y0, args).ys[-1] ** 2)

    return jax.grad(loss)


def gradient_candidates(f, y0) -> dict[str, Callable]:
    return {
        "diffode steady_state Newton (LU)": steady_grad(f, y0, diffode.Newton()),
        "diffode steady_state Newton (GMRES)": steady_grad(
            f, y0, diffode.Newton(linear_solver=diffode.GMRES(rtol=1e-10))
        ),
        "diffode steady_state PseudoTransient": steady_grad(f, y0, diffode.PseudoTransient()),
        "diffode steady_state IntegrateToSteady": steady_grad(f, y0, diffode.IntegrateToSteady()),
        BASELINE: long_solve_grad(f, y0),
        DIFFRAX: diffrax_grad(f, y0),
    }


def gradient_diagnostics(f, y0, args) -> dict[str, dict[str, Any]]:
    """The state each candidate differentiates at, and how it got there (untimed)."""

    def resid(y):
        return float(jnp.max(jnp.abs(f(0.0, y, args))))

    out = {}
    methods = {
        "diffode steady_state Newton (LU)": diffode.Newton(),
        "diffode steady_state Newton (GMRES)": diffode.Newton(linear_solver=diffode.GMRES(rtol=1e-10)),
        "diffode steady_state PseudoTransient": diffode.PseudoTransient(),
        "diffode steady_state IntegrateToSteady": diffode.IntegrateToSteady(),
    }
    for name, m in methods.items():
        ss = jax.jit(lambda a, m=m: diffode.steady_state(f, y0, a, method=m))(args)
        out[name] = dict(max_abs_f=resid(ss.y), status=int(ss.status), stats=_stats_dict(ss.stats))
    sol = jax.jit(lambda a: long_solve(f, y0, a))(args)
    out[BASELINE] = dict(max_abs_f=resid(sol.ys[-1]), T=T_LONG, stats=_stats_dict(sol.stats))
    try:
        dsol = jax.jit(lambda a: diffrax_solve(f, y0, a))(args)
        out[DIFFRAX] = dict(
            max_abs_f=resid(dsol.ys[-1]), t_event=float(dsol.ts[-1]), stats=_stats_dict(dsol.stats)
        )
    except Exception as e:  # reported, not hidden
        out[DIFFRAX] = dict(error=f"{type(e).__name__}: {e}")
    return out


def _stats_dict(stats) -> dict[str, int]:
    return {k: int(v) for k, v in dict(stats).items()}


# --------------------------------------------------------------------------- B


def _with(args, v):
    return {**args, HESS_PARAM: v}


def f1_hessian(f, y0, args) -> Callable:
    def loss(v):
        return jnp.sum(diffode.steady_state(f, y0, _with(args, v)).y ** 2)

    return jax.hessian(loss)


def unrolled_newton(f, y0, args, v):
    """``NEWTON_UNROLL`` full Newton steps from ``y0``, written out (every step is differentiated)."""
    a = _with(args, v)

    def g(y):
        return f(0.0, y, a)

    y = y0
    for _ in range(NEWTON_UNROLL):
        y = y - jnp.linalg.solve(jax.jacfwd(g)(y), g(y))
    return y


def unrolled_hessian(f, y0, args) -> Callable:
    def loss(v):
        return jnp.sum(unrolled_newton(f, y0, args, v) ** 2)

    return jax.hessian(loss)


def nested_ift_root(f, y0, args, lu_differentiated: bool) -> Callable:
    """``v -> y*(v)`` with a plain IFT rule that JAX differentiates again for higher orders."""

    @jax.custom_jvp
    def root(v):
        return diffode.steady_state(f, y0, _with(args, v)).y

    @root.defjvp
    def root_jvp(primals, tangents):
        (v,), (dv,) = primals, tangents
        y = root(v)  # under an outer derivative this calls the rule again
        jac = jax.jacfwd(lambda y: f(0.0, y, _with(args, v)))(y)
        rhs = jax.jvp(lambda v: f(0.0, y, _with(args, v)), (v,), (dv,))[1]
        if lu_differentiated:
            dy = jsl.lu_solve(jsl.lu_factor(jac), -rhs)  # JAX differentiates the lu primitive
        else:
            dy = jnp.linalg.solve(jac, -rhs)  # custom_linear_solve inside jnp.linalg.solve
        return y, dy

    return root


def nested_hessian(f, y0, args, lu_differentiated: bool) -> Callable:
    root = nested_ift_root(f, y0, args, lu_differentiated)

    def loss(v):
        return jnp.sum(root(v) ** 2)

    return jax.hessian(loss)


def hessian_candidates(f, y0, args) -> dict[str, Callable]:
    return {
        F1: f1_hessian(f, y0, args),
        f"naive: unrolled Newton ({NEWTON_UNROLL} steps)": unrolled_hessian(f, y0, args),
        "naive: nested IFT, LU differentiated (lu_factor/lu_solve)": nested_hessian(f, y0, args, True),
        "naive: nested IFT, jnp.linalg.solve": nested_hessian(f, y0, args, False),
    }


_LOOPS = ("while", "scan", "fori_loop")


def _subjaxprs(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _subjaxprs(v)


def count_primitive(jaxpr, name: str = "lu", in_loop: bool = False) -> dict[str, int]:
    """Occurrences of primitive ``name`` in ``jaxpr`` and all its sub-jaxprs, split by
    whether they sit inside a loop body (executed once per iteration) or not."""
    counts = {"top_level": 0, "in_loop_bodies": 0}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            counts["in_loop_bodies" if in_loop else "top_level"] += 1
        loop = in_loop or eqn.primitive.name in _LOOPS
        for param in eqn.params.values():
            for sub in _subjaxprs(param):
                c = count_primitive(sub, name, loop)
                counts["top_level"] += c["top_level"]
                counts["in_loop_bodies"] += c["in_loop_bodies"]
    return counts


_HLO_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_HLO_CALLS = re.compile(r"\b(body|condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")
_HLO_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def count_hlo_getrf(hlo: str) -> dict[str, int]:
    """LAPACK LU calls (``getrf`` custom calls) in optimised HLO text, split by whether
    their computation is reachable from a ``while`` loop's body or condition."""
    comp, getrf, calls, loop_roots = None, {}, {}, set()
    for line in hlo.splitlines():
        m = _HLO_HEADER.match(line)
        if m and not line.startswith(" "):
            comp = m.group(1)
            getrf[comp], calls[comp] = 0, set()
            continue
        if comp is None:
            continue
        if "custom-call" in line and "getrf" in line:
            getrf[comp] += 1
        for kind, callee in _HLO_CALLS.findall(line):
            calls[comp].add(callee)
            if kind in ("body", "condition") and " while(" in line:
                loop_roots.add(callee)
        for group in _HLO_BRANCHES.findall(line):
            calls[comp].update(c.strip().lstrip("%") for c in group.split(",") if c.strip())
    in_loop, todo = set(), list(loop_roots)
    while todo:
        c = todo.pop()
        if c not in in_loop:
            in_loop.add(c)
            todo.extend(calls.get(c, ()))
    return dict(
        hlo_getrf_top_level=sum(n for c, n in getrf.items() if c not in in_loop),
        hlo_getrf_in_loop_bodies=sum(n for c, n in getrf.items() if c in in_loop),
    )


def lu_counts(fn: Callable, *args) -> dict[str, int]:
    """``lu`` primitives in the jaxpr of ``fn`` and LAPACK ``getrf`` calls in its compiled HLO."""
    counts = count_primitive(jax.make_jaxpr(fn)(*args).jaxpr, "lu")
    counts.update(count_hlo_getrf(jax.jit(fn).lower(*args).compile().as_text()))
    return counts


# --------------------------------------------------------------------------- run


def rel_diff(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def timing_entry(ctimes, rtimes, name: str, base: str, tag: str) -> dict[str, Any]:
    """A candidate's compile and run times and their ratios to candidate ``base``
    (keys ``compile_ratio_vs_<tag>`` and ``run_ratio_vs_<tag>``)."""
    return {
        "compile_s": ctimes[name].as_dict(),
        "run_s": rtimes[name].as_dict(),
        f"compile_ratio_vs_{tag}": ctimes[name].median / ctimes[base].median,
        f"run_ratio_vs_{tag}": rtimes[name].median / rtimes[base].median,
    }


def _time(pairs, quick: bool, label: str):
    reps_c, reps_r = (3, 5) if quick else (5, 7)
    print(f"# {label} compile: 1 + {reps_c} interleaved cold first calls each ...", file=sys.stderr)
    ctimes = _timing.compile_times(pairs, repeats=reps_c, warmup=1)
    print(f"# {label} run: {reps_r} interleaved repeats each ...", file=sys.stderr)
    rtimes = _timing.run_times(pairs, repeats=reps_r, min_time=0.05 if quick else 0.2)
    return ctimes, rtimes


def _cpu_clock() -> tuple[float, float] | None:
    """(busy seconds of all processes, wall seconds) from ``/proc/stat``; None where it is missing."""
    try:
        with open("/proc/stat") as fh:
            fields = [float(x) for x in fh.readline().split()[1:]]
    except OSError:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - fields[3] - fields[4]) / hz, time.monotonic()


def other_cpu_load(start) -> float | None:
    """Cores kept busy by other processes since ``start`` (``_cpu_clock()``), on average."""
    end = _cpu_clock()
    if start is None or end is None:
        return None
    own = time.process_time() - start[2]
    return max(0.0, (end[0] - start[0] - own) / (end[1] - start[1]))


def run(quick: bool = False) -> dict[str, Any]:
    clock = _cpu_clock()
    clock = None if clock is None else (*clock, time.process_time())
    env = environment()
    env["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    p = problem()
    f, y0, args = p.f, p.y0, p.args
    n_params = int(ravel_pytree(args)[0].size)

    # ---- A: gradients
    fns, failed = {}, {}
    for n, g in gradient_candidates(f, y0).items():
        fn = jax.jit(g)
        try:
            jax.block_until_ready(fn(args))
            fns[n] = fn
        except Exception as e:  # a candidate that does not run is reported, not timed
            failed[n] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"# {n} FAILED: {failed[n]}", file=sys.stderr)
    ctimes, rtimes = _time({n: (fn, (args,)) for n, fn in fns.items()}, quick, "gradients")
    grads = {n: np.asarray(ravel_pytree(fn(args))[0]) for n, fn in fns.items()}
    ref1, ref5 = grads["diffode steady_state Newton (LU)"], grads[BASELINE]
    gres = {}
    for n in fns:
        gres[n] = dict(
            timing_entry(ctimes, rtimes, n, BASELINE, "baseline"),
            rel_diff_vs_newton_lu=rel_diff(grads[n], ref1),
            rel_diff_vs_baseline=rel_diff(grads[n], ref5),
        )
    for n, msg in failed.items():
        gres[n] = dict(error=msg)
    diag = gradient_diagnostics(f, y0, args)

    # ---- B: Hessians w.r.t. V
    v = args[HESS_PARAM]
    hfns = {n: jax.jit(h) for n, h in hessian_candidates(f, y0, args).items()}
    counts = {n: lu_counts(h, v) for n, h in hessian_candidates(f, y0, args).items()}
    hctimes, hrtimes = _time({n: (fn, (v,)) for n, fn in hfns.items()}, quick, "Hessians")
    hess = {n: np.asarray(fn(v)) for n, fn in hfns.items()}
    env["load_avg_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    env["other_processes_cores_busy"] = other_cpu_load(clock)
    yu = unrolled_newton(f, y0, args, v)
    unrolled_residual = float(jnp.max(jnp.abs(f(0.0, yu, args))))
    hres = {}
    for n in hfns:
        hres[n] = dict(
            timing_entry(hctimes, hrtimes, n, F1, "f1"),
            rel_diff_vs_f1=rel_diff(hess[n], hess[F1]),
            lu=counts[n],
        )
    h1 = hess[F1]
    return dict(
        benchmark="steady_state",
        environment=env,
        problem=dict(
            name=p.name,
            n_states=N_STATES,
            n_params=n_params,
            loss="sum(y*(args)**2)",
            hessian_wrt=HESS_PARAM,
            hessian_shape=list(h1.shape),
        ),
        settings=dict(
            quick=quick,
            T_long=T_LONG,
            long_rtol=LONG_RTOL,
            long_atol=LONG_ATOL,
            newton_unroll=NEWTON_UNROLL,
            unrolled_newton_max_abs_f=unrolled_residual,
        ),
        gradients=gres,
        gradient_diagnostics=diag,
        hessians=hres,
        hessian_f1_symmetry=float(np.abs(h1 - h1.T).max() / np.abs(h1).max()),
    )


def report(out: dict[str, Any]) -> str:
    g, d, h = out["gradients"], out["gradient_diagnostics"], out["hessians"]
    pr, env = out["problem"], out["environment"]
    lines = [
        f"XLA_FLAGS: {env.get('xla_flags') or '(none)'}; load average (1 min) "
        f"{env.get('load_avg_1min')} at the start, {env.get('load_avg_1min_end')} "
        f"at the end; other processes kept {env.get('other_processes_cores_busy') or 0:.2f} "
        "cores busy on average",
        "",
        f"Gradient of sum(y*^2) w.r.t. all {pr['n_params']} parameters ({pr['name']}); "
        f"ratios against '{BASELINE}'.",
        "",
        "| candidate | compile (s) | run (ms) | compile ratio | run ratio | rel. diff vs Newton (LU) "
        "| rel. diff vs long solve | max\\|f(y)\\| |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, x in g.items():
        res = d.get(n, {}).get("max_abs_f")
        res_s = f"{res:.1e}" if res is not None else "-"
        if "error" in x:
            lines.append(f"| {n} | failed | - | - | - | - | - | {res_s} |")
            continue
        lines.append(
            f"| {n} | {x['compile_s']['median']:.3f} | {x['run_s']['median'] * 1e3:.3f} "
            f"| {x['compile_ratio_vs_baseline']:.3f} | {x['run_ratio_vs_baseline']:.4f} "
            f"| {x['rel_diff_vs_newton_lu']:.1e} | {x['rel_diff_vs_baseline']:.1e} | {res_s} |"
        )
    lines += [
        "",
        f"Hessian of sum(y*^2) w.r.t. {pr['hessian_wrt']} ({'x'.join(map(str, pr['hessian_shape']))}); "
        f"ratios against '{F1}'. lu: primitives in the jaxpr (top level + in loop bodies), "
        "getrf: LAPACK LU calls left in the optimised HLO (after XLA's CSE). Loop-body counts run once per "
        "iteration of the root finder (Newton).",
        "",
        "| candidate | compile (s) | run (ms) | compile ratio | run ratio | rel. diff vs F-1 "
        "| lu (jaxpr) top level | lu (jaxpr) in loops | getrf (HLO) top level | getrf (HLO) in loops |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, x in h.items():
        lines.append(
            f"| {n} | {x['compile_s']['median']:.3f} | {x['run_s']['median'] * 1e3:.3f} "
            f"| {x['compile_ratio_vs_f1']:.2f} | {x['run_ratio_vs_f1']:.2f} | {x['rel_diff_vs_f1']:.1e} "
            f"| {x['lu']['top_level']} | {x['lu']['in_loop_bodies']} | {x['lu']['hlo_getrf_top_level']} "
            f"| {x['lu']['hlo_getrf_in_loop_bodies']} |"
        )
    s = out["settings"]
    base = d.get(BASELINE, {})
    lines += [
        "",
        f"long solve: T = {s['T_long']:g}, max|f(y(T))| = {base.get('max_abs_f', float('nan')):.1e} "
        f"({'<=' if base.get('max_abs_f', 1.0) <= 1e-10 else 'ABOVE'} 1e-10), stats {base.get('stats')}",
        f"unrolled Newton: {s['newton_unroll']} steps, max|f| = {s['unrolled_newton_max_abs_f']:.1e}; "
        f"F-1 Hessian asymmetry {out['hessian_f1_symmetry']:.1e}",
    ]
    for n, x in d.items():
        if n != BASELINE:
            lines.append(f"{n}: {x}")
    return "\n".join(lines)


def main(argv=None) -> None:
    _timing.quick_json_main("python -m benchmarks.steady_state", __doc__, run, report, argv)


if __name__ == "__main__":
    main()
