"""Machinery shared by the continuous adjoint methods (backsolve and interpolating).

Continuous adjoint (Chen, Rubanova, Bettencourt and Duvenaud 2018, "Neural Ordinary
Differential Equations", NeurIPS, Sec. 2 and Appendix B, eqs. (4)-(5) and Algorithm
1): for a loss ``L(ys)`` with ``ys[i] = y(ts[i])``, the adjoint ``lam(t) = dL/dy(t)``
and the parameter adjoint ``mu`` solve, backwards in time,

    lam' = -lam^T df/dy,        mu' = -lam^T df/dp,        mu(ts[-1]) = 0,

with a jump ``lam += dL/dys[i]`` at every save time. Then ``dL/dy0 = lam(ts[0])``
(plus ``dL/dys[0]``), ``dL/dp = mu(ts[0])``, ``dL/dts[i] = <dL/dys[i], f(ts[i],
ys[i])>`` for ``i > 0`` and ``dL/dts[0] = -<lam(ts[0]), f(ts[0], y0)>``
(Chen et al., Appendix B.3). A method supplies what the backward sweep reads of the
forward solution and the sweep itself (which adjoint system, where ``y(t)`` comes
from); this module makes them the method's reverse rule and assembles the cotangents.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, PyTree

from .._integrate import IntegrateOptions
from .._solution import MESSAGES, Status
from .._util import raise_on_failure
from ._base import AbstractSensitivity, combine, keep_present, loop_tangent, nan_if, prob_times, save_slopes


class SemiNorm(eqx.Module):
    """``norm(x[:size])``: an error norm that ignores the trailing components.

    Used to leave the parameter integral out of step-size control (Kidger, Chen
    and Lyons 2021, "'Hey, that's not an ODE': Faster ODE Adjoints via
    Seminorms", ICML, Sec. 3): ``mu`` never feeds back into the dynamics, so its
    error does not have to be controlled for the other components to be right.
    """

    norm: Callable[[Array], Array] = eqx.field(static=True)
    size: int = eqx.field(static=True)

    def __call__(self, x: Array) -> Array:
        return self.norm(x[..., : self.size])


def adjoint_opts(opts: IntegrateOptions, keep: int | None = None) -> IntegrateOptions:
    """Options for an augmented (backward) solve: no user Jacobian (the augmented
    one comes from ``jax.jacfwd``), no dense output, and, with ``keep``, an error
    norm over the first ``keep`` components only."""
    controller = opts.controller
    if keep is not None:
        controller = dataclasses.replace(controller, norm=SemiNorm(controller.norm, keep))
    return opts._replace(jac=None, dense=False, controller=controller)


def rhs_vjp(
    f: Callable, t: Array, y: Array, lam: Array, diff: PyTree, static: PyTree
) -> tuple[Array, Array, Array]:
    """``(f(t, y), lam^T df/dy, lam^T df/dp)`` with ``p`` the raveled ``diff`` leaves."""
    fy, vjp = jax.vjp(lambda y_, d_: f(t, y_, combine(d_, static)), y, diff)
    a_y, a_p = vjp(lam)
    a_p = ravel_pytree(a_p)[0].astype(y.dtype)
    return fy, a_y, a_p


class AbstractAdjoint(AbstractSensitivity):
    """A continuous adjoint: reverse mode solves the adjoint equations backwards.

    Subclasses implement :meth:`_forward` (what the backward pass needs from a
    forward solve) and :meth:`_sweep` (the adjoint from ``ts[-1]`` to ``ts[0]``).
    Forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) differentiates
    the solve loop itself, which gives the discretise-then-optimise derivative.
    """

    #: Appended to the error raised when the backward solve fails.
    failure_hint: ClassVar[str] = ""

    def _forward(self, loop, prob, y0, ts, params) -> Any:
        """What :meth:`_sweep` reads of the forward solution besides ``ys``."""
        return None

    def _sweep(self, loop, prob, residual, ys, ys_bar, y0, ts, params) -> tuple[Array, Array, Array]:
        """``(lam, mu, status)`` at ``ts[0]``: the adjoint before the jump of
        ``ys_bar[0]``, the raveled parameter adjoint, and the backward status."""
        raise NotImplementedError

    def tangent(self, loop, prob, r, x):
        return loop_tangent(loop, prob, r, x)

    def cotangent(self, loop, prob, r, ys_bar, x_struct):
        y0, ts, params, ys = r
        ts_ = jnp.asarray(prob_times(prob, ts))
        ys_bar = ys_bar.astype(ys.dtype)
        if ts_.shape[0] == 1:
            lam = jnp.zeros_like(y0)
            mu = jnp.zeros_like(ravel_pytree(params)[0], dtype=y0.dtype)
            status = jnp.asarray(Status.SUCCESS, jnp.int32)
        else:
            residual = self._forward(loop, prob, y0, ts_, params)
            lam, mu, status = self._sweep(loop, prob, residual, ys, ys_bar, y0, ts_, params)
        # A failed backward solve must not pass for a gradient: it raises
        # (throw=True) or gives NaN cotangents.
        if prob.opts.throw:
            name = type(self).__name__
            messages = tuple(
                f"{name}: the backward (adjoint) solve failed. {MESSAGES[s]}{self.failure_hint}"
                for s in Status
            )
            lam, mu = raise_on_failure((lam, mu), status, messages)
        ts_bar = None
        if x_struct[1] is not None:
            args = prob.args(params)
            fs = save_slopes(prob.f, ts_, ys, args, prob.opts.tstops)
            ts_bar = jnp.sum(ys_bar * fs, axis=1)
            ts_bar = ts_bar.at[0].set(-jnp.dot(lam, fs[0])).astype(ts_.dtype)
        _, unravel_p = ravel_pytree(params)
        full = (lam + ys_bar[0], ts_bar, unravel_p(mu) if jtu.tree_leaves(params) else params)
        return keep_present(x_struct, nan_if(status != Status.SUCCESS, full))
