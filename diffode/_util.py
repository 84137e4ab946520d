"""Small internal helpers shared by the loop, the controller and the solvers."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


def select(pred, on_true, on_false):
    """``jnp.where`` for a scalar ``pred`` without a nested jit (cheaper to trace and compile).

    Python scalars take the dtype of the other operand, as in ``jnp.where``.
    """
    if not (
        isinstance(on_true, jax.Array)
        and isinstance(on_false, jax.Array)
        and on_true.dtype == on_false.dtype
        and on_true.shape == on_false.shape
    ):
        dtype = jnp.result_type(on_true, on_false)
        on_true = jnp.asarray(on_true, dtype)
        on_false = jnp.asarray(on_false, dtype)
        shape = jnp.broadcast_shapes(on_true.shape, on_false.shape)
        on_true = jnp.broadcast_to(on_true, shape)
        on_false = jnp.broadcast_to(on_false, shape)
    pred = jnp.asarray(pred)
    if pred.shape != on_true.shape:
        pred = lax.broadcast_in_dim(pred, on_true.shape, ())
    return lax.select(pred, on_true, on_false)


def tree_select(pred, on_true, on_false):
    return jtu.tree_map(lambda a, b: select(pred, a, b), on_true, on_false)



def float0_zeros(x) -> np.ndarray:
    """The zero tangent of an integer output of a custom JVP rule (dtype ``float0``)."""
    return np.zeros(np.shape(x), dtype=jax.dtypes.float0)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def raise_on_failure(x, status, messages: tuple[str, ...]):
    """``x``, raising ``messages[status]`` when ``status`` is not 0 (also under ``jit`` and ``vmap``)."""
    return eqx.branched_error_if(x, status != 0, status, messages)


@raise_on_failure.defjvp
def _raise_on_failure_jvp(messages, primals, tangents):
    # Checked on the derivative too: under jit, a program that only uses
    # derivatives of x would otherwise drop the check as dead code.
    x, status = primals
    dx = eqx.branched_error_if(tangents[0], status != 0, status, messages)
    return raise_on_failure(x, status, messages), dx
