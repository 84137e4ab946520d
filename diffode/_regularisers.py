"""Regularisers from the solver's own heuristics: the integrated local error estimate and
stiffness estimate of the accepted steps.

Pal, Ma, Shah and Rackauckas, "Opening the Blackbox: Accelerating Neural
Differential Equations by Regularizing Internal Solver Heuristics" (ICML 2021):
adding ``lambda * error`` (or ``stiffness``) to a training loss steers a neural
ODE towards dynamics the adaptive solver integrates in fewer steps.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array


class Regularisers(eqx.Module):
    """``sol.regularisers`` of ``solve(..., regularise=True)``: sums over the accepted steps.

    Attributes:
        error: ``sum_k E_k |h_k|``, with ``E_k`` the step's scaled error estimate
            (the root-mean-square of ``y_error / (atol + rtol * max(|y_k|, |y_{k+1}|))``,
            the ratio the step-size controller tests against 1): Pal et al.'s ``R_E``.
        stiffness: ``sum_k S_k |h_k|``, with ``S_k = ||f(t_{k+1}, y_{k+1}) - f(t_k, y_k)|| /
            ||y_{k+1} - y_k||`` (2-norms): for an autonomous ``f``, the norm of the
            Jacobian averaged over the step, applied to the step's direction, a lower
            bound on its largest singular value there (exact for a linear ``f`` whose
            matrix is normal with eigenvalues of one magnitude). ``S_k |h_k|`` is the
            quantity that limits an explicit method's step when stability does.
            It uses ``f`` at the step's two ends, which the solver has already
            evaluated (Pal et al. use their solver's own eigenvalue estimate).

    Both are differentiable (forward mode through the steps; reverse mode by
    :class:`diffode.Direct`'s replay), with the step sizes and the error's
    tolerance scale ``atol + rtol * max(|y_k|, |y_{k+1}|)`` held fixed.
    """

    error: Array
    stiffness: Array


def step_regularisers(y0, y1, y_error, f0, f1, h, rtol, atol) -> Array:
    """``[E |h|, S |h|]`` of one step (see :class:`Regularisers`).

    Each norm has a floor of the dtype's smallest normal number under its square
    root, so that its derivative is finite when the step changes nothing.
    """
    tiny = jnp.finfo(y0.dtype).tiny
    # The tolerance scale is the controller's yardstick: held constant here, so
    # that the error term cannot be lowered by growing the state instead of the error.
    scale = lax.stop_gradient(atol + rtol * jnp.maximum(jnp.abs(y0), jnp.abs(y1)))
    err = jnp.sqrt(jnp.mean((y_error / scale) ** 2) + tiny)
    stiff = jnp.sqrt(jnp.sum((f1 - f0) ** 2) + tiny) / jnp.sqrt(jnp.sum((y1 - y0) ** 2) + tiny)
    return jnp.abs(h).astype(y0.dtype) * jnp.stack([err, stiff])
