"""diffode: differentiable ODE solvers and sensitivities in JAX."""

from ._controller import PIDController, max_norm, rms_norm
from ._explicit import (
    RK4,
    Bosh3,
    Dopri5,
    Dopri8,
    Euler,
    ExplicitRK,
    Heun,
    Midpoint,
    Ralston,
    Tsit5,
)
from ._implicit import SDIRK, ImplicitEuler, Kvaerno3, Kvaerno5
from ._linsolve import GMRES, LU, AbstractLinearSolver
from ._radau import Radau5
from ._rosenbrock import Rodas5, Rodas5P, Rosenbrock, RosenbrockTableau
from .sensitivity import (
    AbstractSensitivity,
    Auto,
    BacksolveAdjoint,
    Direct,
    ForwardSensitivity,
    InterpolatingAdjoint,
)
from ._regularisers import Regularisers
from ._solution import MESSAGES, Solution, Stats, Status
from ._solve import solve
from ._solver import AbstractSolver, FlatRHS, StepResult, Tolerances
from ._tableau import ButcherTableau
from .steady import (
    STEADY_STATE_MESSAGES,
    AbstractSteadyStateMethod,
    IntegrateToSteady,
    Newton,
    PseudoTransient,
    SteadyState,
    SteadyStateStatus,
    steady_state,
)

__version__ = "0.1.0"

__all__ = [
    "AbstractLinearSolver",
    "AbstractSensitivity",
    "AbstractSolver",
    "AbstractSteadyStateMethod",
    "Auto",
    "BacksolveAdjoint",
    "Bosh3",
    "ButcherTableau",
    "Direct",
    "Dopri5",
    "Dopri8",
    "Euler",
    "ExplicitRK",
    "FlatRHS",
    "ForwardSensitivity",
    "GMRES",
    "Heun",
    "ImplicitEuler",
    "IntegrateToSteady",
    "InterpolatingAdjoint",
    "Kvaerno3",
    "Kvaerno5",
    "LU",
    "max_norm",
    "MESSAGES",
    "Midpoint",
    "Newton",
    "PIDController",
    "PseudoTransient",
    "Radau5",
    "Ralston",
    "RK4",
    "rms_norm",
    "Rodas5",
    "Rodas5P",
    "Rosenbrock",
    "RosenbrockTableau",
    "SDIRK",
    "Regularisers",
    "Solution",
    "solve",
    "Stats",
    "Status",
    "STEADY_STATE_MESSAGES",
    "steady_state",
    "SteadyState",
    "SteadyStateStatus",
    "StepResult",
    "Tolerances",
    "Tsit5",
]
