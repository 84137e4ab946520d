"""Benchmark: one neural-ODE training step, every diffode sensitivity method against diffrax.

Run from the repository root::

    python -m benchmarks.neural_ode                    # full run (about half an hour on 2 cores)
    python -m benchmarks.neural_ode --quick            # smoke run (2-4 minutes): small width, batch 32,
                                                       # float64, 1 sample each
    python -m benchmarks.neural_ode --out results.json

The full run writes ``benchmarks/neural_ode.json`` (next to this script) unless
``--out`` names another file; ``--quick`` writes only where ``--out`` says.

Workload (the usual neural-ODE training loop, e.g. the diffrax and torchdiffeq
examples): the vector field is ``f(t, y, args) = MLP(y)``, an ``eqx.Module``
wrapping ``eqx.nn.MLP(2, 2, width, depth=2, activation=tanh)`` that is passed
itself as ``f`` (``diffode.solve(model, y0, ts, ...)``, the
``diffrax.ODETerm(model)`` idiom). A batch of initial states is solved under
``jax.vmap`` over ``y0`` with the parameters shared, saving at 50 times on
[0, 1], Tsit5, rtol = 1e-3, atol = 1e-6, ``max_steps = 4096`` for both libraries
(diffode's default). The loss is the mean squared difference to fixed targets
(the damped linear spiral ``y' = A y``, ``A = [[-0.1, 2], [-2, -0.1]]``, solved
exactly from the same initial states). One training step is
``eqx.filter_value_and_grad`` of the loss plus an ``optax.adam(1e-3)`` update, all
inside one ``eqx.filter_jit``; it returns the loss, the gradient, the per-trajectory
solver counters (``has_aux``), the new model and the new optimiser state. Two sizes:
width 64 with a batch of 256 ("small", 4482 parameters) and width 128 with a batch
of 1024 ("large", 16898 parameters), each in float32 and float64 (this script
switches x64 on itself; diffode never does, and every array here has an explicit
dtype).

Candidates: diffode ``sensitivity=`` ``Direct()``, ``InterpolatingAdjoint()``,
``BacksolveAdjoint()``, ``Auto()`` (the default) and, at the small size only,
``ForwardSensitivity()``, which carries a sensitivity matrix per trajectory: it is
first timed on a batch of ``PROBE_BATCH`` and skipped, with a note, when one call on
the whole batch would take more than 20 s (linear extrapolation); diffrax ``diffeqsolve`` with ``Tsit5``, ``PIDController(rtol, atol)``,
``SaveAt(ts=ts)`` and ``adjoint=RecursiveCheckpointAdjoint()`` (the reference of
every ratio) or ``BacksolveAdjoint()``.

Timing conventions (``benchmarks/_timing.py``): a discarded warm-up (a tiny training
step with each library) takes the process's one-time costs; compile time is the
median of cold first calls (``jax.clear_caches()`` first; trace + compile + one
run), 3 samples, interleaved between candidates; run time is the median per call,
``jax.block_until_ready`` before each timer stops, candidates interleaved, 5
repeats. Slow candidates get fewer samples so that the run stays bounded: one cold
first call when it took more than ``SLOW_FIRST_CALL_S``, and 3 (more than
``SLOW_CALL_S`` per call) or 2 (more than ``VERY_SLOW_CALL_S``) run repeats, the
first of them the call that decides the repeats (all calls after the compile samples go
to an ahead-of-time compiled step, ``step.lower(*args).compile()``, since every
compile sample clears JAX's caches). For them the
first call is mostly the run, so the table also gives "compile - run", the first
call less the median run time. A candidate that raises is recorded with
its error and the script carries on. ``--quick`` keeps the small width but solves a
batch of ``QUICK_BATCH``, so that the continuous adjoints (whose cost grows with the
batch, see below) fit a smoke test; its numbers are not the small size's.
After each case the results so far are written to the output file (``partial``).

Also reported: the relative 2-norm difference of each gradient (all parameters,
flattened) from diffrax ``RecursiveCheckpointAdjoint``'s in the same dtype (a
sanity check: the methods differentiate different discretisations, so they agree
to roughly the tolerances, not to rounding); forward steps and function
evaluations per trajectory in the timed batch (diffode's ``sol.stats["num_fevals"]``,
diffrax's ``6 * num_steps + 1`` for Tsit5, which the count below confirms), mean
and max over the batch (under ``vmap`` the batch steps until its slowest member is
done); and, from a separate untimed run with a batch of one, the function
evaluations counted exactly (a ``jax.debug.callback`` in the vector field bumps a
host-side counter) in a forward solve and in a whole training step, the
difference being the backward pass's (evaluations inside ``jax.vjp``/``jax.jvp``
of ``f`` count once each: the callback is in the primal computation).

What to expect: ``Direct`` and diffrax's ``RecursiveCheckpointAdjoint`` differentiate
the solver's steps, and under ``vmap`` JAX sums the shared parameters' cotangent over
the batch inside each step's transposed matrix products. The continuous adjoints
(``InterpolatingAdjoint``, ``BacksolveAdjoint``, diffrax's ``BacksolveAdjoint``, and
``Auto``, which picks ``InterpolatingAdjoint`` here since ``n (p + 1)`` is far above
its threshold) integrate the parameter cotangent as part of the adjoint state, one
copy per trajectory (batch x parameters numbers per stage), and restart at each of
the 50 save times, so their cost grows with the batch and the save times.

Nothing is asserted: the script exits 0 whatever it measures.
"""

from __future__ import annotations

import jax

# float64 is measured; diffode itself never switches x64 on.
jax.config.update("jax_enable_x64", True)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Callable  # noqa: E402

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import diffode  # noqa: E402

from . import _timing  # noqa: E402
from .solve_lv import environment  # noqa: E402

NUM_SAVE = 50
T_END = 1.0
RTOL, ATOL = 1e-3, 1e-6
MAX_STEPS = 4096  # diffode's default; given to diffrax too
LEARNING_RATE = 1e-3
DEPTH = 2
SIZES = {"small": dict(width=64, batch=256), "large": dict(width=128, batch=1024)}
QUICK_BATCH = 32  # --quick: the small width with a smaller batch (the continuous adjoints scale with it)
PROBE_BATCH = 8  # ForwardSensitivity is first timed on this batch and extrapolated
SPIRAL = ((-0.1, 2.0), (-2.0, -0.1))
REFERENCE = "diffrax RecursiveCheckpointAdjoint"
FORWARD_SENSITIVITY_LIMIT_S = 20.0  # skip ForwardSensitivity when one call would take longer
SLOW_FIRST_CALL_S = 15.0  # one compile sample only when the first call takes longer
SLOW_CALL_S = 2.0  # at most 3 run repeats above this per call
VERY_SLOW_CALL_S = 8.0  # at most 2 run repeats above this per call
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "neural_ode.json")


# ---------------------------------------------------------------------------
# The model, the data and the training step.
# ---------------------------------------------------------------------------


class VectorField(eqx.Module):
    """``f(t, y, args) = mlp(y)``; with ``count=True`` every evaluation bumps ``COUNTER``."""

    mlp: eqx.nn.MLP
    count: bool = eqx.field(static=True, default=False)

    def __call__(self, t, y, args):
        if self.count:
            jax.debug.callback(_bump)
        return self.mlp(y)


COUNTER = [0]


def _bump():
    COUNTER[0] += 1


def make_model(width: int, dtype, key=0) -> VectorField:
    mlp = eqx.nn.MLP(2, 2, width, DEPTH, activation=jnp.tanh, dtype=dtype, key=jr.PRNGKey(key))
    return VectorField(mlp)


def make_data(batch: int, dtype):
    """Save times, initial states ``(batch, 2)`` and targets ``(batch, NUM_SAVE, 2)`` (exact spiral)."""
    ts = jnp.linspace(0.0, T_END, NUM_SAVE, dtype=dtype)
    y0 = jr.normal(jr.PRNGKey(1), (batch, 2), dtype)
    a = np.asarray(SPIRAL, np.float64)
    props = np.stack([_expm(a * float(t)) for t in np.asarray(ts, np.float64)])  # (T, 2, 2)
    target = np.einsum("tij,bj->bti", props, np.asarray(y0, np.float64))
    return ts, y0, jnp.asarray(target, dtype)


def _expm(m: np.ndarray) -> np.ndarray:
    import scipy.linalg

    return scipy.linalg.expm(m)


def diffode_solver(sensitivity) -> Callable:
    def solve(model, y0, ts):
        sol = diffode.solve(
            model,
            y0,
            ts,
            solver=diffode.Tsit5(),
            rtol=RTOL,
            atol=ATOL,
            max_steps=MAX_STEPS,
            sensitivity=sensitivity,
        )
        return sol.ys, dict(num_steps=sol.stats["num_steps"], num_fevals=sol.stats["num_fevals"])

    return solve


def diffrax_solver(adjoint_name: str) -> Callable:
    import diffrax

    def solve(model, y0, ts):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(model),
            diffrax.Tsit5(),
            ts[0],
            ts[-1],
            None,
            y0,
            None,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
            max_steps=MAX_STEPS,
            adjoint=getattr(diffrax, adjoint_name)(),
        )
        # diffrax's Tsit5 evaluates f 6 times per attempted step plus once at the start
        # (checked against the exact count of the instrumented run).
        steps = sol.stats["num_steps"]
        return sol.ys, dict(num_steps=steps, num_fevals=6 * steps + 1)

    return solve


FORWARD_SENSITIVITY = "diffode ForwardSensitivity"


def candidates(with_forward: bool) -> dict[str, Callable]:
    out = {
        "diffode Direct": diffode_solver(diffode.Direct()),
        "diffode InterpolatingAdjoint": diffode_solver(diffode.InterpolatingAdjoint()),
        "diffode BacksolveAdjoint": diffode_solver(diffode.BacksolveAdjoint()),
        "diffode Auto (default)": diffode_solver(diffode.Auto()),
    }
    if with_forward:
        out[FORWARD_SENSITIVITY] = diffode_solver(diffode.ForwardSensitivity())
    out[REFERENCE] = diffrax_solver("RecursiveCheckpointAdjoint")
    out["diffrax BacksolveAdjoint"] = diffrax_solver("BacksolveAdjoint")
    return out


def make_loss(solve: Callable, ts) -> Callable:
    def loss(model, y0, target):
        ys, stats = jax.vmap(lambda y: solve(model, y, ts))(y0)
        return jnp.mean((ys - target) ** 2), stats

    return loss


def make_step(solve: Callable, ts, optimizer) -> Callable:
    """The jitted training step: ``(model, opt_state, y0, target) -> (loss, grads, stats, model, opt_state)``."""
    loss = make_loss(solve, ts)

    @eqx.filter_jit
    def step(model, opt_state, y0, target):
        (value, stats), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model, y0, target)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return value, grads, stats, eqx.apply_updates(model, updates), opt_state

    return step


def flat_grad(grads) -> np.ndarray:
    leaves = jax.tree_util.tree_leaves(eqx.filter(grads, eqx.is_inexact_array))
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])


# ---------------------------------------------------------------------------
# Exact function-evaluation counts (untimed, batch of one).
# ---------------------------------------------------------------------------


def count_fevals(solve: Callable, model: VectorField, ts, y0, target, optimizer) -> dict[str, int]:
    counted = VectorField(model.mlp, count=True)
    y1, target1 = y0[:1], target[:1]

    @eqx.filter_jit
    def forward(m, y):
        return jax.vmap(lambda yy: solve(m, yy, ts)[0])(y)

    def counted_run(fn, *args) -> int:
        jax.effects_barrier()
        COUNTER[0] = 0
        jax.block_until_ready(fn(*args))
        jax.effects_barrier()
        return COUNTER[0]

    fwd = counted_run(forward, counted, y1)
    step = make_step(solve, ts, optimizer)
    opt_state = optimizer.init(eqx.filter(counted, eqx.is_inexact_array))
    total = counted_run(step, counted, opt_state, y1, target1)
    return dict(forward=fwd, step=total, backward=total - fwd)


# ---------------------------------------------------------------------------
# Measurement.
# ---------------------------------------------------------------------------


def _error(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:400]}"


def warm_up() -> None:
    """A tiny training step with each library, discarded: lazy imports and XLA start-up."""
    opt = optax.adam(LEARNING_RATE)
    model = make_model(4, jnp.float64)
    ts, y0, target = make_data(2, jnp.float64)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    for solve in (diffode_solver(diffode.Direct()), diffrax_solver("RecursiveCheckpointAdjoint")):
        _timing.first_call_sample(make_step(solve, ts, opt), model, state, y0, target)


def probe_forward_sensitivity(model, opt, dtype, batch: int) -> dict[str, Any]:
    """One warm call of the ForwardSensitivity step on ``PROBE_BATCH`` trajectories, extrapolated
    linearly to ``batch`` (its cost is per trajectory: each carries its own sensitivity matrix)."""
    ts, y0, target = make_data(PROBE_BATCH, dtype)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_step(diffode_solver(diffode.ForwardSensitivity()), ts, opt)
    try:
        first = _timing.first_call_sample(step, model, opt_state, y0, target)
        call = _timing.calls_sample(step, model, opt_state, y0, target, number=1)
    except Exception as e:  # noqa: BLE001
        return dict(error=_error(e))
    est = call * batch / PROBE_BATCH
    return dict(
        probe_batch=PROBE_BATCH,
        probe_first_call_s=first,
        probe_call_s=call,
        estimated_call_s=est,
        run=est <= FORWARD_SENSITIVITY_LIMIT_S,
    )


#: Substrings of candidate names to keep (``--methods``); empty: all.
METHODS: list[str] = []


def measure_case(size: str, dtype, quick: bool) -> dict[str, Any]:
    width, batch = SIZES[size]["width"], SIZES[size]["batch"]
    if quick:
        batch = QUICK_BATCH
    dtype_name = jnp.dtype(dtype).name
    print(f"# case {size} (width {width}, batch {batch}) {dtype_name}", file=sys.stderr, flush=True)
    opt = optax.adam(LEARNING_RATE)
    model = make_model(width, dtype)
    ts, y0, target = make_data(batch, dtype)
    opt_state = opt.init(eqx.filter(model, eqx.is_inexact_array))
    args = (model, opt_state, y0, target)
    probe = None
    keep = lambda name: not METHODS or any(m in name for m in METHODS) or name == REFERENCE  # noqa: E731
    if size == "small" and keep(FORWARD_SENSITIVITY):  # only at the small size, and only if not absurdly slow
        probe = probe_forward_sensitivity(model, opt, dtype, batch)
        print(f"#   ForwardSensitivity probe: {probe}", file=sys.stderr, flush=True)
    solvers = {n: s for n, s in candidates(bool(probe and probe.get("run"))).items() if keep(n)}
    steps = {n: make_step(s, ts, opt) for n, s in solvers.items()}
    results: dict[str, dict[str, Any]] = {n: {} for n in steps}
    if probe is not None and not probe.get("run"):
        if "error" in probe:
            results[FORWARD_SENSITIVITY] = dict(error=probe["error"], probe=probe)
        else:
            results[FORWARD_SENSITIVITY] = dict(
                probe=probe,
                skipped=(
                    f"one call at batch {PROBE_BATCH} took {probe['probe_call_s']:.2f} s, so about "
                    f"{probe['estimated_call_s']:.0f} s at batch {batch} (> {FORWARD_SENSITIVITY_LIMIT_S:.0f} s)"
                ),
            )
    elif probe is not None:
        results[FORWARD_SENSITIVITY]["probe"] = probe
    compile_repeats, run_repeats = (1, 1) if quick else (3, 5)

    # Compile time: interleaved cold first calls.
    compile_s: dict[str, list[float]] = {n: [] for n in steps}
    for r in range(compile_repeats):
        names = list(steps) if r % 2 == 0 else list(reversed(steps))
        for n in names:
            res = results[n]
            if "error" in res or "skipped" in res or (compile_s[n] and compile_s[n][0] > SLOW_FIRST_CALL_S):
                continue
            try:
                compile_s[n].append(_timing.first_call_sample(steps[n], *args))
            except Exception as e:  # noqa: BLE001 - a failing candidate is a result
                res["error"] = _error(e)
                traceback.print_exc()
            print(
                f"#   compile {n}: {compile_s[n][-1] if compile_s[n] else res.get('error')}",
                file=sys.stderr,
                flush=True,
            )
    for n, c in compile_s.items():
        if c:
            results[n]["compile_s"] = _timing.Timing(tuple(c)).as_dict()

    # Run time. The compile samples cleared every cache, so each step is compiled once more
    # ahead of time (untimed); one timed call then decides the calls per sample and the repeats.
    number: dict[str, int] = {}
    repeats: dict[str, int] = {}
    warm: dict[str, float] = {}
    compiled: dict[str, Callable] = {}
    for n in steps:
        res = results[n]
        if "error" in res or "skipped" in res:
            continue
        try:
            compiled[n] = steps[n].lower(*args).compile()
        except Exception as e:  # noqa: BLE001
            res["error"] = _error(e)
    for n, fn in compiled.items():
        res = results[n]
        try:
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            call = warm[n] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            res["error"] = _error(e)
            continue
        if n == FORWARD_SENSITIVITY and call > FORWARD_SENSITIVITY_LIMIT_S:
            res["skipped"] = (
                f"one call took {call:.1f} s > {FORWARD_SENSITIVITY_LIMIT_S:.0f} s; not timed further"
            )
            continue
        if call > VERY_SLOW_CALL_S:
            number[n], repeats[n] = 1, min(run_repeats, 2)
        elif call > SLOW_CALL_S:
            number[n], repeats[n] = 1, min(run_repeats, 3)
        elif quick:
            number[n], repeats[n] = 1, run_repeats
        else:
            number[n], repeats[n] = _timing.calibrate_number(fn, *args, min_time=0.2), run_repeats
    # A slow candidate's warm call (already compiled) is its first run sample.
    run_s: dict[str, list[float]] = {
        n: ([warm[n]] if number[n] == 1 and warm[n] > SLOW_CALL_S else []) for n in number
    }
    for r in range(max(repeats.values(), default=0)):
        names = list(number) if r % 2 == 0 else list(reversed(number))
        for n in names:
            if len(run_s[n]) < repeats[n]:
                run_s[n].append(_timing.calls_sample(compiled[n], *args, number=number[n]))
    for n, s in run_s.items():
        results[n]["run_s"] = _timing.Timing(tuple(s), number[n]).as_dict()
        print(f"#   run {n}: {_timing.median(s) * 1e3:.1f} ms", file=sys.stderr, flush=True)

    # Gradients and solver counters of the timed batch (the step is compiled by now).
    grads: dict[str, np.ndarray] = {}
    for n, fn in compiled.items():
        res = results[n]
        if "run_s" not in res:
            continue
        value, g, stats, _, _ = fn(*args)
        grads[n] = flat_grad(g)
        res["loss"] = float(value)
        res["grad_norm"] = float(np.linalg.norm(grads[n]))
        for k in ("num_steps", "num_fevals"):
            v = np.asarray(stats[k])
            res[k] = dict(mean=float(v.mean()), max=int(v.max()))
    if REFERENCE in grads:
        ref = grads[REFERENCE]
        for n, g in grads.items():
            results[n]["grad_rel_diff"] = float(np.linalg.norm(g - ref) / np.linalg.norm(ref))

    # Exact function evaluations, batch of one, untimed.
    for n, solve in solvers.items():
        res = results[n]
        if "error" in res or "skipped" in res:
            continue
        try:
            res["fevals_counted"] = count_fevals(solve, model, ts, y0, target, opt)
        except Exception as e:  # noqa: BLE001
            res["fevals_counted"] = dict(error=_error(e))

    # Ratios to the reference.
    base = results.get(REFERENCE, {})
    for res in results.values():
        if "run_s" in res and "compile_s" in res:
            res["compile_minus_run_s"] = res["compile_s"]["median"] - res["run_s"]["median"]
        for key in ("compile_s", "run_s"):
            if key in res and key in base:
                res[key.replace("_s", "_ratio")] = res[key]["median"] / base[key]["median"]
        if "compile_minus_run_s" in res and "compile_minus_run_s" in base:
            res["compile_minus_run_ratio"] = res["compile_minus_run_s"] / base["compile_minus_run_s"]
    n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array))))
    return dict(
        size=size,
        width=width,
        batch=batch,
        num_params=n_params,
        dtype=dtype_name,
        compile_repeats=compile_repeats,
        run_repeats=run_repeats,
        results=results,
    )


#: The sizes to run (``--sizes``).
RUN_SIZES = list(SIZES)


def plan(quick: bool) -> list[tuple[str, Any]]:
    if quick:
        return [("small", jnp.float64)]
    return [(size, dtype) for size in RUN_SIZES for dtype in (jnp.float32, jnp.float64)]


def run(quick: bool = False, partial_out: str | None = None) -> dict[str, Any]:
    env = environment()  # before measuring, so that the load average is other processes'
    t0 = time.perf_counter()
    print("# warm-up (discarded)", file=sys.stderr, flush=True)
    warm_up()
    cases: list[dict[str, Any]] = []
    for size, dtype in plan(quick):
        cases.append(measure_case(size, dtype, quick))
        print(f"#   ({time.perf_counter() - t0:.0f} s so far)", file=sys.stderr, flush=True)
        if partial_out:  # the cases so far, in case the run is cut short
            with open(partial_out, "w") as fh:
                json.dump(
                    dict(benchmark="neural_ode", partial=True, environment=env, cases=cases), fh, indent=1
                )
    return dict(
        benchmark="neural_ode",
        settings=dict(
            quick=quick,
            num_save=NUM_SAVE,
            t_span=[0.0, T_END],
            rtol=RTOL,
            atol=ATOL,
            max_steps=MAX_STEPS,
            solver="Tsit5",
            depth=DEPTH,
            activation="tanh",
            learning_rate=LEARNING_RATE,
            optimizer="optax.adam",
            sizes=SIZES,
            quick_batch=QUICK_BATCH,
            forward_sensitivity_probe_batch=PROBE_BATCH,
            targets=f"exact solution of y' = A y, A = {SPIRAL}",
            ratios_relative_to=REFERENCE,
            slow_first_call_s=SLOW_FIRST_CALL_S,
            slow_call_s=SLOW_CALL_S,
            very_slow_call_s=VERY_SLOW_CALL_S,
            forward_sensitivity_limit_s=FORWARD_SENSITIVITY_LIMIT_S,
        ),
        environment=env,
        cases=cases,
        total_s=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


def _f(x, fmt: str, missing: str = "-") -> str:
    return missing if x is None else format(x, fmt)


def markdown_table(out: dict[str, Any]) -> str:
    head = (
        "| size | dtype | candidate | compile (s) | compile - run (s) | run (ms) | compile / ref "
        "| run / ref | grad rel. diff | fwd fevals / traj (mean, max) | counted fwd / bwd fevals |"
    )
    lines = [head, "|---|---|---|" + "---:|" * 8]
    for c in out["cases"]:
        for name, r in c["results"].items():
            label = f"{c['size']} ({c['width']}, {c['batch']})"
            if "error" in r or "skipped" in r:
                why = f"error: {r['error']}" if "error" in r else f"skipped: {r['skipped']}"
                lines.append(f"| {label} | {c['dtype']} | {name} | {why} |" + " |" * 7)
                continue
            fe = r.get("num_fevals")
            fevals = "-" if fe is None else f"{fe['mean']:.1f}, {fe['max']}"
            cnt = r.get("fevals_counted", {})
            counted = f"{cnt['forward']} / {cnt['backward']}" if "forward" in cnt else cnt.get("error", "-")
            lines.append(
                f"| {label} | {c['dtype']} | {name} "
                f"| {_f(r.get('compile_s', {}).get('median'), '.2f')} | {_f(r.get('compile_minus_run_s'), '.2f')} "
                f"| {_f(r['run_s']['median'] * 1e3 if 'run_s' in r else None, '.4g')} "
                f"| {_f(r.get('compile_ratio'), '.2f')} | {_f(r.get('run_ratio'), '.2f')} "
                f"| {_f(r.get('grad_rel_diff'), '.1e')} "
                f"| {fevals} | {counted} |"
            )
    return "\n".join(lines)


def report(out: dict[str, Any]) -> str:
    e = out["environment"]
    s = out["settings"]
    lines = [
        f"Neural-ODE training step: MLP(2 -> 2, depth {s['depth']}, tanh), {s['num_save']} saves on "
        f"{s['t_span']}, Tsit5, rtol {s['rtol']:g}, atol {s['atol']:g}, max_steps {s['max_steps']}, Adam.",
        f"jax {e['jax']} ({e['backend']}), diffode {e['diffode']} @ {(e['git_commit'] or '?')[:10]}"
        f"{' (diffode/ modified)' if e['diffode_dirty'] else ''}, diffrax {e['diffrax']}; "
        f"{e['cpu_count']} CPUs, load average {e['load_avg_1min']:.1f} at the start; {out['total_s']:.0f} s in all.",
        f"ref = {s['ratios_relative_to']}; compile = median cold first call (trace + compile + one run); "
        "counted fevals: batch of one, exact.",
        "",
        markdown_table(out),
        "",
    ]
    spread = []
    for c in out["cases"]:
        for name, r in c["results"].items():
            if "run_s" in r:
                rs, cs = r["run_s"], r["compile_s"]
                spread.append(
                    f"{c['size']} {c['dtype']} {name}: run {rs['min'] * 1e3:.4g}-{rs['max'] * 1e3:.4g} ms "
                    f"({len(rs['samples'])} x {rs['number']}), compile {cs['min']:.2f}-{cs['max']:.2f} s "
                    f"({len(cs['samples'])})"
                )
    lines.append("Spread (min-max, samples): " + "; ".join(spread) + ".")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.neural_ode", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small size, float64, one sample each (a smoke run)")
    ap.add_argument(
        "--out",
        "--json",
        dest="out",
        metavar="PATH",
        help="write the results as JSON here (default for a full run: benchmarks/neural_ode.json)",
    )
    ap.add_argument(
        "--methods",
        nargs="*",
        default=[],
        help="keep only candidates whose name contains one of these (the reference is always kept)",
    )
    ap.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--results", action="store_true", help="write the report into its section of RESULTS.md")
    a = ap.parse_args(argv)
    METHODS[:] = a.methods
    RUN_SIZES[:] = a.sizes
    path = a.out or (None if a.quick else DEFAULT_OUT)
    out = run(quick=a.quick, partial_out=path)
    sys.stderr.flush()
    text = report(out)
    print(text, flush=True)
    if a.results:
        _timing.write_section("neural_ode", text)
    if path:
        with open(path, "w") as fh:
            json.dump(out, fh, indent=1)
            fh.write("\n")
        print(f"# wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
