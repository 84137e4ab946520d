"""Simplified Newton iteration for implicit stages, and its convergence test.

Formulation (one stage of a diagonally implicit method): the stage value is
``Y = base + z`` where ``z`` solves

    G(z) = z - gamma_h * f(t, base + z) = 0,

(for an SDIRK stage, ``base = y0 + h sum_{j<i} a_ij k_j`` and at the solution
``z = gamma h k_i``). Simplified Newton keeps the iteration matrix
``W = I - gamma_h J`` (``J`` from the Jacobian-reuse policy of
:mod:`diffode.solvers.linear`, possibly from an earlier step) fixed over the
iterations:

    W dz_k = gamma_h f(t, base + z_k) - z_k,     z_{k+1} = z_k + dz_k.

:func:`stage_newton_iteration` is one such iteration. Radau5 runs its own
iteration on the transformed collocation system (one real and one complex
linear system) and shares the convergence test.

:func:`convergence_test`, after Hairer and Wanner, "Solving Ordinary
Differential Equations II", 2nd ed., section IV.8 ("stopping criterion"): with
the scaled norm ``||.||`` of the solve's tolerances (``tol.scaled_norm``, 1 =
"at tolerance"), the rate ``theta_k = ||dz_k|| / ||dz_{k-1}||`` (or the
geometric mean of the last two ratios, as in RADAU5) and
``eta_k = theta_k / (1 - theta_k)``, the iteration

* converges when ``eta_k ||dz_k|| <= kappa`` (for ``k = 0``, ``eta_0`` is supplied
  by the caller: ``max(eta_old, eps)**0.8`` from the previous solve, or 1);
* fails when ``theta_k`` reaches ``max_theta`` (divergence), when the error
  predicted after the remaining iterations,
  ``theta_k**(max_iters - 1 - k) / (1 - theta_k) ||dz_k||``, exceeds ``kappa``
  (too slow), at the iteration cap, or on non-finite values.

``kappa`` is floored at ``10 eps / rtol`` (the iteration cannot resolve
increments below the roundoff of ``y``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from .._util import select
from . import linear
from .base import FlatRHS, Tolerances
from .linear import AbstractLinearSolver, IterationMatrix

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


class RateTest(NamedTuple):
    """Outcome of :func:`convergence_test` for one iteration."""

    theta: Array  # contraction rate estimate (the caller's on the first iteration)
    ratio: Array  # ||dz_k|| / ||dz_{k-1}||, for the next iteration's mean rate
    eta: Array  # theta / (1 - theta); the caller's eta_0 on the first iteration, kept on divergence
    converged: Bool[Array, ""]
    diverged: Bool[Array, ""]
    too_slow: Bool[Array, ""]
    at_cap: Bool[Array, ""]  # the last allowed iteration, not converged


def convergence_test(
    k: Int[Array, ""],
    ndz: Array,
    ndz_prev: Array,
    ratio_prev: Array,
    theta: Array,
    eta: Array,
    kappa: Array,
    max_iters: int | Array,
    *,
    mean_rate: bool = False,
    max_theta: float = 1.0,
) -> RateTest:
    """The convergence test of simplified Newton (HW IV.8; see the module docstring).

    ``k``: 0-based index of the iteration just done; ``ndz``: its increment's
    scaled norm; ``ndz_prev``, ``ratio_prev``: the previous iteration's norm
    and ratio; ``theta``, ``eta``: the rate and ``eta`` so far (``eta_0`` when
    ``k == 0``). ``mean_rate``: from the third iteration on, the rate is the
    geometric mean of the last two ratios (RADAU5). ``max_theta``: the rate at
    which the iteration counts as diverging.
    """
    dtype = ndz.dtype
    first = k == 0
    ratio = (ndz / select(first | (ndz_prev == 0), 1.0, ndz_prev).astype(dtype)).astype(dtype)
    rate = select(k >= 2, jnp.sqrt(ratio * ratio_prev), ratio) if mean_rate else ratio
    theta = select(first, jnp.asarray(theta, dtype), rate).astype(dtype)
    diverged = ~first & ~(theta < max_theta)
    one_minus = jnp.maximum(1 - theta, jnp.finfo(dtype).eps)
    eta = select(first | diverged, jnp.asarray(eta, dtype), theta / one_minus).astype(dtype)
    converged = eta * ndz <= kappa
    remaining = (max_iters - 1 - k).astype(dtype)
    at_cap = (k + 1 >= max_iters) & ~converged
    too_slow = ~first & ~converged & ~at_cap & (theta**remaining / one_minus * ndz > kappa)
    return RateTest(theta, select(first, ratio_prev, ratio), eta, converged, diverged, too_slow, at_cap)


def stage_newton_iteration(
    f: FlatRHS,
    linear_solver: AbstractLinearSolver,
    matrix: IterationMatrix,
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
    """One simplified-Newton iteration ``k`` (0-based) for ``z = gamma_h f(t, base + z)``, and its test.

    Costs one evaluation of ``f`` and one linear solve with ``I - gamma_h J``
    (system 0 of ``matrix``). ``eta`` is ``eta_0`` when ``k == 0`` (otherwise
    ignored). Returns ``(z, ndz, theta, eta, status)`` with ``status`` one of
    ``RUNNING``, ``CONVERGED``, ``FAILED``, ``NONFINITE``; ``theta`` is 0 for
    ``k == 0``. ``f``'s value is checked itself: a matrix-free linear solve may
    turn a NaN right-hand side into a finite (zero) increment.
    """
    fz = f(t, base + z)
    dz, _ = linear.solve(linear_solver, f, matrix, gamma_h * fz - z)  # Newton's own test judges dz
    z = z + dz
    ndz = tol.scaled_norm(dz, base + z)
    zero = jnp.zeros((), ndz.dtype)
    test = convergence_test(k, ndz, ndz_prev, zero, zero, eta, kappa, max_iters)
    finite = jnp.isfinite(ndz) & jnp.all(jnp.isfinite(fz))
    failed = ~finite | test.diverged | test.too_slow | test.at_cap
    status = select(failed, select(finite, FAILED, NONFINITE), select(test.converged, CONVERGED, RUNNING))
    return z, ndz, test.theta, test.eta, status.astype(jnp.int32)
