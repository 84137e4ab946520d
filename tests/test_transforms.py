"""solve under JAX transformations (jit, vmap, forward-mode autodiff), with pytree
states, float32, and equinox modules as args."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import diffode
from diffode import problems

LV = problems.lotka_volterra()
TS = LV.ts(21)


def lv_solve(y0, args, rtol=1e-8, atol=1e-8):
    return diffode.solve(LV.f, y0, TS, args, rtol=rtol, atol=atol)


# Jitted once, reused by several tests (vmapped versions compile separately).
lv_jit = jax.jit(lv_solve)


def test_jit_matches_eager():
    eager = lv_solve(LV.y0, LV.args)
    jitted = lv_jit(LV.y0, LV.args)
    # The same XLA program up to fusion decisions: agreement to roundoff
    # accumulated over ~200 steps, and identical step counts.
    np.testing.assert_allclose(jitted.ys, eager.ys, rtol=1e-12, atol=0)
    assert int(jitted.stats["num_steps"]) == int(eager.stats["num_steps"])
    assert int(jitted.status) == diffode.Status.SUCCESS


def test_eager_grad_compiles_the_solve_once():
    """An eager ``jax.grad`` (a research script's optimisation loop) compiles the solve as
    one program and reuses it: the vector field is traced on the first call only, and
    the gradient matches the jitted one."""
    traced = []

    def f(t, y, args):
        traced.append(None)  # runs at trace time only
        return LV.f(t, y, args)

    def loss(args):
        return jnp.sum(diffode.solve(f, LV.y0, TS, args, rtol=1e-8, atol=1e-8).ys ** 2)

    grad = jax.grad(loss)
    g1 = grad(LV.args)
    first = len(traced)
    g2 = grad(LV.args * 1.01)
    assert first > 0 and len(traced) == first
    np.testing.assert_allclose(g1, jax.jit(grad)(LV.args), rtol=1e-12)
    assert not np.allclose(g1, g2)


# --------------------------------------------------------------------------
# vmap.
# --------------------------------------------------------------------------


def test_vmap_over_y0():
    y0s = jnp.array([[1.0, 1.0], [2.0, 0.5], [0.5, 2.0]])
    batched = jax.jit(jax.vmap(lv_solve, in_axes=(0, None)))(y0s, LV.args)
    assert batched.ys.shape == (3, 21, 2)
    for i in range(3):
        single = lv_jit(y0s[i], LV.args)
        # Each member follows its own step sequence (see the per-trajectory
        # test), so batched and unbatched agree to roundoff.
        np.testing.assert_allclose(batched.ys[i], single.ys, rtol=1e-12, atol=0)


def test_vmap_over_args():
    args = jnp.array([[1.5, 1.0, 3.0, 1.0], [1.0, 1.0, 2.0, 1.0], [2.0, 0.5, 3.0, 1.5]])
    batched = jax.jit(jax.vmap(lv_solve, in_axes=(None, 0)))(LV.y0, args)
    for i in range(3):
        np.testing.assert_allclose(batched.ys[i], lv_jit(LV.y0, args[i]).ys, rtol=1e-12, atol=0)


def test_vmap_per_trajectory_step_sizes():
    # Initial conditions far from / near the equilibrium (gamma/delta,
    # alpha/beta) = (3, 1.5) and different rates need very different numbers of
    # steps. Under vmap each member must keep its own t, h and counters: same
    # step count and same values as its unbatched solve. A shared step size
    # (the batch's minimum) would give every member the same, larger count.
    y0s = jnp.array([[1.0, 1.0], [2.9, 1.45], [0.2, 0.2], [1.0, 1.0]])
    args = jnp.array([[1.5, 1.0, 3.0, 1.0], [1.5, 1.0, 3.0, 1.0], [1.5, 1.0, 3.0, 1.0], [0.3, 1.0, 0.6, 1.0]])
    fn = jax.jit(jax.vmap(lambda y0, a: lv_solve(y0, a, rtol=1e-10, atol=1e-10)))
    batched = fn(y0s, args)
    single = jax.jit(lambda y0, a: lv_solve(y0, a, rtol=1e-10, atol=1e-10))
    counts = []
    for i in range(4):
        s = single(y0s[i], args[i])
        counts.append(int(s.stats["num_steps"]))
        for k in ("num_steps", "num_accepted", "num_rejected", "num_fevals"):
            assert int(batched.stats[k][i]) == int(s.stats[k]), (i, k)
        # Same operations in the same order: agreement to roundoff (values are O(1..10)).
        np.testing.assert_allclose(batched.ys[i], s.ys, rtol=1e-12, atol=1e-12)
    # The test needs members with genuinely different work.
    assert max(counts) > 3 * min(counts), counts


# --------------------------------------------------------------------------
# Pytree states.
# --------------------------------------------------------------------------


def kepler_dict_rhs(t, y, args):
    flat = problems.rescaled_kepler_rhs(t, jnp.concatenate([y["q"], y["p"].ravel()]), args)
    return {"q": flat[:2], "p": flat[2:].reshape(1, 2)}


def kepler_tuple_rhs(t, y, args):
    q1, rest = y
    flat = problems.rescaled_kepler_rhs(t, jnp.concatenate([q1[None], rest]), args)
    return flat[0], flat[1:]


def test_pytree_states_match_flat():
    p = problems.rescaled_kepler()
    ts = p.ts(5)
    flat = diffode.solve(p.f, p.y0, ts, rtol=1e-9, atol=1e-9)
    # dict of a (2,) and a (1, 2) leaf; tuple of a scalar and a (3,) leaf.
    # ravel_pytree orders dict leaves by key ("p" before "q"), so the dict
    # state is a permutation of the flat one: the RMS error norm, and hence
    # every step, is the same.
    d0 = {"q": p.y0[:2], "p": p.y0[2:].reshape(1, 2)}
    as_dict = diffode.solve(kepler_dict_rhs, d0, ts, rtol=1e-9, atol=1e-9)
    t0 = (p.y0[0], p.y0[1:])
    as_tuple = diffode.solve(kepler_tuple_rhs, t0, ts, rtol=1e-9, atol=1e-9)
    assert jtu.tree_structure(as_dict.ys) == jtu.tree_structure(d0)
    assert as_dict.ys["q"].shape == (5, 2) and as_dict.ys["p"].shape == (5, 1, 2)
    assert as_tuple.ys[0].shape == (5,) and as_tuple.ys[1].shape == (5, 3)
    from_dict = jnp.concatenate([as_dict.ys["q"], as_dict.ys["p"].reshape(5, 2)], axis=1)
    from_tuple = jnp.concatenate([as_tuple.ys[0][:, None], as_tuple.ys[1]], axis=1)
    # Same arithmetic up to the order of summation in the norm: roundoff only.
    np.testing.assert_allclose(from_dict, flat.ys, rtol=0, atol=1e-13)
    np.testing.assert_allclose(from_tuple, flat.ys, rtol=0, atol=1e-13)
    assert int(as_dict.stats["num_steps"]) == int(flat.stats["num_steps"])
    assert int(as_tuple.stats["num_steps"]) == int(flat.stats["num_steps"])


# --------------------------------------------------------------------------
# float32.
# --------------------------------------------------------------------------


def test_float32():
    # x64 is on for the session; explicit float32 inputs must give a float32
    # solve (the library follows y0's dtype) that is as accurate as float32 allows.
    p32 = problems.lotka_volterra(dtype=jnp.float32)
    ts = p32.ts(21)
    assert ts.dtype == jnp.float32
    sol = diffode.solve(p32.f, p32.y0, ts, p32.args, rtol=1e-6, atol=1e-6)
    assert sol.ys.dtype == jnp.float32
    assert sol.status == diffode.Status.SUCCESS
    ref = problems.lotka_volterra_reference(np.asarray(ts, np.float64))
    # rtol 1e-6 is near float32's floor (eps = 1.2e-7); roundoff accumulated
    # over ~100 steps and the LV cycles gives ~1e-5 relative (measured with x64
    # off), so 1e-4.
    np.testing.assert_allclose(np.asarray(sol.ys, np.float64), ref, rtol=1e-4)


def test_float32_y0_with_float64_ts():
    # Times may be float64 while the state is float32; the state stays float32.
    p32 = problems.lotka_volterra(dtype=jnp.float32)
    sol = diffode.solve(p32.f, p32.y0, TS, p32.args, rtol=1e-6, atol=1e-6)
    assert sol.ys.dtype == jnp.float32
    ref = problems.lotka_volterra_reference(TS)
    np.testing.assert_allclose(np.asarray(sol.ys, np.float64), ref, rtol=1e-4)  # as above


# --------------------------------------------------------------------------
# Forward-mode autodiff.
# --------------------------------------------------------------------------

TIGHT = dict(rtol=1e-10, atol=1e-10)
ys_of = jax.jit(lambda y0, args: diffode.solve(LV.f, y0, TS, args, **TIGHT).ys)


def central_difference(fn, x, delta):
    cols = [(fn(x.at[i].add(delta)) - fn(x.at[i].add(-delta))) / (2 * delta) for i in range(x.shape[0])]
    return np.stack([np.asarray(c) for c in cols], axis=-1)


def test_jacfwd_matches_finite_differences():
    jac_y0, jac_args = jax.jit(jax.jacfwd(ys_of, argnums=(0, 1)))(LV.y0, LV.args)
    assert jac_y0.shape == (21, 2, 2) and jac_args.shape == (21, 2, 4)
    assert np.isfinite(jac_y0).all() and np.isfinite(jac_args).all()
    # jacfwd differentiates the discrete scheme for a frozen step sequence;
    # central differences see the (tiny) dependence of the step sizes on the
    # input and the solver's jitter. At rtol 1e-10 both are within ~1e-8 of the
    # true derivative; observed max |jacfwd - FD| / max|J| is 1.4e-8 .. 1.3e-6
    # for delta in 1e-6 .. 1e-4. Bound 1e-5: ten times the worst observation,
    # and orders of magnitude below the O(1e-2 .. 1) error of a derivative
    # that misses a dependence (e.g. one stage).
    delta = 1e-6
    fd_args = central_difference(lambda a: ys_of(LV.y0, a), LV.args, delta)
    fd_y0 = central_difference(lambda y: ys_of(y, LV.args), LV.y0, delta)
    assert np.abs(jac_args - fd_args).max() < 1e-5 * np.abs(jac_args).max()
    assert np.abs(jac_y0 - fd_y0).max() < 1e-5 * np.abs(jac_y0).max()
    # At t0 the derivative w.r.t. y0 is the identity, w.r.t. args zero.
    np.testing.assert_array_equal(jac_y0[0], np.eye(2))
    np.testing.assert_array_equal(jac_args[0], np.zeros((2, 4)))


def test_jvp():
    v_y0 = jnp.array([0.3, -0.2])
    v_args = jnp.array([0.1, 0.0, -0.5, 0.2])
    primal, tangent = jax.jvp(ys_of, (LV.y0, LV.args), (v_y0, v_args))
    # ys_of is jitted, so the jvp goes through the default sensitivity method's
    # rule (forward sensitivities, whose error control also covers the
    # sensitivities): its primal comes from a solve with a different step
    # sequence, equal to within the tolerance (rtol 1e-10; observed 5e-10).
    np.testing.assert_allclose(primal, ys_of(LV.y0, LV.args), rtol=1e-8, atol=0)
    # A directional derivative: compare against one central difference along
    # (v_y0, v_args), same tolerance rationale as the jacfwd test.
    d = 1e-6
    plus = ys_of(LV.y0 + d * v_y0, LV.args + d * v_args)
    minus = ys_of(LV.y0 - d * v_y0, LV.args - d * v_args)
    fd = (plus - minus) / (2 * d)
    assert np.abs(np.asarray(tangent - fd)).max() < 1e-5 * np.abs(np.asarray(tangent)).max()
    np.testing.assert_allclose(tangent[0], v_y0, rtol=0, atol=0)


# --------------------------------------------------------------------------
# An equinox module as args: a neural ODE.
# --------------------------------------------------------------------------


def mlp_rhs(t, y, mlp):
    return mlp(y)


@pytest.fixture(scope="module")
def mlp():
    # Small weights keep the vector field non-stiff and the solve short.
    model = eqx.nn.MLP(
        in_size=2, out_size=2, width_size=8, depth=2, activation=jnp.tanh, key=jax.random.PRNGKey(0)
    )
    model = jtu.tree_map(lambda x: 0.5 * x if eqx.is_inexact_array(x) else x, model)
    # The MLP's parameters are float64 in this session (x64 on).
    return model


def test_neural_ode_jit_and_vmap(mlp):
    ts = jnp.linspace(0.0, 2.0, 5)
    y0s = jnp.array([[1.0, 0.0], [0.0, 1.0], [-0.5, 0.5]])

    @eqx.filter_jit
    def run(y0, model):
        return diffode.solve(mlp_rhs, y0, ts, model, rtol=1e-8, atol=1e-8).ys

    eager = diffode.solve(mlp_rhs, y0s[0], ts, mlp, rtol=1e-8, atol=1e-8).ys
    np.testing.assert_allclose(run(y0s[0], mlp), eager, rtol=1e-12, atol=1e-14)  # jit == eager to roundoff
    batched = eqx.filter_jit(eqx.filter_vmap(run, in_axes=(0, None)))(y0s, mlp)
    for i in range(3):
        # Batched matmuls round differently from unbatched ones: agreement to
        # roundoff on the state's O(1) scale (observed 7e-14).
        np.testing.assert_allclose(batched[i], run(y0s[i], mlp), rtol=0, atol=1e-12)
    # The solve is not trivial: the field moves the state.
    assert np.abs(np.asarray(batched[:, -1] - y0s)).max() > 1e-2

    # An ensemble of models: vmap over the module itself.
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    ensemble = eqx.filter_vmap(lambda k: eqx.nn.MLP(2, 2, 8, 2, activation=jnp.tanh, key=k))(keys)
    ens = eqx.filter_jit(eqx.filter_vmap(run, in_axes=(None, eqx.if_array(0))))(y0s[0], ensemble)
    assert ens.shape == (3, 5, 2)
    for i in range(3):
        member = jtu.tree_map(lambda x: x[i] if eqx.is_array(x) else x, ensemble)
        np.testing.assert_allclose(ens[i], run(y0s[0], member), rtol=0, atol=1e-12)  # as above


def test_neural_ode_gradient_wrt_parameters(mlp):
    # Forward-mode derivative w.r.t. one weight matrix of the module, through jit.
    ts = jnp.linspace(0.0, 1.0, 3)
    y0 = jnp.array([1.0, 0.0])
    params, static = eqx.partition(mlp, eqx.is_inexact_array)
    w = params.layers[0].weight

    def end_state(w):
        model = eqx.combine(eqx.tree_at(lambda m: m.layers[0].weight, params, w), static)
        return diffode.solve(mlp_rhs, y0, ts, model, **TIGHT).ys[-1]

    jac = jax.jit(jax.jacfwd(end_state))(w)
    end_state = jax.jit(end_state)
    assert jac.shape == (2,) + w.shape
    d = 1e-6
    e = jnp.zeros_like(w).at[0, 0].set(1.0)
    fd = (end_state(w + d * e) - end_state(w - d * e)) / (2 * d)
    # Same rationale as the LV jacfwd test.
    assert np.abs(np.asarray(jac[:, 0, 0] - fd)).max() < 1e-5 * max(np.abs(np.asarray(fd)).max(), 1e-3)
