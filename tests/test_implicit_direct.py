"""Reverse mode (``Direct``) through SDIRK/ESDIRK steps, differentiated by the implicit function theorem.

Each step's stages come out of ``lax.custom_root``: the derivative is the exact
IFT derivative at the converged stages. References:

- forward mode through the same solve (``sensitivity=Direct()`` with
  ``jax.jacfwd``). Both are exact derivatives of discrete maps that differ only
  in their converged stages: the forward loop's Newton starts from the carried
  stage derivative ``f0 = k_s`` and a possibly stale Jacobian, the ``Direct``
  replay from ``f0 = f(t, y)`` and a fresh one. Both stop when the scaled
  Newton increment is below ``kappa`` (default 1e-2) times the tolerance, so the
  stages, and with them the derivatives, differ by ~``kappa * rtol`` per step,
  accumulated over the steps. Bound: ``1e3 * kappa * rtol`` relative. Measured
  ratios to ``kappa * rtol``: 5 (Kvaerno5), 10 (Kvaerno3); with ``kappa = 1e-4``
  the discrepancy drops 10-100x, which confirms its origin. A missing term
  (e.g. no derivative through ``f``'s args, or through ``f0``) is O(1) off.
- closed forms on a stiff linear problem ``y' = V diag(-lam) V^-1 y``: the exact
  solution's derivatives (to the discretisation error, a few ``rtol``), and for
  fixed-step implicit Euler the exact derivative of the discrete scheme
  ``y_N = V diag((1 + h lam)^-N) V^-1 y0`` (to rounding).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode
from diffode.problems import lotka_volterra
from diffode.sensitivity.direct import Direct
from diffode.solvers.sdirk import ImplicitEuler, Kvaerno3, Kvaerno5


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _lv_loss(y0, ts, args, sens, solver, tol, **kw):
    p = lotka_volterra()
    sol = diffode.solve(p.f, y0, ts, args, solver=solver, rtol=tol, atol=tol, sensitivity=sens, **kw)
    return jnp.sum(sol.ys**2) + jnp.sum(jnp.sin(sol.ys[:, 0]))


@pytest.mark.parametrize(
    "solver, tol, kw",
    [
        (Kvaerno5(), 1e-8, {}),
        (Kvaerno3(), 1e-6, {}),
        (ImplicitEuler(), 1e-8, {"dt0": 0.01, "adaptive": False}),
    ],
    ids=["kvaerno5", "kvaerno3", "implicit-euler-fixed"],
)
def test_lotka_volterra_matches_forward_mode(solver, tol, kw):
    # Gradients w.r.t. y0, ts and the parameters; see the module docstring for
    # the bound. Measured max relative differences: 5.3e-10 (Kvaerno5, bound
    # 1e-7), 1.0e-7 (Kvaerno3, bound 1e-5), 1.3e-8 (implicit Euler, 1000 steps,
    # bound 1e-7).
    p = lotka_volterra()
    ts = jnp.linspace(0.0, 10.0, 13)
    argnums = (0, 1, 2)
    ref = jax.jit(jax.jacfwd(lambda *a: _lv_loss(*a, Direct(), solver, tol, **kw), argnums))(p.y0, ts, p.args)
    got = jax.jit(jax.grad(lambda *a: _lv_loss(*a, Direct(), solver, tol, **kw), argnums))(p.y0, ts, p.args)
    bound = 1e3 * solver.kappa * tol
    for g, r in zip(got, ref):
        assert np.all(np.isfinite(np.asarray(g)))
        assert _rel(g, r) < bound


# Stiff linear problem with eigenvalues -1, -1e2, -1e4 (a well-conditioned V).
_V = np.array([[1.0, 0.3, -0.2], [0.1, 1.0, 0.4], [-0.3, 0.2, 1.0]])
_VI = np.linalg.inv(_V)
_LAM = np.array([1.0, 1e2, 1e4])
_Y0 = np.array([1.0, -0.5, 2.0])
_W = np.array([0.7, -1.2, 0.4])


def _stiff_rhs(t, y, lam):
    return jnp.asarray(_V) @ (-lam * (jnp.asarray(_VI) @ y))


def _stiff_loss(y0, lam, ts, sens, solver, **kw):
    ys = diffode.solve(_stiff_rhs, y0, jnp.asarray(ts), lam, solver=solver, sensitivity=sens, **kw).ys
    return jnp.sum(ys[1:] @ jnp.asarray(_W))


def _stiff_grads(ts, decay):
    """Gradients of ``sum_k W . V diag(decay(lam, t_k)) V^-1 y0`` w.r.t. ``y0`` and ``lam``,
    ``decay`` returning the diagonal and its derivative in ``lam``."""
    g_y0, g_lam = np.zeros(3), np.zeros(3)
    u, wv = _VI @ _Y0, _V.T @ _W
    for t in ts[1:]:
        e, de = decay(_LAM, t)
        g_y0 += (_V @ np.diag(e) @ _VI).T @ _W
        g_lam += de * u * wv
    return g_y0, g_lam


def test_kvaerno5_stiff_linear_against_expm_and_forward_mode():
    ts = np.array([0.0, 1e-3, 0.05, 1.0])
    kw = {"rtol": 1e-8, "atol": 1e-10}
    args = (jnp.asarray(_Y0), jnp.asarray(_LAM))
    ref = jax.jit(jax.jacfwd(lambda y0, lam: _stiff_loss(y0, lam, ts, Direct(), Kvaerno5(), **kw), (0, 1)))(
        *args
    )
    got = jax.jit(jax.grad(lambda y0, lam: _stiff_loss(y0, lam, ts, Direct(), Kvaerno5(), **kw), (0, 1)))(
        *args
    )
    exact = _stiff_grads(ts, lambda lam, t: (np.exp(-lam * t), -t * np.exp(-lam * t)))
    for g, r, e in zip(got, ref, exact):
        # f is linear: Newton with the exact J converges in one iteration, so
        # both discrete maps have the same stages up to rounding (measured 1e-15).
        assert _rel(g, r) < 1e-12
        # Discretisation error of the derivative, like the solution's: a few
        # rtol (measured 4e-9 for y0, 1.8e-8 for lam; bound 20 rtol).
        assert _rel(g, e) < 2e-7


def test_implicit_euler_fixed_steps_exact_discrete_derivative():
    # Fixed steps h: y_N = V diag((1 + h lam)^-N) V^-1 y0 exactly, so the
    # derivative of the scheme is known in closed form; the comparison is at
    # rounding level (the Newton iterate of a linear f is exact after one
    # iteration with the exact J). Measured 1e-15; bound 1e-12.
    h = 0.01
    ts = np.array([0.0, 0.05, 0.2, 0.5])

    def decay(lam, t):
        n = round(t / h)
        return (1 + h * lam) ** -n, -n * h * (1 + h * lam) ** (-n - 1)

    loss = lambda y0, lam: _stiff_loss(y0, lam, ts, Direct(), ImplicitEuler(), dt0=h, adaptive=False)
    got = jax.jit(jax.grad(loss, (0, 1)))(jnp.asarray(_Y0), jnp.asarray(_LAM))
    for g, e in zip(got, _stiff_grads(ts, decay)):
        assert _rel(g, e) < 1e-12
