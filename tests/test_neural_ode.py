"""Batched solves and their reverse mode, as neural-ODE training writes them: an
``equinox.Module`` vector field, ``jax.vmap`` over initial states with shared
parameters, ``grad`` of a loss over the batch; and the solver-heuristic regularisers.

References: every member of a vmapped solve against its own unbatched solve (the
loop must not change a member's steps); the batched reverse pass against the
unbatched one summed over members (a different code path: one member at a
time, checkpoint layouts, no windows) and against forward mode through the loop
(``jax.jacfwd``), which differentiates the same discrete solution independently.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import diffode
from diffode.sensitivity import direct as direct_module


class Field(eqx.Module):
    """An MLP vector field, scaled by ``args`` (a per-member or shared array)."""

    mlp: eqx.nn.MLP

    def __init__(self, width, dtype, key):
        mlp = eqx.nn.MLP(2, 2, width, 2, activation=jnp.tanh, key=key)
        self.mlp = jax.tree_util.tree_map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, mlp)

    def __call__(self, t, y, args):
        return args * self.mlp(y) - 0.1 * y


MODEL = Field(8, jnp.float64, jax.random.PRNGKey(0))
Y0S = jax.random.normal(jax.random.PRNGKey(1), (5, 2))
SCALES = jnp.linspace(0.5, 3.0, 5)  # members take different numbers of steps
TS = jnp.linspace(0.0, 3.0, 9)
WEIGHTS = jnp.sin(jnp.arange(9 * 2.0)).reshape(9, 2)


def _solve(model, y0, ts, scale, **kw):
    kw = dict(rtol=1e-8, atol=1e-8) | kw
    return diffode.solve(model, y0, ts, scale, **kw)


def _loss(model, y0s, ts, scales, method, **kw):
    ys = jax.vmap(lambda y, s: _solve(model, y, ts, s, sensitivity=method, **kw).ys)(y0s, scales)
    return jnp.sum(jnp.sin(ys) * WEIGHTS.astype(ys.dtype))


def _max_rel(a, b):
    errs = jax.tree_util.tree_map(lambda x, y: float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y))), a, b)
    return max(jax.tree_util.tree_leaves(errs))


def test_vmapped_members_take_their_own_steps():
    """Reference: each member solved alone. Same steps, same saves (up to
    the rounding of batched matrix products and Newton iterations), explicit and implicit."""
    for solver in (diffode.Tsit5(), diffode.Kvaerno5()):
        batched = jax.jit(jax.vmap(lambda y, s: _solve(MODEL, y, TS, s, solver=solver)))(Y0S, SCALES)
        steps = []
        for m in range(Y0S.shape[0]):
            one = _solve(MODEL, Y0S[m], TS, SCALES[m], solver=solver)
            steps.append(int(one.stats["num_accepted"]))
            assert int(batched.stats["num_steps"][m]) == int(one.stats["num_steps"])
            np.testing.assert_allclose(batched.ys[m], one.ys, rtol=1e-9, atol=1e-11)
        assert len(set(steps)) > 1, "members must finish at different steps for this test to mean anything"


def test_vmap_of_vmap_and_dense():
    """Nested batches and dense output: reference, the unbatched solve."""
    y0s = Y0S.reshape(5, 1, 2)

    def run(y, s):
        sol = _solve(MODEL, y, TS, s, dense=True)
        return sol.ys, sol.evaluate(1.234)

    ys, mid = jax.jit(jax.vmap(jax.vmap(run, (0, None)), (0, 0)))(y0s, SCALES)
    one = _solve(MODEL, Y0S[3], TS, SCALES[3], dense=True)
    np.testing.assert_allclose(ys[3, 0], one.ys, rtol=1e-9)
    np.testing.assert_allclose(mid[3, 0], one.evaluate(1.234), rtol=1e-9)


@pytest.fixture
def fresh_traces():
    """JAX's trace caches cleared before and after: a solve traced in another test (the
    same function, inputs and options) would otherwise be reused without reading the
    settings a test patches."""
    jax.clear_caches()
    yield
    jax.clear_caches()


@pytest.fixture
def small_window(fresh_traces, monkeypatch):
    """A 4-step window, so that members with more steps take the steps of each earlier
    window again, from its checkpoint with the recorded times."""
    monkeypatch.setattr(direct_module, "WINDOW_BYTES", 1)
    monkeypatch.setattr(direct_module, "WINDOW_STEPS", (4, 4))


@pytest.fixture
def rerun_window(small_window, monkeypatch):
    """The 4-step window without every step's time (as for a batch of more than
    ``TIMES_STEPS`` step times): each earlier window re-runs the forward solve."""
    monkeypatch.setattr(direct_module, "TIMES_STEPS", 0)


@pytest.fixture
def small_groups(fresh_traces, monkeypatch):
    """Groups of 2 in the batched reverse pass (5 members: 3 groups, the last one
    overlapping the second), as a batch of 64 or more runs it."""
    monkeypatch.setattr(direct_module, "GROUP_MIN", 1)
    assert direct_module._group_size(5) == 2


@pytest.mark.parametrize("groups", ["whole", "grouped"])
@pytest.mark.parametrize("windows", ["one", "several", "rerun"])
def test_batched_direct_matches_unbatched(windows, groups, request):
    """grad of a loss over a vmapped batch (shared module parameters, per-member y0,
    args and shared ts), by the batched reverse pass, against the same gradient
    assembled from unbatched reverse passes, and against forward mode; the batch
    whole and in groups of members ordered by their number of steps; one window, several
    stepped forward again from checkpoints, several from re-run forward solves."""
    if windows == "several":
        request.getfixturevalue("small_window")
    if windows == "rerun":
        request.getfixturevalue("rerun_window")
    if groups == "grouped":
        request.getfixturevalue("small_groups")
    method = diffode.Direct()
    grad = eqx.filter_jit(eqx.filter_grad(lambda a: _loss(a[0], a[1], a[2], a[3], method)))
    got = grad((MODEL, Y0S, TS, SCALES))
    counts = jax.vmap(lambda y, s: _solve(MODEL, y, TS, s).stats["num_accepted"])(Y0S, SCALES)
    if windows != "one":
        assert int(jnp.max(counts)) > 8

    def one(a):
        ys = _solve(a[0], a[1], a[2], a[3], sensitivity=method).ys
        return jnp.sum(jnp.sin(ys) * WEIGHTS)

    one_grad = eqx.filter_jit(eqx.filter_grad(one))
    parts = [one_grad((MODEL, Y0S[m], TS, SCALES[m])) for m in range(5)]
    ref_model = jax.tree_util.tree_map(lambda *g: sum(g), *[p[0] for p in parts])
    assert _max_rel(got[0], ref_model) < 1e-10
    np.testing.assert_allclose(got[1], jnp.stack([p[1] for p in parts]), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got[2], sum(p[2] for p in parts), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got[3], jnp.stack([p[3] for p in parts]), rtol=1e-10)
    # Forward mode through the loop: the same discrete derivative, by another path.
    fwd = jax.jit(jax.jacfwd(lambda s: _loss(MODEL, Y0S, TS, s, method)))(SCALES)
    np.testing.assert_allclose(got[3], fwd, rtol=1e-9)
    # ts not differentiated (the training-loop case): the reverse pass leaves out the
    # time cotangents, and the other derivatives are those above.
    fixed_ts = eqx.filter_jit(eqx.filter_grad(lambda a: _loss(a[0], a[1], TS, a[2], method)))
    no_ts = fixed_ts((MODEL, Y0S, SCALES))
    assert _max_rel(no_ts[0], ref_model) < 1e-10
    np.testing.assert_allclose(no_ts[1], got[1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(no_ts[2], got[3], rtol=1e-10)


@pytest.mark.parametrize("groups", ["whole", "grouped"])
def test_batched_failure_is_not_silent(groups, request):
    """One member fails (max_steps) with throw=False: its y0 cotangent is NaN, the
    others' are exact, and the shared parameters' cotangent (a sum) is NaN."""
    if groups == "grouped":
        request.getfixturevalue("small_groups")
    scales = SCALES.at[4].set(400.0)

    def loss(model, y0s):
        ys = jax.vmap(
            lambda y, s: _solve(model, y, TS, s, throw=False, max_steps=60, sensitivity=diffode.Direct()).ys
        )(y0s, scales)
        return jnp.sum(jnp.where(jnp.isfinite(ys), jnp.sin(ys) * WEIGHTS, 0.0))

    g_model, g_y0 = eqx.filter_jit(eqx.filter_grad(lambda a: loss(*a)))((MODEL, Y0S))
    assert bool(jnp.all(jnp.isnan(g_y0[4])))
    assert all(bool(jnp.all(jnp.isnan(v))) for v in jax.tree_util.tree_leaves(g_model))
    healthy = jax.jit(
        jax.grad(
            lambda y: jnp.sum(
                jnp.sin(_solve(MODEL, y, TS, SCALES[1], max_steps=60, sensitivity=diffode.Direct()).ys)
                * WEIGHTS
            )
        )
    )
    np.testing.assert_allclose(g_y0[1], healthy(Y0S[1]), rtol=1e-8)
    with pytest.raises(Exception, match="max_steps"):
        jax.block_until_ready(
            eqx.filter_jit(
                eqx.filter_grad(lambda m: _loss(m, Y0S, TS, scales, diffode.Direct(), max_steps=60))
            )(MODEL)
        )


@pytest.mark.parametrize(
    "method", [diffode.Auto(), diffode.InterpolatingAdjoint(), diffode.BacksolveAdjoint()]
)
def test_training_step_every_method_float32(method):
    """The diffrax idiom in float32: an eqx.Module as f, vmap over y0, an optax step.
    Reference: the float64 gradient by forward mode (float32 rounding and the
    method's own error at rtol 1e-5 bound the difference)."""
    model32 = Field(8, jnp.float32, jax.random.PRNGKey(0))
    y0s = Y0S.astype(jnp.float32)
    ts = TS.astype(jnp.float32)
    scales = SCALES.astype(jnp.float32)
    opt = optax.adam(1e-2)

    @eqx.filter_jit
    def step(model, state):
        loss, grads = eqx.filter_value_and_grad(
            lambda m: _loss(m, y0s, ts, scales, method, rtol=1e-5, atol=1e-6)
        )(model)
        updates, state = opt.update(grads, state)
        return eqx.apply_updates(model, updates), state, loss, grads

    model, _, loss, grads = step(model32, opt.init(eqx.filter(model32, eqx.is_array)))
    assert loss.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(grads))
    ref = eqx.filter_jit(eqx.filter_jacfwd(lambda m: _loss(m, Y0S, TS, SCALES, diffode.Direct())))(MODEL)
    assert _max_rel(grads, ref) < 2e-3


def test_regularisers_value_and_derivatives():
    """The regularisers: positive; reverse mode (the step replay, batched and not)
    equals forward mode through the loop; under jit, vmap and grad alike.

    The regularisers are sums over the accepted steps, so two differently compiled
    programs whose rounding differs near an accept/reject decision may take
    different steps: the derivatives then agree to the tolerance (1e-6), not to
    rounding error."""

    def reg(model, y0s, scales, **kw):
        sols = jax.vmap(lambda y, s: _solve(model, y, TS, s, regularise=True, rtol=1e-6, atol=1e-6, **kw))(
            y0s, scales
        )
        return jnp.sum(
            sols.regularisers.error + 0.01 * sols.regularisers.stiffness + jnp.sum(sols.ys[:, -1], -1)
        )

    sol = _solve(MODEL, Y0S[0], TS, SCALES[0], regularise=True)
    assert float(sol.regularisers.error) > 0 and float(sol.regularisers.stiffness) > 0
    rev = eqx.filter_jit(eqx.filter_grad(lambda a: reg(*a)))((MODEL, Y0S, SCALES))
    fwd = jax.jit(jax.jacfwd(lambda s: reg(MODEL, Y0S, s)))(SCALES)
    np.testing.assert_allclose(rev[2], fwd, rtol=1e-6)
    assert float(jnp.min(jnp.abs(fwd))) > 0.1
    fwd_model = eqx.filter_jit(eqx.filter_jacfwd(lambda m: reg(m, Y0S, SCALES)))(MODEL)
    assert _max_rel(rev[0], fwd_model) < 1e-6
    # Per-member gradients (vmap of grad, the unbatched replay with checkpoints).
    per = jax.jit(
        jax.vmap(
            jax.grad(lambda s, y: reg(MODEL, y[None], s[None], sensitivity=diffode.Direct(checkpoints=2)))
        )
    )(SCALES, Y0S)
    np.testing.assert_allclose(per, fwd, rtol=1e-5)


def test_regularisers_exact_stiffness_and_error_scale():
    """Exact values and derivatives whatever the steps. For ``y' = s A y`` with ``A = -0.1 I
    + 2 J`` (``J`` the quarter turn), ``||A v|| = sqrt(4.01) ||v||`` for every ``v``, so
    every accepted step's ``S_k = |s| sqrt(4.01)`` and ``stiffness = |s| sqrt(4.01) T``:
    its derivative (reverse mode, batched) is ``sign(s) sqrt(4.01) T`` in ``s`` and 0
    in ``y0``. The error estimate of a linear problem is linear in ``y0`` at fixed steps,
    and its tolerance scale is held fixed, so the derivative in ``y0`` of ``error`` is
    ``error`` along ``y0`` (with ``atol = 0`` the scaled errors, hence the steps and
    the value, are the same at ``y0`` and ``2 y0``)."""
    a = jnp.array([[-0.1, 2.0], [-2.0, -0.1]])
    y0, t_end = jnp.array([1.0, 0.5]), 3.0

    def reg(s, y):
        sol = diffode.solve(
            lambda t, y, s: s * (a @ y),
            y,
            jnp.array([0.0, t_end]),
            s,
            rtol=1e-6,
            atol=0.0,
            regularise=True,
            sensitivity=diffode.Direct(),
        )
        return jnp.stack([sol.regularisers.stiffness, sol.regularisers.error])

    @jax.jit
    @jax.vmap
    def run(s, y):
        out, vjp = jax.vjp(reg, s, y)
        return out, jax.vmap(vjp)(jnp.eye(2))

    vals, (ds, dy) = run(jnp.array([1.5, -1.5, 1.5]), jnp.stack([y0, y0, 2 * y0]))
    np.testing.assert_allclose(vals[:, 0], 1.5 * np.sqrt(4.01) * t_end, rtol=1e-12)
    np.testing.assert_allclose(ds[:, 0], np.sqrt(4.01) * t_end * np.array([1, -1, 1]), rtol=1e-10)
    np.testing.assert_allclose(dy[:, 0], 0.0, atol=1e-10)
    # error: the same value at 2 y0 (same steps), and d/de error(y + e y) = error.
    assert float(vals[0, 1]) > 0
    np.testing.assert_allclose(vals[2, 1], vals[0, 1], rtol=1e-10)
    np.testing.assert_allclose(jnp.sum(dy[:, 1] * jnp.stack([y0, y0, 2 * y0]), -1), vals[:, 1], rtol=1e-8)


def test_regularise_errors():
    with pytest.raises(ValueError, match="explicit Runge-Kutta"):
        _solve(MODEL, Y0S[0], TS, 1.0, regularise=True, solver=diffode.Kvaerno5())
    with pytest.raises(ValueError, match="Direct"):
        _solve(MODEL, Y0S[0], TS, 1.0, regularise=True, sensitivity=diffode.InterpolatingAdjoint())


def test_batched_record_layouts():
    """The batched record keeps every step's time (and no size) exactly when the loop lands
    on a time only at the end, a step taken again is the recorded one up to rounding (no
    Newton iteration) and the times fit; otherwise the ring that re-runs the forward solve
    for earlier windows. Reference: the rule in ``batched_layout``."""
    from types import SimpleNamespace

    plain = SimpleNamespace(
        fixed=False, tstops=None, t_stop=None, events=None, max_steps=4096, solver=diffode.Tsit5()
    )

    def layout(opts, size=64, dtype=jnp.float64, tdtype=jnp.float64):
        return direct_module.batched_layout(opts, size, 2, dtype, tdtype, True)

    stepped = layout(plain)  # window: 2 MiB / (64 members x 48 bytes a row)
    assert stepped.step_times and stepped.window == 682 and stepped.stride == 682
    assert layout(plain, dtype=jnp.float32, tdtype=jnp.float32).step_times
    assert layout(SimpleNamespace(**(vars(plain) | dict(solver=diffode.Rodas5P())))).step_times
    for opts in (
        SimpleNamespace(**(vars(plain) | dict(fixed=True))),
        SimpleNamespace(**(vars(plain) | dict(tstops=(0.5,)))),
        SimpleNamespace(**(vars(plain) | dict(t_stop=0.5))),
        SimpleNamespace(**(vars(plain) | dict(solver=diffode.Kvaerno5()))),
        SimpleNamespace(**(vars(plain) | dict(solver=diffode.Radau5()))),
    ):
        assert not layout(opts).step_times
    assert not layout(plain, dtype=jnp.float32).step_times  # float32 states, float64 times
    # 2**18 step times: 64 members at 4096 steps, not 65 (nor the benchmark's 256).
    assert not layout(plain, size=65).step_times
    ring = layout(plain, size=256)  # the window and two rows: 2 MiB / (256 x 48) = 170 steps
    assert not ring.step_times and (ring.stride, ring.rows) == (1, 172)


def test_batched_direct_fixed_steps_and_times():
    """Fixed steps land on the save times, so the save times are differentiated through
    the landing steps: the batched reverse pass against forward mode, for ts and y0."""

    def loss(y0s, ts):
        ys = jax.vmap(
            lambda y, s: _solve(MODEL, y, ts, s, adaptive=False, dt0=0.2, sensitivity=diffode.Direct()).ys
        )(y0s, SCALES)
        return jnp.sum(jnp.sin(ys) * WEIGHTS)

    rev = jax.jit(jax.grad(loss, argnums=(0, 1)))(Y0S, TS)
    fwd = jax.jit(jax.jacfwd(loss, argnums=(0, 1)))(Y0S, TS)
    assert float(jnp.max(jnp.abs(fwd[1]))) > 0.1
    for r, f in zip(rev, fwd):
        np.testing.assert_allclose(r, f, rtol=1e-10, atol=1e-12)
