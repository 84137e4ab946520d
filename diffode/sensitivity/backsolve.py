"""Backsolve adjoint: re-solve the state backwards together with the adjoint."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from .._solution import Status
from ._adjoint_common import AbstractAdjoint, adjoint_opts, rhs_vjp


class BacksolveAdjoint(AbstractAdjoint):
    """Continuous adjoint that recovers ``y(t)`` by solving the ODE backwards.

    Chen, Rubanova, Bettencourt and Duvenaud 2018, "Neural Ordinary Differential
    Equations" (NeurIPS), Algorithm 1: the backward pass solves the augmented system

        y' = f(t, y, p),   lam' = -lam^T df/dy,   mu' = -lam^T df/dp

    from ``ts[-1]`` to ``ts[0]``, one segment ``[ts[i], ts[i-1]]`` at a time, with
    the same solver and tolerances as the forward solve (implicit solvers get the
    augmented Jacobian from ``jax.jacfwd``; a ``jac=`` given to ``solve`` is not
    used). At every save time ``lam`` jumps by ``dL/dys[i]`` and ``y`` restarts
    from the forward solution ``ys[i]``, which stops the error of the backward
    ``y`` from accumulating over segments. Memory does not depend on the number
    of steps (the forward pass keeps only ``ys``).

    The backward ``y`` re-traces the forward trajectory in reverse, which is
    unstable for stiff or dissipative problems (decaying modes grow backwards):
    the gradient can be inaccurate or the backward solve can fail (then every
    cotangent is NaN). Use :class:`InterpolatingAdjoint` there.

    Forward mode (``jax.jvp``, ``jax.jacfwd``) differentiates the solve loop itself.

    Args:
        seminorm: leave ``mu`` (the parameter integral) out of the backward solve's
            error norm (Kidger, Chen and Lyons 2021, "'Hey, that's not an ODE':
            Faster ODE Adjoints via Seminorms", ICML): fewer backward steps.
    """

    seminorm: bool = False
    failure_hint = (
        " Re-solving y backwards is unstable on stiff problems (decaying modes grow backwards in time): "
        "InterpolatingAdjoint or ForwardSensitivity avoid it."
    )

    def _sweep(self, loop, prob, residual, ys, ys_bar, y0, ts, diff):
        n = y0.shape[0]
        f, static = prob.f, prob.static
        mu0 = ravel_pytree(diff)[0].astype(y0.dtype)
        aug_opts = adjoint_opts(prob.opts, keep=2 * n if self.seminorm else None)

        def aug(t, z, a):
            d, s = a
            fy, a_y, a_p = rhs_vjp(f, t, z[:n], z[n : 2 * n], d, s)
            return jnp.concatenate([fy, -a_y, -a_p])

        last = ts.shape[0] - 1

        def body(k, carry):
            lam, mu, status = carry
            i = last - k
            pair = lax.dynamic_slice_in_dim(ts, i - 1, 2)[::-1]
            z = jnp.concatenate([ys[i], lam + ys_bar[i], mu])
            zs, counters, _ = loop(aug, z, pair, (diff, static), aug_opts)
            z1 = zs[1]
            status = jnp.where(status == Status.SUCCESS, counters[0], status)
            return z1[n : 2 * n], z1[2 * n :], status

        carry = (jnp.zeros_like(y0), jnp.zeros_like(mu0), jnp.asarray(Status.SUCCESS, jnp.int32))
        return lax.fori_loop(0, last, body, carry)
