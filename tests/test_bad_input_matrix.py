"""Bad input crossed with the transformations users wrap a solve in.

Every failure is provoked through run-time values, so one compiled program per
solver family (or per sensitivity method) serves every failure kind. A batch
holds a healthy member beside each failing one, and the checks are the
library's promise (docs/errors.md):

* ``throw=False``: the failing member's status is its code, its value and its
  derivatives (reverse and forward) are NaN, and the healthy member's value and
  gradient are exact, against the closed-form solution.
* ``throw=True``: eager, ``jit``, ``grad``, ``jit(grad)`` and ``jit(vmap(grad))``
  raise an error whose message is the status's.

Input that is wrong at trace time (shapes, dtypes, options) raises a
``ValueError`` or ``TypeError`` that names it, before anything runs.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode
from diffode import Status
from tests.test_errors import raises_solve_error

jax.config.update("jax_enable_x64", True)

T1 = 1.0
TS = jnp.array([0.0, 0.5, T1])
Y0 = jnp.array([1.0, -0.5])
P = 0.7  # the differentiated parameter
MAX_STEPS = 4096  # a blow-up needs 500-2000 steps to underflow; w = 1e5 needs far more


def rhs(t, y, args):
    """``y' = -p y + cos(w t) + q y^2``, NaN after ``t_nan`` (healthy: ``q = 0``, ``t_nan`` past the end)."""
    p, k = args
    poison = jnp.where(t > k["t_nan"], jnp.nan, 1.0)
    return -p * y + jnp.cos(k["w"] * t) * poison + k["q"] * y**2


def exact_final(p, w=1.0):
    """``y(T1)`` for ``q = 0`` in closed form; the sum of its components is the loss."""
    decay = jnp.exp(-p * T1)
    forced = (p * jnp.cos(w * T1) + w * jnp.sin(w * T1) - p * decay) / (p**2 + w**2)
    return jnp.sum(Y0 * decay + forced)


HEALTHY = dict(y0_scale=1.0, w=1.0, t_nan=2 * T1, q=0.0, atol=1e-10, ts=TS)

#: Each failure kind: what changes at run time, and the statuses it may end in
#: (a blow-up ends in underflow for explicit steps; an implicit solver's Newton
#: iteration or its linear algebra may give up first).
FAILURES = {
    "nan_y0": (dict(y0_scale=jnp.nan), {Status.NONFINITE_INPUT}),
    "nan_args": (dict(w=jnp.nan), {Status.NONFINITE_INPUT}),
    "nan_rhs": (dict(t_nan=0.5), {Status.NONFINITE_RHS}),
    "max_steps": (dict(w=1e5), {Status.MAX_STEPS_REACHED}),
    "ts_not_monotonic": (dict(ts=jnp.array([0.0, T1, 0.5])), {Status.TS_NOT_MONOTONIC}),
    "bad_tolerance": (dict(atol=-1.0), {Status.BAD_TOLERANCE}),
    "blow_up": (dict(q=50.0), {Status.DT_UNDERFLOW, Status.NEWTON_FAILED, Status.NONFINITE_RHS}),
}


def knobs(**change):
    return {k: jnp.asarray(v, jnp.float64) for k, v in {**HEALTHY, **change}.items()}


def stacked(names):
    """The healthy knobs first, then one failing member per name."""
    members = [knobs()] + [knobs(**FAILURES[name][0]) for name in names]
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *members)


def make_loss(solver, sensitivity, throw):
    def loss(p, k):
        args = (p, dict(t_nan=k["t_nan"], w=k["w"], q=k["q"]))
        sol = diffode.solve(
            rhs,
            Y0 * k["y0_scale"],
            k["ts"],
            args,
            solver=solver,
            sensitivity=sensitivity,
            rtol=1e-8,
            atol=k["atol"],
            max_steps=MAX_STEPS,
            throw=throw,
        )
        return jnp.sum(sol.ys[-1]), sol.status

    return loss


SOLVERS = {
    "explicit": diffode.Tsit5(),
    "sdirk": diffode.Kvaerno5(),
    "sdirk_gmres": diffode.Kvaerno5(linear_solver=diffode.GMRES()),
    "rosenbrock": diffode.Rodas5P(),
    "radau": diffode.Radau5(),
}

METHODS = {
    "auto": diffode.Auto(),
    "direct": diffode.Direct(),
    "forward": diffode.ForwardSensitivity(),
    "interpolating": diffode.InterpolatingAdjoint(),
    "backsolve": diffode.BacksolveAdjoint(),
}

#: Derivatives: every method with explicit steps, every implicit family with the
#: default method (Auto: forward sensitivities here), and Direct's replay of
#: implicit steps once (the failure handling is the method's, shared by all
#: solvers; the test budget does not allow the whole cross).
DERIVATIVE_CASES = [("explicit", m) for m in METHODS] + [
    ("sdirk", "auto"),
    ("sdirk", "direct"),
    ("rosenbrock", "auto"),
    ("radau", "auto"),
]

# The closed-form loss and gradient of the healthy member. The solves run at
# rtol 1e-8, atol 1e-10 on an O(1) solution: 1e-6 bounds the global error of
# the values and of every method's gradient with room to spare.
EXACT = exact_final(P)
EXACT_GRAD = jax.grad(exact_final)(P)
TOL = 1e-6


def check_batch(values, statuses, names, grads=None, tangents=None):
    """Healthy member 0 exact; member i + 1 failed as ``names[i]`` says, with NaN everywhere."""
    np.testing.assert_allclose(values[0], EXACT, rtol=TOL, atol=TOL)
    assert statuses[0] == Status.SUCCESS
    for derivative in (grads, tangents):
        if derivative is not None:
            np.testing.assert_allclose(derivative[0], EXACT_GRAD, rtol=TOL, atol=TOL)
    for i, name in enumerate(names, start=1):
        assert int(statuses[i]) in FAILURES[name][1], (name, int(statuses[i]))
        assert np.isnan(values[i]), name
        for derivative in (grads, tangents):
            if derivative is not None:
                assert np.isnan(derivative[i]), name


@pytest.mark.parametrize("family", SOLVERS)
def test_status_and_nan_under_jit_vmap(family):
    """Forward solves of every solver family, batched: each failure its status and NaN."""
    loss = make_loss(SOLVERS[family], None, throw=False)
    names = list(FAILURES)
    values, statuses = jax.jit(jax.vmap(loss, in_axes=(None, 0)))(P, stacked(names))
    check_batch(values, statuses, names)


def message_of(codes) -> str:
    """A pattern matching exactly the messages of ``codes``."""
    return "^(" + "|".join(re.escape(diffode.MESSAGES[c]) for c in codes) + ")$"


@pytest.mark.parametrize("family", SOLVERS)
def test_throw_eager_and_under_jit(family):
    """throw=True raises the status's message, eagerly and under jit; healthy input runs."""
    loss = make_loss(SOLVERS[family], None, throw=True)
    jitted = jax.jit(loss)
    np.testing.assert_allclose(jitted(P, knobs())[0], EXACT, rtol=TOL)
    for name, (change, codes) in FAILURES.items():
        for call in (jitted, loss):
            with raises_solve_error(message_of(codes)):
                call(P, knobs(**change))


@pytest.mark.parametrize("family,method", DERIVATIVE_CASES)
def test_derivatives_nan_for_failed_members_exact_for_healthy(family, method):
    """throw=False under jit(vmap(value_and_grad)) and jit(vmap(jvp)): NaN where failed, exact where healthy."""
    loss = make_loss(SOLVERS[family], METHODS[method], throw=False)
    names = list(FAILURES)

    def both(k):
        (value, status), grad = jax.value_and_grad(loss, has_aux=True)(P, k)
        _, tangent = jax.jvp(lambda p: loss(p, k)[0], (P,), (1.0,))
        return value, status, grad, tangent

    values, statuses, grads, tangents = jax.jit(jax.vmap(both))(stacked(names))
    check_batch(values, statuses, names, grads, tangents)


@pytest.mark.parametrize("family,method", DERIVATIVE_CASES)
def test_derivatives_raise_with_throw(family, method):
    """throw=True: jit(grad) raises for every failure kind; jit(vmap(grad)) raises when one
    member fails and is exact when none does."""
    loss = make_loss(SOLVERS[family], METHODS[method], throw=True)
    grad = jax.jit(jax.grad(lambda p, k: loss(p, k)[0]))
    batched = jax.jit(jax.vmap(jax.grad(lambda p, k: loss(p, k)[0]), in_axes=(None, 0)))
    np.testing.assert_allclose(grad(P, knobs()), EXACT_GRAD, rtol=TOL, atol=TOL)
    for name, (change, codes) in FAILURES.items():
        with raises_solve_error(message_of(codes)):
            grad(P, knobs(**change))
    healthy_pair = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), knobs())
    np.testing.assert_allclose(batched(P, healthy_pair), EXACT_GRAD, rtol=TOL, atol=TOL)
    with raises_solve_error(message_of(FAILURES["nan_rhs"][1])):
        batched(P, stacked(["nan_rhs"]))


def test_eager_grad_and_linearize_raise_with_throw():
    """Without jit: grad and jax.linearize of a failed solve raise; a Python float parameter."""
    loss = make_loss(diffode.Tsit5(), None, throw=True)
    bad = knobs(t_nan=0.5)
    with raises_solve_error("NaN or inf", status=Status.NONFINITE_RHS):
        jax.grad(lambda p: loss(p, bad)[0])(P)
    with raises_solve_error("NaN or inf", status=Status.NONFINITE_RHS):
        jax.linearize(lambda p: loss(p, bad)[0], P)


# --- Input that is wrong at trace time: a clear error before anything runs ----------


def decay(t, y, args):
    return -args * y


TRACE_TIME = {
    "complex_f": (dict(f=lambda t, y, a: -a * y * (1 + 1j)), ValueError, "complex"),
    "atol_wrong_shape": (dict(atol=jnp.array([1e-8, 1e-8, 1e-8])), ValueError, r"atol has shape \(3,\)"),
    "atol_wrong_structure": (dict(atol={"a": 1e-8}), ValueError, "atol must be a scalar, or match y0"),
    "rtol_wrong_shape": (dict(rtol=jnp.ones((2, 2))), ValueError, "rtol has shape"),
    "max_steps_too_large": (dict(max_steps=2**31), ValueError, r"max_steps must lie in \[1, 2\*\*31 - 2\]"),
    "max_steps_float": (dict(max_steps=100.0), ValueError, "max_steps must be an integer"),
    "max_steps_bool": (dict(max_steps=True), ValueError, "max_steps must be an integer"),
    "max_steps_zero": (dict(max_steps=0), ValueError, "max_steps must lie in"),
    "ts_2d": (dict(ts=jnp.ones((2, 2))), ValueError, "ts must be a non-empty 1-D array"),
    "int_y0": (dict(y0=jnp.array([1, 2])), TypeError, "real floating-point"),
    "f_wrong_shape": (dict(f=lambda t, y, a: jnp.zeros(3)), ValueError, "shape"),
    "bad_solver": (dict(solver="tsit5"), TypeError, "solver must be a diffode solver"),
    "bad_sensitivity": (dict(sensitivity="adjoint"), TypeError, "sensitivity must be"),
}


@pytest.mark.parametrize("case", TRACE_TIME)
@pytest.mark.parametrize("jit", [False, True])
def test_trace_time_errors(case, jit):
    change, error, match = TRACE_TIME[case]
    call = dict(f=decay, y0=jnp.array([1.0, 2.0]), ts=jnp.array([0.0, 1.0]), args=0.5) | change

    def run(args):
        return diffode.solve(
            call.pop("f"),
            call.pop("y0"),
            call.pop("ts"),
            args,
            **{k: v for k, v in call.items() if k != "args"},
        )

    with pytest.raises(error, match=match):
        (jax.jit(run) if jit else run)(call["args"])


def test_max_steps_accepts_any_integer():
    """NumPy integers are integers (eagerly, where they would otherwise become arrays)."""
    want = diffode.solve(decay, Y0, TS, 0.5, max_steps=100).ys
    for max_steps in (np.int64(100), np.int32(100), np.uint16(100)):
        np.testing.assert_array_equal(diffode.solve(decay, Y0, TS, 0.5, max_steps=max_steps).ys, want)
