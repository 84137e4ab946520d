"""Forward (continuous) sensitivity analysis: integrate ``s = dy/dp`` alongside ``y``.

With ``p`` the differentiated inputs the sensitivities ``s = dy/dp`` solve the
variational equations (Hairer, Norsett and Wanner, "Solving Ordinary
Differential Equations I", 2nd ed., section I.14, Theorem 14.1 and eq. (14.8))::

    s' = (df/dy)(t, y, p) s + (df/dp)(t, y, p),     s(t0) = dy0/dp.

They are integrated together with ``y`` as one augmented ODE by the same solver
(Caracotsios and Stewart, "Sensitivity analysis of initial value problems with
mixed ODEs and algebraic equations", Comput. Chem. Eng. 9(4), 1985: the
"simultaneous corrector" approach; implicit solvers factorise only the ``n x n``
block ``shift I - scale J`` that every sensitivity equation shares and solve the
augmented system by block substitution, ``SensitivityLU``). ``(df/dy) s +
(df/dp) dp`` is one Jacobian-vector product of ``f`` on ``(y, p)`` jointly,
vmapped over the directions.

Save times. ``ys[i] = Phi(ts[i]; ts[0], y0)``, with ``Phi(t; t0, y0)`` the
solution map. Moving ``ts[i]`` moves along the trajectory:
``d ys[i] / d ts[i] = f(ts[i], ys[i])``. Moving the start time: differentiating
``Phi(t; tau, Phi(tau; t0, y0)) = Phi(t; t0, y0)`` (independent of ``tau``)
at ``tau = t0`` gives ``dPhi/dt0 = -(dPhi/dy0) f(t0, y0)`` (HNW I, section I.14).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ..solvers.linear import AbstractDirectSolver
from ..solvers.structured import SensitivityLU
from ._base import AbstractSensitivity, Problem, add_time_shift, combine, prob_times, split_differentiated


class _LeadingErrorController(eqx.Module):
    """A step-size controller that judges a step by the first ``n`` state components only.

    Wraps the solve's controller (every other use of it is delegated: the norm
    that implicit solvers' Newton iterations and the initial-step heuristic use
    still covers the whole state, so inner iterations converge on the
    sensitivities too).
    """

    base: Any
    n: int = eqx.field(static=True)

    @property
    def norm(self):
        return self.base.norm

    @property
    def dtmin(self):
        return self.base.dtmin

    @property
    def dtmax(self):
        return self.base.dtmax

    def init(self, dtype):
        return self.base.init(dtype)

    def adapt(self, h, err, order, memory):
        return self.base.adapt(h, err, order, memory)

    def error_ratio(self, y0, y1, y_error, rtol, atol):
        n = self.n
        return self.base.error_ratio(y0[:n], y1[:n], y_error[:n], rtol, atol)


def _augmented_solver(solver, n: int):
    """``solver`` for the augmented system: a direct linear solver ``ls`` becomes
    :class:`~diffode.solvers.structured.SensitivityLU` ``(ls, n)``, which factorises
    ``n x n`` blocks only (matrix-free and other linear solvers work on the
    augmented system as they are)."""
    ls = getattr(solver, "linear_solver", None)
    if not isinstance(ls, AbstractDirectSolver):
        return solver
    return eqx.tree_at(lambda s: s.linear_solver, solver, SensitivityLU(ls, n))


class ForwardSensitivity(AbstractSensitivity):
    """Forward sensitivity equations integrated alongside the state (continuous forward mode).

    ``s' = (df/dy) s + df/dp`` is solved with ``y`` as one augmented system by the
    solve's own solver (HNW I, section I.14; Caracotsios and Stewart 1985). Explicit
    and implicit solvers both work; for implicit ones with a direct linear solver
    the augmented system is solved by factorising its ``n x n`` diagonal block
    only (:class:`~diffode.solvers.structured.SensitivityLU`: the sensitivity
    equations share ``J``), so a step costs one Jacobian and one factorisation of
    the state's size, plus a ``jvp`` of the augmented right-hand side per solve.

    Under any differentiation one augmented solve carries the sensitivity matrix
    for every differentiated input (``y0`` and the start time, the parameters), and
    the tangent is its contraction with the input tangent: forward mode (``jax.jvp``,
    ``jax.jacfwd``, ``jax.linearize``) evaluates it, reverse mode (``jax.grad``,
    ``jax.vjp``) transposes it. The solve's statistics are the augmented solve's.

    Cost grows with the number of differentiated inputs: prefer an adjoint method
    when there are many parameters and a scalar loss.

    Args:
        error_control: when ``True`` the local error test covers ``y`` and the
            sensitivities; when ``False`` only ``y`` (the steps are then chosen as
            for ``y`` alone, as in forward differentiation through the solver; the
            sensitivities are less accurately controlled).
    """

    error_control: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if not isinstance(self.error_control, bool):
            raise TypeError(
                f"ForwardSensitivity: error_control must be True or False, got {self.error_control!r}"
            )

    def _aug_opts(self, opts, n: int):
        controller = opts.controller if self.error_control else _LeadingErrorController(opts.controller, n)
        return opts._replace(
            solver=_augmented_solver(opts.solver, n), jac=None, dense=False, controller=controller
        )

    def fused_jvp(self, loop, prob, primals, x):
        """``ys`` and the sensitivity matrix ``S`` for every differentiated input from one augmented
        solve, then ``dys = S . (tangent)``: a contraction JAX transposes for reverse mode.

        The augmented solve is itself differentiable by this method, so derivatives of any
        order nest (each level augments the system again).
        """
        y0, ts, params = primals
        dy0, dts, dparams = x
        f, static = prob.f, prob.static
        ts_ = prob_times(prob, ts)
        n, dtype = y0.shape[0], y0.dtype
        diff_p, fixed_p = split_differentiated(params, dparams)
        p_flat, unravel_p = ravel_pytree(diff_p)
        m = p_flat.shape[0]
        want_y = dy0 is not None or dts is not None
        want_p = m > 0
        s0_blocks, dp_blocks, coeffs = [], [], []
        args = combine(params, static)
        if want_y:
            s0_blocks.append(jnp.eye(n, dtype=dtype))
            dp_blocks.append(jnp.zeros((n, m), p_flat.dtype))
            c = jnp.zeros_like(y0) if dy0 is None else dy0.astype(dtype)
            if dts is not None:
                c = c - f(ts_[0], y0, args) * dts[0]
            coeffs.append(c)
        if want_p:
            s0_blocks.append(jnp.zeros((m, n), dtype))
            dp_blocks.append(jnp.eye(m, dtype=p_flat.dtype))
            coeffs.append(ravel_pytree(dparams)[0].astype(dtype))
        S0 = jnp.concatenate(s0_blocks)
        k = S0.shape[0]
        DP = jnp.concatenate(dp_blocks) if want_p else None

        def aug_f(t, z, aa):
            (q, fixed), DP = aa
            y, S = z[:n], z[n:].reshape(k, n)
            args_of = lambda q_: combine(eqx.combine(q_, fixed), static)  # noqa: E731
            if DP is None:
                fy, JS = jax.vmap(
                    lambda s: jax.jvp(lambda y_: f(t, y_, args_of(q)), (y,), (s,)), out_axes=(None, 0)
                )(S)
            else:

                def one(s, dp):
                    return jax.jvp(lambda y_, q_: f(t, y_, args_of(q_)), (y, q), (s, unravel_p(dp)))

                fy, JS = jax.vmap(one, out_axes=(None, 0))(S, DP)
            return jnp.concatenate([fy, JS.astype(fy.dtype).reshape(-1)])

        aug = Problem(aug_f, None, self._aug_opts(prob.opts, n), prob.known_ts)
        zs, counters = self.apply(
            loop, aug, jnp.concatenate([y0, S0.reshape(-1)]), ts, ((diff_p, fixed_p), DP)
        )
        ys, S = zs[:, :n], zs[:, n:].reshape(zs.shape[0], k, n)
        dys = jnp.einsum("tkn,k->tn", S, jnp.concatenate(coeffs))
        if dts is not None:
            dys = add_time_shift(dys, f, ts_, ys, args, dts, prob.opts.tstops)
        return ys, counters, dys
