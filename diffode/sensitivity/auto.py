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
      when the solver is implicit with a direct linear solver and ``p <=
      max_forward_params`` (32): one forward solve of the augmented system, whose
      steps factorise only the ``n x n`` block
      (:class:`~diffode.solvers.structured.SensitivityLU`);
    * otherwise forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``)
      differentiates through the solver's steps, and reverse mode is
      :class:`Direct` for explicit solvers, ``Rosenbrock`` solvers, ``Radau5`` and
      any implicit solver with a structured linear solver (``SparseLU``,
      ``BandedLU``), and :class:`InterpolatingAdjoint` for the SDIRK family with a
      dense or iterative linear solver. Backsolve is never picked: re-solving ``y``
      backwards is unstable for stiff problems and gains only memory.

    The rule is measured by ``python -m benchmarks.auto_threshold`` (gradient run
    times, interleaved, 2-core CPU, float64; tables in ``benchmarks/README.md``):

    * unbatched ``y' = tanh(W y + b)`` with Tsit5: ``ForwardSensitivity`` was 1.4x
      faster than ``Direct`` at ``n (p + 1) = 84`` and 1.9x slower at 584; from 584
      on ``Direct`` beat every other method, ``InterpolatingAdjoint`` by 2-37x;
    * a neural ODE (MLP 2-16-16-2 or 2-64-64-2, ``vmap`` over 32 or 256 initial
      states, shared parameters): ``Direct`` fastest, 60-100x ahead of
      ``ForwardSensitivity`` and 60-430x ahead of ``InterpolatingAdjoint``;
    * the stiff 1-D Brusselator with ``n`` = 32 and 128 states and ``p`` = 3, ``N +
      2`` or ``2 N + 3`` (``benchmarks/auto_threshold_stiff_p.json``):
      ``ForwardSensitivity`` was the fastest with ``p = 3`` for ``Rodas5P``,
      ``Kvaerno5`` and ``Radau5`` (``Direct`` 1.4-9x, ``InterpolatingAdjoint``
      2.6-10x slower), and within 1.2x of the fastest up to ``p = 35``
      (``Kvaerno5``: the fastest up to ``p = 66``); at ``p = 131`` it was 2.2-4.2x
      slower than the fastest;
    * past forward sensitivities, ``Direct`` beat ``InterpolatingAdjoint`` by
      2.9-10x with ``Rodas5P`` and 1.3-4.6x with ``Radau5``, while with ``Kvaerno5``
      ``InterpolatingAdjoint`` was 1.3-4.7x faster than ``Direct`` (whose replay
      repeats the Newton iterations of every stage);
    * the 2-D Brusselator (``benchmarks/brusselator.py``, ``p = 3``, ``Rodas5P``
      with ``jac_sparsity``, so :class:`~diffode.SparseLU`): ``Direct`` 4x
      (N = 8, ``n = 128``) and 10x (N = 16, ``n = 512``) faster than
      ``InterpolatingAdjoint``, whose augmented backward system has another size
      than the pattern and is factorised densely.

    ``memory_budget`` (bytes, default ``DEFAULT_MEMORY_BUDGET`` = 1 GiB, ``None``: no
    limit) is passed to the reverse-mode method: it bounds what the reverse pass
    keeps of the forward solution. Forward sensitivities keep no per-step record.
    """

    max_forward_size: int = eqx.field(static=True, default=128)
    max_forward_params: int = eqx.field(static=True, default=32)
    memory_budget: int | None = eqx.field(static=True, default=DEFAULT_MEMORY_BUDGET)

    def __check_init__(self):
        check_budget("Auto", self.memory_budget)

    def choose(self, n: int, p: int, solver=None) -> AbstractSensitivity:
        """The reverse-mode method for ``n`` states, ``p`` differentiated input entries and
        ``solver`` (``None``: an explicit one)."""
        if n * (p + 1) <= self.max_forward_size or (_factorises(solver) and p <= self.max_forward_params):
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
