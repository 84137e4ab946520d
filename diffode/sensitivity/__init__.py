"""Sensitivity methods: how ``diffode.solve`` is differentiated (``sensitivity=``).

* :class:`Direct`: through the solver steps (discretise-then-optimise), reverse
  mode with every step stored or with checkpoints, and forward mode.
* :class:`ForwardSensitivity`: the forward sensitivity equations.
* :class:`BacksolveAdjoint`: the continuous adjoint, re-solving ``y`` backwards.
* :class:`InterpolatingAdjoint`: the continuous adjoint on the stored forward solution.
* :class:`Auto`: the default; picks one of the above.

Every method's derivative is one ``custom_jvp`` whose tangent is a linear map
with the method's reverse rule as its transpose (see ``_base`` and
``_linear_map``), so each works under every JAX transformation.
"""

from ._base import AbstractSensitivity, Problem, split_args
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
    "Problem",
    "split_args",
]
