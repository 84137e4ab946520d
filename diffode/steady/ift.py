"""Derivatives of a steady state by the implicit function theorem.

At a regular root ``f(y*(p), p) = 0``, differentiating gives
``J dy* + (df/dp) dp = 0`` with ``J = df/dy`` at ``(y*, p)``, so

    dy* = -J^{-1} (df/dp) dp

(Krantz and Parks, "The Implicit Function Theorem", 2002, Theorem 3.3.1). The
root finder's iterations are never differentiated: its result enters only as the
point where the linear system is built.

The rule is a JVP, linear in ``dp``, whose linear solve is a
``jax.lax.custom_linear_solve``. JAX transposes it for reverse mode (the solve
with ``J^T``), differentiates it again for second derivatives, and batches it
under ``vmap``. Every solve, including those of second derivatives, reuses one
factorisation of ``J`` at ``(y*, p)``: ``custom_linear_solve`` differentiates
only the operator (``J v`` by ``jax.jvp``), never the solver, which is the
single-factorisation Hessian of the F-1 method (Pasquier and Primeau, "The F-1
algorithm for efficient computation of the Hessian matrix of an objective
function defined implicitly by the solution of a steady-state problem", SIAM
J. Sci. Comput. 41(3), 2019).

A failed root has no derivative: its tangent is multiplied by
:func:`failure_scale`, NaN on failure, which with ``throw=True`` also carries the
error check. The check is then part of the derivative's data flow, so no
transformation can drop it (under ``jit``, a program that uses only derivatives
keeps it), and JAX transposes the product into NaN cotangents.
"""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._util import check_status, float0_zeros, select
from .._util import failure_scale as status_scale
from ..solvers.linear import AbstractLinearSolver
from ._base import AbstractSteadyStateMethod, jacobian_operator, max_abs
from ._result import SINGULAR_DERIVATIVE_MESSAGE, STEADY_STATE_MESSAGE_LIST
from ._result import SteadyStateStatus as S

#: ``g(y, theta, other)``: the right-hand side on flat states; ``theta`` holds the
#: differentiated inputs, ``other`` the rest.
Residual = Callable[[Float[Array, " n"], Any, Any], Float[Array, " n"]]


def failure_scale(status: Array, throw: bool, dtype) -> Array:
    """:func:`diffode._util.failure_scale` of a steady state's status."""
    return status_scale(status, throw, dtype, STEADY_STATE_MESSAGE_LIST)


def ift_tangent(
    g: Residual,
    linear_solver: AbstractLinearSolver,
    y: Array,
    theta: Any,
    other: Any,
    dtheta: Any,
    throw: bool,
    converged: Array,
) -> Array:
    """``dy* = -J^{-1} (dg/dtheta) dtheta`` at the root ``y`` (see the module docstring).

    A failed linear solve gives NaN, and raises when ``throw`` and the root
    ``converged`` (a failed root raises its own error in :func:`failure_scale`).
    """
    rhs = jax.jvp(lambda th: g(y, th, other), (theta,), (dtheta,))[1]
    matvec = jacobian_operator(lambda v: g(v, theta, other), y).mv
    # The factorisation is built from constants, so no derivative of it is ever
    # formed; it only has to invert the operator that matvec applies.
    y0, theta0 = lax.stop_gradient((y, theta))
    op = jacobian_operator(lambda v: g(v, theta0, other), y0, linear_solver=linear_solver)
    state = linear_solver.init(op)

    def checked(x, ok):
        x = jnp.where(ok, x, jnp.nan)
        return eqx.error_if(x, ~ok & converged, SINGULAR_DERIVATIVE_MESSAGE) if throw else x

    def solve(_, b):
        return checked(*linear_solver.compute(state, op, b))

    def transpose_solve(_, b):
        return checked(*linear_solver.compute(state, op, b, transpose=True))

    return lax.custom_linear_solve(matvec, -rhs, solve, transpose_solve)


def find_root(
    method: AbstractSteadyStateMethod,
    g: Residual,
    y0: Array,
    theta: Any,
    other: Any,
    tol: Array,
    bad: Array,
    max_steps: int,
    throw: bool,
) -> tuple[Array, Array, Array, Array]:
    """``(y*, status, counters, residual)``, not differentiable, raising on failure when ``throw``.

    ``bad`` is a status code for bad input, 0 for none: the method then starts
    converged (``tol = inf``) and ``bad`` becomes the status. A failed ``y*`` is
    NaN; ``residual`` is ``max|g|`` at the method's last iterate (NaN for bad input).
    """
    y, status, cnt = method.find(lambda y: g(y, theta, other), y0, select(bad == 0, tol, jnp.inf), max_steps)
    status = select(bad == 0, status, bad)
    residual = select(bad == 0, max_abs(g(y, theta, other)), jnp.nan)
    y = select(status == S.SUCCESS, y, jnp.full_like(y, jnp.nan))
    out = (y, status, cnt, residual)
    return check_status(out, status, STEADY_STATE_MESSAGE_LIST) if throw else out


def implicit_root(
    method: AbstractSteadyStateMethod,
    g: Residual,
    y0: Array,
    theta: Any,
    other: Any,
    tol: Array,
    bad: Array,
    max_steps: int,
    throw: bool,
) -> tuple[Array, Array, Array, Array]:
    """:func:`find_root`, differentiable in ``theta`` by :func:`ift_tangent` times :func:`failure_scale`.

    ``y*`` does not depend on ``y0`` (an isolated root does not move when the
    initial guess does), so ``y0`` gets no derivative; nor does the residual.
    """

    @jax.custom_jvp
    def root(y0, theta, other, tol, bad):
        return find_root(method, g, y0, theta, other, tol, bad, max_steps, throw)

    @root.defjvp
    def root_jvp(primals, tangents):
        _, theta, other, _, _ = primals
        y, status, cnt, residual = out = root(*primals)
        dy = ift_tangent(g, method.linear_solver, y, theta, other, tangents[1], throw, status == S.SUCCESS)
        dy = dy * failure_scale(status, throw, y.dtype)
        return out, (dy, float0_zeros(status), float0_zeros(cnt), jnp.zeros_like(residual))

    return root(lax.stop_gradient(y0), theta, other, tol, bad)
