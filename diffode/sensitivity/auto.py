"""``Auto``: the default sensitivity method, chosen from the problem's size and solver."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from ._base import AbstractSensitivity, forward_mode_active, split_args


class Auto(AbstractSensitivity):
    """Pick a sensitivity method from the problem (the default of :func:`diffode.solve`).

    * Under forward mode (``jax.jvp``/``jax.jacfwd`` applied directly) the solve
      is differentiated through its steps, which is exact and cheapest.
    * Under reverse mode, with ``n`` states and ``p`` differentiated parameters
      (``y0``, ``ts`` and the inexact leaves of ``args``):
      :class:`ForwardSensitivity` when ``n * (p + 1) <= max_forward_size`` (the
      augmented system is small, and one forward solve beats a forward plus a
      backward solve); otherwise :class:`InterpolatingAdjoint`, which is stable on
      stiff problems. Backsolve is never picked: re-solving ``y`` backwards is
      unstable for stiff (implicit-solver) problems and gains only memory.

    The choice is made for every solve, differentiated or not, so that its rules
    are in the traced program when a jitted solve is differentiated from outside
    (``jax.grad(jax.jit(f))``); undifferentiated, every method runs the plain loop.
    ``ForwardSensitivity`` supports forward and reverse mode in any nesting;
    ``InterpolatingAdjoint`` (large problems) reverse mode only there.

    ``max_forward_size`` comes from ``python -m benchmarks.auto_threshold``, which
    times both on ``y' = tanh(W y + b)`` with growing ``n``: forward sensitivities
    were faster up to ``n (p + 1) = 584`` and slower from ``1884`` (2-core CPU,
    float64); 1024 lies between. See ``benchmarks/README.md``.
    """

    max_forward_size: int = eqx.field(static=True, default=1024)

    def choose(self, y0, ts, args) -> AbstractSensitivity:
        """The method used for these inputs (reverse mode)."""
        from .forward import ForwardSensitivity
        from .interpolating import InterpolatingAdjoint

        diff, _ = split_args(args)
        p = jnp.size(y0) + jnp.size(ts) + sum(jnp.size(x) for x in jtu.tree_leaves(diff))
        if jnp.size(y0) * (p + 1) <= self.max_forward_size:
            return ForwardSensitivity()
        return InterpolatingAdjoint()

    def integrate(self, f, y0, ts, args, opts):
        if forward_mode_active(y0, ts, args):
            from .._solve import integrate

            ys, counters, _ = integrate(f, y0, ts, args, opts)
            return ys, counters
        # Chosen even when nothing is differentiated yet: a jitted solve may be
        # differentiated from outside the jit, where only the traced rules apply.
        return self.choose(y0, ts, args).integrate(f, y0, ts, args, opts)
