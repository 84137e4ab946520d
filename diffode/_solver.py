"""The interface every stepper implements; the solve loop only talks to this."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, NamedTuple

import equinox as eqx
from jaxtyping import Array, Bool, Float

# A right-hand side on flat state vectors: ``f(t, y) -> dy/dt``, both ``(n,)``.
FlatRHS = Callable[[Array, Array], Array]


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
    """Base class of all steppers.

    Subclasses set ``order`` and implement :meth:`init` and :meth:`step`. The
    solve loop owns time, step-size control, saving and error handling; a solver
    only maps ``(t0, y0, h, state)`` to a :class:`StepResult`.
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

    @property
    def implicit(self) -> bool:
        return False

    def dense_zeros(self, y0: Array) -> Array:
        """Zeros shaped like ``StepResult.dense`` (initial loop carry)."""
        raise NotImplementedError

    def init(self, f: FlatRHS, t0: Array, y0: Array, f0: Array) -> Any:
        """Initial solver state, given ``f0 = f(t0, y0)`` (already counted)."""
        raise NotImplementedError

    def step(self, f: FlatRHS, t0: Array, y0: Array, h: Array, state: Any) -> StepResult:
        raise NotImplementedError

    def interpolate(self, h: Array, y0: Array, y1: Array, dense: Array, theta: Array) -> Array:
        """State at ``t0 + theta * h`` within a step, from its ``StepResult.dense``."""
        raise NotImplementedError
