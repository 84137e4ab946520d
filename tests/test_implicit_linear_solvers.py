"""Every implicit solver with every linear solver: ``linear_solver=LU()`` and
``linear_solver=GMRES(...)`` on a stiff linear system with a known solution, and a
gradient through a GMRES-solved step against finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import diffode

# A stiff, non-normal linear system y' = p A y: eigenvalues -1, -100, -1e4.
A = np.array([[-1.0, 0.5, 0.0], [0.0, -100.0, 30.0], [0.0, 0.0, -1.0e4]])
Y0 = np.array([1.0, 2.0, 1.0])
T1 = 1.0


def rhs(t, y, p):
    return p * (jnp.asarray(A) @ y)


def exact(p):
    return scipy.linalg.expm(p * T1 * A) @ Y0


# One per family (the SDIRK family shares its code).
SOLVERS = {
    "Kvaerno5": diffode.Kvaerno5,
    "Radau5": diffode.Radau5,
    "Rodas5P": diffode.Rodas5P,
}
LINEAR = {"LU": diffode.LU, "GMRES": lambda: diffode.GMRES(rtol=1e-12)}


@pytest.mark.parametrize("linear", list(LINEAR))
@pytest.mark.parametrize("name", list(SOLVERS))
def test_every_implicit_solver_takes_every_linear_solver(name, linear):
    solver = SOLVERS[name](linear_solver=LINEAR[linear]())
    sol = diffode.solve(
        rhs, jnp.asarray(Y0), jnp.asarray([0.0, T1]), 1.0, solver=solver, rtol=1e-8, atol=1e-10
    )
    # Global errors observed 1e-9 .. 1e-8 relative (the solve's rtol, accumulated).
    np.testing.assert_allclose(np.asarray(sol.ys[-1]), exact(1.0), rtol=2e-6, atol=1e-10)
    st = sol.stats
    if linear == "GMRES":  # matrix-free: no Jacobian formed, nothing factorised
        assert int(st["num_jac_evals"]) == 0 and int(st["num_lu_decomps"]) == 0
    else:
        assert int(st["num_jac_evals"]) > 0 and int(st["num_lu_decomps"]) > 0


def test_gradient_with_gmres_matches_finite_differences():
    """Direct differentiates Kvaerno5's stages by the implicit function theorem with a
    matrix-free GMRES solve of the stage system, transposed in reverse mode. (Radau5 and
    Rodas5P with GMRES differentiate too, but compile for 14-18 s.)"""
    solver = diffode.Kvaerno5(linear_solver=diffode.GMRES(rtol=1e-12))

    def loss(p):
        sol = diffode.solve(
            rhs,
            jnp.asarray(Y0),
            jnp.asarray([0.0, T1]),
            p,
            solver=solver,
            rtol=1e-9,
            atol=1e-12,
            sensitivity=diffode.Direct(),
        )
        return jnp.sum(sol.ys[-1] * jnp.asarray([1.0, 2.0, 3.0]))

    p = jnp.asarray(0.7)
    g = jax.jit(jax.grad(loss))(p)
    eps = 1e-5
    fd = (loss(p + eps) - loss(p - eps)) / (2 * eps)
    # The derivative of the exact solution, for scale: (A e^{pA} y0) . w
    want = np.dot(A @ exact(0.7), [1.0, 2.0, 3.0])
    np.testing.assert_allclose(float(g), float(fd), rtol=1e-6)
    np.testing.assert_allclose(float(g), want, rtol=1e-6)


def test_linear_solver_is_validated():
    for make in (diffode.Radau5, diffode.Rodas5P, diffode.Kvaerno5):
        with pytest.raises(TypeError, match="linear solver"):
            make(linear_solver="lu")
    with pytest.raises(TypeError, match="preconditioner"):
        diffode.GMRES(preconditioner=3)


def test_rosenbrock_reports_a_linear_solve_that_failed():
    """A Rosenbrock step has no Newton test to catch a bad solve: GMRES that cannot
    reach its rtol (one Krylov vector, one restart) must fail the solve, not pass
    an inaccurate step. A GMRES that can converge succeeds (the control)."""

    def run(gmres):
        return diffode.solve(
            rhs,
            jnp.asarray(Y0),
            jnp.asarray([0.0, T1]),
            1.0,
            max_steps=100,
            throw=False,
            solver=diffode.Rodas5P(linear_solver=gmres),
        )

    bad = run(diffode.GMRES(rtol=1e-12, restart=1, maxiter=1))
    assert int(bad.status) != 0 and bool(jnp.all(jnp.isnan(bad.ys[-1])))
    good = run(diffode.GMRES(rtol=1e-12))
    assert int(good.status) == 0
    np.testing.assert_allclose(np.asarray(good.ys[-1]), exact(1.0), rtol=1e-4, atol=1e-8)  # default rtol 1e-6
