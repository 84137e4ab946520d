"""``steady_state``: validation, flattening, and the differentiable root of ``f``."""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, ArrayLike, PyTree

from .._solution import Stats
from .._util import select
from .._validate import all_finite as _all_finite
from .._validate import check_max_steps, check_y0
from .._validate import rhs_structure_problem as _rhs_structure_problem
from ._base import AbstractSteadyStateMethod
from ._result import STAT_NAMES, STEADY_STATE_MESSAGES, SteadyState
from ._result import SteadyStateStatus as S
from .ift import implicit_root
from .newton import Newton


def steady_state(
    f: Callable[[Array, PyTree, Any], PyTree],
    y0: PyTree,
    args: PyTree = None,
    *,
    method: AbstractSteadyStateMethod | None = None,
    tol: ArrayLike | None = None,
    max_steps: int | None = None,
    t: ArrayLike = 0.0,
    throw: bool = True,
) -> SteadyState:
    """A steady state ``y*`` with ``f(t, y*, args) = 0``, differentiable in ``args`` and ``t``.

    Args:
        f: right-hand side with the signature of :func:`diffode.solve`'s ``f``;
            it is evaluated at the fixed time ``t``.
        y0: initial guess (or initial state, for :class:`IntegrateToSteady`), any
            pytree of floating arrays.
        args: any pytree passed to ``f`` (arrays, equinox modules, ...).
        method: :class:`Newton` (default), :class:`PseudoTransient` or
            :class:`IntegrateToSteady`.
        tol: converged when ``max|f(t, y, args)| <= tol``; default ``eps**0.75``
            of the state's dtype (1.8e-12 in float64, 6.4e-6 in float32).
        max_steps: bound on the method's iterations (Newton iterations,
            pseudo-time steps, ODE stretches); default per method.
        t: the fixed time.
        throw: raise on failure (no convergence, singular Jacobian, non-finite
            values, bad input), also when only derivatives are used. With
            ``False`` the failure is reported in ``status`` instead, and ``y`` and
            its derivatives are NaN, as are
            those of a ``y*`` whose Jacobian is singular.

    Returns:
        A :class:`SteadyState`; ``.y`` holds ``y*``.

    Derivatives with respect to ``args`` (its inexact-array leaves), ``t`` and
    anything ``f`` closes over come from the implicit function theorem,
    ``dy*/dp = -(df/dy)^{-1} df/dp`` at ``y*`` (see :mod:`diffode.steady.ift`):
    ``jax.jvp``, ``jax.grad``, ``jax.jacfwd``, ``jax.jacrev``, ``jax.hessian`` and
    ``jax.vmap`` all work, and every solve reuses one factorisation of
    ``df/dy``. ``y*`` does not depend on ``y0``, whose derivative is zero.
    """
    method = Newton() if method is None else method
    if not isinstance(method, AbstractSteadyStateMethod):
        raise TypeError(
            f"method must be a diffode steady-state method (e.g. diffode.Newton()), got {method!r}"
        )
    if max_steps is None:
        max_steps = method.default_max_steps
    max_steps = check_max_steps(max_steps)
    # One jitted call, eager or inside a transformation: under an enclosing `jit` it is
    # inlined; called eagerly, or under an eager `grad`/`hessian`/`vmap`, it is compiled
    # as a whole and cached instead of running operation by operation.
    return _steady_state_compiled(f, y0, args, method, tol, max_steps, t, throw)


def _steady_state(f, y0, args, method, tol, max_steps, t, throw) -> SteadyState:
    """:func:`steady_state` after its argument checks."""
    check_y0(y0)
    y0 = jtu.tree_map(jnp.asarray, y0)
    y_flat, unravel = ravel_pytree(y0)
    dtype = y_flat.dtype
    t = jnp.asarray(t, dtype)
    if t.shape != ():
        raise ValueError(f"t must be a scalar, got shape {t.shape}")
    tol = jnp.asarray(jnp.finfo(dtype).eps ** 0.75 if tol is None else tol, dtype)
    if tol.shape != ():
        raise ValueError(f"tol must be a scalar, got shape {tol.shape}")

    out = eqx.filter_eval_shape(f, t, y0, args)
    problem = _rhs_structure_problem(out, y0)
    if problem is not None:
        if throw:
            raise ValueError(f"{STEADY_STATE_MESSAGES[S.RHS_STRUCTURE_MISMATCH]} {problem}")
        nan = _failed(jnp.full_like(y_flat, jnp.nan), (t, eqx.filter(args, eqx.is_inexact_array)))
        return SteadyState(
            unravel(nan),
            jnp.asarray(S.RHS_STRUCTURE_MISMATCH, jnp.int32),
            Stats(jnp.zeros(len(STAT_NAMES), jnp.int32), STAT_NAMES),
            jnp.asarray(jnp.nan, dtype),
        )

    arrays, statics = eqx.partition(args, eqx.is_array)
    diff, other = eqx.partition(arrays, eqx.is_inexact_array)

    def f_flat(t, y, d, o):
        out = f(t, unravel(y), eqx.combine(d, o, statics))
        return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in jtu.tree_leaves(out)])

    # Whatever f closes over that may be differentiated becomes an explicit input.
    f_conv, consts = jax.closure_convert(f_flat, t, y_flat, diff, other)

    def g(y, theta, other):
        t, d, cs = theta
        return f_conv(t, y, d, other, *cs)

    theta = (t, diff, consts)
    finite_inputs = _all_finite((y_flat, t, diff, consts, statics))  # statics: Python floats too
    good_tol = jnp.isfinite(tol) & (tol > 0)
    bad = select(~finite_inputs, S.NONFINITE_INPUT, select(~good_tol, S.BAD_TOLERANCE, 0)).astype(jnp.int32)
    y, status, cnt, residual = implicit_root(method, g, y_flat, theta, other, tol, bad, max_steps, throw)
    return SteadyState(unravel(y), status, Stats(cnt, STAT_NAMES), residual)


_steady_state_compiled = eqx.filter_jit(_steady_state)


@jax.custom_jvp
def _failed(y: Array, theta: PyTree) -> Array:
    """``y``, the state of a failed steady state, with NaN tangents for ``theta``'s."""
    return y


@_failed.defjvp
def _failed_jvp(primals, tangents):
    # NaN times the sum of the input tangents: linear in them, so that JAX
    # transposes it into NaN cotangents.
    y, _ = primals
    total = sum(jnp.sum(dx) for dx in jtu.tree_leaves(tangents[1]))
    return y, jnp.full_like(y, jnp.nan) * jnp.asarray(total, y.dtype)
