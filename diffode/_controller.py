"""Step-size control: error norms, the PID controller and the initial step."""

from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._util import LIBRARY_REDUCTION_MIN, fused_sum, select


def rms_norm(x: Float[Array, " n"]) -> Float[Array, ""]:
    """Root-mean-square norm, the default error norm (Hairer, Norsett and Wanner, II.4)."""
    if x.size == 0:
        return jnp.zeros((), x.dtype)
    if x.size >= LIBRARY_REDUCTION_MIN:
        return jnp.sqrt(jnp.mean(jnp.square(x)))  # a large state: the library kernel is faster
    # A small member's sum stays in XLA's fused loop: under a vmap of 2,048 or more members
    # of 2 components a plain one went to a library kernel at a fixed cost per step.
    return jnp.sqrt(fused_sum(jnp.square(x), tuple(range(x.ndim))) / x.size)


def max_norm(x: Float[Array, " n"]) -> Float[Array, ""]:
    """Infinity norm: the largest scaled component decides."""
    if x.size == 0:
        return jnp.zeros((), x.dtype)
    return jnp.max(jnp.abs(x))


class PIDController(eqx.Module):
    """Proportional-integral-derivative step-size controller.

    A step's scaled error is ``err = norm(e / (atol + rtol * max(|y0|, |y1|)))``;
    the step is accepted when ``err <= 1``. With ``k`` the solver's error order
    and ``err_n``, ``err_{n-1}``, ``err_{n-2}`` the errors of the current and the
    two previous accepted steps, the next step is::

        h * clip(safety * err_n**(-b1/k) * err_{n-1}**(-b2/k) * err_{n-2}**(-b3/k))

    with ``b1 = icoeff + pcoeff + dcoeff``, ``b2 = -(pcoeff + 2 dcoeff)`` and
    ``b3 = dcoeff`` (Soderlind 2002, "Automatic control and adaptive
    time-stepping", Numer. Algorithms 31). The default gains are the PI
    controller of DOPRI5 (Hairer, Norsett and Wanner, vol. I, II.4, with
    ``beta = 0.04``: exponents ``0.17`` and ``0.04`` for order 5). ``pcoeff=0,
    icoeff=1`` is the classical integral (I) controller.

    Args:
        pcoeff, icoeff, dcoeff: the three gains.
        safety: factor applied to every proposal.
        factormin, factormax: bounds on the ratio of consecutive steps. After a
            rejection the step always shrinks, after an acceptance it never does.
        dtmin, dtmax: bounds on the magnitude of a step. A step rejected at
            ``dtmin`` ends the solve with status ``DT_MIN_REACHED``.
        norm: the error norm, :func:`rms_norm` by default.
    """

    pcoeff: float = 0.2
    icoeff: float = 0.65
    dcoeff: float = 0.0
    safety: float = 0.9
    factormin: float = 0.2
    factormax: float = 10.0
    dtmin: float | None = None
    dtmax: float | None = None
    norm: Callable[[Array], Array] = eqx.field(static=True, default=rms_norm)

    def __check_init__(self):
        if not 0 < self.safety <= 1:
            raise ValueError(f"PIDController: safety must lie in (0, 1], got {self.safety}")
        if not 0 < self.factormin < 1 < self.factormax:
            raise ValueError("PIDController: need 0 < factormin < 1 < factormax")
        if self.dtmin is not None and self.dtmax is not None and self.dtmin > self.dtmax:
            raise ValueError("PIDController: dtmin must not exceed dtmax")

    def error_ratio(self, y0, y1, y_error, rtol, atol) -> Array:
        """Scaled error norm of a step; ``inf`` when ``y1`` or the estimate is not finite.

        The finiteness test is folded into the norm's reduction (a NaN ratio
        wherever ``y1`` is not finite) so that both cost one kernel.
        """
        scale = atol + rtol * jnp.maximum(jnp.abs(y0), jnp.abs(y1))
        ratio = select(jnp.isfinite(y1), y_error / scale, jnp.nan)
        err = self.norm(ratio)
        return select(jnp.isfinite(err), err, jnp.inf)

    def init(self, dtype) -> tuple[Array, ...]:
        """Controller memory: the previous errors, as many as the gains use.

        Two with ``dcoeff``, one with only ``pcoeff``, none for an I controller:
        every carried scalar is one more kernel for XLA to compile.
        """
        num = 2 if self.dcoeff != 0 else int(self.pcoeff != 0)
        return (jnp.ones((), dtype),) * num

    def adapt(self, h, err, order: int, memory):
        """Accept or reject a step of size ``h`` with scaled error ``err``.

        Returns ``(accept, h_next, memory)``. The proposal is not differentiated:
        step sizes are constants of the discrete scheme.
        """
        err = lax.stop_gradient(err)
        accept = err <= 1.0
        clamped = jnp.maximum(err, 1e-10)
        b1 = (self.icoeff + self.pcoeff + self.dcoeff) / order
        b2 = -(self.pcoeff + 2 * self.dcoeff) / order
        b3 = self.dcoeff / order
        # Negative powers of the errors rather than powers of their inverses: an
        # inverse read twice (here and by the memory) would be a kernel of its own.
        factor = self.safety * clamped ** (-b1)
        # memory holds exactly the previous errors that a nonzero b2, b3 use.
        for b, prev in zip((b2, b3), memory):
            factor = factor * prev ** (-b)
        # After an accepted step never shrink; after a rejection always shrink.
        lo = select(accept, 1.0, self.factormin)
        hi = select(accept, self.factormax, self.safety)
        factor = jnp.clip(select(jnp.isfinite(err), factor, self.factormin), lo, hi)
        h_next = (lax.stop_gradient(h) * factor).astype(jnp.result_type(h))
        if self.dtmax is not None:
            h_next = jnp.minimum(h_next, self.dtmax)
        if self.dtmin is not None:
            h_next = jnp.maximum(h_next, self.dtmin)
        # A failed step (err = inf) says nothing about smoothness: keep the memory.
        keep = accept & jnp.isfinite(err)
        memory = tuple(select(keep, new, old) for new, old in zip((clamped,) + memory[:-1], memory))
        return accept, h_next, memory


def initial_step(f, t0, y0, f0, order: int, rtol, atol, norm) -> tuple[Array, int]:
    """Starting step size (Hairer, Norsett and Wanner, vol. I, II.4, p. 169).

    Uses one extra evaluation of ``f``; returns ``(h0, num_fevals)``.
    """
    scale = atol + jnp.abs(y0) * rtol
    # Both norms in one (batched) reduction: one kernel instead of two. Each row
    # is divided by scale before stacking: dividing the stack by a broadcast
    # scale is rewritten by XLA into a reciprocal, a kernel of its own.
    d0, d1 = jax.vmap(norm)(jnp.stack([y0 / scale, f0 / scale]))
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = select(small, 1e-6, 0.01 * d0 / jnp.maximum(d1, 1e-5))
    f1 = f(t0 + h0, y0 + h0 * f0)
    d2 = norm((f1 - f0) / scale) / h0
    dmax = jnp.maximum(d1, d2)
    h1 = select(
        dmax <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3), (0.01 / jnp.maximum(dmax, 1e-15)) ** (1.0 / (order + 1))
    )
    h = jnp.minimum(100 * h0, h1)
    h = select(jnp.isfinite(h) & (h > 0), h, 1e-6)
    return lax.stop_gradient(h), 1
