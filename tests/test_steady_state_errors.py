"""steady_state failure modes: no steady state, singular Jacobian, non-convergence,
non-finite values and bad input each end in an error that names the problem
(throw=True, also under jit) or in its SteadyStateStatus code (throw=False),
never in a number presented as a steady state."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode
from diffode import SteadyStateStatus as S
from tests.test_errors import SOLVE_ERRORS, own_message


def constant(t, y, a):
    return jnp.ones_like(y)  # y' = 1: no steady state, df/dy = 0


def exchange(t, y, k):
    """Reversible exchange y0 <-> y1: y0 + y1 is conserved, so the steady states form a line."""
    return jnp.stack([-k * y[0] + k * y[1], k * y[0] - k * y[1]])


@eqx.filter_jit
def run(f, y0, args=None, **kw):
    return diffode.steady_state(f, y0, args, **kw)


def expect(status, f, y0, args=None, match=None, **kw):
    """The status with throw=False, and the same message raised with throw=True (under jit)."""
    sol = run(f, y0, args, throw=False, **kw)
    assert int(sol.status) == status, (int(sol.status), sol.message)
    with pytest.raises(SOLVE_ERRORS) as info:
        jax.block_until_ready(run(f, y0, args, throw=True, **kw).y)
    msg = own_message(info.value)
    assert msg == diffode.STEADY_STATE_MESSAGES[status]
    if match is not None:
        assert re.search(match, msg), msg
    return sol


# ------------------------------------------------------------------ no steady state


def test_no_steady_state_newton_reports_singular_jacobian():
    sol = expect(S.SINGULAR_JACOBIAN, constant, jnp.array([0.0, 1.0]), match="no steady state")
    assert int(sol.stats["num_iterations"]) == 1


def test_no_steady_state_newton_with_gmres():
    gmres = diffode.Newton(linear_solver=diffode.GMRES())
    expect(S.SINGULAR_JACOBIAN, constant, jnp.array([0.0, 1.0]), method=gmres)


def test_no_real_root_stalls_the_line_search():
    """y' = 1 + y^2 > 0 has no root; Newton descends |f| to its minimum 1 at y = 0 and stops."""
    sol = expect(S.NO_PROGRESS, lambda t, y, a: 1 + y**2, jnp.array(2.0), match="no steady state")
    assert np.isnan(float(sol.y)) and abs(float(sol.residual) - 1) < 1e-6  # |f| = 1 at y = 0


@pytest.mark.parametrize(
    "method", [diffode.PseudoTransient(), diffode.IntegrateToSteady()], ids=["ptc", "integrate"]
)
def test_no_steady_state_dynamic_methods_run_out_of_steps(method):
    sol = expect(
        S.MAX_STEPS_REACHED, constant, jnp.array(0.0), method=method, max_steps=6, match="no steady state"
    )
    assert int(sol.stats["num_iterations"]) == 6 and float(sol.residual) == 1.0


# ------------------------------------------------------------------ singular Jacobian


def test_non_isolated_steady_states_newton():
    expect(S.SINGULAR_JACOBIAN, exchange, jnp.array([1.0, 0.0]), jnp.array(2.0), match="conservation law")


def test_non_isolated_steady_state_has_no_derivative():
    """PTC finds the steady state the dynamics reach (the total 1 is conserved), but
    differentiating it raises (throw=True) or gives NaN (throw=False)."""
    sol = run(exchange, jnp.array([1.0, 0.0]), jnp.array(2.0), method=diffode.PseudoTransient())
    np.testing.assert_allclose(sol.y, [0.5, 0.5], rtol=1e-12)

    def first(k, throw):
        return diffode.steady_state(
            exchange, jnp.array([1.0, 0.0]), k, method=diffode.PseudoTransient(), throw=throw
        ).y[0]

    with pytest.raises(SOLVE_ERRORS) as info:
        jax.block_until_ready(eqx.filter_jit(jax.grad(lambda k: first(k, True)))(2.0))
    assert "singular" in own_message(info.value) and "not isolated" in own_message(info.value)
    assert np.isnan(jax.grad(lambda k: first(k, False))(2.0))
    assert np.isnan(jax.jacfwd(lambda k: first(k, False))(2.0))


# ------------------------------------------------------------------ non-convergence


def test_max_steps_reached():
    sol = expect(S.MAX_STEPS_REACHED, lambda t, y, a: a - y**3, jnp.array(1.0), jnp.array(100.0), max_steps=2)
    assert int(sol.stats["num_iterations"]) == 2 and float(sol.residual) > 1


def test_ode_stretch_failure():
    sol = expect(
        S.ODE_FAILED,
        lambda t, y, a: a - y,
        jnp.array(0.0),
        jnp.array(1.0),
        method=diffode.IntegrateToSteady(max_ode_steps=3),
    )
    assert int(sol.stats["ode_status"]) == diffode.Status.MAX_STEPS_REACHED


# ------------------------------------------------------------------ non-finite values


def test_rhs_nan_at_the_initial_guess():
    expect(S.NONFINITE_RHS, lambda t, y, a: jnp.log(y - 5.0), jnp.array(1.0), match="NaN")


def test_rhs_nan_everywhere_near_the_iterate():
    """f is finite only at y0: every trial point of the line search (and every
    pseudo-time step) gives NaN."""

    def f(t, y, a):
        return jnp.where(y == 2.0, 1.0, jnp.nan) * y

    expect(S.NONFINITE_RHS, f, jnp.array(2.0))
    expect(S.NONFINITE_RHS, f, jnp.array(2.0), method=diffode.PseudoTransient())


@pytest.mark.parametrize(
    "y0, args, t",
    [
        (jnp.array([jnp.nan, 1.0]), jnp.array(1.0), 0.0),
        (jnp.array([0.0, 1.0]), jnp.array(jnp.inf), 0.0),
        (jnp.array([0.0, 1.0]), jnp.array(1.0), jnp.nan),
    ],
    ids=["y0", "args", "t"],
)
def test_nonfinite_input(y0, args, t):
    sol = expect(S.NONFINITE_INPUT, lambda t, y, a: a - y, y0, args, t=t)
    assert np.all(np.isnan(sol.y))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("tol", [0.0, -1e-8, float("nan"), float("inf")])
def test_bad_tolerance(tol):
    expect(S.BAD_TOLERANCE, lambda t, y, a: a - y, jnp.array(0.0), jnp.array(1.0), tol=tol)


def test_rhs_structure_mismatch():
    with pytest.raises(ValueError, match=r"same structure.*shape \(1,\)"):
        diffode.steady_state(lambda t, y, a: y[:1], jnp.zeros(2))
    sol = diffode.steady_state(lambda t, y, a: y[:1], jnp.zeros(2), throw=False)
    assert int(sol.status) == S.RHS_STRUCTURE_MISMATCH and np.all(np.isnan(sol.y))


def test_python_level_errors():
    f = lambda t, y, a: -y  # noqa: E731
    with pytest.raises(TypeError, match="steady-state method"):
        diffode.steady_state(f, jnp.zeros(2), method=diffode.Tsit5())
    with pytest.raises(ValueError, match="max_steps"):
        diffode.steady_state(f, jnp.zeros(2), max_steps=0)
    with pytest.raises(TypeError, match="floating-point"):
        diffode.steady_state(f, jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="tol must be a scalar"):
        diffode.steady_state(f, jnp.zeros(2), tol=jnp.ones(2))
    with pytest.raises(ValueError, match="armijo"):
        diffode.Newton(armijo=0.7)
    with pytest.raises(ValueError, match="dt0"):
        diffode.PseudoTransient(dt0=-1.0)
    with pytest.raises(TypeError, match="error estimate"):
        diffode.IntegrateToSteady(solver=diffode.RK4())


def test_nan_in_python_float_args_is_bad_input():
    """A Python float in args is static under jit; NaN there is still the input's fault."""
    expect(S.NONFINITE_INPUT, exchange, jnp.array([1.0, 0.0]), float("nan"))
