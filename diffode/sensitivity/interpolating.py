"""Interpolating adjoint: the adjoint reads y(t) from the forward dense output."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree
from jaxtyping import Array

from .._integrate import time_direction
from .._solution import DenseOutput, Status
from ._adjoint_common import AbstractAdjoint, adjoint_opts, rhs_vjp
from ._base import combine


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

    Memory: the forward pass keeps every accepted step's interpolant, i.e.
    ``max_steps`` rows (static size) of the solver's dense data.

    Args:
        checkpoints: ``None`` keeps the whole dense output. An integer ``k``
            keeps only the states at ``k + 1`` checkpoints chosen among the save
            times (``ts[0]``, ``ts[-1]`` and evenly spread indices in between; at
            most every save time). In the backward pass each checkpoint interval
            is re-solved forwards from its stored state with dense output (a fresh
            adaptive solve over the interval, so its steps differ slightly from the
            forward pass's) and then the adjoint is integrated over it. This costs
            one more forward solve and bounds the dense memory by
            ``checkpoint_max_steps`` rows.
        checkpoint_max_steps: step budget (and dense rows) of each re-solve; by
            default ``ceil(2 * max_steps / k)``, capped at ``max_steps``. A re-solve
            that runs out of steps makes every cotangent NaN.

    Forward mode (``jax.jvp``, ``jax.jacfwd``) differentiates the solve loop itself.
    """

    checkpoints: int | None = None
    checkpoint_max_steps: int | None = None
    failure_hint = " With checkpoints, the re-solves between them may need a larger checkpoint_max_steps."

    def __check_init__(self):
        if self.checkpoints is not None and (not isinstance(self.checkpoints, int) or self.checkpoints < 1):
            raise ValueError(f"InterpolatingAdjoint: checkpoints must be None or a positive integer, got {self.checkpoints!r}")
        if self.checkpoint_max_steps is not None:
            if self.checkpoints is None:
                raise ValueError("InterpolatingAdjoint: checkpoint_max_steps needs checkpoints")
            if not isinstance(self.checkpoint_max_steps, int) or self.checkpoint_max_steps < 1:
                raise ValueError(
                    "InterpolatingAdjoint: checkpoint_max_steps must be a positive integer, "
                    f"got {self.checkpoint_max_steps!r}"
                )

    def _forward(self, loop, prob, y0, ts, params):
        if self.checkpoints is None:
            return loop(prob.f, y0, ts, prob.args(params), prob.opts._replace(dense=True))[2]
        return None

    def _sweep(self, loop, prob, residual, ys, ys_bar, y0, ts, diff):
        f, static, opts = prob.f, prob.static, prob.opts
        n = y0.shape[0]
        mu0 = ravel_pytree(diff)[0].astype(y0.dtype)
        aug_opts = adjoint_opts(opts)
        direction = time_direction(ts)

        def adjoint_over(dense: DenseOutput, i_hi, i_lo, carry):
            """Adjoint from ts[i_hi] down to ts[i_lo], reading y from ``dense``.

            The backward solve goes one forward step at a time: each stretch ends
            at the start of the forward step holding its upper end or at the next
            save time, whichever comes first. Within a stretch ``y(t)`` is one
            step's interpolant (no search inside the right-hand side), and the
            stretch's length is a good first step for the backward solver (no
            initial step selection).
            """
            blocks = block_table(dense.t_start)
            sdt = dense.t_start.dtype

            def cond(c):
                return (c[0] > i_lo) & (c[4] == Status.SUCCESS)

            def body(c):
                i, t_hi, lam, mu, status = c
                k = jnp.clip(locate(blocks, (direction * t_hi).astype(sdt)), 0, jnp.maximum(dense.num_pieces, 1) - 1)
                p_t, p_h, p_y0, p_y1, p_data = (
                    lax.dynamic_index_in_dim(x, k, keepdims=False)
                    for x in (dense.t_start, dense.h, dense.y0, dense.y1, dense.data)
                )
                # The first step also covers anything before it (clamped, as evaluate_flat).
                s_floor = jnp.where(k > 0, p_t, -jnp.inf)
                t_next = ts[i - 1]
                reached = (direction * t_next).astype(sdt) >= s_floor
                t_lo = jnp.where(reached, t_next, (direction * s_floor).astype(ts.dtype))
                hy = p_h.astype(p_y0.dtype)
                p_end = p_t + p_h

                def aug(t, z, a):
                    d, st = a
                    s_t = (direction * t).astype(sdt)
                    theta = ((s_t - p_t) / jnp.where(p_h == 0, 1, p_h)).astype(p_y0.dtype)
                    y = jnp.where(s_t == p_end, p_y1, dense.interpolate(hy, p_y0, p_y1, p_data, theta))
                    _, a_y, a_p = rhs_vjp(f, t, y, z[:n], d, st)
                    return jnp.concatenate([-a_y, -a_p])

                stretch_opts = aug_opts if aug_opts.fixed else aug_opts._replace(dt0=t_lo - t_hi)
                z = jnp.concatenate([lam, mu])
                zs, counters, _ = loop(aug, z, jnp.stack([t_hi, t_lo]), (diff, static), stretch_opts)
                status = jnp.where(status == Status.SUCCESS, counters[0], status)
                i = i - reached.astype(i.dtype)
                jump = jnp.where(reached & (i > i_lo), ys_bar[i], 0)
                return i, t_lo, zs[1, :n] + jump, zs[1, n:], status

            lam, mu, status = carry
            i_hi = jnp.asarray(i_hi, jnp.int32)
            c = (i_hi, ts[i_hi], lam + ys_bar[i_hi], mu, status)
            _, _, lam, mu, status = lax.while_loop(cond, body, c)
            return lam, mu, status

        carry = (jnp.zeros_like(y0), jnp.zeros_like(mu0), jnp.asarray(Status.SUCCESS, jnp.int32))
        last = ts.shape[0] - 1
        if self.checkpoints is None:
            return adjoint_over(residual, last, 0, carry)

        # Checkpoints: static indices into ts, ts[0] and ts[-1] included.
        marks = np.unique(np.round(np.linspace(0, last, min(self.checkpoints, last) + 1)).astype(np.int32))
        steps = self.checkpoint_max_steps
        if steps is None:
            steps = min(opts.max_steps, -(-2 * opts.max_steps // len(marks[1:])))
        resolve_opts = opts._replace(dense=True, max_steps=steps)
        marks = jnp.asarray(marks)

        def outer(j, c):
            lam, mu, status = c
            i_lo, i_hi = marks[-2 - j], marks[-1 - j]
            pair = jnp.stack([ts[i_lo], ts[i_hi]])
            _, counters, dense = loop(f, ys[i_lo], pair, combine(diff, static), resolve_opts)
            status = jnp.where(status == Status.SUCCESS, counters[0], status)
            return adjoint_over(dense, i_hi, i_lo, (lam, mu, status))

        return lax.fori_loop(0, marks.shape[0] - 1, outer, carry)

