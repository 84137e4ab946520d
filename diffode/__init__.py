"""diffode: differentiable ODE solvers and sensitivities in JAX."""

from ._controller import PIDController, max_norm, rms_norm
from ._ensemble import solve_ensemble
from ._events import Event
from ._regularisers import Regularisers
from ._solution import MESSAGES, Solution, Stats, Status
from ._solve import solve
from .sensitivity import (
    AbstractSensitivity,
    Auto,
    BacksolveAdjoint,
    Direct,
    ForwardSensitivity,
    InterpolatingAdjoint,
)
from .solvers.base import AbstractSolver, FlatRHS, StepResult, Tolerances
from .solvers.butcher import ButcherTableau
from .solvers.colouring import Sparsity
from .solvers.explicit_rk import (
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
from .solvers.linear import GMRES, LU, AbstractLinearSolver
from .solvers.radau import Radau5
from .solvers.rosenbrock import Rodas5, Rodas5P, Rosenbrock, RosenbrockTableau
from .solvers.sdirk import SDIRK, ImplicitEuler, Kvaerno3, Kvaerno5
from .solvers.structured import BandedLU, SparseLU
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
    "BandedLU",
    "SparseLU",
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
    "solve_ensemble",
    "Sparsity",
    "Stats",
    "Status",
    "Event",
    "STEADY_STATE_MESSAGES",
    "steady_state",
    "SteadyState",
    "SteadyStateStatus",
    "StepResult",
    "Tolerances",
    "Tsit5",
]
