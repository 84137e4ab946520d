"""diffode.steady_state: values and implicit-function derivatives of every order.

References are closed forms (diffode/problems.py: linear, cubic relaxation,
Michaelis-Menten inflow/outflow), differentiated by JAX: an independent route to
the same derivatives. Tolerance 1e-8, as asked by the issue. The roots are
solved to max|f| <= 1.8e-12 (the float64 default) and |df/dy|^-1 is O(1) on
these problems, so y* is accurate to ~1e-12; the derivative rules solve exactly
(LU) or to 1e-12 relative (GMRES), so the derivatives carry about that error,
times the O(1) second derivatives of f.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import diffode
from diffode import problems

METHODS = {
    "newton_lu": diffode.Newton(),
    "newton_gmres": diffode.Newton(linear_solver=diffode.GMRES(rtol=1e-12)),
    "ptc": diffode.PseudoTransient(),
    "integrate": diffode.IntegrateToSteady(),
}
TOL = 1e-8


def loss(y):
    """A nonlinear scalar of y* (so Hessians mix y*'s first and second derivatives)."""
    return sum(jnp.sum(x**2 + jnp.sin(x)) for x in jtu.tree_leaves(y))


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jtu.tree_leaves(tree)])


def close(a, b, tol=TOL):
    a, b = flat(a), flat(b)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.fixture(scope="module", params=list(METHODS))
def method(request):
    return METHODS[request.param]


# Every method on every problem, except the GMRES Newton, whose derivatives compile slowly
# (35-50 s a problem): it runs on the nonlinear pytree problem only.
CLOSED_FORM_CASES = [
    (name, make)
    for name in METHODS
    for make in problems.STEADY
    if name != "newton_gmres" or make is problems.michaelis_menten_flow
]


@pytest.mark.parametrize(
    "name, make", CLOSED_FORM_CASES, ids=lambda c: c if isinstance(c, str) else c.__name__
)
def test_value_and_derivatives_match_closed_form(name, make):
    method = METHODS[name]
    p = make()

    def y_star(args):
        return diffode.steady_state(p.f, p.y0, args, method=method).y

    def everything(args):  # one compilation for the value and all four derivatives
        sol = diffode.steady_state(p.f, p.y0, args, method=method)
        scalar = lambda a: loss(y_star(a))  # noqa: E731
        derivatives = (jax.grad(scalar), jax.jacfwd(y_star), jax.jacrev(y_star), jax.hessian(scalar))
        return (sol, *(d(args) for d in derivatives))

    sol, grad, jac_fwd, jac_rev, hess = jax.jit(everything)(p.args)
    assert int(sol.status) == 0 and float(sol.residual) <= 2e-12
    close(sol.y, p.exact(p.args))
    close(grad, jax.grad(lambda a: loss(p.exact(a)))(p.args))
    close(jac_fwd, jax.jacfwd(p.exact)(p.args))
    close(jac_rev, jax.jacrev(p.exact)(p.args))
    close(hess, jax.hessian(lambda a: loss(p.exact(a)))(p.args))


def test_forward_reverse_and_second_order_agree():
    """jvp, vjp, jacfwd, jacrev and both nested Hessians give one answer (no closed form used)."""
    p = problems.enzyme_chain(6)

    def y_star(v):
        return diffode.steady_state(p.f, p.y0, dict(p.args, V=v)).y

    v = p.args["V"]
    # Each transformation under one jit: eagerly, every primitive of the Newton loop and
    # its derivative rules compiles on its own (50 s against 10 s).
    jf, jr = jax.jit(jax.jacfwd(y_star))(v), jax.jit(jax.jacrev(y_star))(v)
    np.testing.assert_allclose(jf, jr, rtol=1e-12, atol=1e-14)
    dv = jnp.linspace(-1.0, 1.0, v.shape[0])
    _, tangent = jax.jit(lambda v, dv: jax.jvp(y_star, (v,), (dv,)))(v, dv)
    np.testing.assert_allclose(tangent, jf @ dv, rtol=1e-12, atol=1e-14)
    ct = jnp.arange(1.0, 7.0)
    np.testing.assert_allclose(
        jax.jit(lambda v, ct: jax.vjp(y_star, v)[1](ct)[0])(v, ct), ct @ jr, rtol=1e-12, atol=1e-14
    )
    scalar = lambda v: loss(y_star(v))  # noqa: E731
    h_fr = jax.jit(jax.jacfwd(jax.jacrev(scalar)))(v)
    h_rf = jax.jit(jax.jacrev(jax.jacfwd(scalar)))(v)
    h_ff = jax.jit(jax.jacfwd(jax.jacfwd(scalar)))(v)
    np.testing.assert_allclose(h_fr, h_rf, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h_fr, h_ff, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(h_fr, h_fr.T, rtol=1e-10, atol=1e-12)


def test_gradient_matches_long_solve():
    """The steady-state gradient equals that of a long ODE solve (Direct, through the steps).

    The chain's slowest mode decays like exp(-0.05 t) or faster (d >= 0.05), so
    at T = 800 the transient is below e^-40 and the two gradients differ only by
    the ODE solve's error (rtol 1e-10).
    """
    p = problems.enzyme_chain(8)

    def long_solve(args):
        sol = diffode.solve(
            p.f,
            p.y0,
            jnp.array([0.0, 800.0]),
            args,
            solver=diffode.Rodas5P(),
            rtol=1e-10,
            atol=1e-12,
            sensitivity=diffode.Direct(),
            max_steps=20000,
        )
        return loss(sol.ys[-1])

    g_ss = jax.jit(jax.grad(lambda a: loss(diffode.steady_state(p.f, p.y0, a).y)))(p.args)
    g_ode = jax.jit(jax.grad(long_solve))(p.args)
    close(g_ss, g_ode, tol=1e-7)


def test_all_methods_find_the_same_state_and_gradient():
    p = problems.enzyme_chain(16)

    @jax.jit
    def run(args):
        out = {}
        methods = dict(METHODS, ptc_gmres=diffode.PseudoTransient(linear_solver=diffode.GMRES(rtol=1e-12)))
        for name, m in methods.items():
            val, g = jax.value_and_grad(lambda a, m=m: loss(diffode.steady_state(p.f, p.y0, a, method=m).y))(
                args
            )
            out[name] = (val, g)
        return out

    out = run(p.args)
    ref_val, ref_g = out["newton_lu"]
    for name, (val, g) in out.items():
        np.testing.assert_allclose(val, ref_val, rtol=1e-12, err_msg=name)
        close(g, ref_g, tol=1e-9)


def test_vmap_keeps_per_member_iterations():
    """Under vmap each member's y*, iteration count and gradient equal its own solve's."""
    p = problems.cubic_relaxation()
    ps = jnp.array([[0.5, 2.0, 8.0], [1e-3, 1.0, 1.0], [50.0, 3.0, 0.2]])

    def run(args):
        return diffode.steady_state(p.f, p.y0, args)

    batched = jax.jit(jax.vmap(run))(ps)
    for i, args in enumerate(ps):
        single = run(args)
        np.testing.assert_allclose(batched.y[i], single.y, rtol=1e-14)
        assert int(batched.stats["num_iterations"][i]) == int(single.stats["num_iterations"])
    iters = batched.stats["num_iterations"]
    assert len(set(np.asarray(iters).tolist())) > 1, iters  # members really differ
    grads = jax.jit(jax.vmap(jax.grad(lambda a: loss(run(a).y))))(ps)
    close(grads, jax.vmap(jax.grad(lambda a: loss(p.exact(a))))(ps))


def test_time_dependence_and_closures_are_differentiated():
    """d/dt of the fixed time, and parameters f closes over (not passed in args)."""

    def y_star(t, q):
        return diffode.steady_state(lambda t, y, args: q * (1 + t**2) - y, jnp.zeros(2), t=t).y

    t, q = 0.5, jnp.array([1.0, 3.0])
    close(y_star(t, q), q * 1.25)
    close(jax.grad(lambda t: jnp.sum(y_star(t, q)))(t), 2 * t * jnp.sum(q))
    close(jax.jacrev(lambda q: y_star(t, q))(q), 1.25 * jnp.eye(2))


def test_initial_guess_gets_zero_derivative():
    p = problems.cubic_relaxation()
    g = jax.grad(lambda y0: loss(diffode.steady_state(p.f, y0, p.args).y))(p.y0)
    np.testing.assert_array_equal(g, jnp.zeros_like(p.y0))


def test_equinox_module_parameters():
    """A neural right-hand side: the gradient w.r.t. the MLP's weights matches central
    differences along a random direction (step 1e-5: truncation ~1e-10, rounding
    ~1e-11, relative to an O(1) derivative)."""
    mlp = eqx.nn.MLP(3, 3, 8, 2, key=jax.random.PRNGKey(0))

    def f(t, y, mlp):
        return -2.0 * y + 0.5 * jnp.tanh(mlp(y)) + 1.0

    def objective(mlp):
        return loss(diffode.steady_state(f, jnp.zeros(3), mlp).y)

    grads = eqx.filter_jit(eqx.filter_grad(objective))(mlp)
    params, static = eqx.partition(mlp, eqx.is_inexact_array)
    leaves, treedef = jtu.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    direction = jtu.tree_unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    at = eqx.filter_jit(
        lambda s: objective(eqx.combine(jtu.tree_map(lambda p, d: p + s * d, params, direction), static))
    )
    h = 1e-5
    fd = (at(h) - at(-h)) / (2 * h)
    analytic = sum(
        jnp.vdot(g, d)
        for g, d in zip(jtu.tree_leaves(eqx.filter(grads, eqx.is_inexact_array)), jtu.tree_leaves(direction))
    )
    np.testing.assert_allclose(analytic, fd, rtol=1e-7)


def test_float32(method):
    """float32 states with every method (GMRES asked for rtol 1e-12, below float32's
    epsilon: it is floored at 10 eps)."""
    p = problems.cubic_relaxation(np.float32)
    sol = diffode.steady_state(p.f, p.y0, p.args, method=method)
    assert sol.y.dtype == jnp.float32 and int(sol.status) == 0
    # default tol eps**0.75 = 6.4e-6 on |f|; |df/dy| >= 1.9 here, so |y - y*| <= 3.4e-6 plus rounding
    np.testing.assert_allclose(sol.y, p.exact(p.args), rtol=1e-5)
    g = jax.grad(lambda a: jnp.sum(diffode.steady_state(p.f, p.y0, a, method=method).y))(p.args)
    np.testing.assert_allclose(g, jax.grad(lambda a: jnp.sum(p.exact(a)))(p.args), rtol=1e-5)


def test_nan_trial_points_are_backtracked():
    """Newton's full step from y0 = 3 on -log(y) lands at y < 0 (NaN); the line search recovers."""
    sol = diffode.steady_state(lambda t, y, a: -jnp.log(y), jnp.array(3.0))
    assert int(sol.status) == 0
    assert int(sol.stats["num_rejected"]) >= 1
    np.testing.assert_allclose(sol.y, 1.0, rtol=1e-12)


def test_pseudo_transient_and_integration_reach_what_newton_misses():
    """f = -y ((y - 2)^2 + 0.01): |f| has a non-zero local minimum near y = 2, between
    y0 = 3 and the only (stable) root y* = 0. Newton with its line search, a descent
    method on |f|^2, stalls there (NO_PROGRESS); the dynamics, which PTC and the ODE
    solve follow, pass through it (f < 0 for y > 0) to y* = 0, where |df/dy| = 4.01, so
    max|f| <= 1.8e-12 puts y within 5e-13 of 0."""

    def f(t, y, a):
        return -y * ((y - 2.0) ** 2 + 0.01)

    newton = diffode.steady_state(f, jnp.array(3.0), throw=False)
    assert int(newton.status) == diffode.SteadyStateStatus.NO_PROGRESS
    assert np.isnan(float(newton.y))  # a failed steady state is NaN
    # It stalled at the local minimum of |f| near y = 2, where |f| = 2 * 0.01.
    assert abs(float(newton.residual) - 0.02) < 2e-3
    for m in (diffode.PseudoTransient(), diffode.IntegrateToSteady()):
        sol = diffode.steady_state(f, jnp.array(3.0), method=m)
        assert abs(float(sol.y)) <= 5e-13, (m, sol.y)


def test_stats_count_the_work():
    p = problems.linear_steady()
    sol = diffode.steady_state(p.f, p.y0, p.args)
    # Linear: one Newton step solves it exactly (to rounding).
    s = {k: int(v) for k, v in sol.stats.items()}
    assert s["num_iterations"] == 1 and s["num_jac_evals"] == 1 and s["num_linear_solves"] == 1
    assert s["num_fevals"] == 2 and s["num_rejected"] == 0 and s["num_ode_steps"] == 0
    sol = diffode.steady_state(p.f, p.y0, p.args, method=diffode.IntegrateToSteady())
    assert int(sol.stats["num_ode_steps"]) > 0 and int(sol.stats["ode_status"]) == 0
    assert sol.success and sol.message == diffode.STEADY_STATE_MESSAGES[0]


def test_eager_calls_compile_once():
    """Eager calls and an eager ``jax.grad`` compile the steady-state solve as one program
    and reuse it: ``f`` is traced by the first call of each only."""
    p = problems.michaelis_menten_flow()
    traced = []

    def f(t, y, args):
        traced.append(None)  # runs at trace time only
        return p.f(t, y, args)

    def scalar(args):
        return loss(diffode.steady_state(f, p.y0, args).y)

    diffode.steady_state(f, p.y0, p.args)
    assert traced
    for fn in (lambda a: diffode.steady_state(f, p.y0, a).y, jax.grad(scalar)):
        fn(p.args)  # grad: JAX differentiates the cached program, without tracing f again
        first = len(traced)
        fn(jax.tree_util.tree_map(lambda v: v * 1.01, p.args))
        assert len(traced) == first
    close(jax.grad(scalar)(p.args), jax.grad(lambda a: loss(p.exact(a)))(p.args))
