"""Reverse mode (``sensitivity=Direct()``) through Radau5 steps, whose stages are
differentiated by the implicit function theorem (``lax.custom_root``).

References:
- forward mode through the same solve (``sensitivity=Direct()``, ``jax.jacfwd``), which
  uses the same IFT derivative at the forward solve's stages. Direct replays each
  step from the init state (fresh Jacobian, zero starting values, Newton polished
  to ``kappa/100``), so its stages differ from the forward ones by the forward
  solve's Newton error, about ``kappa * tol`` (``kappa = 1e-4`` at rtol 1e-8): the
  two gradients agree to that level times the problem's amplification, not to
  rounding;
- Robertson's gradient with respect to its rate constants from the forward
  sensitivity equations, solved by SciPy ``Radau`` at rtol 1e-12.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode
from diffode import problems
from diffode.sensitivity.direct import Direct
from diffode.solvers.radau import Radau5


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _loss(p, tol, sens, y0, ts, args):
    sol = diffode.solve(
        p.f, y0, ts, args, solver=Radau5(), rtol=tol, atol=tol, sensitivity=sens, max_steps=4000
    )
    return jnp.sum(sol.ys[:, 0] ** 2) + jnp.sum(jnp.sin(sol.ys[:, 1]))


@pytest.mark.parametrize(
    "name, checkpoints",
    [("lotka_volterra", 5), ("van_der_pol_stiff", None)],
)
def test_direct_matches_forward_mode(name, checkpoints):
    # Derivatives with respect to y0, the save times and the parameters.
    # Lotka-Volterra over [0, 10] (save times inside steps and the landing step;
    # replay from checkpoints), and Van der Pol with mu = 1000 over [0, 800]
    # (stiff, 132 steps along the slow manifold up to just before the first jump).
    # Observed relative differences: LV 1.3e-10, 7e-11, 7e-11 (y0, ts, args);
    # VdP 1.0e-9, 3e-10, 1.8e-9. Bound 1e-8: the Newton error (kappa * tol ~ 1e-12
    # relative per step) times the growth of the sensitivities along VdP, with a
    # 5x margin. (Recomputing VdP's states from checkpoints adds the Newton errors
    # of the replayed trajectory: 4e-8, hence checkpoints on LV only.)
    p = getattr(problems, name)()
    t1 = 10.0 if name == "lotka_volterra" else 800.0
    ts = jnp.linspace(0.0, t1, 7)
    argnums = (0, 1, 2)
    ref = jax.jit(jax.jacfwd(functools.partial(_loss, p, 1e-8, Direct()), argnums))(p.y0, ts, p.args)
    got = jax.jit(jax.grad(functools.partial(_loss, p, 1e-8, Direct(checkpoints)), argnums))(p.y0, ts, p.args)
    if name == "lotka_volterra":
        # And against the derivative of the exact solution, which catches an IFT
        # error common to both modes (e.g. the stages' dependence on h dropped:
        # 7e-4 in the ts derivative, through the step that lands on ts[-1]).
        # Observed 6e-10 (y0), 7e-10 (args): the discretisation error at tol
        # 1e-8, bound 1e-7; 2.7e-7 (ts): the collocation polynomial's slope at
        # the interpolated save times is f to O(h^3) only, bound 3e-6.
        ys, s_y0, s_p, s_ts = problems.lotka_volterra_sensitivities(ts)
        dl_dys = np.stack([2 * ys[:, 0], np.cos(ys[:, 1])], axis=1)
        exact = [np.einsum("ij,ij...->...", dl_dys, s) for s in (s_y0, s_ts, s_p)]
        for g, e, bound in zip(got, exact, (1e-7, 3e-6, 1e-7)):
            assert _rel(g, e) < bound, (_rel(g, e), g, e)
    for g, r in zip(got, ref):
        assert np.all(np.isfinite(np.asarray(g)))
        assert _rel(g, r) < 1e-8, (_rel(g, r), g, r)


# ----------------------------------------------------------------------------
# Robertson: gradient with respect to (k1, k2, k3) against the forward
# sensitivity equations. In log-parameters, s_j = k_j dy/dk_j, so that all
# sensitivities are of the size of y and SciPy's atol applies uniformly.
# ----------------------------------------------------------------------------

ROB_TS = np.array([0.0, 1e-3, 0.1, 1.0, 10.0, 100.0])
ROB_W = np.array([1.0, 1e4, 1.0])  # y2 ~ 4e-5: weighted to count in the loss


def _rob_log_sensitivity_np(t, u, k):
    k1, k2, k3 = k
    y, s = u[:3], u[3:].reshape(3, 3)
    f = np.array(
        [-k1 * y[0] + k3 * y[1] * y[2], k1 * y[0] - k3 * y[1] * y[2] - k2 * y[1] ** 2, k2 * y[1] ** 2]
    )
    jac = np.array(
        [
            [-k1, k3 * y[2], k3 * y[1]],
            [k1, -k3 * y[2] - 2 * k2 * y[1], -k3 * y[1]],
            [0.0, 2 * k2 * y[1], 0.0],
        ]
    )
    dfdk = np.array(
        [  # column j: df/dk_j
            [-y[0], 0.0, y[1] * y[2]],
            [y[0], -(y[1] ** 2), -y[1] * y[2]],
            [0.0, y[1] ** 2, 0.0],
        ]
    )
    return np.concatenate([f, (jac @ s + dfdk * k).ravel()])


def test_direct_robertson_rate_constants():
    from scipy.integrate import solve_ivp

    k = np.array(problems.ROBERTSON_K)
    ref = solve_ivp(
        _rob_log_sensitivity_np,
        (0.0, ROB_TS[-1]),
        np.r_[1.0, 0.0, 0.0, np.zeros(9)],
        method="Radau",
        rtol=1e-12,
        atol=1e-16,
        t_eval=ROB_TS,
        args=(k,),
    )
    assert ref.success
    ys, sens = ref.y[:3].T, ref.y[3:].T.reshape(-1, 3, 3)
    # L = sum_i W . y(t_i)^2, dL/dk_j = sum_i 2 W y(t_i) . s_j(t_i) / k_j.
    expected = np.einsum("j,ij,ijk->k", 2 * ROB_W, ys, sens) / k

    p = problems.robertson()

    def loss(rates):
        sol = diffode.solve(
            p.f,
            p.y0,
            jnp.asarray(ROB_TS),
            rates,
            solver=Radau5(),
            rtol=1e-8,
            atol=1e-14,
            sensitivity=Direct(),
            max_steps=4000,
        )
        return jnp.sum(jnp.asarray(ROB_W) * sol.ys**2)

    got = np.asarray(jax.jit(jax.grad(loss))(p.args))
    # Per-parameter relative error (the three gradients span 9 decades): observed
    # 2.9e-10, 7.6e-10, 7.6e-10 at rtol 1e-8 (5e-8 at rtol 1e-6, 9e-12 at 1e-10:
    # the discretisation error of the solve, tracking rtol). Bound 10 rtol.
    err = np.abs(got - expected) / np.abs(expected)
    assert err.max() < 1e-7, (err, got, expected)
