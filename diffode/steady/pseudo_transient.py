"""Pseudo-transient continuation: implicit Euler steps in pseudo-time with growing step sizes."""

from __future__ import annotations

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp

from .._util import select
from ..solvers.linear import LU, AbstractLinearSolver
from ._base import AbstractSteadyStateMethod, counters, jacobian_operator, linear_solve, max_abs
from ._result import SteadyStateStatus as S


class PseudoTransient(AbstractSteadyStateMethod):
    """Pseudo-transient continuation (PTC) with switched evolution relaxation.

    Follows ``y' = f(y)`` towards a stable steady state with one linearised
    implicit Euler step per iteration,

        (I / dt - J) delta = f(y),    y <- y + delta,

    and grows the pseudo-time step as the residual falls,
    ``dt <- dt |f(y_old)|_2 / |f(y_new)|_2`` (Mulder and van Leer, 1985; Kelley and
    Keyes, "Convergence analysis of pseudo-transient continuation", SIAM J.
    Numer. Anal. 35(2), 1998). Small ``dt`` makes it an accurate transient, and
    large ``dt`` turns it into Newton's method with fast local convergence. It
    reaches steady states that Newton from ``y0`` misses, and non-isolated ones
    (conservation laws), whose derivative however does not exist.

    A step whose linear solve or new residual is not finite is retried with
    ``dt / 4``; residual growth is allowed (the transient may overshoot), with
    ``dt`` shrinking by at most 10x per step. The iteration stops when ``dt``
    becomes too small to move ``y``.

    Args:
        linear_solver: :class:`diffode.LU` or :class:`diffode.GMRES`.
        dt0: first pseudo-time step; ``None`` takes ``0.01 (1 + max|y0|) / max|f(y0)|``
            (a first step that moves ``y`` by about 1%).
        dt_max: upper bound on the pseudo-time step.
    """

    linear_solver: AbstractLinearSolver = LU()
    dt0: float | None = eqx.field(static=True, default=None)
    dt_max: float = eqx.field(static=True, default=1e30)
    default_max_steps = 1000

    def __check_init__(self):
        if not isinstance(self.linear_solver, AbstractLinearSolver):
            raise TypeError(
                f"PseudoTransient: linear_solver must be a diffode linear solver, got {self.linear_solver!r}"
            )
        if self.dt0 is not None and not (0 < self.dt0 < float("inf")):
            raise ValueError(f"PseudoTransient: dt0 must be positive and finite, got {self.dt0}")
        if not self.dt_max > 0:
            raise ValueError(f"PseudoTransient: dt_max must be positive, got {self.dt_max}")

    def find(self, g, y0, tol, max_steps):
        dtype = y0.dtype
        ls = self.linear_solver
        jac_per_iter = int(ls.forms_jacobian)
        tiny = jnp.finfo(dtype).tiny
        f0 = g(y0)
        r0 = max_abs(f0)
        if self.dt0 is None:
            dt0 = 0.01 * (1 + max_abs(y0)) / jnp.maximum(r0, tiny)
        else:
            dt0 = jnp.asarray(self.dt0, dtype)
        dt0 = jnp.minimum(dt0, self.dt_max).astype(dtype)
        dt_floor = jnp.finfo(dtype).eps * dt0
        status0 = select(~jnp.isfinite(r0), S.NONFINITE_RHS, select(r0 <= tol, S.SUCCESS, -1))
        # carry: iteration, y, f(y), |f(y)|_2, dt, last rejection was non-finite, status (-1: running), counters
        init = (
            jnp.asarray(0, jnp.int32),
            y0,
            f0,
            jnp.linalg.norm(f0),
            dt0,
            jnp.asarray(False),
            status0.astype(jnp.int32),
            counters(num_fevals=1),
        )

        def body(c):
            k, y, fy, nf, dt, saw_nan, _, cnt = c
            delta, solved = linear_solve(ls, jacobian_operator(g, y, 1 / dt, ls), fy)
            y_t = y + delta
            f_t = g(y_t)
            nf_t = jnp.linalg.norm(f_t)
            finite = jnp.isfinite(nf_t)
            ok = solved & finite
            ratio = jnp.clip(nf / jnp.maximum(nf_t, tiny), 0.1, jnp.inf)
            dt_new = jnp.minimum(select(ok, dt * ratio, dt / 4), self.dt_max)
            # Stuck: the step no longer moves y (dt too small), or dt has collapsed.
            stuck = (ok & jnp.all(y_t == y)) | (dt_new < dt_floor)
            saw_nan = select(ok, saw_nan, solved & ~finite)
            y, fy, nf = select(ok, y_t, y), select(ok, f_t, fy), select(ok, nf_t, nf)
            r = max_abs(fy)
            k1 = k + 1
            why_stuck = select(saw_nan, S.NONFINITE_RHS, select(solved, S.NO_PROGRESS, S.SINGULAR_JACOBIAN))
            status = select(
                ok & (r <= tol),
                S.SUCCESS,
                select(stuck, why_stuck, select(k1 >= max_steps, S.MAX_STEPS_REACHED, -1)),
            ).astype(jnp.int32)
            cnt = cnt + counters(
                num_iterations=1,
                num_fevals=1,
                num_jac_evals=jac_per_iter,
                num_linear_solves=1,
                num_rejected=select(ok, 0, 1),
            )
            return k1, y, fy, nf, dt_new, saw_nan, status, cnt

        _, y, _, _, _, _, status, cnt = lax.while_loop(lambda c: c[6] < 0, body, init)
        return y, status, cnt
