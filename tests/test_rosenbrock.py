"""Rosenbrock methods (Rodas5P, Rodas5): convergence order, stiff accuracy against
expm and scipy Radau, dense output, statistics, transformations and rejection of
non-finite steps."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffode
from diffode import problems
from diffode.solvers.rosenbrock import RODAS5P_TABLEAU, Rodas5, Rodas5P, RosenbrockTableau

# Arrays are traced, Python values static: each configuration compiles once.
solve = eqx.filter_jit(diffode.solve)

STAGES = 8  # f evaluations per attempted Rodas step
STATS = ("num_jac_evals", "num_lu_decomps", "num_newton_iters")


# --------------------------------------------------------------------------
# Empirical convergence order (fixed steps).
# --------------------------------------------------------------------------

KEPLER = problems.rescaled_kepler(t1=6.0)  # nonlinear, non-autonomous
COS = problems.cos_linear()  # linear, non-autonomous: exercises the df/dt terms
P = 2.0 ** -np.arange(10)

# dt ranges chosen from the full error-vs-dt curves to sit in the asymptotic
# regime: errors between ~1e-4 and ~1e-12, above roundoff. Observed local
# slopes: Rodas5P Kepler 5.33, 5.18, 5.10; Rodas5P cos 5.08, 5.03, 5.01;
# Rodas5 cos 5.23, 5.06, 5.01. (Rodas5 on Kepler only becomes asymptotic near
# roundoff, like Dopri8 in test_explicit.py, so it is checked on cos only.)
ORDER_CASES = [
    (Rodas5P, KEPLER, 4, P[3:7]),
    (Rodas5P, COS, 9, P[3:7]),
    (Rodas5, COS, 9, P[2:6]),
]


@pytest.mark.parametrize(
    "solver_cls, problem, n_save, dts", ORDER_CASES, ids=["Rodas5P-kepler", "Rodas5P-cos", "Rodas5-cos"]
)
def test_convergence_order(solver_cls, problem, n_save, dts):
    ts = problem.ts(n_save)
    exact = np.asarray(jax.vmap(problem.exact)(ts))
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
            ).ys
        )
    )
    errors = np.array([np.abs(np.asarray(fn(jnp.asarray(dt))) - exact).max() for dt in dts])
    assert np.all(errors > 1e-13) and np.all(errors < 1e-3), errors
    slope = np.polyfit(np.log(dts), np.log(errors), 1)[0]
    # +-0.3 around 5: the residual curvature is <= 0.2; order 4 or 6 fails.
    assert abs(slope - 5) < 0.3, (slope, errors)


def test_order_attributes():
    for cls in (Rodas5P, Rodas5):
        s = cls()
        assert s.order == 5 and s.embedded
        # The estimate y1 - y1_hat compares with an order-4 solution: it is
        # O(h^5), so the controller's exponent denominator is 5.
        assert s.error_order == 5
        assert s.stat_names == STATS


# --------------------------------------------------------------------------
# Stiff linear system against expm.
# --------------------------------------------------------------------------

# Eigenvalues -1, -10, -1e3, -1e6 (triangular), non-normal couplings: stiffness
# ratio 1e6 on [0, 5].
STIFF_A = np.array(
    [
        [-1.0, 2.0, 0.0, 50.0],
        [0.0, -10.0, 5.0, 0.0],
        [0.0, 0.0, -1e3, 1e3],
        [0.0, 0.0, 0.0, -1e6],
    ]
)
STIFF_Y0 = np.array([1.0, -1.0, 2.0, 1.0])


def _stiff_rhs(t, y, a):
    return a @ y


def _stiff_propagator(t: float, pieces: int) -> np.ndarray:
    """``expm(A t)`` as ``expm(A t / pieces)^pieces``: jax's expm returns NaN once
    ``|A t|`` exceeds ~1e6 (here t >= 1); at ``|A t / pieces| = 5e5`` it agrees
    with scipy's expm to roundoff."""
    e = np.asarray(jax.scipy.linalg.expm(jnp.asarray(STIFF_A) * (t / pieces)))
    return np.linalg.matrix_power(e, pieces)


def _stiff_exact(n_save: int, t1: float) -> np.ndarray:
    """The exact solution at ``linspace(0, t1, n_save)``."""
    step = _stiff_propagator(t1 / (n_save - 1), 1)
    ys = [STIFF_Y0]
    for _ in range(n_save - 1):
        ys.append(step @ ys[-1])
    return np.array(ys)


def test_stiff_linear_against_expm():
    ts = jnp.linspace(0.0, 5.0, 11)
    sol = solve(
        _stiff_rhs, jnp.asarray(STIFF_Y0), ts, jnp.asarray(STIFF_A), solver=Rodas5P(), rtol=1e-8, atol=1e-10
    )
    exact = _stiff_exact(11, 5.0)
    # Dissipative linear problem: the global error stays below the local
    # tolerance (observed 7e-11 relative to max|y| = 2). 100 * rtol bounds it
    # with room; a wrong W, C or m is off by orders of magnitude.
    assert np.abs(np.asarray(sol.ys) - exact).max() / np.abs(exact).max() < 100 * 1e-8
    # Stability: the 1e6 mode would force an explicit method to ~1e6 steps;
    # Rodas5P resolves the fast transient and then only the slow dynamics
    # (observed: 232 steps, most of them in the initial layer).
    assert int(sol.stats["num_steps"]) < 1000


def test_forward_mode_sensitivity_is_expm():
    # For y' = A y the exact sensitivity dy(T)/dy0 is expm(A T); jacfwd through
    # the loop (step sizes are constants of the scheme) must reproduce it.
    ts = jnp.array([0.0, 2.0])

    def final(y0):
        return diffode.solve(
            _stiff_rhs, y0, ts, jnp.asarray(STIFF_A), solver=Rodas5P(), rtol=1e-9, atol=1e-11
        ).ys[-1]

    jac = np.asarray(jax.jit(jax.jacfwd(final))(jnp.asarray(STIFF_Y0)))
    want = _stiff_propagator(2.0, 4)
    # Same accuracy as the solution itself (observed 5e-11 relative to
    # max|expm|): 100 * rtol.
    assert np.abs(jac - want).max() / np.abs(want).max() < 1e-7


# --------------------------------------------------------------------------
# Robertson and stiff Van der Pol against scipy Radau at rtol 1e-12.
# --------------------------------------------------------------------------

ROB_TS = np.concatenate([[0.0], np.logspace(-6, 5, 12)])
VDP = problems.van_der_pol_stiff()
VDP_TS = np.linspace(VDP.t0, VDP.t1, 11)


def _radau_reference(which: str) -> np.ndarray:
    """The SciPy Radau reference (:func:`diffode.problems.scipy_radau_reference`) at the save times."""
    ts = ROB_TS if which == "robertson" else VDP_TS
    return problems.scipy_radau_reference("robertson" if which == "robertson" else "van_der_pol")(ts).T


def _rob_solve(y0):
    """Robertson at rtol 1e-6, atol 1e-10 (one compilation shared by several tests)."""
    p = problems.robertson()
    return solve(p.f, y0, jnp.asarray(ROB_TS), p.args, solver=Rodas5P(), rtol=1e-6, atol=1e-10)


def test_robertson_against_radau():
    rtol, atol = 1e-6, 1e-10
    sol = _rob_solve(problems.robertson().y0)
    ref = _radau_reference("robertson")
    ys = np.asarray(sol.ys)
    # Errors in units of the local tolerance, componentwise (y2 ~ 1e-5 .. 1e-8
    # is resolved by atol = 1e-10). Robertson is dissipative, so the global
    # error stays a small multiple of the tolerance: observed 1.4 (scipy's own
    # Radau at the same tolerances: 0.24). 10 leaves room; a wrong method is
    # off by orders of magnitude (or fails on the 1e4..1e8 stiffness).
    assert (np.abs(ys - ref) / (atol + rtol * np.abs(ref))).max() < 10
    # Rosenbrock stages preserve linear invariants: sum(y) = 1 to roundoff.
    assert np.abs(ys.sum(axis=1) - 1).max() < 1e-13
    # Statistics: one Jacobian and one LU per attempted step, no Newton, and
    # 8 evaluations of f per step plus 2 at the start (f0, initial step).
    st = sol.stats
    n = int(st["num_steps"])
    assert int(st["num_jac_evals"]) == n and int(st["num_lu_decomps"]) == n
    assert int(st["num_newton_iters"]) == 0
    assert int(st["num_fevals"]) == STAGES * n + 2
    assert n < 250  # observed 109 (steps grow to ~1e4 on the slow manifold)


def test_van_der_pol_stiff_against_radau():
    rtol, atol = 1e-6, 1e-8
    sol = solve(
        VDP.f, VDP.y0, jnp.asarray(VDP_TS), VDP.args, solver=Rodas5P(), rtol=rtol, atol=atol, max_steps=10000
    )
    ref = _radau_reference("vdp")
    err = np.abs(np.asarray(sol.ys) - ref)
    # Two relaxation cycles with four fast transitions: errors made in a
    # transition become phase errors, so the global error at save points near
    # a transition exceeds the local tolerance by about 10x (observed max
    # 8.0e-6 in x, |x| <= 2, and 9.5e-6 in x'; elsewhere 2e-8..4e-7). 1e-4 is
    # 10x that; a phase slip from a wrong stage or estimate gives O(1) errors.
    # (scipy's Radau at the same tolerances: 1.7e-7.)
    assert err[:, 0].max() < 1e-4
    assert err[:, 1].max() < 1e-4  # |x'| <= 2.5e-2 at the save points
    assert int(sol.stats["num_accepted"]) < 2000  # observed 848 (+346 rejected)


def test_stage_loop_equals_unrolled_stages():
    """The stages in one fori_loop (the default with GMRES) and unrolled (the default with
    LU) are the same method: the same steps and the same values up to the order of the
    sums. With LU on Robertson at rtol 1e-6; looped GMRES against unrolled LU on the
    rescaled Kepler problem at rtol 1e-8 (Robertson's W is too ill-conditioned for
    GMRES's roundoff, which differs between the two forms, not to change a step
    decision), where the Direct gradient with respect to y0, which replays the loop,
    agrees too."""

    def run(problem, ts, loop, linear_solver, rtol):
        solver = Rodas5P(linear_solver=linear_solver, stage_loop=loop)

        def loss(y0):
            sol = diffode.solve(
                problem.f,
                y0,
                ts,
                problem.args,
                solver=solver,
                rtol=rtol,
                atol=rtol * 1e-4,
                sensitivity=diffode.Direct(),
            )
            return jnp.sum(sol.ys[-1] * jnp.arange(1.0, 1.0 + y0.shape[0]) ** 3), sol

        return loss

    assert Rodas5P(linear_solver=diffode.GMRES()).loops_stages() and not Rodas5P().loops_stages()
    rob = problems.robertson()
    a, b = (
        jax.jit(run(rob, jnp.asarray(ROB_TS), loop, diffode.LU(), 1e-6))(rob.y0)[1] for loop in (True, False)
    )
    assert int(a.stats["num_accepted"]) == int(b.stats["num_accepted"]) > 50
    np.testing.assert_allclose(a.ys, b.ys, rtol=1e-10, atol=1e-15)

    # Looped GMRES against the default (unrolled, LU): at GMRES rtol 1e-13 both solve W to
    # roundoff, so the steps, the values and the Direct gradient (which replays the
    # looped GMRES steps) agree. (The unrolled GMRES form compiles 4x as long.)
    ts = jnp.asarray(KEPLER.ts(4))
    gmres = diffode.GMRES(rtol=1e-13)
    (_, a), ga = jax.jit(jax.value_and_grad(run(KEPLER, ts, True, gmres, 1e-8), has_aux=True))(KEPLER.y0)
    (_, c), gc = jax.jit(jax.value_and_grad(run(KEPLER, ts, False, diffode.LU(), 1e-8), has_aux=True))(
        KEPLER.y0
    )
    assert int(c.stats["num_accepted"]) == int(a.stats["num_accepted"]) > 20
    np.testing.assert_allclose(a.ys, c.ys, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(ga, gc, rtol=1e-9)
    assert np.all(np.isfinite(ga)) and np.all(np.abs(ga) > 1e-3)


# --------------------------------------------------------------------------
# Dense output.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("solver_cls", [Rodas5P, Rodas5])
def test_continuous_extension_order(solver_cls):
    # One step from the exact solution; the interpolant's error inside the step
    # is O(h^5) for a 4th-order continuous extension (cubic Hermite: O(h^4),
    # linear: O(h^2)). Observed slopes 4.97-5.02 on these h.
    p = problems.rescaled_kepler()
    f = diffode.FlatRHS(lambda t, y: p.f(t, y, p.args))
    t0 = 0.3
    y0 = p.exact(t0)
    thetas = jnp.linspace(0.05, 0.95, 19)
    solver = solver_cls()

    @jax.jit
    def interp_error(h):
        res = solver.step(f, jnp.asarray(t0), y0, h, solver.init(f, t0, y0, None), None)
        vals = jax.vmap(lambda th: solver.interpolate(h, y0, res.y1, res.dense, th))(thetas)
        return jnp.abs(vals - jax.vmap(p.exact)(t0 + thetas * h)).max()

    hs = 2.0 ** -np.arange(4, 8)
    errors = np.array([float(interp_error(jnp.asarray(h))) for h in hs])
    assert np.all(errors > 1e-13), errors
    slope = np.polyfit(np.log(hs), np.log(errors), 1)[0]
    assert abs(slope - 5) < 0.3, (slope, errors)


def test_dense_output_inside_steps():
    p = problems.rescaled_kepler()
    ts = jnp.array([p.t0, p.t1])
    sol = solve(p.f, p.y0, ts, p.args, solver=Rodas5P(), rtol=1e-8, atol=1e-10, dense=True)
    tq = jnp.linspace(p.t0, p.t1, 97)
    exact = np.asarray(jax.vmap(p.exact)(tq))
    err = np.abs(np.asarray(sol.evaluate(tq)) - exact).max()
    # Only 2 save points, so nearly every query lies inside a step. The
    # interpolant is as accurate as the step ends (observed 1.43e-9 inside,
    # 1.42e-9 at t1, |y| = 1): 10 * rtol.
    assert err < 10 * 1e-8
    # The steps are long enough for the test to discriminate: linear
    # interpolation between the same step ends is off by 2.2e-4.
    d = sol.dense_output
    t_start, h = np.asarray(d.t_start), np.asarray(d.h)
    k = np.clip(np.searchsorted(t_start, np.asarray(tq), side="left") - 1, 0, int(d.num_pieces) - 1)
    theta = ((np.asarray(tq) - t_start[k]) / h[k])[:, None]
    linear = np.asarray(d.y0)[k] + theta * (np.asarray(d.y1)[k] - np.asarray(d.y0)[k])
    assert np.abs(linear - exact).max() > 1000 * err


# --------------------------------------------------------------------------
# jit, vmap, float32, pytrees.
# --------------------------------------------------------------------------


def test_vmap_per_member_steps():
    # Members with different initial states take different steps; each must
    # match its own solve (ys and num_steps).
    y0s = jnp.array([[1.0, 0.0, 0.0], [0.5, 1e-6, 0.5], [0.0, 0.0, 1.0]])
    batched = jax.vmap(_rob_solve)(y0s)
    steps = []
    for i in range(3):
        one = _rob_solve(y0s[i])
        np.testing.assert_allclose(np.asarray(batched.ys[i]), np.asarray(one.ys), rtol=1e-10, atol=1e-16)
        for name in ("num_steps", "num_fevals", "num_jac_evals"):
            assert int(batched.stats[name][i]) == int(one.stats[name]), name
        steps.append(int(one.stats["num_steps"]))
    assert len(set(steps)) > 1, steps  # the members really differ


def test_float32_stiff_linear():
    ts = jnp.linspace(0.0, 5.0, 11, dtype=jnp.float32)
    sol = solve(
        _stiff_rhs,
        jnp.asarray(STIFF_Y0, jnp.float32),
        ts,
        jnp.asarray(STIFF_A, jnp.float32),
        solver=Rodas5P(),
        rtol=1e-3,
        atol=1e-5,
    )
    assert sol.ys.dtype == jnp.float32
    exact = _stiff_exact(11, 5.0)
    # Observed 2.1e-6 relative to max|y| (float32 roundoff is 6e-8 per
    # operation); 1e-4 is 50x that and still far below a broken method's error.
    assert np.abs(np.asarray(sol.ys, np.float64) - exact).max() / np.abs(exact).max() < 1e-4


def _rob_f32_solve(ts_dtype):
    p = problems.robertson(dtype=np.float32)
    return solve(
        p.f, p.y0, jnp.asarray(ROB_TS, ts_dtype), p.args, solver=Rodas5P(), rtol=1e-4, atol=1e-8, throw=False
    )


def test_float32_robertson():
    # float32 state with float64 times (float32 times: the next test).
    sol = _rob_f32_solve(np.float64)
    assert sol.status == diffode.Status.SUCCESS and sol.ys.dtype == jnp.float32
    ref = _radau_reference("robertson")
    ys = np.asarray(sol.ys, np.float64)
    # Observed 0.67 in units of the local tolerance and sum(y) = 1 to 1.8e-6
    # (float32 roundoff accumulated over 61 steps); bounds 10 and 1e-5.
    assert (np.abs(ys - ref) / (1e-8 + 1e-4 * np.abs(ref))).max() < 10
    assert np.abs(ys.sum(axis=1) - 1).max() < 1e-5


# Regression: the step-underflow test once scaled with the span |t_end - t0|
# (0.095 for float32 on [0, 1e5]), failing stiff float32 solves near t = 0.
def test_float32_robertson_float32_times():
    assert _rob_f32_solve(np.float32).status == diffode.Status.SUCCESS


def test_pytree_state():
    p = problems.robertson()

    def f(t, y, k):
        flat = problems.robertson_rhs(t, jnp.stack([y["a"], y["bc"][0], y["bc"][1]]), k)
        return {"a": flat[0], "bc": flat[1:]}

    y0 = {"a": jnp.asarray(1.0), "bc": jnp.zeros(2)}
    ts = jnp.asarray(ROB_TS)
    tree = solve(f, y0, ts, p.args, solver=Rodas5P(), rtol=1e-6, atol=1e-10)
    flat = solve(p.f, p.y0, ts, p.args, solver=Rodas5P(), rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(np.asarray(tree.ys["a"]), np.asarray(flat.ys[:, 0]), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(tree.ys["bc"]), np.asarray(flat.ys[:, 1:]), rtol=1e-12, atol=1e-20)
    assert int(tree.stats["num_steps"]) == int(flat.stats["num_steps"])


# --------------------------------------------------------------------------
# Non-finite steps.
# --------------------------------------------------------------------------


def _sqrt_decay(t, y, args):
    # y' = -sqrt(y), y(0) = 1: y = (1 - t/2)^2 > 0 on [0, 1.5]. A large step's
    # stages reach y < 0, where f is NaN.
    return -jnp.sqrt(y)


def test_nonfinite_step_reports_not_ok():
    f = diffode.FlatRHS(lambda t, y: _sqrt_decay(t, y, None))
    bad = Rodas5P().step(f, jnp.asarray(0.0), jnp.ones(1), jnp.asarray(1.5), (), None)
    assert not bool(bad.ok)
    good = Rodas5P().step(f, jnp.asarray(0.0), jnp.ones(1), jnp.asarray(0.25), (), None)
    assert bool(good.ok) and np.isfinite(np.asarray(good.y1)).all()


def test_nonfinite_step_is_rejected_and_retried():
    sol = solve(
        _sqrt_decay, jnp.ones(1), jnp.array([0.0, 1.5]), solver=Rodas5P(), dt0=1.5, rtol=1e-8, atol=1e-10
    )
    assert sol.status == diffode.Status.SUCCESS
    assert int(sol.stats["num_rejected"]) >= 1  # the first step (h = 1.5) is NaN
    # Exact value 0.0625; observed error 1e-12.
    assert abs(float(sol.ys[-1, 0]) - 0.0625) < 1e-8


def test_nonfinite_fixed_step_fails_loudly():
    # Fixed steps cannot retry: the solve must report failure, never return
    # the NaN (or anything else) as an answer.
    sol = solve(
        _sqrt_decay,
        jnp.ones(1),
        jnp.array([0.0, 1.5]),
        solver=Rodas5P(),
        dt0=1.5,
        adaptive=False,
        throw=False,
    )
    assert sol.status != diffode.Status.SUCCESS
    assert np.isnan(np.asarray(sol.ys[-1])).all()


# --------------------------------------------------------------------------
# Tableau validation.
# --------------------------------------------------------------------------


def _fields(tab):
    names = ("gamma", "a", "C", "c", "d", "m", "order", "m_error", "embedded_order", "h_interp")
    return {**{k: getattr(tab, k) for k in names}, "name": "test"}


def _perturbed(field, index, delta=1e-6):
    kw = _fields(RODAS5P_TABLEAU)
    arr = np.array(kw[field], dtype=np.float64)
    arr[index] += delta
    kw[field] = arr
    return kw


def test_tableau_roundtrip():
    tab = RosenbrockTableau(**_fields(RODAS5P_TABLEAU))
    assert tab.num_stages == 8 and tab.embedded


@pytest.mark.parametrize(
    "kw, match",
    [
        (_perturbed("a", (3, 1)), "row sums of alpha"),  # a typo in a
        (_perturbed("C", (4, 2)), "row sums of"),  # a typo in C (alpha = a Gamma sees it too)
        (_perturbed("c", 2), "row sums of alpha"),
        (_perturbed("d", 3), "row sums of Gamma"),
        (_perturbed("m", 2), "m weights"),
        # (Stage 8 has d_8 = 0, so a change of m_error[7] alone passes orders 1-2.)
        (_perturbed("m_error", 3), "embedded weights"),
        (_perturbed("h_interp", (1, 4)), "continuous extension"),
        ({**_fields(RODAS5P_TABLEAU), "gamma": -0.2}, "positive"),
        ({**_fields(RODAS5P_TABLEAU), "embedded_order": 5}, "embedded_order"),
        ({**_fields(RODAS5P_TABLEAU), "a": np.eye(8)}, "strictly lower"),
        ({**_fields(RODAS5P_TABLEAU), "c": np.zeros(7)}, "shapes"),
    ],
    ids=["a", "C", "c", "d", "m", "m_error", "h_interp", "gamma", "embedded-order", "triangular", "shape"],
)
def test_bad_tableau_rejected(kw, match):
    with pytest.raises(ValueError, match=match):
        RosenbrockTableau(**kw)
