"""Direct (discretise-then-optimise) reverse-mode differentiation of the solve loop.

The gradient is the exact derivative of the *discrete* solution: the accepted
steps' sequence ``y_{k+1} = Phi(t_k, y_k, h_k, args)`` followed by the solver's
interpolant at the save times, with the step sizes chosen by the controller held
constant (as the loop's ``stop_gradient`` does). This is reverse accumulation of
the computational graph of the integrator (Griewank and Walther, "Evaluating
Derivatives", 2nd ed., SIAM 2008, ch. 3-4; for Runge-Kutta methods the
resulting discrete adjoint is the one analysed by Hager, "Runge-Kutta methods in
optimal control and the transformed adjoint system", Numer. Math. 87, 2000).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax import lax

from .._integrate import internal_rhs, landing_times, last_time, left_of, next_float, time_direction
from .._regularisers import step_regularisers
from .._solution import DenseOutput, Status
from .._util import float0_zeros, select, vmap_size
from ..solvers.base import Tolerances
from ..solvers.explicit_rk import ExplicitRK
from ..solvers.radau import Radau5
from ..solvers.rosenbrock import Rosenbrock
from ..solvers.sdirk import SDIRK
from ._base import (
    AbstractSensitivity,
    ProblemOp,
    combine,
    custom_solve_jvp,
    failure_scale,
    keep_present,
    loop_tangent,
    nan_if,
    prob_times,
    split_problem,
)
from ._linear_map import linear_map

# ----------------------------------------------------------------------------
# Recording the accepted steps: a solver wrapper whose state carries the record.
# Every attempt writes its start (t, y, h) into row `count` (the number of steps
# accepted so far), so a rejected attempt is overwritten by the next one. The
# accepted and rejected states then share the same buffers, and the loop's
# select between them folds away (XLA simplifies select(p, x, x) to x).
# ----------------------------------------------------------------------------


class _Recorder:
    """Wraps a solver for :func:`integrate`; records every accepted step's ``t`` and ``h``
    and the state ``y`` at every ``stride``-th accepted step (rows ``0, 1, ...``); with
    ``window > 0`` also every state of the last ``window`` steps, step ``k`` in row
    ``k % (window + 1)`` of a second buffer (the spare row takes a finished vmapped
    member's writes). With ``first_stages`` (explicit Runge-Kutta) a state's row also
    holds the step's first stage ``f(t_k, y_k)``, the solver state it starts from:
    ``(2, n)`` rows, the state first (in both buffers).

    With ``t_last`` (internal time; adaptive steps that land on it and nowhere else,
    :func:`_steps_from_times`) every step is taken with the size ``t_{k+1} - t_k`` of the
    times the loop gives it (``t_last`` when it lands, else ``t_k + h``, the loop's own
    expressions; the two sizes differ by a rounding at most), so that the recorded
    times are the whole record of the step sizes: no size is kept."""

    def __init__(
        self,
        solver,
        max_steps: int,
        stride: int,
        rows: int,
        tdtype,
        ring: bool = False,
        window: int = 0,
        first_stages: bool = False,
        t_last=None,
    ):
        self.solver, self.max_steps, self.stride, self.rows, self.tdtype = (
            solver,
            max_steps,
            stride,
            rows,
            tdtype,
        )
        self.ring = ring  # step k in row k % rows (stride 1): the last `rows` steps
        self.window = window
        self.first_stages = first_stages
        self.t_last = t_last
        self.stat_names = solver.stat_names

    def __getattr__(self, name):  # order, error_order, embedded, ...
        return getattr(self.solver, name)

    def dense_zeros(self, y0):
        return self.solver.dense_zeros(y0)

    def restart(self, f, t0, y0, state):
        inner, nfev = self.solver.restart(f, t0, y0, state[0])
        return (inner,) + tuple(state[1:]), nfev

    def interpolate(self, h, y0, y1, dense, theta):
        return self.solver.interpolate(h, y0, y1, dense, theta)

    def init(self, f, t0, y0, f0):
        # One time row more than max_steps: a finished member of a vmapped batch
        # keeps writing its rejected attempts at row num_accepted (a ring has
        # rows to spare for it). Row 0 starts as a step of size 0 from (t0, y0):
        # a batched replay reads it, with a zero cotangent, for members with no
        # steps left.
        time_rows = self.rows if self.ring else self.max_steps + 1
        y_rows = self.rows if self.ring else self.rows + 1  # last row: discarded writes
        row0 = jnp.stack([y0, f0]) if self.first_stages else y0
        y_buf = jnp.zeros((y_rows,) + row0.shape, y0.dtype).at[0].set(row0)
        if self.window:
            y_buf = (y_buf, jnp.zeros((self.window + 1,) + row0.shape, y0.dtype))
        return (
            self.solver.init(f, t0, y0, f0),
            jnp.zeros((), jnp.int32),
            jnp.zeros((time_rows,), self.tdtype).at[0].set(t0),
            jnp.zeros((0 if self.t_last is not None else time_rows,), self.tdtype),
            y_buf,
        )

    def step(self, f, t0, y0, h, state, tol):
        inner, count, t_buf, h_buf, y_buf = state
        if self.t_last is not None:
            h = select(h == self.t_last - t0, self.t_last, t0 + h) - t0
        res = self.solver.step(f, t0, y0, h, inner, tol)
        put = lambda buf, v, i: lax.dynamic_update_index_in_dim(buf, v.astype(buf.dtype), i, 0)
        at = count % self.rows if self.ring else count
        t_buf = put(t_buf, t0, at)
        if self.t_last is None:
            h_buf = put(h_buf, h, at)
        if self.stride == 1:
            row = at
        else:
            row = select(count % self.stride == 0, count // self.stride, self.rows)
        y_row = jnp.stack([y0, inner]) if self.first_stages else y0
        if self.window:
            y_buf = (put(y_buf[0], y_row, row), put(y_buf[1], y_row, count % (self.window + 1)))
        else:
            y_buf = put(y_buf, y_row, row)
        accepted = (res.state, count + 1, t_buf, h_buf, y_buf)
        rejected = (res.rejected_state, count, t_buf, h_buf, y_buf)
        return res._replace(state=accepted, rejected_state=rejected)


def _memoryless(solver) -> bool:
    """Whether one step is a function of ``(t, y, h)`` alone that ``jax.vjp`` can differentiate:
    the state ``init`` builds from ``f(t, y)`` is what the loop carries (up to what only steers a
    Newton iteration: its Jacobian and starting values), and no Newton ``while_loop`` is
    differentiated (``Radau5`` differentiates its stages by the implicit function theorem)."""
    return isinstance(solver, (ExplicitRK, Rosenbrock, Radau5, SDIRK))


def _keeps_first_stages(opts) -> bool:
    """Whether a batched record keeps each step's first stage ``f(t_k, y_k)`` next to its
    state (:class:`_Recorder`): for explicit Runge-Kutta solves without tstops, where it is
    the previous step's last stage, so that the replayed step takes it as an input instead
    of evaluating ``f`` again (:func:`replay_batched`)."""
    return isinstance(opts.solver, ExplicitRK) and opts.tstops is None and opts.t_stop is None


def _row_bytes(n: int, dtype, time_bytes: int, first_stages: bool) -> int:
    """Bytes of one row of a batched record: the state (and first stage), two times."""
    return (2 if first_stages else 1) * n * jnp.dtype(dtype).itemsize + 2 * time_bytes


def _ring_bytes(ring: int, n: int, dtype, first_stages: bool) -> int:
    """Bytes of one member's ring of ``ring`` rows, as ``memory_budget`` counts them (8-byte times)."""
    return ring * _row_bytes(n, dtype, 8, first_stages)


#: The default ``memory_budget`` of the reverse-mode methods (bytes): 1 GiB.
DEFAULT_MEMORY_BUDGET = 2**30

#: Accepted steps whose every state a budgeted reverse pass keeps (when they fit).
#: A larger ``max_steps`` gets a window of this many last steps plus a checkpoint
#: per window instead, so its memory does not grow with ``max_steps``.
RECORD_STEPS = 4096


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def check_budget(name: str, budget) -> None:
    """Raise unless ``budget`` is ``None`` or a positive number of bytes."""
    if budget is not None and not _positive_int(budget):
        raise ValueError(f"{name}: memory_budget must be None or a positive integer (bytes), got {budget!r}")


class Direct(AbstractSensitivity):
    """Differentiation through the discrete solution ("discretise then optimise").

    The derivative is exact for the computed solution: forward mode (``jax.jvp``,
    ``jax.jacfwd``, ``jax.linearize``) differentiates the solve loop itself, and
    reverse mode (``jax.grad``, ``jax.vjp``) replays the accepted steps backwards,
    each step map ``y_{k+1} = Phi(t_k, y_k, h_k, args)`` differentiated by
    ``jax.vjp`` (its first stage ``f(t_k, y_k)`` included), and every saved state is
    the solver's interpolant on the step that covers its save time (so ``ts`` are
    differentiated through ``theta = (t - t_k)/h_k``, through the step that lands on
    ``ts[-1]`` and through ``t_k = ts[0] + sum h``). The step sizes chosen by the
    controller are constants of the scheme (they do not depend on the inputs); only
    a step that lands on a save time depends on it. Forward and reverse mode agree
    to rounding error; both approximate (to the order of the solver's error) the
    derivative of the exact ODE solution.

    The forward solve of a gradient records the accepted steps' times and sizes
    and the states (all of them, or checkpoints); the reverse pass runs back
    through that record without solving forward again (:meth:`record`).

    Args:
        checkpoints: how many states the reverse pass stores.

            * ``None`` (default): as many as ``memory_budget`` allows (see
              :func:`plan`): the state at every accepted step (memory
              ``max_steps * n``) when that fits and ``max_steps`` is at most
              ``RECORD_STEPS`` (4096); for a larger ``max_steps``, the states of
              the last 4096 steps and one checkpoint per 4096 steps, so that
              memory does not grow with ``max_steps``; else evenly spaced checkpoints
              with one recomputed segment (below, with ``k = ceil(sqrt(max_steps))``);
              else checkpoints with each segment run back by recursive bisection;
              else recursive bisection with as many stored states as fit.
            * An integer ``k``: every ``L = ceil(max_steps / k)``-th accepted step
              (evenly spaced in the step index); each segment of ``L`` steps is
              recomputed before running back through it: memory ``(k + L) * n``
              states, smallest near ``k = sqrt(max_steps)``, at the cost of one
              more forward step per step. A ``k`` whose record exceeds
              ``memory_budget`` raises ``ValueError`` at trace time.
            * ``"recursive"``: recursive bisection (the simplest member of the
              family of Griewank's binomial checkpointing; Griewank and Walther,
              "Evaluating Derivatives", 2nd ed., ch. 12): to run back through
              steps ``[lo, hi)`` from the state at ``lo``, recompute the state at
              the midpoint, run back through the upper half, then through the
              lower half. At most ``ceil(log2(max_steps)) + 1`` states are stored
              (:func:`stored_states`), for about ``log2(N) / 2`` recomputed forward
              steps per step. When ``memory_budget`` holds fewer, the bisection
              stops at the depth that fits and recomputes the last step of a
              segment from its start (quadratic in the segment's length).

            Step times and sizes (two scalars per step) are always stored, so the
            recomputed steps repeat the forward pass's exactly.

            Under ``jax.vmap`` (``grad`` of a loss over a batch of solves) the
            reverse pass takes the batch explicitly instead (:func:`replay_batched`):
            one VJP for all members' step ``k``, shared parameters' cotangents
            summed inside it, and a window of each member's last steps in place of
            this layout.
        memory_budget: bytes the reverse pass may keep for its record of the
            accepted steps (step times and sizes, stored and recomputed states;
            per solve: under ``vmap`` per batch member). Default
            ``DEFAULT_MEMORY_BUDGET`` (1 GiB); ``None``: no limit. A budget that
            cannot hold the step times and sizes plus three states raises
            ``ValueError`` at trace time.

    Supported solvers: every built-in one. Explicit Runge-Kutta and Rosenbrock
    steps are differentiated as they are; for ``Radau5`` and the SDIRK family the
    Newton-solved stages are differentiated by the implicit function theorem
    (``lax.custom_root``), the exact derivative at the computed stages. Other
    solvers raise ``NotImplementedError`` at trace time.
    """

    checkpoints: int | str | None = eqx.field(static=True, default=None)
    memory_budget: int | None = eqx.field(static=True, default=DEFAULT_MEMORY_BUDGET)

    def __check_init__(self):
        c = self.checkpoints
        if c is not None and c != "recursive" and not _positive_int(c):
            raise ValueError(
                f"Direct: checkpoints must be None, a positive integer or 'recursive', got {c!r}"
            )
        check_budget("Direct", self.memory_budget)

    def check(self, prob):
        if not _memoryless(prob.opts.solver):
            raise NotImplementedError(
                f"Direct: reverse-mode differentiation is not implemented for "
                f"{type(prob.opts.solver).__name__}: it can replay explicit Runge-Kutta, Rosenbrock, "
                "Radau5 and SDIRK steps only. Use ForwardSensitivity or an adjoint method."
            )

    def tangent(self, loop, prob, r, x):
        return loop_tangent(loop, prob, r, x)

    def record(self, loop, prob, y0, ts, params):
        """The forward solve with its record in the layout the reverse pass reads:
        :func:`plan`'s for one solve, or under ``jax.vmap`` the window of each
        member's last steps that :func:`replay_batched` reads."""
        opts = prob.opts
        size = opts.batched or vmap_size(y0, ts, params)
        ts_ = prob_times(prob, ts)
        stages = bool(size) and _keeps_first_stages(opts)
        if size:
            layout = batched_layout(opts, size, y0.shape[-1], y0.dtype, jnp.result_type(ts_), stages)
            if not _within(self.memory_budget, layout, opts.max_steps, y0.shape[-1], y0.dtype, stages):
                return None
            meta = ("batched", layout, stages)
        else:
            layout = record_layout("Direct", self.checkpoints, self.memory_budget, y0, ts_, opts)
            meta = ("full", layout)
        ring = bool(size) and not layout.step_times
        ys, counters, bufs = record(
            layout, loop, prob.f, y0, ts_, prob.args(params), opts, ring=ring, first_stages=stages
        )
        return ys, counters, meta, (counters, bufs)

    def cotangent(self, loop, prob, r, ys_bar, x_struct, cache=None):
        y0, ts, params, _ = r
        out = _replay(self, loop, prob, y0, ts, params, ys_bar, cache=cache, times=x_struct[1] is not None)
        return keep_present(x_struct, out)

    def cotangent_batched(self, loop, prob_static, r, ys_bar, x_struct, r_axes, x_axes, size, cache=None):
        return replay_batched(self, loop, prob_static, r, ys_bar, x_struct, r_axes, x_axes, size, cache=cache)


def stored_states(method: Direct, max_steps: int, state_bytes: int = 8, time_bytes: int = 8) -> int:
    """How many states the reverse pass of ``method`` stores at most, for ``max_steps``
    steps of a state of ``state_bytes`` bytes (and times of ``time_bytes``)."""
    return plan(
        "Direct", method.checkpoints, method.memory_budget, max_steps, state_bytes, time_bytes
    ).states()


def _stack_depth(steps: int) -> int:
    """Pending segments of the recursive bisection: one per level, plus the one being split."""
    return max(1, math.ceil(math.log2(max(steps, 1)))) + 1


class Layout(NamedTuple):
    """Which states of the accepted steps the reverse pass stores, and how it gets the others.

    The state at every ``stride``-th accepted step is stored, in ``rows`` rows
    (``stride == 1``: every state). Otherwise the reverse pass takes the segments
    of ``stride`` steps last first and recomputes each from its stored state:
    into a buffer of ``stride`` states (``depth == 0``), or by recursive
    bisection with a stack of ``depth`` states (:func:`_bisect_back`). With
    ``window == stride`` the forward pass also keeps the states of its last
    ``window`` steps, so the last segment (all of a solve of at most ``window``
    steps) is read, not recomputed.
    """

    stride: int
    rows: int
    depth: int = 0
    window: int = 0
    step_times: bool = False  # the steps' sizes are their times' differences (_Recorder's t_last)

    def states(self) -> int:
        """States held at most: the stored ones, the window of the last steps and the
        segment's buffer or stack."""
        if self.stride == 1:
            return self.rows
        return self.rows + (self.window + 1 if self.window else 0) + (self.depth or self.stride)

    def bytes(self, max_steps: int, state_bytes: int, time_bytes: int) -> int:
        """Bytes of the record: two times per step, the states (plus the stored
        rows' one row for discarded writes) and the stack's segment bounds."""
        return 2 * max_steps * time_bytes + (self.states() + 1) * state_bytes + 8 * self.depth


def _even(max_steps: int, k: int) -> Layout:
    """``k`` evenly spaced stored states, each segment recomputed into a buffer."""
    if k >= max_steps:
        return Layout(1, max_steps)
    stride = math.ceil(max_steps / k)
    return Layout(stride, math.ceil(max_steps / stride))


def _bisected(max_steps: int, k: int) -> Layout:
    """``k`` evenly spaced stored states, each segment run back by recursive bisection."""
    stride = math.ceil(max_steps / k)
    return Layout(stride, math.ceil(max_steps / stride), _stack_depth(stride))


def plan(
    name: str, checkpoints, budget: int | None, max_steps: int, state_bytes: int, time_bytes: int
) -> Layout:
    """The layout of the reverse pass's record: ``checkpoints`` as :class:`Direct` takes
    it, within ``budget`` bytes (``None``: no limit), for states of ``state_bytes``.

    ``checkpoints=None`` takes the first layout that fits, in order of the
    recomputation it costs: every state (none), for ``max_steps`` up to
    ``RECORD_STEPS`` (or no budget), else a window of the last steps with a
    checkpoint per window (none for solves of at most the window's steps, one
    step per step beyond; :func:`_candidates`); ``ceil(sqrt(max_steps))``
    checkpoints with buffered segments (one step per step); ``k`` checkpoints
    with bisected segments, ``k`` from ``ceil(sqrt(max_steps))`` down to 1
    (``log2(max_steps / k) / 2`` steps per step); bisection with as deep a stack as
    fits. An explicit ``checkpoints=k`` that does not fit raises ``ValueError``.
    """

    def fits(layout):
        return budget is None or layout.bytes(max_steps, state_bytes, time_bytes) <= budget

    if isinstance(checkpoints, int):
        layout = _even(max_steps, checkpoints)
        if not fits(layout):
            raise ValueError(
                _too_small(
                    name,
                    f"checkpoints={checkpoints} stores",
                    layout.bytes(max_steps, state_bytes, time_bytes),
                    budget,
                    max_steps,
                    state_bytes,
                )
                + " Use fewer checkpoints, checkpoints=None (chosen to fit the budget) or a larger memory_budget."
            )
        return layout
    least = Layout(max_steps, 1, 1)
    if not fits(least):
        raise ValueError(
            _too_small(
                name,
                "the reverse pass needs at least",
                least.bytes(max_steps, state_bytes, time_bytes),
                budget,
                max_steps,
                state_bytes,
            )
            + " Raise memory_budget (None: no limit) or lower max_steps."
        )
    for layout in _candidates(checkpoints, max_steps, budget is None):
        if fits(layout):
            return layout
    # A shallower stack: the bisection stops where it is full (see _bisect_back).
    spare = budget - least.bytes(max_steps, state_bytes, time_bytes)
    return Layout(max_steps, 1, 1 + spare // (state_bytes + 8))


def _windowed(max_steps: int, window: int) -> Layout:
    """A checkpoint every ``window`` steps and the states of the last ``window`` steps."""
    return Layout(window, math.ceil(max_steps / window), 0, window)


def _candidates(checkpoints, max_steps: int, unlimited: bool = False):
    """The layouts for ``checkpoints=None`` or ``"recursive"``, least recomputation first.

    With ``checkpoints=None``: every state when ``max_steps`` is at most
    ``RECORD_STEPS`` (or the budget unlimited); for a larger ``max_steps``, a
    window of the last ``RECORD_STEPS`` steps (fewer if the budget says so, down
    to ``sqrt(max_steps)``) plus a checkpoint per window, so that the record of a
    solve of fewer steps than the window is never recomputed and does not grow
    with ``max_steps`` beyond one state per window and two times per step.
    """
    if checkpoints is None:
        root = math.ceil(math.sqrt(max_steps))
        if max_steps <= RECORD_STEPS or unlimited:
            yield Layout(1, max_steps)
        else:
            w = RECORD_STEPS
            while w >= root:
                yield _windowed(max_steps, w)
                w = w * 7 // 8
        yield _even(max_steps, root)
        for k in range(root, 1, -1):
            yield _bisected(max_steps, k)
    yield _bisected(max_steps, 1)


def _too_small(name, what, need, budget, max_steps, state_bytes) -> str:
    return (
        f"{name}: {what} {need} bytes for max_steps={max_steps} steps of a state of {state_bytes} bytes, "
        f"more than its memory_budget={budget} bytes."
    )


def record(
    layout: Layout, loop, f, y0, ts, args, opts, ring: bool = False, stop_after=None, first_stages=False
):
    """The forward solve plus its record ``(t_buf, h_buf, y_buf)`` of the accepted steps,
    the states laid out as ``layout`` says; with ``ring``, the last ``layout.rows``
    steps (stride 1), the solve stopped after ``stop_after`` + 1 accepted steps; with
    ``first_stages``, each state with its step's first stage (:class:`_Recorder`); with
    ``layout.step_times``, each step's size is the difference of its recorded times."""
    tdtype = jnp.result_type(ts)
    rec = _Recorder(
        opts.solver,
        opts.max_steps,
        layout.stride,
        layout.rows,
        tdtype,
        ring,
        layout.window,
        first_stages,
        loop_end(opts, ts) if layout.step_times else None,
    )
    opts = opts._replace(solver=rec, dense=False, return_state=True, regularise=False, stop_after=stop_after)
    ys, counters, _, state = loop(f, y0, ts, args, opts)
    _, _, t_buf, h_buf, y_buf = state
    return ys, counters, (t_buf, h_buf, y_buf)


def loop_end(opts, ts):
    """Where the loop's steps end (internal time) for a solve saving at ``ts``: the loop's
    own ``last_time`` (``ts`` in its dtype, times the direction, ``+-1``, exactly)."""
    ts = jnp.asarray(ts)
    direction = time_direction(ts)
    return last_time(opts, direction, direction * ts[-1])


def record_layout(name, checkpoints, budget, y0, ts, opts) -> Layout:
    """:func:`plan` for the record of a forward solve from ``y0`` saving at ``ts``."""
    time_bytes = jnp.dtype(jnp.result_type(ts)).itemsize
    return plan(name, checkpoints, budget, opts.max_steps, y0.size * y0.dtype.itemsize, time_bytes)


def step_function(prob, y0, ts) -> Callable:
    """``step(t, y, h, diff) -> (y1, dense)``: one step of the solve from ``y0`` saving at
    ``ts``, exactly as the loop takes it (``diff`` the differentiated arguments; an optional
    fifth argument, without tstops, is the first stage ``f(t, y)``, else computed); with
    ``prob.opts.regularise``, ``(y1, dense, regularisers)``, the step's term of
    :class:`~diffode._regularisers.Regularisers`."""
    static, f, opts = prob.static, prob.f, prob.opts
    solver = opts.solver
    direction = time_direction(ts)
    dtype = y0.dtype
    tol = Tolerances.for_state(opts.rtol, opts.atol, opts.controller.norm, y0)

    s_stops = tstop_times(opts, ts)

    def step(t, y, h, a, f0=None):
        rhs = internal_rhs(f, combine(a, static), direction, dtype, opts.jac)
        if s_stops is None:
            state = solver.init(rhs, t, y, rhs(t, y) if f0 is None else f0)
            step_rhs = rhs
        else:
            # As in the loop: a step from a tstop starts with f just after it, and the
            # stages of a step stay below the next tstop.
            t_init = jnp.where(jnp.any(s_stops == t), next_float(t, jnp.inf), t)
            state = solver.init(rhs, t_init, y, rhs(t_init, y))
            step_rhs = left_of(rhs, jnp.min(jnp.where(s_stops > t, s_stops, jnp.inf)))
        res = solver.step(step_rhs, t, y, h.astype(dtype), state, tol)
        if opts.regularise:
            reg = step_regularisers(y, res.y1, res.y_error, state, res.state, h, tol.rtol, tol.atol)
            return res.y1, res.dense, reg
        return res.y1, res.dense

    return step


def tstop_times(opts, ts) -> jax.Array | None:
    """The loop's :func:`~diffode._integrate.landing_times` for a solve saving at ``ts``."""
    ts = jnp.asarray(ts)
    direction = time_direction(ts)
    return landing_times(opts, direction, direction * ts[0], direction * ts[-1], ts.dtype)


def run_back(layout: Layout, num, y_buf, step: Callable, back_step: Callable, c: tuple) -> tuple:
    """``c = back_step(k, y_k, c)`` for the accepted steps ``k = num - 1, ..., 0``.

    ``y_k`` comes from the record ``y_buf`` (laid out by ``layout``), or is
    recomputed from the stored state before it with ``step(k, y_k) = y_{k+1}``.
    """
    stride, depth, window = layout.stride, layout.depth, layout.window
    if window:
        y_buf, y_win = y_buf

    def stored(k_hi, k_lo, get_y, c):
        """Steps k_hi - 1 down to k_lo."""

        def body(kc):
            k = kc[0] - 1
            return (k,) + tuple(back_step(k, get_y(k), kc[1:]))

        return lax.while_loop(lambda kc: kc[0] > k_lo, body, (k_hi,) + tuple(c))[1:]

    if stride == 1:
        return stored(num, 0, lambda k: y_buf[k], c)
    if depth and layout.rows == 1:
        return _bisect_back(0, num, y_buf[0], step, back_step, c, depth)

    # Segments of `stride` steps, last first, each from its stored state, recomputed
    # into a buffer of `stride` states. With a window, the buffer starts as the
    # window's states in step order, which are the last segment's.
    num_seg = (num + stride - 1) // stride
    if depth:
        buf0 = jnp.zeros((0,), y_buf.dtype)  # bisected segments keep their own stack
    elif window:
        buf0 = jnp.take(y_win, ((num_seg - 1) * stride + jnp.arange(stride)) % (window + 1), axis=0)
    else:
        buf0 = jnp.zeros((stride,) + y_buf.shape[1:], y_buf.dtype)

    def seg_body(gc):
        g, buf = gc[0] - 1, gc[1]
        lo = g * stride
        hi = jnp.minimum(lo + stride, num)
        if depth:
            return (g, buf) + tuple(_bisect_back(lo, hi, y_buf[g], step, back_step, gc[2:], depth))
        kept = (g == num_seg - 1) if window else False  # the window's: nothing to recompute

        def fwd(j, seg):
            return seg.at[j].set(step(lo + j - 1, seg[j - 1]))

        buf = lax.fori_loop(
            1, jnp.where(kept, 1, hi - lo), fwd, jnp.where(kept, buf, buf.at[0].set(y_buf[g]))
        )
        return (g, buf) + tuple(stored(hi, lo, lambda k: buf[k - lo], gc[2:]))

    return lax.while_loop(lambda gc: gc[0] > 0, seg_body, (num_seg, buf0) + tuple(c))[2:]


def _bisect_back(lo, hi, y_lo, step, back_step, c, depth: int):
    """Run ``back_step`` over steps ``hi - 1 ... lo`` by recursive bisection.

    A stack of pending segments ``[a, b)``, each with its start state. The top
    one is taken: while the stack has room, a segment of several steps is split
    at its midpoint: it keeps its lower half and the upper half is pushed on top
    with the midpoint state, recomputed by ``step``. Otherwise its last step is
    run back, its start state recomputed from the segment's, and the segment
    shrinks by that step (popped when empty). A stack of ``_stack_depth(hi - lo)``
    states always has room (one segment per level of the bisection); a smaller
    one trades recomputation for memory.
    """
    ys = jnp.zeros((depth,) + y_lo.shape, y_lo.dtype).at[0].set(y_lo)
    los = jnp.zeros((depth,), jnp.int32).at[0].set(lo)
    his = jnp.zeros((depth,), jnp.int32).at[0].set(hi)
    top = jnp.where(hi > lo, 1, 0).astype(jnp.int32)

    def body(st):
        top, ys, los, his, c = st
        j = top - 1
        y, a, b = ys[j], los[j], his[j]
        split = (b - a > 1) & (top < depth)
        m = jnp.where(split, (a + b) // 2, b - 1)
        y_m = lax.fori_loop(a, m, lambda k, v: step(k, v), y)

        def push(_):
            return top + 1, ys.at[j + 1].set(y_m), los.at[j + 1].set(m), his.at[j].set(m).at[j + 1].set(b), c

        def back(_):
            return jnp.where(m == a, top - 1, top), ys, los, his.at[j].set(m), tuple(back_step(m, y_m, c))

        return lax.cond(split, push, back, None)

    return lax.while_loop(lambda st: st[0] > 0, body, (top, ys, los, his, tuple(c)))[4]


def _interp(solver, dtype):
    def interp(t, h, s, y, y1, dense):
        theta = ((s - t) / h).astype(dtype)
        return solver.interpolate(h.astype(dtype), y, y1, dense, theta)

    return interp


def save_keep(prob, direction) -> Callable | None:
    """``keep(s, y, diff)``: what the loop saves of the state ``y`` at internal time ``s``
    (``solve(..., save_fn=...)``), or ``None`` when it saves the state itself."""
    fn = prob.opts.save_fn
    if fn is None:
        return None
    return lambda s, y, d: fn(direction * s, y, combine(d, prob.static))


def _save_cotangents(
    interp, s_ts, ys_bar, t, h, t1, y, y1, dense, sc, end_on_stop=False, keep=None, diff=None, times=True
):
    """Add the cotangents of the saves that step ``[t, t1]`` covers, last first.

    ``sc = (i, y_b, y1_b, d_b, t_b, h_b, s_bar)``: the next save index (counting
    down), the cotangents of the step's start, end, interpolation data, start
    time and size, and of the internal save times; returned updated. With ``times=False``
    (no time is differentiated) ``sc = (i, y_b, y1_b, d_b)``. A save at
    the step's end point is the end state itself, not interpolated; when that end
    is a tstop (``end_on_stop``), the save time's cotangent is still the
    interpolant's (as the loop's save there is differentiated). With ``keep``
    (:func:`save_keep`) a save is ``keep`` of the state, and ``sc`` ends with the
    cotangent of ``diff`` too.
    """

    def save_cond(sc):
        return (sc[0] >= 1) & (s_ts[sc[0]] > t)

    def state_save_body(sc):
        i, y_b, y1_b, d_b = sc
        s, g = s_ts[i], ys_bar[i]
        yb, y1b, db = jax.vjp(lambda y, y1, d: interp(t, h, s, y, y1, d), y, y1, dense)[1](g)
        exact = s == t1
        z = lambda v: select(exact, jnp.zeros_like(v), v)  # noqa: E731
        return i - 1, y_b + z(yb), y1_b + select(exact, g, y1b), d_b + z(db)

    def save_body(sc):
        i, y_b, y1_b, d_b, t_b, h_b, s_b, *a_b = sc
        s = s_ts[i]
        g = ys_bar[i]
        exact = s == t1
        if keep is None:
            tb, hb, sb, yb, y1b, db = jax.vjp(interp, t, h, s, y, y1, dense)[1](g)
            kt, ky = jnp.zeros_like(sb), g
        else:
            kept = lambda t, h, s, y, y1, dense, d: keep(s, interp(t, h, s, y, y1, dense), d)  # noqa: E731
            tb, hb, sb, yb, y1b, db, ab = jax.vjp(kept, t, h, s, y, y1, dense, diff)[1](g)
            kt, ky, kb = jax.vjp(keep, s, y1, diff)[1](g)  # the save at the step's end: keep(s, y1)
            a_b = [jtu.tree_map(lambda acc, e, i_: acc + select(exact, e, i_), a_b[0], kb, ab)]
        z = lambda v: select(exact, jnp.zeros_like(v), v)  # noqa: E731
        return (
            i - 1,
            y_b + z(yb),
            y1_b + select(exact, ky, y1b),
            d_b + z(db),
            t_b + z(tb),
            h_b + z(hb),
            s_b.at[i].add(select(exact & ~end_on_stop, kt, sb)),
            *a_b,
        )

    if not times and keep is None:
        return lax.while_loop(save_cond, state_save_body, sc)
    return lax.while_loop(save_cond, save_body, sc)


def _start_saves(ys_bar, i_left, keep=None, s_ts=None, y0=None, diff=None):
    """The cotangents from the saves no step covers: ``ys[0]`` and any later save at
    ``ts[0]`` itself (``ts`` may repeat a value), up to index ``i_left``: of ``y0``, and
    with ``keep`` (:func:`save_keep`) also of the save times and of ``diff``."""
    g = jnp.where((jnp.arange(ys_bar.shape[0]) <= i_left)[:, None], ys_bar, 0)
    if keep is None:
        return jnp.sum(g, axis=0)
    return jax.vjp(lambda s, y, d: jax.vmap(keep, (0, None, None))(s, y, d), s_ts, y0, diff)[1](g)


def _time_cotangents(fixed, s_ts, num, k, i, t1, t_b, hb_total, tb, t_bar, s_bar, s_stops=None):
    """The cotangents of step ``k``'s start time and of the save times after its own.

    The step that reaches a stop lands on it: ``h = stop - t`` depends on both;
    otherwise ``t_{k+1} = t_k + h_k`` with ``h_k`` a constant of the scheme. ``i``
    is the save index before the step's saves were run back (with fixed steps,
    the save the step lands on). A step that lands on a tstop (``s_stops``, not
    differentiated) has ``h = tstop - t_k`` and ends at a constant. Returns
    ``(t_bar, s_bar)``, ``t_bar`` now the cotangent of ``t_k``.
    """
    if fixed:
        j = i
        lands = s_ts[i] == t1
    else:
        j = s_ts.shape[0] - 1
        lands = (k == num - 1) & (t1 == s_ts[-1])
    zero_t = jnp.zeros((), t_b.dtype)
    t_new = t_b + tb + select(lands, -hb_total, t_bar)
    if s_stops is not None:
        on_stop = jnp.any(s_stops == t1) & ~lands
        t_new = select(on_stop, t_b + tb - hb_total, t_new)
    return t_new, s_bar.at[j].add(select(lands, hb_total + t_bar, zero_t))


def _reused(value, compute: Callable, inputs: tuple):
    """``value``, which equals ``compute(*inputs)``, as it is; differentiated (forward mode)
    as ``compute``, which runs again with the tangents.

    A reverse pass reads the record its forward solve kept (``value``) instead of
    solving again; differentiating that reverse pass (forward over reverse) needs
    the record's dependence on the inputs, which the kept value does not carry.
    """

    @jax.custom_jvp
    def kept(inputs, value):
        return value

    @kept.defjvp
    def kept_jvp(primals, tangents):
        return jax.jvp(lambda i: compute(*i), (primals[0],), (tangents[0],))

    return kept(inputs, value)


def _step_vjp(step, t, y, h, diff, times: bool, f0=None):
    """``jax.vjp`` of ``step(t, y, h, diff)`` (``step(t, y, h, diff, f0)`` with a first stage
    ``f0``), its pullback returning ``(tb, yb, hb, ab, f0b)``; with ``times=False`` the step's
    time and size are constants (``tb``, ``hb`` are ``None``), and ``f0b`` is ``None``
    without ``f0``."""
    if times:
        out, pull = jax.vjp(step, t, y, h, diff)
        return out, lambda cts: (*pull(cts), None)
    if f0 is None:
        out, pull = jax.vjp(lambda y, d: step(t, y, h, d), y, diff)
        return out, lambda cts: (lambda yb, ab: (None, yb, None, ab, None))(*pull(cts))
    out, pull = jax.vjp(lambda y, d, f0: step(t, y, h, d, f0), y, diff, f0)
    return out, lambda cts: (lambda yb, ab, fb: (None, yb, None, ab, fb))(*pull(cts))


def _replay(method, loop, prob, y0, ts, diff, ys_bar, pieces_bar=None, reg_bar=None, cache=None, times=True):
    """``(dy0, dts, dparams)`` for the cotangent ``ys_bar``: the recorded steps, run backwards.

    ``pieces_bar`` (optional) holds cotangents of the dense output's rows
    ``(t_start, h, y0, y1, data)``: row ``k`` is accepted step ``k``. ``reg_bar``
    (optional) is the cotangent of the regularisers (``prob.opts.regularise``),
    a sum of one term per accepted step. ``cache`` (optional): the record the
    forward solve kept (:meth:`Direct.record`); without it, or in another layout,
    the forward solve runs again to record its steps. ``times=False``: ``ts`` has no
    tangent, so the steps' times are constants and their cotangents are left out.
    """
    opts = prob.opts
    ts_given = ts
    ts = prob.known_ts if ts is None else ts
    layout = record_layout("Direct", method.checkpoints, method.memory_budget, y0, ts, opts)
    arrays, prob_static = split_problem(prob)

    def rerun(y0, ts, diff, arrays):
        p = eqx.combine(arrays, prob_static)
        return record(layout, loop, p.f, y0, prob_times(p, ts), p.args(diff), p.opts)[1:]

    if cache is not None and cache[0] == ("full", layout):
        counters, (t_buf, h_buf, y_buf) = _reused(cache[1], rerun, (y0, ts_given, diff, arrays))
    else:
        counters, (t_buf, h_buf, y_buf) = rerun(y0, ts_given, diff, arrays)
    ts = jnp.asarray(ts)
    dtype, tdtype = y0.dtype, ts.dtype
    direction = time_direction(ts)
    s_ts = direction * ts
    num = counters[2]  # accepted steps
    step_map = step_function(prob._replace(opts=opts._replace(regularise=reg_bar is not None)), y0, ts)
    s_stops = tstop_times(opts, ts)
    t_last = last_time(opts, direction, s_ts[-1])
    interp = _interp(opts.solver, dtype)
    keep = save_keep(prob, direction)

    def t_next(k):
        # End of step k: the next step's start, or the final time for the last one.
        return select(k + 1 >= num, t_last, lax.dynamic_index_in_dim(t_buf, k + 1, keepdims=False))

    def back_step(k, y, c):
        """Cotangents through step k (start y) and the saves it covers."""
        i, y_bar, t_bar, a_bar, s_bar = c
        t, h, t1 = t_buf[k], h_buf[k], t_next(k)
        (y1, dense, *_), vjp_step = _step_vjp(step_map, t, y, h, diff, times)
        zero_t = jnp.zeros((), tdtype)
        sc = (i, jnp.zeros_like(y), y_bar, jnp.zeros_like(dense), zero_t, zero_t, s_bar)
        if pieces_bar is not None:
            pb = [lax.dynamic_index_in_dim(v, k, keepdims=False) for v in pieces_bar]
            sc = (
                i,
                pb[2].astype(dtype),
                y_bar + pb[3],
                pb[4],
                pb[0].astype(tdtype),
                pb[1].astype(tdtype),
                s_bar,
            )
        end_on_stop = False if (s_stops is None or opts.fixed) else jnp.any(s_stops == t1)
        if keep is not None:
            sc = sc + (jtu.tree_map(jnp.zeros_like, diff),)
        elif not times:
            sc = sc[:4]  # (i, y_b, y1_b, d_b): the saves' time cotangents are not formed
        i_next, y_b, y1_b, d_b, *rest = _save_cotangents(
            interp, s_ts, ys_bar, t, h, t1, y, y1, dense, sc, end_on_stop, keep, diff, times
        )
        tb, yb, hb, ab, _ = vjp_step((y1_b, d_b) + (() if reg_bar is None else (reg_bar.astype(dtype),)))
        if keep is not None:
            ab = jtu.tree_map(jnp.add, ab, rest[3])
        if times:
            t_b, h_b, s_bar = rest[:3]
            t_bar, s_bar = _time_cotangents(
                opts.fixed, s_ts, num, k, i, t1, t_b, h_b + hb, tb, t_bar, s_bar, s_stops
            )
        return (i_next, y_b + yb, t_bar, jtu.tree_map(jnp.add, a_bar, ab), s_bar)

    zero_t = jnp.zeros((), tdtype)
    a_bar0 = jtu.tree_map(jnp.zeros_like, diff)
    c = (jnp.asarray(ts.shape[0] - 1, jnp.int32), jnp.zeros_like(y0), zero_t, a_bar0, jnp.zeros_like(s_ts))
    c = run_back(layout, num, y_buf, lambda k, y: step_map(t_buf[k], y, h_buf[k], diff)[0], back_step, c)
    i_left, y_bar, t_bar, a_bar, s_bar = c
    if keep is None:
        y_bar = y_bar + _start_saves(ys_bar, i_left)
    else:
        s_b, y_b, a_b = _start_saves(ys_bar, i_left, keep, s_ts, y0, diff)
        y_bar, s_bar, a_bar = y_bar + y_b, s_bar + s_b, jtu.tree_map(jnp.add, a_bar, a_b)
    s_bar = s_bar.at[0].add(t_bar)
    ts_bar = (direction * s_bar).astype(ts.dtype)
    # A failed forward solve has no derivative: NaN cotangents (its status is returned).
    return nan_if(counters[0] != Status.SUCCESS, (y_bar, None if ts_given is None else ts_bar, a_bar))


# ----------------------------------------------------------------------------
# The reverse pass of a vmapped batch of solves, with the batch explicit: one
# step VJP for all members, so that the cotangent of parameters the members
# share is a sum the VJP forms itself (matrix products over the batch), never
# a per-member copy of the parameters.
# ----------------------------------------------------------------------------

#: Bytes (for the whole batch) of the record a batched reverse pass keeps.
WINDOW_BYTES = 2**21
#: The fewest and most steps in that record's window.
WINDOW_STEPS = (16, 1024)


def _window_steps(max_steps: int, size: int, row_bytes: int) -> int:
    """Steps in the batched reverse pass's window: as many as ``WINDOW_BYTES`` holds for the
    whole batch, within ``WINDOW_STEPS`` (and never more than ``max_steps``)."""
    least, most = WINDOW_STEPS
    return min(max_steps, max(least, min(most, WINDOW_BYTES // max(1, size * row_bytes))))


#: Step times a batched record may keep for the whole batch, ``batch * max_steps``
#: (:func:`batched_layout`): 64 members at the default ``max_steps``. The record is a
#: ``(batch, max_steps + 1)`` buffer filled on every call, whatever the steps taken: in the
#: neural-ODE training step it cost 0.5-0.8 ms at 256 x 4097 float64 (8 MiB, an 8-9 ms
#: step) and 11 ms at 1024 x 4097 (32 MiB, a 53 ms step; past glibc's largest mmap
#: threshold, so fresh pages on every call), against about 0.1 s of compile time saved
#: once (the training step at 256 members, lower + compile, interleaved: 2.40-2.55 s
#: against 2.51-2.63 s with the ring).
TIMES_STEPS = 2**18


def _steps_from_times(opts, dtype, tdtype) -> bool:
    """Whether a batched record may keep only the steps' times (:func:`batched_layout`):
    the loop lands a step on a given time only at the end (adaptive steps, no tstops,
    events or stop time), so that every step but the last ends at ``t_k + h``; the step
    sizes (cast to the state's dtype) are in the time's dtype; and a step taken again
    from its recorded state is the recorded step up to rounding (explicit Runge-Kutta and
    Rosenbrock steps are functions of ``(t, y, h)``; a Newton-solved step also depends on
    the Jacobian and starting values the loop carried, so a recomputed one is the
    recorded one only to the Newton tolerance)."""
    plain = not opts.fixed and opts.tstops is None and opts.t_stop is None and opts.events is None
    pure = isinstance(opts.solver, (ExplicitRK, Rosenbrock))
    return plain and pure and jnp.dtype(dtype) == jnp.dtype(tdtype)


def batched_layout(opts, size: int, n: int, dtype, tdtype, first_stages: bool) -> Layout:
    """Each member's record, in a batch of ``size`` solves, that :func:`replay_batched` reads,
    with ``W`` steps in its window (:func:`_window_steps`).

    When the steps can be taken again from their times (:func:`_steps_from_times`) and
    the whole batch's step times are at most ``TIMES_STEPS``: every step's time (the
    sizes are their differences, ``Layout.step_times``), a checkpoint every ``W`` steps
    and the states of the last ``W`` steps (``_windowed``); the reverse pass steps an
    earlier window forward again from its checkpoint. Otherwise a ring of the last ``W`` steps' times, sizes and
    states (``W + 2`` rows: the window, the start of the step after it and the row a
    finished member writes); an earlier window needs the forward solve run again,
    stopped at its end.
    """
    tbytes = jnp.dtype(tdtype).itemsize
    width = _window_steps(opts.max_steps, size, _row_bytes(n, dtype, tbytes, first_stages))
    if _steps_from_times(opts, dtype, tdtype) and size * opts.max_steps <= TIMES_STEPS:
        return _windowed(opts.max_steps, width)._replace(step_times=True)
    return Layout(1, width + 2)


def _within(budget, layout: Layout, max_steps: int, n: int, dtype, first_stages: bool) -> bool:
    """Whether one member's record in ``layout`` (:func:`batched_layout`) and the window a
    reverse pass steps forward into fit ``budget`` bytes (``None``: no limit), times
    counted as 8 bytes."""
    if budget is None:
        return True
    if not layout.step_times:
        return _ring_bytes(layout.rows, n, dtype, first_stages) <= budget
    rows = layout.rows + 1 + 2 * (layout.window + 1)
    return 8 * (max_steps + 1) + _ring_bytes(rows, n, dtype, first_stages) <= budget


#: A batch of at least ``2 * GROUP_MIN`` members runs its reverse pass in ``GROUPS`` groups.
GROUPS = 4
GROUP_MIN = 32


def _group_size(size: int) -> int:
    """Members per group in a batched reverse pass (:func:`replay_batched`).

    The groups' steps run one after another: the batch in 4 groups costs about what it
    costs whole (one step VJP of a 2-64-64-2 MLP on 64 members takes a quarter of its
    time on 256, on 2 CPU cores), and once most members are done, a pass costs one group.
    Small batches stay whole.
    """
    if size < 2 * GROUP_MIN:
        return size
    return max(GROUP_MIN, -(-size // GROUPS))


def _shared_axes_match(r_axes, x_axes, x_struct) -> bool:
    """Whether every parameter with a tangent has a batched tangent exactly where its primal is batched."""
    ok = []
    jtu.tree_map(
        lambda present, ra, xa: ok.append(present is None or (ra is None) == (xa is None)),
        x_struct[2],
        r_axes[2],
        x_axes[2],
        is_leaf=lambda v: v is None,
    )
    return all(ok)


def replay_batched(
    method: Direct,
    loop,
    prob_static,
    r,
    ys_bar,
    x_struct,
    r_axes,
    x_axes,
    size: int,
    reg_bar=None,
    cache=None,
):
    """The reverse pass of a ``jax.vmap`` batch of solves, the batch explicit.

    Returns the batch's ``(dy0, dts, dparams)``: leaves batched along 0 where
    ``x_axes`` has an axis and summed over the batch where it has none; ``None``
    where this path does not apply (then :func:`_replay` is vmapped). ``reg_bar``
    (optional, batched along 0) is the cotangent of the regularisers.

    One VJP of the step map vmapped over the members differentiates step ``k`` of
    every member at once: the cotangent of the parameters they share is a sum
    that the VJP forms itself (products over the batch), never a per-member copy
    of the parameters. The reverse pass runs back through windows of ``W`` accepted
    steps (:func:`_window_steps`), last first, in the layout of :func:`batched_layout`:
    the last window's states are the record's; with every step's time recorded, each
    earlier window is stepped forward again from its checkpoint (``refill``, no step
    controller); otherwise each earlier window re-runs the forward solve, stopped at the
    window's end (``ceil(num / W) - 1`` forward solves). With ``cache`` (the record the
    forward solve kept, :meth:`Direct.record`, batched along 0) the record is read, not
    recomputed.
    """
    y0, ts, diff, _, arrays = r
    ax_y0, ax_ts, ax_diff, _, ax_arrays = r_axes
    if not _shared_axes_match(r_axes, x_axes, x_struct):
        return None
    opts = prob_static.opts
    if opts.save_fn is not None:
        return None  # saves of a function of the state: the vmapped one-solve replay
    n, dtype = y0.shape[0 if ax_y0 in (None, 1) else 1], y0.dtype
    # Every batched input with its batch along axis 0.
    members = jtu.tree_map(
        lambda v, ax: v if (v is None or ax is None) else jnp.moveaxis(v, ax, 0),
        (arrays, y0, ts, diff),
        (ax_arrays, ax_y0, ax_ts, ax_diff),
        is_leaf=lambda v: v is None,
    )
    arrays, y0, ts, diff = members
    m_axes = jtu.tree_map(
        lambda ax: None if ax is None else 0, (ax_arrays, ax_y0, ax_ts, ax_diff), is_leaf=lambda v: v is None
    )
    tdtype = jnp.result_type(prob_static.known_ts if ts is None else ts)
    kept = None
    if cache is not None and cache[0][0] == "batched":
        (_, layout, stages), kept = cache
    else:
        stages = _keeps_first_stages(opts)
        layout = batched_layout(opts, size, n, dtype, tdtype, stages)
    if not _within(method.memory_budget, layout, opts.max_steps, n, dtype, stages):
        return None
    # The window's steps, and the rows of the buffer that holds their states (step k in
    # row k % ring); their times are in the same rows of a ring, or (step_times) in row k.
    step_times = layout.step_times
    width = layout.window if step_times else layout.rows - 2
    ring = width + 1 if step_times else layout.rows
    # Without a tangent for ts the step times and sizes are constants: no time cotangents.
    times = x_struct[1] is not None
    # A replayed step takes its first stage from the record (the previous step's last
    # stage) when it is there and no time is differentiated: its cotangent then goes to
    # that last stage, and the first step's to f(t0, y0) after the loop.
    reuse = stages and not times

    def vm(fn, *rest_axes, size=size):
        def call(arrays, y0, ts, diff, *rest):
            prob = eqx.combine(arrays, prob_static)
            return fn(prob, y0, prob_times(prob, ts), diff, *rest)

        return jax.vmap(call, in_axes=m_axes + rest_axes, axis_size=size)

    def rec(prob, y0, ts, diff, *limit):
        return record(
            layout,
            loop,
            prob.f,
            y0,
            ts,
            prob.args(diff),
            opts,
            ring=not step_times,
            stop_after=limit[0] if limit else None,
            first_stages=stages,
        )[1:]

    def internal_times(prob, y0, ts, diff):
        ts = jnp.asarray(ts)
        direction = time_direction(ts)
        return jnp.broadcast_to(direction, ()).astype(ts.dtype), direction * ts

    if ax_ts is None:
        # Save times the members share (or known at trace time): one row, read by every member.
        direction_one, shared_ts = internal_times(prob_static, None, prob_times(prob_static, ts), None)
        direction = jnp.broadcast_to(direction_one, (size,))
        s_ts = jnp.broadcast_to(shared_ts, (size,) + shared_ts.shape)
    else:
        shared_ts = None
        direction, s_ts = vm(internal_times)(*members)  # (B,), (B, n_ts)
    s_stops = vm(lambda prob, y0, ts, diff: tstop_times(prob.opts, ts))(*members)  # (B, stops + 1) or None
    t_last = vm(lambda prob, y0, ts, diff: loop_end(prob.opts, ts))(*members)
    interp = _interp(opts.solver, dtype)
    at_row = jax.vmap(lambda buf, k: lax.dynamic_index_in_dim(buf, k, keepdims=False))
    take = lambda buf, k: at_row(buf, k % ring)  # noqa: E731
    col = lambda mask, v: mask.reshape((-1,) + (1,) * (v.ndim - 1))  # noqa: E731

    def member_saves(s_ts, g, t, h, t1, y, y1, dense, i, y_bar, s_bar, active, s_stops):
        zero_t = jnp.zeros((), s_ts.dtype)
        sc = (select(active, i, 0), jnp.zeros_like(y), y_bar, jnp.zeros_like(dense))
        if times:
            sc += (zero_t, zero_t, s_bar)
        end_on_stop = False if (s_stops is None or opts.fixed) else jnp.any(s_stops == t1)
        out = _save_cotangents(interp, s_ts, g, t, h, t1, y, y1, dense, sc, end_on_stop, times=times)
        return (select(active, out[0], i),) + tuple(out[1:])

    group = _group_size(size)

    # The steps' VJPs with the stages unrolled. `solve` already unrolls a batch's stages
    # when it sees the vmap; this also covers a batch it could not see (a jit between vmap
    # and solve), and the rounding of the recomputed stages does not move the recorded steps.
    solver_r = opts.solver.unrolled() if isinstance(opts.solver, ExplicitRK) else opts.solver
    opts_r = opts._replace(solver=solver_r)

    def step_map(prob, y0, ts, diff, t, y, h, *f0):
        return step_function(prob._replace(opts=opts_r), y0, ts)(t, y, h, diff, *f0)

    step_g = vm(step_map, 0, 0, 0, *((0,) if reuse else ()), size=group)

    def window_back(buffers, num, lo, hi, t_hi, c):
        """Steps ``hi - 1`` down to ``lo`` of every member, from the window ``buffers``.

        Pass ``r`` takes each member's ``r``-th step from the end of its window. The
        members are ordered by their number of steps, most first, so a pass's members
        are a prefix of that order, and the pass runs in groups of ``group`` of them
        (:func:`_group_size`): when most members have finished, a pass costs one group's
        step instead of the whole batch's. With one group (small batches) the members
        stay in place.
        """
        t_buf, h_buf, y_buf = buffers
        count = hi - lo
        whole = group == size
        order = jnp.argsort(-count).astype(jnp.int32)
        count_sorted = count[order]

        def body(c):
            r, start, i, y_bar, t_bar, s_bar, a_bar, f0_bar = c
            if whole:
                rows, active = None, count > r
                get = lambda v: v  # noqa: E731
                put = lambda v, new: new  # noqa: E731
                y_at, t_at = take, (at_row if step_times else take)
            else:
                pos = jnp.minimum(start, size - group) + jnp.arange(group)
                rows, active = order[pos], (pos >= start) & (count_sorted[pos] > r)
                get = lambda v: v[rows]  # noqa: E731
                put = lambda v, new: v.at[rows].set(new)  # noqa: E731
                y_at = lambda buf, k: buf[rows, k % ring]  # noqa: E731
                t_at = (lambda buf, k: buf[rows, k]) if step_times else y_at  # noqa: E731
            kk = jnp.maximum(get(hi) - 1 - r, get(lo))  # an inactive member's cotangent is 0
            t, y = t_at(t_buf, kk), y_at(y_buf, kk)
            if stages:
                y, f0 = y[:, 0], y[:, 1]
            t1 = jnp.where(kk + 1 >= get(hi), get(t_hi), t_at(t_buf, kk + 1))
            h = t1 - t if step_times else y_at(h_buf, kk)  # (_Recorder's t_last)
            g_arrays, g_y0, g_ts, g_diff = jtu.tree_map(
                lambda v, ax: v if (v is None or ax is None) else get(v),
                members,
                m_axes,
                is_leaf=lambda v: v is None,
            )
            (y1, dense, *_), vjp_step = _step_vjp(
                lambda t, y, h, d, *f0: step_g(g_arrays, g_y0, g_ts, d, t, y, h, *f0),
                t,
                y,
                h,
                g_diff,
                times,
                f0 if reuse else None,
            )
            g_i, g_y_bar = get(i), get(y_bar)
            g_s_ts = get(s_ts) if (times or shared_ts is None) else None
            g_stops = None if s_stops is None else get(s_stops)
            g_s_bar = get(s_bar) if times else None
            saves_ts, saves_axis = (g_s_ts, 0) if shared_ts is None else (shared_ts, None)
            i2, y_b, y1_b, d_b, *time_b = jax.vmap(member_saves, in_axes=(saves_axis,) + (0,) * 12)(
                saves_ts,
                get(ys_bar),
                t,
                h,
                t1,
                y,
                y1,
                dense,
                g_i,
                g_y_bar,
                g_s_bar,
                active,
                g_stops,
            )
            if reuse:
                # The next step's first stage is this step's last one.
                g_f0_bar = get(f0_bar)
                d_b = d_b.at[:, -1].add(g_f0_bar)
            cts = (y1_b, d_b) + (() if reg_bar is None else (get(reg_bar).astype(dtype),))
            tb, yb, hb, ab, f0b = vjp_step(tuple(jnp.where(col(active, v), v, 0) for v in cts))
            keep = lambda new, old: jnp.where(col(active, new), new, old)  # noqa: E731
            if reuse:
                f0_bar = put(f0_bar, keep(f0b, g_f0_bar))
            if times:
                t_b, h_b, s_bar2 = time_b
                g_t_bar = get(t_bar)
                t_bar2, s_bar2 = jax.vmap(functools.partial(_time_cotangents, opts.fixed))(
                    g_s_ts, get(num), kk, g_i, t1, t_b, h_b + hb, tb, g_t_bar, s_bar2, g_stops
                )
                t_bar, s_bar = put(t_bar, keep(t_bar2, g_t_bar)), put(s_bar, keep(s_bar2, g_s_bar))
            # A shared parameter's cotangent comes summed over the group; a batched one's
            # rows are the group's members (zero for the inactive ones).
            a_bar = jtu.tree_map(
                lambda acc, new, ax: (
                    acc if acc is None else acc + new if (ax is None or whole) else acc.at[rows].add(new)
                ),
                a_bar,
                ab,
                m_axes[3],
                is_leaf=lambda v: v is None,
            )
            # The members with steps left after this pass are a prefix of the order.
            nxt = start + group
            last_group = (nxt >= size) | (count_sorted[jnp.minimum(nxt, size - 1)] <= r)
            return (
                r + last_group.astype(r.dtype),
                jnp.where(last_group, 0, start + group),
                put(i, i2),
                put(y_bar, keep(y_b + yb, g_y_bar)),
                t_bar,
                s_bar,
                a_bar,
                f0_bar,
            )

        zero = jnp.zeros((), jnp.int32)
        return lax.while_loop(lambda c: c[0] < count_sorted[0], body, (zero, zero) + tuple(c))[2:]

    def rerun_windows(back):
        """The windows of a ring record, last first: each earlier one from the forward solve
        run again, stopped at the start of the window replayed last (taking one step more,
        whose start time ends the window)."""

        def chunk(c):
            _, first, hi, num, status, back = c
            limit = jnp.where(first, opts.max_steps, hi)
            if kept is None:
                counters, buffers = vm(rec, 0)(*members, limit)
            else:
                whole = jnp.full((size,), opts.max_steps, jnp.int32)
                counters, buffers = lax.cond(
                    first,
                    lambda: _reused(kept, lambda *m: vm(rec, 0)(*m, whole), members),
                    lambda: vm(rec, 0)(*members, limit),
                )
            num = jnp.where(first, counters[:, 2], num)
            status = jnp.where(first, counters[:, 0], status)
            hi = jnp.where(first, num, hi)
            lo = jnp.maximum(hi - width, 0)
            t_hi = jnp.where(hi >= num, t_last, take(buffers[0], hi))
            back = window_back(buffers, num, lo, hi, t_hi, back)
            return jnp.any(lo > 0), jnp.zeros((), bool), lo, num, status, back

        i32 = jnp.zeros((size,), jnp.int32)
        c = (jnp.ones((), bool), jnp.ones((), bool), i32, i32, i32, back)
        return lax.while_loop(lambda c: c[0], chunk, c)[4:]

    # A window stepped forward again: the whole batch at once, stages unrolled.
    step_all = vm(step_map, 0, 0, 0, *((0,) if stages else ()))
    put_row = jax.vmap(lambda buf, v, k: lax.dynamic_update_index_in_dim(buf, v, k % ring, 0))
    int_width = jnp.int32(width)

    def refill(t_buf, checkpoints, lo, hi):
        """The states (and first stages) of every member's steps ``lo .. lo + width - 1``,
        stepped forward from its checkpoint at ``lo`` (a multiple of ``width``) with the
        recorded times; a member with no steps there takes steps of size 0."""
        going = hi > lo
        row = at_row(checkpoints, lax.div(lo, int_width))
        buf = put_row(jnp.zeros((size, ring) + row.shape[1:], dtype), row, lo)

        def body(j, c):
            buf, row = c
            k = lo + j
            t = at_row(t_buf, k)
            h = jnp.where(going, at_row(t_buf, k + 1) - t, 0)
            y, f0 = (row[:, 0], (row[:, 1],)) if stages else (row, ())
            y1, dense = step_all(*members, t, y, h, *f0)[:2]
            row = jnp.stack([y1, dense[:, -1]], 1) if stages else y1
            return put_row(buf, row, k + 1), row

        return lax.fori_loop(0, width - 1, body, (buf, row))[0]

    def stepped_windows(back):
        """The windows of a record of every step's time (:func:`batched_layout`), last first:
        a member's windows start at multiples of ``width``; the last one is the record's,
        each earlier one is stepped forward again from its checkpoint (``refill``)."""
        full = lambda *m: vm(rec)(*m)  # noqa: E731
        counters, (t_buf, _, (checkpoints, y_last)) = (
            full(*members) if kept is None else _reused(kept, full, members)
        )
        num, status = counters[:, 2], counters[:, 0]

        def chunk(c, only=False):
            first, hi, back = c
            if only:  # every step is in the record's window
                lo, y_buf = jnp.zeros_like(hi), y_last
            else:
                # (lax.div truncates: a member with no steps starts at 0 too)
                lo = jnp.maximum(jnp.where(first, lax.div(hi - 1, int_width) * width, hi - width), 0)
                y_buf = lax.cond(first, lambda: y_last, lambda: refill(t_buf, checkpoints, lo, hi))
            t_hi = jnp.where(hi >= num, t_last, at_row(t_buf, hi))
            back = window_back((t_buf, None, y_buf), num, lo, hi, t_hi, back)
            return jnp.zeros((), bool), lo, back

        c = (jnp.ones((), bool), num, back)
        if width >= opts.max_steps:
            return status, chunk(c, only=True)[2]
        return status, lax.while_loop(lambda c: jnp.any(c[1] > 0), chunk, c)[2]

    back0 = (
        jnp.full((size,), s_ts.shape[1] - 1, jnp.int32),
        jnp.zeros((size, n), dtype),
        jnp.zeros((size,), s_ts.dtype) if times else None,
        jnp.zeros_like(s_ts) if times else None,
        jtu.tree_map(jnp.zeros_like, diff),
        jnp.zeros((size, n), dtype) if reuse else None,
    )
    status, back = (stepped_windows if step_times else rerun_windows)(back0)
    i_left, y_bar, t_bar, s_bar, a_bar, f0_bar = back

    y_bar = y_bar + jax.vmap(_start_saves)(ys_bar, i_left)
    if reuse:
        # The first step's first stage f(t0, y0), which the loop evaluates before its first
        # step, differentiated for every member (a shared y0 as one row per member).
        def first_stage(prob, y0, ts, diff, y):
            direction = time_direction(ts)
            rhs = internal_rhs(prob.f, prob.args(diff), direction, dtype, opts.jac)
            return rhs(direction * jnp.asarray(ts)[0], y)

        y_rows = jnp.broadcast_to(y0, (size, n))
        _, pull = jax.vjp(lambda y, d: vm(first_stage, 0)(arrays, y0, ts, d, y), y_rows, diff)
        y_b0, a_b0 = pull(f0_bar)
        y_bar = y_bar + y_b0
        a_bar = jtu.tree_map(jnp.add, a_bar, a_b0)
    bad = status != Status.SUCCESS
    # A failed member has no derivative: NaN cotangents for it, and for the
    # parameters it shares with the others (their cotangent is a sum).
    y_bar = jnp.where(bad[:, None], jnp.nan, y_bar)
    ts_bar = None
    if times:
        s_bar = s_bar.at[:, 0].add(t_bar)
        ts_bar = jnp.where(bad[:, None], jnp.nan, (direction[:, None] * s_bar).astype(s_ts.dtype))
    a_bar = jtu.tree_map(
        lambda v, ax: (
            v
            if v is None
            else jnp.where(jnp.any(bad), jnp.nan, v)
            if ax is None
            else jnp.where(col(bad, v), jnp.nan, v)
        ),
        a_bar,
        ax_diff,
        is_leaf=lambda v: v is None,
    )
    dy0, dts, dparams = keep_present(x_struct, (y_bar, ts_bar, a_bar))
    sum_if = lambda v, ax: None if v is None else (jnp.sum(v, 0) if ax is None else v)  # noqa: E731
    return sum_if(dy0, x_axes[0]), sum_if(dts, x_axes[1]), dparams


# ----------------------------------------------------------------------------
# Outputs besides the saved states, differentiated by Direct: the dense output
# (the accepted steps' interpolation data) and the solver-heuristic regularisers.
# ----------------------------------------------------------------------------

#: The differentiable rows of a dense output, in this order.
_PIECE_FIELDS = ("t_start", "h", "y0", "y1", "data")


def _outputs(opts):
    """``outputs(*loop(...))``: the differentiable outputs of a loop run with ``opts``:
    ``ys``, then the dense output's rows (``opts.dense``), then the regularisers
    (``opts.regularise``)."""

    def outputs(ys, counters, pieces, *reg):
        out = (ys,)
        if opts.dense:
            out += tuple(getattr(pieces, k) for k in _PIECE_FIELDS)
        return out + tuple(reg)

    return outputs


class _OutputsOp(ProblemOp):
    """Tangent of :func:`_outputs`: the loop's JVP forward, the step replay backwards."""

    def __init__(self, method: Direct, loop, prob_static, x_struct, out_struct):
        self.method, self.loop, self.prob_static, self.x_struct, self.out = (
            method,
            loop,
            prob_static,
            x_struct,
            out_struct,
        )

    def apply(self, r, x):
        r, prob = self.unpack(r)
        return loop_tangent(self.loop, prob, r, x, outputs=_outputs(prob.opts))

    def transpose(self, r, cts):
        (y0, ts, params, _), prob = self.unpack(r)
        opts = prob.opts
        ys_bar, *rest = cts
        pieces_bar = rest[: len(_PIECE_FIELDS)] if opts.dense else None
        reg_bar = rest[-1] if opts.regularise else None
        out = _replay(
            self.method,
            self.loop,
            prob._replace(opts=opts._replace(dense=False)),
            y0,
            ts,
            params,
            ys_bar,
            pieces_bar,
            reg_bar,
            times=self.x_struct[1] is not None,
        )
        return keep_present(self.x_struct, out)

    def vjp_res(self, r, x, c):
        raise NotImplementedError(
            "Direct: reverse-over-reverse differentiation through dense output (Solution.evaluate) or "
            "regularisers is not supported; use forward-over-reverse (jax.hessian, jax.jacfwd of "
            "jax.grad) instead."
        )

    def transpose_batched(self, r, cts, r_axes, x_axes, size):
        opts = self.prob_static.opts
        if opts.dense:
            return None
        ys_bar, *rest = cts
        return replay_batched(
            self.method,
            self.loop,
            self.prob_static,
            r,
            ys_bar,
            self.x_struct,
            r_axes,
            x_axes,
            size,
            rest[-1] if opts.regularise else None,
        )

    def out_struct(self, r, x):
        return self.out


def direct_solve(method: Direct, loop, prob, y0, ts, params):
    """``(ys, counters, pieces, regularisers)`` of ``loop`` with the outputs ``prob.opts`` asks
    for (dense output with ``dense``, else ``pieces`` is ``None``; the ``[error, stiffness]``
    regularisers with ``regularise``, else ``None``), all differentiable by ``method``'s
    rules (forward mode through the loop, reverse mode by the step replay;
    ``checkpoints`` apply)."""
    method.check(prob)
    opts = prob.opts
    outputs = _outputs(opts)

    def primal(prob, y0, ts, params, cache):
        ys, counters, pieces, *reg = loop(prob.f, y0, prob_times(prob, ts), prob.args(params), prob.opts)
        num = pieces.num_pieces if opts.dense else counters[2]
        return outputs(ys, counters, pieces, *reg), counters, num

    def rule(prob, y0, ts, params, x, primal_call, cache, meta):
        outs, counters, num = primal_call(y0, ts, params)
        zero_out = (jtu.tree_map(jnp.zeros_like, outs), float0_zeros(counters), float0_zeros(num))
        if not jtu.tree_leaves(x):
            return (outs, counters, num), zero_out
        structs = jtu.tree_map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), outs)
        arrays, prob_static = split_problem(prob)
        op = _OutputsOp(method, loop, prob_static, jtu.tree_map(lambda _: True, x), structs)
        douts = linear_map(op, (y0, ts, params, outs[0], arrays), x)
        scale = failure_scale(counters, prob.opts.throw, outs[0].dtype)
        douts = tuple(d * scale.astype(d.dtype) for d in douts)
        return (outs, counters, num), (douts, zero_out[1], zero_out[2])

    outs, counters, num = custom_solve_jvp(primal, prob, rule, y0, ts, params)
    ys, rest = outs[0], outs[1:]
    pieces = None
    if opts.dense:
        t_start, h, py0, py1, data = rest[: len(_PIECE_FIELDS)]
        pieces = DenseOutput(t_start, h, py0, py1, data, num, opts.solver.interpolate)
    return ys, counters, pieces, rest[-1] if opts.regularise else None
