"""Forward (continuous) sensitivity analysis: integrate ``s = dy/dp`` alongside ``y``.

With ``p`` the differentiated inputs the sensitivities ``s = dy/dp`` solve the
variational equations (Hairer, Norsett and Wanner, "Solving Ordinary
Differential Equations I", 2nd ed., section I.14, Theorem 14.1 and eq. (14.8))::

    s' = (df/dy)(t, y, p) s + (df/dp)(t, y, p),     s(t0) = dy0/dp.

They are integrated together with ``y`` as one augmented ODE by the same solver
(Caracotsios and Stewart, "Sensitivity analysis of initial value problems with
mixed ODEs and algebraic equations", Comput. Chem. Eng. 9(4), 1985: the
"simultaneous corrector" approach; for implicit solvers the augmented system's
Jacobian is formed by ``jax.jacfwd``). ``(df/dy) s + (df/dp) dp`` is one
Jacobian-vector product of ``f`` on ``(y, p)`` jointly, vmapped over the
directions; no Jacobian is ever formed.

Save times. ``ys[i] = Phi(ts[i]; ts[0], y0)``, with ``Phi(t; t0, y0)`` the
solution map. Moving ``ts[i]`` moves along the trajectory:
``d ys[i] / d ts[i] = f(ts[i], ys[i])``. Moving the start time: differentiating
``Phi(t; tau, Phi(tau; t0, y0)) = Phi(t; t0, y0)`` (independent of ``tau``)
at ``tau = t0`` gives ``dPhi/dt0 = -(dPhi/dy0) f(t0, y0)`` (the identity
behind the Alekseev-Groebner formula, HNW I, section I.14). Hence a tangent ``(dy0, dp, dts)`` is carried by the solution of the
variational equation with ``s(t0) = dy0 - f(t0, y0) dts[0]``, and::

    d ys[i] = s(ts[i]) + f(ts[i], ys[i]) dts[i]      (for every i; at i = 0 this is dy0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.custom_derivatives import SymbolicZero
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, PyTree

from .._solve import IntegrateOptions, integrate, known_value
from .._util import float0_zeros
from ._base import AbstractSensitivity, forward_mode_active


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


def _is_zero(t) -> bool:
    return isinstance(t, SymbolicZero)


def _instantiate(t):
    return jnp.zeros(t.aval.shape, t.aval.dtype) if isinstance(t, SymbolicZero) else t


class ForwardSensitivity(AbstractSensitivity):
    """Forward sensitivity equations integrated alongside the state (continuous forward mode).

    ``s' = (df/dy) s + df/dp`` is solved with ``y`` as one augmented system by the
    solve's own solver (HNW I, section I.14; Caracotsios and Stewart 1985). Explicit
    and implicit solvers both work; for implicit ones the augmented Jacobian is
    ``jax.jacfwd`` of the augmented right-hand side, which suits small problems.

    - ``jax.jvp``/``jax.jacfwd``: each tangent direction is integrated with ``y``
      (one augmented solve of size ``2n`` per direction; ``jacfwd`` batches them).
    - ``jax.grad``/``jax.vjp``/``jax.jacrev``: one augmented solve carries the full
      sensitivity matrix for every differentiated input (``y0``, the inexact-array
      leaves of ``args``, the start time when ``ts`` is differentiated); the
      cotangents are contracted with it. The rule is written as a JVP that is
      linear in the tangents, so JAX transposes it, and second derivatives
      (``jax.hessian``, reverse over forward) work as well.

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
            raise TypeError(f"ForwardSensitivity: error_control must be True or False, got {self.error_control!r}")

    # ------------------------------------------------------------------ helpers

    def _aug_opts(self, opts: IntegrateOptions, n: int) -> IntegrateOptions:
        controller = opts.controller
        if not self.error_control:
            controller = _LeadingErrorController(controller, n)
        return opts._replace(jac=None, dense=False, controller=controller)

    # ------------------------------------------------------------- entry point

    def integrate(
        self, f: Callable[[Array, Array, Any], Array], y0: Array, ts: Array, args: PyTree, opts: IntegrateOptions
    ) -> tuple[Array, Array]:
        """The saved states and counters of :func:`diffode._solve.integrate`, with forward-sensitivity
        derivative rules."""
        arrays, statics = eqx.partition(args, eqx.is_array)
        diff, other = eqx.partition(arrays, eqx.is_inexact_array)
        for path, leaf in jtu.tree_leaves_with_path(diff):
            if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
                raise TypeError(
                    f"ForwardSensitivity: complex args leaves are not supported (args{jtu.keystr(path)} is "
                    f"{leaf.dtype}); split them into real and imaginary parts"
                )
        forward = forward_mode_active(y0, ts, args)
        n = y0.shape[0]
        dt0 = opts.dt0
        consts = (jnp.asarray(opts.rtol), jnp.asarray(opts.atol), None if dt0 is None else jnp.asarray(dt0))

        def with_consts(o: IntegrateOptions, c) -> IntegrateOptions:
            return o._replace(rtol=c[0], atol=c[1], dt0=c[2])

        def full_args(d, o):
            return eqx.combine(d, o, statics)

        # Save times known at trace time reach the solve loop as they are (a
        # custom_jvp argument would be a tracer), so that it can check them and
        # fix the direction of time without compiled work.
        known_ts = known_value(ts)

        @jax.custom_jvp
        def core(y0, ts, diff, other, consts):
            ts = ts if known_ts is None else known_ts
            ys, counters, _ = integrate(f, y0, ts, full_args(diff, other), with_consts(opts._replace(dense=False), consts))
            return ys, counters

        def tangent_start(y0, ts, args, dy0, dts):
            """``s(t0) = dy0 - f(t0, y0) dts[0]`` (``None`` when both are zero) and ``f(t0, y0)``."""
            s0 = None if _is_zero(dy0) else dy0
            if not _is_zero(dts):
                f0 = f(ts[0], y0, args)
                s0 = -f0 * dts[0] if s0 is None else s0 - f0 * dts[0]
            return s0

        def add_time_shift(ys_dot, ys, ts, args, dts):
            """``+ f(ts[i], ys[i]) dts[i]`` at every save."""
            if _is_zero(dts):
                return ys_dot
            fs = jax.vmap(f, in_axes=(0, 0, None))(ts, ys, args)
            return ys_dot + fs * dts[:, None].astype(fs.dtype)

        def forward_rule(primals, tangents):
            # One direction: z = [y, s], s' = J s + f_p dp.
            y0, ts, diff, other, consts = primals
            dy0, dts, ddiff = tangents[0], tangents[1], tangents[2]
            args = full_args(diff, other)
            o = self._aug_opts(with_consts(opts, consts), n)
            p_zero = all(_is_zero(t) for t in jtu.tree_leaves(ddiff, is_leaf=_is_zero))
            s0 = tangent_start(y0, ts, args, dy0, dts)
            if s0 is None:
                s0 = jnp.zeros_like(y0)
            dp = None if p_zero else jtu.tree_map(_instantiate, ddiff, is_leaf=_is_zero)

            def aug_f(t, z, aa):
                a, dp = aa
                y, s = z[:n], z[n:]
                if dp is None:
                    fy, js = jax.jvp(lambda y_: f(t, y_, a), (y,), (s,))
                else:
                    d, rest = eqx.partition(a, eqx.is_inexact_array)
                    fy, js = jax.jvp(lambda y_, d_: f(t, y_, eqx.combine(d_, rest)), (y, d), (s, dp))
                return jnp.concatenate([fy, js.astype(fy.dtype)])

            # The primal comes from a plain solve: under jacfwd (vmap over tangent
            # directions) it must not depend on the tangent, and the augmented
            # solves may step differently for each direction. A failed tangent
            # solve shows as NaN tangents (integrate leaves unreached saves NaN).
            ys, counters = self.integrate(f, y0, ts, args, with_consts(opts, consts))
            zs, _ = self.integrate(aug_f, jnp.concatenate([y0, s0.astype(y0.dtype)]), ts, (args, dp), o)
            ys_dot = add_time_shift(zs[:, n:], ys, ts, args, dts)
            return (ys, counters), (ys_dot, float0_zeros(counters))

        def reverse_rule(primals, tangents):
            # Full sensitivity matrix: z = [y, S (k, n)] for k directions, then a
            # contraction that is linear in the tangents (JAX transposes it).
            y0, ts, diff, other, consts = primals
            dy0, dts, ddiff = tangents[0], tangents[1], tangents[2]
            args = full_args(diff, other)
            o = self._aug_opts(with_consts(opts, consts), n)
            p_flat, unravel_p = ravel_pytree(diff)
            m = p_flat.shape[0]
            p_zero = m == 0 or all(_is_zero(t) for t in jtu.tree_leaves(ddiff, is_leaf=_is_zero))
            dtype = y0.dtype
            s0_blocks, dp_blocks, coeffs = [], [], []
            if not _is_zero(dy0):
                s0_blocks.append(jnp.eye(n, dtype=dtype))
                dp_blocks.append(jnp.zeros((n, m), p_flat.dtype))
                c = dy0
                if not _is_zero(dts):
                    c = c - f(ts[0], y0, args) * dts[0]
                coeffs.append(c.astype(dtype))
            elif not _is_zero(dts):
                # Only the start-time direction: s(t0) = -f(t0, y0), coefficient dts[0].
                s0_blocks.append(-f(ts[0], y0, args)[None])
                dp_blocks.append(jnp.zeros((1, m), p_flat.dtype))
                coeffs.append(dts[:1].astype(dtype))
            if not p_zero:
                s0_blocks.append(jnp.zeros((m, n), dtype))
                dp_blocks.append(jnp.eye(m, dtype=p_flat.dtype))
                dp_tan = jtu.tree_map(_instantiate, ddiff, is_leaf=_is_zero)
                coeffs.append(ravel_pytree(dp_tan)[0].astype(dtype))
            if not s0_blocks:
                ys, counters = self.integrate(f, y0, ts, args, with_consts(opts, consts))
                return (ys, counters), (jnp.zeros_like(ys), float0_zeros(counters))
            S0 = jnp.concatenate(s0_blocks).astype(dtype)
            k = S0.shape[0]
            DP = jnp.concatenate(dp_blocks) if not p_zero else None

            def aug_f(t, z, aa):
                a, DP = aa
                y, S = z[:n], z[n:].reshape(k, n)
                if DP is None:
                    def one(s):
                        return jax.jvp(lambda y_: f(t, y_, a), (y,), (s,))
                    fy, JS = jax.vmap(one, out_axes=(None, 0))(S)
                else:
                    d, rest = eqx.partition(a, eqx.is_inexact_array)
                    def one(s, dp):
                        return jax.jvp(lambda y_, d_: f(t, y_, eqx.combine(d_, rest)), (y, d), (s, unravel_p(dp)))
                    fy, JS = jax.vmap(one, out_axes=(None, 0))(S, DP)
                return jnp.concatenate([fy, JS.astype(fy.dtype).reshape(-1)])

            zs, counters = self.integrate(aug_f, jnp.concatenate([y0, S0.reshape(-1)]), ts, (args, DP), o)
            ys, S = zs[:, :n], zs[:, n:].reshape(zs.shape[0], k, n)
            c = jnp.concatenate(coeffs)
            ys_dot = jnp.einsum("tkn,k->tn", S, c)
            ys_dot = add_time_shift(ys_dot, ys, ts, args, dts)
            return (ys, counters), (ys_dot, float0_zeros(counters))

        core.defjvp(forward_rule if forward else reverse_rule, symbolic_zeros=True)
        return core(y0, ts, diff, other, consts)
