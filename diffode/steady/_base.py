"""What every steady-state method implements, and the pieces they share."""

from __future__ import annotations

from typing import Callable, ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ..solvers.base import FlatRHS
from ..solvers.linear import AbstractLinearSolver, ShiftedJacobian
from ._result import STAT_NAMES

#: ``g(y)``: the right-hand side at the fixed ``t`` and ``args``, on flat states.
Residual = Callable[[Float[Array, " n"]], Float[Array, " n"]]


class AbstractSteadyStateMethod(eqx.Module):
    """How :func:`diffode.steady_state` finds a root of ``f``.

    A method maps the flat problem to the root, its status code and the
    counter vector (in the order of ``SteadyState.stats``)::

        y, status, counters = method.find(g, y0, tol, max_steps)

    ``g(y)`` is ``f`` at the fixed time and arguments on flat ``(n,)`` states.
    The method is never differentiated: derivatives of the root come from the
    implicit function theorem, with :attr:`linear_solver` solving the linear
    systems with ``df/dy`` at the root.
    """

    linear_solver: eqx.AbstractVar[AbstractLinearSolver]
    default_max_steps: ClassVar[int] = 100

    def find(
        self, g: Residual, y0: Float[Array, " n"], tol: Array, max_steps: int
    ) -> tuple[Float[Array, " n"], Int[Array, ""], Int[Array, " k"]]:
        raise NotImplementedError


def jacobian_operator(
    g: Residual, y: Array, shift: Array | None = None, linear_solver: AbstractLinearSolver | None = None
) -> ShiftedJacobian:
    """``A = shift I - J`` (``A = J`` when ``shift`` is ``None``), ``J = dg/dy(y)``, as an
    operator of :mod:`diffode.solvers.linear`. With ``linear_solver``, ``J`` is kept as that
    solver keeps it (:class:`~diffode.LU`: formed with ``jax.jacfwd``); without, the
    operator only offers products (one ``jax.jvp`` or ``jax.vjp``)."""
    rhs = FlatRHS(lambda t, v: g(v))
    t = jnp.zeros((), y.dtype)
    jac = None if linear_solver is None else linear_solver.linearise(rhs, t, y)
    if shift is None:
        return ShiftedJacobian(rhs, t, y, jac, None, -jnp.ones((), y.dtype))
    return ShiftedJacobian(rhs, t, y, jac, shift, jnp.ones((), y.dtype))


def linear_solve(linear_solver: AbstractLinearSolver, op: ShiftedJacobian, b: Array) -> tuple[Array, Array]:
    """``(x, ok)`` with ``op x = b``: one factorisation, one solve."""
    return linear_solver.compute(linear_solver.init(op), op, b)


def max_abs(x: Array) -> Array:
    """``max|x|``, NaN if any entry is NaN (``jnp.max`` propagates NaN)."""
    return jnp.max(jnp.abs(x))


def counters(**values) -> Int[Array, " k"]:
    """The int32 counter vector in ``STAT_NAMES`` order; unnamed counters are 0."""
    unknown = set(values) - set(STAT_NAMES)
    if unknown:
        raise KeyError(f"unknown counters {sorted(unknown)}")
    return jnp.stack([jnp.asarray(values.get(name, 0), jnp.int32) for name in STAT_NAMES])
