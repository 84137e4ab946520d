"""Steady states ``f(t, y*, args) = 0`` with implicit-function derivatives.

:func:`steady_state` is the entry point; the methods are :class:`Newton`,
:class:`PseudoTransient` and :class:`IntegrateToSteady`.
"""

from ._base import AbstractSteadyStateMethod
from ._result import STEADY_STATE_MESSAGES, SteadyState, SteadyStateStatus
from ._steady_state import steady_state
from .integrate import IntegrateToSteady
from .newton import Newton
from .pseudo_transient import PseudoTransient

__all__ = [
    "AbstractSteadyStateMethod",
    "IntegrateToSteady",
    "Newton",
    "PseudoTransient",
    "STEADY_STATE_MESSAGES",
    "SteadyState",
    "SteadyStateStatus",
    "steady_state",
]
