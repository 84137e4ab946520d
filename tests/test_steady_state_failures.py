"""A failed steady state never gives a derivative that looks like one.

With throw=True every transformation of a loss on a failed steady state raises
the failure's message (eager, jit, grad, jacrev, jvp, vmap and their nestings,
also when the loss uses only the derivative); with throw=False the failed
member's value and derivatives are NaN (its status says why) and the other
members are exact.

The problem is y' = a - y^2 from y0 = 2, with at most 5 Newton iterations:
y* = sqrt(a), dy*/da = 1 / (2 sqrt(a)), d2y*/da2 = -1 / (4 a^1.5). Its
right-hand side is NaN for a > 50 (0 * log(50 - a)), so the batch below holds
one healthy value and one of each failure: no root (a = -1), NaN input, NaN
right-hand side (a = 100), too slow for max_steps (a = 49: 6 iterations). The
healthy roots are solved to |f| <= 1.8e-12 with |df/dy| = 2 sqrt(a) >= 3, so
y* is accurate to 1e-12 and its derivatives, which the implicit function
theorem gives from y* by an exact (LU) solve, to a few 1e-12: hence rtol 1e-10.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode
from diffode import SteadyStateStatus as S
from tests.test_errors import SOLVE_ERRORS, own_message

A = jnp.array([2.25, -1.0, jnp.nan, 100.0, 49.0, 6.25])
STATUS = [S.SUCCESS, S.MAX_STEPS_REACHED, S.NONFINITE_INPUT, S.NONFINITE_RHS, S.MAX_STEPS_REACHED, S.SUCCESS]
OK = np.array([s == S.SUCCESS for s in STATUS])
RTOL = 1e-10
ERRORS = SOLVE_ERRORS


def f(t, y, a):
    return a - y**2 + 0 * jnp.log(50 - a)


def solve(f, args=None, t=0.0, throw=True):
    return diffode.steady_state(f, jnp.array(2.0), args, t=t, max_steps=5, throw=throw)


# The same y*(a), with a reaching f as args, through a closure, as the fixed
# time t, and as a closed-over factor of a Python-float args.
def by_args(a, throw):
    return solve(f, a, throw=throw).y


def by_closure(a, throw):
    return solve(lambda t, y, _: f(t, y, a), throw=throw).y


def by_time(a, throw):
    return solve(lambda t, y, _: f(t, y, t), t=a, throw=throw).y


def by_python_float(a, throw):
    return solve(lambda t, y, c: f(t, y, c * a), 1.0, throw=throw).y


LOSSES = (by_args, by_closure, by_time, by_python_float)


def exact(a):
    """y*, dy*/da and d2y*/da2 per member; NaN where the steady state fails."""
    a = np.where(OK, np.asarray(a), np.nan)
    return np.sqrt(a), 0.5 / np.sqrt(a), -0.25 * a**-1.5


def check(got, want):
    got = np.asarray(got)
    assert np.array_equal(np.isnan(got), np.isnan(want)), (got, want)
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_throw_false_failed_members_are_nan_and_healthy_ones_exact():
    @jax.jit
    def batched(a):  # one compilation for every loss and transformation
        sol = jax.vmap(lambda a: solve(f, a, throw=False))(a)
        values, grads = zip(
            *(jax.vmap(jax.value_and_grad(functools.partial(loss, throw=False)))(a) for loss in LOSSES)
        )
        jacfwd = jax.vmap(jax.jacfwd(functools.partial(by_closure, throw=False)))(a)
        hessian = jax.vmap(jax.hessian(functools.partial(by_args, throw=False)))(a)
        return sol, values, grads, jacfwd, hessian

    sol, values, grads, jacfwd, hessian = batched(A)
    np.testing.assert_array_equal(sol.status, STATUS)
    y, dy, d2y = exact(A)
    check(sol.y, y)  # NaN where failed
    assert np.all(np.isnan(np.asarray(sol.y)[~OK]))
    for value, grad in zip(values, grads):
        check(value, y)
        check(grad, dy)
    check(jacfwd, dy)
    check(hessian, d2y)

    # Eager grad (slow: one member) and jit(grad) give the same, also for a Python float.
    loss = functools.partial(by_args, throw=False)
    check(jax.grad(loss)(A[3]), dy[3])
    jit_grad = jax.jit(jax.grad(loss))
    for i, a in enumerate(A.tolist()):
        check(jit_grad(a), dy[i])


def eager_jvp(loss):
    return lambda a: jax.jvp(loss, (a,), (jnp.ones_like(a),))[1]


def jit_grad(loss):
    return jax.jit(jax.grad(loss))


def jit_jacrev(loss):
    return jax.jit(jax.jacrev(loss))


def jit_jvp(loss):
    return jax.jit(eager_jvp(loss))


def jit_vmap_grad(loss):
    """The derivative at a batch of the healthy A[0] and a."""
    grad = jax.jit(jax.vmap(jax.grad(loss)))
    return lambda a: grad(jnp.stack([A[0], a]))


def jit_grad_of_vmap(loss):
    grad = jax.jit(jax.grad(lambda a: jnp.sum(jax.vmap(loss)(a))))
    return lambda a: grad(jnp.stack([A[0], a]))


def jit_hessian(loss):
    return jax.jit(jax.hessian(loss))


ALL = range(1, len(A) - 1)  # every failure


@pytest.mark.parametrize(
    "transform, loss, order, failures",
    [
        (jax.grad, by_args, 1, [3]),  # eager runs are slow: one failure each
        (eager_jvp, by_time, 1, [1]),
        (jit_grad, by_args, 1, ALL),
        (jit_grad, by_python_float, 1, ALL),
        (jit_jacrev, by_closure, 1, ALL),
        (jit_jvp, by_time, 1, ALL),
        (jit_vmap_grad, by_args, 1, ALL),
        (jit_grad_of_vmap, by_closure, 1, ALL),
        (jit_hessian, by_args, 2, ALL),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_throw_true_derivative_of_a_failure_raises(transform, loss, order, failures):
    """The loss is y* itself, so only the derivative depends on the failure check."""
    d = transform(functools.partial(loss, throw=True))
    np.testing.assert_allclose(d(A[0]), exact(A)[order][0], rtol=RTOL)
    for i in failures:
        with pytest.raises(ERRORS) as info:
            jax.block_until_ready(d(A[i]))
        assert own_message(info.value) == diffode.STEADY_STATE_MESSAGES[STATUS[i]], A[i]


def test_rhs_structure_mismatch_has_nan_derivatives():
    """Found at trace time; with throw=False y is NaN, and so are its derivatives."""

    def y_star(a, t):
        return diffode.steady_state(lambda t, y, a: a * t * y[:1], jnp.zeros(2), a, t=t, throw=False).y

    assert np.all(np.isnan(jax.jacfwd(y_star, argnums=(0, 1))(2.0, 1.0)))
    assert np.all(np.isnan(jax.grad(lambda a, t: y_star(a, t)[0], argnums=(0, 1))(2.0, 1.0)))
