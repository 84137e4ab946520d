"""``Auto``: the default sensitivity method, chosen from the problem's size."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from ._base import AbstractSensitivity, loop_tangent
from .direct import DEFAULT_MEMORY_BUDGET, check_budget
from .forward import ForwardSensitivity
from .interpolating import InterpolatingAdjoint


class Auto(AbstractSensitivity):
    """Pick a sensitivity method from the problem (the default of :func:`diffode.solve`).

    With ``n`` states and ``p`` differentiated inputs (the entries of ``y0``, ``ts``
    and the parameters that carry a tangent):

    * ``n * (p + 1) <= max_forward_size``: :class:`ForwardSensitivity` (the augmented
      system is small, and one forward solve beats a forward plus a backward solve),
      in forward and reverse mode alike;
    * otherwise forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``)
      differentiates through the solver's steps, and reverse mode is
      :class:`InterpolatingAdjoint`, which is stable on stiff problems. Backsolve is
      never picked: re-solving ``y`` backwards is unstable for stiff
      (implicit-solver) problems and gains only memory.

    ``max_forward_size`` comes from ``python -m benchmarks.auto_threshold``, which
    times both on ``y' = tanh(W y + b)`` with growing ``n``: forward sensitivities
    were faster up to ``n (p + 1) = 584`` and slower from ``1884`` (2-core CPU,
    float64); 1024 lies between. See ``benchmarks/README.md``.

    ``memory_budget`` (bytes, default ``DEFAULT_MEMORY_BUDGET`` = 1 GiB, ``None``: no
    limit) is passed to :class:`InterpolatingAdjoint`: it bounds what the reverse pass
    keeps of the forward solution. Forward sensitivities keep no per-step record.
    """

    max_forward_size: int = eqx.field(static=True, default=1024)
    memory_budget: int | None = eqx.field(static=True, default=DEFAULT_MEMORY_BUDGET)

    def __check_init__(self):
        check_budget("Auto", self.memory_budget)

    def choose(self, n: int, p: int) -> AbstractSensitivity:
        """The reverse-mode method for ``n`` states and ``p`` differentiated input entries."""
        if n * (p + 1) <= self.max_forward_size:
            return ForwardSensitivity()
        return InterpolatingAdjoint(memory_budget=self.memory_budget)

    def _chosen(self, y0, ts, params, x) -> AbstractSensitivity:
        dy0, dts, dparams = x
        p = (0 if dy0 is None else jnp.size(y0)) + (0 if dts is None else jnp.size(ts))
        p += sum(jtu.tree_leaves(jtu.tree_map(lambda v, d: 0 if d is None else jnp.size(v), params, dparams)))
        return self.choose(jnp.size(y0), p)

    def fused_jvp(self, loop, prob, primals, x):
        return self._chosen(primals[0], primals[1], primals[2], x).fused_jvp(loop, prob, primals, x)

    def tangent(self, loop, prob, r, x):
        return loop_tangent(loop, prob, r, x)

    def cotangent(self, loop, prob, r, ys_bar, x_struct):
        # Only reached for large problems (small ones take ForwardSensitivity's fused rule).
        return InterpolatingAdjoint(memory_budget=self.memory_budget).cotangent(loop, prob, r, ys_bar, x_struct)
