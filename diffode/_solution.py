"""The result of a solve: saved states, statistics, status and dense output."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PyTree


class Status(enum.IntEnum):
    """Integer codes in ``Solution.status``; ``MESSAGES[code]`` explains each."""

    SUCCESS = 0
    MAX_STEPS_REACHED = 1
    DT_UNDERFLOW = 2
    NONFINITE_RHS = 3
    DT_MIN_REACHED = 4
    TS_NOT_MONOTONIC = 5
    NONFINITE_INPUT = 6
    BAD_TOLERANCE = 7
    RHS_STRUCTURE_MISMATCH = 8
    NEWTON_FAILED = 9
    BAD_DT0 = 10
    EVENT_LIMIT = 11


MESSAGES: dict[int, str] = {
    Status.SUCCESS: "The solver reached the final time successfully.",
    Status.MAX_STEPS_REACHED: (
        "max_steps was reached before the final time; increase max_steps or loosen "
        "the tolerances (the problem may be stiff: try an implicit solver)."
    ),
    Status.DT_UNDERFLOW: (
        "The step size underflowed: steps became too small to change t. The "
        "solution may blow up here, or the problem is too stiff for this solver."
    ),
    Status.NONFINITE_RHS: (
        "The right-hand side f returned NaN or inf (or an implicit solver's linear "
        "algebra produced them), and shrinking the step did not help (with fixed "
        "steps there is no retry)."
    ),
    Status.DT_MIN_REACHED: "A step at the controller's dtmin was rejected.",
    Status.TS_NOT_MONOTONIC: "ts must be strictly increasing or strictly decreasing (and finite).",
    Status.NONFINITE_INPUT: "y0, args or tstops contains NaN or inf.",
    Status.BAD_TOLERANCE: "rtol and atol must be finite and non-negative, and not both zero.",
    Status.RHS_STRUCTURE_MISMATCH: (
        "f(t, y, args) must return a pytree with the same structure and leaf shapes as y0, of real values."
    ),
    Status.NEWTON_FAILED: (
        "The implicit solver's Newton iteration did not converge, even at the smallest step size."
    ),
    Status.BAD_DT0: "dt0 must be finite and non-zero.",
    Status.EVENT_LIMIT: (
        "Non-terminal events fired more often than their max_fires allow (diffode.Event(..., "
        "max_fires=...)) before the end of the span: raise max_fires, or end the solve with a "
        "terminal event where the events come ever faster (a bouncing ball coming to rest)."
    ),
}


def status_message(status, messages: dict[int, str]) -> str | list:
    """``messages[status]`` (outside ``jit`` only); a nested list when ``status`` is batched."""
    codes = np.asarray(status)
    if codes.ndim == 0:
        return messages[int(codes)]
    return np.vectorize(lambda c: messages[int(c)], otypes=[object])(codes).tolist()


#: Messages in code order, indexed by the status code when raising.
MESSAGE_LIST: tuple[str, ...] = tuple(MESSAGES[s] for s in Status)


class DenseOutput(eqx.Module):
    """Interpolation pieces of accepted steps, in the loop's (forward) time.

    Row ``k`` covers ``(t_start[k], t_start[k] + h[k]]``; unused rows have
    ``t_start = inf``.
    """

    t_start: Float[Array, " m"]
    h: Float[Array, " m"]
    y0: Float[Array, "m n"]
    y1: Float[Array, "m n"]
    data: Float[Array, "m ..."]
    num_pieces: Int[Array, ""]
    interpolate: Callable = eqx.field(static=True)

    def evaluate_flat(self, s: Float[Array, " q"]) -> Float[Array, "q n"]:
        """Flat states at internal times ``s``; NaN outside the covered interval.

        The covered interval runs from the first piece's start to the last
        accepted piece's end (where the solve stopped, after a failure), with a
        few ulps of slack for the rounding of ``t_start + h``.
        """
        last = jnp.maximum(self.num_pieces, 1) - 1
        k = jnp.searchsorted(self.t_start, s, side="left") - 1
        k = jnp.clip(k, 0, last)
        t_start, h = self.t_start[k], self.h[k]
        theta = ((s - t_start) / jnp.where(h == 0, 1, h)).astype(self.y0.dtype)
        hy = h.astype(self.y0.dtype)
        y = jax.vmap(self.interpolate)(hy, self.y0[k], self.y1[k], self.data[k], theta)
        # Exactly at a step's end, return the step's own end point.
        y = jnp.where((s == t_start + h)[:, None], self.y1[k], y)
        end = self.t_start[last] + self.h[last]
        slack = 16 * jnp.finfo(s.dtype).eps * jnp.maximum(jnp.abs(end), jnp.abs(self.t_start[0]))
        inside = (s >= self.t_start[0]) & (s <= end + slack)
        # A factor rather than a select, so that the derivative is NaN outside too.
        return y * jnp.where(inside, 1, jnp.nan).astype(y.dtype)[:, None]


class Stats(eqx.Module, Mapping):
    """Read-only mapping from counter names to int32 scalars, e.g. ``stats["num_steps"]``.

    It stores the loop's packed counter vector and slices it on access, so that a
    solve whose statistics are returned from ``jit`` costs no extra kernels.
    ``dict(sol.stats)`` gives a plain dict.
    """

    counters: Int[Array, "... k"]
    names: tuple[str, ...] = eqx.field(static=True)
    offset: int = eqx.field(static=True, default=0)  # position of names[0] in counters

    def __getitem__(self, name: str) -> Array:
        try:
            return self.counters[..., self.offset + self.names.index(name)]
        except ValueError:
            raise KeyError(name) from None

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"Stats({', '.join(f'{k}={self[k]}' for k in self.names)})"


class Solution(eqx.Module):
    """What :func:`diffode.solve` returns.

    Attributes:
        ts: the save times, as given.
        ys: the state at every entry of ``ts``, with a leading axis of ``len(ts)``.
            Entries the solver never reached (after a failure) are NaN.
        stats: ``num_steps``, ``num_accepted``, ``num_rejected``, ``num_fevals``
            and any solver-specific counters.
        status: 0 on success; see :class:`Status` and :attr:`message`.
        regularisers: with ``solve(..., regularise=True)``, the solver-heuristic
            regularisers (:class:`diffode.Regularisers`), else ``None``.
        event_t, event_y, event_index: with ``solve(..., events=...)``, the time and
            state where the solve stopped at an event and which event it was (NaN,
            NaN and -1 when none fired); ``None`` without events.
    """

    ts: Array
    ys: PyTree
    stats: Stats
    status: Int[Array, ""]
    dense_output: DenseOutput | None = None
    regularisers: Any = None
    direction: Array | None = None
    unravel: Callable | None = eqx.field(static=True, default=None)
    event_t: Array | None = None
    event_y: PyTree = None
    event_index: Array | None = None

    @property
    def success(self) -> Array:
        return self.status == Status.SUCCESS

    @property
    def message(self) -> str | list:
        """Human-readable status (outside ``jit`` only); a nested list when batched."""
        return status_message(self.status, MESSAGES)

    def steps(self) -> tuple[Array, PyTree, Array]:
        """``(t, y, count)``: ``ts[0]`` and the end of every accepted step, in order, and how
        many of those rows are used (``stats["num_accepted"] + 1``). Needs ``dense=True``,
        whose buffer of ``max_steps`` rows holds them; the rows after the last step are NaN.
        Differentiable as :meth:`evaluate` is (also under ``vmap``: then every array
        has the batch axis first).
        """
        if self.dense_output is None:
            raise ValueError("Solution.steps needs solve(..., dense=True).")
        d = self.dense_output
        count = d.num_pieces + 1
        used = jnp.arange(d.t_start.shape[-1] + 1) < count[..., None]
        s = jnp.concatenate([d.t_start[..., :1], d.t_start + d.h], axis=-1)
        t = jnp.where(used, jnp.expand_dims(self.direction, -1) * s, jnp.nan).astype(self.ts.dtype)
        y = jnp.where(used[..., None], jnp.concatenate([d.y0[..., :1, :], d.y1], axis=-2), jnp.nan)
        unravel = self.unravel
        for _ in range(y.ndim - 1):
            unravel = jax.vmap(unravel)
        return t, unravel(y), count

    def evaluate(self, t) -> PyTree:
        """State at time(s) ``t`` from the solver's own interpolant (``dense=True``).

        Defined on the interval the solve covered: from ``ts[0]`` to ``ts[-1]``, or
        to where the solve stopped after a failure. Outside it the result is NaN
        (no extrapolation), and so is its derivative.
        """
        if self.dense_output is None:
            raise ValueError("Solution.evaluate needs solve(..., dense=True).")
        t = jnp.asarray(t)
        s = self.direction * jnp.ravel(t).astype(self.dense_output.t_start.dtype)
        out = jax.vmap(self.unravel)(self.dense_output.evaluate_flat(s))
        return jax.tree_util.tree_map(lambda x: x.reshape(t.shape + x.shape[1:]), out)
