"""Which reverse-mode sensitivity method is fastest where: the measurement behind ``diffode.Auto``.

Every case times the gradient (``jax.grad`` of a scalar loss of ``diffode.solve``,
jitted, float64) with ``sensitivity=`` ``ForwardSensitivity()``, ``Direct()``,
``InterpolatingAdjoint()``, ``BacksolveAdjoint()`` and ``Auto()`` (the default; the
method it picks, ``Auto().choose(n, p)``, is recorded and its gradient is compared
with that method's). Three studies:

``tanh``
    The unbatched dense field ``y' = tanh(W y + b)`` with ``n`` states and
    ``p = n**2 + n`` parameters, gradient of ``sum(ys**2)`` with respect to
    ``(W, b)`` over 20 save points in ``t in [0, 2]``, Tsit5, rtol = atol = 1e-6,
    ``n`` in 2 ... 64.
``neural``
    A batched neural ODE: the vector field is an ``eqx.Module`` wrapping
    ``eqx.nn.MLP(2, 2, width, depth=2, activation=tanh)`` passed itself as ``f``;
    the loss is ``mean(ys**2)`` over a batch of ``jax.vmap``-ed solves over the
    initial states (parameters shared), 50 save points on [0, 1], Tsit5,
    rtol = 1e-3, atol = 1e-6; ``eqx.filter_jit(eqx.filter_grad(loss))``.
    ``ForwardSensitivity`` (one sensitivity matrix per trajectory) is first timed on a
    batch of ``PROBE_BATCH`` and skipped, with a note, where one call on the whole
    batch would take more than ``FORWARD_LIMIT_S`` (linear extrapolation in the batch).
``stiff``
    The 1-D Brusselator on ``N`` interior grid points (``2 N`` states):
    ``u' = A + u^2 v - (B + 1) u + alpha (u_{i-1} - 2 u_i + u_{i+1})``,
    ``v' = B u - u^2 v + alpha (v_{i-1} - 2 v_i + v_{i+1})``, fixed boundary values
    ``u = 1``, ``v = 3``, ``A = 1``, ``B = 3``, ``alpha = (N + 1)^2 / 50``,
    ``u(0, x) = 1 + sin(2 pi x)``, ``v(0, x) = 3``, ``x_i = i / (N + 1)``, t in [0, 10],
    10 save points; loss ``sum(ys**2)`` differentiated with respect to
    ``args = (A, B, alpha)`` (``p = 3``); ``Rodas5P()`` and ``Kvaerno5()`` at
    rtol = 1e-6, atol = 1e-8. The plain solve is run first (``throw=False``) and its
    status and step counts are recorded; a solver that fails is not differentiated.
``stiff_p``
    The same Brusselator with more differentiated inputs, to find where
    ``ForwardSensitivity`` stops paying for implicit solvers: ``params`` (``A, B,
    alpha``, ``p = 3``), ``field`` (``A`` one value per grid point, so ``p = N + 2``)
    and ``y0`` (the initial state and ``A, B, alpha``, ``p = 2 N + 3``).
``bruss2d_p``
    The 2-D Brusselator of ``benchmarks/brusselator.py`` (``2 N^2`` states, N = 4, 8,
    16, ``Rodas5P`` with its dense Jacobian, 12 saves, a forcing switched on at
    ``t = 1.1``) with the feed rate ``B`` on a coarser ``M x M`` grid: at a fixed
    number of states, ``p = M^2 + 2`` grows from 3 to 66 (``ForwardSensitivity``,
    ``Direct`` and ``Auto``).

Timing (``benchmarks/_timing.py``): one discarded warm-up gradient per method takes
the process's one-time costs. Per case, every candidate is first called once from a
cold cache (``jax.clear_caches()``; this first call is the first compile sample, and
a candidate that raises is recorded with its error and dropped), then once more (a
single-call run-time probe, which sets how many calls go into one run-time sample
and how many repeats the case gets); then ``compile_times`` adds interleaved cold
first calls and ``run_times`` takes interleaved run-time samples. Reported: median
compile time (trace + compile + one run) and median run time per call. The machine
is shared, so compare the ratios within a case (all candidates of a case are
interleaved), not milliseconds across cases.

Run::

    python -m benchmarks.auto_threshold            # full run, writes benchmarks/auto_threshold.json
    python -m benchmarks.auto_threshold --quick    # reduced set (a few minutes); --json PATH to save
    python -m benchmarks.auto_threshold --study stiff   # one study (tanh, neural, stiff, stiff_p, bruss2d_p)

Nothing is asserted: the script exits 0 whatever it measures.
"""

from __future__ import annotations

import jax

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
from jax.flatten_util import ravel_pytree  # noqa: E402

import diffode  # noqa: E402

from . import _timing  # noqa: E402

METHODS: dict[str, Callable[[], Any]] = {
    "ForwardSensitivity": diffode.ForwardSensitivity,
    "Direct": diffode.Direct,
    "InterpolatingAdjoint": diffode.InterpolatingAdjoint,
    "BacksolveAdjoint": diffode.BacksolveAdjoint,
    "Auto": diffode.Auto,
}
COMPARED = [m for m in METHODS if m != "Auto"]  # "fastest" is among these

# tanh study
SIZES = (2, 4, 8, 12, 16, 24, 32, 64)
QUICK_SIZES = (4, 16)
# neural study: (width, batch)
NEURAL_CASES = ((16, 1), (16, 32), (64, 32), (64, 256))
QUICK_NEURAL_CASES = ((16, 32),)
PROBE_BATCH = 8
FORWARD_LIMIT_S = 20.0
# stiff study
STIFF_SIZES = (8, 32, 64)
QUICK_STIFF_SIZES = (8,)
STIFF_SOLVERS = ("Rodas5P", "Kvaerno5")
QUICK_STIFF_SOLVERS = ("Rodas5P",)
# stiff_p study: (N, differentiated inputs)
STIFF_P_CASES = tuple((n, w) for n in (16, 64) for w in ("params", "field", "y0"))
QUICK_STIFF_P_CASES = ((16, "field"),)
STIFF_P_METHODS = ["ForwardSensitivity", "Direct", "InterpolatingAdjoint", "Auto"]
# bruss2d_p study: (N, M): the 2-D Brusselator on N x N with the feed rate on an M x M grid
BRUSS2D_P_CASES = ((4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 4), (8, 8), (16, 1), (16, 2), (16, 4), (16, 8))
QUICK_BRUSS2D_P_CASES = ((4, 2),)
BRUSS2D_P_METHODS = ["ForwardSensitivity", "Direct", "Auto"]
SOLVE_LIMIT_S = 60.0  # a plain solve slower than this (one call, after compiling) is not differentiated
SLOW_CALL_S = 2.0  # fewer run repeats when a candidate's call takes longer than this

OUT_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "auto_threshold.json")


# --------------------------------------------------------------------------- problems


def tanh_field(t, y, params):
    w, b = params
    return jnp.tanh(w @ y + b)


def tanh_case(n: int) -> dict[str, Any]:
    ts = jnp.linspace(0.0, 2.0, 20)
    key = jr.PRNGKey(n)
    params = (jr.normal(key, (n, n), dtype=jnp.float64) / jnp.sqrt(n), jnp.zeros(n, jnp.float64))
    y0 = jnp.linspace(-1.0, 1.0, n)

    def make(method):
        def loss(params, y0):
            return jnp.sum(
                diffode.solve(tanh_field, y0, ts, params, rtol=1e-6, atol=1e-6, sensitivity=method).ys ** 2
            )

        return jax.jit(jax.grad(loss))

    return dict(case=f"n={n}", n=n, p=n * n + n, batch=1, make=make, args=(params, y0))


class MLPField(eqx.Module):
    """``f(t, y, args) = mlp(y)``: the network passed itself as the vector field."""

    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(y)


def neural_case(width: int, batch: int) -> dict[str, Any]:
    ts = jnp.linspace(0.0, 1.0, 50)
    model = MLPField(
        eqx.nn.MLP(2, 2, width, depth=2, activation=jnp.tanh, key=jr.PRNGKey(0), dtype=jnp.float64)
    )
    y0s = jr.normal(jr.PRNGKey(1), (batch, 2), dtype=jnp.float64)
    p = sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)))

    def make(method):
        def loss(model, y0s):
            sol = jax.vmap(
                lambda y0: diffode.solve(model, y0, ts, rtol=1e-3, atol=1e-6, sensitivity=method).ys
            )(y0s)
            return jnp.mean(sol**2)

        return eqx.filter_jit(eqx.filter_grad(loss))

    return dict(
        case=f"width={width}, batch={batch}", n=2, p=p, batch=batch, width=width, make=make, args=(model, y0s)
    )


def brusselator(t, y, args):
    a, b, alpha = args[0], args[1], args[2]
    n = y.shape[0] // 2
    u, v = y[:n], y[n:]
    one = jnp.ones(1, y.dtype)
    up = jnp.concatenate([one, u, one])
    vp = jnp.concatenate([3.0 * one, v, 3.0 * one])
    du = a + u * u * v - (b + 1.0) * u + alpha * (up[:-2] - 2.0 * u + up[2:])
    dv = b * u - u * u * v + alpha * (vp[:-2] - 2.0 * v + vp[2:])
    return jnp.concatenate([du, dv])


def stiff_problem(big_n: int):
    x = jnp.arange(1, big_n + 1, dtype=jnp.float64) / (big_n + 1)
    y0 = jnp.concatenate([1.0 + jnp.sin(2.0 * jnp.pi * x), 3.0 * jnp.ones(big_n, jnp.float64)])
    args = jnp.array([1.0, 3.0, (big_n + 1) ** 2 / 50.0])
    ts = jnp.linspace(0.0, 10.0, 10)
    return y0, args, ts


def stiff_grad(solver_name: str, ts, wrt_y0: bool = False) -> Callable:
    """``make(method)``: the jitted gradient of the stiff studies' loss with respect to
    ``args`` (and ``y0`` with ``wrt_y0``)."""
    solver = getattr(diffode, solver_name)()

    def make(method):
        def loss(args, y0):
            return jnp.sum(
                diffode.solve(
                    brusselator, y0, ts, args, solver=solver, rtol=1e-6, atol=1e-8, sensitivity=method
                ).ys
                ** 2
            )

        return jax.jit(jax.grad(loss, argnums=(0, 1) if wrt_y0 else 0))

    return make


def stiff_case(big_n: int, solver_name: str) -> dict[str, Any]:
    y0, args, ts = stiff_problem(big_n)
    make = stiff_grad(solver_name, ts)
    return dict(
        case=f"N={big_n}, {solver_name}",
        n=2 * big_n,
        p=3,
        batch=1,
        solver=solver_name,
        big_n=big_n,
        make=make,
        args=(args, y0),
    )


def stiff_p_case(big_n: int, wrt: str, solver_name: str) -> dict[str, Any]:
    y0, args, ts = stiff_problem(big_n)
    if wrt == "field":
        args = (args[0] * jnp.ones(big_n), args[1], args[2])
    p = dict(params=3, field=big_n + 2, y0=2 * big_n + 3)[wrt]
    make = stiff_grad(solver_name, ts, wrt_y0=wrt == "y0")
    return dict(
        case=f"N={big_n}, {wrt}, {solver_name}",
        n=2 * big_n,
        p=p,
        batch=1,
        solver=solver_name,
        big_n=big_n,
        wrt=wrt,
        make=make,
        args=(args, y0),
    )


def bruss2d_p_case(big_n: int, m: int) -> dict[str, Any]:
    """The 2-D Brusselator of ``benchmarks/brusselator.py`` (``2 N^2`` states, ``Rodas5P``,
    dense Jacobian) with the feed rate ``B`` given on an ``M x M`` grid (each value shared
    by an ``N/M x N/M`` block of cells): ``p = M^2 + 2`` differentiated inputs at a fixed
    number of states."""
    from .brusselator import PARAMS, T1, T_ON, Bruss

    b = Bruss(big_n)
    rhs, block, ts = b.rhs(), big_n // m, jnp.linspace(0.0, T1, 12)

    def f(t, y, a):
        scale, A, B = a
        return rhs(t, y, (scale, A, jnp.repeat(jnp.repeat(B, block, 0), block, 1)))

    def make(method):
        def loss(args, y0):
            sol = diffode.solve(
                f,
                y0,
                ts,
                args,
                solver=diffode.Rodas5P(),
                rtol=1e-6,
                atol=1e-8,
                tstops=[T_ON],
                sensitivity=method,
            )
            return jnp.sum(sol.ys**2)

        return jax.jit(jax.grad(loss))

    args = (jnp.asarray(PARAMS[0]), jnp.asarray(PARAMS[1]), jnp.full((m, m), PARAMS[2]))
    return dict(
        case=f"N={big_n}, B on {m}x{m}",
        n=2 * big_n * big_n,
        p=m * m + 2,
        batch=1,
        solver="Rodas5P",
        big_n=big_n,
        make=make,
        args=(args, jnp.asarray(b.y0())),
    )


def stiff_plain_solve(big_n: int, solver_name: str) -> dict[str, Any]:
    """The undifferentiated solve: status, steps, compile and one run time."""
    y0, args, ts = stiff_problem(big_n)
    solver = getattr(diffode, solver_name)()
    fn = jax.jit(
        lambda args, y0: diffode.solve(
            brusselator, y0, ts, args, solver=solver, rtol=1e-6, atol=1e-8, throw=False
        )
    )
    try:
        t0 = time.perf_counter()
        sol = jax.block_until_ready(fn(args, y0))
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        sol = jax.block_until_ready(fn(args, y0))
        run = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001
        return dict(ok=False, error=err_text(e))
    status = int(np.max(np.asarray(sol.status)))
    try:
        stats = {k: int(np.max(np.asarray(v))) for k, v in dict(sol.stats).items()}
    except Exception:  # noqa: BLE001
        stats = str(sol.stats)
    return dict(
        ok=status == int(diffode.Status.SUCCESS) and run <= SOLVE_LIMIT_S,
        status=status,
        message=diffode.MESSAGES[status],
        stats=stats,
        first_call_s=first,
        run_s=run,
        too_slow=run > SOLVE_LIMIT_S,
    )


# --------------------------------------------------------------------------- measuring


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(eqx.filter(tree, eqx.is_array))[0])


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def err_text(e: BaseException) -> str:
    """The useful part of an error: an ``EquinoxRuntimeError`` raised in a callback is wrapped in a
    ``JaxRuntimeError`` whose text starts with the callback's traceback."""
    msg = f"{type(e).__name__}: {e}"
    key = "EquinoxRuntimeError: "
    if key in msg:
        msg = key + msg.rsplit(key, 1)[1].strip()
    return msg[:2000]


def method_name(m: Any) -> str:
    return type(m).__name__


def measure(
    case: dict[str, Any],
    methods: list[str],
    compile_repeats: int,
    run_repeats: int,
    min_time: float,
    notes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Screen, compile-time and run-time every method of ``case``; returns the case's record."""
    args = case["args"]
    res: dict[str, Any] = {}
    cands: dict[str, tuple[Callable, tuple]] = {}
    first: dict[str, float] = {}
    probe: dict[str, float] = {}
    grads: dict[str, np.ndarray] = {}
    for name in methods:
        fn = case["make"](METHODS[name]())
        try:
            first[name] = _timing.first_call_sample(fn, *args)  # cold: clear_caches + trace + compile + run
            t0 = time.perf_counter()
            g = jax.block_until_ready(fn(*args))
            probe[name] = time.perf_counter() - t0
            grads[name] = flat(g)
            if not np.all(np.isfinite(grads[name])):
                raise FloatingPointError("non-finite gradient")
            cands[name] = (fn, args)
        except Exception as e:  # noqa: BLE001
            res[name] = dict(error=err_text(e))
            print(f"#   {name}: {res[name]['error'][:300]}", file=sys.stderr, flush=True)
        else:
            print(
                f"#   {name}: first call {first[name]:.2f} s, call {probe[name] * 1e3:.3f} ms",
                file=sys.stderr,
                flush=True,
            )
    for name, why in (notes or {}).items():
        res[name] = dict(skipped=why)
    slow = max(probe.values(), default=0.0)
    repeats = run_repeats if slow <= SLOW_CALL_S else min(run_repeats, 3)
    compile_more = compile_repeats - 1 if slow <= SLOW_CALL_S else 0  # slow: the first call is mostly run
    ctimes = (
        _timing.compile_times(cands, repeats=compile_more, warmup=0) if (cands and compile_more > 0) else {}
    )
    number = {k: (1 if probe[k] >= min_time else None) for k in cands}
    rtimes = _timing.run_times(cands, repeats=repeats, number=number, min_time=min_time) if cands else {}
    ref = grads.get("ForwardSensitivity", grads.get("Direct"))
    for name in cands:
        samples = [first[name]] + (list(ctimes[name].samples) if name in ctimes else [])
        c = _timing.Timing(tuple(samples))
        res[name] = dict(
            compile_s=c.as_dict(),
            run_s=rtimes[name].as_dict(),
            probe_call_s=probe[name],
            compile_minus_run_s=c.median - rtimes[name].median,
            grad_rel_diff=(rel_diff(grads[name], ref) if ref is not None else None),
        )
    auto = diffode.Auto()
    solver = getattr(diffode, case["solver"])() if "solver" in case else None
    chosen = method_name(auto.choose(case["n"], case["p"], solver))
    rec = {k: v for k, v in case.items() if k not in ("make", "args")}
    rec.update(aug_size=case["n"] * (case["p"] + 1), auto_choice=chosen, results=res)
    if "Auto" in grads and chosen in grads:
        rec["auto_vs_choice_grad_rel_diff"] = rel_diff(grads["Auto"], grads[chosen])
    timed = {k: res[k]["run_s"]["median"] for k in COMPARED if k in cands}
    if timed:
        best = min(timed, key=timed.get)
        rec["fastest"] = best
        for k in cands:
            res[k]["run_ratio_to_fastest"] = res[k]["run_s"]["median"] / timed[best]
    return rec


def warmup() -> None:
    """Discarded gradients with every method: the process's one-time costs fall on none."""
    case = tanh_case(2)
    for name in METHODS:
        jax.block_until_ready(case["make"](METHODS[name]())(*case["args"]))


# --------------------------------------------------------------------------- studies


def run_tanh(quick: bool, save: Callable[[], None], out: list) -> None:
    for n in QUICK_SIZES if quick else SIZES:
        print(f"# tanh n = {n}", file=sys.stderr, flush=True)
        out.append(
            measure(
                tanh_case(n), list(METHODS), compile_repeats=1, run_repeats=3 if quick else 7, min_time=0.05
            )
        )
        save()


def run_neural(quick: bool, save: Callable[[], None], out: list) -> None:
    for width, batch in QUICK_NEURAL_CASES if quick else NEURAL_CASES:
        print(f"# neural width = {width}, batch = {batch}", file=sys.stderr, flush=True)
        methods, notes, extra = list(METHODS), {}, {}
        if batch > PROBE_BATCH:
            # ForwardSensitivity carries a (2, p) sensitivity per trajectory: probe on a small batch first.
            small = neural_case(width, PROBE_BATCH)
            fn = small["make"](diffode.ForwardSensitivity())
            try:
                jax.block_until_ready(fn(*small["args"]))
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*small["args"]))
                per = time.perf_counter() - t0
                predicted = per * batch / PROBE_BATCH
                extra = dict(
                    forward_probe_batch=PROBE_BATCH,
                    forward_probe_call_s=per,
                    forward_predicted_call_s=predicted,
                )
                print(
                    f"#   ForwardSensitivity probe (batch {PROBE_BATCH}): {per:.3f} s -> {predicted:.1f} s "
                    f"predicted",
                    file=sys.stderr,
                    flush=True,
                )
                if predicted > FORWARD_LIMIT_S:
                    methods.remove("ForwardSensitivity")
                    notes["ForwardSensitivity"] = (
                        f"skipped: {per:.2f} s per call at batch {PROBE_BATCH}, "
                        f"about {predicted:.0f} s predicted at batch {batch}"
                    )
            except Exception as e:  # noqa: BLE001
                extra = dict(forward_probe_error=err_text(e))
        rec = measure(
            neural_case(width, batch),
            methods,
            compile_repeats=1 if quick else 2,
            run_repeats=3 if quick else 5,
            min_time=0.1,
            notes=notes,
        )
        rec.update(extra)
        out.append(rec)
        save()


def run_stiff(quick: bool, save: Callable[[], None], out: list) -> None:
    for solver_name in QUICK_STIFF_SOLVERS if quick else STIFF_SOLVERS:
        for big_n in QUICK_STIFF_SIZES if quick else STIFF_SIZES:
            print(f"# stiff N = {big_n}, {solver_name}", file=sys.stderr, flush=True)
            plain = stiff_plain_solve(big_n, solver_name)
            print(f"#   plain solve: {plain}", file=sys.stderr, flush=True)
            case = stiff_case(big_n, solver_name)
            if not plain["ok"]:
                rec = {k: v for k, v in case.items() if k not in ("make", "args")}
                rec.update(plain_solve=plain, results={}, skipped="the plain solve failed or was too slow")
            else:
                rec = measure(
                    case, list(METHODS), compile_repeats=1, run_repeats=3 if quick else 5, min_time=0.1
                )
                rec["plain_solve"] = plain
            out.append(rec)
            save()


def run_stiff_p(quick: bool, save: Callable[[], None], out: list) -> None:
    for solver_name in QUICK_STIFF_SOLVERS if quick else STIFF_SOLVERS:
        for big_n, wrt in QUICK_STIFF_P_CASES if quick else STIFF_P_CASES:
            print(f"# stiff_p N = {big_n}, {wrt}, {solver_name}", file=sys.stderr, flush=True)
            case = stiff_p_case(big_n, wrt, solver_name)
            rec = measure(
                case, STIFF_P_METHODS, compile_repeats=1, run_repeats=3 if quick else 5, min_time=0.1
            )
            out.append(rec)
            save()


def run_bruss2d_p(quick: bool, save: Callable[[], None], out: list) -> None:
    for big_n, m in QUICK_BRUSS2D_P_CASES if quick else BRUSS2D_P_CASES:
        print(f"# bruss2d_p N = {big_n}, M = {m}", file=sys.stderr, flush=True)
        rec = measure(
            bruss2d_p_case(big_n, m),
            BRUSS2D_P_METHODS,
            compile_repeats=1,
            run_repeats=3 if quick else 5,
            min_time=0.1,
        )
        out.append(rec)
        save()


STUDIES = {
    "tanh": run_tanh,
    "neural": run_neural,
    "stiff": run_stiff,
    "stiff_p": run_stiff_p,
    "bruss2d_p": run_bruss2d_p,
}


def environment() -> dict[str, Any]:
    try:
        from .solve_lv import environment as env

        return env()
    except Exception as e:  # noqa: BLE001
        return dict(error=str(e), jax=jax.__version__, load_avg_1min=os.getloadavg()[0])


def run(
    quick: bool = False, studies: tuple[str, ...] = tuple(STUDIES), path: str | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = dict(
        benchmark="auto_threshold",
        quick=quick,
        partial=True,
        environment=environment(),
        auto=dict(max_forward_size=diffode.Auto().max_forward_size),
        studies={s: [] for s in studies},
    )
    t_start = time.perf_counter()

    def save() -> None:
        out["elapsed_s"] = time.perf_counter() - t_start
        out["load_avg_1min_now"] = os.getloadavg()[0]
        if path:
            with open(path, "w") as fh:
                json.dump(out, fh, indent=1)

    warmup()
    for s in studies:
        try:
            STUDIES[s](quick, save, out["studies"][s])
        except Exception:  # noqa: BLE001
            out.setdefault("errors", {})[s] = traceback.format_exc()[-4000:]
            print(out["errors"][s], file=sys.stderr, flush=True)
    out["partial"] = False
    save()
    return out


# --------------------------------------------------------------------------- report


def _fmt_ms(r: dict[str, Any], key: str = "run_s") -> str:
    if "error" in r:
        return "error"
    if "skipped" in r:
        return "skipped"
    return f"{r[key]['median'] * 1e3:.3g}"


def report(out: dict[str, Any]) -> str:
    lines = []
    titles = dict(
        tanh="Unbatched `y' = tanh(W y + b)`, Tsit5",
        neural="Batched neural ODE (MLP depth 2), `vmap` over y0, Tsit5",
        stiff="Brusselator 1-D, 2N states, p = 3",
        stiff_p="Brusselator 1-D, 2N states, p differentiated inputs",
        bruss2d_p="Brusselator 2-D, 2N^2 states, Rodas5P, the feed rate on an M x M grid (p = M^2 + 2)",
    )
    for s, recs in out["studies"].items():
        lines.append(f"\n### {titles[s]}\n")
        extra = "| batch " if s == "neural" else ("| solver " if s.startswith(("stiff", "bruss")) else "")
        lines.append(
            f"| case {extra}| n | p | n·(p+1) | Auto picks | "
            + " | ".join(f"{m} run ms (× fastest)" for m in METHODS)
            + " |"
        )
        lines.append("|---" * (5 + bool(extra) + len(METHODS)) + "|")
        for rec in recs:
            res = rec.get("results", {})
            cells = []
            for m in METHODS:
                r = res.get(m)
                if r is None:
                    cells.append("-")
                elif "run_s" in r:
                    txt = f"{r['run_s']['median'] * 1e3:.3g} ({r['run_ratio_to_fastest']:.2f})"
                    cells.append(f"**{txt}**" if rec.get("fastest") == m else txt)
                else:
                    cells.append(_fmt_ms(r))
            if not res and "skipped" in rec:
                cells = [rec["skipped"]] + [""] * (len(METHODS) - 1)
            ex = (
                f"| {rec['batch']} "
                if s == "neural"
                else (f"| {rec['solver']} " if s.startswith(("stiff", "bruss")) else "")
            )
            case = {
                "stiff": f"N={rec.get('big_n')}",
                "stiff_p": f"N={rec.get('big_n')}, {rec.get('wrt')}",
            }.get(s, rec["case"])
            if s == "neural":
                case = f"width={rec['width']}"
            lines.append(
                f"| {case} {ex}| {rec['n']} | {rec['p']} | {rec['n'] * (rec['p'] + 1)} | "
                f"{rec.get('auto_choice', '-')} | " + " | ".join(cells) + " |"
            )
        lines.append("\nCompile time (s, median of cold first calls, including one run):\n")
        lines.append("| case | " + " | ".join(METHODS) + " |")
        lines.append("|---" * (1 + len(METHODS)) + "|")
        for rec in recs:
            res = rec.get("results", {})
            cells = [
                (
                    f"{res[m]['compile_s']['median']:.2f}"
                    if m in res and "compile_s" in res[m]
                    else (_fmt_ms(res[m]) if m in res else "-")
                )
                for m in METHODS
            ]
            lines.append(f"| {rec['case']} | " + " | ".join(cells) + " |")
        notes = []
        for rec in recs:
            for m, r in rec.get("results", {}).items():
                if "error" in r:
                    notes.append(f"- {rec['case']}, {m}: {r['error'][:200]}")
                if "skipped" in r:
                    notes.append(f"- {rec['case']}, {m}: {r['skipped']}")
            if "auto_vs_choice_grad_rel_diff" in rec and rec["auto_vs_choice_grad_rel_diff"] > 1e-12:
                notes.append(
                    f"- {rec['case']}: Auto's gradient differs from {rec['auto_choice']}'s by "
                    f"{rec['auto_vs_choice_grad_rel_diff']:.1e}"
                )
            if "plain_solve" in rec:
                ps = rec["plain_solve"]
                st = ps.get("stats", {})
                steps = st.get("num_steps") if isinstance(st, dict) else st
                notes.append(
                    f"- {rec['case']}: plain solve {ps.get('message', ps.get('error'))}, "
                    f"{steps} steps, {ps.get('run_s', float('nan')) * 1e3:.3g} ms"
                )
        if notes:
            lines.append("")
            lines.extend(notes)
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.auto_threshold", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--quick", action="store_true", help="reduced set, a few minutes")
    ap.add_argument("--json", metavar="PATH", help=f"where to save (full run default: {OUT_DEFAULT})")
    ap.add_argument(
        "--study", action="append", choices=list(STUDIES), help="run only this study (repeatable)"
    )
    ap.add_argument("--results", action="store_true", help="write the report into its section of RESULTS.md")
    a = ap.parse_args(argv)
    path = a.json or (None if a.quick else OUT_DEFAULT)
    out = run(quick=a.quick, studies=tuple(a.study or STUDIES), path=path)
    text = report(out)
    print(text)
    if a.results:
        _timing.write_section("auto_threshold", text)
    if path:
        print(f"# wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
