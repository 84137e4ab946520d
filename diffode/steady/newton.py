"""Newton's method with a backtracking line search (the default steady-state method)."""

from __future__ import annotations

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp

from .._util import select
from ..solvers.linear import LU, AbstractLinearSolver
from ._base import AbstractSteadyStateMethod, counters, jacobian_operator, linear_solve, max_abs
from ._result import SteadyStateStatus as S


class Newton(AbstractSteadyStateMethod):
    """Newton's method on ``f(t, y, args) = 0``, globalised by a backtracking line search.

    Each iteration solves ``J delta = -f`` and takes ``y + lam delta``, with the
    largest ``lam`` in ``1, ...`` that passes the Armijo test on the merit
    function ``phi = |f|_2^2 / 2``::

        phi(y + lam delta) <= (1 - 2 c lam) phi(y),

    since ``phi'(0) = -2 phi`` along a Newton direction. Rejected ``lam`` are
    replaced by the minimiser of the quadratic that interpolates ``phi(0)``,
    ``phi'(0)`` and ``phi(lam)``, kept within ``[lam / 10, lam / 2]`` (Dennis and
    Schnabel, "Numerical Methods for Unconstrained Optimization and Nonlinear
    Equations", 1996, section 6.3 and Algorithm A6.3.1). Convergence is
    quadratic near a regular root.

    Args:
        linear_solver: :class:`diffode.LU` (dense Jacobian from ``jax.jacfwd``)
            or :class:`diffode.GMRES` (matrix-free, inexact Newton: ``J v`` from
            ``jax.jvp``). Also used for the implicit-function derivative.
        linesearch: ``False`` takes full Newton steps.
        armijo: the sufficient-decrease constant ``c``.
        min_lambda: the line search gives up (status ``NO_PROGRESS``) below this.
    """

    linear_solver: AbstractLinearSolver = LU()
    linesearch: bool = eqx.field(static=True, default=True)
    armijo: float = eqx.field(static=True, default=1e-4)
    min_lambda: float = eqx.field(static=True, default=1e-10)
    default_max_steps = 100

    def __check_init__(self):
        if not isinstance(self.linear_solver, AbstractLinearSolver):
            raise TypeError(
                f"Newton: linear_solver must be a diffode linear solver, got {self.linear_solver!r}"
            )
        if not 0 < self.armijo < 0.5:
            raise ValueError(f"Newton: armijo must lie in (0, 0.5), got {self.armijo}")
        if not 0 < self.min_lambda < 1:
            raise ValueError(f"Newton: min_lambda must lie in (0, 1), got {self.min_lambda}")

    def find(self, g, y0, tol, max_steps):
        dtype = y0.dtype
        ls = self.linear_solver
        jac_per_iter = int(ls.forms_jacobian)

        def phi_of(fy):
            return 0.5 * jnp.sum(fy * fy)

        f0 = g(y0)
        r0 = max_abs(f0)
        status0 = select(~jnp.isfinite(r0), S.NONFINITE_RHS, select(r0 <= tol, S.SUCCESS, -1))
        # carry: iteration, y, f(y), phi(y), status (-1: running), counters
        init = (
            jnp.asarray(0, jnp.int32),
            y0,
            f0,
            phi_of(f0),
            status0.astype(jnp.int32),
            counters(num_fevals=1),
        )

        def line_search(y, delta, phi, lam0):
            # carry: lam, y_t, f_t, phi_t, accepted, any finite trial, evaluations
            def cond(c):
                return ~c[4] & (c[0] >= self.min_lambda)

            def body(c):
                lam, _, _, _, _, any_finite, nev = c
                y_t = y + lam * delta
                f_t = g(y_t)
                phi_t = phi_of(f_t)
                finite = jnp.isfinite(phi_t)
                ok = finite & (phi_t <= (1 - 2 * self.armijo * lam) * phi)
                # Minimiser of q(l) = phi - 2 phi l + a l^2 with q(lam) = phi_t, safeguarded.
                denom = phi_t - phi + 2 * phi * lam
                lam_q = select(finite & (denom > 0), phi * lam * lam / select(denom > 0, denom, 1), 0.1 * lam)
                lam_next = jnp.clip(lam_q, 0.1 * lam, 0.5 * lam)
                return (select(ok, lam, lam_next), y_t, f_t, phi_t, ok, any_finite | finite, nev + 1)

            no = jnp.asarray(False)
            c = (lam0.astype(dtype), y, jnp.zeros_like(y), phi, no, no, jnp.asarray(0, jnp.int32))
            if not self.linesearch:
                c = body(c)
                return c[1], c[2], c[3], c[5], c[5], c[6], jnp.asarray(0, jnp.int32)
            _, y_t, f_t, phi_t, ok, any_finite, nev = lax.while_loop(cond, body, c)
            return y_t, f_t, phi_t, ok, any_finite, nev, nev - 1

        def body(c):
            k, y, fy, phi, _, cnt = c
            delta, solved = linear_solve(ls, jacobian_operator(g, y, linear_solver=ls), -fy)
            y_t, f_t, phi_t, ok, any_finite, nev, nback = line_search(y, delta, phi, select(solved, 1.0, 0.0))
            ok = solved & ok
            r = max_abs(f_t)
            k1 = k + 1
            status = select(
                ~solved,
                S.SINGULAR_JACOBIAN,
                select(
                    ~any_finite,
                    S.NONFINITE_RHS,
                    select(
                        ~ok,
                        S.NO_PROGRESS,
                        select(r <= tol, S.SUCCESS, select(k1 >= max_steps, S.MAX_STEPS_REACHED, -1)),
                    ),
                ),
            ).astype(jnp.int32)
            cnt = cnt + counters(
                num_iterations=1,
                num_fevals=select(solved, nev, 0),
                num_jac_evals=jac_per_iter,
                num_linear_solves=1,
                num_rejected=select(solved, nback, 0),
            )
            y, fy, phi = select(ok, y_t, y), select(ok, f_t, fy), select(ok, phi_t, phi)
            return k1, y, fy, phi, status, cnt

        _, y, _, _, status, cnt = lax.while_loop(lambda c: c[4] < 0, body, init)
        return y, status, cnt
