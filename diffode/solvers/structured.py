"""Direct solvers for structured Jacobians: banded and sparse, by block-tridiagonal LU.

A breadth-first search over the graph of a sparsity pattern (an edge wherever
``J[i, j]`` or ``J[j, i]`` may be nonzero) splits the unknowns into levels:
every nonzero couples one level with itself or with a neighbouring one. In the
level ordering ``A = shift I - scale J`` is block tridiagonal, with one diagonal
block per level, and its LU factors keep that structure (no fill-in outside the
three block diagonals). Starting the search at a pseudo-peripheral unknown
(George and Liu, "An implementation of a pseudoperipheral node finder", ACM
TOMS 5, 1979) makes the levels many and narrow. A band of half-widths
``lower``, ``upper`` is the special case of contiguous levels of
``max(lower, upper)`` unknowns.

All levels are padded to the widest, ``m`` unknowns (padding is an identity
block), so the factorisation is one ``lax.scan`` over ``K`` levels of dense
``m x m`` work: ``K m^3`` operations against ``n^3 / 3`` for dense LU. On a
two-dimensional ``N x N`` grid ``m ~ 4N`` and ``K ~ N``, so ``N^4`` against
``N^6``; nested dissection would reach ``N^3`` but needs a sparse
multifrontal factorisation.

Pivoting is partial within each diagonal block (its Schur complement), not
across levels. That is stable when ``A`` is block diagonally dominant, which
``I - gamma h J`` is for small steps and for diffusion-dominated stiffness; a
Schur complement that is numerically singular is reported through ``ok``
like a singular dense matrix.
"""

from __future__ import annotations

from functools import lru_cache

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
from jaxtyping import Array, Bool

from .base import FlatRHS
from .colouring import Sparsity
from .linear import LU, AbstractDirectSolver, ShiftedJacobian, _split_complex

# ----------------------------------------------------------------------------
# The level structure (NumPy, at trace time)
# ----------------------------------------------------------------------------


def _adjacency(n: int, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR ``(indptr, indices)`` of the symmetrised pattern without its diagonal."""
    keep = rows != cols
    a, b = np.concatenate([rows[keep], cols[keep]]), np.concatenate([cols[keep], rows[keep]])
    key = np.unique(a * n + b)
    a, b = key // n, key % n
    return np.concatenate([[0], np.cumsum(np.bincount(a, minlength=n))]), b


def _bfs_levels(indptr: np.ndarray, indices: np.ndarray, start: int, seen: np.ndarray) -> list[np.ndarray]:
    """Levels of a breadth-first search from ``start`` over unknowns not yet ``seen`` (marked)."""
    levels, frontier = [], np.array([start])
    seen[start] = True
    while frontier.size:
        levels.append(frontier)
        counts = indptr[frontier + 1] - indptr[frontier]
        offsets = np.repeat(indptr[frontier] - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        nxt = np.unique(indices[offsets])
        frontier = nxt[~seen[nxt]]
        seen[frontier] = True
    return levels


def _peripheral_levels(indptr, indices, start: int, seen: np.ndarray) -> list[np.ndarray]:
    """The levels from a pseudo-peripheral unknown of ``start``'s component: restart from
    a least-connected unknown of the last level while that deepens the search."""
    degree = np.diff(indptr)
    best = _bfs_levels(indptr, indices, start, seen.copy())
    for _ in range(8):
        last = best[-1]
        cand = int(last[np.argmin(degree[last])])
        levels = _bfs_levels(indptr, indices, cand, seen.copy())
        if len(levels) <= len(best):
            break
        best = levels
    for level in best:
        seen[level] = True
    return best


class BlockStructure:
    """The block-tridiagonal layout of a pattern: ``K`` blocks of ``m`` slots.

    ``slots[k, a]`` is the unknown in slot ``a`` of block ``k`` (``n`` for
    padding); ``where[i]`` is unknown ``i``'s flat slot. ``take[d, k, a, b]``
    (``d`` = 0 diagonal, 1 above, 2 below) indexes ``J``'s entry for the block
    entry ``(k, a), (k + d', b)`` in the colour-compressed Jacobian of
    ``sparsity`` (raveled, ``n * colours`` for a structural zero).
    """

    def __init__(self, sparsity: Sparsity, levels: list[np.ndarray]):
        n = sparsity.n
        self.sparsity, self.n = sparsity, n
        self.num_blocks = len(levels)
        self.width = max(len(level) for level in levels) if levels else 1
        K, m = self.num_blocks, self.width
        self.slots = np.full((K, m), n, np.int64)
        block, offset = np.empty(n, np.int64), np.empty(n, np.int64)
        for k, level in enumerate(levels):
            self.slots[k, : len(level)] = level
            block[level], offset[level] = k, np.arange(len(level))
        self.where = block * m + offset
        self.padding = self.slots == n
        r, c = sparsity.rows, sparsity.cols
        shift = block[c] - block[r]
        if np.any(np.abs(shift) > 1):
            raise ValueError("a pattern entry couples blocks that are not neighbours")
        zero = n * sparsity.num_colours
        self.take = np.full((3, K, m, m), zero, np.int64)
        src = r * sparsity.num_colours + sparsity.colours[c]
        # diagonal: block k = block[r]; above: (k, k + 1) at k = block[r]; below: (k + 1, k) at k = block[c].
        for d, sel, k in ((0, shift == 0, block[r]), (1, shift == 1, block[r]), (2, shift == -1, block[c])):
            self.take[d, k[sel], offset[r][sel], offset[c][sel]] = src[sel]

    @property
    def cost(self) -> int:
        """Multiply-adds of one factorisation, about ``K m^3 (1/3 + 2 + 2)``."""
        return int(self.num_blocks * self.width**3 * 13 // 3)


@lru_cache(maxsize=32)
def level_structure(sparsity: Sparsity) -> BlockStructure:
    """Breadth-first levels of ``sparsity`` (each connected part from a pseudo-peripheral unknown)."""
    n = sparsity.n
    indptr, indices = _adjacency(n, sparsity.rows, sparsity.cols)
    seen = np.zeros(n, bool)
    levels: list[np.ndarray] = []
    for start in np.argsort(np.diff(indptr), kind="stable"):  # least connected first
        if not seen[start]:
            levels += _peripheral_levels(indptr, indices, int(start), seen)
    return BlockStructure(sparsity, _grouped(levels))


def _grouped(levels: list[np.ndarray]) -> list[np.ndarray]:
    """Consecutive levels merged into blocks (still block tridiagonal), with the block
    width that minimises ``K m^3`` among a few multiples of the widest level."""
    sizes = np.array([len(level) for level in levels])

    def pack(width):
        groups, current, used = [], [], 0
        for level, size in zip(levels, sizes):
            if current and used + size > width:
                groups.append(np.concatenate(current))
                current, used = [], 0
            current.append(level)
            used += size
        return groups + [np.concatenate(current)]

    options = [pack(int(sizes.max() * r)) for r in (1.0, 1.25, 1.5, 2.0)]
    return min(options, key=lambda g: len(g) * max(len(b) for b in g) ** 3)


@lru_cache(maxsize=32)
def band_structure(n: int, lower: int, upper: int) -> BlockStructure:
    """Contiguous blocks of ``max(lower, upper, 1)`` unknowns for a band."""
    i = np.arange(n)
    rows = np.concatenate([i[max(0, -d) : n - max(0, d)] for d in range(-lower, upper + 1)])
    cols = np.concatenate([i[max(0, d) : n + min(0, d)] for d in range(-lower, upper + 1)])
    m = max(lower, upper, 1)
    return BlockStructure(Sparsity.from_nonzeros(n, rows, cols), [i[s : s + m] for s in range(0, n, m)])


# ----------------------------------------------------------------------------
# Block-tridiagonal LU
# ----------------------------------------------------------------------------


class Blocks(eqx.Module):
    """``J`` in block-tridiagonal form: ``diag[k]``, ``above[k]`` (block ``(k, k+1)``),
    ``below[k]`` (block ``(k+1, k)``), each ``(K, m, m)``."""

    diag: Array
    above: Array
    below: Array


class BlockFactors(eqx.Module):
    """``A = L U``: ``L`` is block lower bidiagonal with the Schur complements ``S_k`` on
    its diagonal and ``A``'s ``below`` blocks under it; ``U`` is unit upper with
    ``G_k = S_k^-1 above_k`` over its diagonal. ``inverse[k]`` is ``S_k^-1``, kept
    explicitly: the sweeps of a solve are then matrix-vector products only, which
    on a CPU costs a third of two triangular solves per block."""

    inverse: Array
    gain: Array
    below: Array
    singular: Bool[Array, ""]


def _factor(diag: Array, above: Array, below: Array) -> BlockFactors:
    """Block Thomas factorisation, one ``lax.scan`` over the blocks:
    ``S_k = diag_k - below_{k-1} G_{k-1}``."""
    K, m, _ = diag.shape
    eye = jnp.eye(m, dtype=diag.dtype)

    def body(update, blocks):
        d, e, f = blocks  # f: the block (k+1, k) below this one
        lu, piv = jsl.lu_factor(d - update)
        inv = jsl.lu_solve((lu, piv), eye)
        g = inv @ e
        pivots = jnp.abs(jnp.diagonal(lu))
        return f @ g, (inv, g, jnp.min(pivots), jnp.max(pivots))

    _, (inverse, gain, small, big) = lax.scan(body, jnp.zeros((m, m), diag.dtype), (diag, above, below))
    # Numerically singular, as for dense LU: a pivot below n eps times the largest.
    big = jnp.max(big)
    singular = (big == 0) | (jnp.min(small) <= K * m * jnp.finfo(diag.dtype).eps * big) | ~jnp.isfinite(big)
    return BlockFactors(inverse, gain, below, singular)


def _sweep(step, init: Array, xs, reverse: bool = False) -> Array:
    return lax.scan(lambda c, x: (step(c, x),) * 2, init, xs, reverse=reverse)[1]


def _solve(fac: BlockFactors, b: Array) -> Array:
    """``A x = b`` for ``b`` of shape ``(K, m)``: ``L z = b`` forwards, ``U x = z`` backwards."""
    b = b.astype(jnp.result_type(b, fac.inverse))
    below_prev = jnp.concatenate([jnp.zeros_like(fac.below[:1]), fac.below[:-1]])  # block (k, k-1)
    z = _sweep(
        lambda z, blk: blk[0] @ (blk[2] - blk[1] @ z), jnp.zeros_like(b[0]), (fac.inverse, below_prev, b)
    )
    return _sweep(lambda x, blk: blk[1] - blk[0] @ x, jnp.zeros_like(b[0]), (fac.gain, z), reverse=True)


def _solve_transpose(fac: BlockFactors, b: Array) -> Array:
    """``A^T x = b``: ``U^T w = b`` forwards, ``L^T x = w`` backwards (plain transposes)."""
    b = b.astype(jnp.result_type(b, fac.inverse))
    gain_prev = jnp.concatenate([jnp.zeros_like(fac.gain[:1]), fac.gain[:-1]])  # G_{k-1}
    w = _sweep(lambda w, blk: blk[1] - blk[0].T @ w, jnp.zeros_like(b[0]), (gain_prev, b))
    return _sweep(
        lambda x, blk: blk[0].T @ (blk[2] - blk[1].T @ x),
        jnp.zeros_like(b[0]),
        (fac.inverse, fac.below, w),
        reverse=True,
    )


def _flat_operand(x) -> bool:
    """Whether ``x`` (a flat state or a :class:`ShiftedJacobian`) is one a structured solver
    can take; a ``FunctionOperator`` (the stage systems of derivative rules) has no
    known structure."""
    if not isinstance(x, ShiftedJacobian) and not hasattr(x, "ndim"):
        return False
    return len(x.shape) == 1


class BlockTridiagonalLU(AbstractDirectSolver):
    """Shared by :class:`SparseLU` and :class:`BandedLU`: the three calls of the protocol
    on a :class:`BlockStructure`; operators of another size (augmented sensitivity
    systems, the stage systems of derivative rules) are solved by dense :class:`LU`."""

    def structure(self, n: int) -> BlockStructure:
        raise NotImplementedError

    def _applies(self, x) -> bool:
        """Whether ``x`` (the state, or an operator) is one this structure solves."""
        return _flat_operand(x) and self._fits(x.shape[0])

    def _fits(self, n: int) -> bool:
        return True

    def linearise(self, f, t, y):
        if not self._applies(y):
            return LU().linearise(f, t, y)
        st = self.structure(y.shape[0])
        sp = st.sparsity
        compressed = sp.compressed(lambda s: f.jvp(t, y, s), y.dtype)
        flat = jnp.concatenate([compressed.reshape(-1), jnp.zeros((1,), y.dtype)])
        take = flat[st.take]
        return Blocks(take[0], take[1], take[2])

    def init(self, op):
        if not self._applies(op):
            return LU().init(op)
        st = self.structure(op.shape[0])
        jac, dtype = op.jac, op.dtype
        pad = jnp.asarray(st.padding)
        eye = jnp.eye(st.width, dtype=bool)
        diag = -op.scale * jac.diag.astype(dtype)
        if op.shift is not None:
            diag = diag + op.shift * eye.astype(dtype)
        diag = jnp.where(pad[:, :, None] & eye, jnp.ones((), dtype), diag)
        return _factor(diag, -op.scale * jac.above.astype(dtype), -op.scale * jac.below.astype(dtype))

    def compute(self, state, op, b, transpose=False):
        if not isinstance(state, BlockFactors):
            return LU().compute(state, op, b, transpose)
        st = self.structure(op.shape[0])
        shape = b.shape
        flat = jnp.concatenate([b.reshape(-1), jnp.zeros((1,), b.dtype)])
        x = (_solve_transpose if transpose else _solve)(state, flat[st.slots])
        x = x.reshape(-1)[st.where].reshape(shape)
        return x, ~state.singular & jnp.all(jnp.isfinite(x))


class SparseLU(BlockTridiagonalLU):
    """Sparse direct solves for a Jacobian sparsity pattern: block-tridiagonal LU in a
    breadth-first level ordering (see the module docstring).

    ``J`` is formed from one ``jax.jvp`` per column colour of the pattern
    (:class:`diffode.Sparsity`), straight into the blocks; it is never dense.
    ``solve(..., jac_sparsity=pattern)`` uses it by default in every implicit
    solver whose ``linear_solver`` is :class:`LU`. Operators of another size
    than the pattern (augmented sensitivity systems, derivative rules' stage
    systems) are solved by dense :class:`LU`.

    Args:
        pattern: a :class:`diffode.Sparsity` or anything it accepts (a boolean
            ``(n, n)`` array, a scipy sparse matrix).
    """

    sparsity: Sparsity = eqx.field(static=True)

    def __init__(self, pattern):
        self.sparsity = pattern if isinstance(pattern, Sparsity) else Sparsity(pattern)

    def _fits(self, n):
        return n == self.sparsity.n

    def structure(self, n):
        return level_structure(self.sparsity)


class BandedLU(BlockTridiagonalLU):
    """Banded LU: ``J[i, j]`` may be nonzero only for ``-lower <= j - i <= upper``.

    Contiguous blocks of ``max(lower, upper)`` unknowns make the band block
    tridiagonal (see the module docstring): ``n max(lower, upper)^2`` work per
    factorisation. ``J`` is formed from ``lower + upper + 1`` ``jax.jvp``\\ s.
    """

    lower: int = eqx.field(static=True)
    upper: int = eqx.field(static=True)

    def __check_init__(self):
        if self.lower < 0 or self.upper < 0:
            raise ValueError(
                f"BandedLU: half-bandwidths must be non-negative, got {self.lower}, {self.upper}"
            )

    def structure(self, n):
        return band_structure(n, self.lower, self.upper)


# ----------------------------------------------------------------------------
# Augmented sensitivity systems
# ----------------------------------------------------------------------------


class SensitivityLU(AbstractDirectSolver):
    """Solves with the augmented system of forward sensitivities by factorising ``n x n``.

    :class:`~diffode.ForwardSensitivity` integrates ``z = [y, s_1, ..., s_k]`` with
    ``s_i' = J(y) s_i + b_i(y)``. The augmented Jacobian is block lower triangular
    with ``J`` in every diagonal block, and block ``i`` of its first block column
    is ``C_i = d(J(y) s_i + b_i(y))/dy``. So ``A = shift I - scale J_aug`` is
    solved by one factorisation of ``A_0 = shift I - scale J`` (by ``inner``, of
    the size of ``y``) and block forward substitution:
    ``x_0 = A_0^-1 b_0``, ``x_i = A_0^-1 (b_i + scale C_i x_0)``, where all
    ``C_i x_0`` come from one ``jvp`` of the augmented right-hand side. The
    transpose is block backward substitution with one ``vjp``. This is the
    simultaneous corrector of Caracotsios and Stewart (1985) with an exact
    Jacobian, at the cost of one factorisation of the state's size instead of one
    of ``(k + 1)`` times its size (and ``n`` instead of ``n (k + 1)`` Jacobian
    columns). Operators of another form (the stage systems of derivative rules)
    are solved by dense :class:`~diffode.LU`.

    Args:
        inner: the linear solver of the ``n``-dimensional block (a direct solver:
            :class:`~diffode.LU`, :class:`SparseLU`, :class:`BandedLU`, or another
            ``SensitivityLU`` for sensitivities of sensitivities).
        n: the size of ``y``, the leading block of the augmented state.
    """

    inner: AbstractDirectSolver
    n: int = eqx.field(static=True)

    def _applies(self, x) -> bool:
        """Whether ``x`` (the state, or an operator) is an augmented system of ``n``-blocks."""
        return _flat_operand(x) and x.shape[0] > self.n and x.shape[0] % self.n == 0

    def _top(self, f, z: Array):
        """The right-hand side of the leading block as a function of ``y`` alone (it does
        not depend on the sensitivities; XLA drops their part of the computation)."""
        n, rest = self.n, z[self.n :]
        return FlatRHS(lambda t, y: f(t, jnp.concatenate([y, rest.astype(y.dtype)]))[:n])

    def _inner_op(self, op: ShiftedJacobian) -> ShiftedJacobian:
        return ShiftedJacobian(self._top(op.f, op.y), op.t, op.y[: self.n], op.jac, op.shift, op.scale)

    def linearise(self, f, t, y):
        if not self._applies(y):
            return LU().linearise(f, t, y)
        return self.inner.linearise(self._top(f, y), t, y[: self.n])

    def init(self, op):
        if not self._applies(op):
            return LU().init(op)
        return self.inner.init(self._inner_op(op))

    def compute(self, state, op, b, transpose=False):
        if not self._applies(op):
            return LU().compute(state, op, b, transpose)
        n = self.n
        inner_op = self._inner_op(op)
        blocks = b.reshape(-1, n)
        solve = lambda v: self.inner.compute(state, inner_op, v, transpose)  # noqa: E731
        if not transpose:
            x0, ok = solve(blocks[0])
            tangent = jnp.concatenate([x0, jnp.zeros((b.shape[0] - n,), x0.dtype)])
            coupling = _split_complex(lambda v: op.f.jvp(op.t, op.y, v), tangent)[n:].reshape(-1, n)
            xs, oks = jax.vmap(solve)(blocks[1:] + op.scale * coupling)
            x = jnp.concatenate([x0[None], xs])
        else:
            xs, oks = jax.vmap(solve)(blocks[1:])
            cot = jnp.concatenate([jnp.zeros((n,), xs.dtype), xs.reshape(-1)])
            coupling = _split_complex(lambda v: op.f.vjp(op.t, op.y, v), cot)[:n]
            x0, ok = solve(blocks[0] + op.scale * coupling)
            x = jnp.concatenate([x0[None], xs])
        return x.reshape(b.shape), ok & jnp.all(oks)
