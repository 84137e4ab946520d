"""What every sensitivity method implements, and helpers they share."""

from __future__ import annotations

from typing import Any, Callable

import equinox as eqx
import jax
import jax.tree_util as jtu
from jaxtyping import Array, PyTree


class AbstractSensitivity(eqx.Module):
    """How derivatives of a solve are computed (the ``sensitivity=`` of :func:`diffode.solve`).

    A method maps the flat problem to the saved states exactly as
    :func:`diffode._solve.integrate` does, but with its own derivative rules::

        ys, counters = method.integrate(f, y0, ts, args, opts)

    ``f(t, y, args)`` works on flat ``(n,)`` states; ``ys`` is ``(len(ts), n)``;
    ``counters`` is the int32 status-and-statistics vector of ``integrate``.
    Derivatives are taken with respect to ``y0``, ``ts`` and the inexact-array
    leaves of ``args``.
    """

    def integrate(
        self, f: Callable[[Array, Array, Any], Array], y0: Array, ts: Array, args: PyTree, opts: Any
    ) -> tuple[Array, Array]:
        raise NotImplementedError


_FORWARD_TRACERS = ("JVPTracer",)
_REVERSE_TRACERS = ("LinearizeTracer",)


def _innermost_ad(trees) -> str | None:
    """``"forward"``, ``"reverse"`` or ``None``: the innermost differentiation of any array in
    ``trees`` at this point of tracing (walking through ``vmap`` and ``jit`` tracers)."""
    found = None
    for leaf in jtu.tree_leaves(trees):
        x = leaf
        while isinstance(x, jax.core.Tracer):
            name = type(x).__name__
            if name in _FORWARD_TRACERS:
                return "forward"
            if name in _REVERSE_TRACERS:
                found = "reverse"
                break
            inner = None
            for attr in ("primal", "val"):
                inner = getattr(x, attr, None)
                if inner is not None:
                    break
            if inner is None or inner is x:
                break
            x = inner
    return found


def forward_mode_active(*trees) -> bool:
    """Whether any array in ``trees`` is being differentiated in forward mode (``jax.jvp``,
    ``jax.jacfwd``) at this point of tracing.

    Reverse mode (``jax.grad``, ``jax.vjp``, ``jax.jacrev``) linearizes with a
    different tracer, so the two can be told apart; methods that define their
    derivative by a custom VJP use this to fall back to forward-mode rules. Only
    the innermost differentiation counts (walking through ``vmap`` and ``jit``
    tracers): under ``jax.hessian`` (forward over reverse) it is reverse mode.
    """
    return _innermost_ad(trees) == "forward"


def reverse_mode_active(*trees) -> bool:
    """Whether any array in ``trees`` is being differentiated in reverse mode (and none in
    forward mode) at this point of tracing; see :func:`forward_mode_active`."""
    return _innermost_ad(trees) == "reverse"


def split_args(args: PyTree) -> tuple[PyTree, PyTree]:
    """``(diff, static)``: the inexact-array leaves of ``args`` (differentiated) and the rest."""
    return eqx.partition(args, eqx.is_inexact_array)
