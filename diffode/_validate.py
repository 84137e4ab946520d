"""Input checks shared by ``solve`` and ``steady_state`` (trace-time and run-time)."""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array


def is_inexact(x) -> bool:
    """Floating or complex arrays and scalars (tracers included)."""
    if isinstance(x, (bool, int)) or not isinstance(x, (jax.Array, np.ndarray, np.generic, float, complex)):
        return False
    return bool(jnp.issubdtype(jnp.result_type(x), jnp.inexact))


def all_finite(tree) -> Array:
    """Whether every floating-point entry of ``tree`` is finite: one reduction over all leaves
    (a neural network's parameters are many leaves, and a reduction each is a kernel each)."""
    leaves = [jnp.asarray(x) for x in jtu.tree_leaves(tree) if is_inexact(x)]
    if not leaves:
        return jnp.array(True)
    # The widest of the leaves' own dtypes (a Python float counts as what it converts to,
    # not as a weak type that would round it to a narrower leaf's): widening keeps a
    # finite value finite.
    wide = functools.reduce(jnp.promote_types, [x.dtype for x in leaves])
    return jnp.all(jnp.isfinite(jnp.concatenate([jnp.ravel(x).astype(wide) for x in leaves])))


def check_y0(y0) -> None:
    """Raise unless ``y0`` is a non-empty pytree of real floating-point arrays (at trace time)."""
    for path, leaf in jtu.tree_leaves_with_path(y0):
        if not is_inexact(leaf) or jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating):
            raise TypeError(
                f"y0{jtu.keystr(path)} must be a real floating-point array (complex states are "
                f"not supported: split them into real and imaginary parts), got {leaf!r}"
            )
    if not jtu.tree_leaves(y0):
        raise ValueError("y0 has no array leaves")


def _shape(x) -> tuple:
    """The shape of an array, a ``jax.ShapeDtypeStruct`` or a Python scalar."""
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def rhs_structure_problem(out, y0, name: str = "f") -> str | None:
    """Compare the output of ``f`` (or of the function ``name``) with ``y0`` (at trace time);
    describe any mismatch."""
    want, got = jtu.tree_structure(y0), jtu.tree_structure(out)
    if want != got:
        return f"{name} returned structure {got}, but y0 has structure {want}."
    for (path, a), b in zip(jtu.tree_leaves_with_path(y0), jtu.tree_leaves(out)):
        if _shape(a) != _shape(b):
            return f"{name} returned shape {_shape(b)} at y{jtu.keystr(path)}, but y0 has shape {_shape(a)}."
        if not jnp.issubdtype(jnp.result_type(b), jnp.floating) and not jnp.issubdtype(
            jnp.result_type(b), jnp.integer
        ):
            return (
                f"{name} returned dtype {jnp.result_type(b)} at y{jtu.keystr(path)}, but the state is real "
                f"({jnp.result_type(a)}): return real values (split complex ones into real and imaginary parts)."
            )
    return None


#: The largest ``max_steps``: the loop counts steps in int32.
MAX_STEPS_LIMIT = 2**31 - 2


def check_max_steps(max_steps) -> int:
    """``max_steps`` as a Python int, or a ``ValueError`` that says what is wrong with it."""
    try:
        if isinstance(max_steps, (bool, np.bool_)):
            raise TypeError
        value = operator.index(max_steps)
    except TypeError:
        raise ValueError(
            f"max_steps must be an integer known at trace time (a Python or NumPy int), got {max_steps!r}"
        ) from None
    if not 1 <= value <= MAX_STEPS_LIMIT:
        raise ValueError(f"max_steps must lie in [1, 2**31 - 2] (steps are counted in int32), got {value}")
    return value
