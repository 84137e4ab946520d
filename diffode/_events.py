"""Terminal events: the solve stops where a condition of the state crosses zero.

``solve(..., events=Event(cond_fn))`` runs in two passes:

1. *Locate* (not differentiated): the solve loop evaluates every event's condition
   after each accepted step and stops after the first step in which one crossed zero
   (``_integrate._detect``); the root is then found along that step's interpolant by
   bisection (``_integrate._locate``), the earliest among the events that crossed.
2. *Solve to the event* (differentiated by the chosen sensitivity method): the
   same problem saving at ``ts`` with ``t*`` inserted, stopping at ``t*`` (the last
   step lands on it). The saves after ``t*`` come back NaN; the save at ``t*`` is
   the state at the event.

The event time is an implicit function of the inputs, ``c(t*, y(t*; theta), theta)
= 0``, and its derivative follows the implicit function theorem: with ``dy`` the
derivative of the state at the (fixed) time ``t*`` from the second pass,
``dt* = -(c_y dy + c_theta dtheta) / (c_t + c_y f(t*, y*))``, and the state at the
event moves along the trajectory: ``dy* = dy + f(t*, y*) dt*`` (the derivative
of the hitting time in, for example, Chen, Amos and Nickel, "Learning neural
event functions for ordinary differential equations", ICLR 2021). That rule is a
``jax.custom_jvp`` whose tangent is linear in the second pass's tangent, so JAX
transposes it and reverse mode follows. The sensitivity methods that run
backwards from ``ts[-1]`` (the continuous adjoints) are not supported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._integrate import integrate, time_direction
from ._solution import Status
from .sensitivity import Problem
from .sensitivity._base import custom_solve_jvp, fill_zeros, prob_times


class Event(eqx.Module):
    """Where a solve stops: a root of ``cond_fn(t, y, args)``.

    Args:
        cond_fn: ``cond_fn(t, y, args) -> scalar``, with ``y`` the state in the
            structure of ``y0``. The event fires where it crosses zero, between two
            steps, located on the solver's interpolant to rounding precision.
        times: not supported yet (raises): events at given times.
        direction: ``+1`` fires only where ``cond_fn`` rises through zero as the
            integration proceeds, ``-1`` only where it falls, ``0`` (the default)
            both. A root at ``ts[0]`` itself does not fire.
        terminal: must be ``True`` (the solve stops at the event); state changes at
            events (``terminal=False`` with ``apply``) are not supported yet and raise.
        apply: not supported yet (raises).
    """

    cond_fn: Callable | None = None
    times: Any = None
    direction: int = eqx.field(static=True, default=0)
    terminal: bool = eqx.field(static=True, default=True)
    apply: Callable | None = None

    def __check_init__(self):
        if self.direction not in (-1, 0, 1):
            raise ValueError(f"Event: direction must be -1, 0 or +1, got {self.direction!r}")
        if self.times is not None or self.apply is not None or not self.terminal:
            raise NotImplementedError(
                "Event: only terminal events given by cond_fn are implemented; events at given times, "
                "non-terminal events and apply= (state changes) are not. For a forcing that switches at "
                "known times, pass them as solve(..., tstops=...)."
            )
        if self.cond_fn is None:
            raise ValueError("Event: cond_fn is required")


def as_events(events) -> tuple[Event, ...]:
    """``events`` (one :class:`Event` or a sequence of them) as a tuple."""
    evs = (events,) if isinstance(events, Event) else tuple(events) if isinstance(events, Sequence) else None
    if not evs or not all(isinstance(e, Event) for e in evs):
        raise TypeError(f"events must be a diffode.Event or a non-empty sequence of them, got {events!r}")
    return evs


def flat_conditions(events: tuple[Event, ...], unravel: Callable, cond_of: Callable) -> tuple:
    """The events as the loop takes them: ``((cond(t, y_flat, a), direction), ...)``;
    ``cond_of(a, e)(t, y, args)`` is event ``e``'s condition, with its closed-over arrays
    and the user's ``args``, from the problem's arguments ``a``."""
    return tuple(((lambda t, y, a, e=e: cond_of(a, e)(t, unravel(y))), ev.direction) for e, ev in enumerate(events))


def _insert(ts: jax.Array, t_star: jax.Array) -> tuple[Callable, jax.Array, jax.Array]:
    """``(insert, k, before)``: ``insert(v, x)`` puts ``x`` into the vector ``v`` (shaped like
    ``ts``) at index ``k``, where ``t_star`` goes among the save times (after every one
    strictly before it); ``before``: whether each save time is at or before it."""
    direction = time_direction(ts)
    s, s_star = direction * ts, direction * t_star
    n = ts.shape[0]
    k = jnp.sum(s < s_star).astype(jnp.int32)
    i = jnp.arange(n + 1)
    perm = jnp.where(i < k, i, jnp.where(i == k, n, i - 1))

    def insert(v, x):
        return jnp.concatenate([v, jnp.reshape(x, (1,)).astype(v.dtype)])[perm]

    return insert, k, s <= s_star


def evented_solve(method, prob: Problem, y0, ts, params, conds: tuple, solve_to: Callable):
    """``(ys, counters, t_event, y_event, index)`` of a solve that stops at the first event.

    ``solve_to(prob, y0, ts, params) -> (ys, counters)`` is the differentiable solve
    (``method.apply`` with the loop); ``conds`` are the loop's flat conditions.
    """
    ts = jnp.asarray(prob_times(prob, ts))
    known = prob._replace(known_ts=None)

    def locate(prob, y0, ts, params):
        """The first event's time (``ts[-1]`` if none), its index (-1) and the pass's status."""
        frozen = jax.lax.stop_gradient((y0, ts, params))
        opts = prob.opts._replace(events=conds, dense=False, regularise=False, return_state=False)
        y0_, ts_, params_ = frozen
        _, counters, _, t_event, index = integrate(prob.f, y0_, ts_[jnp.array([0, -1])], prob.args(params_), opts)
        t_star = jnp.where(index >= 0, t_event, ts_[-1]).astype(ts.dtype)
        return t_star, index, counters[0]

    def second_pass(prob, t_star):
        return prob._replace(opts=prob.opts._replace(t_stop=t_star, repeated_ts=True))

    def outputs(prob, y0, ts, params, dy0=None, dts=None, dparams=None):
        t_star, index, status1 = locate(prob, y0, ts, params)
        insert, k, before = _insert(ts, t_star)
        ts2 = insert(ts, t_star)
        keep = jnp.arange(ts.shape[0]) + (jnp.arange(ts.shape[0]) >= k)  # the rows of ts in ts2
        prob2 = second_pass(prob, t_star)
        if dy0 is None:
            ys2, counters = solve_to(prob2, y0, ts2, params)
            dys2 = None
        else:
            dts2 = insert(dts, 0)  # the event time is not differentiated in this pass
            (ys2, counters), (dys2, _) = jax.jvp(lambda y0_, ts2_, p_: solve_to(prob2, y0_, ts2_, p_),
                                                 (y0, ts2, params), (dy0, dts2, dparams))
        status = jnp.where(status1 != Status.SUCCESS, status1, counters[0])
        counters = counters.at[0].set(status)
        fired = index >= 0
        return t_star, index, fired, ys2, dys2, keep, before, k, counters

    def primal(prob, y0, ts, params, cache):
        t_star, index, fired, ys2, _, keep, before, k, counters = outputs(prob, y0, ts, params)
        ys = jnp.where(before[:, None] | ~fired, ys2[keep], jnp.nan)
        y_star = jnp.where(fired, ys2[k], jnp.nan)
        return ys, counters, jnp.where(fired, t_star, jnp.nan), y_star, index

    def rule(prob, y0, ts, params, x, primal_call, cache, meta):
        dy0, dts, dparams = x
        dy0 = jnp.zeros_like(y0) if dy0 is None else dy0
        dts = jnp.zeros_like(ts) if dts is None else dts
        dparams = fill_zeros(dparams, params)
        t_star, index, fired, ys2, dys2, keep, before, k, counters = outputs(prob, y0, ts, params, dy0, dts, dparams)
        valid = before[:, None] | ~fired
        ys = jnp.where(valid, ys2[keep], jnp.nan)
        dys = jnp.where(valid, dys2[keep], 0)
        # The event time by the implicit function theorem on the firing condition.
        y_star, dy_fixed = ys2[k], dys2[k]
        args = prob.args(params)
        f_star = prob.f(t_star, y_star, args)
        dt_star = jnp.zeros((), f_star.dtype)
        for e, (cond, _) in enumerate(conds):
            this = fired & (index == e)
            rate = jax.jvp(lambda t, y: cond(t, y, args), (t_star, y_star), (jnp.ones_like(t_star), f_star))[1]
            moved = jax.jvp(lambda y, p: cond(t_star, y, prob.args(p)), (y_star, params), (dy_fixed, dparams))[1]
            # Only the event that fired divides by its rate (another's may be 0).
            dt_star = dt_star + jnp.where(this, -moved / jnp.where(this, rate, 1), 0).astype(f_star.dtype)
        dt_star = dt_star.astype(ts.dtype)
        dy_star = jnp.where(fired, dy_fixed + f_star * dt_star.astype(f_star.dtype), 0)
        out = (ys, counters, jnp.where(fired, t_star, jnp.nan), jnp.where(fired, y_star, jnp.nan), index)
        zero_int = lambda v: np.zeros(np.shape(v), jax.dtypes.float0)  # noqa: E731
        return out, (dys, zero_int(counters), dt_star, dy_star, zero_int(index))

    return custom_solve_jvp(primal, known, rule, y0, ts, params)
