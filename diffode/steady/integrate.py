"""Steady states by integrating the ODE until it stops moving."""

from __future__ import annotations

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp

from .._controller import PIDController
from .._integrate import IntegrateOptions, integrate
from .._solution import Status
from .._util import select
from ..solvers.base import AbstractSolver
from ..solvers.linear import LU, AbstractLinearSolver
from ..solvers.rosenbrock import Rodas5P
from ._base import AbstractSteadyStateMethod, counters, max_abs
from ._result import STAT_NAMES
from ._result import SteadyStateStatus as S


class IntegrateToSteady(AbstractSteadyStateMethod):
    """Integrate ``y' = f(t_fixed, y, args)`` with the ODE solvers until ``max|f| <= tol``.

    The solve runs in stretches of pseudo-time ``t1, 4 t1, 16 t1, ...``, each one
    an adaptive solve (the solve loop of :func:`diffode.solve`) from the end of
    the last, with the residual checked after each; ``max_steps`` bounds the
    number of stretches. It finds the stable steady state that the dynamics
    actually reach from ``y0`` (as SciMLSensitivity's ``DynamicSS``), at the cost
    of a whole transient. The default solver is L-stable (``Rodas5P``), so its
    steps can grow without bound as the solution settles.

    Args:
        solver: any diffode ODE solver with an error estimate.
        rtol, atol: the ODE solve's tolerances.
        t1: the first stretch's length.
        max_ode_steps: bound on attempted ODE steps per stretch.
        linear_solver: for the implicit-function derivative only.
    """

    solver: AbstractSolver = Rodas5P()
    rtol: float = eqx.field(static=True, default=1e-8)
    atol: float = eqx.field(static=True, default=1e-10)
    t1: float = eqx.field(static=True, default=1.0)
    max_ode_steps: int = eqx.field(static=True, default=4096)
    linear_solver: AbstractLinearSolver = LU()
    default_max_steps = 40

    def __check_init__(self):
        if not isinstance(self.solver, AbstractSolver) or not self.solver.embedded:
            raise TypeError(
                f"IntegrateToSteady: solver must be a diffode solver with an error estimate, got {self.solver!r}"
            )
        if not (self.rtol >= 0 and self.atol >= 0 and self.rtol + self.atol > 0):
            raise ValueError(f"IntegrateToSteady: bad tolerances rtol={self.rtol}, atol={self.atol}")
        if not 0 < self.t1 < float("inf"):
            raise ValueError(f"IntegrateToSteady: t1 must be positive and finite, got {self.t1}")
        if not isinstance(self.max_ode_steps, int) or self.max_ode_steps < 1:
            raise ValueError(
                f"IntegrateToSteady: max_ode_steps must be a positive integer, got {self.max_ode_steps}"
            )

    def find(self, g, y0, tol, max_steps):
        dtype = y0.dtype
        opts = IntegrateOptions(
            solver=self.solver,
            controller=PIDController(),
            rtol=self.rtol,
            atol=self.atol,
            dt0=None,
            fixed=False,
            max_steps=self.max_ode_steps,
        )

        def autonomous(t, y, args):
            return g(y)

        f0 = g(y0)
        r0 = max_abs(f0)
        status0 = select(~jnp.isfinite(r0), S.NONFINITE_RHS, select(r0 <= tol, S.SUCCESS, -1))
        init = (
            jnp.asarray(0, jnp.int32),
            y0,
            jnp.asarray(self.t1, dtype),
            status0.astype(jnp.int32),
            counters(num_fevals=1),
        )
        at = {name: i for i, name in enumerate(STAT_NAMES)}

        def body(c):
            k, y, span, _, cnt = c
            ts = jnp.stack([jnp.zeros((), dtype), span])
            ys, ode, _ = integrate(autonomous, y, ts, None, opts, f0=g(y))
            # ode = [status, num_steps, num_accepted, num_rejected, num_fevals, ...]
            y_end = ys[-1]
            r = max_abs(g(y_end))
            k1 = k + 1
            failed = ode[0] != Status.SUCCESS
            status = select(
                failed,
                S.ODE_FAILED,
                select(r <= tol, S.SUCCESS, select(k1 >= max_steps, S.MAX_STEPS_REACHED, -1)),
            ).astype(jnp.int32)
            cnt = cnt + counters(
                num_iterations=1, num_fevals=ode[4] + 2, num_rejected=ode[3], num_ode_steps=ode[1]
            )
            cnt = cnt.at[at["ode_status"]].set(ode[0])
            return k1, select(failed, y, y_end), 4 * span, status, cnt

        _, y, _, status, cnt = lax.while_loop(lambda c: c[3] < 0, body, init)
        return y, status, cnt
