"""The solve loop on flat states: step control, saving at ``ts``, dense output.

It knows nothing of differentiation: ``solve`` hands :func:`integrate` to the
sensitivity method, which calls it for its forward (and backward) solves.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree

from ._controller import PIDController, initial_step
from ._regularisers import step_regularisers
from ._solution import DenseOutput, Status
from ._util import any_member, finite_filler, select, show_progress, slowest, tree_select, vmap_size
from ._validate import all_finite
from .solvers.base import AbstractSolver, FlatRHS, Tolerances


def _stack(xs, dtype) -> Array:
    """``jnp.stack(xs)`` (of equal shapes) in a form that XLA fuses with its producers.

    XLA keeps the operands of a stack in kernels of their own when they have
    other readers. Here each operand is padded to the full length along a new
    first axis (a pad uses each element once, so XLA fuses even costly
    producers into it) and a constant mask picks its row. Used for the initial
    ``(y0, f0)`` pair, so that ``f0`` is computed in the pair's kernel. (For the
    scalar loop state the padded form compiles slower than a plain stack: the
    compiler evaluates every row's expression for every entry before it can
    simplify.)
    """
    k = len(xs)
    zero = jnp.zeros((), dtype)
    out = None
    for i, x in enumerate(xs):
        x = jnp.asarray(x, dtype)[None]
        x = lax.pad(x, zero, [(i, k - 1 - i, 0)] + [(0, 0, 0)] * (x.ndim - 1))
        mask = (np.arange(k) == i).reshape((k,) + (1,) * (x.ndim - 1))
        out = x if out is None else lax.select(np.broadcast_to(mask, x.shape), x, out)
    return out


def _unstack(v) -> list[Array]:
    """The rows of ``v`` (static slices, which XLA fuses into their readers)."""
    return [lax.index_in_dim(v, i, keepdims=False) for i in range(v.shape[0])]


class _Scalars(NamedTuple):
    """The scalar state of the solve loop, carried as one vector (a plain stack)."""

    t: Array
    h: Array  # the next step to attempt (landed on t_end when adaptive)
    memory: Any  # the controller's memory (scalars)


def known_value(x) -> np.ndarray | None:
    """``x`` as a NumPy array when its value is known at trace time (not a tracer), else ``None``."""
    return None if isinstance(x, jax.core.Tracer) else np.asarray(x)


def time_direction(ts: Array) -> Array | float:
    """``-1`` for decreasing ``ts`` (backwards integration), else ``1``, in the dtype of ``ts``.

    The loop runs in internal time ``s = direction * t``, which always increases.
    When ``ts`` is known at trace time (closed over rather than traced) the
    direction is a Python float, and the program has nothing to compute for it.
    """
    known = known_value(ts)
    if known is not None:
        return -1.0 if known[-1] < known[0] else 1.0
    return jnp.where(ts[-1] < ts[0], -1, 1).astype(ts.dtype)


def internal_rhs(
    f: Callable, args: PyTree, direction: Array | float, dtype, jac: Callable | None = None
) -> FlatRHS:
    """``f(t, y, args)`` as the steppers see it: a :class:`FlatRHS` in internal time.

    The right-hand side is one jitted closure, so ``f`` is traced and lowered once
    however many stages call it (``args`` may hold non-array leaves, so it is
    closed over, not passed).
    """
    if isinstance(direction, float):
        # Known at trace time: forwards needs no sign changes at all.
        sign = (lambda x: x) if direction > 0 else (lambda x: -x)  # noqa: E731
    else:
        dir_y = direction.astype(dtype)

        def sign(x):
            return (dir_y if x.dtype == dtype else direction.astype(x.dtype)) * x

    @jax.jit
    def rhs_fn(s, y):
        return sign(f(sign(s), y, args))

    jac_fn = None
    if jac is not None:

        def jac_fn(s, y):
            return sign(jac(sign(s), y, args))

    return FlatRHS(rhs_fn, jac_fn)


def stop_times(tstops, direction, t0, t_end, tdtype) -> Array:
    """The tstops in internal time, sorted, those outside the open span ``(t0, t_end)``
    replaced by +inf, and one +inf after the last."""
    s = direction * jnp.asarray(tstops, tdtype).reshape(-1)
    s = jnp.where((s > t0) & (s < t_end), s, jnp.inf)
    return jnp.concatenate([jnp.sort(s), jnp.full((1,), jnp.inf, tdtype)])


def landing_times(opts, direction, t0, t_end, tdtype) -> Array | None:
    """Where steps land on a constant besides ``t_end`` (internal time, :func:`stop_times`'s
    layout): the tstops and a stop time before ``t_end``; ``None`` when there are none."""
    stops = [] if opts.tstops is None else [jnp.asarray(opts.tstops, tdtype).reshape(-1)]
    if opts.t_stop is not None:
        stops.append(jnp.asarray(opts.t_stop, tdtype).reshape(-1))
    return stop_times(jnp.concatenate(stops), direction, t0, t_end, tdtype) if stops else None


def last_time(opts, direction, t_end) -> Array:
    """Where the steps end (internal time): ``t_end``, or an earlier stop time."""
    if opts.t_stop is None:
        return t_end
    return jnp.minimum(t_end, direction * jnp.asarray(opts.t_stop, jnp.result_type(t_end)))


def next_float(x: Array, towards) -> Array:
    """The floating-point neighbour of ``x`` towards ``towards`` (``+inf`` or ``-inf``), with
    the derivative of ``x`` itself (``jnp.nextafter`` has none)."""
    sg = lax.stop_gradient(x)
    nxt = jnp.nextafter(sg, jnp.asarray(towards, sg.dtype))
    return jnp.where(jnp.isfinite(sg), x + (nxt - sg), nxt)


def left_of(rhs: FlatRHS, stop: Array) -> FlatRHS:
    """``rhs`` with time held below ``stop``: the stages of a step that ends on a tstop
    evaluate the piece of ``f`` before it (its last stage, at ``t + h = stop``, at the
    largest time below ``stop``), as if ``f`` were continued continuously up to it."""

    def cap(s):
        below = jnp.nextafter(lax.stop_gradient(stop).astype(s.dtype), jnp.asarray(-jnp.inf, s.dtype))
        return jnp.minimum(s, below)

    jac = None if rhs.jac_fn is None else (lambda s, y: rhs.jac_fn(cap(s), y))
    return FlatRHS(lambda s, y: rhs.fn(cap(s), y), jac)


class IntegrateOptions(NamedTuple):
    """Everything :func:`integrate` needs besides the problem (set up by ``solve``)."""

    solver: AbstractSolver
    controller: PIDController
    rtol: Any
    atol: Any
    dt0: Any
    fixed: bool
    max_steps: int
    dense: bool = False
    jac: Callable | None = None  # jac(t, y_flat, args) -> (n, n)
    return_state: bool = False  # also return the solver state after the last step
    throw: bool = True  # sensitivity methods: raise when a backward solve fails (else NaN)
    stop_after: Any = None  # an int32 scalar: stop once more steps than this are accepted
    regularise: bool = False  # also return the accepted steps' regularisers (explicit RK only)
    batched: int = 0  # the size of a jax.vmap around `solve`, as seen where it was called (0: none)
    tstops: Any = None  # times (user time) every step lands on, restarting the solver there
    # Report t through jax.debug.callback after every step: True, or the (internal) span
    # the meter shows when this solve is a piece of a longer one (a segment between events).
    progress: Any = False
    # Terminal events, located but not differentiated (solve's first pass, see _events.py):
    # ((cond(t, y, args), direction), ...); the loop stops at the first root and also
    # returns its time (user time, inf if none) and index (-1 if none).
    events: Any = None
    t_stop: Any = None  # stop here (user time, not differentiated); saves after it are 0
    repeated_ts: bool = False  # ts may repeat a value (non-decreasing rather than increasing)
    # The index of an event whose condition does not count as started at ts[0] (the one that
    # fired where this solve starts, after a state change), or None: it cannot fire in the first step.
    event_quiet: Any = None
    # What a save keeps instead of the state: save_fn(t, y_flat, args) -> (m,) (t in user time).
    save_fn: Callable | None = None


def integrate(
    f: Callable[[Array, Array, Any], Array],
    y_flat: Array,
    ts_t: Array,
    args: PyTree,
    opts: IntegrateOptions,
    f0: Array | None = None,
) -> tuple[Array, Array, DenseOutput | None]:
    """The solve loop on flat states: ``f(t, y, args)`` with ``y`` of shape ``(n,)``.

    Returns ``(ys, counters, pieces)``: the ``(len(ts), n)`` saved states (NaN
    where not reached), the int32 vector ``[status, num_steps, num_accepted,
    num_rejected, num_fevals, *solver.stat_names]`` and, with ``opts.dense``, the
    accepted steps' interpolants; then the solver state after the last step with
    ``opts.return_state``, and the ``[error, stiffness]`` regularisers
    (:class:`~diffode._regularisers.Regularisers`) with ``opts.regularise``.
    Input checks happen here at run time and end in the status.
    ``f0 = f(ts[0], y0, args)`` may be passed when already known.
    The sensitivity methods call this for their forward and backward solves.
    """
    solver, controller, max_steps, dense, fixed = (
        opts.solver,
        opts.controller,
        opts.max_steps,
        opts.dense,
        opts.fixed,
    )
    dt0 = opts.dt0
    dtype, tdtype = y_flat.dtype, ts_t.dtype
    n_ts = ts_t.shape[0]
    i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
    tol = Tolerances.for_state(opts.rtol, opts.atol, controller.norm, y_flat)
    rtol, atol = tol.rtol, tol.atol
    direction = time_direction(ts_t)
    known_ts = known_value(ts_t)
    if known_ts is not None:
        # Save times known at trace time are checked and converted here, in
        # NumPy, rather than by the compiled program.
        s_ts = direction * known_ts
        ts_ok = bool(
            np.all(np.isfinite(known_ts))
            and np.all(s_ts[1:] >= s_ts[:-1] if opts.repeated_ts else s_ts[1:] > s_ts[:-1])
        )
        s_ts = jnp.asarray(s_ts, tdtype)
    else:
        s_ts = direction * ts_t  # internal time always increases
        ts_ok = jnp.all(jnp.isfinite(ts_t)) & jnp.all(
            s_ts[1:] >= s_ts[:-1] if opts.repeated_ts else s_ts[1:] > s_ts[:-1]
        )
    rhs = internal_rhs(f, args, direction, dtype, opts.jac)

    t0, t_end = s_ts[0], s_ts[-1]
    # Where the steps end: t_end, or an earlier stop time (solve's second pass of a
    # terminal event), which the last step lands on like t_end.
    s_stop = None if opts.t_stop is None else direction * jnp.asarray(opts.t_stop, tdtype)
    t_last = last_time(opts, direction, t_end)

    dt0_value = jnp.asarray(1.0 if dt0 is None else dt0, tdtype)
    # Inputs are checked at run time so that jit and throw=False work alike.
    if f0 is None:
        f0 = rhs(t0, y_flat)
    else:
        f0 = f0 if isinstance(direction, float) and direction > 0 else direction * f0
    state0 = solver.init(rhs, t0, y_flat, f0)
    dense_spec = jax.eval_shape(solver.dense_zeros, y_flat)
    # A save time between two step ends is interpolated in the step that covers
    # it. Fixed steps land on every save time and adaptive ones on t_end, so
    # with two save times (t0 and t_end) or fixed steps every save is a step end
    # and nothing is interpolated.
    interpolating = not fixed and n_ts > 2

    # A solver state that is one array shaped like y (explicit Runge-Kutta
    # methods: the FSAL derivative) travels stacked with y as one (2, n) array,
    # so that one select per step accepts or rejects both: one kernel, where
    # separate arrays cost two.
    stacked = isinstance(state0, jax.Array) and state0.shape == y_flat.shape and state0.dtype == dtype
    if stacked:
        pair0 = _stack([y_flat, state0], dtype)
        if state0 is f0:
            # Read f0 back from the pair, so that f's kernel writes the pair
            # itself (with f0's other readers, the pair would be one more kernel).
            f0 = state0 = pair0[1]

    # The first failing check decides the status (nested selects: one fused kernel).
    checks = [
        (ts_ok, Status.TS_NOT_MONOTONIC),
        (
            jnp.all(jnp.isfinite(y_flat))
            & all_finite(args)
            & (True if opts.tstops is None else jnp.all(jnp.isfinite(opts.tstops))),
            Status.NONFINITE_INPUT,
        ),
        (
            jnp.all(
                jnp.isfinite(rtol)
                & jnp.isfinite(atol)
                & (rtol >= 0)
                & (atol >= 0)
                & ((rtol > 0) | (atol > 0))
            ),
            Status.BAD_TOLERANCE,
        ),
        (jnp.all(jnp.isfinite(f0)), Status.NONFINITE_RHS),
        (jnp.isfinite(dt0_value) & (dt0_value != 0), Status.BAD_DT0),
    ]
    status = jnp.asarray(Status.SUCCESS, jnp.int32)
    for passed, code in reversed(checks):
        if passed is not True:  # a check decided at trace time costs nothing when it passes
            status = select(passed, status, jnp.asarray(code, jnp.int32))

    nfev0 = 1
    if dt0 is not None:
        h0 = jnp.abs(dt0_value)
    else:
        h0, extra = initial_step(rhs, t0, y_flat, f0, solver.order, rtol, atol, controller.norm)
        h0, nfev0 = h0.astype(tdtype), nfev0 + extra
    if not fixed and controller.dtmax is not None:
        h0 = jnp.minimum(h0, controller.dtmax)

    # Status and every counter live in one int32 vector (status first): one fused
    # update per step.
    counters = jnp.stack([status, i32(0), i32(0), i32(0), i32(nfev0)] + [i32(0)] * len(solver.stat_names))
    eps = jnp.finfo(tdtype).eps
    # A step is too small when it no longer changes t: below a few ulps of |t|
    # (the test of SUNDIALS and scipy). Near t = 0 the floor is a few of the
    # smallest normal numbers, whatever the span: the solution may need tiny
    # steps near 0 on a span of 1e30.
    tiny_floor = 8 * jnp.finfo(tdtype).tiny
    land_tol = 16 * eps
    order = solver.error_order

    def land(t, h, stop):
        """The step from t: h, or all of the rest up to stop when h would leave only a rounding-error remainder."""
        # h is read once (by the minimum): XLA then fuses even a costly h, such
        # as the controller's proposal, into the kernel that reads the step.
        rest = stop - t
        h = jnp.minimum(h, rest)
        return select(h >= rest - land_tol * jnp.maximum(jnp.abs(t), jnp.abs(stop)), rest, h)

    # The scalar loop state travels as one vector: one kernel per step writes
    # it, where separate scalars cost one kernel each. Its entries: t, the next
    # step h, then (saving outside the step loop) the last attempted step's
    # start p_t, size p_h and 1 / p_h, then the controller's memory.
    memory0 = controller.init(dtype)
    memory_def = jtu.tree_structure(memory0)
    memory_dtypes = [x.dtype for x in jtu.tree_leaves(memory0)]
    # Outside vmap the steps run in an inner loop that never touches the save
    # buffer (see "The loop" in docs/design.md); under vmap one loop takes the
    # steps and saves after each, so that members are not held to each other's
    # save times.
    by_steps = bool(opts.batched) or bool(
        vmap_size(y_flat, ts_t, args, f0, [x for x in jtu.tree_leaves(opts) if isinstance(x, jax.Array)])
    )
    n_last = 0 if by_steps else 3  # p_t, p_h, 1 / p_h

    def pack(t, h, memory, last=()) -> Array:
        entries = [t, h, *last]
        if last:
            entries.append(1 / select(last[1] == 0, 1, last[1]))
        return jnp.stack([jnp.asarray(x, tdtype) for x in entries + jtu.tree_leaves(memory)])

    def unpack(v: Array):
        t, h, *rest = _unstack(v)
        last, memory = rest[:n_last], rest[n_last:]
        memory = [m.astype(d) for m, d in zip(memory, memory_dtypes)]
        return _Scalars(t, h, jtu.tree_unflatten(memory_def, memory)), last

    def y_state(c):
        return (c["y"][0], c["y"][1]) if stacked else (c["y"], c["state"])

    # Known discontinuities (tstops): sorted in internal time, those outside (t0, t_end)
    # dropped (as +inf), one +inf after the last. `j` in the carry indexes the next one.
    # A stop time is one more (the last): the replay (direct.tstop_times) sees the same.
    s_stops = landing_times(opts, direction, t0, t_end, tdtype)
    has_stops = s_stops is not None

    def next_stop(j):
        return lax.dynamic_index_in_dim(s_stops, j, keepdims=False, allow_negative_indices=False)

    def end_of_run(j):
        """Where the steps from the current point must land: the next tstop or t_end."""
        return jnp.minimum(t_last, next_stop(j)) if has_stops else t_last

    has_events = opts.events is not None
    if has_events:
        user_t = lambda t: direction * t  # noqa: E731

        def conds(t, y):
            return jnp.stack(
                [jnp.asarray(cond(user_t(t), y, args), dtype).reshape(()) for cond, _ in opts.events]
            )

    h_start = h0 if fixed else land(t0, h0, end_of_run(0))
    carry = dict(
        # Adaptive steps land on t_end: each step is landed as soon as it is
        # proposed, in the kernel that packs the scalars (landing it at the start
        # of a step would be a kernel of its own). Fixed steps land on the save
        # times, which change between save points: they are landed at the start.
        # p_h = 0: no step yet (the save at ts[0] is y0 itself).
        scalars=pack(t0, h_start, memory0, () if by_steps else (t0, jnp.zeros((), tdtype))),
        counters=counters,
        **(dict(y=pair0) if stacked else dict(y=y_flat, state=state0)),
    )
    if has_stops:
        carry["j"] = i32(0)
    if has_events:
        # The conditions at the current point, the event that fired (-1: none) and the
        # step it fired in (start, size, end points, interpolation data, conditions at
        # its start): the root is located after the loop, once.
        c0 = conds(t0, y_flat)
        if opts.event_quiet is not None:
            c0 = jnp.where(jnp.arange(c0.shape[0]) == opts.event_quiet, 0, c0)
        carry.update(
            ev_c=c0,
            event=i32(-1),
            ev_step=(t0, jnp.zeros((), tdtype), y_flat, y_flat, solver.dense_zeros(y_flat), c0),
        )
    if opts.regularise:
        if not stacked or fixed:
            raise ValueError("regularise=True needs an adaptive explicit Runge-Kutta solver (such as Tsit5)")
        carry["reg"] = jnp.zeros((2,), dtype)
    if dense:
        carry["pieces"] = DenseOutput(
            # Row 0 starts as a zero-length piece at t0, so that evaluate works
            # even when no step is taken; the first accepted step overwrites it.
            t_start=jnp.full((max_steps + 1,), jnp.inf, tdtype).at[0].set(t0),
            h=jnp.zeros((max_steps + 1,), tdtype),
            y0=jnp.zeros((max_steps + 1,) + y_flat.shape, dtype).at[0].set(y_flat),
            y1=jnp.zeros((max_steps + 1,) + y_flat.shape, dtype).at[0].set(y_flat),
            data=jnp.zeros((max_steps + 1,) + dense_spec.shape, dtype),
            num_pieces=i32(0),
            interpolate=solver.interpolate,
        )

    def target_of(i):
        # ts[i] is read where it is used: XLA fuses the read into each reader,
        # where a read of its own would be a kernel. (Clamped: i may be n_ts.)
        return lax.dynamic_index_in_dim(s_ts, i, keepdims=False, allow_negative_indices=False)

    def going(c, t):
        n = c["counters"]
        if s_stop is not None:
            t = jnp.minimum(t, t_last)
        ok = (n[0] == Status.SUCCESS) & (n[1] < max_steps) & (unpack(c["scalars"])[0].t < t)
        if has_events:
            ok = ok & (c["event"] < 0)
        return ok if opts.stop_after is None else ok & (n[2] <= opts.stop_after)

    def attempt(c, active):
        """One attempted step from the carry ``c``: the carry after it (but the save
        index and buffer), and what saving needs: ``(accept, t, h, y, y1, dense, t_new)``.

        ``active`` is ``True`` (a Python bool) in the step loop outside vmap;
        under vmap it is False for a member that is done, and the attempt is then
        a rejected step that changes nothing.
        """
        s, _ = unpack(c["scalars"])
        t, memory = s.t, s.memory
        y, state = y_state(c)
        stop = target_of(c["i"]) if fixed else t_last
        if fixed and s_stop is not None:
            stop = select(s_stop < stop, s_stop, stop)
        if has_stops:
            nxt = next_stop(c["j"])
            stop = select(
                nxt < stop, nxt, stop
            )  # a save time equal to a tstop stays the stop (its derivative)
        h_try = land(t, s.h, stop) if fixed else s.h
        res = solver.step(
            left_of(rhs, next_stop(c["j"])) if has_stops else rhs, t, y, h_try.astype(dtype), state, tol
        )
        ok = jnp.asarray(res.ok, bool)
        if fixed:
            finite = jnp.all(jnp.isfinite(res.y1)) & ok
            accept, h_prop = finite, s.h
        else:
            err = controller.error_ratio(y, res.y1, res.y_error, rtol, atol)
            # error_ratio is already inf when y1 or the estimate is not finite.
            err = select(ok, err, jnp.inf)
            finite = jnp.isfinite(err)
            accept, h_prop, memory = controller.adapt(h_try, err, order, memory)
        if active is not True:
            accept = accept & active
        # The step landed on stop exactly when h_try == stop - t (else h_try < stop - t).
        t_new = select(accept, select(h_try == stop - t, stop, t + h_try), t)
        j_new = None
        if has_stops:
            # Landed on a tstop: the next step starts afresh (solver state and
            # controller memory), and the one after lands on the following tstop.
            on_stop = accept & (t_new == next_stop(c["j"]))
            j_new = c["j"] + on_stop.astype(jnp.int32)
            memory = tree_select(on_stop, controller.init(dtype), memory)
        h_next = h_prop if fixed else land(t_new, h_prop, t_last if j_new is None else end_of_run(j_new))
        scalars = pack(t_new, h_next, memory, () if by_steps else (t, h_try))
        if active is not True:
            scalars = select(active, scalars, c["scalars"])
        # The status reads the next step back from the vector: using the value
        # itself a second time would make it a kernel of its own. (The barrier
        # keeps XLA from folding the read back into that value.)
        s_new, _ = unpack(lax.optimization_barrier(scalars))

        status = c["counters"][0]
        if fixed:
            newton = ~ok & jnp.all(jnp.isfinite(res.y1))
            status = select(finite, status, select(newton, Status.NEWTON_FAILED, Status.NONFINITE_RHS))
        else:
            # After a rejection the next step is the shrunk proposal, or the rest
            # of the span when that is shorter; the rest is never tiny (a step
            # that would leave a tiny rest is landed on t_end instead).
            too_small = ~accept & (s_new.h <= jnp.maximum(tiny_floor, 8 * eps * jnp.abs(t)))
            # Non-finite values are blamed first (an implicit solver fails its
            # Newton iteration on them too), then Newton, then plain underflow.
            why = select(finite, Status.DT_UNDERFLOW, Status.NONFINITE_RHS)  # finite implies ok
            if res.ok is not True:
                why = select(~ok & jnp.all(jnp.isfinite(res.y1)), Status.NEWTON_FAILED, why)
            status = select(too_small, why, status)
            if controller.dtmin is not None:
                at_min = ~accept & (h_try <= controller.dtmin)
                status = select(at_min & (status == Status.SUCCESS), Status.DT_MIN_REACHED, status)
        out_of_steps = (c["counters"][1] + 1 >= max_steps) & (s_new.t < t_last) & (status == Status.SUCCESS)
        status = select(out_of_steps, Status.MAX_STEPS_REACHED, status)
        restart_fevals = 0
        if has_stops:
            nfev = []

            def fresh():
                # f just after the tstop: the piece that starts there, whichever side
                # of it the user's f assigns the tstop itself to.
                after = next_float(t_new, jnp.inf)
                state, k = solver.restart(rhs, after, res.y1, res.state)
                nfev.append(k)
                return state

            res = res._replace(state=lax.cond(on_stop, fresh, lambda: res.state))
            restart_fevals = on_stop.astype(jnp.int32) * nfev[0]
        increments = jnp.stack(
            [
                i32(0),
                i32(1),
                accept.astype(jnp.int32),
                (~accept).astype(jnp.int32),
                i32(res.num_fevals) + restart_fevals,
            ]
            + [i32(res.counts[k]) for k in solver.stat_names]
        )
        if active is not True:
            status = select(active, status, c["counters"][0])
            increments = active.astype(jnp.int32) * increments

        if stacked:
            new = dict(y=select(accept, jnp.stack([res.y1, res.state]), jnp.stack([y, res.rejected_state])))
        else:
            new = dict(y=select(accept, res.y1, y), state=tree_select(accept, res.state, res.rejected_state))
        new.update(
            scalars=scalars, counters=c["counters"].at[0].set(jnp.asarray(status, jnp.int32)) + increments
        )
        if has_stops:
            new["j"] = j_new if active is True else select(active, j_new, c["j"])
        if has_events:
            new.update(_detect(opts.events, conds, solver, c, accept, t, h_try, y, res, dtype))
        if opts.progress:
            span = (t0, t_end) if opts.progress is True else opts.progress
            jax.debug.callback(show_progress, slowest(s_new.t), *span, direction)
        if opts.regularise:
            reg = step_regularisers(y, res.y1, res.y_error, state, res.state, h_try, rtol, atol)
            new["reg"] = c["reg"] + select(accept, reg, jnp.zeros_like(reg))
        if dense:
            p = c["pieces"]
            row = select(accept, c["counters"][2], max_steps)
            put = lambda buf, v: lax.dynamic_update_index_in_dim(buf, v, row, 0)  # noqa: E731
            new["pieces"] = DenseOutput(
                t_start=put(p.t_start, select(accept, t, jnp.inf)),
                h=put(p.h, h_try),
                y0=put(p.y0, y),
                y1=put(p.y1, res.y1),
                data=put(p.data, res.dense),
                num_pieces=c["counters"][2] + accept.astype(jnp.int32),
                interpolate=p.interpolate,
            )
        return new, (accept, t, h_try, y, res.y1, res.dense, t_new)

    def keep(target, y):
        """What the save at internal time ``target`` keeps of the state ``y``."""
        return y if opts.save_fn is None else opts.save_fn(direction * target, y, args)

    def unreached(target):
        """A save the steps did not reach: NaN (a failure), or 0 beyond the stop time."""
        if s_stop is None:
            return jnp.asarray(jnp.nan, dtype)
        return jnp.where(target > t_last, 0, jnp.nan).astype(dtype)

    def at_step_end(target, t1, y1, interp_at):
        """The save at ``target`` when a step ends there: ``y1``. When that end is a tstop
        (the step's size did not depend on ``target``), its derivative with respect to
        ``target`` is the step's interpolant's, as for any other save."""
        if not has_stops:
            return y1
        along = interp_at(target) - lax.stop_gradient(interp_at(target))
        return y1 + select(jnp.any(s_stops == t1), along, jnp.zeros_like(along))

    # Both loops start at ts[0], whose save is y0 itself.
    if by_steps:
        out, ys = _save_after_each_step(
            carry,
            y_flat,
            n_ts,
            dtype,
            interpolating,
            solver,
            target_of,
            going,
            t_end,
            attempt,
            at_step_end,
            jax.vmap(unreached)(s_ts),
            keep,
        )
    else:
        out, ys = _steps_between_saves(
            carry,
            y_flat,
            n_ts,
            dtype,
            interpolating,
            solver,
            target_of,
            going,
            unpack,
            y_state,
            attempt,
            at_step_end,
            unreached,
            keep,
        )
    pieces = None
    if dense:
        p = out["pieces"]
        pieces = DenseOutput(
            p.t_start[:-1], p.h[:-1], p.y0[:-1], p.y1[:-1], p.data[:-1], p.num_pieces, p.interpolate
        )
    outs = (ys, out["counters"], pieces)
    if opts.return_state:
        outs += (y_state(out)[1],)
    if opts.regularise:
        outs += (out["reg"],)
    if has_events:
        t_event, index = _locate(opts.events, conds, solver, out["event"], out["ev_step"], dtype)
        outs += (direction * t_event, index)
    return outs


def _steps_between_saves(
    carry,
    y0,
    n_ts,
    dtype,
    interpolating,
    solver,
    target_of,
    going,
    unpack,
    y_state,
    attempt,
    at_step_end,
    unreached,
    keep,
):
    """The loop outside vmap: an outer loop over the save times, and an inner one that
    takes steps until the last accepted step covers the next save time.

    The inner loop carries no save buffer: XLA's CPU runtime runs a loop body
    sequentially, without thread-pool overhead per kernel, only while its
    buffers are small, and that decides speed on small problems. It carries the
    last step's start and interpolation data instead (``p_y``, ``p_dense``).
    Returns the final carry and the saves.
    """
    carry = dict(carry, i=jnp.asarray(0, jnp.int32))
    if interpolating:
        # Replaced by the first accepted step before any interpolation reads it.
        carry.update(p_dense=finite_filler(jax.eval_shape(solver.dense_zeros, y0)), p_y=carry["y"])

    def step_body(c):
        new, (accept, t, h, y, y1, dense, t_new) = attempt(c, True)
        new["i"] = c["i"]
        if interpolating:
            # p_y is the whole pair when y travels with the FSAL derivative:
            # copying it is free, where slicing out y would be a kernel.
            new.update(p_y=c["y"], p_dense=dense)
        return new

    def save_body(oc):
        i, ys, c = oc
        target = target_of(i)
        c = lax.while_loop(lambda c: going(c, target), step_body, dict(c, i=i))
        s, (p_t, p_h, p_h_inv) = unpack(c["scalars"])
        val = y = y_state(c)[0]
        if interpolating:
            theta = ((target - p_t) * p_h_inv).astype(dtype)
            p_y = y_state(dict(c, y=c["p_y"]))[0]
            val = solver.interpolate(p_h.astype(dtype), p_y, y, c["p_dense"], theta)
            sg = lax.stop_gradient
            frozen = lambda tg: solver.interpolate(  # noqa: E731
                sg(p_h).astype(dtype),
                sg(p_y),
                sg(y),
                sg(c["p_dense"]),
                ((tg - sg(p_t)) * sg(p_h_inv)).astype(dtype),
            )
            val = select(target == s.t, at_step_end(target, s.t, y, frozen), val)
        val = keep(target, val)
        val = select(s.t >= target, val, unreached(target))  # not reached after a failure
        return i + 1, lax.dynamic_update_index_in_dim(ys, val, i, 0, allow_negative_indices=False), c

    # The buffer's initial value is never read (the first save is y0), so it can
    # be a literal placeholder (writing y0 into zeros would be a kernel to compile).
    ys0 = finite_filler(jax.ShapeDtypeStruct((n_ts,) + jax.eval_shape(keep, target_of(0), y0).shape, dtype))
    _, ys, out = lax.while_loop(lambda oc: oc[0] < n_ts, save_body, (jnp.asarray(0, jnp.int32), ys0, carry))
    return out, ys


def _save_after_each_step(
    carry,
    y0,
    n_ts,
    dtype,
    interpolating,
    solver,
    target_of,
    going,
    t_end,
    attempt,
    at_step_end,
    unreached,
    keep,
):
    """The loop under vmap: one loop over steps; after each accepted step an inner loop
    saves every save time the step covers, from the step's interpolant.

    The loop runs until the last member is done (:func:`any_member`): a finished
    member's iterations are rejected steps that change nothing. The save buffer
    has one extra row, where the writes of a member whose step covers no save
    time go, so that no iteration selects between two copies of a buffer (nor of
    the dense output or a sensitivity method's step record). Returns the final
    carry and the saves.
    """
    first = keep(target_of(0), y0)
    nan_ys = jnp.broadcast_to(
        jnp.concatenate([unreached, jnp.full((1,), jnp.nan, dtype)])[:, None], (n_ts + 1,) + first.shape
    )
    carry = dict(carry, i=jnp.asarray(1, jnp.int32), ys=lax.dynamic_update_index_in_dim(nan_ys, first, 0, 0))

    def save(i, ys, accept, t, h, y, y1, dense_data, t_new):
        def due(i):
            return accept & (i < n_ts) & (target_of(i) <= t_new)

        def write(i, ys, val):
            do = due(i)
            return i + do.astype(jnp.int32), lax.dynamic_update_index_in_dim(ys, val, select(do, i, n_ts), 0)

        if not interpolating:
            # Every save time is a step end, and a step ends on at most one.
            return write(i, ys, keep(target_of(i), y1))
        h_inv = 1 / select(h == 0, 1, h)

        def body(iy):
            i, ys = iy
            target = target_of(i)
            val = solver.interpolate(h.astype(dtype), y, y1, dense_data, ((target - t) * h_inv).astype(dtype))
            sg = lax.stop_gradient
            frozen = lambda tg: solver.interpolate(  # noqa: E731
                sg(h).astype(dtype), sg(y), sg(y1), sg(dense_data), ((tg - sg(t)) * sg(h_inv)).astype(dtype)
            )
            return write(
                i, ys, keep(target, select(target == t_new, at_step_end(target, t_new, y1, frozen), val))
            )

        return lax.while_loop(lambda iy: any_member(due(iy[0])), body, (i, ys))

    def step_body(c):
        new, (accept, t, h, y, y1, dense, t_new) = attempt(c, going(c, t_end))
        new["i"], new["ys"] = save(c["i"], c["ys"], accept, t, h, y, y1, dense, t_new)
        return new

    out = lax.while_loop(lambda c: any_member(going(c, t_end)), step_body, carry)
    return out, out["ys"][:n_ts]


def _crossed(before: Array, after: Array, direction: int) -> Array:
    """Whether a function went from ``before`` to ``after`` through zero in ``direction``
    (+1 rising, -1 falling, 0 either), as integration proceeds."""
    rising = (before < 0) & (after >= 0)
    falling = (before > 0) & (after <= 0)
    return rising if direction > 0 else falling if direction < 0 else rising | falling


#: Bisection steps that locate an event within a step: 2**-64 of the step, below the
#: rounding of its time in any floating-point type.
EVENT_BISECTIONS = 64


def _detect(events, conds, solver, c, accept, t, h, y, res, dtype) -> dict:
    """The event entries of the carry after an attempted step from ``(t, y)`` of size ``h``:
    an event fires when its condition crosses zero (in its direction) between the step's
    ends; the step it fired in is kept for :func:`_locate` (the lowest index if several
    fired in one step: :func:`_locate` then takes the earliest root among them)."""
    after = conds(t + h, res.y1)
    fired = jnp.stack([accept & _crossed(c["ev_c"][e], after[e], d) for e, (_, d) in enumerate(events)])
    new_event = jnp.any(fired) & (c["event"] < 0)
    step = (t, h, y, res.y1, res.dense, c["ev_c"])
    return dict(
        ev_c=select(accept, after, c["ev_c"]),
        event=select(new_event, jnp.argmax(fired).astype(jnp.int32), c["event"]),
        ev_step=jtu.tree_map(lambda new, old: select(new_event, new, old), step, c["ev_step"]),
    )


def _locate(events, conds, solver, event, step, dtype) -> tuple[Array, Array]:
    """``(time, index)`` of the first root in the step where an event fired (internal time;
    ``(+inf, -1)`` if none): bisection on ``theta`` in ``[0, 1]`` along the step's
    interpolant, for every event that crossed in that step, the earliest root winning."""
    t, h, y, y1, dense, before = step
    after = conds(t + h, y1)

    def root(e):
        def g(theta):
            return conds(
                t + theta * h, solver.interpolate(h.astype(dtype), y, y1, dense, theta.astype(dtype))
            )[e]

        def body(_, lohi):
            lo, hi = lohi
            mid = (lo + hi) / 2
            crossed = _crossed(before[e], g(mid), events[e][1])
            return select(crossed, lo, mid), select(crossed, mid, hi)

        zero, one = jnp.zeros((), t.dtype), jnp.ones((), t.dtype)
        _, hi = lax.fori_loop(0, EVENT_BISECTIONS, body, (zero, one))
        crossed = _crossed(before[e], after[e], events[e][1])
        return select(crossed, t + hi * h, jnp.asarray(jnp.inf, t.dtype))

    roots = jnp.stack([root(e) for e in range(len(events))])
    first = jnp.argmin(roots).astype(jnp.int32)
    return select(event >= 0, roots[first], jnp.asarray(jnp.inf, t.dtype)), select(event >= 0, first, event)
