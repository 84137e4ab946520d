"""Benchmark problems.

NOTE: this mirrors the shared problem module being written at
``tests/problems.py`` (same equations, parameters, initial values and save
times). It is defined locally for now to avoid a race with that work; the owner
of ``tests/problems.py`` will dedupe the two later.

Arrays are built by functions, not at import time, so that a script can enable
float64 (``jax.config.update("jax_enable_x64", True)``) before any is created;
diffode never enables it itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def lotka_volterra_rhs(t, y, args):
    """Lotka-Volterra predator-prey: ``x' = a x - b x y``, ``y' = -c y + d x y``.

    ``args = (alpha, beta, gamma, delta)`` as one array.
    """
    alpha, beta, gamma, delta = args[0], args[1], args[2], args[3]
    prey, pred = y[0], y[1]
    return jnp.stack([alpha * prey - beta * prey * pred, -gamma * pred + delta * prey * pred])


def lotka_volterra_rhs_numpy(t, y, args):
    """The same right-hand side in NumPy, for SciPy reference solves."""
    alpha, beta, gamma, delta = args
    return np.array([alpha * y[0] - beta * y[0] * y[1], -gamma * y[1] + delta * y[0] * y[1]])


@dataclasses.dataclass(frozen=True)
class Problem:
    """An initial value problem ``dy/dt = f(t, y, args)``, saved at ``ts``."""

    name: str
    f: Callable[[Any, Any, Any], Any]
    f_numpy: Callable[[Any, Any, Any], Any]
    y0: jax.Array
    ts: jax.Array
    args: jax.Array


def lotka_volterra(dtype=jnp.float64, num_save: int = 100) -> Problem:
    """Lotka-Volterra with ``(alpha, beta, gamma, delta) = (1.5, 1, 3, 1)``,
    ``y0 = (1, 1)`` on ``t in [0, 10]``, saved at ``num_save`` equispaced times."""
    if jnp.dtype(dtype) == jnp.float64 and not jax.config.jax_enable_x64:
        raise RuntimeError('float64 needs jax.config.update("jax_enable_x64", True) first')
    return Problem(
        name="lotka_volterra",
        f=lotka_volterra_rhs,
        f_numpy=lotka_volterra_rhs_numpy,
        y0=jnp.array([1.0, 1.0], dtype),
        ts=jnp.linspace(0.0, 10.0, num_save, dtype=dtype),
        args=jnp.array([1.5, 1.0, 3.0, 1.0], dtype),
    )
