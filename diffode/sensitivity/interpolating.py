"""Interpolating adjoint: the adjoint reads y(t) from the forward dense output."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array

from .._integrate import time_direction
from .._solution import DenseOutput, Status
from ._adjoint_common import AbstractAdjoint, adjoint_opts, rhs_vjp
from ._base import combine
from .direct import (
    DEFAULT_MEMORY_BUDGET,
    RECORD_STEPS,
    _memoryless,
    check_budget,
    record,
    record_layout,
    run_back,
    step_function,
)


def block_table(t_start: Array) -> Array:
    """``t_start`` padded with ``inf`` to a square ``(b, b)`` table, for :func:`evaluate`."""
    m = t_start.shape[0]
    b = max(1, int(np.ceil(np.sqrt(m))))
    return jnp.concatenate([t_start, jnp.full((b * b - m,), jnp.inf, t_start.dtype)]).reshape(b, b)


def locate(blocks: Array, s: Array) -> Array:
    """Index of the piece holding internal time ``s`` (``searchsorted(t_start, s) - 1``).

    A two-level count over the :func:`block_table` (first the blocks' first
    entries, then one block: ``2 sqrt(m)`` comparisons, no loop; a binary search
    would be a ``while_loop``).
    """
    b = blocks.shape[0]
    nb = jnp.sum(blocks[:, 0] < s)
    row = lax.dynamic_index_in_dim(blocks, jnp.maximum(nb - 1, 0), keepdims=False)
    return jnp.where(nb > 0, (nb - 1) * b + jnp.sum(row < s), 0) - 1


def dense_bytes(solver, y0: Array, ts: Array, max_steps: int) -> int:
    """Bytes of the dense output of ``max_steps`` steps from ``y0``: each piece's times,
    end points and interpolation data, twice (the loop's buffer and the copy that
    drops its row for discarded writes)."""
    data = jax.eval_shape(solver.dense_zeros, y0)
    piece = 2 * y0.size * y0.dtype.itemsize + data.size * data.dtype.itemsize
    piece += 2 * jnp.dtype(jnp.result_type(ts)).itemsize
    return 2 * (max_steps + 1) * piece


class InterpolatingAdjoint(AbstractAdjoint):
    """Continuous adjoint that reads ``y(t)`` from the forward solution's interpolant.

    The backward pass solves only

        lam' = -lam^T df/dy(t, y(t)),   mu' = -lam^T df/dp(t, y(t))

    from ``ts[-1]`` to ``ts[0]`` (one segment ``[ts[i], ts[i-1]]`` at a time, ``lam``
    jumping by ``dL/dys[i]`` at each save time), with ``y(t)`` the forward solver's
    dense output instead of a backward re-solve (the "interpolating adjoint" of
    Rackauckas et al. 2020, "Universal Differential Equations for Scientific
    Machine Learning", arXiv:2001.04385, Sec. B; the adjoint equations are those of
    Chen et al. 2018, "Neural Ordinary Differential Equations", Algorithm 1). The
    adjoint of a stable (even stiff) forward problem is stable backwards, so with
    an implicit solver this works on stiff problems where :class:`BacksolveAdjoint`
    does not. The backward solve uses the forward solver and tolerances (implicit
    solvers take the Jacobian of the adjoint system from ``jax.jacfwd``).

    Memory: the backward pass re-runs the forward solve and keeps the interpolant
    of every accepted step (``max_steps`` rows, a static size, of the solver's
    dense data) when that fits in ``memory_budget``. Otherwise it records the
    accepted steps as :class:`Direct` does within the budget (step times and sizes,
    and states: all, or checkpoints from which the others are recomputed) and
    recomputes each step's interpolant from its start state, last step first,
    just before the adjoint crosses it. The steps and so the gradient are the
    same either way (up to rounding), at the cost of one more step per step, plus
    the checkpoints' recomputation.

    Args:
        checkpoints: ``None`` keeps the whole forward solution (as above). An
            integer ``k`` keeps only the states at ``k + 1`` checkpoints chosen
            among the save times (``ts[0]``, ``ts[-1]`` and evenly spread indices
            in between; at most every save time). In the backward pass each
            checkpoint interval is re-solved forwards from its stored state (a
            fresh adaptive solve over the interval, so its steps differ slightly
            from the forward pass's; kept as above within ``memory_budget``) and
            then the adjoint is integrated over it. This costs one more forward
            solve and bounds the kept steps by ``checkpoint_max_steps``.
        checkpoint_max_steps: step budget of each re-solve; by default
            ``ceil(2 * max_steps / k)``, capped at ``max_steps``. A re-solve that
            runs out of steps makes every cotangent NaN.
        memory_budget: bytes the backward pass may keep of the forward solution
            (per solve: under ``vmap`` per batch member); default
            ``DEFAULT_MEMORY_BUDGET`` (1 GiB), ``None``: no limit. A budget too
            small for recomputation (see :class:`Direct`), or one that the dense
            output exceeds with a solver whose steps cannot be replayed, raises
            ``ValueError`` at trace time.

    Forward mode (``jax.jvp``, ``jax.jacfwd``) differentiates the solve loop itself.
    """

    checkpoints: int | None = None
    checkpoint_max_steps: int | None = None
    memory_budget: int | None = eqx.field(static=True, default=DEFAULT_MEMORY_BUDGET)
    failure_hint = " With checkpoints, the re-solves between them may need a larger checkpoint_max_steps."

    def __check_init__(self):
        if self.checkpoints is not None and (not isinstance(self.checkpoints, int) or self.checkpoints < 1):
            raise ValueError(
                f"InterpolatingAdjoint: checkpoints must be None or a positive integer, got {self.checkpoints!r}"
            )
        if self.checkpoint_max_steps is not None:
            if self.checkpoints is None:
                raise ValueError("InterpolatingAdjoint: checkpoint_max_steps needs checkpoints")
            if not isinstance(self.checkpoint_max_steps, int) or self.checkpoint_max_steps < 1:
                raise ValueError(
                    "InterpolatingAdjoint: checkpoint_max_steps must be a positive integer, "
                    f"got {self.checkpoint_max_steps!r}"
                )
        check_budget("InterpolatingAdjoint", self.memory_budget)

    def keeps_dense(self, solver, y0: Array, ts: Array, max_steps: int) -> bool:
        """Whether the backward pass reads the forward solve's dense output: always without
        a budget; with one, when the dense output of ``max_steps`` steps fits in it and
        ``max_steps`` is at most ``RECORD_STEPS`` (a larger one records a window of steps
        that does not grow with ``max_steps``, when the solver's steps can be replayed)."""
        if self.memory_budget is None:
            return True
        fits = dense_bytes(solver, y0, ts, max_steps) <= self.memory_budget
        return fits and (max_steps <= RECORD_STEPS or not _memoryless(solver))

    def _sweep(self, loop, prob, residual, ys, ys_bar, y0, ts, diff):
        sweep = _Sweep(self, loop, prob, ys_bar, y0, ts, diff)
        carry = (jnp.zeros_like(y0), jnp.zeros_like(sweep.mu0), jnp.asarray(Status.SUCCESS, jnp.int32))
        last = ts.shape[0] - 1
        if self.checkpoints is None:
            # The same solve as the primal's: its failure is the primal's (not a backward one).
            return sweep.interval(y0, ts, last, 0, prob.opts, carry, own_status=False)

        # Checkpoints: static indices into ts, ts[0] and ts[-1] included.
        marks = np.unique(np.round(np.linspace(0, last, min(self.checkpoints, last) + 1)).astype(np.int32))
        steps = self.checkpoint_max_steps
        if steps is None:
            steps = min(prob.opts.max_steps, -(-2 * prob.opts.max_steps // len(marks[1:])))
        resolve_opts = prob.opts._replace(max_steps=steps)
        marks = jnp.asarray(marks)

        def outer(j, c):
            i_lo, i_hi = marks[-2 - j], marks[-1 - j]
            return sweep.interval(ys[i_lo], jnp.stack([ts[i_lo], ts[i_hi]]), i_hi, i_lo, resolve_opts, c)

        return lax.fori_loop(0, marks.shape[0] - 1, outer, carry)


class _Sweep:
    """The backward sweep of :class:`InterpolatingAdjoint` for one cotangent ``ys_bar``."""

    def __init__(self, method, loop, prob, ys_bar, y0, ts, diff):
        self.method, self.loop, self.prob, self.ys_bar, self.ts, self.diff = (
            method,
            loop,
            prob,
            ys_bar,
            ts,
            diff,
        )
        self.n = y0.shape[0]
        self.mu0 = ravel_pytree(diff)[0].astype(y0.dtype)
        self.aug_opts = adjoint_opts(prob.opts)
        self.direction = time_direction(ts)
        self.args = combine(diff, prob.static)

    def interval(self, y_start, solve_ts, i_hi, i_lo, opts, carry, own_status=True):
        """``(lam, mu, status)`` at ``ts[i_lo]`` from those at ``ts[i_hi]``, reading y from a
        forward solve from ``y_start`` over ``solve_ts`` with ``opts`` (whose failure is the
        backward pass's with ``own_status``)."""
        lam, mu, status = carry
        start = (jnp.asarray(i_hi, jnp.int32), self.ts[i_hi], lam + self.ys_bar[i_hi], mu)

        def with_status(counters):
            return start + (
                jnp.where(status == Status.SUCCESS, counters[0], status) if own_status else status,
            )

        if self.method.keeps_dense(opts.solver, y_start, solve_ts, opts.max_steps):
            _, counters, dense = self.loop(
                self.prob.f, y_start, solve_ts, self.args, opts._replace(dense=True)
            )
            return self.over_dense(dense, i_lo, with_status(counters))[2:]
        return self.over_record(y_start, solve_ts, i_lo, opts, with_status)[2:]

    def over_record(self, y_start, solve_ts, i_lo, opts, with_status):
        """The adjoint down to ``ts[i_lo]`` over a recorded forward solve (laid out within
        the budget as :class:`Direct` does), each step's interpolant recomputed from its
        start state just before the adjoint crosses the step."""
        solver, f, diff = opts.solver, self.prob.f, self.diff
        if not _memoryless(solver):
            raise ValueError(
                f"InterpolatingAdjoint: the dense output of max_steps={opts.max_steps} steps takes "
                f"{dense_bytes(solver, y_start, solve_ts, opts.max_steps)} bytes, more than its memory_budget="
                f"{self.method.memory_budget} bytes, and keeping less needs steps that can be replayed, which "
                f"{type(solver).__name__} does not support. Raise memory_budget (None: no limit), lower "
                "max_steps (or checkpoint_max_steps), or use BacksolveAdjoint."
            )
        layout = record_layout(
            "InterpolatingAdjoint", None, self.method.memory_budget, y_start, solve_ts, opts
        )
        _, counters, (t_buf, h_buf, y_buf) = record(layout, self.loop, f, y_start, solve_ts, self.args, opts)
        step = step_function(self.prob, y_start, solve_ts)

        def back_step(k, y, c):
            y1, data = step(t_buf[k], y, h_buf[k], diff)
            piece = (t_buf[k], h_buf[k], y, y1, data)
            floor = jnp.where(k > 0, t_buf[k], -jnp.inf)  # the first step also covers anything before it

            def cond(c):
                return self.going(c, i_lo) & ((self.direction * c[1]).astype(floor.dtype) > floor)

            return lax.while_loop(cond, lambda c: self.stretch(piece, floor, i_lo, solver.interpolate, c), c)

        def next_y(k, y):
            return step(t_buf[k], y, h_buf[k], diff)[0]

        return run_back(layout, counters[2], y_buf, next_y, back_step, with_status(counters))

    def going(self, c, i_lo):
        return (c[0] > i_lo) & (c[4] == Status.SUCCESS)

    def over_dense(self, dense: DenseOutput, i_lo, c):
        """The adjoint down to ``ts[i_lo]``, reading y from ``dense``, one forward step at a time."""
        blocks = block_table(dense.t_start)
        sdt = dense.t_start.dtype

        def body(c):
            k = jnp.clip(
                locate(blocks, (self.direction * c[1]).astype(sdt)), 0, jnp.maximum(dense.num_pieces, 1) - 1
            )
            piece = tuple(
                lax.dynamic_index_in_dim(x, k, keepdims=False)
                for x in (dense.t_start, dense.h, dense.y0, dense.y1, dense.data)
            )
            # The first step also covers anything before it (clamped, as evaluate_flat).
            floor = jnp.where(k > 0, piece[0], -jnp.inf)
            return self.stretch(piece, floor, i_lo, dense.interpolate, c)

        return lax.while_loop(lambda c: self.going(c, i_lo), body, c)

    def stretch(self, piece, floor, i_lo, interpolate, c):
        """The adjoint from ``t_hi`` down to the next save time or to ``floor`` (the internal
        start of the forward step ``piece``), whichever comes first.

        Within a stretch ``y(t)`` is one step's interpolant (no search inside the
        right-hand side), and the stretch's length is a good first step for the
        backward solver (no initial step selection).
        """
        i, t_hi, lam, mu, status = c
        p_t, p_h, p_y0, p_y1, p_data = piece
        ts, direction, n, sdt = self.ts, self.direction, self.n, p_t.dtype
        t_next = ts[i - 1]
        reached = (direction * t_next).astype(sdt) >= floor
        t_lo = jnp.where(reached, t_next, (direction * floor).astype(ts.dtype))
        hy = p_h.astype(p_y0.dtype)
        p_end = p_t + p_h
        f = self.prob.f

        def aug(t, z, a):
            d, st = a
            s_t = (direction * t).astype(sdt)
            theta = ((s_t - p_t) / jnp.where(p_h == 0, 1, p_h)).astype(p_y0.dtype)
            y = jnp.where(s_t == p_end, p_y1, interpolate(hy, p_y0, p_y1, p_data, theta))
            _, a_y, a_p = rhs_vjp(f, t, y, z[:n], d, st)
            return jnp.concatenate([-a_y, -a_p])

        # (A zero-length stretch, between repeated save times, takes no step; dt0 only must not be 0.)
        stretch_opts = (
            self.aug_opts
            if self.aug_opts.fixed
            else self.aug_opts._replace(dt0=jnp.where(t_lo == t_hi, 1, t_lo - t_hi).astype(t_hi.dtype))
        )
        z = jnp.concatenate([lam, mu])
        zs, counters, _ = self.loop(
            aug, z, jnp.stack([t_hi, t_lo]), (self.diff, self.prob.static), stretch_opts
        )
        status = jnp.where(status == Status.SUCCESS, counters[0], status)
        i = i - reached.astype(i.dtype)
        jump = jnp.where(reached & (i > i_lo), self.ys_bar[i], 0)
        return i, t_lo, zs[1, :n] + jump, zs[1, n:], status
