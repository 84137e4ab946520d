"""``diffode.solve_ensemble`` on one device (this process) and on four fake CPU devices (a
subprocess: the device count is fixed when JAX starts), and the batched stage sums that keep
a large batch's solve inside XLA's own fused loops."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode
from diffode.problems import lotka_volterra
from diffode.solvers import explicit_rk

# ---------------------------------------------------------------------------
# Four devices. One subprocess computes every comparison and prints them as JSON; the
# tests below check them. Tolerances are justified where they are asserted.
# ---------------------------------------------------------------------------

FOUR_DEVICES = textwrap.dedent(
    """
    import json
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    import diffode
    from diffode.problems import lotka_volterra, lotka_volterra_reference

    out = {"devices": len(jax.devices())}
    p = lotka_volterra(jnp.float64)
    ts = p.ts(20)
    tol = dict(rtol=1e-10, atol=1e-10)
    scale = np.random.default_rng(0).uniform(0.5, 1.5, (10, 1))
    args10 = jnp.asarray(np.asarray(p.args) * scale)
    args8 = args10[:8]
    y0s = jnp.asarray(np.asarray(p.y0) * scale[:8] ** 0.5)


    def vmapped(y0, args, y_axis, a_axis):
        return jax.vmap(lambda y, a: diffode.solve(p.f, y, ts, a, **tol), in_axes=(y_axis, a_axis))(y0, args)


    def layout(x):
        shards = sorted((s.device.id, s.data.shape[0]) for s in x.addressable_shards)
        return dict(
            all_devices=x.sharding.device_set == set(jax.devices()),
            spec=str(x.sharding.spec),
            rows=[r for _, r in shards],
        )


    def compare(name, sol, ref):
        out[name] = dict(
            diff=float(jnp.max(jnp.abs(sol.ys - ref.ys))),
            size=float(jnp.max(jnp.abs(ref.ys))),
            steps_equal=bool(jnp.all(sol.stats["num_steps"] == ref.stats["num_steps"])),
            status=np.asarray(sol.status).tolist(),
            shape=list(sol.ys.shape),
            **layout(sol.ys),
        )


    # Per-member args, one y0 (8 members: 2 per device), and two members against SciPy.
    sol = diffode.solve_ensemble(p.f, p.y0, ts, args8, batch_y0=False, batch_args=True, **tol)
    compare("args", sol, vmapped(p.y0, args8, None, 0))
    out["args"]["scipy"] = max(
        float(np.max(np.abs(np.asarray(sol.ys[i]) - lotka_volterra_reference(
            np.asarray(ts), params=tuple(np.asarray(args8[i]).tolist())))))
        for i in (0, 5)
    )
    # Per-member y0, one args; both per member, under jit.
    compare("y0", diffode.solve_ensemble(p.f, y0s, ts, p.args, **tol), vmapped(y0s, p.args, 0, None))
    both = jax.jit(lambda y, a: diffode.solve_ensemble(p.f, y, ts, a, batch_args=True, **tol))(y0s, args8)
    compare("both_jit", both, vmapped(y0s, args8, 0, 0))
    # 10 members on 4 devices: padded to 12 and cut back.
    sol10 = diffode.solve_ensemble(p.f, p.y0, ts, args10, batch_y0=False, batch_args=True, **tol)
    compare("ten", sol10, vmapped(p.y0, args10, None, 0))

    # Gradients of a loss over the sharded batch: the per-member args and the shared y0.
    weights = jnp.linspace(0.5, 1.5, 8)


    def loss(y0, args, ensemble=True):
        sol = (
            diffode.solve_ensemble(p.f, y0, ts, args, batch_y0=False, batch_args=True, **tol)
            if ensemble
            else vmapped(y0, args, None, 0)
        )
        return jnp.sum(weights * jnp.sum(sol.ys[:, -1] ** 2, axis=-1))


    g = jax.jit(jax.grad(loss, argnums=(0, 1)))(p.y0, args8)
    g0 = jax.grad(lambda y, a: loss(y, a, False), argnums=(0, 1))(p.y0, args8)
    fd = []
    for which, index in ((0, (0,)), (0, (1,)), (1, (5, 0)), (1, (2, 3)), (1, (7, 1))):
        h = 1e-6
        up, down = [p.y0, args8], [p.y0, args8]
        up[which] = up[which].at[index].add(h)
        down[which] = down[which].at[index].add(-h)
        fd.append(dict(fd=float((loss(*up) - loss(*down)) / (2 * h)), ad=float(g[which][index])))
    out["grad"] = dict(
        y0_rel=float(jnp.max(jnp.abs(g[0] - g0[0])) / jnp.max(jnp.abs(g0[0]))),
        args_rel=float(jnp.max(jnp.abs(g[1] - g0[1])) / jnp.max(jnp.abs(g0[1]))),
        fd=fd,
        **layout(g[1]),
    )

    # y' = y^2 blows up at t = 1 / y0: on [0, 1.5] the member with y0 = 1 (on device 2) fails.
    blow = lambda t, y, a: y**2
    tb = jnp.linspace(0.0, 1.5, 7)
    yb = jnp.array([0.1, 0.2, 0.3, 0.4, 0.5, 1.0, 0.25, 0.15])
    sol = diffode.solve_ensemble(blow, yb, tb, throw=False, **tol)
    exact = yb[:, None] / (1 - yb[:, None] * tb[None, :])
    ok = np.arange(8) != 5
    dend = jax.grad(lambda y: jnp.sum(diffode.solve_ensemble(blow, y, tb, throw=False, **tol).ys[:, -1]))(yb)
    out["failure"] = dict(
        status=np.asarray(sol.status).tolist(),
        message=sol.message[5],
        nan=np.asarray(jnp.isnan(sol.ys[:, -1])).tolist(),
        others_err=float(jnp.max(jnp.abs(sol.ys[ok] - exact[ok]) / exact[ok])),
        grad_nan=np.asarray(jnp.isnan(dend)).tolist(),
        # d y(t) / d y0 = 1 / (1 - y0 t)^2
        grad_err=float(jnp.max(jnp.abs(dend[ok] * (1 - yb[ok] * tb[-1]) ** 2 - 1))),
    )
    try:  # throw=True (the default), called eagerly: raised after the program, in Python
        diffode.solve_ensemble(blow, yb, tb, **tol)
        out["throw"] = "no error"
    except Exception as e:
        out["throw"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def four():
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
    )
    run = subprocess.run(
        [sys.executable, "-c", FOUR_DEVICES], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-6000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    return out


# Each device solves its members with the same arithmetic as the unsharded vmap, but XLA
# compiles a block of 2 members differently from a batch of 8 (vectorised loops, their
# remainders), which may round a few operations differently; the adaptive steps carry
# such ulp-level differences forward. The step counts must agree exactly, the states to
# 1e-11 relative to their size (measured: 0 to 5e-14).
SHARDED_VS_VMAP = 1e-11


@pytest.mark.parametrize("case", ["args", "y0", "both_jit"])
def test_sharded_result_equals_vmap_and_spans_all_devices(four, case):
    r = four[case]
    assert r["shape"] == [8, 20, 2] and r["status"] == [0] * 8 and r["steps_equal"]
    assert r["diff"] <= SHARDED_VS_VMAP * r["size"]
    # Split along the members: two rows on each of the four devices.
    assert r["all_devices"] and r["spec"] == "P('members',)" and r["rows"] == [2, 2, 2, 2]


def test_sharded_result_against_scipy(four):
    # rtol = atol = 1e-10 against DOP853 at 1e-13: the global error stays below 1e-8
    # (measured 1.2e-9) on states of size up to 7.
    assert four["args"]["scipy"] < 1e-8


def test_batch_not_a_multiple_of_the_device_count(four):
    r = four["ten"]
    assert r["shape"] == [10, 20, 2] and r["status"] == [0] * 10 and r["steps_equal"]
    assert r["diff"] <= SHARDED_VS_VMAP * r["size"]
    # The documented rule: padded to 12, solved split, cut back to 10 (then on every device whole).
    assert r["all_devices"] and r["spec"] == "P()" and r["rows"] == [10] * 4


def test_gradient_over_the_sharded_batch(four):
    g = four["grad"]
    # Against the unsharded gradient: the per-member derivatives come from the same
    # arithmetic (the batched reverse pass's checkpoint windows depend on the batch size,
    # so rounding differs slightly), and the shared y0's is a sum over members in a
    # different order: 1e-10 relative (measured: 0 and 3e-16).
    assert g["y0_rel"] < 1e-10 and g["args_rel"] < 1e-10
    # Against central differences (h = 1e-6 on a loss of size ~100 solved at 1e-10): the
    # truncation error is ~1e-12 relative, the solver's noise divided by h ~1e-8 at worst;
    # 1e-6 relative leaves a margin (measured: up to 2e-8).
    for d in g["fd"]:
        assert abs(d["ad"] - d["fd"]) <= 1e-6 * abs(d["fd"]), d
    assert g["all_devices"] and g["spec"] == "P('members',)"


def test_throw_false_reports_the_failing_member_alone(four):
    r = four["failure"]
    assert r["status"][5] == diffode.Status.DT_UNDERFLOW and "step size" in r["message"]
    assert [s for i, s in enumerate(r["status"]) if i != 5] == [0] * 7
    assert r["nan"] == [i == 5 for i in range(8)] and r["grad_nan"] == [i == 5 for i in range(8)]
    # The others against the exact solution y0 / (1 - y0 t) and its derivative, at rtol 1e-10.
    assert r["others_err"] < 1e-8 and r["grad_err"] < 1e-7


def test_throw_true_raises_for_the_batch(four):
    assert four["throw"].startswith("EquinoxRuntimeError") and "step size" in four["throw"]


# ---------------------------------------------------------------------------
# One device (this process).
# ---------------------------------------------------------------------------


def _lv_batch(members):
    p = lotka_volterra(jnp.float64)
    scale = np.random.default_rng(1).uniform(0.5, 1.5, (members, 1))
    return p, p.ts(20), jnp.asarray(np.asarray(p.args) * scale)


def test_one_device_equals_vmap():
    p, ts, args = _lv_batch(6)
    device = jax.devices()[0]
    sol = diffode.solve_ensemble(p.f, p.y0, ts, args, batch_y0=False, batch_args=True, devices=[device])
    ref = jax.vmap(lambda a: diffode.solve(p.f, p.y0, ts, a))(args)
    # The same program: identical to the last bit.
    np.testing.assert_array_equal(sol.ys, ref.ys)
    np.testing.assert_array_equal(sol.stats.counters, ref.stats.counters)
    assert sol.ys.sharding.device_set == {device}


def test_batch_args_prefix_and_bad_input():
    p, ts, args = _lv_batch(4)
    f = lambda t, y, a: p.f(t, y, a[0]) * a[1]  # noqa: E731
    sol = diffode.solve_ensemble(f, p.y0, ts, (args, 1.0), batch_y0=False, batch_args=(True, False))
    ref = jax.vmap(lambda a: diffode.solve(f, p.y0, ts, (a, 1.0)))(args)
    np.testing.assert_array_equal(sol.ys, ref.ys)
    with pytest.raises(ValueError, match="nothing to batch"):
        diffode.solve_ensemble(p.f, p.y0, ts, p.args, batch_y0=False)
    with pytest.raises(ValueError, match="same number of members"):
        diffode.solve_ensemble(p.f, jnp.ones((3, 2)), ts, args, batch_args=True)
    with pytest.raises(ValueError, match="pytree prefix"):
        diffode.solve_ensemble(p.f, p.y0, ts, (args, 1.0), batch_y0=False, batch_args=(True,))
    # As solve(..., throw=True) does, at trace time: f's output does not match a member's y0.
    with pytest.raises(ValueError, match=r"f returned shape \(3,\) at y, but y0 has shape \(2,\)"):
        diffode.solve_ensemble(lambda t, y, a: jnp.ones(3), jnp.ones((4, 2)), ts)


# ---------------------------------------------------------------------------
# The stage sums under a large vmap (explicit_rk._sum_rows).
# ---------------------------------------------------------------------------


def test_sum_rows_is_a_sum_with_its_derivatives():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(7, 3)))
    np.testing.assert_allclose(explicit_rk._sum_rows(x), jnp.sum(x, axis=0), rtol=1e-15)
    t = jnp.asarray(np.random.default_rng(3).normal(size=(7, 3)))
    _, dt = jax.jvp(explicit_rk._sum_rows, (x,), (t,))
    np.testing.assert_allclose(dt, jnp.sum(t, axis=0), rtol=1e-15)
    c = jnp.arange(3.0)
    g = jax.grad(lambda x: jnp.dot(c, explicit_rk._sum_rows(x)))(x)
    np.testing.assert_array_equal(g, jnp.broadcast_to(c, (7, 3)))
    h = jax.hessian(lambda x: jnp.sum(explicit_rk._sum_rows(x) ** 2))(x)
    np.testing.assert_allclose(h, jax.hessian(lambda x: jnp.sum(jnp.sum(x, 0) ** 2))(x), rtol=1e-15)


def _compiled_text(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


@pytest.mark.parametrize("stage_loop", [True, False])
def test_batched_stage_sums_stay_in_xla_loops(stage_loop):
    """XLA's CPU backend sends a plain sum of 4096 elements or more to a library kernel
    (YNNPACK) outside its fusion; in a step loop that cost 6x the throughput of a batched
    Tsit5 solve from 293 members (7 stages x 2 components x 293 > 4096). The stage sums
    (stage loop), the saves' interpolation (both forms) and the error norm (2 components x
    2100 members > 4096) must not be such sums."""
    rows = jnp.ones((300, 7, 2))
    control = _compiled_text(jax.vmap(lambda r: jnp.sum(jnp.arange(7.0)[:, None] * r, axis=0)), rows)
    if "__ynn_fusion" not in control:
        pytest.skip("this XLA does not hand large reductions to a library kernel")
    p, ts, args = _lv_batch(2100)
    solver = diffode.Tsit5(stage_loop=stage_loop)
    assert solver.loops_stages(p.y0) is stage_loop
    text = _compiled_text(jax.vmap(lambda a: diffode.solve(p.f, p.y0, ts, a, solver=solver).ys), args)
    assert "__ynn_fusion" not in text


def test_ensemble_is_exported_and_documented():
    assert "solve_ensemble" in diffode.__all__
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "api.md")) as fh:
        assert "::: diffode.solve_ensemble" in fh.read()
