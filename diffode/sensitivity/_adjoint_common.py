"""Machinery shared by the continuous adjoint methods (backsolve and interpolating).

Continuous adjoint (Chen, Rubanova, Bettencourt and Duvenaud 2018, "Neural Ordinary
Differential Equations", NeurIPS, Sec. 2 and Appendix B, eqs. (4)-(5) and Algorithm
1): for a loss ``L(ys)`` with ``ys[i] = y(ts[i])``, the adjoint ``lam(t) = dL/dy(t)``
and the parameter adjoint ``mu`` solve, backwards in time,

    lam' = -lam^T df/dy,        mu' = -lam^T df/dp,        mu(ts[-1]) = 0,

with a jump ``lam += dL/dys[i]`` at every save time. Then ``dL/dy0 = lam(ts[0])``
(plus ``dL/dys[0]``), ``dL/dp = mu(ts[0])``, ``dL/dts[i] = <dL/dys[i], f(ts[i],
ys[i])>`` for ``i > 0`` and ``dL/dts[0] = -<lam(ts[0]), f(ts[0], y0)>``
(Chen et al., Appendix B.3). A method supplies the forward pass and the backward
sweep (which adjoint system, where ``y(t)`` comes from); this module wires them
into a custom VJP and assembles the cotangents.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, PyTree

from .._solution import MESSAGES, Status
from .._solve import IntegrateOptions, integrate
from .._util import raise_on_failure
from ._base import AbstractSensitivity, forward_mode_active, split_args


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


def rhs_vjp(f: Callable, t: Array, y: Array, lam: Array, diff: PyTree, static: PyTree) -> tuple[Array, Array, Array]:
    """``(f(t, y), lam^T df/dy, lam^T df/dp)`` with ``p`` the raveled ``diff`` leaves."""
    fy, vjp = jax.vjp(lambda y_, d_: f(t, y_, eqx.combine(d_, static)), y, diff)
    a_y, a_p = vjp(lam)
    a_p = ravel_pytree(a_p)[0].astype(y.dtype)
    return fy, a_y, a_p


def _nan_like(x: Array, bad: Array) -> Array:
    return jnp.where(bad, jnp.nan, x)


class AbstractAdjoint(AbstractSensitivity):
    """A continuous adjoint defined by a custom VJP (reverse mode only).

    Subclasses implement :meth:`_forward` (the primal solve and what the backward
    pass keeps) and :meth:`_sweep` (the adjoint from ``ts[-1]`` to ``ts[0]``).
    Under forward-mode differentiation (``jax.jvp``/``jax.jacfwd``; JAX cannot
    push tangents through a custom VJP) the plain solve loop is differentiated
    instead, which gives the discretise-then-optimise derivative.
    """

    def integrate(self, f, y0, ts, args, opts):
        # Values f closes over (e.g. a parameter captured by a lambda) would escape
        # the custom VJP; hoist the floating-point tracers among them into extra
        # differentiated arguments instead (jax.closure_convert).
        diff, static = split_args(args)
        f_conv, consts = jax.closure_convert(lambda t, y, d: f(t, y, eqx.combine(d, static)), ts[0], y0, diff)
        if forward_mode_active(y0, ts, args, consts):
            ys, counters, _ = integrate(f, y0, ts, args, opts._replace(dense=False))
            return ys, counters
        if not consts:
            return _adjoint_solve((y0, ts, args), self, f, opts)

        def f_hoisted(t, y, a):
            return f_conv(t, y, a[0], *a[1])

        return _adjoint_solve((y0, ts, (diff, list(consts))), self, f_hoisted, opts)

    #: Appended to the error raised when the backward solve fails.
    failure_hint: ClassVar[str] = ""

    def _forward(self, f, y0, ts, args, opts) -> tuple[Array, Array, Any]:
        """``(ys, counters, residual)``."""
        raise NotImplementedError

    def _sweep(self, residual, ys, ys_bar, f, y0, ts, diff, static, opts) -> tuple[Array, Array, Array]:
        """``(lam, mu, status)`` at ``ts[0]``: the adjoint before the jump of
        ``ys_bar[0]``, the raveled parameter adjoint, and the backward status."""
        raise NotImplementedError


@eqx.filter_custom_vjp
def _adjoint_solve(vjp_arg, method: AbstractAdjoint, f, opts):
    y0, ts, args = vjp_arg
    ys, counters, _ = integrate(f, y0, ts, args, opts._replace(dense=False))
    return ys, counters


@_adjoint_solve.def_fwd
def _adjoint_fwd(perturbed, vjp_arg, method: AbstractAdjoint, f, opts):
    del perturbed
    y0, ts, args = vjp_arg
    ys, counters, residual = method._forward(f, y0, ts, args, opts)
    return (ys, counters), (ys, counters, residual)


@_adjoint_solve.def_bwd
def _adjoint_bwd(residuals, grad_obj, perturbed, vjp_arg, method: AbstractAdjoint, f, opts):
    ys, counters, residual = residuals
    ys_bar = grad_obj[0]
    y0, ts, args = vjp_arg
    diff, static = split_args(args)
    p_y0, p_ts, _ = perturbed
    if ys_bar is None:  # symbolic zero: nothing depends on ys
        return jax.tree_util.tree_map(lambda _: None, (y0, ts, diff))
    ys_bar = ys_bar.astype(ys.dtype)
    if ts.shape[0] == 1:
        lam = jnp.zeros_like(y0)
        mu = jnp.zeros_like(ravel_pytree(diff)[0], dtype=y0.dtype)
        status = jnp.asarray(Status.SUCCESS, jnp.int32)
    else:
        lam, mu, status = method._sweep(residual, ys, ys_bar, f, y0, ts, diff, static, opts)
    # A failed forward or backward solve must not pass for a gradient: it raises
    # (throw=True; a failed forward solve already raised in the forward pass) or
    # gives NaN cotangents.
    if opts.throw:
        name = type(method).__name__
        messages = tuple(f"{name}: the backward (adjoint) solve failed. {MESSAGES[s]}{method.failure_hint}"
                         for s in Status)
        lam, mu = raise_on_failure((lam, mu), status, messages)
    bad = (status != Status.SUCCESS) | (counters[0] != Status.SUCCESS)

    y0_bar = _nan_like(lam + ys_bar[0], bad) if p_y0 else None
    ts_bar = None
    if p_ts:
        fs = jax.vmap(lambda t, y: f(t, y, args))(ts, ys)
        ts_bar = jnp.sum(ys_bar * fs, axis=1)
        ts_bar = ts_bar.at[0].set(-jnp.dot(lam, fs[0]))
        ts_bar = _nan_like(ts_bar, bad).astype(ts.dtype)
    # Gradients of unperturbed args leaves are computed anyway (mu is one vector).
    _, unravel_p = ravel_pytree(diff)
    args_bar = unravel_p(_nan_like(mu, bad)) if jax.tree_util.tree_leaves(diff) else diff
    return y0_bar, ts_bar, args_bar

