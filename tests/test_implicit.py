"""SDIRK/ESDIRK solvers (ImplicitEuler, Kvaerno3, Kvaerno5): order, stiff accuracy, Newton, transforms."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode
from diffode import problems
from diffode.solvers.butcher import ButcherTableau
from diffode.solvers.linear import GMRES, LU
from diffode.solvers.sdirk import (
    IMPLICIT_EULER_TABLEAU,
    KVAERNO3_TABLEAU,
    KVAERNO5_TABLEAU,
    SDIRK,
    ImplicitEuler,
    Kvaerno3,
    Kvaerno5,
)

# ----------------------------------------------------------------------------
# Tableaus.
# ----------------------------------------------------------------------------


def order_conditions(a, b, c, p):
    """Residuals of the Runge-Kutta order conditions up to order ``p`` (p <= 5)."""
    A = a
    conds = [b.sum() - 1]
    if p >= 2:
        conds += [b @ c - 1 / 2]
    if p >= 3:
        conds += [b @ c**2 - 1 / 3, b @ A @ c - 1 / 6]
    if p >= 4:
        conds += [b @ c**3 - 1 / 4, b @ (c * (A @ c)) - 1 / 8, b @ A @ c**2 - 1 / 12, b @ A @ A @ c - 1 / 24]
    if p >= 5:
        conds += [
            b @ c**4 - 1 / 5,
            b @ (c**2 * (A @ c)) - 1 / 10,
            b @ ((A @ c) ** 2) - 1 / 20,
            b @ (c * (A @ c**2)) - 1 / 15,
            b @ (c * (A @ A @ c)) - 1 / 30,
            b @ A @ c**3 - 1 / 20,
            b @ A @ (c * (A @ c)) - 1 / 40,
            b @ A @ A @ c**2 - 1 / 60,
            b @ A @ A @ A @ c - 1 / 120,
        ]
    return np.abs(np.array(conds))


@pytest.mark.parametrize(
    "tab, p, p_hat", [(KVAERNO3_TABLEAU, 3, 2), (KVAERNO5_TABLEAU, 5, 4)], ids=["Kvaerno3", "Kvaerno5"]
)
def test_kvaerno_order_conditions_and_l_stability(tab, p, p_hat):
    a, b, c = tab.a, tab.b, tab.c
    b_hat = b - tab.b_error
    # The coefficients are printed to ~17 digits: conditions hold to rounding.
    assert order_conditions(a, b, c, p).max() < 1e-14
    assert order_conditions(a, b_hat, c, p_hat).max() < 1e-14
    # ...and the next order fails clearly (the orders are exact, not higher;
    # conditions are listed up to order 5 only).
    if p < 5:
        assert order_conditions(a, b, c, p + 1).max() > 1e-3
    assert order_conditions(a, b_hat, c, p_hat + 1).max() > 1e-3
    # L-stability: R(z) = 1 + z b^T (I - z A)^{-1} 1 -> 0 as z -> -inf
    # (stiffly accurate with non-singular implicit part, Kvaerno 2004).
    s = tab.num_stages
    for z in (-1e6, -1e8):
        r = 1 + z * b @ np.linalg.solve(np.eye(s) - z * a, np.ones(s))
        assert abs(r) < 10 / abs(z)


def test_solver_attributes():
    for cls, order, err_order in ((ImplicitEuler, 1, 2), (Kvaerno3, 3, 3), (Kvaerno5, 5, 5)):
        s = cls()
        assert s.order == order and s.error_order == err_order
        assert s.embedded
        assert s.stat_names == ("num_jac_evals", "num_lu_decomps", "num_newton_iters")
    assert ImplicitEuler().tableau is IMPLICIT_EULER_TABLEAU


def test_sdirk_rejects_unsuitable_tableaus():
    with pytest.raises(ValueError, match="stiffly accurate"):
        # Implicit midpoint: not stiffly accurate.
        SDIRK(tableau=ButcherTableau(a=[[0.5]], b=[1.0], c=[0.5], order=2))
    with pytest.raises(ValueError, match="gamma"):
        SDIRK(tableau=ButcherTableau(a=[[0.0, 0.0], [1.0, 0.0]], b=[1.0, 0.0], c=[0.0, 1.0], order=1))
    with pytest.raises(ValueError, match="lower-triangular"):
        SDIRK(tableau=ButcherTableau(a=[[0.5, 0.5], [0.5, 0.5]], b=[0.5, 0.5], c=[1.0, 1.0], order=1))
    with pytest.raises(ValueError, match="max_iters"):
        Kvaerno3(max_iters=0)


# ----------------------------------------------------------------------------
# Empirical convergence order with fixed steps.
# ----------------------------------------------------------------------------

LIN = problems.linear_system()
KEPLER = problems.rescaled_kepler(t1=6.0)
P = 2.0 ** -np.arange(12)

# An SDIRK without an explicit stage exercises the other branch of the generic
# stepper: Alexander's 2-stage, order-2, L-stable, stiffly accurate method
# (Alexander 1977, "Diagonally implicit Runge-Kutta methods for stiff
# O.D.E.'s", SIAM J. Numer. Anal. 14(6)); no error estimate, fixed steps only.
_G2 = 1 - 1 / np.sqrt(2)
ALEXANDER2_TABLEAU = ButcherTableau(
    a=[[_G2, 0.0], [1 - _G2, _G2]], b=[1 - _G2, _G2], c=[_G2, 1.0], order=2, name="Alexander2"
)


class Alexander2(SDIRK):
    tableau: ButcherTableau = eqx.field(static=True, default=ALEXANDER2_TABLEAU)


# (solver, order, problem, dts). The ranges sit in the asymptotic regime (local
# slopes measured 0.98-1.00, 2.01-2.02, 3.00-3.01, 5.00-5.02), with errors between 0.25 and
# 1e-8, above the Newton floor set by rtol = 1e-12. Kepler (nonlinear,
# non-autonomous) exercises all order conditions; implicit Euler's
# first-order error on it is O(1) at affordable steps, so it uses y' = A y.
ORDER_CASES = [
    (ImplicitEuler, 1, LIN, P[5:9]),
    (Alexander2, 2, KEPLER, P[4:8]),
    (Kvaerno3, 3, KEPLER, P[3:7]),
    (Kvaerno5, 5, KEPLER, P[3:6]),
]


@pytest.mark.parametrize(
    "solver_cls, order, problem, dts", ORDER_CASES, ids=[c[0].__name__ for c in ORDER_CASES]
)
def test_convergence_order(solver_cls, order, problem, dts):
    ts = jnp.linspace(0.0, 8.0, 5) if problem is LIN else problem.ts(4)
    exact = np.asarray(jax.vmap(problem.exact)(ts))
    # Fixed steps use rtol/atol only for the Newton iterations: tight, so that
    # the discretisation error dominates.
    fn = eqx.filter_jit(
        lambda dt: (
            diffode.solve(
                problem.f,
                problem.y0,
                ts,
                problem.args,
                solver=solver_cls(),
                dt0=dt,
                adaptive=False,
                max_steps=8192,
                rtol=1e-12,
                atol=1e-12,
            ).ys
        )
    )
    errors = np.array([np.abs(np.asarray(fn(jnp.asarray(dt))) - exact).max() for dt in dts])
    assert np.all(errors > 1e-10) and np.all(errors < 1.0), errors
    slope = np.polyfit(np.log(dts), np.log(errors), 1)[0]
    # +-0.3 as for the explicit methods: far too narrow for a neighbouring order.
    assert abs(slope - order) < 0.3, (slope, errors)


# ----------------------------------------------------------------------------
# A stiff linear system against expm.
# ----------------------------------------------------------------------------

# y' = A y with A = V diag(-1, -1e3, -1e5, -10 +- 5i-block) V^-1, V non-orthogonal:
# stiffness ratio 1e5, non-normal coupling. Exact y(t) = expm(A t) y0.
_V = np.array(
    [
        [1.0, 0.5, 0.2, 0.0, 0.1],
        [0.0, 1.0, 0.3, 0.4, 0.0],
        [0.2, 0.0, 1.0, 0.0, 0.3],
        [0.0, 0.1, 0.0, 1.0, 0.5],
        [0.3, 0.0, 0.0, 0.2, 1.0],
    ]
)
_D = np.zeros((5, 5))
_D[0, 0], _D[1, 1], _D[2, 2] = -1.0, -1e3, -1e5
_D[3:, 3:] = [[-10.0, 5.0], [-5.0, -10.0]]
STIFF_A = _V @ _D @ np.linalg.inv(_V)
STIFF_Y0 = np.array([1.0, -1.0, 2.0, 0.5, 1.0])


def stiff_rhs(t, y, args):
    return args @ y


def expm_stiff(t):
    """``expm(STIFF_A t) = V expm(D t) V^-1`` with ``expm(D t)`` in closed form.

    ``jax.scipy.linalg.expm(STIFF_A * t)`` itself returns NaN for ``t >~ 1``
    (scaling and squaring of a matrix of norm ~1e5 t overflows); for small
    ``t`` the two agree (checked in :func:`test_expm_stiff_matches_jax_expm`).
    """
    e = np.zeros((5, 5))
    e[0, 0], e[1, 1], e[2, 2] = np.exp(-t), np.exp(-1e3 * t), np.exp(-1e5 * t)
    r = np.exp(-10 * t)
    e[3:, 3:] = [[r * np.cos(5 * t), r * np.sin(5 * t)], [-r * np.sin(5 * t), r * np.cos(5 * t)]]
    return _V @ e @ np.linalg.inv(_V)


def stiff_exact(ts):
    return np.stack([expm_stiff(float(t)) @ STIFF_Y0 for t in np.asarray(ts)])


def test_expm_stiff_matches_jax_expm():
    for t in (1e-5, 1e-3, 0.05):
        np.testing.assert_allclose(
            expm_stiff(t), np.asarray(jax.scipy.linalg.expm(jnp.asarray(STIFF_A) * t)), rtol=1e-8, atol=1e-10
        )


STIFF_TS = jnp.asarray([0.0, 1e-4, 1e-2, 0.5, 2.0, 5.0])


# (solver, rtol, bound on the global error in tolerance units, bound on steps).
# The problem is dissipative (errors are damped, not amplified): Kvaerno3 and
# Kvaerno5 stay within a few tolerances (observed max 1.3 and 6.3). Implicit
# Euler with error-per-step control has global error ~ h ~ sqrt(tol), i.e.
# ~C / sqrt(rtol) tolerance units (observed 183 at rtol 1e-4, 1830 at 1e-6), so
# it runs at 1e-4 with a bound of 500. An explicit-like instability or an
# unconverged Newton iterate is off by orders of magnitude. The step bounds
# (observed 1080, 816, 93) are far below the ~1.7e5 steps that stability alone
# would force on an explicit method (|lambda| = 1e5 over t = 5).
STIFF_CASES = [(ImplicitEuler, 1e-4, 500, 3000), (Kvaerno3, 1e-6, 20, 2000), (Kvaerno5, 1e-6, 20, 400)]


@pytest.mark.parametrize(
    "solver_cls, rtol, bound, max_num_steps", STIFF_CASES, ids=[c[0].__name__ for c in STIFF_CASES]
)
def test_stiff_linear_against_expm(solver_cls, rtol, bound, max_num_steps):
    atol = 1e-2 * rtol
    sol = diffode.solve(
        stiff_rhs,
        jnp.asarray(STIFF_Y0),
        STIFF_TS,
        jnp.asarray(STIFF_A),
        solver=solver_cls(),
        rtol=rtol,
        atol=atol,
        max_steps=20000,
    )
    exact = stiff_exact(STIFF_TS)
    err = np.abs(np.asarray(sol.ys) - exact) / (atol + rtol * np.abs(exact))
    assert err.max() < bound, err.max()
    assert int(sol.stats["num_steps"]) < max_num_steps
    # f is linear, so Newton with the exact J converges at once (theta = 0):
    # the Jacobian is formed once and kept for the whole solve.
    assert int(sol.stats["num_jac_evals"]) == 1


# ----------------------------------------------------------------------------
# Robertson and stiff Van der Pol against scipy Radau at rtol 1e-12.
# ----------------------------------------------------------------------------

ROB = problems.robertson()
VDP = problems.van_der_pol_stiff()
ROB_TS = np.array([0.0, 1e-3, 1.0, 1e2, 1e4, 1e5])
# Van der Pol (mu = 1000) jumps near t = 807 and 2421; the save times sit in the
# slow phases, where a small phase error gives a small state error.
VDP_TS = np.array([0.0, 400.0, 1200.0, 2000.0, 2800.0, VDP.t1])


@functools.cache
def radau_reference(name):
    """The SciPy Radau reference (:func:`diffode.problems.scipy_radau_reference`) at the save times."""
    if name == "robertson":
        return problems.scipy_radau_reference("robertson")(ROB_TS).T
    return problems.scipy_radau_reference("van_der_pol")(VDP_TS).T


def test_robertson_against_radau():
    rtol, atol = 1e-6, 1e-10
    ref = radau_reference("robertson")
    ts = jnp.asarray(ROB_TS)
    sol_lu = diffode.solve(ROB.f, ROB.y0, ts, ROB.args, solver=Kvaerno5(), rtol=rtol, atol=atol)
    sol_gm = diffode.solve(
        ROB.f, ROB.y0, ts, ROB.args, solver=Kvaerno5(linear_solver=GMRES()), rtol=rtol, atol=atol
    )
    for sol in (sol_lu, sol_gm):
        err = np.abs(np.asarray(sol.ys) - ref) / (atol + rtol * np.abs(ref))
        # Observed ~21 tolerance units (over 1e5 time units and eight decades of
        # time scales the local errors add up); 100 leaves room, while an error
        # in the method or the Newton solve shows up as >= 1e3.
        assert err.max() < 100, err.max()
        # Runge-Kutta methods and Newton steps with the exact J conserve the
        # linear invariant y1 + y2 + y3 = 1 up to rounding.
        np.testing.assert_allclose(np.asarray(sol.ys).sum(axis=1), 1.0, rtol=0, atol=1e-12)

    # Statistics: plausible, and Jacobian reuse works.
    st_lu, st_gm = sol_lu.stats, sol_gm.stats
    steps = int(st_lu["num_steps"])
    assert 20 < steps < 300  # Kvaerno5 needs ~70 here; an explicit method needs > 1e5
    assert 0 < int(st_lu["num_jac_evals"]) < steps
    assert 0 < int(st_lu["num_lu_decomps"]) <= steps
    assert int(st_gm["num_jac_evals"]) == 0 and int(st_gm["num_lu_decomps"]) == 0
    for st in (st_lu, st_gm):
        # Every Newton iteration costs one f evaluation; 6 implicit stages a step.
        assert int(st["num_fevals"]) == int(st["num_newton_iters"]) + 2
        assert 6 * int(st["num_steps"]) <= int(st["num_newton_iters"]) <= 6 * 10 * int(st["num_steps"])


def test_van_der_pol_against_radau():
    rtol = atol = 1e-6
    ref = radau_reference("vdp")
    sol = diffode.solve(
        VDP.f, VDP.y0, jnp.asarray(VDP_TS), VDP.args, solver=Kvaerno5(), rtol=rtol, atol=atol, max_steps=4096
    )
    err = np.abs(np.asarray(sol.ys) - ref) / (atol + rtol * np.abs(ref))
    # Two relaxation oscillations: every fast jump turns a local error into a
    # phase shift that later states inherit. Observed ~40 tolerance units;
    # 200 is the bound. A wrong method or a Newton floor gives >= 1e3.
    assert err.max() < 200, err.max()
    assert int(sol.stats["num_steps"]) < 2000  # ~650 observed


def test_gmres_and_lu_agree():
    # Same Newton iteration matrix; GMRES solves each system to 1e-10 relative,
    # which moves the Newton iterates far below the convergence tolerance. The
    # solves agree to ~1e-5 tolerance units (observed) with identical step
    # sequences; 1e-2 still separates them from any difference in the method.
    ts = STIFF_TS
    kw = {"rtol": 1e-8, "atol": 1e-10, "max_steps": 20000}
    a = jnp.asarray(STIFF_A)
    y_lu = diffode.solve(stiff_rhs, jnp.asarray(STIFF_Y0), ts, a, solver=Kvaerno5(), **kw)
    y_gm = diffode.solve(
        stiff_rhs, jnp.asarray(STIFF_Y0), ts, a, solver=Kvaerno5(linear_solver=GMRES(rtol=1e-10)), **kw
    )
    scale = 1e-10 + 1e-8 * np.abs(np.asarray(y_lu.ys))
    assert (np.abs(np.asarray(y_lu.ys) - np.asarray(y_gm.ys)) / scale).max() < 1e-2
    assert int(y_lu.stats["num_steps"]) == int(y_gm.stats["num_steps"])
    assert int(y_lu.stats["num_lu_decomps"]) > 0 and int(y_gm.stats["num_lu_decomps"]) == 0


# ----------------------------------------------------------------------------
# Transforms and pytrees.
# ----------------------------------------------------------------------------


def test_jit_and_vmap_keep_per_member_steps():
    solver = Kvaerno5()
    ts = jnp.asarray([0.0, 100.0, 1000.0])

    @jax.jit
    def run(y0):
        sol = diffode.solve(
            problems.van_der_pol_rhs, y0, ts, jnp.asarray(100.0), solver=solver, rtol=1e-6, atol=1e-6
        )
        return sol.ys, sol.stats["num_steps"], sol.stats["num_jac_evals"]

    y0s = jnp.asarray([[2.0, 0.0], [0.5, 0.0], [1.0, 5.0]])
    ys, steps, jacs = jax.vmap(run)(y0s)
    singles = [run(y0) for y0 in y0s]
    for i, (y1, s1, j1) in enumerate(singles):
        assert int(steps[i]) == int(s1) and int(jacs[i]) == int(j1)
        np.testing.assert_allclose(np.asarray(ys[i]), np.asarray(y1), rtol=1e-12, atol=1e-12)
    # Different initial states really do take different numbers of steps.
    assert len({int(s) for s in steps}) > 1


def test_pytree_state():
    a = jnp.asarray(STIFF_A)

    def f(t, y, args):
        flat = jnp.concatenate([y["u"], y["v"].ravel()])
        out = args @ flat
        return {"u": out[:2], "v": out[2:].reshape(3, 1)}

    y0 = {"u": jnp.asarray(STIFF_Y0[:2]), "v": jnp.asarray(STIFF_Y0[2:]).reshape(3, 1)}
    kw = dict(solver=Kvaerno3(), rtol=1e-6, atol=1e-8)
    sol = diffode.solve(f, y0, STIFF_TS, a, **kw)
    flat = diffode.solve(stiff_rhs, jnp.asarray(STIFF_Y0), STIFF_TS, a, **kw)
    np.testing.assert_array_equal(np.asarray(sol.ys["u"]), np.asarray(flat.ys[:, :2]))
    np.testing.assert_array_equal(np.asarray(sol.ys["v"][..., 0]), np.asarray(flat.ys[:, 2:]))


def test_forward_mode_sensitivity_matches_expm():
    # d y(T) / d y0 = expm(A T) for the stiff linear system.
    a = jnp.asarray(STIFF_A)
    T = 0.5

    def final(y0):
        return diffode.solve(
            stiff_rhs, y0, jnp.asarray([0.0, T]), a, solver=Kvaerno5(), rtol=1e-8, atol=1e-10
        ).ys[-1]

    v = jnp.asarray([0.3, -1.0, 0.5, 2.0, 1.0])
    _, tangent = jax.jvp(final, (jnp.asarray(STIFF_Y0),), (v,))
    exact = expm_stiff(T) @ np.asarray(v)
    # The derivative of the discrete scheme (steps fixed by the primal) has an
    # error like the solution's: a few tolerances (entries of the result are O(1)).
    # Observed 2.5e-9.
    np.testing.assert_allclose(np.asarray(tangent), exact, rtol=0, atol=1e-7)


def test_dense_output_on_stiff_problem():
    sol = diffode.solve(
        stiff_rhs,
        jnp.asarray(STIFF_Y0),
        STIFF_TS,
        jnp.asarray(STIFF_A),
        solver=Kvaerno5(),
        rtol=1e-8,
        atol=1e-10,
        dense=True,
    )
    tq = jnp.linspace(0.05, 5.0, 37)
    exact = stiff_exact(tq)
    # Cubic Hermite between steps: O(h^4) interpolation error, at the level of
    # the tolerance-driven step sizes (observed 1.1e-7 absolute).
    np.testing.assert_allclose(np.asarray(jax.vmap(sol.evaluate)(tq)), exact, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------
# Newton failures.
# ----------------------------------------------------------------------------


def test_newton_iteration_cap_rejects_cleanly():
    # A cap of 2 iterations makes Newton fail on many stiff stages: the loop
    # must reject, shrink and still end with a correct answer.
    rtol, atol = 1e-6, 1e-10
    ref = radau_reference("robertson")
    ts = jnp.asarray(ROB_TS)
    sol = diffode.solve(ROB.f, ROB.y0, ts, ROB.args, solver=Kvaerno5(max_iters=2), rtol=rtol, atol=atol)
    err = np.abs(np.asarray(sol.ys) - ref) / (atol + rtol * np.abs(ref))
    assert err.max() < 100, err.max()  # same bound as the default solve (observed 0.3)
    assert int(sol.stats["num_rejected"]) > 30  # ~110 observed, against 3 with the default cap
    # A cap of 1 iteration almost never converges on this problem: the solve
    # must end in a failure status (here it runs out of steps), with the
    # unreached outputs NaN -- never SUCCESS with a wrong answer.
    sol = diffode.solve(
        ROB.f,
        ROB.y0,
        ts,
        ROB.args,
        solver=Kvaerno5(max_iters=1),
        rtol=rtol,
        atol=atol,
        max_steps=300,
        throw=False,
    )
    status = int(sol.status)
    if status == diffode.Status.SUCCESS:
        err = np.abs(np.asarray(sol.ys) - ref) / (atol + rtol * np.abs(ref))
        assert err.max() < 100, err.max()
    else:
        assert status in (diffode.Status.MAX_STEPS_REACHED, diffode.Status.NEWTON_FAILED)
        assert np.all(np.isnan(np.asarray(sol.ys[-1])))


def test_rhs_nan_in_part_of_domain_is_avoided_by_rejection():
    # y' = -1000 (y - cos t), y(0) = 0, with f NaN where y > 1.2 (the solution
    # stays below 1). With dt0 = 1 the stage predictors (y0 + c h f0 ~ 870)
    # land in the NaN region: those attempts must be rejected (ok=False) and
    # the final answer match the exact solution.
    lam = 1000.0

    def f(t, y, args):
        val = -lam * (y - jnp.cos(t))
        return jnp.where(y > 1.2, jnp.nan, val)

    def exact(t):
        c = lam / (lam**2 + 1)
        return c * (lam * np.cos(t) + np.sin(t)) - c * lam * np.exp(-lam * t)

    ts = jnp.asarray([0.0, 0.5, 1.0, 3.0])
    sol = diffode.solve(f, jnp.asarray([0.0]), ts, None, solver=Kvaerno3(), rtol=1e-6, atol=1e-8, dt0=1.0)
    np.testing.assert_allclose(np.asarray(sol.ys[:, 0]), exact(np.asarray(ts)), rtol=1e-5, atol=1e-7)
    assert int(sol.stats["num_rejected"]) > 0


def test_fixed_step_newton_failure_is_reported():
    # Fixed steps cannot retry: a Newton failure must end the solve with
    # NEWTON_FAILED (throw=False) or raise (throw=True).
    kw = dict(solver=Kvaerno5(max_iters=1), dt0=500.0, adaptive=False)
    args = VDP.args
    sol = diffode.solve(VDP.f, VDP.y0, jnp.asarray([0.0, 3000.0]), args, throw=False, **kw)
    assert int(sol.status) == diffode.Status.NEWTON_FAILED
    assert np.all(np.isnan(np.asarray(sol.ys[-1])))
    with pytest.raises(Exception, match="Newton"):
        diffode.solve(VDP.f, VDP.y0, jnp.asarray([0.0, 3000.0]), args, throw=True, **kw)


def test_linear_solver_options_are_validated():
    with pytest.raises(TypeError):
        Kvaerno5(linear_solver="lu")
    with pytest.raises(ValueError):
        GMRES(rtol=0.0)
    assert isinstance(Kvaerno5().linear_solver, LU)
