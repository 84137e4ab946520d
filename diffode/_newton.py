"""Simplified Newton iteration for one implicit stage.

Formulation: the stage value is ``Y = base + z`` where ``z`` solves

    G(z) = z - gamma_h * f(t, base + z) = 0,

(for a diagonally implicit Runge-Kutta stage, ``base = y0 + h sum_{j<i} a_ij k_j``
and at the solution ``z = gamma h k_i``). Simplified Newton keeps the iteration
matrix ``W = I - gamma_h J`` (``J`` from a linear solver's cache, possibly from
an earlier step) fixed over the iterations:

    W dz_k = gamma_h f(t, base + z_k) - z_k,     z_{k+1} = z_k + dz_k.

Convergence control after Hairer and Wanner, "Solving Ordinary Differential
Equations II", 2nd ed., section IV.8 ("stopping criterion"): with the scaled norm
``||.||`` of the solve's tolerances (``tol.scaled_norm``, 1 = "at tolerance"),
the rate ``theta_k = ||dz_k|| / ||dz_{k-1}||`` and ``eta_k = theta_k / (1 - theta_k)``,
the iteration

* converges when ``eta_k ||dz_k|| <= kappa`` (for ``k = 0``, ``eta_0`` is supplied
  by the caller: ``max(eta_old, eps)**0.8`` from the previous solve, or 1);
* fails when ``theta_k >= 1`` (divergence), when the error predicted after the
  remaining iterations, ``theta_k**(max_iters - 1 - k) / (1 - theta_k) ||dz_k||``,
  exceeds ``kappa``, at the iteration cap, or on non-finite values.

``kappa`` is floored at ``10 eps / rtol`` (the iteration cannot resolve
increments below the roundoff of ``y``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._linsolve import AbstractLinearSolver
from ._solver import FlatRHS, Tolerances
from ._util import select

#: Iteration states; NONFINITE is a failure on NaN or inf (in f, J or the linear solve).
RUNNING, CONVERGED, FAILED, NONFINITE = 0, 1, 2, 3


def effective_kappa(kappa: float, tol: Tolerances, dtype) -> Array:
    """``max(kappa, 10 eps / rtol)``: no convergence demand below roundoff level."""
    eps = jnp.finfo(dtype).eps
    r = jnp.max(jnp.asarray(tol.rtol, dtype))
    floor = select(r > 0, 10 * eps / select(r > 0, r, 1), 0)
    return jnp.maximum(jnp.asarray(kappa, dtype), floor)


def first_eta(eta_old: Array) -> Array:
    """``eta_0`` for a new Newton solve from the last one's ``eta`` (HW IV.8)."""
    eps = jnp.finfo(eta_old.dtype).eps
    return jnp.maximum(eta_old, eps) ** 0.8


def newton_iteration(
    f: FlatRHS,
    linsolve: AbstractLinearSolver,
    cache,
    t: Array,
    base: Float[Array, " n"],
    z: Float[Array, " n"],
    gamma_h: Array,
    tol: Tolerances,
    k: Int[Array, ""],
    ndz_prev: Array,
    eta: Array,
    max_iters: int,
    kappa: Array,
):
    """One simplified-Newton iteration ``k`` (0-based) and its convergence tests.

    Costs one evaluation of ``f`` and one linear solve. ``eta`` is ``eta_0`` when
    ``k == 0`` (otherwise ignored). Returns ``(z, ndz, theta, eta, status)`` with
    ``status`` one of ``RUNNING``, ``CONVERGED``, ``FAILED``, ``NONFINITE``; ``theta`` is 0
    for ``k == 0``. ``f``'s value is checked itself: a matrix-free linear solve may
    turn a NaN right-hand side into a finite (zero) increment.
    """
    fz = f(t, base + z)
    dz = linsolve.solve(f, cache, gamma_h * fz - z)
    z = z + dz
    ndz = tol.scaled_norm(dz, base + z)
    first = k == 0
    theta = select(first, 0.0, ndz / select(first | (ndz_prev == 0), 1.0, ndz_prev).astype(ndz.dtype))
    theta = theta.astype(ndz.dtype)
    one_minus = jnp.maximum(1 - theta, jnp.finfo(ndz.dtype).eps)
    eta = select(first, eta.astype(ndz.dtype), theta / one_minus)
    remaining = (max_iters - 1 - k).astype(ndz.dtype)
    converged = eta * ndz <= kappa
    finite = jnp.isfinite(ndz) & jnp.all(jnp.isfinite(fz))
    diverging = ~first & (theta >= 1)
    too_slow = ~first & (theta**remaining / one_minus * ndz > kappa) & ~converged
    at_cap = (k + 1 >= max_iters) & ~converged
    failed = ~finite | diverging | too_slow | at_cap
    status = select(failed, select(finite, FAILED, NONFINITE), select(converged, CONVERGED, RUNNING))
    status = status.astype(jnp.int32)
    return z, ndz, theta, eta, status


class NewtonResult(NamedTuple):
    """Outcome of :func:`newton_solve`. ``num_iters`` equals the number of ``f`` evaluations."""

    z: Float[Array, " n"]
    ok: Bool[Array, ""]
    num_iters: Int[Array, ""]
    theta_max: Array
    eta: Array


def newton_solve(
    f: FlatRHS,
    linsolve: AbstractLinearSolver,
    cache,
    t: Array,
    base: Float[Array, " n"],
    z0: Float[Array, " n"],
    gamma_h: Array,
    tol: Tolerances,
    *,
    max_iters: int = 10,
    kappa: float = 1e-2,
    eta0: Array | float = 1.0,
) -> NewtonResult:
    """Solve ``z = gamma_h f(t, base + z)`` by simplified Newton from ``z0``.

    ``cache`` must come from ``linsolve.prepare(..., gamma_h, ...)``. One
    ``lax.while_loop``; its carry is ``(k, z, ||dz||, eta, theta_max, status)``.
    """
    dtype = z0.dtype
    kap = effective_kappa(kappa, tol, dtype)

    def cond(c):
        return c[5] == RUNNING

    def body(c):
        k, z, ndz_prev, eta, theta_max, _ = c
        z, ndz, theta, eta, status = newton_iteration(
            f, linsolve, cache, t, base, z, gamma_h, tol, k, ndz_prev, eta, max_iters, kap
        )
        return k + 1, z, ndz, eta, jnp.maximum(theta_max, theta), status

    zero = jnp.zeros((), dtype)
    init = (jnp.zeros((), jnp.int32), z0, zero, jnp.asarray(eta0, dtype), zero, jnp.asarray(RUNNING, jnp.int32))
    k, z, _, eta, theta_max, status = lax.while_loop(cond, body, init)
    return NewtonResult(z, status == CONVERGED, k, theta_max, eta)
