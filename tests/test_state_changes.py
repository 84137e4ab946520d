"""Events that change the state: doses at given times and a bouncing ball.

References (closed forms, differentiated by JAX for the gradient references):
- Oral dosing, two compartments (gut ``A``, central ``C``; ``A' = -ka A``,
  ``C' = ka A - ke C``): a dose ``D`` into the gut at ``tau`` adds
  ``A = D e^{-ka (t - tau)}`` and ``C = D ka / (ka - ke) (e^{-ke (t - tau)} - e^{-ka (t - tau)})``
  for ``t >= tau`` (the Bateman function); doses superpose. A save at a dose time shows
  the state just after the dose.
- A ball dropped from ``h`` (``x' = v``, ``v' = -g``) bouncing with restitution ``e``
  (``v <- -e v`` at ``x = 0``): the first impact at ``sqrt(2 h / g)`` with speed
  ``sqrt(2 g h)``, then flights of ``2 v_k / g`` with ``v_k = e^k sqrt(2 g h)``. Tsit5
  integrates the quadratics exactly, so values and gradients match to rounding of the
  located impact times (measured 1e-13 and 1e-11).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode

TS = jnp.linspace(0.0, 6.0, 25)  # 0.25 apart: the doses at 0, 1.5 and 3 fall on save times
DOSES = jnp.array([3.0, 0.0, 1.5])  # any order
KA, KE, D = 1.3, 0.4, 10.0


def pk(t, y, args):
    ka, ke = args
    return {"gut": -ka * y["gut"], "central": ka * y["gut"] - ke * y["central"]}


def dosed(ka, ke, dose, times, ts, method=None):
    ev = diffode.Event(times=times, terminal=False, apply=lambda t, y, args: {**y, "gut": y["gut"] + dose})
    zero = jnp.zeros((), jnp.result_type(dose))
    y0 = {"gut": zero, "central": zero}
    tol = 1e-10 if zero.dtype == jnp.float64 else 1e-6
    sol = diffode.solve(pk, y0, ts, (ka, ke), events=ev, sensitivity=method, rtol=tol, atol=tol / 100)
    return sol.ys["central"]


def bateman(ka, ke, dose, times, ts):
    s = ts[:, None] - times[None, :]
    one = dose * ka / (ka - ke) * (jnp.exp(-ke * s) - jnp.exp(-ka * s))
    return jnp.sum(jnp.where(s >= 0, one, 0.0), axis=1)


METHODS = [
    diffode.Direct(),
    diffode.ForwardSensitivity(),
    diffode.BacksolveAdjoint(),
    diffode.InterpolatingAdjoint(),
]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
def test_doses_every_method(method):
    """Values, and jit(jacrev) with respect to the rates, the dose (closed over by apply),
    the dose times and the save times, against the Bateman function: every method."""
    args = (KA, KE, D, DOSES, TS)
    np.testing.assert_allclose(dosed(*args, method), bateman(*args), rtol=1e-8, atol=1e-9)
    got = jax.jit(jax.jacrev(lambda *a: dosed(*a, method), argnums=(0, 1, 2, 3, 4)))(*args)
    ref = jax.jacrev(bateman, argnums=(0, 1, 2, 3, 4))(*args)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-7, atol=1e-7)


def test_doses_forward_mode_vmap_and_float32():
    """jax.jacfwd (Direct's forward rule through the segments), jit(vmap(grad)) over dose
    sizes, and float32 (relative error at float32's tolerance)."""
    args = (KA, KE, D, DOSES, TS)
    got = jax.jacfwd(lambda ka, times: dosed(ka, KE, D, times, TS, diffode.Direct()), argnums=(0, 1))(
        KA, DOSES
    )
    ref = jax.jacfwd(lambda ka, times: bateman(ka, KE, D, times, TS), argnums=(0, 1))(KA, DOSES)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-7, atol=1e-7)
    sizes = jnp.array([5.0, 10.0, 20.0])
    loss = lambda d: jnp.sum(dosed(KA, KE, d, DOSES, TS, diffode.Direct()) ** 2)  # noqa: E731
    ref_loss = lambda d: jnp.sum(bateman(KA, KE, d, DOSES, TS) ** 2)  # noqa: E731
    np.testing.assert_allclose(
        jax.jit(jax.vmap(jax.grad(loss)))(sizes), jax.vmap(jax.grad(ref_loss))(sizes), rtol=1e-8
    )
    f32 = dosed(
        jnp.float32(KA), jnp.float32(KE), jnp.float32(D), DOSES.astype(jnp.float32), TS.astype(jnp.float32)
    )
    assert f32.dtype == jnp.float32
    np.testing.assert_allclose(f32, bateman(*args), rtol=1e-4, atol=1e-4)


def fall(t, y, g):
    return jnp.stack([y[1], -g])


BALL_TS = jnp.linspace(0.0, 3.0, 31)


def ball(h, g, e, method=None, max_fires=16, **kw):
    bounce = diffode.Event(
        lambda t, y, g: y[0],
        direction=-1,
        terminal=False,
        max_fires=max_fires,
        apply=lambda t, y, g: jnp.stack([jnp.zeros_like(y[0]), -e * y[1]]),
    )
    return diffode.solve(
        fall,
        jnp.stack([h, jnp.zeros_like(h)]),
        BALL_TS,
        g,
        events=bounce,
        sensitivity=method,
        rtol=1e-10,
        atol=1e-12,
        **kw,
    )


def bouncing(h, g, e):
    x = h - g * BALL_TS**2 / 2
    t_hit, v = jnp.sqrt(2 * h / g), e * jnp.sqrt(2 * g * h)
    for _ in range(8):
        s = BALL_TS - t_hit
        x = jnp.where(s >= 0, v * s - g * s * s / 2, x)
        t_hit, v = t_hit + 2 * v / g, e * v
    return x


@pytest.mark.parametrize(
    "method", [diffode.Direct(), diffode.ForwardSensitivity()], ids=lambda m: type(m).__name__
)
def test_bouncing_ball(method):
    """Heights, and jit(grad) and jacfwd of a loss with respect to the height, gravity (a
    Python float in args) and the restitution (closed over by apply), against the closed
    form; a batch of heights under vmap (Direct)."""
    loss = lambda h, g, e: jnp.sum(ball(h, g, e, method).ys[:, 0] ** 2)  # noqa: E731
    ref_loss = lambda h, g, e: jnp.sum(bouncing(h, g, e) ** 2)  # noqa: E731
    np.testing.assert_allclose(ball(3.0, 9.81, 0.8, method).ys[:, 0], bouncing(3.0, 9.81, 0.8), atol=1e-11)
    ref = jax.grad(ref_loss, argnums=(0, 1, 2))(3.0, 9.81, 0.8)
    np.testing.assert_allclose(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(3.0, 9.81, 0.8), ref, rtol=1e-10)
    np.testing.assert_allclose(jax.jacfwd(loss, argnums=(0, 1, 2))(3.0, 9.81, 0.8), ref, rtol=1e-10)
    if isinstance(method, diffode.ForwardSensitivity):
        return
    hs = jnp.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(
        jax.vmap(lambda h: ball(h, 9.81, 0.8, method).ys[:, 0])(hs),
        jax.vmap(lambda h: bouncing(h, 9.81, 0.8))(hs),
        atol=1e-11,
    )


def test_event_limit_is_a_failure():
    """Two bounces in the span with max_fires=1: the status says so (NaN values after the
    limit, NaN derivatives), and the solve raises eagerly and under jit(grad)."""
    sol = ball(3.0, 9.81, 0.8, max_fires=1, throw=False)
    assert int(sol.status) == diffode.Status.EVENT_LIMIT
    grad = jax.grad(lambda h: jnp.nansum(ball(h, 9.81, 0.8, max_fires=1, throw=False).ys))(3.0)
    assert np.isnan(float(grad))  # a failed solve has no derivative
    assert np.all(np.isnan(np.asarray(sol.ys)[BALL_TS > 2.1]))
    assert np.all(np.isfinite(np.asarray(sol.ys)[BALL_TS < 2.0]))
    with pytest.raises(eqx.EquinoxRuntimeError, match="max_fires"):
        ball(3.0, 9.81, 0.8, max_fires=1)
    with pytest.raises(Exception, match="max_fires"):
        jax.jit(jax.grad(lambda h: jnp.sum(ball(h, 9.81, 0.8, max_fires=1).ys)))(3.0)
        jax.effects_barrier()


def test_doses_then_a_terminal_event():
    """A terminal event among state changes: the solve stops where the central amount,
    falling after the last dose, crosses 9; the time is the Bateman function's root."""
    low = diffode.Event(lambda t, y, args: y["central"] - 9.0, direction=-1)
    ev = diffode.Event(times=DOSES, terminal=False, apply=lambda t, y, args: {**y, "gut": y["gut"] + D})
    y0 = {"gut": jnp.zeros(()), "central": jnp.zeros(())}
    sol = diffode.solve(pk, y0, TS, (KA, KE), events=[ev, low], rtol=1e-10, atol=1e-12)
    assert int(sol.event_index) == 1
    t = float(sol.event_t)
    assert t > 3.0
    assert abs(float(bateman(KA, KE, D, DOSES, jnp.array([t]))[0]) - 9.0) < 1e-8
    assert np.all(np.isnan(np.asarray(sol.ys["central"])[np.asarray(TS) > t]))


def test_event_arguments_are_checked():
    with pytest.raises(ValueError, match="either cond_fn"):
        diffode.Event()
    with pytest.raises(ValueError, match="needs apply"):
        diffode.Event(times=jnp.array([1.0]), terminal=False)
    with pytest.raises(ValueError, match="terminal event stops"):
        diffode.Event(lambda t, y, a: y[0], apply=lambda t, y, a: y)
    with pytest.raises(ValueError, match="max_fires"):
        diffode.Event(lambda t, y, a: y[0], terminal=False, apply=lambda t, y, a: y, max_fires=0)
    bad = diffode.Event(times=jnp.array([1.0]), terminal=False, apply=lambda t, y, a: y[:1])
    with pytest.raises(ValueError, match="apply returned shape"):
        diffode.solve(fall, jnp.array([1.0, 0.0]), BALL_TS, 9.81, events=bad)
    with pytest.raises(NotImplementedError, match="backward solve starts at ts"):
        ball(3.0, 9.81, 0.8, diffode.BacksolveAdjoint())
