"""Small internal helpers shared by the loop, the controller and the solvers."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.custom_batching import custom_vmap


def _plus(a, b):
    # a + b, written so that XLA does not recognise a reduction over it as a sum
    # (see fused_sum). Negation is exact, so this is the same IEEE sum.
    return a - (-b)


#: Input or output size from which XLA's CPU backend runs a plain sum in a library kernel.
LIBRARY_REDUCTION_MIN = 4096


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def fused_sum(x, axes: tuple[int, ...]):
    """``jnp.sum(x, axes)``, as a reduction that XLA's CPU backend keeps in its own fused loop.

    XLA's CPU backend (jaxlib 0.10) hands a plain sum (or max, min) whose input or
    output has ``LIBRARY_REDUCTION_MIN`` elements or more to a library kernel (YNNPACK), outside its
    fusion, at a fixed cost per call. Under ``jax.vmap`` a small member's sums grow
    with the batch, and in a step loop that cost dominates (see
    ``explicit_rk._sum_rows``). The library takes only a reduction computed by a
    bare ``add``, so this one adds as ``a - (-b)``. Its derivative is a plain sum (a
    linear map that reverse mode can transpose). For a sum that is large before any
    ``vmap`` the library kernel is the faster one (an RMS norm of 2e5 entries: 50 us
    against 85 us here), so callers keep this for small per-member inputs.
    """
    return lax.reduce(x, np.zeros((), x.dtype), _plus, tuple(a % x.ndim for a in axes))


@fused_sum.defjvp
def _fused_sum_jvp(axes, primals, tangents):
    (x,), (dx,) = primals, tangents
    return fused_sum(x, axes), jnp.sum(dx, axis=axes)


def select(pred, on_true, on_false):
    """``jnp.where`` for a scalar ``pred`` without a nested jit (cheaper to trace and compile).

    Python scalars take the dtype of the other operand, as in ``jnp.where``.
    """
    if not (
        isinstance(on_true, jax.Array)
        and isinstance(on_false, jax.Array)
        and on_true.dtype == on_false.dtype
        and on_true.shape == on_false.shape
    ):
        dtype = jnp.result_type(on_true, on_false)
        on_true = jnp.asarray(on_true, dtype)
        on_false = jnp.asarray(on_false, dtype)
        shape = jnp.broadcast_shapes(on_true.shape, on_false.shape)
        on_true = jnp.broadcast_to(on_true, shape)
        on_false = jnp.broadcast_to(on_false, shape)
    pred = jnp.asarray(pred)
    if pred.shape != on_true.shape:
        pred = lax.broadcast_in_dim(pred, on_true.shape, ())
    return lax.select(pred, on_true, on_false)


def tree_select(pred, on_true, on_false):
    return jtu.tree_map(lambda a, b: select(pred, a, b), on_true, on_false)


def finite_filler(spec) -> jax.Array:
    """Finite values of ``spec``'s shape and dtype, for a buffer whose contents are never used.

    Small ones are non-uniform literal constants, which cost XLA no kernel (zeros
    would be turned into a broadcast, one more kernel to compile).
    """
    if spec.size * np.dtype(spec.dtype).itemsize <= 4096:
        return jnp.asarray(np.arange(spec.size, dtype=spec.dtype).reshape(spec.shape))
    return jnp.zeros(spec.shape, spec.dtype)


def float0_zeros(x) -> np.ndarray:
    """The zero tangent of an integer output of a custom JVP rule (dtype ``float0``)."""
    return np.zeros(np.shape(x), dtype=jax.dtypes.float0)


def check_status(x, status, messages: tuple[str, ...]):
    """``x``, after raising ``eqx.EquinoxRuntimeError(messages[status])`` when ``status`` is not 0.

    A known status (eager execution) is checked in Python. A traced one is
    checked by the compiled program: a ``lax.cond`` whose failing branch calls
    back to Python to raise, so a successful run makes no callback. Under
    ``jit`` the error reaches the caller wrapped in a ``jax.errors.JaxRuntimeError``
    that quotes the message. Under ``vmap`` the largest code of the batch decides.
    (Leaner to trace and compile than ``eqx.branched_error_if``, which also
    records the Python stack.)
    """
    if not isinstance(status, jax.core.Tracer):
        code = int(np.max(np.asarray(status)))
        if code != 0:
            raise eqx.EquinoxRuntimeError(messages[code])
        return x
    code = eqx.internal.unvmap_max(status)

    def fail():
        def raise_error(c):
            raise eqx.EquinoxRuntimeError(messages[int(c)])

        return jax.pure_callback(raise_error, jax.eval_shape(lambda: x), code)

    return lax.cond(code != 0, fail, lambda: x)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def raise_on_failure(x, status, messages: tuple[str, ...]):
    """``x``, raising ``messages[status]`` when ``status`` is not 0 (also under ``jit`` and ``vmap``)."""
    return check_status(x, status, messages)


@raise_on_failure.defjvp
def _raise_on_failure_jvp(messages, primals, tangents):
    # Checked on the derivative too: under jit, a program that only uses
    # derivatives of x would otherwise drop the check as dead code. The tangent
    # is scaled by a checked 1, computed from the primal: a check applied to the
    # tangent itself would be transposed in reverse mode, and the transpose of
    # its failing branch (which does not depend on the tangent) drops the check.
    x, status = primals
    one = check_status(jnp.ones((), jnp.float32), status, messages)
    dx = jtu.tree_map(lambda t: t if t.dtype == jax.dtypes.float0 else t * one.astype(t.dtype), tangents[0])
    return raise_on_failure(x, status, messages), dx


def failure_scale(status, throw: bool, dtype, messages: tuple[str, ...]):
    """1 when ``status`` is 0 (success), else NaN: the factor of every tangent of a solve
    or steady state.

    A failure has no derivative: NaN tangents (and cotangents, by transposition).
    With ``throw=True`` the factor also carries the error check (``messages[status]``),
    which no transformation can drop since the derivative depends on it.
    """
    scale = jnp.where(status == 0, 1, jnp.nan).astype(dtype)
    return raise_on_failure(scale, status, messages) if throw else scale


@custom_vmap
def any_member(pred):
    """``pred`` itself; under ``jax.vmap``, whether it holds for any member of the batch (unbatched).

    The predicate of a loop whose members finish at different iterations: with a
    batched predicate ``lax.while_loop`` selects between the old and the new value
    of its whole carry on every iteration (buffers of ``max_steps`` rows
    included). With this one the loop runs until the last member is done, and
    its body makes a finished member's iteration a no-op where it is cheap (a
    rejected step, a write to a discarded row).
    """
    return pred


@any_member.def_vmap
def _any_member_vmap(axis_size, in_batched, pred):
    (batched,) = in_batched
    return (jnp.any(pred) if batched else pred), False


@custom_vmap
def slowest(t):
    """``t`` itself; under ``jax.vmap``, the batch's smallest ``t`` (unbatched): where the
    slowest member of a batch of solves is."""
    return t


@slowest.def_vmap
def _slowest_vmap(axis_size, in_batched, t):
    (batched,) = in_batched
    return (jnp.min(t) if batched else t), False


class _Progress:
    """The progress line of ``solve(..., progress=True)`` on standard error, redrawn at most
    every 0.1 s, and once more (with a newline) when a solve reaches its end."""

    def __init__(self):
        self.last = 0.0

    def __call__(self, t, t0, t_end, direction):
        import sys
        import time

        t, t0, t_end = float(t), float(t0), float(t_end)
        done = t >= t_end
        now = time.monotonic()
        if not done and now - self.last < 0.1:
            return
        self.last = now
        frac = 1.0 if t_end == t0 else min(max((t - t0) / (t_end - t0), 0.0), 1.0)
        bar = "#" * int(30 * frac)
        sign = float(direction)
        sys.stderr.write(
            f"\rdiffode [{bar:<30}] {100 * frac:5.1f}%  t = {sign * t:.6g} of {sign * t_end:.6g}"
            + ("\n" if done else "")
        )
        sys.stderr.flush()


#: The host-side callback of the progress meter.
show_progress = _Progress()


def vmap_size(*trees) -> int:
    """The size of the ``jax.vmap`` being traced that batches an array in ``trees``; 0 when none does.

    Decided at trace time: a probe (``custom_vmap``) whose batching rule JAX calls
    while it traces the vmap, and only then, with the batch's size (the innermost
    vmap's, when several are nested). Used to pick the loop structure that suits
    a batch; when the rule is not called (nothing batched, or a ``jit`` between
    the vmap and this call, which JAX traces unbatched) the unbatched structure is
    used, which is correct under vmap too.
    """
    leaves = [x for x in jtu.tree_leaves(trees) if isinstance(x, jax.Array)]
    if not leaves:
        return 0
    seen = []

    @custom_vmap
    def probe(xs):
        return xs[0]

    @probe.def_vmap
    def _rule(axis_size, in_batched, xs):
        seen.append(int(axis_size))
        return xs[0], in_batched[0][0]

    # Not differentiated: the probe has no derivative rule, and it answers the same
    # question of the values themselves.
    probe([jax.lax.stop_gradient(x) for x in leaves])
    return seen[0] if seen else 0
