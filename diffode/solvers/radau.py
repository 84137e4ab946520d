"""Radau IIA of order 5 (three stages, fully implicit), after Hairer and Wanner's RADAU5.

Reference: E. Hairer and G. Wanner, "Solving Ordinary Differential Equations II",
2nd ed., Springer 1996, section IV.8 ("Implementation of implicit Runge-Kutta
methods"), and the description of their code RADAU5 given there.

One step solves the collocation equations for the stage increments
``Z = (z_1, z_2, z_3)``, ``z_i = Y_i - y0``::

    Z = h (A (x) I) F(Z),     F(Z)_i = f(t0 + c_i h, y0 + z_i),

by simplified Newton iterations with a fixed Jacobian ``J``. With ``T`` such that
``T^-1 A^-1 T = diag(gamma, [[alpha, -beta], [beta, alpha]])`` and ``W = (T^-1 (x) I) Z``
the 3n x 3n Newton matrix splits into one real n x n system ``(gamma/h I - J)`` and
one complex one ``((alpha + i beta)/h I - J)`` (HW IV.8, eqs. (8.15)-(8.18)).
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array

from .._util import select
from . import linear
from .base import AbstractSolver, StepResult
from .linear import LU, AbstractLinearSolver
from .stage_newton import convergence_test

# ----------------------------------------------------------------------------
# Coefficients. Radau IIA, s = 3 (HW vol. II, Table IV.5.6): nodes and matrix A.
# ----------------------------------------------------------------------------
_SQ6 = np.sqrt(6.0)
RADAU_C = np.array([(4.0 - _SQ6) / 10.0, (4.0 + _SQ6) / 10.0, 1.0])
RADAU_A = np.array(
    [
        [(88.0 - 7.0 * _SQ6) / 360.0, (296.0 - 169.0 * _SQ6) / 1800.0, (-2.0 + 3.0 * _SQ6) / 225.0],
        [(296.0 + 169.0 * _SQ6) / 1800.0, (88.0 + 7.0 * _SQ6) / 360.0, (-2.0 - 3.0 * _SQ6) / 225.0],
        [(16.0 - _SQ6) / 36.0, (16.0 + _SQ6) / 36.0, 1.0 / 9.0],
    ]
)
# Eigenvalues of A^-1: one real, gamma = 3 + 3^(2/3) - 3^(1/3), and a complex pair
# alpha +- i beta with alpha = 3 + (3^(1/3) - 3^(2/3)) / 2, beta = (3^(5/6) + 3^(7/6)) / 2
# (HW IV.8, after (8.16); the constants u1, alpha, beta of RADAU5).
RADAU_GAMMA = 3.0 + 3.0 ** (2.0 / 3.0) - 3.0 ** (1.0 / 3.0)
RADAU_ALPHA = 3.0 + 0.5 * (3.0 ** (1.0 / 3.0) - 3.0 ** (2.0 / 3.0))
RADAU_BETA = 0.5 * (3.0 ** (5.0 / 6.0) + 3.0 ** (7.0 / 6.0))
# The transformation T and its inverse as published with RADAU5 (Hairer and
# Wanner 1996); tests/test_radau.py checks T^-1 A^-1 T against the eigenvalues.
RADAU_T = np.array(
    [
        [9.1232394870892942792e-02, -1.4125529502095420843e-01, -3.0029194105147424492e-02],
        [2.4171793270710701896e-01, 2.0412935229379993199e-01, 3.8294211275726193779e-01],
        [9.6604818261509293619e-01, 1.0, 0.0],
    ]
)
RADAU_TI = np.array(
    [
        [4.3255798900631553510, 3.3919925181580986954e-01, 5.4177053993587487119e-01],
        [-4.1787185915519047273, -3.2768282076106238708e-01, 4.7662355450055045196e-01],
        [-5.0287263494578687595e-01, 2.5719269498556054292, -5.9603920482822492497e-01],
    ]
)
# Error estimate (HW IV.8, eqs. (8.19)-(8.20)): with the embedded third-order
# formula y_hat = y0 + h (gamma0 f(t0, y0) + sum_i b_hat_i f(Y_i)), gamma0 = 1/gamma,
#   y_hat - y1 = gamma0 h f0 + sum_i e_i z_i,  gamma * e = (-(13 + 7 sqrt6), -13 + 7 sqrt6, -1) / 3,
# filtered as err = (I - h gamma0 J)^-1 (y_hat - y1) = (gamma/h I - J)^-1 (f0 + sum_i gamma e_i z_i / h).
RADAU_E = np.array([-(13.0 + 7.0 * _SQ6) / 3.0, (-13.0 + 7.0 * _SQ6) / 3.0, -1.0 / 3.0])
# Dense output: the collocation polynomial u(t0 + theta h) = y0 + q(theta) with
# q(0) = 0 and q(c_i) = z_i; q(theta) = theta (d_0 + theta (d_1 + theta d_2)) with
# D = V^-1 Z, V_ij = c_i^(j+1).
RADAU_VINV = np.linalg.inv(RADAU_C[:, None] ** np.arange(1, 4)[None, :])


class RadauState(NamedTuple):
    """What a step carries to the next one.

    ``f0``: ``f(t0, y0)`` at the step's start. ``matrix``: the Jacobian in use and
    the factors of the real and the complex system (:mod:`diffode.solvers.linear`).
    ``dense``, ``h``: the last accepted step's collocation polynomial coefficients
    and size (starting values by extrapolation). ``need_jac``: evaluate ``J`` at the
    start of the next step. ``fresh_start``: first step or after a rejection (HW's
    FIRST/REJECT, for the error estimate). ``faccon``: eta = theta/(1 - theta) from
    the last Newton iteration. ``cold``: the state ``init`` built (no previous step):
    Newton iterates to a tighter tolerance (see :class:`Radau5`).
    """

    f0: Array
    matrix: linear.IterationMatrix
    dense: Array
    h: Array
    need_jac: Array
    fresh_start: Array
    faccon: Array
    cold: Array


def _matmul3(m: np.ndarray, x: Array) -> Array:
    """``m @ x`` for a constant 3x3 ``m`` and ``x`` of shape (3, n)."""
    return jnp.asarray(m, x.dtype) @ x


def _shifts(h: Array) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """Shifts and scales of the real and the complex Newton system, ``gamma/h I - J``
    and ``(alpha + i beta)/h I - J``."""
    one = jnp.ones((), h.dtype)
    return (RADAU_GAMMA / h, complex(RADAU_ALPHA, RADAU_BETA) / h), (one, one)


class Radau5(AbstractSolver):
    """Radau IIA, 3 stages, order 5, L-stable and stiffly accurate (Hairer and Wanner, vol. II, IV.8).

    Simplified Newton with the transformation to one real and one complex linear
    system per iteration, Jacobian reuse across steps, starting values from the
    previous step's collocation polynomial, the filtered embedded error estimate
    of RADAU5 and the collocation polynomial (cubic) as dense output.

    Args:
        max_iters: Newton iterations per step before the step fails (RADAU5: 7).
        jac_reuse_theta: after an accepted step, ``J`` is re-evaluated only when
            Newton's observed contraction rate exceeded this (RADAU5's THET: 1e-3;
            a step that converged in one iteration keeps ``J``). Larger values
            (HW suggest 0.1) reuse ``J`` more, for expensive Jacobians.
        newton_tol: ``kappa``; Newton stops once ``eta ||dW|| <= kappa``, with
            ``eta = theta / (1 - theta)`` (from the previous step on the first
            iteration) and ``||dW||`` the tolerance-scaled norm (``tol.scaled_norm``
            at ``y0``) of the transformed increments, as in RADAU5. ``None`` uses
            RADAU5's ``max(10 eps / rtol, min(0.03, sqrt(rtol)))`` with the solve's
            (untransformed) ``rtol``.
        linear_solver: solves the real and the complex system
            (:mod:`diffode.solvers.linear`): :class:`~diffode.LU` (default; the
            complex system in complex arithmetic) or :class:`~diffode.GMRES`
            (matrix-free, complex Krylov iterations for the complex system), or
            any other linear solver.

    A step fails (``ok=False``: the loop rejects it and shrinks ``h``) when Newton
    diverges (``theta >= 0.99``), when its predicted error after the remaining
    iterations still exceeds ``kappa``, at the iteration cap, or on non-finite
    values. After a rejection ``J`` is re-evaluated at ``y0`` unless it already was.

    Statistics: ``num_jac_evals``; ``num_lu_decomps`` (a step factorises the
    real and the complex matrix, counted as 2, unless neither ``J`` nor ``h``
    changed since the last factorisation; 0 with matrix-free GMRES); ``num_newton_iters`` (each
    iteration costs 3 evaluations of ``f``). ``num_fevals`` counts evaluations of
    ``f`` only: 3 per Newton iteration, 1 per step for ``f(t1, y1)`` (the next
    step's ``f0``) and 1 for the extra filtered error estimate, taken on the first
    step and after rejections when the plain estimate exceeds the tolerance.

    The step-size controller uses ``error_order = 4``: the estimate is that of an
    embedded third-order formula, a local error of ``O(h^4)`` (measured slope 4.0
    in tests/test_radau.py; RADAU5 uses the exponent 1/4 too).

    Differentiation: the stages are wrapped in ``jax.lax.custom_root``, so the
    Newton ``while_loop`` is never differentiated. Their derivative is that of the
    exact root by the implicit function theorem, ``dZ = -(dG/dZ)^-1 (dG/dp) dp`` for
    ``G(Z) = Z - h (A (x) I) F(Z)``, with the exact ``3n x 3n`` Jacobian ``dG/dZ``
    (with :class:`~diffode.LU`: formed column by column and factorised; with
    :class:`~diffode.GMRES`: matrix-free) evaluated at the computed stages. ``y1``
    and the dense coefficients are linear in ``Z``; a step is therefore
    differentiable by ``jax.jvp`` and ``jax.vjp`` (the ``Direct`` sensitivity method
    replays it). The error estimate ``y_error`` is not differentiated (the
    controller stops its gradient). A step from the state ``init`` returns (the
    first step of a solve, and every step ``Direct`` replays, which has no
    previous step to extrapolate starting values from) iterates Newton further:
    to ``max(kappa / 100, 10 eps / rtol)``, with up to ``3 max_iters`` iterations
    and no early exit on slow convergence; it counts as converged once the
    ``kappa`` test is met. The replayed stages are then the root to well within
    the forward solve's Newton error.
    """

    max_iters: int = eqx.field(static=True, default=7)
    jac_reuse_theta: float = eqx.field(static=True, default=1e-3)
    newton_tol: float | None = eqx.field(static=True, default=None)
    linear_solver: AbstractLinearSolver = eqx.field(default_factory=LU)

    stat_names = ("num_jac_evals", "num_lu_decomps", "num_newton_iters")

    def __check_init__(self):
        if not (isinstance(self.max_iters, int) and self.max_iters >= 1):
            raise ValueError(f"Radau5: max_iters must be a positive integer, got {self.max_iters!r}")
        if not self.jac_reuse_theta >= 0:
            raise ValueError(f"Radau5: jac_reuse_theta must be >= 0, got {self.jac_reuse_theta!r}")
        if self.newton_tol is not None and not self.newton_tol > 0:
            raise ValueError(f"Radau5: newton_tol must be positive, got {self.newton_tol!r}")
        if not isinstance(self.linear_solver, AbstractLinearSolver):
            raise TypeError(
                f"Radau5: linear_solver must be a diffode linear solver, got {self.linear_solver!r}"
            )

    @property
    def order(self) -> int:
        return 5

    @property
    def error_order(self) -> int:
        return 4

    @property
    def embedded(self) -> bool:
        return True

    def dense_zeros(self, y0):
        return jnp.zeros((3,) + y0.shape, y0.dtype)

    def init(self, f, t0, y0, f0):
        n = y0.shape[0]
        dtype = y0.dtype
        shifts, scales = _shifts(jnp.ones((), dtype))
        return RadauState(
            f0=f0,
            matrix=linear.iteration_matrix(self.linear_solver, f, t0, y0, shifts, scales),
            dense=jnp.zeros((3, n), dtype),
            h=jnp.ones((), dtype),
            need_jac=jnp.array(True),
            fresh_start=jnp.array(True),
            faccon=jnp.ones((), dtype),
            cold=jnp.array(True),
        )

    def step(self, f, t0, y0, h, state: RadauState, tol):
        dtype = y0.dtype
        eps = jnp.finfo(dtype).eps
        ls = self.linear_solver

        # The real system gamma/h I - J and the complex one (alpha + i beta)/h I - J
        # (system 0 and 1), with J reused unless the last step asked for a new
        # one (see diffode.solvers.linear). They only steer the Newton
        # iteration and the error filter, whose derivatives do not matter for
        # the converged iterates, hence stop_gradient.
        need_jac = state.need_jac
        hs = lax.stop_gradient(h)
        shifts, scales = _shifts(hs)
        matrix, num_jac, num_lu = linear.update(ls, f, t0, y0, state.matrix, need_jac, shifts, scales)
        matrix = lax.stop_gradient(matrix)

        # Starting values: the last accepted step's collocation polynomial,
        # continued to the new nodes (zero on the first step, where dense = 0).
        theta_nodes = 1.0 + jnp.asarray(RADAU_C, dtype) * (h / state.h)
        powers = theta_nodes[:, None] ** jnp.arange(1, 4, dtype=dtype)[None, :] - 1.0
        z0 = powers @ state.dense

        rtol = jnp.maximum(jnp.min(tol.rtol), 10 * eps)
        if self.newton_tol is None:
            fnewt = jnp.maximum(10 * eps / rtol, jnp.minimum(0.03, jnp.sqrt(rtol)))
        else:
            fnewt = jnp.asarray(self.newton_tol, dtype)
        t_nodes = t0 + jnp.asarray(RADAU_C, jnp.result_type(t0)) * h
        lam1, lam2 = shifts
        # From the init state (the first step, or a step that Direct replays in
        # reverse mode) Newton polishes the root: a tighter tolerance (above
        # rounding), more iterations, no early exit on slow convergence.
        cold = state.cold
        fnewt_stop = select(cold, jnp.maximum(0.01 * fnewt, 10 * eps / rtol), fnewt)
        kmax = select(cold, 3 * self.max_iters, self.max_iters)
        f_nodes = jax.vmap(f)

        def residual(z):
            # The collocation equations G(Z) = Z - h (A (x) I) F(Z) = 0.
            return z - h * _matmul3(RADAU_A, f_nodes(t_nodes, y0 + z))

        def cond(c):
            return ~c[6]

        def body(c):
            k, w, dyno_old, thq_old, theta, faccon, _, _ = c
            fz = f_nodes(t_nodes, y0 + _matmul3(RADAU_T, w))
            g = _matmul3(RADAU_TI, fz)
            r1 = g[0] - lam1 * w[0]
            r2 = lax.complex(g[1], g[2]) - lam2 * lax.complex(w[1], w[2])
            d1, _ = linear.solve(ls, f, matrix, r1, system=0)  # Newton's own test judges them
            d2, _ = linear.solve(ls, f, matrix, r2, system=1)
            dw = jnp.stack([d1, jnp.real(d2), jnp.imag(d2)])
            dyno = tol.scaled_norm(dw, y0)
            # The rate is the geometric mean of the last two ratios from the
            # third iteration on (HW IV.8, (8.23)); divergence at theta = 0.99.
            test = convergence_test(
                k, dyno, dyno_old, thq_old, theta, faccon, fnewt, kmax, mean_rate=True, max_theta=0.99
            )
            k = k + 1
            w = w + dw
            # f is checked itself: a matrix-free solve may turn NaN into a zero increment.
            finite = jnp.isfinite(dyno) & jnp.all(jnp.isfinite(fz))
            slow = ~cold & test.too_slow
            stop = (test.eta * dyno <= fnewt_stop) | ~finite | test.diverged | slow | (k >= kmax)
            # Polishing stops when the rate stalls (at rounding level: 'diverged'),
            # and the step is still ok if the kappa test holds.
            ok = test.converged & finite & (cold | ~test.diverged)
            return k, w, dyno, test.ratio, test.theta, test.eta, stop, ok

        def newton(_, z_start):
            # Simplified Newton in the transformed variables W = (T^-1 (x) I) Z.
            # custom_root does not differentiate it (the IFT rule below does).
            one = jnp.ones((), dtype)
            carry0 = (
                jnp.zeros((), jnp.int32),
                _matmul3(RADAU_TI, z_start),
                one,
                one,
                jnp.asarray(self.jac_reuse_theta, dtype),
                jnp.maximum(state.faccon, eps) ** 0.8,
                jnp.array(False),
                jnp.array(False),
            )
            iters, w, _, _, theta, faccon, _, ok = lax.while_loop(cond, body, carry0)
            # custom_root (jax 0.10) gives aux outputs tangents of their own
            # dtype, which integer/bool outputs reject: pass them as floats.
            return _matmul3(RADAU_T, w), jnp.stack([iters.astype(dtype), theta, faccon, ok.astype(dtype)])

        # Derivatives of the stages by the implicit function theorem at the
        # computed root: dZ = -(dG/dZ)^-1 (dG/dparams)[dparams], with the exact
        # 3n x 3n Jacobian dG/dZ (not Newton's approximate J). Forward mode
        # (jax.jvp through the loop) and reverse mode (jax.vjp of one step, as
        # Direct does) both use it; the primal just runs `newton`.
        z, aux = lax.custom_root(residual, z0, newton, self._tangent_solve, has_aux=True)
        aux = lax.stop_gradient(aux)
        iters, theta, faccon, ok = aux[0].astype(jnp.int32), aux[1], aux[2], aux[3] > 0.5
        y1 = y0 + z[2]
        dense = _matmul3(RADAU_VINV, z)

        # Error estimate (HW IV.8, (8.19)-(8.20)); on the first step and after a
        # rejection a large estimate is filtered once more through f (HW (8.21)).
        # Not differentiated: the controller stops its gradient anyway, and
        # sensitivity methods differentiate y1 and dense only.
        zs, f0s, t0s, y0s, y1s = lax.stop_gradient((z, state.f0, t0, y0, y1))
        v = jnp.asarray(RADAU_E[0], dtype) * zs[0]
        v = (v + jnp.asarray(RADAU_E[1], dtype) * zs[1] + jnp.asarray(RADAU_E[2], dtype) * zs[2]) / hs
        err, _ = linear.solve(ls, f, matrix, f0s + v)
        big = tol.scaled_norm(err, jnp.maximum(jnp.abs(y0s), jnp.abs(y1s))) >= 1.0
        redo = state.fresh_start & ok & big
        err = lax.cond(redo, lambda: linear.solve(ls, f, matrix, f(t0s, y0s + err) + v)[0], lambda: err)
        err = lax.stop_gradient(err)

        f1 = f(t0 + h, y1)
        i32 = lambda x: jnp.asarray(x, jnp.int32)
        accepted = RadauState(
            f0=f1,
            matrix=matrix,
            dense=dense,
            h=h,
            need_jac=theta > self.jac_reuse_theta,
            fresh_start=jnp.array(False),
            faccon=faccon,
            cold=jnp.array(False),
        )
        # After a rejection J is re-evaluated at y0 unless it already was (HW).
        rejected = RadauState(
            f0=state.f0,
            matrix=matrix,
            dense=state.dense,
            h=state.h,
            need_jac=~need_jac,
            fresh_start=jnp.array(True),
            faccon=faccon,
            cold=jnp.array(False),
        )
        counts = {
            "num_jac_evals": num_jac,
            "num_lu_decomps": num_lu,
            "num_newton_iters": iters,
        }
        nfev = 3 * iters + 1 + i32(redo)
        return StepResult(y1, err, dense, accepted, rejected, ok, nfev, counts)

    def _tangent_solve(self, g, b):
        """Solve ``g(x) = b`` for the linearised collocation equations (``custom_root``):
        the exact ``3n x 3n`` system, by this solver's linear solver (LU: formed
        column by column and factorised)."""
        return linear.solve_linear_map(self.linear_solver, g, b)

    def interpolate(self, h, y0, y1, dense, theta):
        """The collocation polynomial (degree 3) at ``t0 + theta h``."""
        return y0 + theta * (dense[0] + theta * (dense[1] + theta * dense[2]))
