"""diffode.sensitivity.direct.Direct: reverse mode through the discrete solution.

Two kinds of reference:
- the same discrete solve differentiated in forward mode through the loop
  (``sensitivity=Direct()`` with ``jax.jacfwd``): Direct is the exact derivative of
  that computation, so the two agree to rounding error (asserted at 1e-10
  relative; measured ~1e-14);
- analytic or independent derivatives of the ODE solution (expm, closed form,
  ``problems.lotka_volterra_sensitivities``), which the discrete derivative
  approaches as the tolerances tighten (asserted at 1e-6 relative with
  rtol = atol = 1e-10 or tighter; measured 1e-8 or better).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode
from diffode.problems import (
    exponential_decay,
    linear_solution,
    linear_system,
    lotka_volterra,
    lotka_volterra_sensitivities,
)
from diffode.sensitivity.direct import Direct


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _lv_loss(y0, ts, args, sens, solver=None, tol=1e-8, **kw):
    p = lotka_volterra()
    sol = diffode.solve(p.f, y0, ts, args, solver=solver, rtol=tol, atol=tol, sensitivity=sens, **kw)
    return jnp.sum(sol.ys**2) + jnp.sum(jnp.sin(sol.ys[:, 0]))


@pytest.mark.parametrize(
    "checkpoints, solver, kw",
    [
        (None, diffode.Tsit5(), {}),
        (7, diffode.Tsit5(), {}),
        (7, diffode.Tsit5(), {"dt0": 0.1, "adaptive": False}),
        (None, diffode.Rodas5P(), {}),
    ],
    ids=["tsit5", "tsit5-ckpt", "tsit5-fixed-ckpt", "rodas5p"],
)
def test_matches_forward_mode_of_same_discrete_solve(checkpoints, solver, kw):
    # Saves between steps (interpolated) and on landing steps (fixed steps):
    # every derivative, ts[0] and ts[-1] included, equals forward mode.
    p = lotka_volterra()
    ts = jnp.linspace(0.0, 10.0, 13)
    argnums = (0, 1, 2)
    ref = jax.jit(jax.jacfwd(lambda *a: _lv_loss(*a, Direct(), solver, **kw), argnums))(p.y0, ts, p.args)
    got = jax.jit(jax.grad(lambda *a: _lv_loss(*a, Direct(checkpoints), solver, **kw), argnums))(
        p.y0, ts, p.args
    )
    for g, r in zip(got, ref):
        assert _rel(g, r) < 1e-10


@pytest.mark.parametrize("checkpoints", [3])
def test_decreasing_ts(checkpoints):
    p = lotka_volterra()
    ts = jnp.linspace(6.0, 0.0, 9)
    ref = jax.jit(jax.jacfwd(lambda *a: _lv_loss(*a, Direct()), (0, 1, 2)))(p.y0, ts, p.args)
    got = jax.jit(jax.grad(lambda *a: _lv_loss(*a, Direct(checkpoints)), (0, 1, 2)))(p.y0, ts, p.args)
    for g, r in zip(got, ref):
        assert _rel(g, r) < 1e-10


def test_lotka_volterra_against_reference_sensitivities():
    p = lotka_volterra()
    ts = jnp.linspace(0.0, 10.0, 6)
    _, dy0, dp, dts = lotka_volterra_sensitivities(np.asarray(ts))

    def ys(y0, ts, args):
        return diffode.solve(p.f, y0, ts, args, rtol=1e-10, atol=1e-10, sensitivity=Direct()).ys

    j_y0, j_ts, j_p = jax.jit(jax.jacrev(ys, (0, 1, 2)))(p.y0, ts, p.args)
    # Measured: 6e-10, 3e-8, 6e-10.
    assert _rel(j_y0, dy0) < 1e-6
    assert _rel(j_p, dp) < 1e-6
    assert _rel(j_ts, dts) < 1e-6
    assert _rel(j_ts[:, :, 0], dts[:, :, 0]) < 1e-6  # ts[0]
    assert _rel(j_ts[:, :, -1], dts[:, :, -1]) < 1e-6  # ts[-1]


def test_linear_system_against_expm():
    # y(t) = expm(A t) y0: derivatives w.r.t. A, y0 and t by differentiating expm.
    p = linear_system()
    ts = jnp.array([0.0, 1.5, 4.0])
    w = jnp.array([1.0, -2.0, 0.5, 3.0])

    def loss(a, y0, ts, sens):
        ys = diffode.solve(p.f, y0, ts, a, rtol=1e-11, atol=1e-11, sensitivity=sens).ys
        return jnp.sum(ys[1:] @ w)

    def exact(a, y0, ts):
        return jnp.sum(linear_solution(a, y0, ts)[1:] @ w)

    got = jax.jit(jax.grad(lambda *a: loss(*a, Direct()), (0, 1, 2)))(p.args, p.y0, ts)
    ref = jax.jit(jax.grad(exact, (0, 1, 2)))(p.args, p.y0, ts)
    for g, r in zip(got, ref):
        assert _rel(g, r) < 1e-7  # measured ~1e-9


def test_exponential_decay_closed_form():
    p = exponential_decay()
    ts = jnp.linspace(0.0, 2.0, 5)

    def loss(k, sens):
        return jnp.sum(diffode.solve(p.f, p.y0, ts, k, rtol=1e-11, atol=1e-11, sensitivity=sens).ys[-1])

    got = jax.jit(jax.grad(lambda k: loss(k, Direct())))(p.args)
    ref = -2.0 * p.y0 * jnp.exp(-p.args * 2.0)  # d/dk y0 exp(-k t) at t = 2
    assert _rel(got, ref) < 1e-8


def test_hessian():
    # Forward-over-reverse through Direct's backward pass equals
    # forward-over-forward through the loop (same discrete solution).
    p = lotka_volterra()
    ts = jnp.linspace(0.0, 3.0, 4)

    def loss(args, sens):
        return _lv_loss(p.y0, ts, args, sens, tol=1e-9)

    got = jax.jit(jax.hessian(lambda a: loss(a, Direct())))(p.args)
    ref = jax.jit(jax.jacfwd(jax.jacfwd(lambda a: loss(a, Direct()))))(p.args)
    assert _rel(got, ref) < 1e-9
    assert _rel(got, got.T) < 1e-9


def test_jit_and_vmap():
    p = lotka_volterra()
    ts = jnp.linspace(0.0, 4.0, 5)
    params = p.args * jnp.array([[1.0], [1.1], [0.9]])
    grad = jax.jit(jax.vmap(jax.grad(lambda a: _lv_loss(p.y0, ts, a, Direct()))))
    ref = jax.jit(jax.vmap(jax.jacfwd(lambda a: _lv_loss(p.y0, ts, a, Direct()))))(params)
    assert _rel(grad(params), ref) < 1e-10


def test_equinox_mlp_args():
    mlp = eqx.nn.MLP(2, 2, 8, 2, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    mlp = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, mlp)
    ts = jnp.linspace(0.0, 1.0, 4)
    y0 = jnp.array([0.5, -0.3])

    def loss(model, sens):
        sol = diffode.solve(lambda t, y, m: m(y), y0, ts, model, rtol=1e-9, atol=1e-9, sensitivity=sens)
        return jnp.sum(sol.ys**2)

    got = eqx.filter_jit(eqx.filter_grad(lambda m: loss(m, Direct())))(mlp)
    ref = eqx.filter_jit(eqx.filter_jacfwd(lambda m: loss(m, Direct())))(mlp)
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        assert _rel(g, r) < 1e-10


def test_checkpoint_memory_does_not_scale_with_max_steps():
    # n = 64 states, max_steps = 4096: storing every step needs 4096 * 64 * 8 B = 2 MiB.
    n, max_steps = 64, 4096
    ts = jnp.linspace(0.0, 1.0, 3)
    y0 = jnp.linspace(1.0, 2.0, n)

    def temp_bytes(sens):
        def loss(k):
            return jnp.sum(
                diffode.solve(lambda t, y, k: -k * y, y0, ts, k, sensitivity=sens, max_steps=max_steps).ys
            )

        compiled = jax.jit(jax.grad(loss)).lower(jnp.ones(n)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full, ckpt = temp_bytes(Direct()), temp_bytes(Direct(checkpoints=64))
    assert full > max_steps * n * 8
    assert ckpt < max_steps * n * 8 / 4  # (64 + 64) states plus 2 scalars per step


def test_unknown_solver_raises_naming_direct():
    # Every built-in solver is supported (explicit RK, Rosenbrock, Radau5, SDIRK:
    # tests/test_radau_direct.py, tests/test_implicit_direct.py); a solver outside
    # those families is refused with an error naming Direct and the solver.
    from diffode.sensitivity.direct import _memoryless

    assert all(
        _memoryless(s) for s in (diffode.Tsit5(), diffode.Rodas5P(), diffode.Radau5(), diffode.Kvaerno5())
    )

    class Custom(diffode.AbstractSolver):
        pass

    p = lotka_volterra()
    opts = diffode._integrate.IntegrateOptions(Custom(), diffode.PIDController(), 1e-6, 1e-6, None, False, 10)
    with pytest.raises(NotImplementedError, match="Direct.*Custom"):
        Direct().apply(
            None, diffode.sensitivity.Problem(None, None, opts), p.y0, jnp.linspace(0.0, 1.0, 3), p.args
        )


def test_failed_solve_gives_nan_gradient_and_bad_config_raises():
    p = lotka_volterra()
    ts = jnp.linspace(0.0, 10.0, 3)

    def loss(args):
        sol = diffode.solve(p.f, p.y0, ts, args, sensitivity=Direct(), max_steps=5, throw=False)
        return jnp.sum(jnp.nan_to_num(sol.ys)), sol.status

    g, status = jax.jit(jax.grad(loss, has_aux=True))(p.args)
    assert int(status) == diffode.Status.MAX_STEPS_REACHED
    assert np.all(np.isnan(g))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="Direct: checkpoints"):
            Direct(checkpoints=bad)


def test_reverse_pass_reads_the_forward_record():
    """The reverse pass reads the record its forward solve kept: a gradient evaluates f
    once per forward evaluation plus the replayed steps' own (fewer than a second
    forward solve), unbatched, under ``vmap(grad)`` and under ``grad`` of a ``vmap``
    (batches of one: the batched record and replay), and every nesting gives the
    forward-mode reference gradient."""
    calls = [0]

    def bump():
        calls[0] += 1

    def f(t, y, p):
        jax.debug.callback(bump)
        return jnp.stack([p[0] * y[0] - p[1] * y[0] * y[1], -p[2] * y[1] + p[3] * y[0] * y[1]])

    y0, ts, p = jnp.array([1.0, 1.0]), jnp.linspace(0.0, 10.0, 20), jnp.array([1.5, 1.0, 3.0, 1.0])

    def loss(p):
        return jnp.sum(diffode.solve(f, y0, ts, p, rtol=1e-6, atol=1e-8, sensitivity=Direct()).ys ** 2)

    def count(fn):
        jax.block_until_ready(fn(p))
        calls[0] = 0
        out = jax.block_until_ready(fn(p))
        jax.effects_barrier()
        return calls[0], out

    stats = diffode.solve(f, y0, ts, p, rtol=1e-6, atol=1e-8).stats
    fevals, accepted = int(stats["num_fevals"]), int(stats["num_accepted"])
    ref = jax.jacfwd(loss)(p)
    nestings = {
        "grad": jax.grad(loss),
        "vmap_of_grad": lambda p: jax.vmap(jax.grad(loss))(p[None])[0],
        "grad_of_vmap": jax.grad(lambda p: jnp.sum(jax.vmap(loss)(p[None]))),
    }
    for name, grad in nestings.items():
        n, g = count(jax.jit(grad))
        # The replay evaluates f at most once per stage of each accepted step (7 for Tsit5,
        # the first stage included; the batched replay unrolls the stages, the unbatched one
        # loops over them and its callbacks run fewer times). A second forward solve would
        # add fevals more (measured: 1528 against 668 before the record was kept; now 860
        # unbatched, 1340 batched, with 96 accepted steps: 668 + 7 x 96 = 1340).
        assert fevals < n <= fevals + 7 * accepted, (name, n, fevals, accepted)
        assert _rel(g, ref) < 1e-10, name
