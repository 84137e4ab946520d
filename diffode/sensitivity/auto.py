"""``Auto``: the default sensitivity method, chosen from the problem's size."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from ..solvers.explicit_rk import ExplicitRK
from ..solvers.linear import AbstractDirectSolver
from ..solvers.radau import Radau5
from ..solvers.rosenbrock import Rosenbrock
from ..solvers.structured import BlockTridiagonalLU
from ._base import AbstractSensitivity, loop_tangent
from .direct import DEFAULT_MEMORY_BUDGET, Direct, check_budget
from .forward import ForwardSensitivity
from .interpolating import InterpolatingAdjoint


def _factorises(solver) -> bool:
    """Whether ``solver`` is implicit with a direct (factorising) linear solver."""
    return isinstance(getattr(solver, "linear_solver", None), AbstractDirectSolver)


class Auto(AbstractSensitivity):
    """Pick a sensitivity method from the problem (the default of :func:`diffode.solve`).

    With ``n`` states and ``p`` differentiated inputs (the entries of ``y0``, ``ts``
    and the parameters that carry a tangent), in forward and reverse mode alike:

    * :class:`ForwardSensitivity` when ``n * (p + 1) <= max_forward_size`` (128), or
      when the solver is implicit with a direct linear solver and ``p <= n /
      states_per_forward_param`` (8): one forward solve of the augmented system, whose
      steps factorise only the ``n x n`` block
      (:class:`~diffode.solvers.structured.SensitivityLU`), so its extra cost per
      parameter is small against a factorisation while ``p`` is small against ``n``;
    * otherwise forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``)
      differentiates through the solver's steps, and reverse mode is
      :class:`Direct` for explicit solvers, ``Rosenbrock`` solvers, ``Radau5`` and
      any implicit solver with a structured linear solver (``SparseLU``,
      ``BandedLU``), and :class:`InterpolatingAdjoint` for the SDIRK family with a
      dense or iterative linear solver. Backsolve is never picked: re-solving ``y``
      backwards is unstable for stiff problems and gains only memory.

    The rule is measured (gradient run times, interleaved, 2-core CPU, float64;
    ``python -m benchmarks.auto_threshold``, tables in ``benchmarks/README.md``, and
    ``python -m benchmarks.adjoints``, tables in ``benchmarks/RESULTS.md``):

    * unbatched ``y' = tanh(W y + b)`` with Tsit5: ``ForwardSensitivity`` was 1.4x
      faster than ``Direct`` at ``n (p + 1) = 84`` and 1.9x slower at 584; from 584
      on ``Direct`` beat every other method, ``InterpolatingAdjoint`` by 2-37x;
    * a neural ODE (MLP 2-16-16-2 or 2-64-64-2, ``vmap`` over 32 or 256 initial
      states, shared parameters): ``Direct`` fastest, 60-100x ahead of
      ``ForwardSensitivity`` and 60-430x ahead of ``InterpolatingAdjoint``;
    * the stiff 2-D Brusselator with ``Rodas5P`` at a fixed number of states and a
      growing number of parameters (``auto_threshold_bruss2d_p.json``), the ratio of
      ``ForwardSensitivity``'s time to ``Direct``'s: ``n = 32``: 0.91, 1.25, 2.15 at
      ``p = 3, 6, 18``; ``n = 128``: 0.45, 0.57, 0.94, 2.51 at ``p = 3, 6, 18, 66``;
      ``n = 512``: 0.39, 0.41, 0.59, 1.07 at ``p = 3, 6, 18, 66``. The crossover
      grows with ``n``, at about ``p = n / 8``;
    * the stiff 1-D Brusselator (``auto_threshold_stiff_p.json``): with ``Rodas5P``
      the same ratio was 0.74, 1.08, 1.14 at ``n = 32``, ``p = 3, 18, 35`` and 0.32,
      1.34, 2.93 at ``n = 128``, ``p = 3, 66, 131``; with ``Kvaerno5``,
      ``ForwardSensitivity`` stayed within 10% of the fastest up to ``p = 66`` at
      ``n = 128`` and was 4x slower than ``InterpolatingAdjoint`` at ``p = 131``;
    * past forward sensitivities, ``Direct`` beat ``InterpolatingAdjoint`` by
      2.9-10x with ``Rodas5P`` and 1.3-4.6x with ``Radau5``, while with ``Kvaerno5``
      ``InterpolatingAdjoint`` was 1.3-4.7x faster than ``Direct`` (whose replay
      repeats the Newton iterations of every stage).

    ``memory_budget`` (bytes, default ``DEFAULT_MEMORY_BUDGET`` = 1 GiB, ``None``: no
    limit) is passed to the reverse-mode method: it bounds what the reverse pass
    keeps of the forward solution. Forward sensitivities keep no per-step record.
    """

    max_forward_size: int = eqx.field(static=True, default=128)
    states_per_forward_param: int = eqx.field(static=True, default=8)
    memory_budget: int | None = eqx.field(static=True, default=DEFAULT_MEMORY_BUDGET)

    def __check_init__(self):
        check_budget("Auto", self.memory_budget)

    def choose(self, n: int, p: int, solver=None) -> AbstractSensitivity:
        """The reverse-mode method for ``n`` states, ``p`` differentiated input entries and
        ``solver`` (``None``: an explicit one)."""
        few = p * self.states_per_forward_param <= n
        if n * (p + 1) <= self.max_forward_size or (_factorises(solver) and few):
            return ForwardSensitivity()
        return self._adjoint(solver)

    def _adjoint(self, solver) -> AbstractSensitivity:
        """The reverse-mode method where forward sensitivities are not picked."""
        structured = isinstance(getattr(solver, "linear_solver", None), BlockTridiagonalLU)
        if solver is None or isinstance(solver, (ExplicitRK, Rosenbrock, Radau5)) or structured:
            return Direct(memory_budget=self.memory_budget)
        return InterpolatingAdjoint(memory_budget=self.memory_budget)

    def _chosen(self, prob, y0, ts, params, x) -> AbstractSensitivity:
        dy0, dts, dparams = x
        p = (0 if dy0 is None else jnp.size(y0)) + (0 if dts is None else jnp.size(ts))
        p += sum(jtu.tree_leaves(jtu.tree_map(lambda v, d: 0 if d is None else jnp.size(v), params, dparams)))
        return self.choose(jnp.size(y0), p, prob.opts.solver)

    def fused_jvp(self, loop, prob, primals, x):
        return self._chosen(prob, primals[0], primals[1], primals[2], x).fused_jvp(loop, prob, primals, x)

    def tangent(self, loop, prob, r, x):
        return loop_tangent(loop, prob, r, x)

    # Reached only where ``choose`` did not pick ForwardSensitivity (whose fused rule
    # replaces these).
    def record(self, loop, prob, y0, ts, params):
        return self._adjoint(prob.opts.solver).record(loop, prob, y0, ts, params)

    def cotangent(self, loop, prob, r, ys_bar, x_struct, **cache):
        return self._adjoint(prob.opts.solver).cotangent(loop, prob, r, ys_bar, x_struct, **cache)

    def cotangent_batched(self, loop, prob_static, r, ys_bar, x_struct, r_axes, x_axes, size, **cache):
        method = self._adjoint(prob_static.opts.solver)
        return method.cotangent_batched(loop, prob_static, r, ys_bar, x_struct, r_axes, x_axes, size, **cache)
