"""Standard problems with known answers, shared by the tests and ``benchmarks/``.

Each is a right-hand side, initial values, parameters and, where one exists, an exact
solution or a published reference value (cited where it is defined): Lotka-Volterra,
linear systems, the Arenstorf orbit, Van der Pol, Robertson, the stiff problems of the
Test Set for IVP Solvers (HIRES, ROBER, VDPOL, OREGO, POLLU) and steady-state problems
with closed forms.

Import-light on purpose: only ``jax`` and ``numpy`` at module level; SciPy is
imported inside the functions that compute reference solutions.

Arrays are built by the factory functions, never at import time, so that a
script can switch on JAX's 64-bit mode before any array exists; diffode never enables it itself. Every factory takes a
``dtype`` (float64 by default) and refuses float64 when x64 is off instead of
silently truncating to float32.

Every right-hand side has diffode's signature ``f(t, y, args)`` and is a
module-level function, so that jitted solves keyed on ``f`` are reused.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Problem",
    "SteadyProblem",
    "STEADY",
    "cubic_relaxation",
    "enzyme_chain",
    "linear_steady",
    "michaelis_menten_flow",
    "TESTSET",
    "TESTSET_ATOL_OVER_RTOL",
    "arenstorf",
    "cos_linear",
    "exponential_decay",
    "hires",
    "linear_solution",
    "linear_system",
    "lotka_volterra",
    "lotka_volterra_reference",
    "lotka_volterra_sensitivities",
    "lotka_volterra_weighted_gradient",
    "orego",
    "pkpd",
    "pollu",
    "rescaled_kepler",
    "rober",
    "robertson",
    "van_der_pol",
    "van_der_pol_stiff",
    "vdpol",
]


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """An initial value problem ``dy/dt = f(t, y, args)``, ``y(t0) = y0`` on ``[t0, t1]``.

    ``exact(t)`` (scalar ``t``) is the exact solution where one is known, else
    ``None``. ``reference`` is a published high-accuracy value of ``y(t1)``
    (float64 numpy array) where there is one, else ``None``. ``eq=False``:
    problems hold arrays, so they hash by identity.
    """

    name: str
    f: Callable[[Any, Any, Any], Any]
    y0: Any
    t0: float
    t1: float
    args: Any = None
    exact: Optional[Callable[[Any], Any]] = None
    dtype: Any = np.float64
    reference: Optional[np.ndarray] = None

    def ts(self, n: int, dtype=None) -> jax.Array:
        """``n`` equispaced save times from ``t0`` to ``t1`` (both included)."""
        return jnp.linspace(self.t0, self.t1, n, dtype=self.dtype if dtype is None else dtype)


def _check_dtype(dtype):
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64 and jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
        raise RuntimeError("float64 needs JAX's x64 (64-bit) mode, which the caller switches on first")
    return dtype


# ----------------------------------------------------------------------------
# Lotka-Volterra predator-prey.
# ----------------------------------------------------------------------------

LV_PARAMS = (1.5, 1.0, 3.0, 1.0)  # alpha, beta, gamma, delta


def lotka_volterra_rhs(t, y, args):
    """``x' = alpha x - beta x y``, ``y' = -gamma y + delta x y``; ``args = [alpha, beta, gamma, delta]``."""
    alpha, beta, gamma, delta = args[0], args[1], args[2], args[3]
    prey, pred = y[0], y[1]
    return jnp.stack([alpha * prey - beta * prey * pred, -gamma * pred + delta * prey * pred])


def _lotka_volterra_rhs_numpy(t, y, args):
    alpha, beta, gamma, delta = args
    return np.array([alpha * y[0] - beta * y[0] * y[1], -gamma * y[1] + delta * y[0] * y[1]])


def lotka_volterra(dtype=np.float64, y0=(1.0, 1.0), params=LV_PARAMS, t1: float = 10.0) -> Problem:
    """Lotka-Volterra with ``(alpha, beta, gamma, delta) = (1.5, 1, 3, 1)``, ``y0 = (1, 1)``,
    ``t in [0, 10]``.

    No closed-form solution: see :func:`lotka_volterra_reference`.
    """
    dtype = _check_dtype(dtype)
    return Problem(
        name="lotka_volterra",
        f=lotka_volterra_rhs,
        y0=jnp.asarray(y0, dtype),
        t0=0.0,
        t1=t1,
        args=jnp.asarray(params, dtype),
        dtype=dtype,
    )


@functools.lru_cache(maxsize=16)
def _lv_reference_cached(ts: tuple, y0: tuple, params: tuple) -> np.ndarray:
    from scipy.integrate import solve_ivp

    sol = solve_ivp(
        _lotka_volterra_rhs_numpy,
        (ts[0], ts[-1]),
        np.asarray(y0, np.float64),
        method="DOP853",
        t_eval=np.asarray(ts),
        args=(params,),
        rtol=1e-13,
        atol=1e-13,
    )
    assert sol.success, sol.message
    out = sol.y.T.copy()
    out.setflags(write=False)
    return out


def lotka_volterra_reference(ts, y0=(1.0, 1.0), params=LV_PARAMS) -> np.ndarray:
    """SciPy DOP853 solution at ``ts`` with ``rtol = atol = 1e-13``; shape ``(len(ts), 2)``.

    Its own error is ~1e-12 relative, far below what the tests resolve (>= 1e-10).
    """
    ts = tuple(float(t) for t in np.asarray(ts, np.float64))
    return _lv_reference_cached(ts, tuple(map(float, y0)), tuple(map(float, params)))


@functools.lru_cache(maxsize=16)
def _lv_sensitivities_cached(ts: tuple, y0: tuple, params: tuple):
    from scipy.integrate import solve_ivp

    a, b, g, d = params

    def aug(t, z):
        # z = [y (2), S_y0 (2x2, row-major), S_p (2x4, row-major)], S = dy/d(.).
        x, w = z[0], z[1]
        J = np.array([[a - b * w, -b * x], [d * w, -g + d * x]])
        fp = np.array([[x, -x * w, 0.0, 0.0], [0.0, 0.0, -w, x * w]])  # df/d(a, b, g, d)
        S0 = z[2:6].reshape(2, 2)
        Sp = z[6:14].reshape(2, 4)
        return np.concatenate(
            [_lotka_volterra_rhs_numpy(t, z[:2], params), (J @ S0).ravel(), (J @ Sp + fp).ravel()]
        )

    z0 = np.concatenate([np.asarray(y0, np.float64), np.eye(2).ravel(), np.zeros(8)])
    sol = solve_ivp(aug, (ts[0], ts[-1]), z0, method="DOP853", t_eval=np.asarray(ts), rtol=1e-13, atol=1e-13)
    assert sol.success, sol.message
    z = sol.y.T
    ys, s_y0, s_p = z[:, :2], z[:, 2:6].reshape(-1, 2, 2), z[:, 6:14].reshape(-1, 2, 4)
    f_t = np.stack([_lotka_volterra_rhs_numpy(t, y, params) for t, y in zip(ts, ys)])
    # d ys[i] / d ts[j]: ys[i] = y(ts[i]; y(ts[0]) = y0). Moving ts[i] moves along
    # the trajectory (f at ys[i]); moving ts[0] shifts the start: -S_y0(ts[i]) f(ts[0], y0).
    s_ts = np.zeros((len(ts), 2, len(ts)))
    for i in range(len(ts)):
        if i > 0:
            s_ts[i, :, i] = f_t[i]
            s_ts[i, :, 0] = -s_y0[i] @ f_t[0]
    out = (ys, s_y0, s_p, s_ts)
    for arr in out:
        arr.setflags(write=False)
    return out


def lotka_volterra_sensitivities(ts, y0=(1.0, 1.0), params=LV_PARAMS):
    """Reference derivatives of the Lotka-Volterra solution at ``ts`` (increasing), by the forward
    sensitivity equations written out by hand and solved with SciPy DOP853 at rtol = atol = 1e-13.

    Returns ``(ys, dys_dy0, dys_dparams, dys_dts)`` with shapes ``(T, 2)``, ``(T, 2, 2)``,
    ``(T, 2, 4)`` and ``(T, 2, T)``: ``dys_dy0[i, j, k] = d ys[i, j] / d y0[k]`` and so on.
    Independent of diffode and of any autodiff; accurate to ~1e-11 relative.
    """
    ts = tuple(float(t) for t in np.asarray(ts, np.float64))
    return _lv_sensitivities_cached(ts, tuple(map(float, y0)), tuple(map(float, params)))


def lotka_volterra_weighted_gradient(ts, w):
    """Reference gradient of ``sum(w * ys)`` (``w`` of shape ``(len(ts), 2)``) with respect to
    ``(y0, ts, params)``, contracted from :func:`lotka_volterra_sensitivities`."""
    _, s_y0, s_p, s_ts = lotka_volterra_sensitivities(ts)
    return tuple(np.einsum("ij,ijk->k", w, s) for s in (s_y0, s_ts, s_p))


# ----------------------------------------------------------------------------
# Exponential decay.
# ----------------------------------------------------------------------------


def exponential_decay_rhs(t, y, args):
    return -args * y


def exponential_decay(dtype=np.float64) -> Problem:
    """``y' = -k y`` componentwise, ``k = (0.5, 1, 2)``, ``y0 = (1, 2, 0.5)``; ``y = y0 exp(-k t)``."""
    dtype = _check_dtype(dtype)
    k = jnp.asarray([0.5, 1.0, 2.0], dtype)
    y0 = jnp.asarray([1.0, 2.0, 0.5], dtype)
    return Problem(
        name="exponential_decay",
        f=exponential_decay_rhs,
        y0=y0,
        t0=0.0,
        t1=2.0,
        args=k,
        exact=lambda t: y0 * jnp.exp(-k * t),
        dtype=dtype,
    )


# ----------------------------------------------------------------------------
# Linear system y' = A y.
# ----------------------------------------------------------------------------

# Non-normal (A A^T != A^T A: the 2.0 and 0.8 couplings are one-sided), mildly
# oscillatory and non-stiff: eigenvalues -0.1 +- 1.0i, -0.3 +- 0.5i (period ~6
# and ~13, decay rates <= 0.3).
LINEAR_A = (
    (-0.1, 1.0, 2.0, 0.0),
    (-1.0, -0.1, 0.0, 0.8),
    (0.0, 0.0, -0.3, 0.5),
    (0.0, 0.0, -0.5, -0.3),
)


def linear_rhs(t, y, args):
    return args @ y


def linear_system(dtype=np.float64) -> Problem:
    """``y' = A y`` with the 4x4 :data:`LINEAR_A`, ``y0 = (1, 0, 1, -1)`` on ``[0, 10]``;
    exact ``y(t) = expm(A t) y0`` (``jax.scipy.linalg.expm``)."""
    dtype = _check_dtype(dtype)
    a = jnp.asarray(LINEAR_A, dtype)
    y0 = jnp.asarray([1.0, 0.0, 1.0, -1.0], dtype)

    def exact(t):
        return jax.scipy.linalg.expm(a * t) @ y0

    return Problem(
        name="linear_system", f=linear_rhs, y0=y0, t0=0.0, t1=10.0, args=a, exact=exact, dtype=dtype
    )


def linear_solution(a, y0, ts):
    """``y(ts[i]) = expm(a (ts[i] - ts[0])) y0`` for ``y' = a y``, ``y(ts[0]) = y0``: the
    exact saved states, differentiable by JAX in ``a``, ``y0`` and ``ts``."""
    return jax.vmap(lambda t: jax.scipy.linalg.expm(a * (t - ts[0])) @ y0)(ts)


# ----------------------------------------------------------------------------
# Arenstorf orbit: the restricted three-body problem (Hairer, Norsett and
# Wanner, "Solving Ordinary Differential Equations I", 2nd ed., section II.0,
# eqs. (0.1)-(0.2)). A satellite in the rotating frame of earth (mass 1 - mu)
# and moon (mass mu). With the initial values below the orbit is closed:
# the state returns to y0 after the period T (values as printed in HNW).
# ----------------------------------------------------------------------------

ARENSTORF_MU = 0.012277471
ARENSTORF_Y0 = (0.994, 0.0, 0.0, -2.00158510637908252240537862224)  # (y1, y2, y1', y2')
ARENSTORF_PERIOD = 17.0652165601579625588917206249


def arenstorf_rhs(t, y, args):
    """``y = (y1, y2, y1', y2')``; ``args = mu``."""
    mu = args
    mu_ = 1.0 - mu
    y1, y2, v1, v2 = y[0], y[1], y[2], y[3]
    d1 = ((y1 + mu) ** 2 + y2**2) ** 1.5
    d2 = ((y1 - mu_) ** 2 + y2**2) ** 1.5
    a1 = y1 + 2 * v2 - mu_ * (y1 + mu) / d1 - mu * (y1 - mu_) / d2
    a2 = y2 - 2 * v1 - mu_ * y2 / d1 - mu * y2 / d2
    return jnp.stack([v1, v2, a1, a2])


def arenstorf(dtype=np.float64) -> Problem:
    """One period ``[0, T]`` of the Arenstorf orbit; ``exact`` is known only at ``t0`` and ``t1``:
    ``y(T) = y(0)``."""
    dtype = _check_dtype(dtype)
    y0 = jnp.asarray(ARENSTORF_Y0, dtype)
    return Problem(
        name="arenstorf",
        f=arenstorf_rhs,
        y0=y0,
        t0=0.0,
        t1=ARENSTORF_PERIOD,
        args=jnp.asarray(ARENSTORF_MU, dtype),
        dtype=dtype,
    )


# ----------------------------------------------------------------------------
# Van der Pol.
# ----------------------------------------------------------------------------


def van_der_pol_rhs(t, y, args):
    """``x'' = mu (1 - x^2) x' - x`` as ``(x, x')``; ``args = mu``."""
    mu = args
    x, v = y[0], y[1]
    return jnp.stack([v, mu * (1 - x**2) * v - x])


def van_der_pol(mu: float = 1.0, dtype=np.float64, t1: float | None = None) -> Problem:
    """Van der Pol from ``(2, 0)``. ``mu = 1`` is non-stiff; the default end time is
    about two limit-cycle periods (``T ~ 6.66`` for ``mu = 1``, ``~(3 - 2 ln 2) mu`` for large mu)."""
    dtype = _check_dtype(dtype)
    if t1 is None:
        t1 = 13.0 if mu <= 1 else 2 * (3 - 2 * np.log(2)) * mu
    return Problem(
        name=f"van_der_pol(mu={mu:g})",
        f=van_der_pol_rhs,
        y0=jnp.asarray([2.0, 0.0], dtype),
        t0=0.0,
        t1=float(t1),
        args=jnp.asarray(mu, dtype),
        dtype=dtype,
    )


def van_der_pol_stiff(mu: float = 1000.0, dtype=np.float64) -> Problem:
    """Stiff Van der Pol (for implicit solvers), two relaxation periods at ``mu = 1000``."""
    return van_der_pol(mu=mu, dtype=dtype)


# ----------------------------------------------------------------------------
# Robertson's chemical kinetics (stiff; Hairer and Wanner vol. II, IV.1).
# ----------------------------------------------------------------------------

ROBERTSON_K = (0.04, 3e7, 1e4)  # k1, k2, k3


def robertson_rhs(t, y, args):
    k1, k2, k3 = args[0], args[1], args[2]
    y1, y2, y3 = y[0], y[1], y[2]
    return jnp.stack(
        [
            -k1 * y1 + k3 * y2 * y3,
            k1 * y1 - k3 * y2 * y3 - k2 * y2**2,
            k2 * y2**2,
        ]
    )


def robertson(dtype=np.float64, t1: float = 1e5) -> Problem:
    """Robertson with ``k1, k2, k3 = 0.04, 3e7, 1e4`` from ``(1, 0, 0)``. Conserves ``sum(y)``."""
    dtype = _check_dtype(dtype)
    return Problem(
        name="robertson",
        f=robertson_rhs,
        y0=jnp.asarray([1.0, 0.0, 0.0], dtype),
        t0=0.0,
        t1=float(t1),
        args=jnp.asarray(ROBERTSON_K, dtype),
        dtype=dtype,
    )


# ----------------------------------------------------------------------------
# NumPy copies of the stiff right-hand sides and their Jacobians, and SciPy
# reference solves of them (NumPy, so that the reference is not dominated by JAX's
# per-call dispatch).
# ----------------------------------------------------------------------------


def robertson_np(t, y, k=ROBERTSON_K):
    k1, k2, k3 = k
    y1, y2, y3 = y
    return np.array([-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2 * y2, k2 * y2 * y2])


def robertson_jac_np(t, y, k=ROBERTSON_K):
    k1, k2, k3 = k
    _, y2, y3 = y
    return np.array(
        [[-k1, k3 * y3, k3 * y2], [k1, -k3 * y3 - 2 * k2 * y2, -k3 * y2], [0.0, 2 * k2 * y2, 0.0]]
    )


def van_der_pol_np(t, y, mu=1000.0):
    return np.array([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])


def van_der_pol_jac_np(t, y, mu=1000.0):
    return np.array([[0.0, 1.0], [-2 * mu * y[0] * y[1] - 1, mu * (1 - y[0] ** 2)]])


@functools.cache
def scipy_radau_reference(name: str):
    """SciPy ``Radau`` at rtol 1e-12 with the analytic Jacobian, as a dense ``OdeSolution``
    over ``robertson()`` (to t = 1e5, atol 1e-16) or ``van_der_pol_stiff()`` (to its
    ``t1``, atol 1e-12); computed once per process.

    Its own error is ~1e-12 relative on Robertson (rtol 1e-11 and 1e-12 agree to 5e-13)
    and ~1e-8 on Van der Pol's fast phases (phase sensitivity): far below the
    tolerances of the tests that compare with it.
    """
    from scipy.integrate import solve_ivp

    if name == "robertson":
        f, jac, y0, t1, atol = robertson_np, robertson_jac_np, [1.0, 0.0, 0.0], 1e5, 1e-16
    elif name == "van_der_pol":
        f, jac, y0, t1, atol = van_der_pol_np, van_der_pol_jac_np, [2.0, 0.0], van_der_pol_stiff().t1, 1e-12
    else:
        raise ValueError(name)
    sol = solve_ivp(
        f, (0.0, t1), np.array(y0), method="Radau", rtol=1e-12, atol=atol, jac=jac, dense_output=True
    )
    assert sol.success, sol.message
    return sol.sol


# ----------------------------------------------------------------------------
# A smooth, nonlinear, non-autonomous system with an exact solution, for
# convergence-order tests. The circular Kepler orbit q'' = -q / |q|^3,
# q(0) = (1, 0), q'(0) = (0, 1) has q = (cos s, sin s); running its clock at
# the varying rate phi'(t) = g(t) = 1 + cos(t) / 2 gives
#     y' = g(t) * (p, -q / |q|^3),   y(t) = (cos phi, sin phi, -sin phi, cos phi),
# with phi(t) = t + sin(t) / 2. Nonlinear (so the order conditions of systems,
# not just those of linear or scalar problems, are exercised) and
# non-autonomous (so the nodes c are exercised).
# ----------------------------------------------------------------------------


def rescaled_kepler_rhs(t, y, args):
    q1, q2, p1, p2 = y[0], y[1], y[2], y[3]
    g = 1 + 0.5 * jnp.cos(t)
    r3 = (q1**2 + q2**2) ** 1.5
    return g * jnp.stack([p1, p2, -q1 / r3, -q2 / r3])


def rescaled_kepler(dtype=np.float64, t1: float = 2.0) -> Problem:
    dtype = _check_dtype(dtype)

    def exact(t):
        phi = t + 0.5 * jnp.sin(t)
        return jnp.stack([jnp.cos(phi), jnp.sin(phi), -jnp.sin(phi), jnp.cos(phi)]).astype(dtype)

    return Problem(
        name="rescaled_kepler",
        f=rescaled_kepler_rhs,
        y0=jnp.asarray([1.0, 0.0, 0.0, 1.0], dtype),
        t0=0.0,
        t1=float(t1),
        exact=exact,
        dtype=dtype,
    )


# ----------------------------------------------------------------------------
# y' = cos(t) y: linear, non-autonomous, y = y0 exp(sin t). Smooth and cheap;
# the one problem on which Dopri8's 8th order is visible above roundoff.
# ----------------------------------------------------------------------------


def cos_linear_rhs(t, y, args):
    return jnp.cos(t) * y


def cos_linear(dtype=np.float64, t1: float = 8.0) -> Problem:
    """``y' = cos(t) y``, ``y0 = (1, 2)`` on ``[0, 8]``; ``y = y0 exp(sin t)``."""
    dtype = _check_dtype(dtype)
    y0 = jnp.asarray([1.0, 2.0], dtype)
    return Problem(
        name="cos_linear",
        f=cos_linear_rhs,
        y0=y0,
        t0=0.0,
        t1=float(t1),
        exact=lambda t: y0 * jnp.exp(jnp.sin(t)),
        dtype=dtype,
    )


# ----------------------------------------------------------------------------
# Stiff problems of the Test Set for IVP Solvers: F. Mazzia and C. Magherini,
# "Test Set for Initial Value Problem Solvers", release 2.4, Department of
# Mathematics, University of Bari, February 2008,
# https://archimede.uniba.it/~testset/ (problem descriptions in
# report/<name>.pdf, Fortran sources in src/problems/<name>.f).
#
# The end-time references are the values printed in the ``solut`` subroutines
# of those Fortran sources (revision 2006), digit for digit. The test set
# computed them with RADAU5/RADAU in extended precision (uround = 1.01e-19,
# rtol = atol = h0 = 1.1e-18; OREGO with atol = 1.1e-40), so all 16 printed
# digits are meant to be significant. They were cross-checked against the
# copies shipped by deSolve (R, inst/doc/examples), IVPTestSuite.jl and ReaK's
# integrator tests (identical digits), and tests/test_problems.py checks that
# scipy's Radau at rtol = 1e-10 reproduces them.
#
# Each factory returns a Problem with ``reference`` set; TESTSET lists the
# factories.
# ----------------------------------------------------------------------------


def _reference(values) -> np.ndarray:
    out = np.array(values, dtype=np.float64)
    out.setflags(write=False)
    return out


# HIRES: "High Irradiance RESponse" of plant photomorphogenesis (Schaefer 1975;
# Hairer and Wanner vol. II, section IV.10). 8 linear-plus-one-bilinear
# equations; y7 + y8 is conserved (f8 = -f7).
HIRES_PARAMS = (1.71, 0.43, 8.32, 0.69, 0.035, 8.32, 280.0, 0.69, 0.69, 0.0007)  # k1..k9, oks (hires.f)
HIRES_Y0 = (1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0057)
HIRES_T1 = 321.8122
HIRES_REFERENCE = _reference(
    [
        0.7371312573325668e-3,
        0.1442485726316185e-3,
        0.5888729740967575e-4,
        0.1175651343283149e-2,
        0.2386356198831331e-2,
        0.6238968252742796e-2,
        0.2849998395185769e-2,
        0.2850001604814231e-2,
    ]
)


def hires_rhs(t, y, args):
    """HIRES right-hand side; ``args = (k1, ..., k9, oks)`` (test set hires.f)."""
    k1, k2, k3, k4, k5, k6, k7, k8, k9, oks = (args[i] for i in range(10))
    y1, y2, y3, y4, y5, y6, y7, y8 = (y[i] for i in range(8))
    r = k7 * y6 * y8  # the one nonlinear (bilinear) reaction
    f7 = r - (k2 + k8 + k9) * y7
    return jnp.stack(
        [
            -k1 * y1 + k2 * y2 + k6 * y3 + oks,
            k1 * y1 - (k2 + k3) * y2,
            -(k6 + k1) * y3 + k2 * y4 + k5 * y5,
            k3 * y2 + k1 * y3 - (k4 + k2) * y4,
            -(k5 + k1) * y5 + k2 * (y6 + y7),
            -r + k8 * y4 + k1 * y5 - k2 * y6 + k8 * y7,
            f7,
            -f7,
        ]
    )


def hires(dtype=np.float64) -> Problem:
    """HIRES on ``[0, 321.8122]`` (test set, release 2.4)."""
    dtype = _check_dtype(dtype)
    return Problem(
        name="hires",
        f=hires_rhs,
        y0=jnp.asarray(HIRES_Y0, dtype),
        t0=0.0,
        t1=HIRES_T1,
        args=jnp.asarray(HIRES_PARAMS, dtype),
        dtype=dtype,
        reference=HIRES_REFERENCE,
    )


# ROBER: Robertson's kinetics (same equations and rate constants as
# ``robertson`` above) integrated to t = 1e11 as in the test set (rober.f).
# y2 at the end is ~8.3e-14, so relative accuracy in y2 needs atol << 1e-13.
ROBER_T1 = 1e11
ROBER_REFERENCE = _reference([0.2083340149701255e-7, 0.8333360770334713e-13, 0.9999999791665050])


def rober(dtype=np.float64) -> Problem:
    """ROBER: Robertson from ``(1, 0, 0)`` on ``[0, 1e11]`` (test set, release 2.4)."""
    p = robertson(dtype=dtype, t1=ROBER_T1)
    return dataclasses.replace(p, name="rober", reference=ROBER_REFERENCE)


# VDPOL: the test set's scaled Van der Pol, y1'' = ((1 - y1^2) y1' - y1) / eps,
# eps = 1e-6 (= 1 / mu^2 with mu = 1000 after rescaling time by mu), on [0, 2]
# (vdpol.f). Not the unscaled ``van_der_pol(mu)`` above: the test set's
# reference holds for this form only (its "vdpolm" variant on [0, 2000] has
# another reference).
VDPOL_EPS = 1e-6
VDPOL_T1 = 2.0
VDPOL_REFERENCE = _reference([0.1706167732170483e1, -0.8928097010247975e0])


def vdpol_rhs(t, y, args):
    """``(y1', y2') = (y2, ((1 - y1^2) y2 - y1) / eps)``; ``args = eps``."""
    eps = args
    y1, y2 = y[0], y[1]
    return jnp.stack([y2, ((1 - y1**2) * y2 - y1) / eps])


def vdpol(dtype=np.float64) -> Problem:
    """VDPOL, ``eps = 1e-6``, ``y0 = (2, 0)`` on ``[0, 2]`` (test set, release 2.4)."""
    dtype = _check_dtype(dtype)
    return Problem(
        name="vdpol",
        f=vdpol_rhs,
        y0=jnp.asarray([2.0, 0.0], dtype),
        t0=0.0,
        t1=VDPOL_T1,
        args=jnp.asarray(VDPOL_EPS, dtype),
        dtype=dtype,
        reference=VDPOL_REFERENCE,
    )


# OREGO: the Oregonator, Field and Noyes' model of the Belousov-Zhabotinskii
# reaction (orego.f; Hairer and Wanner vol. II, section IV.1). Components range
# over ~1 to ~1e5 and the solution is periodic with sharp fronts.
OREGO_PARAMS = (77.27, 8.375e-6, 0.161)  # s, q, w
OREGO_T1 = 360.0
OREGO_REFERENCE = _reference([0.1000814870318523e1, 0.1228178521549917e4, 0.1320554942846706e3])


def orego_rhs(t, y, args):
    """``args = (s, q, w)``: ``y1' = s (y2 + y1 (1 - q y1 - y2))``, ``y2' = (y3 - (1 + y1) y2) / s``,
    ``y3' = w (y1 - y3)``."""
    s, q, w = args[0], args[1], args[2]
    y1, y2, y3 = y[0], y[1], y[2]
    return jnp.stack([s * (y2 + y1 * (1 - q * y1 - y2)), (y3 - (1 + y1) * y2) / s, w * (y1 - y3)])


def orego(dtype=np.float64) -> Problem:
    """OREGO from ``(1, 2, 3)`` on ``[0, 360]`` (test set, release 2.4)."""
    dtype = _check_dtype(dtype)
    return Problem(
        name="orego",
        f=orego_rhs,
        y0=jnp.asarray([1.0, 2.0, 3.0], dtype),
        t0=0.0,
        t1=OREGO_T1,
        args=jnp.asarray(OREGO_PARAMS, dtype),
        dtype=dtype,
        reference=OREGO_REFERENCE,
    )


# POLLU: the chemistry of the RIVM air pollution model, 20 species and 25
# reactions (J. G. Verwer, "Gauss-Seidel iteration for stiff ODEs from chemical
# kinetics", SIAM J. Sci. Comput. 15(5), 1994; pollu.f). Written here as
# f = S r: reaction j has rate r_j = k_j * y[a_j] * y[b_j] (b_j = "none" for a
# first-order reaction) and S is the stoichiometric matrix, built from the
# reaction list below (species 1-based as in the test set: 1 NO2, 2 NO, 3 O3P,
# 4 O3, 5 HO2, 6 OH, 7 HCHO, 8 CO, 9 ALD, 10 MEO2, 11 C2O3, 12 CO2, 13 PAN,
# 14 CH3O, 15 HNO3, 16 O1D, 17 SO2, 18 SO4, 19 NO3, 20 N2O5). Sulfur y17 + y18
# is conserved.
POLLU_K = (
    0.35,
    26.6,
    1.23e4,
    8.6e-4,
    8.2e-4,
    1.5e4,
    1.3e-4,
    2.4e4,
    1.65e4,
    9.0e3,
    2.2e-2,
    1.2e4,
    1.88,
    1.63e4,
    4.8e6,
    3.5e-4,
    1.75e-2,
    1.0e8,
    4.44e11,
    1.24e3,
    2.1,
    5.78,
    4.74e-2,
    1.78e3,
    3.12,
)
# (reactants, products) per reaction, 1-based species; a repeated product is
# produced twice.
POLLU_REACTIONS = (
    ((1,), (2, 3)),  # r1:  NO2 -> NO + O3P
    ((2, 4), (1,)),  # r2:  NO + O3 -> NO2
    ((5, 2), (1, 6)),  # r3:  HO2 + NO -> NO2 + OH
    ((7,), (5, 5, 8)),  # r4:  HCHO -> 2 HO2 + CO
    ((7,), (8,)),  # r5:  HCHO -> CO
    ((7, 6), (5, 8)),  # r6:  HCHO + OH -> HO2 + CO
    ((9,), (5, 8, 10)),  # r7:  ALD -> MEO2 + HO2 + CO
    ((9, 6), (11,)),  # r8:  ALD + OH -> C2O3
    ((11, 2), (1, 10, 12)),  # r9:  C2O3 + NO -> NO2 + MEO2 + CO2
    ((11, 1), (13,)),  # r10: C2O3 + NO2 -> PAN
    ((13,), (1, 11)),  # r11: PAN -> C2O3 + NO2
    ((10, 2), (1, 14)),  # r12: MEO2 + NO -> CH3O + NO2
    ((14,), (5, 7)),  # r13: CH3O -> HCHO + HO2
    ((1, 6), (15,)),  # r14: NO2 + OH -> HNO3
    ((3,), (4,)),  # r15: O3P -> O3
    ((4,), (16,)),  # r16: O3 -> O1D
    ((4,), (3,)),  # r17: O3 -> O3P
    ((16,), (6, 6)),  # r18: O1D -> 2 OH
    ((16,), (3,)),  # r19: O1D -> O3P
    ((17, 6), (5, 18)),  # r20: SO2 + OH -> SO4 + HO2
    ((19,), (2,)),  # r21: NO3 -> NO
    ((19,), (1, 3)),  # r22: NO3 -> NO2 + O3P
    ((1, 4), (19,)),  # r23: NO2 + O3 -> NO3
    ((19, 1), (20,)),  # r24: NO3 + NO2 -> N2O5
    ((20,), (1, 19)),  # r25: N2O5 -> NO3 + NO2
)
POLLU_Y0 = tuple({2: 0.2, 4: 0.04, 7: 0.1, 8: 0.3, 9: 0.01, 17: 0.007}.get(i, 0.0) for i in range(1, 21))
POLLU_T1 = 60.0
POLLU_REFERENCE = _reference(
    [
        0.5646255480022769e-1,
        0.1342484130422339e0,
        0.4139734331099427e-8,
        0.5523140207484359e-2,
        0.2018977262302196e-6,
        0.1464541863493966e-6,
        0.7784249118997964e-1,
        0.3245075353396018e0,
        0.7494013383880406e-2,
        0.1622293157301561e-7,
        0.1135863833257075e-7,
        0.2230505975721359e-2,
        0.2087162882798630e-3,
        0.1396921016840158e-4,
        0.8964884856898295e-2,
        0.4352846369330103e-17,
        0.6899219696263405e-2,
        0.1007803037365946e-3,
        0.1772146513969984e-5,
        0.5682943292316392e-4,
    ]
)


def _pollu_tables():
    n, m = 20, len(POLLU_REACTIONS)
    first = np.empty(m, np.int32)
    second = np.full(m, n, np.int32)  # index n: the appended constant 1 (first-order reactions)
    s = np.zeros((n, m))
    for j, (reactants, products) in enumerate(POLLU_REACTIONS):
        first[j] = reactants[0] - 1
        if len(reactants) == 2:
            second[j] = reactants[1] - 1
        for i in reactants:
            s[i - 1, j] -= 1
        for i in products:
            s[i - 1, j] += 1
    for a in (first, second, s):
        a.setflags(write=False)
    return first, second, s


POLLU_FIRST, POLLU_SECOND, POLLU_STOICH = _pollu_tables()


def pollu_rhs(t, y, args):
    """POLLU as ``f = S r``, ``r_j = k_j y[a_j] y[b_j]``; ``args = (k1, ..., k25)``."""
    y1 = jnp.concatenate([y, jnp.ones((1,), y.dtype)])
    r = args * y1[POLLU_FIRST] * y1[POLLU_SECOND]
    return jnp.asarray(POLLU_STOICH, y.dtype) @ r


def pollu(dtype=np.float64) -> Problem:
    """POLLU on ``[0, 60]`` (test set, release 2.4)."""
    dtype = _check_dtype(dtype)
    return Problem(
        name="pollu",
        f=pollu_rhs,
        y0=jnp.asarray(POLLU_Y0, dtype),
        t0=0.0,
        t1=POLLU_T1,
        args=jnp.asarray(POLLU_K, dtype),
        dtype=dtype,
        reference=POLLU_REFERENCE,
    )


# The five, in the order of the benchmark tables.
TESTSET = (hires, rober, vdpol, orego, pollu)


# ----------------------------------------------------------------------------
# A pharmacokinetic/pharmacodynamic model: an oral dose into a two-compartment
# model with an effect compartment driving an indirect response (inhibition of
# production; Dayneka, Garg and Jusko, J. Pharmacokinet. Biopharm. 21, 1993, model I).
# No closed form: the benchmarks compare gradients with a tight independent solve.
# ----------------------------------------------------------------------------

#: ka, F, CL, V1, Q, V2, ke0, kin, kout, imax, ic50 (hours, litres, mg).
PKPD_PARAMS = (1.0, 0.8, 5.0, 20.0, 10.0, 50.0, 0.5, 10.0, 0.5, 0.9, 2.0)
PKPD_DOSE = 100.0


def pkpd_rhs(t, y, args):
    """States: gut amount, central amount, peripheral amount, effect-site concentration,
    response; the response's production is inhibited by ``imax Ce^2 / (ic50^2 + Ce^2)``."""
    ka, F, CL, V1, Q, V2, ke0, kin, kout, imax, ic50 = (args[i] for i in range(11))
    gut, central, peripheral, ce, response = y[0], y[1], y[2], y[3], y[4]
    conc = central / V1
    inhibition = imax * ce**2 / (ic50**2 + ce**2)
    return jnp.stack(
        [
            -ka * gut,
            F * ka * gut - CL * conc - Q * conc + Q * peripheral / V2,
            Q * conc - Q * peripheral / V2,
            ke0 * (conc - ce),
            kin * (1.0 - inhibition) - kout * response,
        ]
    )


def pkpd(dtype=np.float64) -> Problem:
    """The PK/PD model above: 5 states, 11 parameters, a dose of 100 at ``t = 0``, the
    response at its baseline ``kin / kout``, on ``[0, 24]`` hours."""
    dtype = _check_dtype(dtype)
    kin, kout = PKPD_PARAMS[7], PKPD_PARAMS[8]
    return Problem(
        name="pkpd",
        f=pkpd_rhs,
        y0=jnp.asarray([PKPD_DOSE, 0.0, 0.0, 0.0, kin / kout], dtype),
        t0=0.0,
        t1=24.0,
        args=jnp.asarray(PKPD_PARAMS, dtype),
        dtype=dtype,
    )


# Tolerances for the test set: atol = rtol * TESTSET_ATOL_OVER_RTOL[name]. Chosen from the size of the components
# that matter (our choice, not the test set's: its reports use per-solver
# settings): HIRES' smallest end values are ~6e-5 (SciMLBenchmarks' HIRES runs
# use the same 1e-4 ratio); ROBER's y1, y2 end at 2e-8 and 8e-14 after a y2 peak
# of 4e-5; VDPOL and OREGO have no component persistently below ~1; POLLU's
# species of interest lie above ~1e-6 (y16, the O1D radical, is a
# quasi-steady-state value of 4e-17).
TESTSET_ATOL_OVER_RTOL = {"hires": 1e-4, "rober": 1e-10, "vdpol": 1.0, "orego": 1.0, "pollu": 1e-6}


# ----------------------------------------------------------------------------
# Steady-state problems: f(t, y*, args) = 0 (diffode.steady_state).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class SteadyProblem:
    """A steady-state problem ``f(t, y*, args) = 0`` with initial guess ``y0``.

    ``exact(args)`` is the closed-form steady state as a JAX function of
    ``args`` (so its derivatives of every order come from JAX), or ``None``.
    The steady state is stable: integrating ``f`` from ``y0`` reaches it.
    """

    name: str
    f: Callable[[Any, Any, Any], Any]
    y0: Any
    args: Any
    exact: Optional[Callable[[Any], Any]] = None
    dtype: Any = np.float64


def linear_steady_rhs(t, y, args):
    """``y' = A y + B p`` with ``args = (A, p)`` and the fixed ``B`` of :data:`LINEAR_STEADY_B`."""
    a, p = args
    return a @ y + jnp.asarray(LINEAR_STEADY_B, y.dtype) @ p


# A non-normal upper-triangular matrix (eigenvalues -1, -2, -3) and an input map.
LINEAR_STEADY_A = ((-1.0, 2.0, 0.5), (0.0, -2.0, 1.0), (0.0, 0.0, -3.0))
LINEAR_STEADY_B = ((1.0, 0.0), (0.5, 1.0), (0.0, 2.0))


def linear_steady(dtype=np.float64) -> SteadyProblem:
    """``y' = A y + B p``, stable ``A``: ``y* = -A^{-1} B p``, differentiable in ``A`` and ``p``."""
    dtype = _check_dtype(dtype)
    args = (jnp.asarray(LINEAR_STEADY_A, dtype), jnp.asarray([1.0, -2.0], dtype))

    def exact(args):
        a, p = args
        return -jnp.linalg.solve(a, jnp.asarray(LINEAR_STEADY_B, a.dtype) @ p)

    return SteadyProblem("linear_steady", linear_steady_rhs, jnp.zeros(3, dtype), args, exact, dtype)


def cubic_relaxation_rhs(t, y, args):
    """``y' = p - y**3`` componentwise."""
    return args - y**3


def cubic_relaxation(dtype=np.float64) -> SteadyProblem:
    """``y' = p - y**3`` with ``p = (0.5, 2, 8)``: ``y* = p**(1/3)`` (stable: ``df/dy = -3 y**2 < 0``)."""
    dtype = _check_dtype(dtype)
    return SteadyProblem(
        "cubic_relaxation",
        cubic_relaxation_rhs,
        jnp.ones(3, dtype),
        jnp.asarray([0.5, 2.0, 8.0], dtype),
        lambda p: jnp.cbrt(p),
        dtype,
    )


def michaelis_menten_flow_rhs(t, y, args):
    """Substrate fed at ``k_in`` and converted (Michaelis-Menten, ``V``, ``K``) into a product
    cleared at ``k_out``; a dict state ``{"S", "P"}`` and a dict of parameters."""
    rate = args["V"] * y["S"] / (args["K"] + y["S"])
    return {"S": args["k_in"] - rate, "P": rate - args["k_out"] * y["P"]}


def michaelis_menten_flow(dtype=np.float64) -> SteadyProblem:
    """Michaelis-Menten inflow and outflow: ``S* = K k_in / (V - k_in)``, ``P* = k_in / k_out``
    (for ``V > k_in``)."""
    dtype = _check_dtype(dtype)
    args = {k: jnp.asarray(v, dtype) for k, v in dict(k_in=1.0, V=3.0, K=0.5, k_out=0.4).items()}

    def exact(a):
        return {"S": a["K"] * a["k_in"] / (a["V"] - a["k_in"]), "P": a["k_in"] / a["k_out"]}

    y0 = {"S": jnp.asarray(0.1, dtype), "P": jnp.asarray(0.0, dtype)}
    return SteadyProblem("michaelis_menten_flow", michaelis_menten_flow_rhs, y0, args, exact, dtype)


def enzyme_chain_rhs(t, y, args):
    """A linear pathway ``y_0 -> y_1 -> ... -> y_{n-1}``: inflow ``k_in`` into ``y_0``,
    Michaelis-Menten forward steps ``V_i y_i / (K_i + y_i)``, mass-action back
    steps ``b_i y_{i+1}`` and first-order degradation ``d_i y_i``."""
    fwd = args["V"] * y[:-1] / (args["K"] + y[:-1]) - args["b"] * y[1:]  # net flux of step i
    inflow = jnp.concatenate([args["k_in"][None], fwd])
    outflow = jnp.concatenate([fwd, jnp.zeros((1,), y.dtype)])
    return inflow - outflow - args["d"] * y


def enzyme_chain(n: int = 64, dtype=np.float64) -> SteadyProblem:
    """:func:`enzyme_chain_rhs` with ``n`` species and ``4 n - 2`` parameters drawn once from
    fixed ranges (seeded): ``V in [1, 2]``, ``K in [0.5, 1.5]``, ``b in [0.1, 0.5]``,
    ``d in [0.05, 0.2]``, ``k_in = 1``. Its Jacobian is tridiagonal, and each
    column sums to ``-d_j < 0`` with a negative diagonal, so it is strictly
    column diagonally dominant: by Gershgorin's theorem every eigenvalue has a
    negative real part, so the steady state is stable. No closed form; the
    benchmark model for steady-state gradients."""
    dtype = _check_dtype(dtype)
    rng = np.random.RandomState(0)
    args = dict(
        k_in=jnp.asarray(1.0, dtype),
        V=jnp.asarray(rng.uniform(1.0, 2.0, n - 1), dtype),
        K=jnp.asarray(rng.uniform(0.5, 1.5, n - 1), dtype),
        b=jnp.asarray(rng.uniform(0.1, 0.5, n - 1), dtype),
        d=jnp.asarray(rng.uniform(0.05, 0.2, n), dtype),
    )
    return SteadyProblem(f"enzyme_chain_{n}", enzyme_chain_rhs, jnp.ones(n, dtype), args, None, dtype)


#: The steady-state problems with closed forms.
STEADY = (linear_steady, cubic_relaxation, michaelis_menten_flow)
