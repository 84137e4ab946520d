"""Linear solvers for W = I - gamma h J (LU, GMRES) and the simplified Newton iteration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffode._controller import rms_norm
from diffode._linsolve import GMRES, LU
from diffode._newton import first_eta, newton_solve
from diffode._solver import FlatRHS, Tolerances

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


@pytest.mark.parametrize("linsolve", [LU(), GMRES(rtol=1e-12)], ids=["LU", "GMRES"])
def test_solve_matches_dense_solve(linsolve):
    f, _ = linear_rhs()
    y = jnp.asarray(RNG.standard_normal(N))
    b = jnp.asarray(RNG.standard_normal(N))
    cache = linsolve.init(0.0, y)
    cache, nj, nlu = linsolve.prepare(f, jnp.asarray(0.0), y, jnp.asarray(0.3), cache, jnp.asarray(True))
    x = linsolve.solve(f, cache, b)
    # Both solve to ~1e-12 relative (LU: backward stable, cond(W) ~ 10; GMRES: its rtol).
    np.testing.assert_allclose(np.asarray(x), exact_solve(0.3, b), rtol=1e-10, atol=1e-12)
    if isinstance(linsolve, GMRES):
        assert int(nj) == 0 and int(nlu) == 0  # matrix-free: no Jacobian, no factorisation


def test_lu_reuses_jacobian_and_factorisation():
    f, _ = linear_rhs()
    lu = LU()
    y = jnp.zeros(N)
    b = jnp.asarray(RNG.standard_normal(N))
    prep = jax.jit(lambda gh, cache, new: lu.prepare(f, jnp.asarray(0.0), y, gh, cache, new))
    cache = lu.init(0.0, y)
    # First use: J and LU computed.
    cache, nj, nlu = prep(0.5, cache, True)
    assert (int(nj), int(nlu)) == (1, 1)
    # Same gamma_h, keep J: nothing recomputed, same answer.
    cache, nj, nlu = prep(0.5, cache, False)
    assert (int(nj), int(nlu)) == (0, 0)
    np.testing.assert_allclose(np.asarray(lu.solve(f, cache, b)), exact_solve(0.5, b), rtol=1e-12)
    # New gamma_h: only the factorisation is redone, from the kept J.
    cache, nj, nlu = prep(0.25, cache, False)
    assert (int(nj), int(nlu)) == (0, 1)
    np.testing.assert_allclose(np.asarray(lu.solve(f, cache, b)), exact_solve(0.25, b), rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(cache.jac), J_MAT)


def test_lu_keeps_stale_jacobian_until_asked():
    # J of f(y) = -y^3 depends on y: the cache must keep the J of the point where
    # it was formed until new_jac is set.
    f = FlatRHS(lambda t, y: -(y**3))
    lu = LU()
    y1, y2 = jnp.ones(3), 2 * jnp.ones(3)
    cache = lu.init(0.0, y1)
    cache, _, _ = lu.prepare(f, 0.0, y1, jnp.asarray(0.1), cache, jnp.asarray(True))
    cache, nj, _ = lu.prepare(f, 0.0, y2, jnp.asarray(0.1), cache, jnp.asarray(False))
    assert int(nj) == 0
    np.testing.assert_allclose(np.asarray(cache.jac), -3 * np.eye(3))
    cache, nj, _ = lu.prepare(f, 0.0, y2, jnp.asarray(0.1), cache, jnp.asarray(True))
    assert int(nj) == 1
    np.testing.assert_allclose(np.asarray(cache.jac), -12 * np.eye(3))


TOL = Tolerances(jnp.asarray(1e-10), jnp.asarray(1e-12), rms_norm)


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
    cache = linsolve.init(0.0, base)
    cache, _, _ = linsolve.prepare(f, 0.0, base, gh, cache, jnp.asarray(True))
    # From z = 0 the error is ~1e9 tolerance units and the rate (J kept at
    # ``base``) is theta ~ 0.1: 11 iterations are needed. With the default cap
    # of 10 the predicted-error test gives up early (after 3), not at the cap.
    short = newton_solve(f, linsolve, cache, 0.0, base, jnp.zeros(4), gh, TOL, max_iters=10)
    assert not bool(short.ok) and int(short.num_iters) < 10
    res = jax.jit(lambda: newton_solve(f, linsolve, cache, 0.0, base, jnp.zeros(4), gh, TOL, max_iters=20))()
    assert bool(res.ok)
    # Stopping rule: estimated remaining error <= kappa * tol = 1e-2 * (1e-12 + 1e-10 |Y|);
    # with theta ~ 0.1 the true error is about as large (observed 2e-12).
    np.testing.assert_allclose(np.asarray(res.z), cubic_stage(0.1, base), rtol=0, atol=1e-11)
    assert 8 <= int(res.num_iters) <= 16
    assert 0 < float(res.theta_max) < 1


def test_newton_failures_are_reported():
    f = FlatRHS(lambda t, y: -50 * y**3)
    base = jnp.asarray([1.0, 2.0])
    lu = LU()
    gh = jnp.asarray(1.0)
    # J from y = 0 is zero: the "Newton" step is fixed-point iteration, which
    # diverges here (|gh f'| >> 1); theta >= 1 is detected after two iterations.
    cache = lu.init(0.0, base)
    cache, _, _ = lu.prepare(f, 0.0, jnp.zeros(2), gh, cache, jnp.asarray(True))
    res = newton_solve(f, lu, cache, 0.0, base, jnp.zeros(2), gh, TOL, max_iters=10)
    assert not bool(res.ok) and int(res.num_iters) < 10
    # The iteration cap: one iteration with eta_0 = 1 cannot meet the test.
    cache, _, _ = lu.prepare(f, 0.0, base, gh, cache, jnp.asarray(True))
    res = newton_solve(f, lu, cache, 0.0, base, jnp.zeros(2), gh, TOL, max_iters=1)
    assert not bool(res.ok) and int(res.num_iters) == 1
    # Non-finite f.
    g = FlatRHS(lambda t, y: jnp.where(y > 0.5, jnp.nan, -y))
    res = newton_solve(g, lu, cache, 0.0, base, jnp.zeros(2), gh, TOL)
    assert not bool(res.ok) and int(res.num_iters) == 1


def test_newton_under_vmap_counts_per_member():
    f = FlatRHS(lambda t, y: -(y**3))
    lu = LU()
    gh = jnp.asarray(0.2)

    def one(b):
        base = jnp.full((2,), b)
        cache = lu.init(0.0, base)
        cache, _, _ = lu.prepare(f, 0.0, base, gh, cache, jnp.asarray(True))
        r = newton_solve(f, lu, cache, 0.0, base, jnp.zeros(2), gh, TOL, max_iters=40,
                         eta0=first_eta(jnp.asarray(1.0)))
        return r.z, r.num_iters, r.ok

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


@pytest.mark.parametrize("linsolve", [LU(), GMRES(rtol=1e-12)], ids=["LU", "GMRES"])
@pytest.mark.parametrize("transpose", [False, True])
def test_factored_solve_with_an_operator(linsolve, transpose):
    """factor/solve_factored solve A x = b (or A^T x = b) for a general matrix A."""
    a = jnp.asarray(J_MAT)
    op = a.T if transpose else a
    factors = linsolve.factor(lambda v: a @ v, lambda: a)
    b = jnp.asarray(RNG.standard_normal(N))
    x, ok = linsolve.solve_factored(factors, lambda v: op @ v, b, transpose=transpose)
    assert bool(ok)
    np.testing.assert_allclose(x, np.linalg.solve(np.asarray(op), np.asarray(b)), rtol=1e-10, atol=1e-12)


def test_gmres_is_scale_invariant():
    """A right-hand side of norm 1e-12 is solved to the same relative accuracy: jax's
    GMRES alone treats residuals below machine epsilon as zero and would stop early."""
    a = jnp.asarray(J_MAT)
    b = 1e-12 * jnp.asarray(RNG.standard_normal(N))
    x, ok = GMRES(rtol=1e-12).solve_factored(None, lambda v: a @ v, b)
    assert bool(ok)
    np.testing.assert_allclose(x, np.linalg.solve(J_MAT, np.asarray(b)), rtol=1e-9)


@pytest.mark.parametrize("linsolve", [LU(), GMRES()], ids=["LU", "GMRES"])
def test_singular_operator_is_reported(linsolve):
    a = jnp.asarray([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0, 0.0, 1.0]])  # rank 2
    b = jnp.asarray([1.0, 0.0, 1.0])  # not in the range of a
    factors = linsolve.factor(lambda v: a @ v, lambda: a)
    _, ok = linsolve.solve_factored(factors, lambda v: a @ v, b)
    assert not bool(ok)
