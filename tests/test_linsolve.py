"""The linear-solver protocol (LU, GMRES; operators, Jacobian reuse, transposed and complex
solves, preconditioning) and the simplified Newton iteration of implicit stages."""

import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode
from diffode._controller import rms_norm
from diffode.solvers import linear
from diffode.solvers.base import FlatRHS, Tolerances
from diffode.solvers.linear import GMRES, LU, FunctionOperator, ShiftedJacobian
from diffode.solvers.stage_newton import (
    CONVERGED,
    RUNNING,
    effective_kappa,
    first_eta,
    stage_newton_iteration,
)

RNG = np.random.default_rng(0)
N = 6
# A well-conditioned, non-symmetric matrix with eigenvalues of both signs' real parts
# kept away from 1 / gamma_h, so that W = I - gamma_h J is safely invertible.
J_MAT = RNG.standard_normal((N, N)) - 3 * np.eye(N)


def linear_rhs():
    calls = {"jac": 0}
    jm = jnp.asarray(J_MAT)

    def jac_fn(t, y):
        calls["jac"] += 1  # counts traces, i.e. calls outside jit
        return jm

    return FlatRHS(lambda t, y: jm @ y, jac_fn), calls


def exact_solve(gh, b):
    return np.linalg.solve(np.eye(N) - gh * J_MAT, np.asarray(b))


def one_system(gh):
    """Shifts and scales of ``W = I - gh J``."""
    return (jnp.ones(()),), (jnp.asarray(gh),)


def prepared(linsolve, f, y, gh, matrix=None, new_jac=True, t=0.0):
    if matrix is None:
        matrix = linear.iteration_matrix(linsolve, f, t, y, *one_system(gh))
    return linear.update(linsolve, f, t, y, matrix, jnp.asarray(new_jac), *one_system(gh))


@pytest.mark.parametrize("linsolve", [LU(), GMRES(rtol=1e-12)], ids=["LU", "GMRES"])
def test_solve_matches_dense_solve(linsolve):
    f, _ = linear_rhs()
    y = jnp.asarray(RNG.standard_normal(N))
    b = jnp.asarray(RNG.standard_normal(N))
    matrix, nj, nlu = prepared(linsolve, f, y, 0.3)
    x, ok = linear.solve(linsolve, f, matrix, b)
    assert bool(ok)
    # Both solve to ~1e-12 relative (LU: backward stable, cond(W) ~ 10; GMRES: its rtol).
    np.testing.assert_allclose(np.asarray(x), exact_solve(0.3, b), rtol=1e-10, atol=1e-12)
    if isinstance(linsolve, GMRES):
        assert int(nj) == 0 and int(nlu) == 0  # matrix-free: no Jacobian, no factorisation
    else:
        assert int(nj) == 1 and int(nlu) == 1
    # The transposed solve: W^T x = b.
    xt, ok = linear.solve(linsolve, f, matrix, b, transpose=True)
    assert bool(ok)
    want = np.linalg.solve((np.eye(N) - 0.3 * J_MAT).T, np.asarray(b))
    np.testing.assert_allclose(np.asarray(xt), want, rtol=1e-10, atol=1e-12)


def test_lu_reuses_jacobian_and_factorisation():
    f, _ = linear_rhs()
    lu = LU()
    y = jnp.zeros(N)
    b = jnp.asarray(RNG.standard_normal(N))
    prep = jax.jit(lambda gh, matrix, new: linear.update(lu, f, 0.0, y, matrix, new, *one_system(gh)))
    matrix = linear.iteration_matrix(lu, f, 0.0, y, *one_system(0.5))
    # First use: J and LU computed.
    matrix, nj, nlu = prep(0.5, matrix, True)
    assert (int(nj), int(nlu)) == (1, 1)
    # Same gamma_h, keep J: nothing recomputed, same answer.
    matrix, nj, nlu = prep(0.5, matrix, False)
    assert (int(nj), int(nlu)) == (0, 0)
    np.testing.assert_allclose(np.asarray(linear.solve(lu, f, matrix, b)[0]), exact_solve(0.5, b), rtol=1e-12)
    # New gamma_h: only the factorisation is redone, from the kept J.
    matrix, nj, nlu = prep(0.25, matrix, False)
    assert (int(nj), int(nlu)) == (0, 1)
    np.testing.assert_allclose(
        np.asarray(linear.solve(lu, f, matrix, b)[0]), exact_solve(0.25, b), rtol=1e-12
    )
    np.testing.assert_array_equal(np.asarray(matrix.jac), J_MAT)


def test_lu_keeps_stale_jacobian_until_asked():
    # J of f(y) = -y^3 depends on y: the iteration matrix keeps the J of the point
    # where it was formed until new_jac is set.
    f = FlatRHS(lambda t, y: -(y**3))
    lu = LU()
    y1, y2 = jnp.ones(3), 2 * jnp.ones(3)
    matrix, _, _ = prepared(lu, f, y1, 0.1)
    matrix, nj, _ = prepared(lu, f, y2, 0.1, matrix, new_jac=False)
    assert int(nj) == 0
    np.testing.assert_allclose(np.asarray(matrix.jac), -3 * np.eye(3))
    matrix, nj, _ = prepared(lu, f, y2, 0.1, matrix, new_jac=True)
    assert int(nj) == 1
    np.testing.assert_allclose(np.asarray(matrix.jac), -12 * np.eye(3))


@pytest.mark.parametrize("linsolve", [LU(), GMRES(rtol=1e-12)], ids=["LU", "GMRES"])
def test_complex_shift(linsolve):
    """Radau5's second system (alpha + i beta)/h I - J: a complex shift, solved in complex
    arithmetic, with the same factors for the transposed solve."""
    f, _ = linear_rhs()
    y = jnp.zeros(N)
    shift = jnp.asarray(2.0 + 3.0j)
    matrix = linear.iteration_matrix(linsolve, f, 0.0, y, (jnp.ones(()), shift), (jnp.ones(()), jnp.ones(())))
    matrix, _, nlu = linear.update(
        linsolve, f, 0.0, y, matrix, True, (jnp.asarray(1.0), shift), (jnp.ones(()), jnp.ones(()))
    )
    assert int(nlu) == (2 if isinstance(linsolve, LU) else 0)  # one per system
    b = jnp.asarray(RNG.standard_normal(N) + 1j * RNG.standard_normal(N))
    a = (2.0 + 3.0j) * np.eye(N) - J_MAT
    for transpose in (False, True):
        x, _ = linear.solve(linsolve, f, matrix, b, system=1, transpose=transpose)
        want = np.linalg.solve(a.T if transpose else a, np.asarray(b))
        np.testing.assert_allclose(np.asarray(x), want, rtol=1e-10, atol=1e-12)


TOL = Tolerances(jnp.asarray(1e-10), jnp.asarray(1e-12), rms_norm)


def newton_solve(f, linsolve, matrix, base, z0, gh, tol, max_iters=10, kappa=1e-2, eta0=1.0):
    """Simplified Newton for ``z = gh f(base + z)`` to convergence or failure:
    ``(z, ok, iterations, max theta)``."""
    kap = effective_kappa(kappa, tol, z0.dtype)

    def body(c):
        k, z, ndz, eta, theta_max, _ = c
        z, ndz, theta, eta, st = stage_newton_iteration(
            f, linsolve, matrix, 0.0, base, z, gh, tol, k, ndz, eta, max_iters, kap
        )
        return k + 1, z, ndz, eta, jnp.maximum(theta_max, theta), st

    zero = jnp.zeros((), z0.dtype)
    init = (
        jnp.asarray(0, jnp.int32),
        z0,
        zero,
        jnp.asarray(eta0, z0.dtype),
        zero,
        jnp.asarray(RUNNING, jnp.int32),
    )
    k, z, _, _, theta_max, st = lax.while_loop(lambda c: c[5] == RUNNING, body, init)
    return z, st == CONVERGED, k, theta_max


def cubic_stage(gh, base):
    """Root of z = gh * f(base + z) with f(y) = -y^3, i.e. Y + gh Y^3 = base (one real root)."""
    out = []
    for b in np.asarray(base):
        roots = np.roots([gh, 0.0, 1.0, -b])
        out.append(roots[np.argmin(np.abs(roots.imag))].real - b)
    return np.array(out)


@pytest.mark.parametrize("linsolve", [LU(), GMRES()], ids=["LU", "GMRES"])
def test_newton_converges_to_the_root(linsolve):
    f = FlatRHS(lambda t, y: -(y**3))
    base = jnp.asarray([0.5, 1.0, 1.5, -1.0])
    gh = jnp.asarray(0.1)
    cache, _, _ = prepared(linsolve, f, base, gh)
    # From z = 0 the error is ~1e9 tolerance units and the rate (J kept at
    # ``base``) is theta ~ 0.1: 11 iterations are needed. With the default cap
    # of 10 the predicted-error test gives up early (after 3), not at the cap.
    _, ok, iters, _ = newton_solve(f, linsolve, cache, base, jnp.zeros(4), gh, TOL, max_iters=10)
    assert not bool(ok) and int(iters) < 10
    z, ok, iters, theta_max = jax.jit(
        lambda: newton_solve(f, linsolve, cache, base, jnp.zeros(4), gh, TOL, max_iters=20)
    )()
    assert bool(ok)
    # Stopping rule: estimated remaining error <= kappa * tol = 1e-2 * (1e-12 + 1e-10 |Y|);
    # with theta ~ 0.1 the true error is about as large (observed 2e-12).
    np.testing.assert_allclose(np.asarray(z), cubic_stage(0.1, base), rtol=0, atol=1e-11)
    assert 8 <= int(iters) <= 16
    assert 0 < float(theta_max) < 1


def test_newton_failures_are_reported():
    f = FlatRHS(lambda t, y: -50 * y**3)
    base = jnp.asarray([1.0, 2.0])
    lu = LU()
    gh = jnp.asarray(1.0)
    # J from y = 0 is zero: the "Newton" step is fixed-point iteration, which
    # diverges here (|gh f'| >> 1); theta >= 1 is detected after two iterations.
    cache, _, _ = prepared(lu, f, jnp.zeros(2), gh)
    _, ok, iters, _ = newton_solve(f, lu, cache, base, jnp.zeros(2), gh, TOL, max_iters=10)
    assert not bool(ok) and int(iters) < 10
    # The iteration cap: one iteration with eta_0 = 1 cannot meet the test.
    cache, _, _ = prepared(lu, f, base, gh)
    _, ok, iters, _ = newton_solve(f, lu, cache, base, jnp.zeros(2), gh, TOL, max_iters=1)
    assert not bool(ok) and int(iters) == 1
    # Non-finite f.
    g = FlatRHS(lambda t, y: jnp.where(y > 0.5, jnp.nan, -y))
    _, ok, iters, _ = newton_solve(g, lu, cache, base, jnp.zeros(2), gh, TOL)
    assert not bool(ok) and int(iters) == 1


def test_newton_under_vmap_counts_per_member():
    f = FlatRHS(lambda t, y: -(y**3))
    lu = LU()
    gh = jnp.asarray(0.2)

    def one(b):
        base = jnp.full((2,), b)
        cache, _, _ = prepared(lu, f, base, gh)
        z, ok, iters, _ = newton_solve(
            f, lu, cache, base, jnp.zeros(2), gh, TOL, max_iters=40, eta0=first_eta(jnp.asarray(1.0))
        )
        return z, iters, ok

    bs = jnp.asarray([0.1, 1.0, 1.5])
    zs, iters, oks = jax.vmap(one)(bs)
    assert np.all(np.asarray(oks))
    for b, z, n in zip(bs, zs, iters):
        z1, n1, _ = one(b)
        assert int(n) == int(n1)
        np.testing.assert_allclose(np.asarray(z), np.asarray(z1), rtol=1e-13)
    # Harder problems (larger base, stronger nonlinearity) need more iterations.
    assert int(iters[0]) < int(iters[2])


# ---------------------------------------------------------- general square operators


def dense_operator(a):
    """``A`` itself as a :class:`ShiftedJacobian` (no shift, scale -1) of ``f(y) = A y``."""
    f = FlatRHS(lambda t, y: a @ y)
    y = jnp.zeros(a.shape[0])
    return ShiftedJacobian(f, 0.0, y, None, None, -jnp.ones(()))


@pytest.mark.parametrize("linsolve", [LU(), GMRES(rtol=1e-12)], ids=["LU", "GMRES"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("kind", ["jacobian", "function"])
def test_operator_solve(linsolve, transpose, kind):
    """init/compute solve A x = b (or A^T x = b) for a general matrix A, given as a
    Jacobian operator or as a linear function (of a 2-D array, as stage systems are)."""
    a = jnp.asarray(J_MAT)
    b = jnp.asarray(RNG.standard_normal(N))
    if kind == "jacobian":
        op = dense_operator(a)
        rhs = b
    else:
        op = FunctionOperator(lambda v: (a @ v.reshape(N)).reshape(2, N // 2), b.reshape(2, N // 2))
        rhs = b.reshape(2, N // 2)
    state = linsolve.init(op)
    x, ok = linsolve.compute(state, op, rhs, transpose=transpose)
    assert bool(ok)
    want = np.linalg.solve(np.asarray(a.T if transpose else a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(x).reshape(N), want, rtol=1e-10, atol=1e-12)


def test_solve_linear_map_transposes_with_the_same_factors():
    """solve_linear_map (the steppers' tangent solve) is linear in b and reverse mode
    solves with the transpose."""
    a = jnp.asarray(J_MAT)
    b = jnp.asarray(RNG.standard_normal(N))
    c = jnp.asarray(RNG.standard_normal(N))
    for ls in (LU(), GMRES(rtol=1e-12)):
        g = jax.grad(lambda b: c @ linear.solve_linear_map(ls, lambda v: a @ v, b))(b)
        np.testing.assert_allclose(np.asarray(g), np.linalg.solve(J_MAT.T, np.asarray(c)), rtol=1e-9)


def test_gmres_is_scale_invariant():
    """A right-hand side of norm 1e-12 is solved to the same relative accuracy: jax's
    GMRES alone treats residuals below machine epsilon as zero and would stop early."""
    a = jnp.asarray(J_MAT)
    b = 1e-12 * jnp.asarray(RNG.standard_normal(N))
    op = dense_operator(a)
    x, ok = GMRES(rtol=1e-12).compute(None, op, b)
    assert bool(ok)
    np.testing.assert_allclose(x, np.linalg.solve(J_MAT, np.asarray(b)), rtol=1e-9)


@pytest.mark.parametrize("linsolve", [LU(), GMRES()], ids=["LU", "GMRES"])
def test_singular_operator_is_reported(linsolve):
    a = jnp.asarray([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 0.0, 1.0]])  # rank 2
    b = jnp.asarray([1.0, 0.0, 1.0])  # not in the range of a
    op = dense_operator(a)
    _, ok = linsolve.compute(linsolve.init(op), op, b)
    assert not bool(ok)


# ---------------------------------------------------------- GMRES preconditioners

# An ill-conditioned W = I - gh J (eigenvalues of -gh J spread over 1e0 .. 1e4):
# unpreconditioned GMRES with a 2-dimensional Krylov space and one restart cannot
# solve it, while an exact preconditioner solves it in one iteration.
STIFF_D = np.logspace(0, 4, 12)
STIFF_J = -np.diag(STIFF_D) + 0.1 * RNG.standard_normal((12, 12))


def jacobi(op):
    """A user preconditioner: the inverse of W's diagonal, 1 / (shift - scale diag J)."""
    d = jnp.diagonal(jax.jacfwd(lambda y: op.f(op.t, y))(op.y))
    return lambda v: v / (op.shift - op.scale * d)


@pytest.mark.parametrize("preconditioner", [None, "lu", "jacobi"])
def test_gmres_preconditioner(preconditioner):
    f = FlatRHS(lambda t, y: jnp.asarray(STIFF_J) @ y)
    y = jnp.zeros(12)
    b = jnp.asarray(RNG.standard_normal(12))
    pre = {"lu": LU(), "jacobi": jacobi, None: None}[preconditioner]
    ls = GMRES(rtol=1e-10, restart=2, maxiter=1, preconditioner=pre)
    assert ls.forms_jacobian == ls.factorises == (preconditioner == "lu")
    op = ShiftedJacobian(f, 0.0, y, ls.linearise(f, 0.0, y), jnp.ones(()), jnp.asarray(1.0))
    state = ls.init(op)
    for transpose in (False, True):
        x, _ = ls.compute(state, op, b, transpose=transpose)
        want = np.linalg.solve((np.eye(12) - STIFF_J).T if transpose else np.eye(12) - STIFF_J, np.asarray(b))
        err = np.max(np.abs(np.asarray(x) - want)) / np.max(np.abs(want))
        if preconditioner is None:
            assert err > 0.1
        elif preconditioner == "lu":
            assert err < 1e-10
        else:  # the diagonal dominates: two Krylov steps get close
            assert err < 1e-2


def test_gmres_preconditioner_in_a_solve():
    """A preconditioned GMRES inside Radau5 (real and complex systems): the preconditioner's LU
    factors follow the reuse policy (counted), GMRES's products are exact."""
    p = STIFF_J
    f = lambda t, y, args: jnp.asarray(p) @ y
    y0 = jnp.ones(12)
    ts = jnp.asarray([0.0, 1.0])
    want = jax.scipy.linalg.expm(jnp.asarray(p)) @ y0
    s = diffode.Radau5(linear_solver=GMRES(rtol=1e-10, restart=4, maxiter=2, preconditioner=LU()))
    sol = diffode.solve(f, y0, ts, None, solver=s, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(np.asarray(sol.ys[-1]), np.asarray(want), rtol=1e-6, atol=1e-8)
    assert int(sol.stats["num_lu_decomps"]) > 0 and int(sol.stats["num_jac_evals"]) > 0
