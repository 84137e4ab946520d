"""Shared initial value problems for the tests (and, later, ``benchmarks/``).

Import-light on purpose: only ``jax`` and ``numpy`` at module level; SciPy is
imported inside the functions that compute reference solutions.

Arrays are built by the factory functions, never at import time, so that a
script can enable float64 (``jax.config.update("jax_enable_x64", True)``)
before any array exists; diffode never enables it itself. Every factory takes a
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
    "arenstorf",
    "cos_linear",
    "exponential_decay",
    "linear_system",
    "lotka_volterra",
    "lotka_volterra_reference",
    "rescaled_kepler",
    "robertson",
    "van_der_pol",
    "van_der_pol_stiff",
]


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """An initial value problem ``dy/dt = f(t, y, args)``, ``y(t0) = y0`` on ``[t0, t1]``.

    ``exact(t)`` (scalar ``t``) is the exact solution where one is known, else
    ``None``. ``eq=False``: problems hold arrays, so they hash by identity.
    """

    name: str
    f: Callable[[Any, Any, Any], Any]
    y0: Any
    t0: float
    t1: float
    args: Any = None
    exact: Optional[Callable[[Any], Any]] = None
    dtype: Any = np.float64

    def ts(self, n: int, dtype=None) -> jax.Array:
        """``n`` equispaced save times from ``t0`` to ``t1`` (both included)."""
        return jnp.linspace(self.t0, self.t1, n, dtype=self.dtype if dtype is None else dtype)


def _check_dtype(dtype):
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise RuntimeError('float64 needs jax.config.update("jax_enable_x64", True) first')
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
        _lotka_volterra_rhs_numpy, (ts[0], ts[-1]), np.asarray(y0, np.float64), method="DOP853",
        t_eval=np.asarray(ts), args=(params,), rtol=1e-13, atol=1e-13,
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
    return jnp.stack([
        -k1 * y1 + k3 * y2 * y3,
        k1 * y1 - k3 * y2 * y3 - k2 * y2**2,
        k2 * y2**2,
    ])


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
