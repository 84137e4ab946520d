"""Sensitivity methods: how ``diffode.solve`` is differentiated (``sensitivity=``).

* :class:`Direct`: through the solver steps (discretise-then-optimise), reverse
  mode with every step stored or with checkpoints, and forward mode.
* :class:`ForwardSensitivity`: the forward sensitivity equations.
* :class:`BacksolveAdjoint`: the continuous adjoint, re-solving ``y`` backwards.
* :class:`InterpolatingAdjoint`: the continuous adjoint on the stored forward solution.
* :class:`Auto`: the default; picks one of the above.
"""

from ._base import AbstractSensitivity, forward_mode_active, reverse_mode_active, split_args
from .auto import Auto
from .backsolve import BacksolveAdjoint
from .direct import Direct
from .forward import ForwardSensitivity
from .interpolating import InterpolatingAdjoint

__all__ = [
    "AbstractSensitivity",
    "Auto",
    "BacksolveAdjoint",
    "Direct",
    "ForwardSensitivity",
    "InterpolatingAdjoint",
    "forward_mode_active",
    "reverse_mode_active",
    "split_args",
]
