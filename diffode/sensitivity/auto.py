"""``Auto``: the default sensitivity method, chosen from the problem's size and solver."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from ._base import AbstractSensitivity, reverse_mode_active, split_args


class Auto(AbstractSensitivity):
    """Pick a sensitivity method from the problem (the default of :func:`diffode.solve`).

    * Without reverse-mode differentiation (plain calls, ``jax.jvp``,
      ``jax.jacfwd``) nothing is chosen: the solve runs (and is differentiated
      through its steps, which is exact and cheapest) as it is.
    * Under reverse mode, with ``n`` states and ``p`` differentiated parameters
      (``y0``, ``ts`` and the inexact leaves of ``args``):
      :class:`ForwardSensitivity` when ``n * (p + 1) <= max_forward_size`` (the
      augmented system is small, and one forward solve beats a forward plus a
      backward solve); otherwise :class:`InterpolatingAdjoint`, which is stable on
      stiff problems. Backsolve is never picked: re-solving ``y`` backwards is
      unstable for stiff (implicit-solver) problems and gains only memory.

    ``max_forward_size`` comes from ``python -m benchmarks.adjoints``, which times
    both on Lotka-Volterra with growing parameter counts; see ``benchmarks/README.md``.
    """

    max_forward_size: int = eqx.field(static=True, default=256)

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
        if reverse_mode_active(y0, ts, args):
            return self.choose(y0, ts, args).integrate(f, y0, ts, args, opts)
        from .._solve import integrate

        ys, counters, _ = integrate(f, y0, ts, args, opts)
        return ys, counters
