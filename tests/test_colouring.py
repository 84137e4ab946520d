"""Sparse Jacobians by column colouring (``solve(..., jac_sparsity=)``).

References: ``jax.jacfwd`` (the dense Jacobian, equal to rounding since both are
sums of the same products) and the solve without a pattern (the same Jacobian,
hence the same steps and values to rounding).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse

import diffode
from diffode.solvers.colouring import colour_columns

N = 6  # grid points of the 1-D Brusselator below: 12 states


def brusselator_1d(t, y, args):
    """The 1-D Brusselator on a periodic grid (Hairer and Wanner II, IV.1, with periodic
    ends): species u and v interleaved, so the pattern is banded with periodic corners."""
    a, b, alpha = args
    u, v = y[0::2], y[1::2]
    lap = lambda w: jnp.roll(w, 1) + jnp.roll(w, -1) - 2 * w  # noqa: E731
    du = b + u * u * v - (a + 1) * u + alpha * lap(u)
    dv = a * u - u * u * v + alpha * lap(v)
    return jnp.stack([du, dv], -1).reshape(-1)


def pattern_1d(n_points):
    n = 2 * n_points
    p = np.zeros((n, n), bool)
    for i in range(n_points):
        for c in range(2):
            r = 2 * i + c
            for d in (-1, 0, 1):
                p[r, 2 * ((i + d) % n_points) + c] = True
            p[r, 2 * i + 1 - c] = True
    return p


ARGS = (3.0, 1.0, 2.0)
Y0 = jnp.asarray(
    np.stack([1 + np.sin(np.linspace(0, 2 * np.pi, N, endpoint=False)), np.full(N, 3.0)], -1).ravel()
)


def _valid(pattern, colours):
    for row in pattern:
        cols = np.flatnonzero(row)
        if len(set(colours[cols])) != len(cols):
            return False
    return True


def test_colouring_is_valid_and_small():
    rng = np.random.default_rng(0)
    random = rng.random((40, 40)) < 0.08
    # The 1-D pattern's colours do not grow with the grid: a column shares rows with
    # at most 8 others (5 of its species, 3 of the other), so greedy needs at most 9.
    for p, most in [
        (pattern_1d(30), 9),
        (np.eye(5, dtype=bool) | np.eye(5, k=1, dtype=bool), 2),
        (random, 12),
    ]:
        colours = colour_columns(p.shape[0], *np.nonzero(p))
        assert _valid(p, colours)
        assert colours.max() + 1 <= most
    # A full pattern needs one colour per column.
    assert colour_columns(4, *np.nonzero(np.ones((4, 4), bool))).max() == 3
    # A scipy sparse pattern is read without densifying, and equal patterns are equal.
    assert diffode.Sparsity(scipy.sparse.csr_matrix(pattern_1d(N))) == diffode.Sparsity(
        pattern_1d(N).astype(int)
    )


def test_coloured_jacobian_equals_jacfwd():
    sp = diffode.Sparsity(pattern_1d(N))
    assert sp.num_colours <= 9 < sp.n
    fn = lambda y: brusselator_1d(0.0, y, ARGS)  # noqa: E731
    np.testing.assert_allclose(sp.jacobian(fn, Y0), jax.jacfwd(fn)(Y0), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize(
    "solver", [diffode.Rodas5P(), diffode.Kvaerno5(), diffode.Radau5()], ids=lambda s: type(s).__name__
)
def test_solve_with_pattern_matches_dense_jacobian(solver):
    ts = jnp.linspace(0.0, 2.0, 5)
    run = jax.jit(
        lambda y0, pattern: diffode.solve(brusselator_1d, y0, ts, ARGS, solver=solver, jac_sparsity=pattern),
        static_argnums=1,
    )
    ref = diffode.solve(brusselator_1d, Y0, ts, ARGS, solver=solver)
    got = run(Y0, diffode.Sparsity(pattern_1d(N)))
    np.testing.assert_allclose(got.ys, ref.ys, rtol=1e-10, atol=1e-12)
    assert int(got.stats["num_steps"]) == int(ref.stats["num_steps"])


def test_gradient_with_pattern_matches_dense_jacobian():
    # Direct differentiates through the steps, including the coloured Jacobian.
    ts = jnp.array([0.0, 1.0])

    def loss(args, **kw):
        sol = diffode.solve(
            brusselator_1d, Y0, ts, args, solver=diffode.Rodas5P(), sensitivity=diffode.Direct(), **kw
        )
        return jnp.sum(sol.ys[-1] ** 2)

    args = tuple(jnp.asarray(a) for a in ARGS)
    got = jax.jit(jax.grad(lambda a: loss(a, jac_sparsity=pattern_1d(N))))(args)
    ref = jax.jit(jax.grad(loss))(args)
    np.testing.assert_allclose(jnp.stack(got), jnp.stack(ref), rtol=1e-9)
    assert all(abs(float(g)) > 1e-3 for g in got)


def test_vmap_over_initial_states():
    ts = jnp.array([0.0, 0.5])
    y0s = jnp.stack([Y0, 1.1 * Y0])
    got = jax.vmap(
        lambda y: diffode.solve(
            brusselator_1d, y, ts, ARGS, solver=diffode.Rodas5P(), jac_sparsity=pattern_1d(N)
        ).ys[-1]
    )(y0s)
    for k in range(2):
        ref = diffode.solve(brusselator_1d, y0s[k], ts, ARGS, solver=diffode.Rodas5P()).ys[-1]
        np.testing.assert_allclose(got[k], ref, rtol=1e-10)


def test_bad_patterns_raise():
    ts = jnp.array([0.0, 1.0])
    solve = lambda **kw: diffode.solve(brusselator_1d, Y0, ts, ARGS, solver=diffode.Rodas5P(), **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"state has 12 components"):
        solve(jac_sparsity=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="square"):
        solve(jac_sparsity=np.ones((12, 3), bool))
    with pytest.raises(ValueError, match="not both"):
        solve(jac_sparsity=pattern_1d(N), jac=lambda t, y, a: jax.jacfwd(brusselator_1d, 1)(t, y, a))
    with pytest.raises(TypeError, match="traced"):
        jax.jit(
            lambda p: diffode.solve(brusselator_1d, Y0, ts, ARGS, solver=diffode.Rodas5P(), jac_sparsity=p)
        )(jnp.asarray(pattern_1d(N)))
