"""The interface every stepper implements; the solve loop only talks to this."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, NamedTuple

import equinox as eqx
import jax
from jaxtyping import Array, Bool, Float


class FlatRHS:
    """The right-hand side as solvers see it: ``f(t, y) -> dy/dt`` on flat ``(n,)`` vectors.

    Besides being callable it offers the derivatives implicit solvers need:
    :meth:`jac` (the user's Jacobian when one was given to ``solve``, else
    ``jax.jacfwd``), :meth:`jvp` (``J @ v`` without forming ``J``), :meth:`vjp`
    (``J^T @ v``, for transposed solves) and :meth:`dfdt` (for Rosenbrock
    methods on non-autonomous problems).
    """

    def __init__(
        self, fn: Callable[[Array, Array], Array], jac_fn: Callable[[Array, Array], Array] | None = None
    ):
        self.fn = fn
        self.jac_fn = jac_fn

    def __call__(self, t: Array, y: Array) -> Array:
        return self.fn(t, y)

    def jac(self, t: Array, y: Array) -> Float[Array, "n n"]:
        if self.jac_fn is not None:
            return self.jac_fn(t, y)
        return jax.jacfwd(self.fn, argnums=1)(t, y)

    def jvp(self, t: Array, y: Array, v: Array) -> Array:
        return jax.jvp(lambda z: self.fn(t, z), (y,), (v,))[1]

    def vjp(self, t: Array, y: Array, v: Array) -> Array:
        return jax.vjp(lambda z: self.fn(t, z), y)[1](v)[0]

    def dfdt(self, t: Array, y: Array) -> Array:
        return jax.jvp(lambda s: self.fn(s, y), (t,), (jax.numpy.ones_like(t),))[1]


class Tolerances(NamedTuple):
    """The solve's tolerances, for solvers with inner iterations (Newton, Krylov).

    ``rtol`` and ``atol`` are scalars or hold one entry per state component.
    """

    rtol: Array
    atol: Array
    norm: Callable[[Array], Array]

    @classmethod
    def for_state(cls, rtol, atol, norm: Callable[[Array], Array], y: Array) -> "Tolerances":
        """The tolerances for the flat state ``y``, in its dtype (see :func:`fit_tolerance`)."""
        return cls(fit_tolerance(rtol, y), fit_tolerance(atol, y), norm)

    def scaled_norm(self, x: Array, y: Array) -> Array:
        """``norm(x / (atol + rtol * |y|))``: below 1 means "within tolerance"."""
        return self.norm(x / (self.atol + self.rtol * jax.numpy.abs(y)))


def fit_tolerance(tol, y: Array) -> Array:
    """A scalar or per-component tolerance, fitted to the flat state ``y`` (in its dtype).

    Per-component tolerances are given for the ``n`` components of the solved
    state. An augmented state (the sensitivity methods solve ``[y, s_1, s_2, ...]``
    or ``[y, lambda, mu]``) is laid out in blocks of ``n``: each whole block
    repeats the tolerances, so a sensitivity of component ``i`` gets component
    ``i``'s; a shorter remainder (a parameter integral) gets the smallest one.
    """
    tol = jax.numpy.asarray(tol, y.dtype)
    m = y.shape[0]
    if tol.ndim == 0 or tol.shape[0] == m:
        return tol
    n = tol.shape[0]
    blocks = [tol] * (m // n)
    if m % n:
        blocks.append(jax.numpy.full((m % n,), jax.numpy.min(tol), y.dtype))
    return jax.numpy.concatenate(blocks)


class StepResult(NamedTuple):
    """What one attempted step returns to the solve loop.

    ``dense`` is whatever the solver's :meth:`AbstractSolver.interpolate` needs
    besides the step's end points (for Runge-Kutta methods: the stages).
    """

    y1: Float[Array, " n"]
    y_error: Float[Array, " n"] | None
    dense: Float[Array, "..."]
    state: Any  # solver state to carry forward if the step is accepted
    rejected_state: Any  # solver state to carry forward if it is rejected
    ok: Bool[Array, ""] | bool  # False when the stepper itself failed (e.g. Newton)
    num_fevals: Any
    counts: dict[str, Any]  # solver-specific statistics, summed by the loop


class AbstractSolver(eqx.Module):
    """Base class of all steppers: the only interface the solve loop uses.

    The loop owns time, step-size control, saving and error handling; a solver
    only maps ``(t0, y0, h, state)`` to a :class:`StepResult` on flat ``(n,)``
    states. To write a new solver:

    1. Subclass ``AbstractSolver`` (or :class:`AbstractTableauSolver` when a
       tableau gives the order). Configuration goes in fields: static ones
       (``eqx.field(static=True)``) for Python numbers and tables, plain ones
       for sub-modules such as a linear solver.
    2. Give ``order`` (the method's order), ``error_order`` (the local order of
       the error estimate, which sets the controller's exponent; defaults to
       ``order``) and ``embedded`` (whether :meth:`step` returns an error
       estimate; without one the solver runs with fixed steps only).
    3. Implement :meth:`init`: the state carried from step to step (a pytree of
       arrays of fixed shapes, since it rides in a ``lax.while_loop``), given
       ``f0 = f(t0, y0)``. Reuse ``f0`` (FSAL) through the state if the method
       can.
    4. Implement :meth:`step`: one attempt from ``(t0, y0)`` with step ``h``.
       Return the :class:`StepResult`: ``y1``, the error estimate ``y_error``
       (or ``None``), the ``dense`` data for :meth:`interpolate`, the state
       for the next step if the loop accepts the step and the one if it
       rejects it, ``ok`` (false when the solver itself failed, for instance
       Newton did not converge: the loop then shrinks ``h``), the number of
       ``f`` evaluations and the solver's counters (named in ``stat_names``).
       Evaluate ``f`` only through the :class:`FlatRHS` passed in, which
       offers ``jac``, ``jvp``, ``vjp`` and ``dfdt`` as well. ``tol`` gives the
       solve's tolerances for inner iterations. Everything must be traceable
       (no Python control flow on values) and should be differentiable by
       ``jax.jvp`` (the sensitivity methods differentiate steps; an inner
       iteration belongs inside ``lax.custom_root`` so that only its root is
       differentiated, as in :mod:`diffode.solvers.sdirk` and
       :mod:`diffode.solvers.radau`).
    5. Implement :meth:`dense_zeros` (zeros shaped like ``StepResult.dense``)
       and :meth:`interpolate` (the state at ``t0 + theta h`` from a step's end
       points and its ``dense`` data).
    6. Implicit methods solve their linear systems through
       :mod:`diffode.solvers.linear`: take a ``linear_solver`` field, keep a
       :class:`~diffode.solvers.linear.IterationMatrix` in the state, call
       :func:`~diffode.solvers.linear.update` once per step (it decides when to
       re-evaluate ``J`` and when to refactor) and
       :func:`~diffode.solvers.linear.solve` per solve; simplified Newton
       iterations share :mod:`diffode.solvers.stage_newton`'s convergence test.
    7. Test it: its order of convergence, against a reference solution, under
       ``jit``, ``vmap`` and ``grad`` (see ``tests/test_explicit.py`` and
       ``tests/test_implicit.py``). The sensitivity method ``Direct`` replays
       only the built-in solver families; other solvers use
       ``ForwardSensitivity`` or an adjoint.
    """

    #: Names of the solver-specific counters reported in ``Solution.stats``.
    stat_names: ClassVar[tuple[str, ...]] = ()

    @property
    def order(self) -> int:
        raise NotImplementedError

    @property
    def error_order(self) -> int:
        """Exponent denominator for step control: the local order of the estimate."""
        return self.order

    @property
    def embedded(self) -> bool:
        """Whether :meth:`step` returns an error estimate (adaptive stepping)."""
        raise NotImplementedError

    def dense_zeros(self, y0: Array) -> Array:
        """Zeros shaped like ``StepResult.dense`` (initial loop carry)."""
        raise NotImplementedError

    def init(self, f: FlatRHS, t0: Array, y0: Array, f0: Array) -> Any:
        """Initial solver state, given ``f0 = f(t0, y0)`` (already counted)."""
        raise NotImplementedError

    def restart(self, f: FlatRHS, t0: Array, y0: Array, state: Any) -> tuple[Any, int]:
        """``(state, num_fevals)``: the state for a step from ``(t0, y0)`` that starts afresh,
        as after a discontinuity of ``f`` at ``t0`` (``solve(..., tstops=...)``): by default
        :meth:`init` with a new ``f(t0, y0)`` (one evaluation), so that nothing carried from
        before ``t0`` (a first-same-as-last derivative, Newton's starting values) is used."""
        return self.init(f, t0, y0, f(t0, y0)), 1

    def step(self, f: FlatRHS, t0: Array, y0: Array, h: Array, state: Any, tol: Tolerances) -> StepResult:
        """One attempted step from ``(t0, y0)`` of size ``h``.

        ``tol`` carries the solve's tolerances for inner iterations; explicit
        methods ignore it.
        """
        raise NotImplementedError

    def interpolate(self, h: Array, y0: Array, y1: Array, dense: Array, theta: Array) -> Array:
        """State at ``t0 + theta * h`` within a step, from its ``StepResult.dense``."""
        raise NotImplementedError


class AbstractTableauSolver(AbstractSolver):
    """A solver driven by a tableau (Butcher or Rosenbrock): its order and whether it
    has an error estimate are the tableau's."""

    tableau: eqx.AbstractVar[Any]

    @property
    def order(self) -> int:
        return self.tableau.order

    @property
    def embedded(self) -> bool:
        return self.tableau.embedded
