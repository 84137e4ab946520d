"""Bad input and failed solves: an error naming the problem with throw=True, the
matching Status code with throw=False (also under jit), NaN for unreached
save points, and no change to JAX's global configuration."""

import contextlib
import os
import re
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode
from diffode import Status, problems


def decay(t, y, args):
    return -args * y


#: What a failed solve raises: the error itself when run eagerly, or, under
#: jit, JAX's runtime error quoting it. (JAX raises the runtime error as a
#: ValueError once the compiled program has run successfully before: its fast
#: dispatch path converts errors differently. The message is checked either way.)
SOLVE_ERRORS = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError, ValueError)


def own_message(exc) -> str:
    """A solve error's own message. Under jit the JaxRuntimeError's text carries the
    Python stack of the raising callback (with quoted source lines, which would
    let `match` succeed on the test's own code), then "EquinoxRuntimeError: <message>"."""
    text = str(exc)
    key = "EquinoxRuntimeError: "
    if key in text:
        return text[text.rindex(key) + len(key) :].split("\n")[0]
    return text


@contextlib.contextmanager
def raises_solve_error(match, status=None):
    """The solve raises an error whose message matches (and is exactly
    MESSAGES[status] when a status is given)."""
    with pytest.raises(SOLVE_ERRORS) as info:
        yield
    msg = own_message(info.value)
    assert re.search(match, msg), msg
    if status is not None:
        assert msg == diffode.MESSAGES[status]


Y0 = jnp.array([1.0, 2.0])
TS = jnp.linspace(0.0, 1.0, 5)
ARGS = jnp.asarray(0.5)
NAN, INF = float("nan"), float("inf")


# Every run-time input check goes through this one function: the bad values
# are traced arrays of fixed shapes, so there is one compilation for
# throw=True and one for throw=False, and throw=False is exercised under jit.
@eqx.filter_jit
def run(y0, ts, args, rtol, atol, throw):
    return diffode.solve(decay, y0, ts, args, rtol=rtol, atol=atol, throw=throw)


def inputs(**change):
    base = dict(y0=Y0, ts=TS, args=ARGS, rtol=jnp.asarray(1e-6), atol=jnp.asarray(1e-8))
    base.update({k: jnp.asarray(v, jnp.float64) for k, v in change.items()})
    return base


# (id, bad input, status, a distinctive part of the message)
BAD_INPUTS = [
    ("ts-not-monotonic", dict(ts=[0.0, 0.5, 0.25, 0.75, 1.0]), Status.TS_NOT_MONOTONIC, "strictly incr"),
    ("ts-repeated", dict(ts=[0.0, 0.25, 0.25, 0.5, 1.0]), Status.TS_NOT_MONOTONIC, "strictly increasing"),
    ("ts-repeated-decreasing", dict(ts=[1.0, 0.5, 0.5, 0.25, 0.0]), Status.TS_NOT_MONOTONIC, "strictly"),
    ("ts-nan", dict(ts=[0.0, 0.25, NAN, 0.75, 1.0]), Status.TS_NOT_MONOTONIC, "finite"),
    ("ts-nan-end", dict(ts=[0.0, 0.25, 0.5, 0.75, NAN]), Status.TS_NOT_MONOTONIC, "finite"),
    ("y0-nan", dict(y0=[NAN, 2.0]), Status.NONFINITE_INPUT, "y0, args or tstops contains NaN"),
    ("y0-inf", dict(y0=[1.0, INF]), Status.NONFINITE_INPUT, "y0, args or tstops contains NaN or inf"),
    ("args-nan", dict(args=NAN), Status.NONFINITE_INPUT, "y0, args or tstops contains NaN"),
    ("rtol-negative", dict(rtol=-1e-6), Status.BAD_TOLERANCE, "non-negative"),
    ("atol-negative", dict(atol=-1e-8), Status.BAD_TOLERANCE, "non-negative"),
    ("tolerances-zero", dict(rtol=0.0, atol=0.0), Status.BAD_TOLERANCE, "not both zero"),
    ("rtol-nan", dict(rtol=NAN), Status.BAD_TOLERANCE, "must be finite"),
]


@pytest.mark.parametrize("change, status, match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_throw(change, status, match):
    with raises_solve_error(match, status):
        jax.block_until_ready(run(**inputs(**change), throw=True).ys)


@pytest.mark.parametrize("change, status, match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_status(change, status, match):
    sol = run(**inputs(**change), throw=False)
    assert int(sol.status) == status
    assert sol.message == diffode.MESSAGES[status]
    assert not bool(sol.success)
    # Nothing was integrated: every save point after the first is NaN.
    assert np.isnan(np.asarray(sol.ys[1:])).all()
    assert int(sol.stats["num_steps"]) == 0


def test_good_input_through_the_same_function():
    # The control for the two tests above: the same compiled function accepts
    # good input (so a failure there is caused by the bad value alone).
    for throw in (True, False):
        sol = run(**inputs(), throw=throw)
        assert int(sol.status) == Status.SUCCESS
        np.testing.assert_allclose(sol.ys, Y0 * np.exp(-0.5 * np.asarray(TS))[:, None], rtol=1e-5)


def test_throw_outside_jit():
    # Eager calls raise the same error as jitted ones.
    with raises_solve_error("strictly increasing", Status.TS_NOT_MONOTONIC):
        diffode.solve(decay, Y0, jnp.array([0.0, 1.0, 0.5]), ARGS)


def test_status_from_plain_jax_jit():
    @jax.jit
    def status(ts):
        return diffode.solve(decay, Y0, ts, ARGS, throw=False).status

    assert int(status(TS)) == Status.SUCCESS
    assert int(status(TS[::-1])) == Status.SUCCESS  # decreasing is fine
    assert int(status(TS.at[2].set(0.9))) == Status.TS_NOT_MONOTONIC


# --------------------------------------------------------------------------
# f returning the wrong structure or shape (found at trace time).
# --------------------------------------------------------------------------


def wrong_structure(t, y, args):
    return (-y, -y)


def wrong_shape(t, y, args):
    return -jnp.concatenate([y, y])


def wrong_leaf_shape(t, y, args):
    return {"a": -y["a"], "b": -y["b"].reshape(1, -1)}


RHS_CASES = [
    (wrong_structure, Y0, "structure"),
    (wrong_shape, Y0, "shape"),
    (wrong_leaf_shape, {"a": Y0, "b": Y0}, r"shape \(1, 2\)"),
]


@pytest.mark.parametrize("f, y0, match", RHS_CASES, ids=["structure", "shape", "leaf-shape"])
def test_rhs_mismatch_throw(f, y0, match):
    with pytest.raises(ValueError, match="same structure") as info:
        diffode.solve(f, y0, TS)
    assert info.match(match)


@pytest.mark.parametrize("f, y0, match", RHS_CASES, ids=["structure", "shape", "leaf-shape"])
def test_rhs_mismatch_status(f, y0, match):
    sol = diffode.solve(f, y0, TS, throw=False)
    assert int(sol.status) == Status.RHS_STRUCTURE_MISMATCH
    sol = jax.jit(lambda y: diffode.solve(f, y, TS, throw=False))(y0)
    assert int(sol.status) == Status.RHS_STRUCTURE_MISMATCH
    assert all(np.isnan(np.asarray(leaf[1:])).all() for leaf in jax.tree_util.tree_leaves(sol.ys))


# --------------------------------------------------------------------------
# Failures during the solve.
# --------------------------------------------------------------------------

LV = problems.lotka_volterra()


def test_max_steps_throw():
    with raises_solve_error("max_steps was reached", Status.MAX_STEPS_REACHED):
        jax.block_until_ready(diffode.solve(LV.f, LV.y0, LV.ts(3), LV.args, max_steps=5).ys)


def test_max_steps_status_and_unreached_nan():
    # Save points packed near t0, then t1 = 10: five steps reach some of the
    # early ones, never the end.
    ts = jnp.concatenate([jnp.linspace(0.0, 0.2, 21), jnp.array([10.0])])
    sol = jax.jit(lambda y0: diffode.solve(LV.f, y0, ts, LV.args, max_steps=5, throw=False))(LV.y0)
    assert int(sol.status) == Status.MAX_STEPS_REACHED
    assert int(sol.stats["num_steps"]) == 5
    finite = np.isfinite(np.asarray(sol.ys)).all(axis=1)
    n = int(finite.sum())
    # Reached points form a prefix (at least y0 and one more), the rest are NaN.
    assert 2 <= n < len(ts) and finite[:n].all() and np.isnan(np.asarray(sol.ys[n:])).all()
    # The reached ones are real solution values (same trajectory as a full solve).
    full = diffode.solve(LV.f, LV.y0, ts, LV.args)
    np.testing.assert_allclose(sol.ys[:n], full.ys[:n], rtol=1e-5)  # both at the default rtol=1e-6


def blow_up(t, y, args):
    return y**2  # y = 1 / (1 - t): infinite at t = 1


BLOW_UP_TS = jnp.array([0.0, 0.5, 2.0])


def test_dt_underflow_throw():
    with raises_solve_error("underflowed", Status.DT_UNDERFLOW):
        jax.block_until_ready(diffode.solve(blow_up, jnp.array([1.0]), BLOW_UP_TS).ys)


def test_dt_underflow_status_and_unreached_nan():
    sol = diffode.solve(blow_up, jnp.array([1.0]), BLOW_UP_TS, throw=False)
    assert int(sol.status) == Status.DT_UNDERFLOW
    # Before the blow-up the solution is right (y(0.5) = 2) ...
    np.testing.assert_allclose(sol.ys[1], [2.0], rtol=1e-5)  # default rtol 1e-6, as above
    # ... and the point beyond it was never reached.
    assert np.isnan(np.asarray(sol.ys[2])).all()


def nan_everywhere(t, y, args):
    return y * jnp.nan


def test_nonfinite_rhs_everywhere():
    with raises_solve_error("returned NaN or inf", Status.NONFINITE_RHS):
        jax.block_until_ready(diffode.solve(nan_everywhere, Y0, TS).ys)
    sol = diffode.solve(nan_everywhere, Y0, TS, throw=False)
    assert int(sol.status) == Status.NONFINITE_RHS


def nan_after_half(t, y, args):
    return jnp.where(t > 0.5, jnp.nan, -y)


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
def test_nonfinite_rhs_during_solve(adaptive):
    # f is fine at t0 and becomes NaN for t > 0.5. Adaptive steps shrink until
    # they underflow; fixed steps fail at once. Either way the status says the
    # right-hand side is to blame (not DT_UNDERFLOW, not a Newton failure).
    ts = jnp.array([0.0, 0.25, 1.0])
    sol = diffode.solve(nan_after_half, Y0, ts, dt0=0.05, adaptive=adaptive, throw=False)
    assert int(sol.status) == Status.NONFINITE_RHS
    np.testing.assert_allclose(sol.ys[1], Y0 * np.exp(-0.25), rtol=1e-5)  # reached before the NaNs
    assert np.isnan(np.asarray(sol.ys[2])).all()
    with raises_solve_error("returned NaN or inf", Status.NONFINITE_RHS):
        jax.block_until_ready(diffode.solve(nan_after_half, Y0, ts, dt0=0.05, adaptive=adaptive).ys)


# --------------------------------------------------------------------------
# Static problems: found before anything runs.
# --------------------------------------------------------------------------


def test_fixed_steps_need_dt0():
    with pytest.raises(ValueError, match="dt0"):
        diffode.solve(decay, Y0, TS, ARGS, adaptive=False)
    # Solvers without an error estimate always take fixed steps.
    for solver in (diffode.Euler(), diffode.RK4()):
        with pytest.raises(ValueError, match="dt0"):
            diffode.solve(decay, Y0, TS, ARGS, solver=solver)


@pytest.mark.parametrize(
    "ts", [jnp.zeros((2, 3)), jnp.asarray(1.0), jnp.zeros((0,))], ids=["2d", "0d", "empty"]
)
def test_ts_wrong_dimension(ts):
    with pytest.raises(ValueError, match="1-D"):
        diffode.solve(decay, Y0, ts, ARGS)


@pytest.mark.parametrize(
    "y0",
    [jnp.array([1, 2]), 1, {"a": jnp.array([1.0]), "b": jnp.array([True])}],
    ids=["int-array", "int", "bool-leaf"],
)
def test_non_float_y0(y0):
    with pytest.raises(TypeError, match="floating-point"):
        diffode.solve(decay, y0, TS, ARGS)


def test_complex_y0_solves_or_is_rejected_clearly():
    # solve's validation accepts any *inexact* leaf, complex included, so a
    # complex y0 gets past the "must be a floating-point array" check. Either
    # complex states are supported (then y' = i y gives e^{it}) or they must be
    # refused up front with a TypeError that says so -- not fail deep inside
    # the step controller (currently: ValueError "Clip received a complex value").
    ts = jnp.linspace(0.0, 1.0, 3)
    try:
        sol = diffode.solve(lambda t, y, args: 1j * y, jnp.array([1.0 + 0.0j]), ts)
    except TypeError as e:
        assert "floating" in str(e) or "complex" in str(e)
        return
    np.testing.assert_allclose(sol.ys[:, 0], np.exp(1j * np.asarray(ts)), rtol=1e-5)  # default rtol 1e-6


@pytest.mark.parametrize("dt0, adaptive", [(0.0, False), (NAN, True)], ids=["zero-fixed", "nan-adaptive"])
def test_bad_dt0_is_reported(dt0, adaptive):
    # Every other bad input is reported by name. A zero or NaN dt0 currently is
    # not: dt0 = 0 takes max_steps zero-length steps and then reports
    # MAX_STEPS_REACHED ("increase max_steps or loosen the tolerances", wrong
    # advice), dt0 = NaN reports MAX_STEPS_REACHED (adaptive) or NONFINITE_RHS
    # (fixed). The error should name dt0.
    with pytest.raises((ValueError,) + SOLVE_ERRORS) as info:
        jax.block_until_ready(diffode.solve(decay, Y0, TS, ARGS, dt0=dt0, adaptive=adaptive, max_steps=64).ys)
    assert "dt0" in own_message(info.value), own_message(info.value)


def test_status_per_batch_member():
    # Under vmap, status is per member: one member's bad args do not fail the others.
    args = jnp.array([0.5, NAN, 1.0])
    sol = jax.vmap(lambda a: diffode.solve(decay, Y0, TS, a, throw=False))(args)
    np.testing.assert_array_equal(sol.status, [Status.SUCCESS, Status.NONFINITE_INPUT, Status.SUCCESS])
    assert sol.message[1] == diffode.MESSAGES[Status.NONFINITE_INPUT]
    ys = np.asarray(sol.ys)
    assert np.isnan(ys[1, 1:]).all() and np.isfinite(ys[[0, 2]]).all()


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_throw_under_vmap(jit):
    # With throw=True a batch raises when any member fails, naming that failure,
    # and runs without error (no failing branch taken) when every member succeeds.
    def batch(args):
        return jax.vmap(lambda a: diffode.solve(decay, Y0, TS, a).ys)(args)

    batch = jax.jit(batch) if jit else batch
    ys = batch(jnp.array([0.5, 1.0]))
    np.testing.assert_allclose(ys[:, -1], np.exp(-np.array([0.5, 1.0]))[:, None] * np.asarray(Y0), rtol=1e-5)
    with raises_solve_error("", status=Status.NONFINITE_INPUT):
        jax.block_until_ready(batch(jnp.array([0.5, NAN, 1.0])))


def test_bad_options():
    with pytest.raises(ValueError, match="max_steps"):
        diffode.solve(decay, Y0, TS, ARGS, max_steps=0)
    with pytest.raises(TypeError, match="solver"):
        diffode.solve(decay, Y0, TS, ARGS, solver="tsit5")


# --------------------------------------------------------------------------
# Global state.
# --------------------------------------------------------------------------


def test_no_global_jax_config_change():
    # A fresh interpreter with x64 off: importing diffode and solving must
    # leave x64 off, and a default solve is float32.
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp
        assert not jax.config.jax_enable_x64
        import diffode
        sol = diffode.solve(lambda t, y, args: -y, jnp.array([1.0, 2.0]), jnp.linspace(0.0, 1.0, 3))
        assert not jax.config.jax_enable_x64, "diffode enabled x64"
        assert sol.ys.dtype == jnp.float32, sol.ys.dtype
        assert abs(float(sol.ys[-1, 0]) - 0.36787944) < 1e-5
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


# Save times closed over by the jitted function are known at trace time: the solve
# checks them and fixes the direction of time in NumPy. Same statuses and values
# as traced save times.
@pytest.mark.parametrize("bad", [[0.0, 0.5, 0.25, 1.0], [0.0, 0.5, NAN, 1.0], [0.0, 0.5, 0.5, 1.0]])
def test_known_bad_ts_gives_the_traced_status(bad):
    ts = jnp.asarray(bad)
    known = jax.jit(lambda y0: diffode.solve(decay, y0, ts, ARGS, throw=False).status)(Y0)
    traced = jax.jit(lambda y0, t: diffode.solve(decay, y0, t, ARGS, throw=False).status)(Y0, ts)
    assert int(known) == int(traced) == Status.TS_NOT_MONOTONIC
    with raises_solve_error("strictly", Status.TS_NOT_MONOTONIC):
        eqx.filter_jit(lambda y0: diffode.solve(decay, y0, ts, ARGS).ys)(Y0)


@pytest.mark.parametrize("reverse", [False, True])
def test_known_and_traced_ts_agree(reverse):
    ts = jnp.linspace(0.0, 1.0, 5)[:: -1 if reverse else 1]
    known = jax.jit(lambda y0: diffode.solve(decay, y0, ts, ARGS, rtol=1e-10, atol=1e-12).ys)(Y0)
    traced = jax.jit(lambda y0, t: diffode.solve(decay, y0, t, ARGS, rtol=1e-10, atol=1e-12).ys)(Y0, ts)
    exact = np.exp(-0.5 * (np.asarray(ts) - float(ts[0])))[:, None] * np.asarray(Y0)
    np.testing.assert_allclose(np.asarray(known), np.asarray(traced), rtol=1e-13, atol=0)
    np.testing.assert_allclose(np.asarray(known), exact, rtol=1e-8)


@pytest.mark.parametrize("where", ["eager", "jit", "vmap"])
def test_closed_over_ts_reach_the_solve_as_constants(where, monkeypatch):
    """Save times a jitted or vmapped function closes over are constants of the solve (its
    ``known_ts``), as in an eager call; traced ones are not. The solve's checks and its time
    direction are then decided at trace time, and the compiled program is smaller."""
    import diffode._solve as solve_module

    seen = []
    real = solve_module.known_value
    monkeypatch.setattr(solve_module, "known_value", lambda x: seen.append(real(x)) or seen[-1])
    f = lambda t, y, a: decay(t, y, a)  # noqa: E731  (a new f: the solves' caches miss)
    if where == "eager":
        diffode.solve(f, Y0, TS, ARGS)
    elif where == "jit":
        jax.jit(lambda y0: diffode.solve(f, y0, TS, ARGS).ys)(Y0)
    else:
        jax.vmap(lambda y0: diffode.solve(f, y0, TS, ARGS).ys)(jnp.stack([Y0, 2 * Y0]))
    assert seen and all(v is not None for v in seen)
    np.testing.assert_array_equal(seen[-1], np.asarray(TS))
    seen.clear()
    jax.jit(lambda y0, t: diffode.solve(f, y0, t, ARGS).ys)(Y0, TS)
    assert seen and all(v is None for v in seen)


def test_nonfinite_args_of_mixed_precision():
    """A NaN in a float32 leaf of args beside a float64 one: reported as bad input. A finite
    Python float too large for float32 beside a float32 leaf is not."""
    args = (jnp.asarray(0.5, jnp.float64), jnp.asarray([1.0, NAN], jnp.float32))
    sol = diffode.solve(lambda t, y, a: -a[0] * y * a[1][0], Y0, TS, args, throw=False)
    assert int(sol.status) == Status.NONFINITE_INPUT
    args = (1e39, jnp.asarray([0.5], jnp.float32))
    sol = diffode.solve(lambda t, y, a: -a[1][0] * y + 0 * a[0], Y0, TS, args, throw=False)
    assert int(sol.status) == Status.SUCCESS


def test_solve_with_constant_inputs_inside_jit_raises():
    """A jitted function that closes over every input of a failing solve: the check runs in
    the caller's program (no input is a tracer, but the solve is still traced)."""
    with raises_solve_error("NaN or inf", status=Status.NONFINITE_INPUT):
        jax.jit(lambda: diffode.solve(decay, Y0, TS, float("nan")).ys)()
    np.testing.assert_allclose(
        jax.jit(lambda: diffode.solve(decay, Y0, TS, 0.5).ys[-1])(), Y0 * np.exp(-0.5), rtol=1e-6
    )


def test_traced_tolerances_and_integer_args_under_vmap_of_grad():
    """Arrays that are not differentiated (an atol, an integer in args) batched by vmap around a
    reverse-mode gradient: they are inputs of the derivative rules, not values they close over."""

    def loss(a, atol, k):
        sol = diffode.solve(
            lambda t, y, args: -args[0] * y * args[1],
            Y0,
            TS,
            (a, k),
            atol=atol,
            sensitivity=diffode.Direct(),
            rtol=1e-8,
        )
        return sol.ys[-1].sum()

    atols = jnp.array([1e-10, 1e-9])
    ks = jnp.array([1, 2])
    grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))(0.5, atols, ks)
    exact = -ks * Y0.sum() * np.exp(-0.5 * ks)  # d/da sum(y0 exp(-a k))
    np.testing.assert_allclose(grads, exact, rtol=1e-6)
    # grad of a jit whose traced atol the rule would otherwise close over; JAX traces
    # the rule only when it differentiates the jit, after the jit's trace has ended.
    for method in (diffode.Direct(), diffode.ForwardSensitivity(), diffode.InterpolatingAdjoint()):
        jitted = jax.jit(
            lambda a, atol: (
                diffode.solve(decay, Y0, TS, a, atol=atol, rtol=1e-8, sensitivity=method).ys[-1].sum()
            )
        )
        np.testing.assert_allclose(jax.grad(jitted)(0.5, 1e-10), -Y0.sum() * np.exp(-0.5), rtol=1e-6)
