"""Bad input and failed solves with the implicit solvers: the explicit solvers'
guarantees (an error naming the problem with throw=True, the Status code with
throw=False, NaN for unreached save points) hold for every stiff solver, plus the
checks only implicit solvers need (a user Jacobian of the wrong shape)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode
from diffode import Status
from tests.test_errors import raises_solve_error

SOLVERS = [
    diffode.ImplicitEuler(),
    diffode.Kvaerno3(),
    diffode.Kvaerno5(),
    diffode.Radau5(),
    diffode.Rodas5P(),
]
IDS = [type(s).__name__ for s in SOLVERS]

Y0 = jnp.array([1.0, 2.0])
TS = jnp.linspace(0.0, 1.0, 4)


def decay(t, y, args):
    return -args * y


# (id, keyword changes to a good solve, expected status)
BAD = [
    ("ts-not-monotonic", dict(ts=jnp.array([0.0, 0.5, 0.25, 1.0])), Status.TS_NOT_MONOTONIC),
    ("y0-nan", dict(y0=jnp.array([jnp.nan, 2.0])), Status.NONFINITE_INPUT),
    ("args-inf", dict(args=jnp.asarray(jnp.inf)), Status.NONFINITE_INPUT),
    ("rtol-negative", dict(rtol=jnp.asarray(-1e-6)), Status.BAD_TOLERANCE),
]


def _solve(solver, throw, **change):
    kw = dict(y0=Y0, ts=TS, args=jnp.asarray(0.5), rtol=1e-6, atol=1e-8)
    kw.update(change)
    return diffode.solve(
        decay, kw["y0"], kw["ts"], kw["args"], solver=solver, rtol=kw["rtol"], atol=kw["atol"], throw=throw
    )


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_good_input_control(solver):
    # The control for the bad-input cases: the same call with good input is right.
    sol = _solve(solver, False)
    assert int(sol.status) == Status.SUCCESS
    # ImplicitEuler is first order: at rtol 1e-6 its global error is ~1e-4 here.
    tol = 1e-3 if isinstance(solver, diffode.ImplicitEuler) else 1e-5
    np.testing.assert_allclose(sol.ys, Y0 * np.exp(-0.5 * np.asarray(TS))[:, None], rtol=tol)


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_bad_input(solver):
    # The inputs are arguments of one jitted solve per `throw` setting (two compilations
    # per solver); the good input through the same functions is the control.
    def jitted(throw):
        return jax.jit(
            lambda y0, ts, args, rtol: diffode.solve(
                decay, y0, ts, args, solver=solver, rtol=rtol, atol=1e-8, throw=throw
            )
        )

    quiet, loud = jitted(False), jitted(True)
    good = dict(y0=Y0, ts=TS, args=jnp.asarray(0.5), rtol=jnp.asarray(1e-6))
    assert int(quiet(**good).status) == Status.SUCCESS
    jax.block_until_ready(loud(**good).ys)
    for name, change, status in BAD:
        sol = quiet(**{**good, **change})
        assert int(sol.status) == status, name
        assert np.isnan(np.asarray(sol.ys[1:])).all(), name
        with raises_solve_error(".", status):
            jax.block_until_ready(loud(**{**good, **change}).ys)


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_rhs_structure_mismatch(solver):
    with pytest.raises(ValueError, match="same structure"):
        diffode.solve(lambda t, y, a: y[:1], Y0, TS, solver=solver)


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_max_steps(solver):
    # Van der Pol, mu = 1000, needs hundreds of steps; allow 5.
    def vdp(t, y, args):
        return jnp.stack([y[1], 1000.0 * (1 - y[0] ** 2) * y[1] - y[0]])

    sol = diffode.solve(vdp, Y0, jnp.array([0.0, 3000.0]), solver=solver, max_steps=5, throw=False)
    assert int(sol.status) == Status.MAX_STEPS_REACHED
    assert int(sol.stats["num_steps"]) == 5 and np.isnan(np.asarray(sol.ys[1])).all()
    with raises_solve_error("max_steps", Status.MAX_STEPS_REACHED):
        jax.block_until_ready(diffode.solve(vdp, Y0, jnp.array([0.0, 3000.0]), solver=solver, max_steps=5).ys)


@pytest.mark.parametrize("solver", SOLVERS, ids=IDS)
def test_nan_rhs_everywhere(solver):
    def nan_rhs(t, y, args):
        return y * jnp.nan

    sol = diffode.solve(nan_rhs, Y0, TS, solver=solver, throw=False)
    assert int(sol.status) == Status.NONFINITE_RHS
    with raises_solve_error("returned NaN or inf", Status.NONFINITE_RHS):
        jax.block_until_ready(diffode.solve(nan_rhs, Y0, TS, solver=solver).ys)


def test_user_jacobian_is_used_and_checked():
    # A correct user Jacobian gives the same answer as jax.jacfwd ...
    A = jnp.array([[-1.0, 0.5], [0.0, -1000.0]])
    f = lambda t, y, a: A @ y  # noqa: E731
    base = diffode.solve(f, Y0, TS, solver=diffode.Radau5(), rtol=1e-8, atol=1e-10)
    mine = diffode.solve(f, Y0, TS, solver=diffode.Radau5(), rtol=1e-8, atol=1e-10, jac=lambda t, y, a: A)
    np.testing.assert_allclose(mine.ys, base.ys, rtol=1e-12, atol=1e-14)
    # ... a wrong one is really used (the result changes) ...
    wrong = diffode.solve(
        f, Y0, TS, solver=diffode.Rodas5P(), rtol=1e-8, atol=1e-10, jac=lambda t, y, a: 0 * A, throw=False
    )
    ok = diffode.solve(f, Y0, TS, solver=diffode.Rodas5P(), rtol=1e-8, atol=1e-10)
    assert int(wrong.stats["num_steps"]) > 10 * int(ok.stats["num_steps"]) or int(wrong.status) != 0
    # ... and one of the wrong shape is refused with a message naming it.
    with pytest.raises(ValueError, match=r"jac returned shape \(3, 3\).*\(2, 2\)"):
        diffode.solve(f, Y0, TS, solver=diffode.Radau5(), jac=lambda t, y, a: jnp.eye(3))
