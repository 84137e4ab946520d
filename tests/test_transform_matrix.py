"""Every sensitivity method under every JAX transformation, with every way of passing parameters.

Each cell differentiates a scalar loss of a Lotka-Volterra solve in which every
way of passing a differentiated value appears at once (``lv_loss``: an array and a
Python float in ``args``, a field of the Module that is ``f``, a value ``f`` closes
over, ``y0`` and ``ts``), and of an MLP vector field (as the Module ``f`` and in
``args``), and compares with a reference computed independently of any
sensitivity method:
central finite differences of the primal solve at tight tolerance
(``_fd_gradient``; truncation ~h^2 ~1e-12, rounding ~1e-16/h ~1e-10 relative).
Second derivatives are compared with central differences of the (separately
validated) ``Direct`` gradient. Comparisons are relative, so a gradient of zeros
where the reference is not zero fails.
"""

from __future__ import annotations

import functools
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import diffode

METHODS = {
    "Direct": diffode.Direct(),
    "ForwardSensitivity": diffode.ForwardSensitivity(),
    "BacksolveAdjoint": diffode.BacksolveAdjoint(),
    "InterpolatingAdjoint": diffode.InterpolatingAdjoint(),
    "Auto": None,
}
RTOL = 1e-10  # of the solves being differentiated
TS = np.linspace(0.0, 3.0, 7)
Y0 = np.array([1.0, 0.5])
P = np.array([1.5, 1.0, 3.0, 1.0])
W = np.linspace(0.5, 1.5, 7 * 2).reshape(7, 2)  # loss weights: every save and component counts


def lv(t, y, p):
    a, b, c, d = p[0], p[1], p[2], p[3]
    return jnp.stack([a * y[0] - b * y[0] * y[1], -c * y[1] + d * y[0] * y[1]])


class LVModule(eqx.Module):
    """The vector field as an equinox Module holding the parameter ``c``, closing over ``d``."""

    c: jax.Array
    d: Any

    def __call__(self, t, y, args):
        arr, floats = args
        return lv(t, y, [arr[0], floats["b"], self.c, self.d])


def _loss(ys):
    return jnp.sum(jnp.asarray(W) * ys)


def _solve(f, y0, ts, args, method, rtol=RTOL):
    return diffode.solve(f, y0, ts, args, sensitivity=method, rtol=rtol, atol=rtol).ys


def lv_loss(theta, method, rtol):
    """Every way of passing what is differentiated, in one solve: ``a`` as an array in
    ``args``, ``b`` as a Python float in a dict in ``args``, ``c`` inside the Module that is
    ``f``, ``d`` closed over by ``f``, the initial state, and the first and last save times.
    Each one's derivative is a separate entry of the gradient, checked on its own."""
    d = theta["closure"]

    def f(t, y, args):
        return LVModule(theta["module"], d)(t, y, args)

    ts = jnp.concatenate([theta["ts"][:1], jnp.asarray(TS[1:-1]), theta["ts"][1:]])
    args = (theta["args_array"], {"b": theta["float"]})
    return _loss(_solve(f, theta["y0"], ts, args, method, rtol))


THETA = dict(
    args_array=jnp.asarray(P[:1]),
    float=1.0,
    module=jnp.asarray(P[2]),
    closure=jnp.asarray(P[3]),
    y0=jnp.asarray(Y0),
    ts=jnp.asarray([TS[0], TS[-1]]),
)
STYLES = {"lv": (lv_loss, THETA)}


def _scale(theta, s):
    return jax.tree_util.tree_map(lambda v: v * s, theta)


def _flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


@functools.lru_cache(maxsize=None)
def _fd_gradient(style: str, which: int) -> np.ndarray:
    """Central differences of the primal loss (no sensitivity method involved) at rtol 1e-12."""
    loss, theta0 = STYLES[style]
    theta = theta0 if which == 0 else _scale(theta0, 1.05)
    x0, unravel = ravel_pytree(theta)
    fn = jax.jit(lambda x: loss(unravel(x), diffode.Direct(), 1e-12))
    g = np.zeros(x0.shape[0])
    for i in range(x0.shape[0]):
        h = 1e-6 * max(1.0, abs(float(x0[i])))
        e = np.zeros(x0.shape[0])
        e[i] = h
        g[i] = (float(fn(x0 + e)) - float(fn(x0 - e))) / (2 * h)
    return g


@functools.lru_cache(maxsize=None)
def _fd_hessian(style: str) -> np.ndarray:
    """Central differences of the jitted Direct gradient (validated against ``_fd_gradient``)."""
    loss, theta0 = STYLES[style]
    x0, unravel = ravel_pytree(theta0)
    grad = jax.jit(jax.grad(lambda x: loss(unravel(x), diffode.Direct(), 1e-12)))
    np.testing.assert_allclose(grad(x0), _fd_gradient(style, 0), rtol=1e-6)
    cols = []
    for i in range(x0.shape[0]):
        h = 1e-5 * max(1.0, abs(float(x0[i])))
        e = np.zeros(x0.shape[0])
        e[i] = h
        cols.append((np.asarray(grad(x0 + e)) - np.asarray(grad(x0 - e))) / (2 * h))
    return np.stack(cols, axis=1)


def _close(got, want, rtol, what):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert np.all(np.isfinite(got)), f"{what}: non-finite derivative {got}"
    err = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err < rtol, f"{what}: relative error {err:.2e} (got {got}, want {want})"


def _jitted_first_order(loss):
    """Every first-order transformation inside one jit: name -> gradient (or the derivative along
    ``v``, for names marked ``dir:``). Transformations that give the same program (grad, vjp,
    jacrev, ...) are merged by XLA, so this costs about one compile per distinct derivative."""

    @jax.jit
    def run(theta, v):
        _, lin = jax.linearize(loss, theta)
        return {
            "jit(grad)": jax.grad(loss)(theta),
            "jit(value_and_grad)": jax.value_and_grad(loss)(theta)[1],
            "jit(vjp)": jax.vjp(loss, theta)[1](jnp.ones(()))[0],
            "jit(jacrev)": jax.jacrev(loss)(theta),
            "jit(jacfwd)": jax.jacfwd(loss)(theta),
            "dir:jit(jvp)": jax.jvp(loss, (theta,), (v,))[1],
            "dir:jit(linearize)": lin(v),
        }

    return run


@pytest.mark.parametrize("method", list(METHODS))
def test_first_order(method, style="lv"):
    loss_fn, theta0 = STYLES[style]
    m = METHODS[method]
    loss = lambda th: loss_fn(th, m, RTOL)  # noqa: E731
    ref = _fd_gradient(style, 0)
    x0, unravel = ravel_pytree(theta0)
    v_flat = np.linspace(1.0, 2.0, x0.shape[0])
    v = unravel(jnp.asarray(v_flat, x0.dtype))
    cells = dict(_jitted_first_order(loss)(theta0, v))
    # Eagerly (op by op), and a gradient of a jitted loss.
    cells["grad"] = jax.grad(loss)(theta0)
    cells["dir:jvp"] = jax.jvp(loss, (theta0,), (v,))[1]
    cells["dir:linearize"] = jax.linearize(loss, theta0)[1](v)
    cells["grad(jit)"] = jax.grad(jax.jit(loss))(theta0)
    for name, got in cells.items():
        if name.startswith("dir:"):
            _close(got, ref @ v_flat, 1e-6, f"{method}/{name}")
        else:
            _close(_flat(got), ref, 1e-6, f"{method}/{name}")


@pytest.mark.parametrize("method", list(METHODS))
def test_batched(method, style="lv"):
    """vmap(grad) and jit(vmap(grad)) over two parameter sets: each member gets its own gradient."""
    loss_fn, theta0 = STYLES[style]
    m = METHODS[method]
    loss = lambda th: loss_fn(th, m, RTOL)  # noqa: E731
    thetas = jax.tree_util.tree_map(lambda v: jnp.stack([jnp.asarray(v), jnp.asarray(v) * 1.05]), theta0)
    for name, fn in {
        "vmap(jit(grad))": jax.vmap(jax.jit(jax.grad(loss))),
        "jit(vmap(grad))": jax.jit(jax.vmap(jax.grad(loss))),
    }.items():
        got = fn(thetas)
        for b in range(2):
            member = jax.tree_util.tree_map(lambda v: v[b], got)
            _close(_flat(member), _fd_gradient(style, b), 1e-6, f"{method}/{style}/{name}[{b}]")


@pytest.mark.parametrize("method", list(METHODS))
def test_hessian(method, style="lv"):
    """``jax.hessian`` (forward over reverse) against differences of the validated gradient."""
    loss_fn, theta0 = STYLES[style]
    m = METHODS[method]
    ref = _fd_hessian(style)
    x0, unravel = ravel_pytree(theta0)
    loss = lambda x: loss_fn(unravel(x), m, RTOL)  # noqa: E731

    # Forward over reverse with every parameter-passing style; the other three
    # nestings of forward and reverse mode are checked for every method by
    # tests/test_second_order.py (jax.test_util.check_grads, order 2).
    _close(jax.jit(jax.hessian(loss))(x0), ref, 1e-4, f"{method}/hessian")


# --------------------------------------------------------------------------
# A small neural vector field: the module itself, and its parameters in args.
# --------------------------------------------------------------------------


def _mlp():
    return eqx.nn.MLP(2, 2, 8, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))


class Field(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(y)


def _mlp_loss(field, args, m, rtol):
    ys = _solve(field, jnp.asarray(Y0), TS[:4], args, m, rtol)
    return jnp.sum(jnp.asarray(W[:4]) * ys)


@functools.lru_cache(maxsize=None)
def _mlp_fd():
    params, static = eqx.partition(Field(_mlp()), eqx.is_inexact_array)
    x0, unravel = ravel_pytree(params)
    fn = jax.jit(lambda x: _mlp_loss(eqx.combine(unravel(x), static), None, diffode.Direct(), 1e-12))
    g = np.zeros(x0.shape[0])
    for i in range(x0.shape[0]):
        e = np.zeros(x0.shape[0])
        e[i] = 1e-6
        g[i] = (float(fn(x0 + e)) - float(fn(x0 - e))) / 2e-6
    return g


@pytest.mark.parametrize("method", list(METHODS))
def test_mlp_field(method):
    """An equinox MLP as the vector field (the diffrax ``ODETerm(model)`` idiom), differentiated
    with ``eqx.filter_grad`` (eagerly) and forward mode under ``eqx.filter_jit``."""
    m = METHODS[method]
    field = Field(_mlp())
    ref = _mlp_fd()
    loss = lambda fld: _mlp_loss(fld, None, m, RTOL)  # noqa: E731
    params, static = eqx.partition(field, eqx.is_inexact_array)
    g = eqx.filter_grad(loss)(field)
    _close(_flat(eqx.filter(g, eqx.is_inexact_array)), ref, 1e-6, f"{method}/filter_grad")
    d = eqx.filter_jit(lambda p: jax.jvp(lambda p: loss(eqx.combine(p, static)), (p,), (p,))[1])(params)
    _close(d, ref @ _flat(params), 1e-6, f"{method}/filter_jit(jvp)")


_X64_OFF_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
import diffode
assert not jax.config.jax_enable_x64

def f(t, y, p):
    return jnp.stack([p["a"] * y[0] - p["b"] * y[0] * y[1], -p["c"] * y[1] + p["d"] * y[0] * y[1]])

def loss(p, m):
    ys = diffode.solve(f, jnp.array([1.0, 0.5]), jnp.linspace(0.0, 1.0, 5), p, sensitivity=m, rtol=1e-6, atol=1e-6).ys
    return jnp.sum(ys)

p = dict(a=1.5, b=1.0, c=3.0, d=1.0)
# float64 finite differences of a float32-free reference: numpy RK4 with 20000 steps.
def ref_loss(q):
    def rhs(y):
        return np.array([q["a"] * y[0] - q["b"] * y[0] * y[1], -q["c"] * y[1] + q["d"] * y[0] * y[1]])
    y, out, h = np.array([1.0, 0.5]), np.array([1.0, 0.5]).sum(), 1e-4
    for k in range(1, 10001):
        k1 = rhs(y); k2 = rhs(y + h / 2 * k1); k3 = rhs(y + h / 2 * k2); k4 = rhs(y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if k % 2500 == 0:
            out += y.sum()
    return out
ref = {k: (ref_loss({**p, k: p[k] + 1e-5}) - ref_loss({**p, k: p[k] - 1e-5})) / 2e-5 for k in p}
for m in [diffode.Direct(), diffode.ForwardSensitivity(), diffode.BacksolveAdjoint(), diffode.InterpolatingAdjoint(), None]:
    for g in (jax.jit(jax.grad(loss), static_argnums=1)(p, m),):
        for k in p:
            assert g[k].dtype == jnp.float32, g[k].dtype
            err = abs(float(g[k]) - ref[k]) / abs(ref[k])
            assert err < 1e-3, (type(m).__name__, k, float(g[k]), ref[k])
print("ok")
"""


def test_python_float_parameters_with_x64_off():
    """Python-float parameters in float32 (x64 off, in a clean process): every method's gradient
    is float32 and within 1e-3 of a float64 reference (solves at rtol 1e-6 in float32)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    out = subprocess.run(
        [sys.executable, "-c", _X64_OFF_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# --------------------------------------------------------------------------
# jac= and steady_state take parameters the same ways.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["Direct", "ForwardSensitivity", "InterpolatingAdjoint"])
def test_user_jacobian_closing_over_a_parameter(method):
    """A Rosenbrock solver uses ``jac`` in its step formula, so the discrete solution depends on
    what ``jac`` closes over. Decay ``y' = -k y``: ``y(1) = exp(-k)``."""
    m = METHODS[method]

    def y1(k):
        sol = diffode.solve(
            lambda t, y, _: -k * y,
            jnp.array([1.0]),
            jnp.array([0.0, 1.0]),
            solver=diffode.Rodas5P(),
            jac=lambda t, y, _: -k * jnp.eye(1),
            sensitivity=m,
            rtol=1e-10,
            atol=1e-10,
        )
        return sol.ys[-1, 0]

    k = 0.7
    np.testing.assert_allclose(jax.jit(jax.grad(y1))(k), -np.exp(-k), rtol=1e-7)
    np.testing.assert_allclose(jax.jvp(y1, (k,), (1.0,))[1], -np.exp(-k), rtol=1e-7)


class Relax(eqx.Module):
    """``y' = b - a y``: steady state ``b / a``."""

    a: jax.Array

    def __call__(self, t, y, args):
        return args["b"] - self.a * y


def test_steady_state_with_a_module_a_closure_and_python_floats():
    def ystar(a, b, c):
        f = Relax(a)
        sol = diffode.steady_state(lambda t, y, args: f(t, y, args) + c, jnp.array([1.0]), {"b": b})
        return sol.y[0]

    a, b, c = jnp.asarray(2.0), 3.0, 0.5  # y* = (b + c) / a
    g = jax.jit(jax.grad(ystar, argnums=(0, 1, 2)))(a, b, c)
    np.testing.assert_allclose(g, [-(b + c) / a**2, 1 / a, 1 / a], rtol=1e-10)
    np.testing.assert_allclose(jax.grad(ystar, argnums=1)(a, b, c), 1 / a, rtol=1e-10)
