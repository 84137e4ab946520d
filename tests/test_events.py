"""Terminal events (``solve(..., events=diffode.Event(cond_fn))``).

Reference: a ball dropped from height ``h`` under gravity ``g`` (``y = [x, v]``,
``x' = v``, ``v' = -g``) first hits the ground (``x = 0``, falling) at
``t* = sqrt(2 h / g)`` with velocity ``v* = -sqrt(2 g h)``; their derivatives with
respect to ``h`` and ``g`` are those of the closed forms. The solution is a
quadratic, which Tsit5 integrates exactly, so the event is located to rounding
(measured 5e-15) and the derivatives match to 1e-10.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode

TS = jnp.linspace(0.0, 2.0, 11)
H, G = 3.0, 9.81


def fall(t, y, g):
    return jnp.stack([y[1], -g * jnp.ones_like(y[1])])


GROUND = diffode.Event(lambda t, y, g: y[0], direction=-1)


def drop(h, g, method=None, **kw):
    y0 = jnp.stack([jnp.asarray(h), jnp.zeros_like(jnp.asarray(h))])
    return diffode.solve(fall, y0, TS, g, events=GROUND, sensitivity=method, rtol=1e-10, atol=1e-12, **kw)


def exact(h, g):
    return jnp.sqrt(2 * h / g), -jnp.sqrt(2 * g * h)


def test_stops_at_the_ground():
    """The event time, state and index; saves after the event are NaN, those before exact."""
    sol = drop(H, G)
    t_star, v_star = exact(H, G)
    assert abs(float(sol.event_t) - float(t_star)) < 1e-12
    np.testing.assert_allclose(np.asarray(sol.event_y), [0.0, float(v_star)], atol=1e-11)
    assert int(sol.event_index) == 0
    before = np.asarray(TS) <= float(t_star)
    assert np.all(np.isnan(np.asarray(sol.ys)[~before]))
    np.testing.assert_allclose(
        np.asarray(sol.ys)[before, 0], H - G * np.asarray(TS)[before] ** 2 / 2, atol=1e-11
    )


@pytest.mark.parametrize(
    "method", [diffode.Direct(), diffode.ForwardSensitivity()], ids=lambda m: type(m).__name__
)
def test_event_time_and_state_gradients(method):
    """jit(jacrev) of the event time and velocity with respect to h and g (g a Python
    float in args) against the closed forms; forward mode (jax.jacfwd) agrees. (Auto picks
    ForwardSensitivity here; the vmap test below runs it.)"""

    def event(h, g):
        sol = drop(h, g, method)
        return jnp.stack([sol.event_t, sol.event_y[1]])

    ref = jax.jacrev(lambda h, g: jnp.stack(exact(h, g)), argnums=(0, 1))(H, G)
    got = jax.jit(jax.jacrev(event, argnums=(0, 1)))(H, G)
    np.testing.assert_allclose(np.stack(got), np.stack(ref), rtol=1e-10)
    fwd = jax.jacfwd(lambda h: drop(h, G, method).event_t)(H)
    np.testing.assert_allclose(fwd, ref[0][0], rtol=1e-10)


def test_vmap_closure_module_and_linearize():
    """A batch of heights under jit(vmap(grad)); a condition that closes over a traced
    ground level, and an equinox Module vector field; jax.linearize of the event time."""

    class Fall(eqx.Module):
        g: jax.Array

        def __call__(self, t, y, args):
            return jnp.stack([y[1], -self.g])

    hs = jnp.array([1.0, 3.0, 5.0])
    batched = jax.jit(jax.vmap(jax.grad(lambda h: drop(h, G).event_t)))(hs)
    np.testing.assert_allclose(batched, jax.vmap(jax.grad(lambda h: exact(h, G)[0]))(hs), rtol=1e-10)

    def hit(level, g):
        ev = diffode.Event(lambda t, y, args: y[0] - level, direction=-1)
        return diffode.solve(Fall(g), jnp.array([H, 0.0]), TS, events=ev, rtol=1e-10, atol=1e-12).event_t

    level = 0.5
    ref = jax.grad(lambda lv, g: jnp.sqrt(2 * (H - lv) / g), argnums=(0, 1))(level, jnp.asarray(G))
    np.testing.assert_allclose(jax.jit(jax.grad(hit, argnums=(0, 1)))(level, jnp.asarray(G)), ref, rtol=1e-10)
    _, lin = jax.linearize(lambda h: drop(h, G).event_t, H)
    np.testing.assert_allclose(lin(1.0), jax.grad(lambda h: exact(h, G)[0])(H), rtol=1e-10)


def test_first_of_several_events_direction_and_none():
    """The earliest of several events wins and reports its index; a rising-only event
    does not fire on a falling crossing; with no event NaN, NaN and -1, and ys as without
    events."""
    ceiling = diffode.Event(lambda t, y, g: y[0] - 2.5, direction=-1)  # falls through 2.5 first
    rising = diffode.Event(lambda t, y, g: y[0], direction=+1)
    sol = diffode.solve(fall, jnp.array([H, 0.0]), TS, G, events=[GROUND, ceiling], rtol=1e-10, atol=1e-12)
    assert int(sol.event_index) == 1
    assert abs(float(sol.event_t) - np.sqrt(2 * 0.5 / G)) < 1e-12
    none = diffode.solve(fall, jnp.array([H, 0.0]), TS, G, events=rising, rtol=1e-10, atol=1e-12)
    plain = diffode.solve(fall, jnp.array([H, 0.0]), TS, G, rtol=1e-10, atol=1e-12)
    assert np.isnan(float(none.event_t)) and np.all(np.isnan(np.asarray(none.event_y)))
    assert int(none.event_index) == -1
    np.testing.assert_allclose(np.asarray(none.ys), np.asarray(plain.ys), rtol=1e-12)


def test_float32_and_stiff_solver():
    """float32 (x64 off inside the solve's inputs) and an implicit solver find the same event."""
    sol = diffode.solve(
        fall,
        jnp.array([H, 0.0], jnp.float32),
        TS.astype(jnp.float32),
        jnp.float32(G),
        events=GROUND,
        rtol=1e-6,
        atol=1e-6,
    )
    assert sol.event_t.dtype == jnp.float32
    assert abs(float(sol.event_t) - np.sqrt(2 * H / G)) < 1e-5
    stiff = diffode.solve(
        fall, jnp.array([H, 0.0]), TS, G, events=GROUND, solver=diffode.Rodas5P(), rtol=1e-10, atol=1e-12
    )
    assert abs(float(stiff.event_t) - np.sqrt(2 * H / G)) < 1e-10


def test_unsupported_raise_clearly():
    with pytest.raises(NotImplementedError, match="backward solve starts at ts"):
        drop(H, G, diffode.InterpolatingAdjoint())
    with pytest.raises(TypeError, match="events must be"):
        diffode.solve(fall, jnp.array([H, 0.0]), TS, G, events="ground")
    with pytest.raises(ValueError, match="direction"):
        diffode.Event(lambda t, y, a: y[0], direction=2)


def test_failure_raises_when_only_the_event_time_is_used():
    """Under jit a program that reads only sol.event_t still raises on a failed solve."""
    with pytest.raises(Exception, match="max_steps"):
        jax.jit(lambda h: drop(h, G, max_steps=2).event_t)(H)
        jax.effects_barrier()
