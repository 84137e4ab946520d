"""What every steady-state method implements, and the pieces they share."""

from __future__ import annotations

from typing import Callable, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .._linsolve import LU, AbstractLinearSolver
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


def jacobian_operator(g: Residual, y: Array, shift: Array | None = None):
    """``(matvec, matrix)`` of ``A = shift I - J`` (``A = J`` when ``shift`` is ``None``), ``J = dg/dy(y)``.

    ``matvec`` is one ``jax.jvp``; ``matrix()`` forms ``A`` with ``jax.jacfwd``.
    """

    def matvec(v):
        jv = jax.jvp(g, (y,), (v,))[1]
        return jv if shift is None else shift * v - jv

    def matrix():
        j = jax.jacfwd(g)(y)
        return j if shift is None else shift * jnp.eye(y.shape[0], dtype=j.dtype) - j

    return matvec, matrix


def forms_matrix(linear_solver: AbstractLinearSolver) -> bool:
    """Whether the linear solver builds a dense matrix (counted as a Jacobian evaluation)."""
    return isinstance(linear_solver, LU)


def max_abs(x: Array) -> Array:
    """``max|x|``, NaN if any entry is NaN (``jnp.max`` propagates NaN)."""
    return jnp.max(jnp.abs(x))


def counters(**values) -> Int[Array, " k"]:
    """The int32 counter vector in ``STAT_NAMES`` order; unnamed counters are 0."""
    unknown = set(values) - set(STAT_NAMES)
    if unknown:
        raise KeyError(f"unknown counters {sorted(unknown)}")
    return jnp.stack([jnp.asarray(values.get(name, 0), jnp.int32) for name in STAT_NAMES])
