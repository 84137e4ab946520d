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

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax import lax

from .._explicit import ExplicitRK
from .._implicit import SDIRK
from .._integrate import internal_rhs, time_direction
from .._radau import Radau5
from .._rosenbrock import Rosenbrock
from .._solution import DenseOutput, Status
from .._solver import Tolerances
from .._util import float0_zeros, select
from ._base import (
    AbstractSensitivity,
    combine,
    failure_scale,
    keep_present,
    loop_tangent,
    nan_if,
    prob_times,
    custom_solve_jvp,
    ProblemOp,
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
    and the state ``y`` at every ``stride``-th accepted step (rows ``0, 1, ...``)."""

    def __init__(self, solver, max_steps: int, stride: int, rows: int, tdtype):
        self.solver, self.max_steps, self.stride, self.rows, self.tdtype = solver, max_steps, stride, rows, tdtype
        self.stat_names = solver.stat_names

    def __getattr__(self, name):  # order, error_order, embedded, implicit, ...
        return getattr(self.solver, name)

    def dense_zeros(self, y0):
        return self.solver.dense_zeros(y0)

    def interpolate(self, h, y0, y1, dense, theta):
        return self.solver.interpolate(h, y0, y1, dense, theta)

    def init(self, f, t0, y0, f0):
        return (
            self.solver.init(f, t0, y0, f0),
            jnp.zeros((), jnp.int32),
            jnp.zeros((self.max_steps,), self.tdtype),
            jnp.zeros((self.max_steps,), self.tdtype),
            jnp.zeros((self.rows + 1,) + y0.shape, y0.dtype),  # last row: discarded writes
        )

    def step(self, f, t0, y0, h, state, tol):
        inner, count, t_buf, h_buf, y_buf = state
        res = self.solver.step(f, t0, y0, h, inner, tol)
        put = lambda buf, v, i: lax.dynamic_update_index_in_dim(buf, v.astype(buf.dtype), i, 0)
        t_buf = put(t_buf, t0, count)
        h_buf = put(h_buf, h, count)
        if self.stride == 1:
            row = count
        else:
            row = select(count % self.stride == 0, count // self.stride, self.rows)
        y_buf = put(y_buf, y0, row)
        accepted = (res.state, count + 1, t_buf, h_buf, y_buf)
        rejected = (res.rejected_state, count, t_buf, h_buf, y_buf)
        return res._replace(state=accepted, rejected_state=rejected)


def _memoryless(solver) -> bool:
    """Whether one step is a function of ``(t, y, h)`` alone that ``jax.vjp`` can differentiate:
    the state ``init`` builds from ``f(t, y)`` is what the loop carries (up to what only steers a
    Newton iteration: its Jacobian and starting values), and no Newton ``while_loop`` is
    differentiated (``Radau5`` differentiates its stages by the implicit function theorem)."""
    return isinstance(solver, (ExplicitRK, Rosenbrock, Radau5, SDIRK))


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

    The reverse pass first re-runs the forward solve, recording the accepted
    steps' times and sizes and the states (all of them, or checkpoints), then
    runs back through them.

    Args:
        checkpoints: how many states the reverse pass stores.

            * ``None``: the state at every accepted step (memory ``max_steps * n``).
            * An integer ``k``: every ``L = ceil(max_steps / k)``-th accepted step
              (evenly spaced in the step index); each segment of ``L`` steps is
              recomputed before running back through it: memory ``(k + L) * n``
              states, smallest near ``k = sqrt(max_steps)``, at the cost of one
              more forward step per step.
            * ``"recursive"``: recursive bisection (the simplest member of the
              family of Griewank's binomial checkpointing; Griewank and Walther,
              "Evaluating Derivatives", 2nd ed., ch. 12): to run back through
              steps ``[lo, hi)`` from the state at ``lo``, recompute the state at
              the midpoint, run back through the upper half, then through the
              lower half. At most ``ceil(log2(max_steps)) + 1`` states are stored
              (:func:`stored_states`), for about ``log2(N) / 2`` recomputed forward
              steps per step.

            Step times and sizes (two scalars per step) are always stored, so the
            recomputed steps repeat the forward pass's exactly.

    Supported solvers: every built-in one. Explicit Runge-Kutta and Rosenbrock
    steps are differentiated as they are; for ``Radau5`` and the SDIRK family the
    Newton-solved stages are differentiated by the implicit function theorem
    (``lax.custom_root``), the exact derivative at the computed stages. Other
    solvers raise ``NotImplementedError`` at trace time.
    """

    checkpoints: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        c = self.checkpoints
        if c is not None and c != "recursive" and (isinstance(c, bool) or not isinstance(c, int) or c < 1):
            raise ValueError(f"Direct: checkpoints must be None, a positive integer or 'recursive', got {c!r}")

    def check(self, prob):
        if not _memoryless(prob.opts.solver):
            raise NotImplementedError(
                f"Direct: reverse-mode differentiation is not implemented for "
                f"{type(prob.opts.solver).__name__}: it can replay explicit Runge-Kutta, Rosenbrock, "
                "Radau5 and SDIRK steps only. Use ForwardSensitivity or an adjoint method."
            )

    def tangent(self, loop, prob, r, x):
        return loop_tangent(loop, prob, r, x)

    def cotangent(self, loop, prob, r, ys_bar, x_struct):
        y0, ts, params, _ = r
        return keep_present(x_struct, _replay(self, loop, prob, y0, ts, params, ys_bar))


def stored_states(method: Direct, max_steps: int) -> int:
    """How many states of size ``n`` the reverse pass of ``method`` stores at most."""
    if method.checkpoints == "recursive":
        return _stack_depth(max_steps) + 1
    stride, rows = _layout(method, max_steps)
    return rows + (stride if stride > 1 else 0)


def _stack_depth(max_steps: int) -> int:
    """Pending segments of the recursive bisection: one per level, plus the one being split."""
    return max(1, math.ceil(math.log2(max(max_steps, 1)))) + 1


def _layout(method: Direct, max_steps: int) -> tuple[int, int]:
    """``(stride, rows)``: y is stored every ``stride`` accepted steps, in ``rows`` rows."""
    if method.checkpoints == "recursive":
        return max_steps, 1
    if method.checkpoints is None or method.checkpoints >= max_steps:
        return 1, max_steps
    stride = math.ceil(max_steps / method.checkpoints)
    return stride, math.ceil(max_steps / stride)


def _record(method, loop, f, y0, ts, args, opts):
    """The forward solve plus its record ``(t_buf, h_buf, y_buf)`` of the accepted steps."""
    stride, rows = _layout(method, opts.max_steps)
    rec = _Recorder(opts.solver, opts.max_steps, stride, rows, jnp.result_type(ts))
    ys, counters, _, state = loop(f, y0, ts, args, opts._replace(solver=rec, dense=False, return_state=True))
    _, _, t_buf, h_buf, y_buf = state
    return ys, counters, (t_buf, h_buf, y_buf)


def _replay(method, loop, prob, y0, ts, diff, ys_bar, pieces_bar=None):
    """``(dy0, dts, dparams)`` for the cotangent ``ys_bar``: the recorded steps, run backwards.

    ``pieces_bar`` (optional) holds cotangents of the dense output's rows
    ``(t_start, h, y0, y1, data)``: row ``k`` is accepted step ``k``.
    """
    static, f, opts = prob.static, prob.f, prob.opts
    ts_given = ts
    ts = prob.known_ts if ts is None else ts
    counters, (t_buf, h_buf, y_buf) = _record(method, loop, f, y0, ts, combine(diff, static), opts)[1:]
    ts = jnp.asarray(ts)
    solver = opts.solver
    stride, _ = _layout(method, opts.max_steps)
    dtype, tdtype = y0.dtype, ts.dtype
    n_ts = ts.shape[0]
    direction = time_direction(ts)
    s_ts = direction * ts
    tol = Tolerances.for_state(opts.rtol, opts.atol, opts.controller.norm, y0)
    num = counters[2]  # accepted steps
    fixed = opts.fixed

    def step_map(t, y, h, a):
        # The right-hand side exactly as the loop builds it.
        rhs = internal_rhs(f, combine(a, static), direction, dtype, opts.jac)
        state = solver.init(rhs, t, y, rhs(t, y))
        res = solver.step(rhs, t, y, h.astype(dtype), state, tol)
        return res.y1, res.dense

    def interp(t, h, s, y, y1, dense):
        theta = ((s - t) / h).astype(dtype)
        return solver.interpolate(h.astype(dtype), y, y1, dense, theta)

    def t_next(k):
        # End of step k: the next step's start, or the final time for the last one.
        nxt = lax.dynamic_index_in_dim(t_buf, jnp.minimum(k + 1, t_buf.shape[0] - 1), keepdims=False)
        return select(k + 1 >= num, s_ts[-1], nxt)

    def back_step(k, y, c):
        """Cotangents through step k (start y) and the saves it covers."""
        i, y_bar, t_bar, a_bar, s_bar = c
        t = t_buf[k]
        t1 = t_next(k)
        # The step that reaches a stop lands on it: h = stop - t depends on both.
        if fixed:
            j = i
            lands = s_ts[i] == t1
        else:
            j = n_ts - 1
            lands = k == num - 1
        h = h_buf[k]
        (y1, dense), vjp_step = jax.vjp(step_map, t, y, h, diff)

        def save_cond(sc):
            return (sc[0] >= 1) & (s_ts[sc[0]] > t)

        def save_body(sc):
            i, y_b, y1_b, d_b, t_b, h_b, s_b = sc
            s = s_ts[i]
            g = ys_bar[i]
            _, vjp_i = jax.vjp(interp, t, h, s, y, y1, dense)
            tb, hb, sb, yb, y1b, db = vjp_i(g)
            exact = s == t1  # the loop saves the step's end point itself
            z = lambda v: select(exact, jnp.zeros_like(v), v)
            return (i - 1, y_b + z(yb), y1_b + select(exact, g, y1b), d_b + z(db), t_b + z(tb), h_b + z(hb),
                    s_b.at[i].add(z(sb)))

        zero_t = jnp.zeros((), tdtype)
        sc = (i, jnp.zeros_like(y), y_bar, jnp.zeros_like(dense), zero_t, zero_t, s_bar)
        if pieces_bar is not None:
            pb = [lax.dynamic_index_in_dim(v, k, keepdims=False) for v in pieces_bar]
            sc = (i, pb[2].astype(dtype), y_bar + pb[3], pb[4], pb[0].astype(tdtype), pb[1].astype(tdtype), s_bar)
        i, y_b, y1_b, d_b, t_b, h_b, s_bar = lax.while_loop(save_cond, save_body, sc)
        tb, yb, hb, ab = vjp_step((y1_b, d_b))
        h_b = h_b + hb
        # t_{k+1} = stop if the step lands, else t_k + h_k (h_k a constant).
        t_b = t_b + tb + select(lands, -h_b, t_bar)
        s_bar = s_bar.at[j].add(select(lands, h_b + t_bar, zero_t))
        a_bar = jtu.tree_map(jnp.add, a_bar, ab)
        return (i, y_b + yb, t_b, a_bar, s_bar)

    def run_back(k_hi, k_lo, get_y, c):
        """Steps k_hi - 1 down to k_lo."""

        def cond(kc):
            return kc[0] > k_lo

        def body(kc):
            k = kc[0] - 1
            return (k,) + tuple(back_step(k, get_y(k), kc[1:]))

        return lax.while_loop(cond, body, (k_hi,) + tuple(c))[1:]

    zero_t = jnp.zeros((), tdtype)
    a_bar0 = jtu.tree_map(jnp.zeros_like, diff)
    c = (jnp.asarray(n_ts - 1, jnp.int32), jnp.zeros_like(y0), zero_t, a_bar0, jnp.zeros_like(s_ts))
    if method.checkpoints == "recursive":
        c = _bisect_back(num, y_buf[0], lambda k, y: step_map(t_buf[k], y, h_buf[k], diff)[0], back_step, c,
                         _stack_depth(opts.max_steps))
    elif stride == 1:
        c = run_back(num, 0, lambda k: y_buf[k], c)
    else:
        # Segments of `stride` steps, last first: recompute the segment's states
        # from its checkpoint, then run back through it.
        def seg_cond(gc):
            return gc[0] > 0

        def seg_body(gc):
            g = gc[0] - 1
            lo = g * stride
            hi = jnp.minimum(lo + stride, num)
            seg0 = jnp.zeros((stride,) + y0.shape, dtype).at[0].set(y_buf[g])

            def fwd(j, seg):
                k = lo + j - 1
                y1, _ = step_map(t_buf[k], seg[j - 1], h_buf[k], diff)
                return seg.at[j].set(y1)

            seg = lax.fori_loop(1, hi - lo, fwd, seg0)
            out = run_back(hi, lo, lambda k: seg[k - lo], gc[1:])
            return (g,) + tuple(out)

        num_seg = (num + stride - 1) // stride
        c = lax.while_loop(seg_cond, seg_body, (num_seg,) + tuple(c))[1:]
    _, y_bar, t_bar, a_bar, s_bar = c
    y_bar = y_bar + ys_bar[0]
    s_bar = s_bar.at[0].add(t_bar)
    ts_bar = (direction * s_bar).astype(ts.dtype)
    # A failed forward solve has no derivative: NaN cotangents (its status is returned).
    return nan_if(counters[0] != Status.SUCCESS, (y_bar, None if ts_given is None else ts_bar, a_bar))


def _bisect_back(num, y0, step, back_step, c, depth: int):
    """Run ``back_step`` over steps ``num - 1 ... 0`` by recursive bisection.

    A stack of pending segments ``[lo, hi)``, each with its start state. The top
    one is popped; a single step is run back; a longer one is split at its
    midpoint: the lower half is pushed back with the same start state, and the
    upper half on top of it with the midpoint state, recomputed by ``step``. The
    stack never holds more than one segment per level of the bisection.
    """
    n = y0.shape[0]
    ys = jnp.zeros((depth, n), y0.dtype).at[0].set(y0)
    lo = jnp.zeros((depth,), jnp.int32)
    hi = jnp.zeros((depth,), jnp.int32).at[0].set(num)
    top = jnp.where(num > 0, 1, 0).astype(jnp.int32)

    def cond(st):
        return st[0] > 0

    def body(st):
        top, ys, lo, hi, c = st
        j = top - 1
        y, a, b = ys[j], lo[j], hi[j]

        def run_one(_):
            return top - 1, ys, lo, hi, tuple(back_step(a, y, c))

        def split(_):
            mid = (a + b) // 2
            y_mid = lax.fori_loop(a, mid, lambda k, v: step(k, v), y)
            return (top + 1, ys.at[j + 1].set(y_mid), lo.at[j].set(a).at[j + 1].set(mid),
                    hi.at[j].set(mid).at[j + 1].set(b), c)

        return lax.cond(b - a == 1, run_one, split, None)

    return lax.while_loop(cond, body, (top, ys, lo, hi, tuple(c)))[4]


# ----------------------------------------------------------------------------
# Dense output: the accepted steps' interpolation data, differentiated by Direct.
# ----------------------------------------------------------------------------

#: The differentiable rows of a dense output, in this order.
_PIECE_FIELDS = ("t_start", "h", "y0", "y1", "data")


def _dense_outputs(ys, pieces):
    return (ys,) + tuple(getattr(pieces, k) for k in _PIECE_FIELDS)


class _DenseOp(ProblemOp):
    """Tangent of ``(ys, dense pieces)``: the loop's JVP forward, the step replay backwards."""

    def __init__(self, method: Direct, loop, prob_static, x_struct, out_struct):
        self.method, self.loop, self.prob_static, self.x_struct, self.out = method, loop, prob_static, x_struct, out_struct

    def apply(self, r, x):
        r, prob = self.unpack(r)
        return loop_tangent(self.loop, prob, r, x, outputs=lambda ys, counters, pieces: _dense_outputs(ys, pieces))

    def transpose(self, r, cts):
        (y0, ts, params, _), prob = self.unpack(r)
        ys_bar, *pieces_bar = cts
        out = _replay(self.method, self.loop, prob._replace(opts=prob.opts._replace(dense=False)),
                      y0, ts, params, ys_bar, pieces_bar)
        return keep_present(self.x_struct, out)

    def vjp_res(self, r, x, c):
        raise NotImplementedError(
            "Direct: reverse-over-reverse differentiation through dense output (Solution.evaluate) is not "
            "supported; use forward-over-reverse (jax.hessian, jax.jacfwd of jax.grad) instead."
        )

    def out_struct(self, r, x):
        return self.out


def dense_solve(method: Direct, loop, prob, y0, ts, params):
    """``(ys, counters, pieces)`` of ``loop`` with dense output, differentiable by ``method``'s rules
    (forward mode through the loop, reverse mode by the step replay; ``checkpoints`` apply)."""
    method.check(prob)
    opts = prob.opts._replace(dense=True)
    prob = prob._replace(opts=opts)

    def primal(prob, y0, ts, params):
        ys, counters, pieces = loop(prob.f, y0, prob_times(prob, ts), prob.args(params), prob.opts)
        return _dense_outputs(ys, pieces), counters, pieces.num_pieces

    def rule(prob, y0, ts, params, x, primal_call):
        outs, counters, num = primal_call(y0, ts, params)
        zero_out = (jtu.tree_map(jnp.zeros_like, outs), float0_zeros(counters), float0_zeros(num))
        if not jtu.tree_leaves(x):
            return (outs, counters, num), zero_out
        structs = jtu.tree_map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), outs)
        arrays, prob_static = split_problem(prob)
        op = _DenseOp(method, loop, prob_static, jtu.tree_map(lambda _: True, x), structs)
        douts = linear_map(op, (y0, ts, params, outs[0], arrays), x)
        scale = failure_scale(counters, prob.opts.throw, outs[0].dtype)
        douts = tuple(d * scale.astype(d.dtype) for d in douts)
        return (outs, counters, num), (douts, zero_out[1], zero_out[2])

    outs, counters, num = custom_solve_jvp(primal, prob, rule, y0, ts, params)
    ys, t_start, h, py0, py1, data = outs
    return ys, counters, DenseOutput(t_start, h, py0, py1, data, num, opts.solver.interpolate)
