"""The sensitivity methods against each other: on a neural ODE (equinox MLP
parameters) every method gives the same gradient, the two continuous adjoints
match the expm solution of a linear system, and ``Auto`` chooses as documented.
Each method's other checks against analytic and independent references are in
its own file (test_direct.py, test_forward_sensitivity.py, test_backsolve.py,
test_interpolating.py)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode
from diffode import problems

METHODS = {
    "Direct": diffode.Direct(),
    "Direct(checkpoints=4)": diffode.Direct(checkpoints=4),
    "ForwardSensitivity": diffode.ForwardSensitivity(),
    "BacksolveAdjoint": diffode.BacksolveAdjoint(),
    "InterpolatingAdjoint": diffode.InterpolatingAdjoint(),
    "Auto": diffode.Auto(),
}


def mlp_field(t, y, model):
    return model(y)


@pytest.fixture(scope="module")
def neural_ode():
    model = eqx.nn.MLP(2, 2, width_size=8, depth=2, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    model = jax.tree_util.tree_map(lambda x: x * 0.5 if eqx.is_inexact_array(x) else x, model)
    y0 = jnp.array([1.0, -0.5])
    ts = jnp.linspace(0.0, 2.0, 9)
    return model, y0, ts


def _grad(method, model, y0, ts, rtol=1e-10):
    def loss(m, y0, ts):
        sol = diffode.solve(mlp_field, y0, ts, m, rtol=rtol, atol=rtol, sensitivity=method)
        return jnp.sum(sol.ys**2)

    return eqx.filter_jit(eqx.filter_grad(loss))(model, y0, ts), jax.jit(
        jax.grad(lambda y0, ts: loss(model, y0, ts), argnums=(0, 1))
    )(y0, ts)


@pytest.fixture(scope="module")
def reference(neural_ode):
    # Forward mode through the solver steps (no sensitivity method involved).
    model, y0, ts = neural_ode
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss(p, y0, ts):
        sol = diffode.solve(mlp_field, y0, ts, eqx.combine(p, static), rtol=1e-10, atol=1e-10)
        return jnp.sum(sol.ys**2)

    return jax.jit(jax.jacfwd(loss, argnums=(0, 1, 2)))(params, y0, ts)


@pytest.mark.parametrize("name", list(METHODS))
def test_all_methods_agree_on_a_neural_ode(name, neural_ode, reference):
    model, y0, ts = neural_ode
    g_model, (g_y0, g_ts) = _grad(METHODS[name], model, y0, ts)
    ref_p, ref_y0, ref_ts = reference
    got = jax.tree_util.tree_leaves(eqx.filter(g_model, eqx.is_inexact_array))
    want = jax.tree_util.tree_leaves(ref_p)
    assert len(got) == len(want)
    scale = max(float(jnp.abs(w).max()) for w in want)
    # Both sides are rtol = 1e-10 solves of the same ODE; discretise-then-optimise
    # and optimise-then-discretise differ by O(tolerance), so 1e-6 relative.
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(g_y0, ref_y0, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(g_ts, ref_ts, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "method",
    [diffode.BacksolveAdjoint(), diffode.InterpolatingAdjoint()],
    ids=["BacksolveAdjoint", "InterpolatingAdjoint"],
)
def test_continuous_adjoints_match_expm(method):
    # Gradients w.r.t. A, y0 and both save times of y' = A y, against JAX's
    # derivatives of expm (rtol 1e-10 solves; 1e-7 leaves room for the
    # tolerance-level error of both the forward and the backward solve).
    p = problems.linear_system()
    ts = jnp.asarray([0.5, 4.5])
    w = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4)))

    def loss_ode(a, y0, ts):
        ys = diffode.solve(problems.linear_rhs, y0, ts, a, rtol=1e-10, atol=1e-10, sensitivity=method).ys
        return jnp.sum(w * ys)

    def loss_exact(a, y0, ts):
        return jnp.sum(w * problems.linear_solution(a, y0, ts))

    got = jax.grad(loss_ode, argnums=(0, 1, 2))(p.args, p.y0, ts)
    want = jax.grad(loss_exact, argnums=(0, 1, 2))(p.args, p.y0, ts)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-7, atol=1e-7 * float(jnp.max(jnp.abs(r))))


def test_auto_choice():
    # choose(n, p): n states, p differentiated inputs; the rule measured in
    # benchmarks/auto_threshold_bruss2d_p.json and auto_threshold_stiff_p.json (see Auto's docstring).
    auto = diffode.Auto()
    assert isinstance(auto.choose(2, 4), diffode.ForwardSensitivity)
    assert isinstance(auto.choose(64, 1000), diffode.Direct)
    assert isinstance(auto.choose(64, 3, diffode.Tsit5()), diffode.Direct)
    # Implicit solvers with a direct linear solver: forward sensitivities up to p = n / 8
    # (each step factorises the n x n block only; the crossover grows with n).
    for solver in (
        diffode.Kvaerno5(),
        diffode.Rodas5P(),
        diffode.Radau5(),
        diffode.Rodas5P(linear_solver=diffode.BandedLU(1, 1)),
    ):
        for n in (128, 512, 2048):
            assert isinstance(auto.choose(n, n // 8, solver), diffode.ForwardSensitivity)
            assert not isinstance(auto.choose(n, n // 8 + 1, solver), diffode.ForwardSensitivity)
    # The measured cases: POLLU (20 states, 25 rates) and the Brusselator (128 states,
    # 18 parameters) go to Direct; the Brusselator with 3 parameters to forward sensitivities.
    assert isinstance(auto.choose(20, 25, diffode.Rodas5P()), diffode.Direct)
    assert isinstance(auto.choose(128, 18, diffode.Rodas5P()), diffode.Direct)
    assert isinstance(auto.choose(128, 3, diffode.Rodas5P()), diffode.ForwardSensitivity)
    # Past it: the SDIRK family's replay repeats its Newton iterations, so the interpolating adjoint...
    assert isinstance(auto.choose(64, 1000, diffode.Kvaerno5()), diffode.InterpolatingAdjoint)
    # ...but Rosenbrock and Radau5 steps replay faster than the adjoint solves.
    assert isinstance(auto.choose(64, 1000, diffode.Rodas5P()), diffode.Direct)
    assert isinstance(auto.choose(64, 1000, diffode.Radau5()), diffode.Direct)
    # A structured linear solver: the adjoint's augmented system would be factorised densely.
    assert isinstance(
        auto.choose(64, 1000, diffode.Kvaerno5(linear_solver=diffode.BandedLU(1, 1))), diffode.Direct
    )
    # A matrix-free linear solver: no forward-sensitivity rule past n (p + 1) = 128.
    assert isinstance(
        auto.choose(64, 3, diffode.Kvaerno5(linear_solver=diffode.GMRES())), diffode.InterpolatingAdjoint
    )
    # Never the backsolve adjoint, whatever the sizes.
    for n in (1, 8, 200):
        for solver in (None, diffode.Kvaerno5(), diffode.Rodas5P()):
            assert not isinstance(auto.choose(n, n, solver), diffode.BacksolveAdjoint)


def test_auto_gradient_matches_reference():
    p = problems.lotka_volterra()
    ts = p.ts(11)
    g = jax.grad(lambda a: jnp.sum(diffode.solve(p.f, p.y0, ts, a, rtol=1e-10, atol=1e-10).ys ** 2))(p.args)
    ys, _, dys_dp, _ = problems.lotka_volterra_sensitivities(np.asarray(ts))
    ref = np.einsum("tj,tjk->k", 2 * ys, dys_dp)
    np.testing.assert_allclose(g, ref, rtol=1e-6)


def test_not_a_sensitivity_method():
    p = problems.lotka_volterra()
    with pytest.raises(TypeError, match="sensitivity"):
        diffode.solve(p.f, p.y0, p.ts(5), p.args, sensitivity="adjoint")
