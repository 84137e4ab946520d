"""Singly diagonally implicit Runge-Kutta methods (SDIRK/ESDIRK) for stiff problems.

One generic stepper, :class:`SDIRK`, driven by a :class:`ButcherTableau` whose
``a`` is lower triangular with a constant diagonal ``gamma`` (the first stage
may be explicit: ESDIRK). Each implicit stage is solved by simplified Newton
(:mod:`diffode.solvers.stage_newton`) with the iteration matrix ``I - gamma h J``, so one
factorisation serves every stage of a step (Hairer and Wanner, "Solving
Ordinary Differential Equations II", IV.6 and IV.8).

All stages and all Newton iterations of a step run in a single
``lax.while_loop`` whose carry holds the stage index, the iteration count and
the stage derivatives: ``f`` and the linear solve appear once in the traced
graph whatever the number of stages, and under ``jax.vmap`` every batch member
advances through its own stages independently.

Derivatives: that loop is wrapped in ``lax.custom_root`` on the residual of all
implicit stage derivatives at once, ``G(K)_i = k_i - f(t0 + c_i h, y0 + h
sum_j a_ij k_j)``, so ``jax.jvp`` and ``jax.vjp`` of a step give the exact
implicit-function-theorem derivative at the converged stages (the Newton
iterations themselves are never differentiated; ``J`` is a ``stop_gradient``).
Everything after the stages (``y1``, ``f1``, the error estimate, the dense
data) is plain arithmetic of ``y0``, ``h``, ``f0`` and the stages.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from .._util import select
from . import linear
from .base import AbstractTableauSolver, StepResult
from .butcher import ButcherTableau
from .explicit_rk import hermite
from .linear import LU, AbstractLinearSolver
from .stage_newton import (
    CONVERGED,
    FAILED,
    NONFINITE,
    RUNNING,
    effective_kappa,
    first_eta,
    stage_newton_iteration,
)


class SDIRKState(NamedTuple):
    """Carried between steps.

    ``f0``: ``f(t0, y0)`` (the previous step's last stage derivative).
    ``new_jac``: recompute ``J`` at the start of the next attempt.
    ``eta``: Newton's last ``eta`` (HW IV.8), seeds the first convergence test.
    ``matrix``: the iteration matrix ``I - gamma h J`` as the linear solver keeps
    it (for :class:`LU`: ``J`` and the LU factors; see :mod:`diffode.solvers.linear`).
    """

    f0: Float[Array, " n"]
    new_jac: Bool[Array, ""]
    eta: Array
    matrix: linear.IterationMatrix


class SDIRK(AbstractTableauSolver):
    """Generic SDIRK/ESDIRK stepper with simplified Newton and Jacobian reuse.

    Requirements on the tableau: lower-triangular ``a`` with the same positive
    diagonal ``gamma`` on every implicit stage; the first stage is either
    explicit (ESDIRK: ``a[0] == 0``, its derivative is ``f0``, reused from the
    previous step) or implicit; stiffly accurate (``a[-1] == b``), so that
    ``y1`` is the last stage and its derivative ``k_s = z_s / (gamma h)`` is
    the next step's ``f0`` (no extra evaluation). Stage derivatives are taken as
    ``z / (gamma h)`` rather than ``f(Y)``: for stiff components this avoids
    amplifying the Newton residual (HW IV.8).

    Jacobian reuse: ``J`` is kept across Newton iterations, stages and steps.
    It is recomputed at the start of the next attempt when Newton failed with
    an old ``J``, or when its contraction rate ``theta`` exceeded
    ``jac_theta`` in some stage (slow convergence). A failed Newton iteration
    makes the step report ``ok=False``; the solve loop rejects it and shrinks
    ``h``. Dense output is cubic Hermite from ``y0, y1, f0, f1``.

    Args:
        tableau: the method.
        linear_solver: any linear solver (:mod:`diffode.solvers.linear`):
            :class:`~diffode.LU` (default) or :class:`~diffode.GMRES`.
        max_iters: Newton iteration cap per stage.
        kappa: Newton stops when ``eta ||dz|| <= kappa`` in the tolerance-scaled
            norm (HW IV.8; they recommend values around 1e-2 .. 1e-1).
        jac_theta: recompute ``J`` for the next step when Newton's rate
            ``theta`` exceeded this in any stage. The default ``1e-3`` (the
            ``thet`` of Hairer and Wanner's RADAU5) keeps ``J`` only after very
            fast convergence: on small problems a fresh ``J`` is cheaper than the
            extra iterations, and sloppier stale-``J`` iterates cost accuracy.
            Raise it (e.g. ``0.1``) when Jacobians are expensive.

    Pass everything but ``tableau`` by keyword.
    """

    stat_names: ClassVar[tuple[str, ...]] = ("num_jac_evals", "num_lu_decomps", "num_newton_iters")

    tableau: ButcherTableau = eqx.field(static=True)
    linear_solver: AbstractLinearSolver = eqx.field(default_factory=LU)
    max_iters: int = eqx.field(static=True, default=10)
    kappa: float = eqx.field(static=True, default=1e-2)
    jac_theta: float = eqx.field(static=True, default=1e-3)

    def __check_init__(self):
        tab = self.tableau
        a, name = tab.a, tab.name
        if np.any(np.triu(a, 1) != 0):
            raise ValueError(f"{name}: SDIRK needs a lower-triangular a")
        first = 1 if a[0, 0] == 0 else 0
        if first == 1 and np.any(a[0] != 0):
            raise ValueError(f"{name}: an explicit first stage must have a[0] == 0")
        diag = np.diag(a)[first:]
        if diag.size == 0 or not diag[0] > 0 or np.any(diag != diag[0]):
            raise ValueError(f"{name}: SDIRK needs one positive diagonal value gamma on the implicit stages")
        if not np.array_equal(a[-1], tab.b) or not np.isclose(tab.c[-1], 1.0, rtol=0, atol=1e-12):
            raise ValueError(f"{name}: SDIRK needs a stiffly accurate tableau (a[-1] == b, c[-1] == 1)")
        if not (isinstance(self.max_iters, int) and self.max_iters >= 1):
            raise ValueError(f"max_iters must be a positive integer, got {self.max_iters!r}")
        if not self.kappa > 0:
            raise ValueError(f"kappa must be positive, got {self.kappa!r}")
        if not isinstance(self.linear_solver, AbstractLinearSolver):
            raise TypeError(f"linear_solver must be a diffode linear solver, got {self.linear_solver!r}")

    @property
    def gamma(self) -> float:
        return float(self.tableau.a[-1, -1])

    def init(self, f, t0, y0, f0):
        one = jnp.ones((), y0.dtype)
        matrix = linear.iteration_matrix(self.linear_solver, f, t0, y0, (one,), (one,))
        return SDIRKState(f0, jnp.asarray(True), one, matrix)

    def dense_zeros(self, y0):
        return jnp.zeros((2,) + y0.shape, y0.dtype)

    def step(self, f, t0, y0, h, state, tol):
        tab = self.tableau
        s = tab.num_stages
        a = tab.a
        first = 1 if a[0, 0] == 0 else 0
        dtype = y0.dtype
        a_full = jnp.asarray(a, dtype)
        c = jnp.asarray(tab.c, dtype)
        gh = (self.gamma * h).astype(dtype)
        f0 = state.f0

        # J and its factors only steer simplified Newton: the derivative of the
        # step comes from the implicit function theorem below, not from them.
        matrix, num_jac, num_lu = linear.update(
            self.linear_solver, f, t0, y0, state.matrix, state.new_jac, (jnp.ones((), dtype),), (gh,)
        )
        matrix = lax.stop_gradient(matrix)
        kappa = effective_kappa(self.kappa, tol, dtype)
        ks0 = jnp.zeros((s,) + y0.shape, dtype)
        if first == 1:
            ks0 = ks0.at[0].set(f0)

        def all_ks(k_impl):
            return jnp.concatenate([f0[None], k_impl]) if first == 1 else k_impl

        def residual(k_impl):
            # G(K)_i = k_i - f(t0 + c_i h, y0 + h sum_j a_ij k_j) over the
            # implicit stages i (the explicit stage k_1 = f0 is known).
            ys = y0 + h * (a_full[first:] @ all_ks(k_impl))
            ts = t0 + c[first:] * h
            return k_impl - jax.vmap(lambda t, y: f(t, y))(ts, ys)

        def newton(_residual, _guess):
            ks, eta, theta_max, iters, status = self._newton_stages(
                f, t0, y0, h, gh, ks0, matrix, tol, kappa, state.eta
            )
            # Integer aux outputs would get int tangents in custom_root's JVP
            # rule (JAX wants float0): pass them as (exact) floats.
            return ks[first:], (eta, theta_max, iters.astype(dtype), status.astype(dtype))

        k_impl, (eta, theta_max, iters, status) = lax.custom_root(
            residual, ks0[first:], newton, self._tangent_solve, has_aux=True
        )
        iters, status = iters.astype(jnp.int32), status.astype(jnp.int32)
        ok = status == CONVERGED
        ks = all_ks(k_impl)

        # Stiffly accurate: y1 is the last stage value. A Newton failure on NaN or
        # inf makes y1 NaN, so that the loop reports the non-finite value.
        y1 = y0 + h * (a_full[s - 1] @ ks)
        y1 = select(status == NONFINITE, jnp.nan, y1)
        f1 = ks[s - 1]
        y_error = h * (jnp.asarray(tab.b_error, dtype) @ ks) if tab.embedded else None

        slow = theta_max > self.jac_theta
        fresh = state.new_jac
        accepted_state = SDIRKState(f1, slow, eta, matrix)
        # A rejected attempt restarts from the same (t0, y0): a J computed there
        # is still exact, so only an older one is worth recomputing.
        rejected_state = SDIRKState(f0, (~ok | slow) & ~fresh, select(ok, eta, jnp.ones((), dtype)), matrix)
        counts = dict(num_jac_evals=num_jac, num_lu_decomps=num_lu, num_newton_iters=iters)
        return StepResult(y1, y_error, jnp.stack([f0, f1]), accepted_state, rejected_state, ok, iters, counts)

    def _newton_stages(self, f, t0, y0, h, gh, ks0, matrix, tol, kappa, eta0):
        """All implicit stages by simplified Newton in one ``lax.while_loop``.

        Returns ``(ks, eta, theta_max, iters, status)``; ``ks`` are the stage
        derivatives ``k_i = z_i / (gamma h)``. Not differentiated (see ``step``).
        """
        tab = self.tableau
        s = tab.num_stages
        a = tab.a
        first = 1 if a[0, 0] == 0 else 0
        dtype = y0.dtype
        a_strict = jnp.asarray(np.tril(a, -1), dtype)
        c = jnp.asarray(tab.c, dtype)
        f0 = ks0[0]

        # Starting values z_i^0 = Y_i^0 - base_i; an SDIRK's first stage starts
        # from y0 + c_1 h f0.
        pred = jnp.asarray(_stage_predictors(tab) - np.tril(a, -1), dtype)
        z_init = h * (pred[first] @ ks0) if first == 1 else (float(tab.c[0]) * h) * f0

        # Carry: stage i, iteration k (within the stage), z (the current
        # stage's unknown), the stage derivatives, ||dz_{k-1}||, eta, max
        # theta, total iterations, status. When a stage converges, z becomes
        # the next stage's starting value from the predictor weights.
        def cond(cr):
            return cr[8] == RUNNING

        def body(cr):
            i, k, z, ks, ndz_prev, eta, theta_max, iters, _ = cr
            base = y0 + h * (a_strict[i] @ ks)
            ti = t0 + c[i] * h
            z, ndz, theta, eta, st = stage_newton_iteration(
                f,
                self.linear_solver,
                matrix,
                ti,
                base,
                z,
                gh,
                tol,
                k,
                ndz_prev,
                first_eta(eta),
                self.max_iters,
                kappa,
            )
            conv = st == CONVERGED
            ks = select(conv, lax.dynamic_update_index_in_dim(ks, z / gh, i, 0), ks)
            last = i == s - 1
            status = select(st >= FAILED, st, select(conv & last, CONVERGED, RUNNING))
            advance = conv & ~last
            i_next = i + advance.astype(jnp.int32)
            z_next = select(advance, h * (pred[i_next] @ ks), z)
            return (
                i_next,
                select(conv, 0, k + 1).astype(jnp.int32),
                z_next,
                ks,
                ndz,
                eta,
                jnp.maximum(theta_max, theta),
                iters + 1,
                status.astype(jnp.int32),
            )

        i32 = lambda v: jnp.asarray(v, jnp.int32)
        zero = jnp.zeros((), dtype)
        init = (i32(first), i32(0), z_init, ks0, zero, eta0, zero, i32(0), i32(RUNNING))
        _, _, _, ks, _, eta, theta_max, iters, status = lax.while_loop(cond, body, init)
        return ks, eta, theta_max, iters, status

    def _tangent_solve(self, g, b):
        """Solve ``g(x) = b`` for the linearised stage residual ``g = dG/dK`` (``custom_root``).

        ``g`` is ``I - (J_i h a_ij)`` on the ``m`` implicit stages (block lower
        triangular), solved by the step's linear solver
        (:func:`diffode.solvers.linear.solve_linear_map`): :class:`~diffode.LU`
        forms the ``(m n) x (m n)`` matrix and solves exactly, so derivatives are
        the exact implicit-function-theorem derivatives at the converged stages;
        :class:`~diffode.GMRES` stays matrix-free, so derivatives are accurate
        to about its ``rtol``.
        """
        return linear.solve_linear_map(self.linear_solver, g, b)

    def interpolate(self, h, y0, y1, dense, theta):
        """Cubic Hermite from the step's end values and slopes."""
        return hermite(theta, h, y0, y1, dense[0], dense[1])


def _stage_predictors(tab: ButcherTableau, max_nodes: int = 3) -> np.ndarray:
    """Weights ``P`` of the Newton starting values ``Y_i^0 = y0 + h sum_j P[i, j] k_j``.

    A stage at the node of an earlier implicit stage starts from that stage's
    value (for Kvaerno's methods: the last stage starts from the embedded
    solution, so its Newton correction is the size of the error estimate).
    Otherwise the derivative polynomial through the ``max_nodes`` latest
    stages with distinct nodes (the explicit stage ``f0`` at ``c = 0``
    included) is integrated from 0 to ``c_i``: the stage-value extrapolation of
    Hairer and Wanner, IV.8 ("starting values"), applied to the incomplete step.
    """
    a, c, s = tab.a, tab.c, tab.num_stages
    first = 1 if a[0, 0] == 0 else 0
    P = np.zeros((s, s))
    for i in range(first, s):
        same = [j for j in range(first, i) if np.isclose(c[j], c[i], rtol=0, atol=1e-12)]
        if same:
            P[i] = a[same[-1]]
            continue
        nodes: list[int] = []
        for j in range(i - 1, -1, -1):
            if len(nodes) < max_nodes and not any(np.isclose(c[j], c[m], rtol=0, atol=1e-12) for m in nodes):
                nodes.append(j)
        for j in nodes:
            basis = np.poly1d([1.0])  # Lagrange basis polynomial of node j
            for m in nodes:
                if m != j:
                    basis = basis * np.poly1d([1.0, -c[m]]) / (c[j] - c[m])
            integral = basis.integ()
            P[i, j] = integral(c[i]) - integral(0.0)
    return P


# ----------------------------------------------------------------------------
# Implicit Euler as a two-stage ESDIRK: the explicit first stage is f0 (free),
# the second is Y = y0 + h f(t0 + h, Y). The error estimate is the difference
# with the trapezoidal rule, y_err = (h / 2) (f1 - f0) = O(h^2): its weights
# b - b_trap = (-1/2, 1/2).
# ----------------------------------------------------------------------------
IMPLICIT_EULER_TABLEAU = ButcherTableau(
    a=[[0.0, 0.0], [0.0, 1.0]],
    b=[0.0, 1.0],
    c=[0.0, 1.0],
    order=1,
    b_error=[-0.5, 0.5],
    name="ImplicitEuler",
)

# ----------------------------------------------------------------------------
# Kvaerno (2004), "Singly diagonally implicit Runge-Kutta methods with an
# explicit first stage", BIT Numer. Math. 44(3), 489-502. Both methods are
# stiffly accurate and L-stable, and so is their embedded method: it is the
# second-to-last stage (also at c = 1), so b_hat = a[-2] and the error
# estimate is y1 - Y_{s-1}.
#
# ESDIRK 3(2), four stages: gamma is the root near 0.4359 of
# gamma^3 - 3 gamma^2 + 3/2 gamma - 1/6 = 0 (to double precision; the paper
# prints 0.4358665215), the other coefficients are the paper's closed forms.
# ----------------------------------------------------------------------------
_G3 = 0.43586652150845899942
_KVAERNO3_A = np.array(
    [
        [0.0, 0.0, 0.0, 0.0],
        [_G3, _G3, 0.0, 0.0],
        [(-4 * _G3**2 + 6 * _G3 - 1) / (4 * _G3), (-2 * _G3 + 1) / (4 * _G3), _G3, 0.0],
        [
            (6 * _G3 - 1) / (12 * _G3),
            -1 / ((24 * _G3 - 12) * _G3),
            (-6 * _G3**2 + 6 * _G3 - 1) / (6 * _G3 - 3),
            _G3,
        ],
    ]
)
KVAERNO3_TABLEAU = ButcherTableau(
    a=_KVAERNO3_A,
    b=_KVAERNO3_A[3],
    c=_KVAERNO3_A.sum(axis=1),
    order=3,
    b_error=_KVAERNO3_A[3] - _KVAERNO3_A[2],
    name="Kvaerno3",
)

# ESDIRK 5(4), seven stages, gamma = 0.26 (coefficients as tabulated in the
# paper, also in diffrax and OrdinaryDiffEq).
_G5 = 0.26
_KVAERNO5_A = np.array(
    [
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [_G5, _G5, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.13, 0.84033320996790809, _G5, 0.0, 0.0, 0.0, 0.0],
        [0.22371961478320505, 0.47675532319799699, -0.06470895363112615, _G5, 0.0, 0.0, 0.0],
        [0.16648564323248321, 0.10450018841591720, 0.03631482272098715, -0.13090704451073998, _G5, 0.0, 0.0],
        [0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141, 0.61943039072480676, _G5, 0.0],
        [
            0.13659751177640291,
            0.0,
            -0.05496908796538376,
            -0.04118626728321046,
            0.62993304899016403,
            0.06962479448202728,
            _G5,
        ],
    ]
)
KVAERNO5_TABLEAU = ButcherTableau(
    a=_KVAERNO5_A,
    b=_KVAERNO5_A[6],
    c=_KVAERNO5_A.sum(axis=1),
    order=5,
    b_error=_KVAERNO5_A[6] - _KVAERNO5_A[5],
    name="Kvaerno5",
)


class ImplicitEuler(SDIRK):
    """Backward Euler, order 1, L-stable. Adaptive with the trapezoidal-rule
    estimate ``(h / 2)(f1 - f0)`` (local order 2); fixed steps work too."""

    tableau: ButcherTableau = eqx.field(static=True, default=IMPLICIT_EULER_TABLEAU)

    @property
    def error_order(self) -> int:
        return 2


class Kvaerno3(SDIRK):
    """Kvaerno's ESDIRK 3(2), four stages, L-stable, stiffly accurate (BIT 44, 2004)."""

    tableau: ButcherTableau = eqx.field(static=True, default=KVAERNO3_TABLEAU)


class Kvaerno5(SDIRK):
    """Kvaerno's ESDIRK 5(4), seven stages, L-stable, stiffly accurate (BIT 44, 2004)."""

    tableau: ButcherTableau = eqx.field(static=True, default=KVAERNO5_TABLEAU)
