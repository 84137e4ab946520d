"""ForwardSensitivity: derivatives of solve from the forward sensitivity equations,
in forward mode (jvp/jacfwd), reverse mode (grad/jacrev) and second order."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode
from diffode import problems
from diffode.sensitivity.forward import ForwardSensitivity

JACS = {"jacfwd": jax.jacfwd, "jacrev": jax.jacrev}
FORWARD = ForwardSensitivity()


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.abs(a - b).max() / np.abs(b).max()


def _ys(f, y0, ts, args, sens=FORWARD, **kw):
    kw = {"rtol": 1e-10, "atol": 1e-10, **kw}
    return diffode.solve(f, y0, ts, args, sensitivity=sens, **kw).ys


# --------------------------------------------------------------------------
# Lotka-Volterra against independent reference sensitivities.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["jacfwd", "jacrev"])
def test_lotka_volterra_all_derivatives(mode):
    p = problems.lotka_volterra()
    ts = p.ts(11)
    _, d_y0, d_p, d_ts = problems.lotka_volterra_sensitivities(ts)
    jac = JACS[mode](lambda y0, ts, a: _ys(p.f, y0, ts, a), argnums=(0, 1, 2))
    g_y0, g_ts, g_p = jax.jit(jac)(p.y0, ts, p.args)
    # The reference is accurate to ~1e-11; rtol = atol = 1e-10 gives ~1e-9 here.
    assert rel(g_y0, d_y0) < 1e-6
    assert rel(g_p, d_p) < 1e-6
    assert rel(g_ts, d_ts) < 1e-6
    # ts[0] and ts[-1] specifically (ts[0] moves the start, ts[-1] the last save).
    assert rel(g_ts[:, :, 0], d_ts[:, :, 0]) < 1e-6
    assert rel(g_ts[-1, :, -1], d_ts[-1, :, -1]) < 1e-6
    assert np.abs(np.asarray(g_ts[0])).max() == 0  # ys[0] = y0 whatever ts is


def test_backwards_in_time():
    """Decreasing ts: reverse the reference problem (y(10) -> y(0))."""
    p = problems.lotka_volterra()
    ts = p.ts(6)
    ys = problems.lotka_volterra_reference(ts)
    back = jnp.asarray(ts[::-1])
    y_end = jnp.asarray(ys[-1])
    g = jax.jit(jax.jacrev(lambda y: _ys(p.f, y, back, p.args)[-1]))(y_end)
    _, d_y0, _, _ = problems.lotka_volterra_sensitivities(ts)
    # Going backwards inverts the forward flow's Jacobian.
    assert rel(g, np.linalg.inv(d_y0[-1])) < 1e-6


# --------------------------------------------------------------------------
# Closed forms.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["jacfwd", "jacrev"])
def test_linear_system_against_expm(mode):
    p = problems.linear_system()
    ts = jnp.linspace(0.0, 3.0, 4)

    def exact(a, y0, t1):
        return problems.linear_solution(a, y0, ts.at[-1].set(t1))[-1]

    def ours(a, y0, t1):
        return _ys(p.f, y0, ts.at[-1].set(t1), a)[-1]

    t1 = ts[-1]
    want = jax.jacfwd(exact, argnums=(0, 1, 2))(p.args, p.y0, t1)
    got = jax.jit(JACS[mode](ours, argnums=(0, 1, 2)))(p.args, p.y0, t1)
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-7


def test_exponential_decay_closed_form():
    p = problems.exponential_decay()
    ts = p.ts(5)
    y0, k = p.y0, p.args
    g_k, g_y0 = jax.jit(jax.jacrev(lambda k, y0: _ys(p.f, y0, ts, k), argnums=(0, 1)))(k, y0)
    e = np.exp(-np.asarray(k)[None] * np.asarray(ts)[:, None])  # (T, 3)
    want_k = np.einsum("ti,ij->tij", -np.asarray(ts)[:, None] * np.asarray(y0)[None] * e, np.eye(3))
    want_y0 = np.einsum("ti,ij->tij", e, np.eye(3))
    assert rel(g_k, want_k) < 1e-8
    assert rel(g_y0, want_y0) < 1e-8


def test_closed_over_constants_carry_no_sensitivities():
    """A closure over a large constant table (a forcing profile): the augmented system
    carries sensitivities for the differentiated rate only. Reference: y = y0 exp(-k t)
    plus the forcing's closed form, since the table only shifts the constant input."""
    table = jnp.linspace(0.0, 1.0, 4000)  # not differentiated; its sum is the forcing
    y0, ts = jnp.asarray([1.0, 2.0]), jnp.linspace(0.0, 2.0, 50)

    def f(t, y, k):
        return -k * y + jnp.sum(table) / 2000.0  # a constant forcing of 1.0005

    def ys(k):
        return _ys(f, y0, ts, k)

    g = jax.jit(jax.jacfwd(ys))
    got = g(0.7)
    c, k, t = float(jnp.sum(table)) / 2000.0, 0.7, np.asarray(ts)[:, None]
    # y = c/k + (y0 - c/k) e^{-kt}; dy/dk = -c/k^2 + (c/k^2) e^{-kt} - t (y0 - c/k) e^{-kt}
    want = -c / k**2 + (c / k**2) * np.exp(-k * t) - t * (np.asarray(y0) - c / k) * np.exp(-k * t)
    assert rel(got, want) < 1e-7
    # Sensitivities of 2 states to 1 rate, 50 saves: a few KiB. Carried for the table's
    # 4000 entries too they would take 50 x 2 x 4001 x 8 bytes = 3.2 MB of saves alone.
    mem = g.lower(0.7).compile().memory_analysis()
    assert mem.temp_size_in_bytes + mem.output_size_in_bytes < 1_000_000


# --------------------------------------------------------------------------
# Error control on and off.
# --------------------------------------------------------------------------


def test_error_control_on_and_off():
    p = problems.lotka_volterra()
    ts = p.ts(11)
    _, _, d_p, _ = problems.lotka_volterra_sensitivities(ts)

    def run(ec):
        def fn(a):
            sol = diffode.solve(p.f, p.y0, ts, a, sensitivity=ForwardSensitivity(ec), rtol=1e-10, atol=1e-10)
            return sol.ys, sol.stats["num_steps"]

        g, steps = jax.jit(jax.jacrev(fn, has_aux=True))(p.args)
        return g, int(steps)

    g_on, steps_on = run(True)
    g_off, steps_off = run(False)
    assert rel(g_on, d_p) < 1e-6
    assert rel(g_off, d_p) < 1e-6
    assert steps_off <= steps_on
    # Steps chosen for y alone are the plain solve's steps (same controller input).
    plain = diffode.solve(p.f, p.y0, ts, p.args, rtol=1e-10, atol=1e-10)
    assert abs(steps_off - int(plain.stats["num_steps"])) <= 2
    assert steps_on > steps_off  # the sensitivities do constrain the step here


# --------------------------------------------------------------------------
# Modes agree; second derivatives.
# --------------------------------------------------------------------------


def test_jacfwd_jacrev_and_hessian():
    p = problems.lotka_volterra()
    ts = p.ts(5)

    def loss(a, sens=FORWARD):
        return jnp.sum(_ys(p.f, p.y0, ts, a, sens, rtol=1e-9, atol=1e-9) ** 2)

    grad = jax.jit(jax.grad(loss))
    g_rev = grad(p.args)
    g_fwd = jax.jit(jax.jacfwd(loss))(p.args)
    assert rel(g_rev, g_fwd) < 1e-7
    # Reference Hessian: central differences of the gradient (step 1e-4 relative:
    # truncation ~1e-8, tolerance noise ~1e-9 / 1e-4 = 1e-5 relative).
    eps = 1e-4 * np.asarray(p.args)
    h_ref = np.stack(
        [
            (np.asarray(grad(p.args.at[j].add(eps[j]))) - np.asarray(grad(p.args.at[j].add(-eps[j]))))
            / (2 * eps[j])
            for j in range(4)
        ],
        axis=1,
    )
    h_fwd_rev = jax.jit(jax.hessian(loss))(p.args)  # forward over reverse
    h_rev_fwd = jax.jit(jax.jacrev(jax.jacfwd(loss)))(p.args)
    assert rel(h_fwd_rev, h_ref) < 1e-4
    assert rel(h_rev_fwd, h_ref) < 1e-4
    assert rel(h_fwd_rev, h_fwd_rev.T) < 1e-6


# --------------------------------------------------------------------------
# Transformations and pytree arguments.
# --------------------------------------------------------------------------


def test_jit_and_vmap():
    p = problems.lotka_volterra()
    ts = p.ts(5)
    _, _, d_p, _ = problems.lotka_volterra_sensitivities(ts)
    _, _, d_p2, _ = problems.lotka_volterra_sensitivities(ts, params=(1.4, 1.1, 3.0, 1.0))
    batch = jnp.stack([p.args, jnp.asarray([1.4, 1.1, 3.0, 1.0])])
    for jac in (jax.jacfwd, jax.jacrev):
        g = jax.jit(jax.vmap(jac(lambda a: _ys(p.f, p.y0, ts, a))))(batch)
        assert rel(g[0], d_p) < 1e-6
        assert rel(g[1], d_p2) < 1e-6


def test_equinox_mlp_args():
    mlp = eqx.nn.MLP(2, 2, 4, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    mlp = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, mlp)

    def f(t, y, m):
        return m(y) - y

    y0 = jnp.asarray([0.5, -0.3])
    ts = jnp.linspace(0.0, 1.0, 4)

    def loss(m, sens):
        return jnp.sum(_ys(f, y0, ts, m, sens) ** 2)

    ref = eqx.filter_jit(eqx.filter_jacfwd(lambda m: loss(m, None)))(mlp)  # through the solver steps
    for grad in (eqx.filter_grad, eqx.filter_jacfwd):
        got = eqx.filter_jit(grad(lambda m: loss(m, ForwardSensitivity())))(mlp)
        for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
            assert np.allclose(g, r, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------
# Implicit solver on a stiff problem.
# --------------------------------------------------------------------------


def _robertson_fd_reference(ts, k, rel_step=1e-3):
    """Central differences of SciPy Radau solves at rtol = 1e-12 (independent of diffode)."""
    from scipy.integrate import solve_ivp

    def rhs(t, y, k):
        return np.array(
            [
                -k[0] * y[0] + k[2] * y[1] * y[2],
                k[0] * y[0] - k[2] * y[1] * y[2] - k[1] * y[1] ** 2,
                k[1] * y[1] ** 2,
            ]
        )

    def solve(k):
        s = solve_ivp(
            rhs,
            (ts[0], ts[-1]),
            [1.0, 0.0, 0.0],
            method="Radau",
            t_eval=ts,
            args=(k,),
            rtol=1e-12,
            atol=1e-16,
        )
        assert s.success
        return s.y.T

    out = np.zeros((len(ts), 3, 3))
    for j in range(3):
        dk = rel_step * k[j]
        up, dn = np.array(k), np.array(k)
        up[j] += dk
        dn[j] -= dk
        out[:, :, j] = (solve(up) - solve(dn)) / (2 * dk)
    return out


@pytest.mark.parametrize("solver", [diffode.Radau5(), diffode.Rodas5P()], ids=["Radau5", "Rodas5P"])
def test_robertson_rate_constants(solver):
    p = problems.robertson()
    ts = jnp.asarray([0.0, 0.4, 4.0, 40.0])
    ref = _robertson_fd_reference(np.asarray(ts), np.asarray(problems.ROBERTSON_K))
    g = jax.jit(jax.jacrev(lambda k: _ys(p.f, p.y0, ts, k, solver=solver, rtol=1e-9, atol=1e-12)))(p.args)
    # Per component and parameter, relative to that sensitivity's size. Central
    # differences with a 1e-3 relative step are accurate to ~1e-6 relative here.
    scale = np.abs(ref).max(axis=0, keepdims=True)
    assert (np.abs(np.asarray(g) - ref) / scale).max() < 1e-4


# --------------------------------------------------------------------------
# Failures and bad input.
# --------------------------------------------------------------------------


def test_failed_solve_is_visible():
    p = problems.lotka_volterra()
    ts = p.ts(5)

    def fn(a):
        sol = diffode.solve(p.f, p.y0, ts, a, sensitivity=ForwardSensitivity(), max_steps=5, throw=False)
        return sol.ys[-1], sol.status

    g, status = jax.jit(jax.jacrev(fn, has_aux=True))(p.args)
    assert int(status) == diffode.Status.MAX_STEPS_REACHED
    assert np.all(np.isnan(np.asarray(g)))
    g_fwd, _ = jax.jit(jax.jacfwd(fn, has_aux=True))(p.args)
    assert np.all(np.isnan(np.asarray(g_fwd)))
    # throw=True: the status check raises (value_and_grad keeps the checked value alive under jit).
    with pytest.raises(Exception, match="max_steps"):
        jax.jit(jax.value_and_grad(lambda a: jnp.sum(_ys(p.f, p.y0, ts, a, max_steps=5))))(p.args)


def test_bad_input():
    with pytest.raises(TypeError, match="ForwardSensitivity"):
        ForwardSensitivity(error_control="yes")
    p = problems.exponential_decay()
    with pytest.raises(TypeError, match="ForwardSensitivity: args.*complex"):
        diffode.solve(
            lambda t, y, a: -jnp.real(a) * y,
            p.y0,
            p.ts(3),
            p.args.astype(jnp.complex128),
            sensitivity=ForwardSensitivity(),
        )
