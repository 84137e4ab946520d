"""What :func:`diffode.steady_state` returns, and its status codes."""

from __future__ import annotations

import enum

import equinox as eqx
from jaxtyping import Array, Int, PyTree

from .._solution import Stats, status_message


class SteadyStateStatus(enum.IntEnum):
    """Integer codes in ``SteadyState.status``; ``STEADY_STATE_MESSAGES[code]`` explains each."""

    SUCCESS = 0
    MAX_STEPS_REACHED = 1
    SINGULAR_JACOBIAN = 2
    NO_PROGRESS = 3
    NONFINITE_RHS = 4
    NONFINITE_INPUT = 5
    BAD_TOLERANCE = 6
    RHS_STRUCTURE_MISMATCH = 7
    ODE_FAILED = 8


STEADY_STATE_MESSAGES: dict[int, str] = {
    SteadyStateStatus.SUCCESS: "A steady state was found: max|f(t, y, args)| <= tol.",
    SteadyStateStatus.MAX_STEPS_REACHED: (
        "steady_state did not reach max|f| <= tol within max_steps iterations. Either it converges "
        "slowly (raise max_steps or loosen tol) or there is no steady state to converge to (for "
        "example y' = 1)."
    ),
    SteadyStateStatus.SINGULAR_JACOBIAN: (
        "The Jacobian df/dy is singular at an iterate (or, with GMRES, the Krylov solve did not "
        "converge), so there is no Newton step. Either there is no steady state near y0 (for "
        "example y' = 1), or the steady states are not isolated (a conservation law: remove the "
        "conserved quantities from the state, or use PseudoTransient)."
    ),
    SteadyStateStatus.NO_PROGRESS: (
        "The iteration stopped making progress (Newton's line search could not reduce |f|, or "
        "pseudo-time steps became too small to move y). The iterate may be at a local minimum of "
        "|f| that is not a root, so there may be no steady state near y0 (for example "
        "y' = 1 + y**2), or tol is below the rounding error of f (loosen tol). PseudoTransient "
        "or IntegrateToSteady may get further than Newton."
    ),
    SteadyStateStatus.NONFINITE_RHS: (
        "f returned NaN or inf at the iterate (or at every trial point near it), and smaller "
        "steps did not help."
    ),
    SteadyStateStatus.NONFINITE_INPUT: "y0, t or args contains NaN or inf.",
    SteadyStateStatus.BAD_TOLERANCE: "tol must be positive and finite.",
    SteadyStateStatus.RHS_STRUCTURE_MISMATCH: (
        "f(t, y, args) must return a pytree with the same structure and leaf shapes as y0."
    ),
    SteadyStateStatus.ODE_FAILED: (
        "The ODE solve towards the steady state failed; stats['ode_status'] holds its "
        "diffode.Status code (see diffode.MESSAGES)."
    ),
}

#: Messages in code order, indexed by the status code when raising.
STEADY_STATE_MESSAGE_LIST: tuple[str, ...] = tuple(STEADY_STATE_MESSAGES[s] for s in SteadyStateStatus)

#: Raised (or turned into NaN derivatives with ``throw=False``) when a derivative is
#: asked for at a steady state whose Jacobian cannot be inverted.
SINGULAR_DERIVATIVE_MESSAGE = (
    "Cannot differentiate the steady state: the linear solve with the Jacobian df/dy at y* "
    "failed (the Jacobian is singular, so the steady state is not isolated and the implicit "
    "function theorem does not apply; with GMRES, the Krylov solve may not have converged)."
)

#: Counter names of ``SteadyState.stats``, in the order of the counter vector.
STAT_NAMES: tuple[str, ...] = (
    "num_iterations",  # Newton iterations, pseudo-time steps or ODE stretches
    "num_fevals",  # evaluations of f (Jacobian-vector products not counted)
    "num_jac_evals",  # dense Jacobians formed
    "num_linear_solves",
    "num_rejected",  # line-search backtracks, rejected pseudo-time steps, rejected ODE steps
    "num_ode_steps",  # IntegrateToSteady only: attempted ODE steps over all stretches
    "ode_status",  # IntegrateToSteady only: diffode.Status of the last ODE stretch
)


class SteadyState(eqx.Module):
    """What :func:`diffode.steady_state` returns.

    Attributes:
        y: the steady state ``y*``, with the structure of ``y0``. It is
            differentiable (implicit function theorem; see :func:`steady_state`).
            When ``status`` is not 0 it is NaN, and so are its derivatives
            (``residual`` tells how far the last iterate was from a root).
        status: 0 on success; see :class:`SteadyStateStatus` and :attr:`message`.
        stats: counters: ``num_iterations``, ``num_fevals``, ``num_jac_evals``,
            ``num_linear_solves``, ``num_rejected``, ``num_ode_steps``, ``ode_status``.
        residual: ``max|f(t, y, args)|`` at the returned state (not differentiated).
    """

    y: PyTree
    status: Int[Array, ""]
    stats: Stats
    residual: Array

    @property
    def success(self) -> Array:
        return self.status == SteadyStateStatus.SUCCESS

    @property
    def message(self) -> str | list:
        """Human-readable status (outside ``jit`` only); a nested list when batched."""
        return status_message(self.status, STEADY_STATE_MESSAGES)
