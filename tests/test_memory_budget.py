"""memory_budget: what the reverse pass keeps of the forward solve stays within it, in the
compiled program's planned temporaries, and the gradient does not change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode
from diffode import Auto, Direct, InterpolatingAdjoint
from diffode.sensitivity.direct import Layout, plan

# A forced decay: 135 accepted steps of at most 512, so several segments and levels
# of bisection; n (p + 1) > 1024 with an explicit solver, so Auto takes Direct.
Y0 = jnp.linspace(1.0, 2.0, 600)
TS = jnp.array([0.0, 10.0, 10.5, 30.0])
STATE, MAX_STEPS = Y0.size * 8, 512
TIMES = 2 * MAX_STEPS * 8  # the step times and sizes, always kept
# The solve's working set besides the record (its stages, their derivatives, the
# ys): measured 32 to 45 states, whatever max_steps is.
WORKING_SET = 64 * STATE


def _forced(t, y, k):
    return -k * y + jnp.sin(t) * jnp.linspace(0.0, 1.0, y.shape[0])


def _grad(method, max_steps=MAX_STEPS):
    """The compiled gradient and its planned temporary bytes."""

    def loss(k, ts):
        ys = diffode.solve(
            _forced, Y0, ts, k, sensitivity=method, rtol=1e-8, atol=1e-8, max_steps=max_steps
        ).ys
        return jnp.sum(ys[-1] ** 2) + jnp.sum(ys[1]) + jnp.sum(ys[2] ** 2)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(jnp.array(0.3), TS).compile()
    return compiled(jnp.array(0.3), TS), compiled.memory_analysis().temp_size_in_bytes


def _layout(budget):
    return plan("Direct", None, budget, MAX_STEPS, STATE, 8)


def test_layouts_follow_the_budget():
    assert _layout(None) == _layout(TIMES + (MAX_STEPS + 1) * STATE) == Layout(1, MAX_STEPS)  # every state
    assert _layout(TIMES + 47 * STATE) == Layout(23, 23)  # sqrt(N) checkpoints, buffered segments
    assert _layout(TIMES + 20 * STATE) == Layout(47, 11, 7)  # checkpoints, bisected segments
    assert _layout(TIMES + 5 * STATE) == Layout(MAX_STEPS, 1, 2)  # bisection, stack too shallow


def test_default_record_does_not_grow_with_max_steps():
    # Up to RECORD_STEPS (4096) steps every state; beyond, a window of 4096 steps and
    # one checkpoint per window: from 1e4 to 1e6 steps the states kept grow by one per
    # 4096 steps, and the record's bytes by those and 16 bytes per step for (t, h).
    assert plan("Direct", None, 2**30, 4096, STATE, 8) == Layout(1, 4096)
    layouts = {m: plan("Direct", None, 2**30, m, STATE, 8) for m in (10**4, 10**5, 10**6)}
    assert all(lay.stride == lay.window == 4096 for lay in layouts.values())
    assert [lay.states() for lay in layouts.values()] == [
        3 + 4097 + 4096,
        25 + 4097 + 4096,
        245 + 4097 + 4096,
    ]
    # No budget: every state, as asked.
    assert plan("Direct", None, None, 10**5, STATE, 8) == Layout(1, 10**5)


def _assert_within_budget_and_unchanged(method, want):
    # Planned memory: without a budget it grows with max_steps, not with the steps
    # taken (Direct stores 512 states, 2.6 MB as compiled; InterpolatingAdjoint's dense
    # output is 39 MB); with one, the record stays within it.
    got, temp = _grad(method)
    assert temp < method.memory_budget + WORKING_SET
    # The recomputed steps repeat the recorded ones (the same t, h and arithmetic), and
    # InterpolatingAdjoint's recomputed interpolants are the stored ones: the gradients
    # agree to rounding (measured: at most 2.3e-16 relative).
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12)


def test_direct_within_budget():
    want, _ = _grad(Direct(memory_budget=None))
    _assert_within_budget_and_unchanged(Direct(memory_budget=TIMES + 20 * STATE), want)  # bisected segments


def test_direct_windowed_record():
    # max_steps above RECORD_STEPS and a budget for a window of 71 steps (2 x 71 + 1
    # states) and a checkpoint per window (71): the 135 steps are one segment
    # recomputed from its checkpoint and 64 read from the window; the same gradient.
    max_steps = 5000
    times = 2 * max_steps * 8
    assert plan("Direct", None, times + 216 * STATE, max_steps, STATE, 8) == Layout(71, 71, 0, 71)
    want, _ = _grad(Direct(memory_budget=None))
    got, temp = _grad(Direct(memory_budget=times + 216 * STATE), max_steps)
    assert temp < times + 216 * STATE + WORKING_SET
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12)


def test_planned_memory_does_not_grow_with_max_steps():
    # The compiled reverse pass with the default budget: max_steps 1e4 and 1e5 plan the
    # same window; what grows is (t, h) per step and one state per 4096 steps (1.5 MB
    # here), not the 430 MB that every state of 1e5 steps would take.
    def temp(method, max_steps):
        def loss(k):
            sol = diffode.solve(
                _forced, Y0, TS, k, sensitivity=method, rtol=1e-8, atol=1e-8, max_steps=max_steps
            )
            return jnp.sum(sol.ys[-1] ** 2)

        return jax.jit(jax.grad(loss)).lower(jnp.array(0.3)).compile().memory_analysis().temp_size_in_bytes

    for method in (Direct(), InterpolatingAdjoint()):
        small, large = temp(method, 10**4), temp(method, 10**5)
        assert large - small < 2 * 90_000 * 8 + 22 * STATE + 2**20, (type(method).__name__, small, large)
        assert large < 2 * 4097 * STATE + 2 * 10**5 * 8 + WORKING_SET + 2**20, (type(method).__name__, large)


def test_interpolating_and_auto_within_budget():
    # The same record and run back as Direct's, each step's interpolant recomputed
    # from its start.
    want, _ = _grad(InterpolatingAdjoint(memory_budget=None))
    _assert_within_budget_and_unchanged(InterpolatingAdjoint(memory_budget=TIMES + 20 * STATE), want)
    # Auto passes its budget to Direct (a stack too shallow for the bisection).
    want, _ = _grad(Direct(memory_budget=None))
    _assert_within_budget_and_unchanged(Auto(memory_budget=TIMES + 5 * STATE), want)


class _Opaque(diffode.AbstractSolver):
    """Tsit5's steps behind a solver class that the step replay does not know."""

    inner: diffode.AbstractSolver = diffode.Tsit5()
    order = property(lambda self: self.inner.order)
    embedded = property(lambda self: self.inner.embedded)

    def dense_zeros(self, y0):
        return self.inner.dense_zeros(y0)

    def init(self, f, t0, y0, f0):
        return self.inner.init(f, t0, y0, f0)

    def step(self, f, t0, y0, h, state, tol):
        return self.inner.step(f, t0, y0, h, state, tol)

    def interpolate(self, h, y0, y1, dense, theta):
        return self.inner.interpolate(h, y0, y1, dense, theta)


def _trace_grad(method, solver=None):
    def loss(k):
        return jnp.sum(
            diffode.solve(_forced, Y0, TS, k, sensitivity=method, solver=solver, max_steps=MAX_STEPS).ys
        )

    jax.jit(jax.grad(loss)).lower(jnp.array(0.3))  # the reverse rule is traced when lowered


def test_errors_name_the_option_to_change():
    for cls in (Direct, InterpolatingAdjoint, Auto):
        for bad in (0, -1, 2.5, True):
            with pytest.raises(
                ValueError, match=f"{cls.__name__}: memory_budget must be None or a positive integer"
            ):
                cls(memory_budget=bad)
    # An explicit checkpoint count is kept, not shrunk to fit.
    with pytest.raises(
        ValueError,
        match=r"Direct: checkpoints=64 stores \d+ bytes for max_steps=512 steps of a state "
        r"of 4800 bytes, more than its memory_budget=100000 bytes\. Use fewer checkpoints, "
        r"checkpoints=None \(chosen to fit the budget\) or a larger memory_budget\.",
    ):
        _trace_grad(Direct(checkpoints=64, memory_budget=100_000))
    # Recomputation needs the step times and sizes and three states.
    for method in (Direct(memory_budget=TIMES), InterpolatingAdjoint(memory_budget=TIMES)):
        name = type(method).__name__
        with pytest.raises(
            ValueError,
            match=rf"{name}: the reverse pass needs at least {TIMES + 3 * STATE + 8} bytes "
            r".* Raise memory_budget \(None: no limit\) or lower max_steps\.",
        ):
            _trace_grad(method)
    # A dense output over the budget, from a solver whose steps cannot be replayed.
    with pytest.raises(
        ValueError,
        match=r"InterpolatingAdjoint: the dense output of max_steps=512 steps takes \d+ "
        r"bytes, more than its memory_budget=1000000 bytes, .* _Opaque does not support\. Raise "
        r"memory_budget",
    ):
        _trace_grad(InterpolatingAdjoint(memory_budget=10**6), _Opaque())
