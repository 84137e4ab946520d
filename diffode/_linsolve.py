"""Linear solvers for the iteration matrix ``W = I - gamma h J`` of implicit methods.

Implicit Runge-Kutta, Rosenbrock and BDF steppers all solve systems
``(I - gamma h J) x = b`` with ``J = df/dy`` at some linearisation point. A
linear solver here is a small configuration object with a three-call protocol
(Hairer and Wanner, "Solving ODEs II", IV.8, on reusing ``J`` and its
factorisation):

1. ``cache = linsolve.init(y)``: the data a solver keeps in its state between
   steps (a Jacobian and its LU factors, or just a linearisation point). It is a
   pytree of arrays, so it can ride in ``StepResult.state``.
2. ``cache, num_jac, num_lu = linsolve.prepare(f, t, y, gamma_h, cache, new_jac)``:
   once per step. ``new_jac`` (a bool array) asks for a fresh ``J`` at ``(t, y)``;
   otherwise the cached one is kept. The factorisation is redone only when ``J``
   changed or ``gamma_h`` differs from the one it was built for. Returns the int32
   counts of Jacobian evaluations and LU decompositions it performed.
3. ``x = linsolve.solve(f, cache, b)``: as often as needed (every Newton
   iteration, every Rosenbrock stage).

Steady states (:func:`diffode.steady_state`) need solves with general square
operators instead (``J``, or ``I/dt - J`` in pseudo-transient continuation), and
with their transposes for reverse-mode derivatives. For those a linear solver
offers a second, two-call protocol:

1. ``factors = linsolve.factor(matvec, matrix)``: ``matvec(v)`` applies the
   operator and ``matrix()`` builds it densely (only called by solvers that
   factorise). The result is a pytree that may be reused for any number of
   solves.
2. ``x, ok = linsolve.solve_factored(factors, matvec, b, transpose)``: solves
   ``A x = b``, or ``A^T x = b`` when ``transpose`` is true (then ``matvec`` must
   apply ``A^T``). ``ok`` is false when the operator is numerically singular or
   an iterative solve did not converge.

Under ``jax.vmap`` the conditional work in :meth:`prepare` becomes a select
(both branches run), but the returned counts stay per batch member.
"""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import jax.scipy.sparse.linalg as jssl
from jaxtyping import Array, Bool, Float

from ._solver import FlatRHS


class AbstractLinearSolver(eqx.Module):
    """Protocol for solving ``(I - gamma_h J) x = b``; see the module docstring."""

    def init(self, t: Array, y: Float[Array, " n"]) -> Any:
        """Initial cache. Its contents are undefined until :meth:`prepare` with ``new_jac=True``."""
        raise NotImplementedError

    def prepare(
        self, f: FlatRHS, t: Array, y: Array, gamma_h: Array, cache: Any, new_jac: Bool[Array, ""]
    ) -> tuple[Any, Array, Array]:
        """Make ``cache`` ready to solve with ``I - gamma_h J``; returns ``(cache, num_jac, num_lu)``."""
        raise NotImplementedError

    def solve(self, f: FlatRHS, cache: Any, b: Float[Array, " n"]) -> Float[Array, " n"]:
        """``x`` with ``(I - gamma_h J) x = b`` for the ``gamma_h`` and ``J`` of the last :meth:`prepare`."""
        raise NotImplementedError

    def factor(self, matvec: Callable[[Array], Array], matrix: Callable[[], Array]) -> Any:
        """Prepare solves with the square operator ``matvec`` (dense form: ``matrix()``)."""
        raise NotImplementedError

    def solve_factored(
        self, factors: Any, matvec: Callable[[Array], Array], b: Float[Array, " n"], transpose: bool = False
    ) -> tuple[Float[Array, " n"], Bool[Array, ""]]:
        """``(x, ok)`` with ``A x = b`` (``A^T x = b`` if ``transpose``) for the operator of :meth:`factor`."""
        raise NotImplementedError


class LUCache(eqx.Module):
    """Dense Jacobian ``jac``, the LU factors of ``I - gamma_h jac`` and that ``gamma_h``."""

    jac: Float[Array, "n n"]
    lu: Float[Array, "n n"]
    piv: Array
    gamma_h: Array


class LU(AbstractLinearSolver):
    """Dense LU: forms ``J = f.jac(t, y)`` and factorises ``I - gamma h J`` (partial pivoting).

    ``J`` is kept until a new one is asked for; the factors are reused for as
    long as neither ``J`` nor ``gamma h`` changes (all stages of a step, and
    every step of a fixed-step solve).
    """

    def init(self, t, y):
        n = y.shape[0]
        z = jnp.zeros((n, n), y.dtype)
        # gamma_h = NaN never compares equal, so the first prepare factorises.
        return LUCache(z, z, jnp.zeros((n,), jnp.int32), jnp.full((), jnp.nan, y.dtype))

    def prepare(self, f, t, y, gamma_h, cache, new_jac):
        new_jac = jnp.asarray(new_jac, bool)
        jac = lax.cond(new_jac, lambda: f.jac(t, y).astype(y.dtype), lambda: cache.jac)
        gamma_h = jnp.asarray(gamma_h, y.dtype)
        refactor = new_jac | (gamma_h != cache.gamma_h)

        def factor():
            w = jnp.eye(y.shape[0], dtype=y.dtype) - gamma_h * jac
            return jsl.lu_factor(w)

        lu, piv = lax.cond(refactor, factor, lambda: (cache.lu, cache.piv))
        cache = LUCache(jac, lu, piv.astype(jnp.int32), gamma_h)
        return cache, new_jac.astype(jnp.int32), refactor.astype(jnp.int32)

    def solve(self, f, cache, b):
        return jsl.lu_solve((cache.lu, cache.piv), b)

    def factor(self, matvec, matrix):
        a = matrix()
        lu, piv = jsl.lu_factor(a)
        # Numerically singular: a pivot below n eps times the largest one (the
        # rank cut-off of numpy.linalg.matrix_rank, applied to U's diagonal).
        d = jnp.abs(jnp.diagonal(lu))
        big = jnp.max(d)
        tiny = a.shape[0] * jnp.finfo(a.dtype).eps * big
        singular = (big == 0) | (jnp.min(d) <= tiny) | ~jnp.isfinite(big)
        return LUFactors(lu, piv.astype(jnp.int32), singular)

    def solve_factored(self, factors, matvec, b, transpose=False):
        x = jsl.lu_solve((factors.lu, factors.piv), b, trans=1 if transpose else 0)
        return x, ~factors.singular & jnp.all(jnp.isfinite(x))


class LUFactors(eqx.Module):
    """LU factors of a square operator and whether it is numerically singular."""

    lu: Float[Array, "n n"]
    piv: Array
    singular: Bool[Array, ""]


class GMRESCache(eqx.Module):
    """Linearisation point ``(t, y)`` and ``gamma_h`` of the matrix-free operator."""

    t: Array
    y: Float[Array, " n"]
    gamma_h: Array


class GMRES(AbstractLinearSolver):
    """Matrix-free restarted GMRES on ``v -> v - gamma h f.jvp(t, y, v)``.

    ``J`` is never formed (no Jacobian evaluations, no factorisations): each
    Krylov iteration costs one Jacobian-vector product. The operator is
    linearised at the ``(t, y)`` passed to the latest :meth:`prepare` (the step's
    start point), whatever ``new_jac`` says, since that costs nothing.
    Unpreconditioned, so best for moderately stiff or large problems. Uses the
    Givens-rotation ("incremental") variant, which stops as soon as the
    residual is small enough.

    Args:
        rtol: stop when ``||b - W x|| <= rtol ||b||`` (2-norm); floored at 10 machine
            epsilons of the state's dtype.
        restart: Krylov subspace dimension before a restart (capped at ``n``).
        maxiter: maximum number of restarts (``None``: ``10 n``, as in
            ``jax.scipy.sparse.linalg.gmres``).
    """

    rtol: float = eqx.field(static=True, default=1e-6)
    restart: int = eqx.field(static=True, default=20)
    maxiter: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if not self.rtol > 0:
            raise ValueError(f"GMRES: rtol must be positive, got {self.rtol}")
        if self.restart < 1 or (self.maxiter is not None and self.maxiter < 1):
            raise ValueError("GMRES: restart and maxiter must be positive")

    def init(self, t, y):
        return GMRESCache(jnp.asarray(t), y, jnp.zeros((), y.dtype))

    def prepare(self, f, t, y, gamma_h, cache, new_jac):
        zero = jnp.zeros((), jnp.int32)
        return GMRESCache(jnp.asarray(t, cache.t.dtype), y, jnp.asarray(gamma_h, y.dtype)), zero, zero

    def solve(self, f, cache, b):
        t, y, gh = cache.t, cache.y, cache.gamma_h

        def matvec(v):
            return v - gh * f.jvp(t, y, v)

        return self._gmres(matvec, b)

    def _tol(self, dtype) -> float:
        """``rtol``, floored at ``10 eps`` of ``dtype`` (a tighter residual is not attainable)."""
        return max(self.rtol, 10 * float(jnp.finfo(dtype).eps))

    def _gmres(self, matvec, b, restart: int | None = None):
        # jax.scipy's GMRES treats residual norms below machine epsilon as zero
        # (an absolute floor), so it solves for b / |b| and scales back.
        nb = jnp.linalg.norm(b)
        scale = jnp.where(nb > 0, nb, 1)
        restart = self.restart if restart is None else restart
        x, _ = jssl.gmres(matvec, b / scale, tol=self._tol(b.dtype), atol=0.0, restart=restart,
                          maxiter=self.maxiter, solve_method="incremental")
        return x * scale

    def factor(self, matvec, matrix):
        return None  # matrix-free: nothing to prepare

    def solve_factored(self, factors, matvec, b, transpose=False):
        x = self._gmres(matvec, b)
        # GMRES reports no convergence flag: check the true residual (one more
        # product). A factor of 10 allows for the recursive residual's drift.
        res = jnp.linalg.norm(b - matvec(x))
        ok = jnp.all(jnp.isfinite(x)) & (res <= 10 * self._tol(b.dtype) * jnp.linalg.norm(b))
        return x, ok
