"""Structured direct solvers: ``SparseLU`` (block-tridiagonal LU in a breadth-first
level ordering) and ``BandedLU``.

References: ``numpy.linalg.solve`` on the dense matrix (to rounding, scaled by the
condition number), and the same ODE solve with dense ``LU`` (the same Jacobian,
so the same steps, values equal to rounding).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode
from diffode.solvers.base import FlatRHS
from diffode.solvers.linear import ShiftedJacobian
from diffode.solvers.structured import level_structure


def torus_pattern(n_side):
    """Two species on a periodic ``n_side x n_side`` grid: 5-point stencil per species,
    both species coupled at each point (the 2-D Brusselator's pattern)."""
    n = 2 * n_side * n_side
    idx = lambda i, j, s: 2 * ((i % n_side) * n_side + j % n_side) + s  # noqa: E731
    p = np.zeros((n, n), bool)
    for i in range(n_side):
        for j in range(n_side):
            for s in range(2):
                p[idx(i, j, s), idx(i, j, 1 - s)] = True
                for di, dj in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
                    p[idx(i, j, s), idx(i + di, j + dj, s)] = True
    return p


def band_pattern(n, lower, upper):
    i, j = np.indices((n, n))
    return (j - i >= -lower) & (j - i <= upper)


def operator(pattern, shift, scale, seed=0):
    """A ``ShiftedJacobian`` for a random ``J`` with the given pattern, and its dense matrix."""
    rng = np.random.default_rng(seed)
    n = pattern.shape[0]
    J = np.where(pattern, rng.normal(size=pattern.shape), 0.0)
    f = FlatRHS(lambda t, y: jnp.asarray(J) @ y + 0 * t)
    A = (0 if shift is None else shift) * np.eye(n) - scale * J
    return f, J, A


def check_solves(ls, pattern, shift, scale, seed=0):
    f, _, A = operator(pattern, shift, scale, seed)
    n = A.shape[0]
    t, y = jnp.zeros(()), jnp.zeros(n)
    b = jnp.asarray(np.random.default_rng(seed + 1).normal(size=n))

    @jax.jit
    def solves(b):
        op = ShiftedJacobian(
            f, t, y, ls.linearise(f, t, y), None if shift is None else jnp.asarray(shift), jnp.asarray(scale)
        )
        state = ls.init(op)
        return ls.compute(state, op, b), ls.compute(state, op, b, transpose=True)

    # Backward-stable solves: residual ~ eps ||A|| ||x||; 1e-10 leaves room for the
    # growth of unpivoted block elimination on these well-conditioned matrices.
    for (x, ok), M in zip(solves(b), (A, A.T)):
        assert bool(ok)
        np.testing.assert_allclose(np.asarray(x), np.linalg.solve(M, np.asarray(b)), rtol=1e-10, atol=1e-10)


SHIFTS = [(1.0, 0.1), (2.0 + 1.0j, 1.0), (None, -1.0)]  # SDIRK/Rosenbrock, Radau5 complex, Newton on J


@pytest.mark.parametrize("shift, scale", SHIFTS)
def test_sparse_lu_solves_and_transposes_on_a_periodic_grid(shift, scale):
    pattern = torus_pattern(5)
    st = level_structure(diffode.Sparsity(pattern))
    assert st.num_blocks >= 3 and st.width < pattern.shape[0] // 2  # really block structured
    check_solves(diffode.SparseLU(pattern), pattern, shift, scale)


def test_sparse_lu_on_unsymmetric_and_disconnected_patterns():
    rng = np.random.default_rng(3)
    unsym = (rng.random((30, 30)) < 0.06) | np.eye(30, k=1, dtype=bool)
    check_solves(diffode.SparseLU(unsym), unsym, 1.0, 0.2)
    two = np.zeros((20, 20), bool)
    two[:8, :8] = band_pattern(8, 1, 1)
    two[8:, 8:] = rng.random((12, 12)) < 0.2
    check_solves(diffode.SparseLU(two), two, 1.0, 0.3)


@pytest.mark.parametrize("lower, upper", [(2, 1), (0, 3), (0, 0)])
def test_banded_lu_solves_and_transposes(lower, upper):
    pattern = band_pattern(23, lower, upper)
    for shift, scale in SHIFTS[:2]:
        check_solves(diffode.BandedLU(lower, upper), pattern, shift, scale)


def test_singular_operator_is_reported():
    pattern = torus_pattern(3)
    f, _, _ = operator(pattern, None, -1.0)
    n = pattern.shape[0]
    t, y = jnp.zeros(()), jnp.zeros(n)
    ls = diffode.SparseLU(pattern)
    zero = jax.tree.map(jnp.zeros_like, ls.linearise(f, t, y))  # J = 0
    op = ShiftedJacobian(f, t, y, zero, None, jnp.asarray(-1.0))
    assert not bool(ls.compute(ls.init(op), op, jnp.ones(n))[1])


# --- in the ODE solvers -----------------------------------------------------------------


def reaction_diffusion(t, y, args):
    """The 1-D Brusselator with zero-flux ends (Hairer and Wanner II, IV.1): species
    interleaved, so ``J`` is banded with half-bandwidths 2."""
    a, b, alpha = args
    u, v = y[0::2], y[1::2]
    lap = lambda w: jnp.concatenate([w[1:2] - w[:1], w[2:] - 2 * w[1:-1] + w[:-2], w[-2:-1] - w[-1:]])  # noqa: E731
    return jnp.stack(
        [b + u * u * v - (a + 1) * u + alpha * lap(u), a * u - u * u * v + alpha * lap(v)], -1
    ).ravel()


M = 8
Y0 = jnp.asarray(np.stack([1 + np.sin(np.linspace(0, np.pi, M)), np.full(M, 3.0)], -1).ravel())
ARGS = (3.0, 1.0, 20.0)
TS = jnp.linspace(0.0, 1.0, 4)


def pattern_1d():
    return band_pattern(2 * M, 2, 2)


@pytest.mark.parametrize("linear", ["SparseLU", "BandedLU"])
@pytest.mark.parametrize(
    "solver", [diffode.Kvaerno5, diffode.Radau5, diffode.Rodas5P], ids=lambda s: s.__name__
)
def test_implicit_solvers_with_structured_lu_match_dense_lu(solver, linear):
    ls = diffode.SparseLU(pattern_1d()) if linear == "SparseLU" else diffode.BandedLU(2, 2)
    got = jax.jit(
        lambda y0: diffode.solve(reaction_diffusion, y0, TS, ARGS, solver=solver(linear_solver=ls))
    )(Y0)
    ref = diffode.solve(reaction_diffusion, Y0, TS, ARGS, solver=solver(linear_solver=diffode.LU()))
    np.testing.assert_allclose(got.ys, ref.ys, rtol=1e-9, atol=1e-12)
    assert int(got.stats["num_steps"]) == int(ref.stats["num_steps"])
    assert int(got.stats["num_lu_decomps"]) == int(ref.stats["num_lu_decomps"]) > 0


def test_pattern_selects_sparse_lu_and_gradients_agree():
    """``jac_sparsity`` alone swaps dense LU for SparseLU (also as GMRES's preconditioner).
    Gradients: the adjoint's augmented system (another size) falls back to dense LU,
    against Direct with dense LU. (Direct through SparseLU: tests/test_colouring.py.)"""
    from diffode._solve import _sparse_default

    sp = diffode.Sparsity(pattern_1d())
    assert isinstance(_sparse_default(diffode.Rodas5P(), sp).linear_solver, diffode.SparseLU)
    gm = _sparse_default(diffode.Kvaerno5(linear_solver=diffode.GMRES(preconditioner=diffode.LU())), sp)
    assert isinstance(gm.linear_solver.preconditioner, diffode.SparseLU)

    def loss(args, sensitivity, **kw):
        sol = diffode.solve(
            reaction_diffusion,
            Y0,
            TS,
            args,
            solver=diffode.Rodas5P(),
            sensitivity=sensitivity,
            rtol=1e-9,
            atol=1e-11,
            **kw,
        )
        return jnp.sum(sol.ys[-1] ** 2)

    args = tuple(jnp.asarray(a) for a in ARGS)
    ref = jnp.stack(jax.jit(jax.grad(lambda a: loss(a, diffode.Direct())))(args))
    got = jax.jit(jax.grad(lambda a: loss(a, diffode.InterpolatingAdjoint(), jac_sparsity=sp)))(args)
    np.testing.assert_allclose(jnp.stack(got), ref, rtol=1e-5)  # the adjoint's own tolerance
    assert np.all(np.abs(np.asarray(ref)) > 1e-3)
    # Forward sensitivities factorise the n x n block by SparseLU (SensitivityLU's inner).
    got = jax.jit(jax.grad(lambda a: loss(a, diffode.ForwardSensitivity(), jac_sparsity=sp)))(args)
    np.testing.assert_allclose(jnp.stack(got), ref, rtol=1e-6)


def test_float32_and_linearize():
    ls = diffode.BandedLU(2, 2)
    y32 = Y0.astype(jnp.float32)
    sol = diffode.solve(
        reaction_diffusion,
        y32,
        TS.astype(jnp.float32),
        ARGS,
        solver=diffode.Rodas5P(linear_solver=ls),
        rtol=1e-4,
        atol=1e-6,
    )
    ref = diffode.solve(reaction_diffusion, Y0, TS, ARGS, solver=diffode.Rodas5P(), rtol=1e-10, atol=1e-12)
    assert sol.ys.dtype == jnp.float32
    np.testing.assert_allclose(sol.ys, ref.ys, rtol=2e-3, atol=1e-4)  # rtol 1e-4, global error growth

    @jax.jit
    def final(y0):
        return diffode.solve(
            reaction_diffusion,
            y0,
            TS,
            ARGS,
            solver=diffode.Rodas5P(linear_solver=ls),
            sensitivity=diffode.Direct(),
        ).ys[-1]

    out, lin = jax.linearize(final, Y0)
    v = jnp.ones_like(Y0)
    eps = 1e-6
    fd = (final(Y0 + eps * v) - final(Y0 - eps * v)) / (2 * eps)
    np.testing.assert_allclose(lin(v), fd, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------
# SensitivityLU: the augmented system of forward sensitivities by n x n blocks.
# --------------------------------------------------------------------------


def _augmented(n, k, seed=0):
    """An augmented right-hand side ``[f(y), J(y) s_i + b_i(y)]`` of a nonlinear ``f`` on
    ``n`` states with ``k`` sensitivities (``b_i = df/dp_i``), and a point ``z``."""
    rng = np.random.default_rng(seed)
    W, P = jnp.asarray(rng.normal(size=(n, n))), jnp.asarray(rng.normal(size=(k, n)))

    def f(y, p):
        return jnp.tanh(W @ y) - y**3 + p @ P

    p0 = jnp.asarray(rng.normal(size=k))

    def aug(t, z):
        y, S = z[:n], z[n:].reshape(k, n)
        fy, JS = jax.vmap(lambda s, e: jax.jvp(f, (y, p0), (s, e)), out_axes=(None, 0))(S, jnp.eye(k))
        return jnp.concatenate([fy, JS.reshape(-1)])

    return FlatRHS(aug), jnp.asarray(rng.normal(size=n * (k + 1)))


@pytest.mark.parametrize("shift, scale", [(1.0, 0.3), (2.0 + 1.5j, 1.0), (None, -1.0)])
def test_sensitivity_lu_solves_the_augmented_system(shift, scale):
    # Against numpy.linalg.solve on the dense augmented matrix from jax.jacfwd: plain and
    # transposed, real, complex (Radau5's second system) and Newton's A = J.
    from diffode.solvers.structured import SensitivityLU

    n, k = 6, 3
    f, z = _augmented(n, k)
    t = jnp.zeros(())
    J = np.asarray(jax.jacfwd(f.fn, argnums=1)(t, z))
    A = (0 if shift is None else shift) * np.eye(n * (k + 1)) - scale * J
    b = np.random.default_rng(1).normal(size=n * (k + 1)) * (1 + 0.5j if np.iscomplexobj(A) else 1)
    ls = SensitivityLU(diffode.LU(), n)

    @jax.jit
    def solves(b):
        op = ShiftedJacobian(
            f, t, z, ls.linearise(f, t, z), None if shift is None else jnp.asarray(shift), jnp.asarray(scale)
        )
        state = ls.init(op)
        return ls.compute(state, op, b), ls.compute(state, op, b, transpose=True), ls.linearise(f, t, z)

    (x, ok), (xt, okt), jac = solves(jnp.asarray(b))
    assert jac.shape == (n, n)  # the diagonal block only
    assert bool(ok) and bool(okt)
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(xt, np.linalg.solve(A.T, b), rtol=1e-10, atol=1e-12)


def test_forward_sensitivity_factorises_the_state_block():
    # ForwardSensitivity gives an implicit solver's direct linear solver the n x n block
    # (its gradients: test_pattern_selects_sparse_lu_and_gradients_agree with SparseLU,
    # tests/test_forward_sensitivity.py with dense LU).
    from diffode.sensitivity.forward import _augmented_solver
    from diffode.solvers.structured import SensitivityLU

    for solver in (diffode.Rodas5P(), diffode.Kvaerno5(), diffode.Radau5()):
        ls = _augmented_solver(solver, 8).linear_solver
        assert isinstance(ls, SensitivityLU) and isinstance(ls.inner, diffode.LU) and ls.n == 8
    gmres = diffode.Kvaerno5(linear_solver=diffode.GMRES())
    assert _augmented_solver(gmres, 8) is gmres  # matrix-free: the augmented products as they are
