"""Jacobians with a known sparsity pattern, from a few Jacobian-vector products.

Columns of ``J`` that have no nonzero row in common can share one ``jax.jvp``:
the product ``J (e_j + e_k)`` holds column ``j`` in ``j``'s rows and column ``k``
in ``k``'s. A colouring of the columns in which no two columns of a colour
share a row therefore gives ``J`` from one ``jvp`` per colour (Curtis, Powell and
Reid, "On the estimation of sparse Jacobian matrices", 1974; Coleman and Moré,
SIAM J. Numer. Anal. 20, 1983). A 5-point stencil on a grid with two coupled
species needs about 8 colours, whatever the grid size.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array


def _nonzeros(pattern) -> tuple[int, np.ndarray, np.ndarray]:
    """``(n, rows, cols)`` of a square pattern: a dense boolean or numeric array, or a
    scipy sparse matrix (read without densifying, so large states fit)."""
    if hasattr(pattern, "tocoo"):  # a scipy.sparse matrix or array
        coo = pattern.tocoo()
        shape, keep = coo.shape, coo.data != 0
        rows, cols = np.asarray(coo.row)[keep], np.asarray(coo.col)[keep]
    else:
        try:
            p = np.asarray(pattern)
        except jax.errors.TracerArrayConversionError:
            raise TypeError(
                "jac_sparsity must be a concrete array (NumPy, or JAX outside jit), not a traced value"
            ) from None
        if p.dtype != bool and not np.issubdtype(p.dtype, np.number):
            raise TypeError(f"jac_sparsity must hold booleans or numbers, got dtype {p.dtype}")
        shape = p.shape
        if len(shape) == 2:
            rows, cols = np.nonzero(p)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(
            f"jac_sparsity must be a square (n, n) array over the raveled state, got shape {shape}"
        )
    return shape[0], rows.astype(np.int64), cols.astype(np.int64)


def colour_columns(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """A colour (``0, 1, ...``) for each of the ``n`` columns of the pattern with nonzeros
    at ``(rows, cols)``, such that no two columns of one colour have a nonzero in the
    same row.

    Greedy, columns taken in order of decreasing nonzero count (the "largest
    first" ordering), each given the smallest colour none of its neighbours
    (columns sharing a row with it) holds.
    """

    def grouped(keys, values):  # values[keys == k] for k = 0 .. n - 1
        return np.split(
            values[np.argsort(keys, kind="stable")], np.cumsum(np.bincount(keys, minlength=n))[:-1]
        )

    col_rows, row_cols = grouped(cols, rows), grouped(rows, cols)
    colour = np.full(n, -1, np.int64)
    for j in np.argsort(-np.array([len(r) for r in col_rows]), kind="stable"):
        taken = set()
        for i in col_rows[j]:
            taken.update(colour[row_cols[i]].tolist())
        c = 0
        while c in taken:
            c += 1
        colour[j] = c
    return colour


class Sparsity:
    """A validated Jacobian sparsity pattern over the raveled state, with its column colouring.

    ``pattern[i, j]`` is true where ``df_i/dy_j`` may be nonzero (the diagonal is
    added: implicit solvers factor ``I - gamma h J``). ``solve(..., jac_sparsity=)``
    takes a pattern or a ``Sparsity``; building one first pays for the colouring
    once for many solves. Equal patterns hash equal, so a ``Sparsity`` is static
    (compile-time) data.
    """

    def __init__(self, pattern):
        self._build(*_nonzeros(pattern))

    @classmethod
    def from_nonzeros(cls, n: int, rows: np.ndarray, cols: np.ndarray) -> "Sparsity":
        """The pattern of ``n`` unknowns with nonzeros at ``(rows[k], cols[k])``."""
        self = cls.__new__(cls)
        self._build(n, np.asarray(rows, np.int64), np.asarray(cols, np.int64))
        return self

    def _build(self, n: int, rows: np.ndarray, cols: np.ndarray) -> None:
        diag = np.arange(n)
        flat = np.unique(np.concatenate([rows * n + cols, diag * n + diag]))  # sorted, with the diagonal
        self.n, self.rows, self.cols = n, flat // n, flat % n
        self.colours = colour_columns(n, self.rows, self.cols)
        self.num_colours = int(self.colours.max()) + 1 if n else 0
        self._key = hashlib.sha1(flat.tobytes() + str(n).encode()).hexdigest()

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, Sparsity) and other._key == self._key

    def check_size(self, n: int) -> None:
        if self.n != n:
            raise ValueError(
                f"jac_sparsity is ({self.n}, {self.n}), but the state has {n} components: it must be "
                f"({n}, {n}) over the raveled state (jax.flatten_util.ravel_pytree order)"
            )

    def __repr__(self):
        return f"Sparsity(n={self.n}, nonzeros={self.rows.size}, colours={self.num_colours})"

    def seeds(self, dtype) -> Array:
        """``(num_colours, n)``: row ``c`` is the sum of the unit vectors of colour ``c``'s columns."""
        s = np.zeros((self.num_colours, self.n))
        s[self.colours, np.arange(self.n)] = 1.0
        return jnp.asarray(s, dtype)

    def compressed(self, jvp: Callable[[Array], Array], dtype) -> Array:
        """``(n, num_colours)``: column ``c`` is ``jvp`` of colour ``c``'s seed, the sum of
        its columns of ``J`` (one vmapped call)."""
        return jax.vmap(jvp, out_axes=1)(self.seeds(dtype))

    def jacobian(self, fn: Callable[[Array], Array], y: Array) -> Array:
        """The dense ``(n, n)`` Jacobian of ``fn`` at ``y``: one ``jvp`` per colour, then
        each nonzero read from the product of its column's colour."""
        compressed = self.compressed(lambda s: jax.jvp(fn, (y,), (s,))[1], y.dtype)
        values = compressed[self.rows, self.colours[self.cols]]
        return jnp.zeros((self.n, self.n), values.dtype).at[self.rows, self.cols].set(values)
