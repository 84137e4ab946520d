"""``Auto``: the default sensitivity method, chosen from the problem's size."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from ._base import AbstractSensitivity, loop_tangent
from .forward import ForwardSensitivity
from .interpolating import InterpolatingAdjoint


class Auto(AbstractSensitivity):
    """Pick a sensitivity method from the problem (the default of :func:`diffode.solve`).

    * Forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) differentiates
      through the solver's steps, which is exact for the discrete solution and
      cheapest.
    * Reverse mode, with ``n`` states and ``p`` differentiated inputs (the entries
      of ``y0``, ``ts`` and the parameters that carry a tangent):
      :class:`ForwardSensitivity` when ``n * (p + 1) <= max_forward_size`` (the
      augmented system is small, and one forward solve beats a forward plus a
      backward solve); otherwise :class:`InterpolatingAdjoint`, which is stable on
      stiff problems. Backsolve is never picked: re-solving ``y`` backwards is
      unstable for stiff (implicit-solver) problems and gains only memory.

    ``max_forward_size`` comes from ``python -m benchmarks.auto_threshold``, which
    times both on ``y' = tanh(W y + b)`` with growing ``n``: forward sensitivities
    were faster up to ``n (p + 1) = 584`` and slower from ``1884`` (2-core CPU,
    float64); 1024 lies between. See ``benchmarks/README.md``.
    """

    max_forward_size: int = eqx.field(static=True, default=1024)

    def choose(self, n: int, p: int) -> AbstractSensitivity:
        """The reverse-mode method for ``n`` states and ``p`` differentiated input entries."""
        if n * (p + 1) <= self.max_forward_size:
            return ForwardSensitivity()
        return InterpolatingAdjoint()

    def tangent(self, loop, prob, r, x):
        return loop_tangent(loop, prob, r, x)

    def cotangent(self, loop, prob, r, ys_bar, x_struct):
        y0, ts, params, _ = r
        sy, st, sp = x_struct
        p = (jnp.size(y0) if sy else 0) + (jnp.size(ts) if st else 0)
        p += sum(jtu.tree_leaves(jtu.tree_map(lambda v, s: 0 if s is None else jnp.size(v), params, sp)))
        return self.choose(jnp.size(y0), p).cotangent(loop, prob, r, ys_bar, x_struct)
