"""Parameter fitting with optimistix's Levenberg-Marquardt, which linearises the residuals
(``jax.linearize``) and transposes the linearisation: every sensitivity method must support both."""

import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import diffode
from diffode import problems

LV = problems.lotka_volterra()
TS = LV.ts(31)
TRUE = jnp.asarray(LV.args)


def _model(p, method):
    return diffode.solve(LV.f, LV.y0, TS, p, sensitivity=method, rtol=1e-10, atol=1e-10).ys


@pytest.mark.parametrize(
    "method",
    [
        diffode.Direct(),
        diffode.ForwardSensitivity(),
        diffode.BacksolveAdjoint(),
        diffode.InterpolatingAdjoint(),
        None,
    ],
    ids=["Direct", "ForwardSensitivity", "BacksolveAdjoint", "InterpolatingAdjoint", "Auto"],
)
def test_levenberg_marquardt_recovers_lotka_volterra(method):
    # Noise-free data from the true parameters; start 30% off. At a zero-residual
    # optimum the fit is limited only by the solver tolerance (1e-10) and the
    # optimiser's (1e-9): 1e-6 relative leaves a wide margin.
    data = _model(TRUE, diffode.Direct())

    def residuals(p, _):
        return _model(p, method) - data

    p0 = TRUE * jnp.asarray([1.3, 0.7, 1.3, 0.7])
    sol = optx.least_squares(residuals, optx.LevenbergMarquardt(rtol=1e-9, atol=1e-9), p0, max_steps=100)
    assert sol.result == optx.RESULTS.successful
    np.testing.assert_allclose(sol.value, TRUE, rtol=1e-6)
