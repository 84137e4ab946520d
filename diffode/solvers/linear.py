"""Linear solvers: one protocol for every implicit solver and for steady states.

Every linear system diffode solves has the form ``A x = b`` with

    A = shift I - scale J,     J = df/dy(t, y),

(:class:`ShiftedJacobian`): ``I - gamma h J`` in SDIRK and Rosenbrock steps
(``shift = 1``, ``scale = gamma h``), ``gamma/h I - J`` and the complex
``(alpha + i beta)/h I - J`` in Radau5 (``scale = 1``), ``J`` itself in Newton's
method for steady states (no shift, ``scale = -1``) and ``I/dt - J`` in
pseudo-transient continuation. Derivative rules also solve with the linearised
stage equations of a step, a general linear map (:class:`FunctionOperator`).

The operator says what ``A`` is; a linear solver says how to solve with it. A
linear solver is a small configuration object (an :class:`AbstractLinearSolver`)
with three calls:

1. ``jac = solver.linearise(f, t, y)``: what the solver keeps of ``J`` at
   ``(t, y)`` (a pytree): the dense matrix for :class:`LU`, nothing for
   matrix-free :class:`GMRES`; the blocks for the structured solvers. The
   Jacobian-reuse policy below may keep it for many steps.
2. ``state = solver.init(op)``: factor once (LU factors of ``op``; a
   preconditioner's setup; nothing). ``op`` carries ``jac`` (maybe from an
   earlier point), the shift and the scale.
3. ``x, ok = solver.compute(state, op, b, transpose=False)``: solve many.
   ``transpose=True`` solves ``A^T x = b`` (reverse-mode derivatives, the
   implicit-function theorem). ``ok`` is false when the operator is
   numerically singular or an iterative solve did not converge.

``forms_jacobian`` and ``factorises`` tell the counters whether ``linearise``
evaluates a Jacobian and ``init`` decomposes a matrix.

On top of the protocol, written once for every implicit solver, is the
Jacobian-reuse policy (Hairer and Wanner, "Solving ODEs II", IV.8):
:class:`IterationMatrix` carries ``J`` (as the solver keeps it), the current
linearisation point for products, and the factors of one or more shifted
operators; :func:`update` re-evaluates ``J`` only when the stepper asks for it
(``new_jac``) and refactors only when ``J`` changed or a shift or scale did
(a new step size); :func:`solve` solves with system ``k``. Under ``jax.vmap``
the conditional work becomes a select (both branches run), while the returned
counts stay per batch member.

Adding a linear solver is one new subclass implementing the three calls; no
stepper changes (``structured.py`` adds the banded and sparse LU this way). See
``docs/stiff.md``, "Linear solvers".
"""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import jax.scipy.sparse.linalg as jssl
from jaxtyping import Array, Bool, Float

from .base import FlatRHS

# ----------------------------------------------------------------------------
# Operators
# ----------------------------------------------------------------------------


def _split_complex(fn: Callable[[Array], Array], v: Array) -> Array:
    """``fn(v)`` for a real-linear ``fn`` of real vectors, applied to a complex ``v``
    as ``fn(re v) + i fn(im v)`` (one vmapped call)."""
    if not jnp.iscomplexobj(v):
        return fn(v)
    out = jax.vmap(fn)(jnp.stack([v.real, v.imag]))
    return lax.complex(out[0], out[1])


class ShiftedJacobian:
    """``A = shift I - scale J`` with ``J = df/dy(t, y)`` (``A = -scale J`` when ``shift`` is ``None``).

    ``jac`` is what the linear solver's ``linearise`` returned, possibly at an
    earlier point (a reused Jacobian): solvers that form ``A`` use it.
    Products (:meth:`mv`, :meth:`rmv`) use ``f`` at ``(t, y)``: one ``jax.jvp``
    or ``jax.vjp``. A complex ``shift`` gives a complex operator (Radau5).
    Built at trace time; not a pytree.
    """

    def __init__(self, f: FlatRHS, t: Array, y: Array, jac: Any, shift: Array | None, scale: Array):
        self.f, self.t, self.y, self.jac, self.shift, self.scale = f, t, y, jac, shift, scale

    @property
    def shape(self) -> tuple[int, ...]:
        return self.y.shape

    @property
    def dtype(self):
        return self.y.dtype if self.shift is None else jnp.result_type(self.y.dtype, self.shift)

    def _apply(self, jprod: Callable[[Array], Array], v: Array) -> Array:
        jv = _split_complex(jprod, v)
        if self.shift is None:
            return -self.scale * jv
        return self.shift * v - self.scale * jv

    def mv(self, v: Array) -> Array:
        """``A v``."""
        return self._apply(lambda u: self.f.jvp(self.t, self.y, u), v)

    def rmv(self, v: Array) -> Array:
        """``A^T v`` (the plain transpose, also for complex ``A``)."""
        return self._apply(lambda u: self.f.vjp(self.t, self.y, u), v)

    def as_matrix(self, jac: Array | None = None) -> Array:
        """``A`` as a dense matrix, from the dense ``jac`` (default: ``self.jac``;
        ``f.jac(t, y)`` when that is ``None``)."""
        jac = self.jac if jac is None else jac
        if jac is None:
            jac = self.f.jac(self.t, self.y).astype(self.y.dtype)
        dtype = self.dtype
        scaled = self.scale * jac.astype(dtype)
        if self.shift is None:
            return -scaled
        return self.shift * jnp.eye(self.y.shape[0], dtype=dtype) - scaled


class FunctionOperator:
    """``A v = fn(v)`` for a linear ``fn`` on arrays shaped like ``like`` (any shape).

    The stage equations' linearisation in the steppers' derivative rules.
    :meth:`as_matrix` forms ``A`` column by column (one vmapped call of ``fn``),
    for solvers that factorise. Built at trace time; not a pytree.
    """

    def __init__(self, fn: Callable[[Array], Array], like: Array):
        self.fn, self.like = fn, like
        self.jac = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.like.shape

    @property
    def dtype(self):
        return self.like.dtype

    def mv(self, v: Array) -> Array:
        return self.fn(v.reshape(self.like.shape)).reshape(v.shape)

    def rmv(self, v: Array) -> Array:
        (out,) = jax.linear_transpose(self.fn, self.like)(v.reshape(self.like.shape))
        return out.reshape(v.shape)

    def as_matrix(self) -> Array:
        m = self.like.size
        basis = jnp.eye(m, dtype=self.like.dtype).reshape((m,) + self.like.shape)
        return jax.vmap(self.fn)(basis).reshape(m, m).T  # column k is fn(e_k)


Operator = ShiftedJacobian | FunctionOperator

# ----------------------------------------------------------------------------
# The protocol and the built-in solvers
# ----------------------------------------------------------------------------


class AbstractLinearSolver(eqx.Module):
    """How to solve ``A x = b`` for an operator ``A`` (see the module docstring)."""

    @property
    def forms_jacobian(self) -> bool:
        """Whether :meth:`linearise` evaluates a Jacobian (counted in ``num_jac_evals``)."""
        return False

    @property
    def factorises(self) -> bool:
        """Whether :meth:`init` decomposes a matrix (counted in ``num_lu_decomps``)."""
        return False

    def linearise(self, f: FlatRHS, t: Array, y: Float[Array, " n"]) -> Any:
        """What this solver keeps of ``J = df/dy(t, y)`` (a pytree); ``None`` by default."""
        return None

    def init(self, op: Operator) -> Any:
        """Prepare solves with ``op`` (factorise); a pytree. ``None`` by default."""
        return None

    def compute(
        self, state: Any, op: Operator, b: Array, transpose: bool = False
    ) -> tuple[Array, Bool[Array, ""]]:
        """``(x, ok)`` with ``A x = b`` (``A^T x = b`` if ``transpose``)."""
        raise NotImplementedError


class LUFactors(eqx.Module):
    """LU factors (partial pivoting) of a square operator and whether it is numerically singular."""

    lu: Array
    piv: Array
    singular: Bool[Array, ""]


class AbstractDirectSolver(AbstractLinearSolver):
    """A linear solver that forms ``J`` in :meth:`linearise` and factorises in :meth:`init`
    (both counted): dense :class:`LU` and the structured solvers."""

    @property
    def forms_jacobian(self) -> bool:
        return True

    @property
    def factorises(self) -> bool:
        return True


class LU(AbstractDirectSolver):
    """Dense LU with partial pivoting; real or complex operators.

    ``linearise`` forms ``J`` (the user's ``jac`` when ``solve`` got one, else
    ``jax.jacfwd``); ``init`` factorises ``shift I - scale J``. With the reuse
    policy of :func:`update`, ``J`` is kept until the stepper asks for a new one
    and the factors as long as neither ``J`` nor the shift changes (all stages
    of a step, every step of a fixed-step solve).
    """

    def linearise(self, f, t, y):
        return f.jac(t, y).astype(y.dtype)

    def init(self, op):
        a = op.as_matrix()
        lu, piv = jsl.lu_factor(a)
        # Numerically singular: a pivot below n eps times the largest one (the
        # rank cut-off of numpy.linalg.matrix_rank, applied to U's diagonal).
        d = jnp.abs(jnp.diagonal(lu))
        big = jnp.max(d)
        tiny = a.shape[0] * jnp.finfo(a.dtype).eps * big
        singular = (big == 0) | (jnp.min(d) <= tiny) | ~jnp.isfinite(big)
        return LUFactors(lu, piv.astype(jnp.int32), singular)

    def compute(self, state, op, b, transpose=False):
        shape = b.shape
        x = jsl.lu_solve((state.lu, state.piv), b.reshape(-1), trans=1 if transpose else 0).reshape(shape)
        return x, ~state.singular & jnp.all(jnp.isfinite(x))


#: A user preconditioner for :class:`GMRES`: called with the operator, returns ``v -> M v`` with ``M ~ A^-1``.
PreconditionerFactory = Callable[[ShiftedJacobian], Callable[[Array], Array]]


class GMRES(AbstractLinearSolver):
    """Restarted GMRES (``jax.scipy.sparse.linalg.gmres``, Givens-rotation variant), matrix-free.

    Each Krylov iteration costs one product ``A v`` (one ``jax.jvp`` of ``f``;
    ``jax.vjp`` for transposed solves). Products are taken at the current
    linearisation point (the step's start), since that costs nothing, whatever
    the Jacobian-reuse policy says. Complex operators (Radau5's second system)
    are solved in complex arithmetic. GMRES solves for ``b / ||b||`` and scales
    back: jax's GMRES treats residual norms below machine epsilon as zero, so a
    small right-hand side (a Newton correction near convergence) would
    otherwise be solved only to about ``eps / ||b||``.

    Args:
        rtol: stop when ``||b - A x|| <= rtol ||b||`` (2-norm; the preconditioned
            residual when there is a preconditioner); floored at 10 machine
            epsilons of the state's dtype.
        restart: Krylov subspace dimension before a restart (capped at ``n``).
        maxiter: maximum number of restarts (``None``: ``10 n``, as in
            ``jax.scipy.sparse.linalg.gmres``).
        preconditioner: ``None``; or a linear solver, built from the same
            operator and applied as an approximate inverse (for instance
            ``LU()``: its factors come from a Jacobian the reuse policy may keep
            for many steps, while GMRES multiplies with the current one); or a
            callable ``make(op) -> (v -> M v)`` that receives the
            :class:`ShiftedJacobian` (``op.shift``, ``op.scale``, ``op.t``,
            ``op.y``, ``op.f``) and returns an approximation of ``A^-1``,
            which must be linear in ``v``. Applied (left preconditioning) to the
            systems ``shift I - scale J`` only: the stage systems of derivative
            rules are solved unpreconditioned. Stored as a static field, so
            it must be hashable (a function, or a module without arrays).
    """

    rtol: float = eqx.field(static=True, default=1e-6)
    restart: int = eqx.field(static=True, default=20)
    maxiter: int | None = eqx.field(static=True, default=None)
    preconditioner: Any = eqx.field(static=True, default=None)

    def __check_init__(self):
        if not self.rtol > 0:
            raise ValueError(f"GMRES: rtol must be positive, got {self.rtol}")
        if self.restart < 1 or (self.maxiter is not None and self.maxiter < 1):
            raise ValueError("GMRES: restart and maxiter must be positive")
        p = self.preconditioner
        if p is not None and not isinstance(p, AbstractLinearSolver) and not callable(p):
            raise TypeError(f"GMRES: preconditioner must be a linear solver or a callable, got {p!r}")

    @property
    def _solver_preconditioner(self) -> AbstractLinearSolver | None:
        p = self.preconditioner
        return p if isinstance(p, AbstractLinearSolver) else None

    @property
    def forms_jacobian(self) -> bool:
        p = self._solver_preconditioner
        return p is not None and p.forms_jacobian

    @property
    def factorises(self) -> bool:
        p = self._solver_preconditioner
        return p is not None and p.factorises

    def linearise(self, f, t, y):
        p = self._solver_preconditioner
        return None if p is None else p.linearise(f, t, y)

    def init(self, op):
        p = self._solver_preconditioner
        if p is None or not isinstance(op, ShiftedJacobian):
            return None
        return p.init(op)

    def _preconditioner(self, state, op, transpose: bool, like: Array) -> Callable[[Array], Array] | None:
        p = self.preconditioner
        if p is None or not isinstance(op, ShiftedJacobian):
            return None
        if isinstance(p, AbstractLinearSolver):
            return lambda v: p.compute(state, op, v, transpose)[0]
        m = p(op)
        if not transpose:
            return m
        mt = jax.linear_transpose(m, like)
        return lambda v: mt(v)[0]

    def _tol(self, dtype) -> float:
        """``rtol``, floored at ``10 eps`` of ``dtype`` (a tighter residual is not attainable)."""
        return max(self.rtol, 10 * float(jnp.finfo(dtype).eps))

    def compute(self, state, op, b, transpose=False):
        matvec = op.rmv if transpose else op.mv
        nb = jnp.linalg.norm(b)
        scale = jnp.where(nb > 0, nb, 1).astype(b.dtype)
        m = self._preconditioner(state, op, transpose, b)
        x, _ = jssl.gmres(
            matvec,
            b / scale,
            tol=self._tol(b.dtype),
            atol=0.0,
            restart=min(self.restart, b.size),
            maxiter=self.maxiter,
            M=m,
            solve_method="incremental",
        )
        x = x * scale
        # jax's GMRES reports no convergence flag: check the residual it iterated
        # on (preconditioned, when there is a preconditioner) explicitly, with one
        # more product (dropped by XLA where ok is unused). A factor of 10 allows
        # for the recursive residual's drift.
        r, ref = b - matvec(x), nb
        if m is not None:
            r, ref = m(r), jnp.linalg.norm(m(b))
        ok = jnp.all(jnp.isfinite(x)) & (jnp.linalg.norm(r) <= 10 * self._tol(b.dtype) * ref)
        return x, ok


def solve_linear_map(linear_solver: AbstractLinearSolver, fn: Callable[[Array], Array], b: Array) -> Array:
    """``x`` with ``fn(x) = b`` for a linear ``fn`` (``tangent_solve`` of ``lax.custom_root``).

    Factorised once (:class:`LU` forms the matrix of ``fn``), solved through
    ``lax.custom_linear_solve`` so that reverse mode solves the transpose with
    the same factors and differentiates only ``fn``.
    """
    op = FunctionOperator(fn, b)
    state = linear_solver.init(op)

    def solve(_, r):
        return linear_solver.compute(state, op, r)[0]

    def transpose_solve(_, r):
        return linear_solver.compute(state, op, r, transpose=True)[0]

    return lax.custom_linear_solve(fn, b, solve, transpose_solve)


# ----------------------------------------------------------------------------
# The Jacobian-reuse policy, shared by every implicit stepper
# ----------------------------------------------------------------------------


class IterationMatrix(eqx.Module):
    """What a stepper carries between steps for its linear systems ``shift_k I - scale_k J``.

    ``t``, ``y``: the current linearisation point (products use it). ``jac``:
    ``J`` as the linear solver keeps it, from the last point where it was
    evaluated. ``shifts``, ``scales``: one per system, as last factorised.
    ``factors``: the linear solver's ``init`` state of each system.
    """

    t: Array
    y: Array
    jac: Any
    shifts: tuple[Any, ...]
    scales: tuple[Any, ...]
    factors: tuple[Any, ...]


def _ops(f, t, y, jac, shifts, scales):
    return [ShiftedJacobian(f, t, y, jac, s, c) for s, c in zip(shifts, scales)]


def iteration_matrix(
    linear_solver: AbstractLinearSolver, f: FlatRHS, t: Array, y: Array, shifts: tuple, scales: tuple
) -> IterationMatrix:
    """A placeholder :class:`IterationMatrix` (nothing evaluated), for a stepper's ``init``.

    ``shifts`` and ``scales`` give the systems' number and dtypes. The first
    :func:`update` must ask for a new Jacobian; NaN shifts make it factorise.
    """
    t = jnp.asarray(t)
    jac = jax.eval_shape(lambda t, y: linear_solver.linearise(f, t, y), t, y)
    jac = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jac)
    shifts = tuple(jnp.full((), jnp.nan, jnp.result_type(s)) for s in shifts)
    scales = tuple(jnp.full((), jnp.nan, jnp.result_type(s)) for s in scales)
    factors = jax.eval_shape(
        lambda j: tuple(linear_solver.init(op) for op in _ops(f, t, y, j, shifts, scales)), jac
    )
    factors = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), factors)
    return IterationMatrix(t, y, jac, shifts, scales, factors)


def update(
    linear_solver: AbstractLinearSolver,
    f: FlatRHS,
    t: Array,
    y: Array,
    matrix: IterationMatrix | None,
    new_jac: Bool[Array, ""] | bool,
    shifts: tuple,
    scales: tuple,
) -> tuple[IterationMatrix, Array, Array]:
    """Make ``matrix`` ready to solve with ``shift_k I - scale_k J`` at ``(t, y)``.

    ``J`` is re-evaluated when ``new_jac`` is true, otherwise kept; each system
    is refactorised when ``J`` changed or any shift or scale differs from the
    one its factors were built for. ``matrix=None`` with ``new_jac=True``
    (a Python bool) builds everything afresh (Rosenbrock steps). Returns
    ``(matrix, num_jac_evals, num_lu_decomps)`` (int32; decompositions count
    one per system).
    """
    shifts = tuple(jnp.asarray(s) for s in shifts)
    scales = tuple(jnp.asarray(c) for c in scales)
    t = jnp.asarray(t) if matrix is None else jnp.asarray(t, matrix.t.dtype)
    nsys = len(shifts)
    if new_jac is True:
        jac = linear_solver.linearise(f, t, y)
        factors = tuple(linear_solver.init(op) for op in _ops(f, t, y, jac, shifts, scales))
        one = jnp.ones((), jnp.int32)
        num_jac = one if linear_solver.forms_jacobian else 0 * one
        num_lu = nsys * one if linear_solver.factorises else 0 * one
        return IterationMatrix(t, y, jac, shifts, scales, factors), num_jac, num_lu
    new_jac = jnp.asarray(new_jac, bool)
    jac = lax.cond(new_jac, lambda: linear_solver.linearise(f, t, y), lambda: matrix.jac)
    refactor = new_jac
    for s, s_old, c, c_old in zip(shifts, matrix.shifts, scales, matrix.scales):
        refactor = refactor | (s != s_old) | (c != c_old)
    factors = lax.cond(
        refactor,
        lambda: tuple(linear_solver.init(op) for op in _ops(f, t, y, jac, shifts, scales)),
        lambda: matrix.factors,
    )
    num_jac = (new_jac & linear_solver.forms_jacobian).astype(jnp.int32)
    num_lu = (refactor & linear_solver.factorises).astype(jnp.int32) * nsys
    return IterationMatrix(t, y, jac, shifts, scales, factors), num_jac, num_lu


def solve(
    linear_solver: AbstractLinearSolver,
    f: FlatRHS,
    matrix: IterationMatrix,
    b: Array,
    system: int = 0,
    transpose: bool = False,
) -> tuple[Array, Bool[Array, ""]]:
    """``(x, ok)`` with ``(shift I - scale J) x = b`` for system ``system`` of the last
    :func:`update`; ``ok`` as the linear solver's ``compute`` reports it (false for a
    singular operator or a Krylov solve that did not converge)."""
    op = ShiftedJacobian(f, matrix.t, matrix.y, matrix.jac, matrix.shifts[system], matrix.scales[system])
    return linear_solver.compute(matrix.factors[system], op, b, transpose)
