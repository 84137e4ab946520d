"""Explicit Runge-Kutta methods: empirical convergence order and tableau validation."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode
from diffode import problems

# (solver, order, problem, dt0 values). Step sizes are powers of two that divide
# the save-time spacing, so fixed steps land on every save time exactly.
#
# Each dt range was chosen (by inspection of the full error-vs-dt curve) to sit
# in the asymptotic regime, after the large-step transient and before roundoff:
# every error used lies between ~1e-1 and ~1e-12 (asserted below).
#
# The main problem is the time-rescaled circular Kepler orbit (nonlinear,
# non-autonomous, exact solution), saved at t = 0, 2, 4, 6. Dopri8 is the
# exception: its principal error coefficients are so small that on nonlinear
# problems its 8th-order term only dominates below double-precision roundoff
# (observed local slopes 8.4-9 there), so it uses y' = cos(t) y on [0, 8], where
# the slopes are 8.05-8.1 with errors 4e-6 .. 2e-13.
KEPLER = problems.rescaled_kepler(t1=6.0)
COS = problems.cos_linear()
P = 2.0 ** -np.arange(12)

CASES = [
    (diffode.Euler, 1, KEPLER, P[7:11]),
    (diffode.Midpoint, 2, KEPLER, P[3:7]),
    (diffode.Heun, 2, KEPLER, P[3:7]),
    (diffode.Ralston, 2, KEPLER, P[3:7]),
    (diffode.Bosh3, 3, KEPLER, P[3:7]),
    (diffode.RK4, 4, KEPLER, P[4:8]),
    (diffode.Tsit5, 5, KEPLER, P[3:7]),
    (diffode.Dopri5, 5, KEPLER, P[4:8]),
    (diffode.Dopri8, 8, COS, P[0:4]),
]


def fixed_step_errors(solver, problem, n_save, dts):
    ts = problem.ts(n_save)
    exact = np.asarray(jax.vmap(problem.exact)(ts))
    # dt0 is traced: one compilation serves every step size.
    fn = eqx.filter_jit(
        lambda dt: (
            diffode.solve(
                problem.f, problem.y0, ts, problem.args, solver=solver, dt0=dt, adaptive=False, max_steps=8192
            ).ys
        )
    )
    return np.array([np.abs(np.asarray(fn(jnp.asarray(dt))) - exact).max() for dt in dts])


@pytest.mark.parametrize("solver_cls, order, problem, dts", CASES, ids=[c[0].__name__ for c in CASES])
def test_convergence_order(solver_cls, order, problem, dts):
    n_save = 4 if problem is KEPLER else 9
    errors = fixed_step_errors(solver_cls(), problem, n_save, dts)
    # The test design itself: errors far from roundoff (~1e-14 here) and from
    # the large-step regime, else the slope measures neither.
    assert np.all(errors > 1e-13) and np.all(errors < 1.0), errors
    slope = np.polyfit(np.log(dts), np.log(errors), 1)[0]
    # +-0.3 around the classical order: wide enough for the residual
    # pre-asymptotic curvature seen on these ranges (<= 0.15), far too narrow
    # for a method of the neighbouring order.
    assert abs(slope - order) < 0.3, (slope, errors)


def test_solver_order_attribute():
    # The controller's exponents use `order`; it must match the tableau's claim.
    expected = dict(Euler=1, Midpoint=2, Heun=2, Ralston=2, Bosh3=3, RK4=4, Tsit5=5, Dopri5=5, Dopri8=8)
    for name, order in expected.items():
        assert getattr(diffode, name)().order == order


def test_embedded_flags():
    # Euler and RK4 have no error estimate; every other method has one.
    for cls in (diffode.Euler, diffode.RK4):
        assert not cls().embedded
    for cls in (
        diffode.Midpoint,
        diffode.Heun,
        diffode.Ralston,
        diffode.Bosh3,
        diffode.Tsit5,
        diffode.Dopri5,
        diffode.Dopri8,
    ):
        assert cls().embedded


# --------------------------------------------------------------------------
# The stage loop (default) and unrolled stages compute the same method.
# --------------------------------------------------------------------------

LV = problems.lotka_volterra(t1=5.0)


@pytest.mark.parametrize("solver_cls", [c[0] for c in CASES], ids=[c[0].__name__ for c in CASES])
def test_stage_loop_matches_unrolled_stages(solver_cls):
    # The two forms sum the stages in a different order, so they differ by
    # rounding only: adaptive solves must take the same steps (identical
    # counters) and agree to 1e-10 relative (rounding grown over ~100 steps),
    # far below the methods' own errors (1e-7 and up here).
    ts = LV.ts(6)
    kw = dict(rtol=1e-6, atol=1e-6, max_steps=20000) if solver_cls().embedded else dict(dt0=2.0**-7)

    def run(stage_loop):
        return diffode.solve(LV.f, LV.y0, ts, LV.args, solver=solver_cls(stage_loop=stage_loop), **kw)

    looped, unrolled = run(True), run(False)
    assert int(looped.status) == 0
    assert {k: int(v) for k, v in looped.stats.items()} == {k: int(v) for k, v in unrolled.stats.items()}
    np.testing.assert_allclose(looped.ys, unrolled.ys, rtol=1e-10, atol=0)


@pytest.mark.parametrize("solver_cls", [diffode.Tsit5, diffode.Bosh3])
def test_stage_loop_gradients_match_unrolled_stages(solver_cls):
    # Reverse mode through the steps (Direct: jax.vjp of each step, so of the
    # stage loop) and forward mode through the loop, in both forms: equal to
    # rounding (same tolerance argument as above).
    ts = LV.ts(6)

    def loss(args, stage_loop, sensitivity):
        sol = diffode.solve(
            LV.f,
            LV.y0,
            ts,
            args,
            solver=solver_cls(stage_loop=stage_loop),
            rtol=1e-6,
            atol=1e-6,
            sensitivity=sensitivity,
        )
        return jnp.sum(sol.ys[-1] ** 2)

    for stage_loop in (True, False):
        reverse = jax.grad(loss)(LV.args, stage_loop, diffode.Direct())
        forward = jax.jacfwd(loss)(LV.args, stage_loop, diffode.Direct())
        np.testing.assert_allclose(reverse, forward, rtol=1e-9)
        if stage_loop:
            looped = reverse
    np.testing.assert_allclose(looped, reverse, rtol=1e-9)


def test_default_stage_form_follows_state_size():
    # stage_loop=None loops below UNROLL_MIN_SIZE components and unrolls from
    # there; an explicit True or False is kept whatever the size.
    from diffode.solvers.explicit_rk import UNROLL_MIN_SIZE

    small, large = jnp.zeros(UNROLL_MIN_SIZE - 1), jnp.zeros(UNROLL_MIN_SIZE)
    assert diffode.Tsit5().loops_stages(small) and not diffode.Tsit5().loops_stages(large)
    assert diffode.Tsit5(stage_loop=True).loops_stages(large)
    assert not diffode.Tsit5(stage_loop=False).loops_stages(small)


@pytest.mark.parametrize("num_save", [2, 5])
def test_unrolled_default_matches_stage_loop_on_large_state(num_save):
    # At UNROLL_MIN_SIZE components the default unrolls the stages; the stage
    # loop (its stage sums and the interpolation are then dots) computes the
    # same steps up to rounding in the order of the sums. With 2 save times
    # there is no interpolation; with 5 the saves between steps interpolate.
    from diffode.solvers.explicit_rk import UNROLL_MIN_SIZE

    n = UNROLL_MIN_SIZE
    rates = jnp.linspace(0.5, 2.0, n)
    y0 = jnp.cos(jnp.linspace(0.0, 3.0, n))
    ts = jnp.linspace(0.0, 2.0, num_save)

    def f(t, y, a):
        return -a * rates * y + jnp.sin(t)

    def run(stage_loop):
        return diffode.solve(
            f, y0, ts, 1.0, solver=diffode.Tsit5(stage_loop=stage_loop), rtol=1e-6, atol=1e-9
        )

    default, looped = run(None), run(True)
    assert int(default.status) == 0 and int(default.stats["num_steps"]) > 5
    assert {k: int(v) for k, v in default.stats.items()} == {k: int(v) for k, v in looped.stats.items()}
    np.testing.assert_allclose(default.ys, looped.ys, rtol=1e-14, atol=1e-15)


# --------------------------------------------------------------------------
# ButcherTableau validation.
# --------------------------------------------------------------------------

HEUN = dict(a=[[0, 0], [1, 0]], b=[0.5, 0.5], c=[0, 1], order=2, b_error=[-0.5, 0.5])


def test_valid_tableau_is_accepted():
    tab = diffode.ButcherTableau(**HEUN, name="heun")
    assert tab.num_stages == 2 and tab.explicit and tab.embedded
    # A custom tableau drives the generic stepper: Heun's method by hand must
    # reproduce diffode.Heun exactly.
    f = problems.exponential_decay_rhs
    p = problems.exponential_decay()
    ts = p.ts(3)
    custom = diffode.solve(f, p.y0, ts, p.args, solver=diffode.ExplicitRK(tab), dt0=0.1, adaptive=False)
    builtin = diffode.solve(f, p.y0, ts, p.args, solver=diffode.Heun(), dt0=0.1, adaptive=False)
    np.testing.assert_array_equal(custom.ys, builtin.ys)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(c=[0, 0.9]), "row sums"),  # c_2 != a_21
        (dict(b=[0.5, 0.6]), "sum to"),  # inconsistent: sum(b) = 1.1
        (dict(b_error=[-0.5, 0.6]), "sum to 0"),  # embedded weights sum to 0.1
        (dict(a=[[0, 0, 0], [1, 0, 0]]), "shapes"),  # a is 2x3
        (dict(order=0), "order"),
        (dict(b_error=[-0.5, 0.25, 0.25]), "b_error"),  # wrong length
        (dict(b_interp=[[1.0], [0.5]]), "b_interp"),  # b_interp(1) = (1, 0.5) != b
    ],
    ids=["row-sums", "weights", "error-weights", "shape", "order", "error-shape", "interp-end"],
)
def test_bad_tableau_rejected(change, match):
    with pytest.raises(ValueError, match=match):
        diffode.ButcherTableau(**{**HEUN, **change}, name="bad")


def test_explicit_rk_rejects_implicit_tableau():
    # a with a diagonal entry is an implicit method: the explicit stepper must refuse it.
    tab = diffode.ButcherTableau(a=[[0.5]], b=[1.0], c=[0.5], order=2, name="implicit-midpoint")
    assert not tab.explicit
    with pytest.raises(ValueError, match="lower-triangular"):
        diffode.ExplicitRK(tab)
