"""``solve(..., tstops=...)``: steps land on known discontinuities and the solver restarts there;
``progress=True`` shows a meter and changes nothing.

Reference: the linear ODE ``y' = -k y + u(t)`` with a forcing that switches on at
``t = 1`` (``u = a`` for ``t >= 1``, else 0), solved in closed form on each piece:
``y = y0 exp(-k (t - t0))`` up to 1, then ``a/k + (y(1) - a/k) exp(-k (t - 1))``.
Its derivatives with respect to ``y0``, ``k``, ``a`` and the save times are those of the
closed form (``jax.grad`` of it). At a save time equal to the switch the solution has a
kink; every method gives the derivative from the side the solve comes from (the closed
form's ``t <= 1`` piece). Tolerances: the solves run at rtol 1e-10, so 1e-7 relative is
three orders above the discretisation error (measured 1e-12 to 4e-9).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode
from diffode.sensitivity import direct as direct_module

SWITCH = 1.0


def forced(t, y, p):
    k, a = p
    return -k * y + jnp.where(t >= SWITCH, a, 0.0)


def closed_form(y0, p, ts):
    k, a = p
    t0 = ts[0]
    y1 = y0 * jnp.exp(-k * (SWITCH - t0))
    return jnp.where(
        ts <= SWITCH, y0 * jnp.exp(-k * (ts - t0)), a / k + (y1 - a / k) * jnp.exp(-k * (ts - SWITCH))
    )


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


P = jnp.array([0.7, 1.5])
TS = jnp.linspace(0.0, 3.0, 7)  # ts[2] == SWITCH: a save on the discontinuity


@pytest.mark.parametrize(
    "solver",
    [diffode.Tsit5(), diffode.Rodas5P(), diffode.Kvaerno5(), diffode.Radau5()],
    ids=lambda s: type(s).__name__,
)
def test_steps_land_on_the_switch(solver):
    """With the switch as a tstop no step straddles it: no rejected steps, far fewer steps,
    and the closed form to the tolerance. Without it the controller rejects its way down
    to the switch (measured Tsit5: 80 steps, 30 rejected; with tstops 29, none)."""
    y0 = jnp.array([2.0])
    kw = dict(solver=solver, rtol=1e-8, atol=1e-10)
    plain = diffode.solve(forced, y0, TS, P, **kw)
    sol = diffode.solve(forced, y0, TS, P, tstops=jnp.array([SWITCH]), **kw)
    assert int(sol.stats["num_rejected"]) == 0
    assert int(sol.stats["num_steps"]) < 0.7 * int(plain.stats["num_steps"])
    assert _rel(sol.ys[:, 0], closed_form(2.0, P, TS)) < 5e-7


@pytest.mark.parametrize(
    "method",
    [
        diffode.Direct(),
        diffode.ForwardSensitivity(),
        diffode.InterpolatingAdjoint(),
        diffode.BacksolveAdjoint(),
    ],
    ids=lambda m: type(m).__name__,
)
def test_gradients_across_the_switch(method):
    """Reverse mode of every method, under jit, with respect to y0, the parameters (one
    of them through a closure) and the save times, against the closed form; forward mode
    (jax.linearize) gives the same numbers."""

    def loss(y0, p, ts):
        k, a = p

        def f(t, y, args):  # a closure over the switched amplitude, args for the rate
            return -args * y + jnp.where(t >= SWITCH, a, 0.0)

        sol = diffode.solve(
            f, jnp.stack([y0]), ts, k, rtol=1e-10, atol=1e-12, tstops=[SWITCH], sensitivity=method
        )
        return jnp.sum(sol.ys[:, 0] ** 2)

    def exact(y0, p, ts):
        return jnp.sum(closed_form(y0, p, ts) ** 2)

    args = (2.0, P, TS)
    ref = jax.grad(exact, argnums=(0, 1, 2))(*args)
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
    for g, r in zip(got, ref):
        assert _rel(g, r) < 1e-7
    _, lin = jax.linearize(lambda p: loss(2.0, p, TS), P)
    assert abs(float(lin(jnp.array([1.0, 0.0]))) - float(ref[1][0])) < 1e-7 * abs(float(ref[1][0]))


@pytest.mark.parametrize("group_min", [32, 1])
def test_batched_gradients_match_members_and_float32(group_min, monkeypatch):
    """jit(vmap(grad)) over initial states (the batched reverse pass of Direct, the batch
    whole and in groups of one member) equals the members' own gradients; float32 runs
    and agrees with float64 to float32 accuracy."""
    monkeypatch.setattr(direct_module, "GROUP_MIN", group_min)
    jax.clear_caches()  # a trace of the other parametrisation would not read GROUP_MIN

    def loss(y0, p, dtype=jnp.float64):
        sol = diffode.solve(
            forced,
            jnp.stack([y0]).astype(dtype),
            TS.astype(dtype),
            p.astype(dtype),
            rtol=1e-6 if dtype == jnp.float32 else 1e-10,
            atol=1e-8,
            tstops=[SWITCH],
            sensitivity=diffode.Direct(),
        )
        return jnp.sum(sol.ys**2)

    y0s = jnp.array([2.0, 0.5, -1.0])
    batched = jax.jit(jax.vmap(jax.grad(loss, argnums=1), in_axes=(0, None)))(y0s, P)
    for b, y0 in enumerate(y0s):
        ref = jax.grad(lambda p: jnp.sum(closed_form(y0, p, TS) ** 2))(P)
        assert _rel(batched[b], ref) < 1e-7
    g32 = jax.jit(jax.grad(lambda p: loss(jnp.float32(2.0), p, jnp.float32)))(P.astype(jnp.float32))
    assert g32.dtype == jnp.float32
    assert _rel(g32, jax.grad(lambda p: jnp.sum(closed_form(2.0, p, TS) ** 2))(P)) < 1e-4


def test_backwards_in_time_and_stops_outside_the_span():
    """Integrating backwards lands on the switch too (measured: 47 steps, 2 rejected, against
    101 and 32 without tstops); tstops outside the span are ignored."""
    y3 = float(closed_form(2.0, P, TS)[-1])
    back = jnp.linspace(3.0, 0.0, 7)
    kw = dict(rtol=1e-10, atol=1e-12)
    plain = diffode.solve(forced, jnp.array([y3]), back, P, **kw)
    sol = diffode.solve(forced, jnp.array([y3]), back, P, tstops=[SWITCH, -5.0, 7.0], **kw)
    assert int(sol.stats["num_rejected"]) <= 4
    assert int(sol.stats["num_steps"]) < 0.7 * int(plain.stats["num_steps"])
    assert _rel(sol.ys[::-1, 0], closed_form(2.0, P, TS)) < 1e-9


def test_bad_tstops():
    y0 = jnp.array([1.0])
    with pytest.raises(ValueError, match="tstops must be a 1-D array"):
        diffode.solve(forced, y0, TS, P, tstops=jnp.ones((2, 2)))
    sol = diffode.solve(forced, y0, TS, P, tstops=[jnp.nan], throw=False)
    assert int(sol.status) == diffode.Status.NONFINITE_INPUT
    with pytest.raises(Exception, match="tstops contains NaN"):
        jax.jit(lambda s: diffode.solve(forced, y0, TS, P, tstops=s).ys)(jnp.array([jnp.nan]))


def test_progress_meter_changes_nothing(capfd):
    """progress=True draws the meter on stderr (under jit and vmap too) and leaves the
    result and the gradient as they are."""

    def run(p, progress):
        return diffode.solve(forced, jnp.array([2.0]), TS, p, tstops=[SWITCH], progress=progress).ys

    quiet = jax.jit(lambda p: run(p, False))(P)
    shown = jax.jit(lambda p: run(p, True))(P)
    jax.effects_barrier()
    assert "100.0%" in capfd.readouterr().err
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(quiet))
    g = [jax.grad(lambda p: jnp.sum(run(p, flag)))(P) for flag in (False, True)]
    np.testing.assert_array_equal(np.asarray(g[0]), np.asarray(g[1]))
    jax.vmap(lambda p: run(p, True))(jnp.stack([P, 2 * P]))
    jax.effects_barrier()
    assert "t = 3 of 3" in capfd.readouterr().err
