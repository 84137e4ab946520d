"""The protocol of a sensitivity method, and the one derivative rule every method plugs into.

``solve`` hands the loop to the method: ``method.apply(loop, problem, y0, ts, params)``
returns the saved states and counters of ``loop`` with the method's derivative.
That derivative is a ``jax.custom_jvp`` whose tangent is a
:func:`~diffode.sensitivity._linear_map.linear_map`: the method's forward rule
(:meth:`AbstractSensitivity.tangent`) with its reverse rule
(:meth:`AbstractSensitivity.cotangent`) as the transpose. JAX then derives every
transformation from these two (see ``_linear_map``); no method needs to know
whether it runs under ``jax.jvp``, ``jax.grad``, ``jax.linearize`` or a nesting
of them.

Second derivatives in reverse mode need the tangent's own reverse derivative.
It comes from the variational equations ``s' = f_y s + f_p dp`` solved as an
augmented ODE by the same method (:func:`variational_tangent`), so a derivative
of any order is again a differentiable solve (as in ``jax.experimental.ode``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, PyTree

from .._integrate import next_float
from .._solution import MESSAGE_LIST
from .._util import failure_scale as status_scale
from .._util import float0_zeros
from ._linear_map import LinearOp, linear_map, tree_vdot

#: ``loop(f, y0, ts, args, opts) -> (ys, counters, pieces)``: the solve loop, handed over by ``solve``.
Loop = Callable[..., tuple]


class Problem(NamedTuple):
    """A flat problem as the methods see it.

    ``f(t, y, a)`` works on flat ``(n,)`` states, with ``a = eqx.combine(params,
    static)``; ``params`` (the differentiated inputs besides ``y0`` and ``ts``) is
    passed separately to every method call. ``known_ts`` holds the save times when
    they are known at trace time (they are then not differentiated).
    """

    f: Callable[[Array, Array, Any], Array]
    static: PyTree
    opts: Any  # _integrate.IntegrateOptions
    known_ts: np.ndarray | None = None

    def args(self, params):
        return combine(params, self.static)


def combine(params: PyTree, static: PyTree) -> PyTree:
    """``eqx.combine(params, static)``; ``params`` alone when there is no static part."""
    return params if static is None else eqx.combine(params, static)


def split_differentiated(params: PyTree, dparams: PyTree) -> tuple[PyTree, PyTree]:
    """``(diff, fixed)``: the leaves of ``params`` whose tangent in ``dparams`` is not
    ``None``, and the others (closed-over constants, frozen arrays of a module), each
    with ``None`` in the other's places, so that ``eqx.combine(diff, fixed)`` is
    ``params``. Sensitivities are carried for ``diff`` only."""
    diff = jtu.tree_map(lambda v, d: None if d is None else v, params, dparams)
    fixed = jtu.tree_map(lambda v, d: v if d is None else None, params, dparams)
    return diff, fixed


def split_args(args: PyTree) -> tuple[PyTree, PyTree]:
    """``(diff, static)``: the inexact-array leaves of ``args`` (differentiated) and the rest."""
    return eqx.partition(args, eqx.is_inexact_array)


class AbstractSensitivity(eqx.Module):
    """How derivatives of a solve are computed (the ``sensitivity=`` of :func:`diffode.solve`).

    A method implements two rules on the residuals ``r = (y0, ts, params, ys)``
    (``ts`` is ``None`` when the save times are known at trace time; ``ys`` are the
    saved states of the primal solve):

    * :meth:`tangent`: ``dys`` for input tangents ``x = (dy0, dts, dparams)``
      (``None`` for an input that is not differentiated, also leaf by leaf in
      ``dparams``);
    * :meth:`cotangent`: ``(dy0, dts, dparams)`` for a cotangent ``ys_bar`` on the
      saved states, with ``None`` exactly where ``x`` has it.

    The two must be (approximate) transposes of each other: both approximate the
    derivative of the ODE solution, each to the accuracy of its own solve.
    """

    def tangent(self, loop: Loop, prob: Problem, r, x) -> Array:
        raise NotImplementedError

    def cotangent(self, loop: Loop, prob: Problem, r, ys_bar, x_struct) -> tuple:
        raise NotImplementedError

    def cotangent_batched(
        self, loop: Loop, prob_static: Problem, r, ys_bar, x_struct, r_axes, x_axes, size: int
    ):
        """Optionally, :meth:`cotangent` for a ``jax.vmap`` batch of ``size`` solves at once
        (``r`` and ``ys_bar`` batched along ``r_axes`` and 0; ``prob_static`` the problem
        without its arrays, which are ``r[-1]``): the input cotangents batched along 0
        where ``x_axes`` has an axis and summed over the batch where it has none. ``None``
        (the default) vmaps :meth:`cotangent` and sums afterwards."""
        return None

    def check(self, prob: Problem) -> None:
        """Raise at trace time when the method cannot differentiate this problem."""

    def record(self, loop: Loop, prob: Problem, y0: Array, ts: Array | None, params: PyTree):
        """Optionally the forward solve together with what the reverse rule needs of it:
        ``(ys, counters, meta, rec)``, ``rec`` a pytree of arrays and ``meta`` a hashable
        description of it. :meth:`cotangent` and :meth:`cotangent_batched` then get
        ``cache=(meta, rec)`` and need not solve forward again. ``rec`` is a value, never
        differentiated: a rule that is itself differentiated (forward over reverse)
        must differentiate its inputs, not ``rec``. ``None`` (the default): the
        reverse rule gets no cache."""
        return None

    def fused_jvp(self, loop: Loop, prob: Problem, primals: tuple, x: tuple):
        """Optionally ``(ys, counters, dys)`` at once, with ``dys`` written in operations JAX
        transposes itself (and the primal from differentiable solves, so that nesting
        works); ``None`` (the default) uses :meth:`tangent` and :meth:`cotangent`."""
        return None

    def apply(self, loop: Loop, prob: Problem, y0: Array, ts: Array | None, params: PyTree):
        """``(ys, counters)`` of ``loop``, differentiable by this method's rules."""
        self.check(prob)
        check_real(self, params)
        return differentiable_solve(self, loop, prob, y0, ts, params)


def check_real(method: AbstractSensitivity, params: PyTree) -> None:
    """Raise at trace time for a complex parameter: the rules differentiate real arrays only."""
    for path, leaf in jtu.tree_leaves_with_path(params):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating):
            head = getattr(path[0], "idx", None) if path else None
            where = {0: "f", 1: "jac", 2: "args"}.get(head, "params") + jtu.keystr(path[1:])
            raise TypeError(
                f"{type(method).__name__}: {where} is complex ({jnp.result_type(leaf)}); sensitivity methods "
                "differentiate real arrays only: split it into real and imaginary parts"
            )


def _is_zero(t) -> bool:
    return t is None or isinstance(t, SymbolicZero)


def _nonzero(t):
    return None if _is_zero(t) else t


def custom_solve_jvp(primal: Callable, prob: Problem, rule: Callable, y0, ts, params):
    """``primal(prob, y0, ts, params, None)`` as a ``jax.custom_jvp`` whose rule is
    ``rule(prob, y0, ts, params, x, primal_call, cache, meta)`` with the input tangents ``x``
    of :func:`tangent_inputs`.

    ``primal_call(y0, ts, params, cache=None, meta=None)`` calls the custom function
    again, so that nested forward differentiation applies the rule once more.
    ``cache`` (a pytree of arrays, or ``None``) is what a rule already computed from
    the primal inputs (the saved states, and a record of the solve): the primal of
    that call is then ``primal(prob, y0, ts, params, cache)``, which need not solve
    again, and the rules of the nested call get ``cache`` and ``meta`` (a static
    description of the cache) back. A cache is never differentiated: its tangents
    are dropped.

    The problem's JAX arrays (:func:`split_problem`) are arguments of the custom
    function, not values its rule closes over: they may be tracers of a ``jit``
    around the solve, and JAX traces the rule later, when it differentiates that
    ``jit``. They are not differentiated. Known save times (``ts is None``) are
    not an argument.
    """
    arrays, static = split_problem(prob)
    whole = lambda arrays_: eqx.combine(arrays_, static)  # noqa: E731

    def make(meta):
        if ts is None:
            core = jax.custom_jvp(
                lambda y0, params, arrays, cache: primal(whole(arrays), y0, None, params, cache)
            )
            call = lambda y0, ts, params, arrays, cache: core(y0, params, arrays, cache)  # noqa: E731
        else:
            core = jax.custom_jvp(
                lambda y0, ts, params, arrays, cache: primal(whole(arrays), y0, ts, params, cache)
            )
            call = core

        def jvp(primals, tangents):
            if ts is None:
                (y0, params, arrays, cache), (dy0, dparams, _, _) = primals, tangents
                ts_, dts = None, None
            else:
                (y0, ts_, params, arrays, cache), (dy0, dts, dparams, _, _) = primals, tangents

            def again(y0, ts, params, cache_=None, meta_=None):
                return make(meta_)(y0, ts, params, arrays, cache_)

            return rule(whole(arrays), y0, ts_, params, tangent_inputs(dy0, dts, dparams), again, cache, meta)

        core.defjvp(jvp, symbolic_zeros=True)
        return call

    return make(None)(y0, ts, params, arrays, None)


def differentiable_solve(method: AbstractSensitivity, loop: Loop, prob: Problem, y0, ts, params):
    """``loop``'s ``(ys, counters)`` with ``method``'s derivative (see the module docstring)."""

    def primal(prob, y0, ts, params, cache):
        if cache is not None:
            return cache[0], cache[1]
        ys, counters, _ = loop(prob.f, y0, prob_times(prob, ts), prob.args(params), prob.opts)
        return ys, counters

    def rule(prob, y0, ts, params, x, primal_call, cache, meta):
        fused = method.fused_jvp(loop, prob, (y0, ts, params), x) if jtu.tree_leaves(x) else None
        if fused is not None:
            ys, counters, dys = fused
        else:
            if not jtu.tree_leaves(x):
                ys, counters = primal_call(y0, ts, params, cache, meta)
                return (ys, counters), (jnp.zeros_like(ys), float0_zeros(counters))
            if cache is None:
                # The forward solve together with the method's record of it, so that
                # the reverse pass need not solve again. Nothing differentiates it:
                # the primal call below gives the saved states their derivative.
                made = method.record(loop, *_frozen((prob, y0, ts, params)))
                if made is not None:
                    ys_c, counters_c, meta, rec = made
                    cache = (ys_c, counters_c, rec)
            # The primal through the custom rule again, so that nested forward
            # differentiation applies this rule once more (with the same cache).
            ys, counters = primal_call(y0, ts, params, cache, meta)
            arrays, prob_static = split_problem(prob)
            op = SolveOp(method, loop, prob_static, jtu.tree_map(lambda _: True, x), meta)
            r = (y0, ts, params, ys) + (() if cache is None else (cache[2],)) + (arrays,)
            dys = linear_map(op, r, x)
        return (ys, counters), (
            dys * failure_scale(counters, prob.opts.throw, ys.dtype),
            float0_zeros(counters),
        )

    return custom_solve_jvp(primal, prob, rule, y0, ts, params)


def _frozen(tree):
    """``tree`` with ``lax.stop_gradient`` on every array leaf."""
    return jtu.tree_map(lambda v: jax.lax.stop_gradient(v) if eqx.is_array(v) else v, tree)


def tangent_inputs(dy0, dts, dparams) -> tuple:
    """The input tangents of a custom JVP rule as ``x = (dy0, dts, dparams)``, ``None`` where zero."""
    return (_nonzero(dy0), _nonzero(dts), jtu.tree_map(_nonzero, dparams, is_leaf=_is_zero))


def failure_scale(counters: Array, throw: bool, dtype) -> Array:
    """:func:`diffode._util.failure_scale` of a solve's status (``counters[0]``)."""
    return status_scale(counters[0], throw, dtype, MESSAGE_LIST)


def split_problem(prob: Problem) -> tuple[PyTree, Problem]:
    """``(arrays, rest)``: the problem's JAX arrays (see :class:`ProblemOp`) and the problem without them."""
    return eqx.partition(prob, lambda v: isinstance(v, jax.Array))


class ProblemOp(LinearOp):
    """A :class:`LinearOp` of a solve whose :class:`Problem` arrays travel as its last residual.

    Those arrays (traced tolerances, integer arrays in ``args``) may be tracers of
    the transformation around the solve. An op is a parameter of the primitive,
    evaluated by its rules outside that transformation (the batching rule binds a
    vmapped op one level down), so it must hold no tracer: it keeps the problem
    without its arrays (:func:`split_problem`), and :meth:`unpack` puts them back
    on every call. The residuals are ``(*r, arrays)``.
    """

    prob_static: Problem

    def unpack(self, r) -> tuple[tuple, Problem]:
        """``(r without the arrays, the whole problem)``."""
        return tuple(r[:-1]), eqx.combine(r[-1], self.prob_static)


def zero_cotangent(x):
    """The cotangent of an input that is not differentiated (``float0`` for integers)."""
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return jnp.zeros_like(x)
    return float0_zeros(x)


class SolveOp(ProblemOp):
    """The tangent of a solve as a :class:`LinearOp`, from a method's two rules.

    The residuals are ``(y0, ts, params, ys, arrays)``, or with a record of the
    forward solve (``meta`` not ``None``, see :meth:`AbstractSensitivity.record`)
    ``(y0, ts, params, ys, rec, arrays)``; the reverse rule gets
    ``cache=(meta, rec)``.
    """

    def __init__(self, method: AbstractSensitivity, loop: Loop, prob_static: Problem, x_struct, meta=None):
        self.method, self.loop, self.prob_static, self.x_struct, self.meta = (
            method,
            loop,
            prob_static,
            x_struct,
            meta,
        )

    def _cache_kw(self, r) -> dict:
        return {} if self.meta is None else dict(cache=(self.meta, r[4]))

    def unpack(self, r) -> tuple[tuple, Problem]:
        """``(y0, ts, params, ys)`` and the whole problem."""
        return tuple(r[:4]), eqx.combine(r[-1], self.prob_static)

    def apply(self, r, x):
        core, prob = self.unpack(r)
        return self.method.tangent(self.loop, prob, core, x)

    def transpose(self, r, y):
        core, prob = self.unpack(r)
        return self.method.cotangent(self.loop, prob, core, y, self.x_struct, **self._cache_kw(r))

    def transpose_batched(self, r, y, r_axes, x_axes, size):
        if self.meta is None:
            return self.method.cotangent_batched(
                self.loop, self.prob_static, r, y, self.x_struct, r_axes, x_axes, size
            )
        # The record travels batched along its own axes: put the batch first.
        rec = jtu.tree_map(
            lambda v, ax: (
                jnp.broadcast_to(v, (size,) + jnp.shape(v)) if ax is None else jnp.moveaxis(v, ax, 0)
            ),
            r[4],
            r_axes[4],
        )
        drop = lambda t: tuple(t[:4]) + (t[5],)  # noqa: E731
        return self.method.cotangent_batched(
            self.loop,
            self.prob_static,
            drop(r),
            y,
            self.x_struct,
            drop(r_axes),
            x_axes,
            size,
            cache=(self.meta, rec),
        )

    def vjp_res(self, r, x, c):
        core, prob = self.unpack(r)
        grad = jax.grad(lambda r_: tree_vdot(c, variational_tangent(self.method, self.loop, prob, r_, x)))(
            core
        )
        # The record is a function of (y0, ts, params), differentiated through them.
        return (*grad, *[jtu.tree_map(zero_cotangent, v) for v in r[4:]])

    def out_struct(self, r, x):
        ys = r[3]
        return jax.ShapeDtypeStruct(np.shape(ys), jnp.result_type(ys))


def prob_times(prob: Problem, ts):
    """The save times: ``ts`` itself, or the known ones."""
    return prob.known_ts if ts is None else ts


def loop_tangent(loop: Loop, prob: Problem, r, x, outputs: Callable = lambda ys, counters, pieces: ys):
    """The tangent of ``outputs(*loop(...))`` (the saved states by default) by forward-mode
    differentiation through the solve loop: the derivative of the discrete solution, with
    the step sizes held fixed."""
    y0, ts, params, _ = r
    dy0, dts, dparams = x
    ts_ = prob_times(prob, ts)

    def fn(y0, ts, p):
        return outputs(*loop(prob.f, y0, ts_ if ts is None else ts, prob.args(p), prob.opts))

    dy0 = _zeros_like(y0) if dy0 is None else dy0
    dparams = fill_zeros(dparams, params)
    if dts is None:
        return jax.jvp(lambda y0, p: fn(y0, ts, p), (y0, params), (dy0, dparams))[1]
    return jax.jvp(fn, (y0, ts, params), (dy0, dts, dparams))[1]


def variational_rhs(f: Callable, static: PyTree, n: int):
    """``z = [y, s]``, ``z' = [f(t, y, p), f_y s + f_p dp]`` with arguments ``(p, dp)``."""

    def aug_f(t, z, a):
        p, dp = a
        y, s = z[:n], z[n:]
        fy, js = jax.jvp(lambda y_, p_: f(t, y_, combine(p_, static)), (y, p), (s, dp))
        return jnp.concatenate([fy, js.astype(fy.dtype)])

    return aug_f


def variational_tangent(method: AbstractSensitivity, loop: Loop, prob: Problem, r, x) -> Array:
    """``dys`` for the input tangent ``x`` from the variational equations (HNW I, section I.14),
    solved as an augmented ODE by a differentiable solve with ``method``.

    The same quantity as :meth:`AbstractSensitivity.tangent`, as a composition of
    differentiable solves: its reverse-mode derivative (needed for reverse-over-
    reverse second derivatives) is again ``method``'s rule, on the augmented system.
    With ``z = [y, s]`` and ``s(t0) = dy0 - f(t0, y0) dts[0]`` (moving the start
    time moves the whole trajectory: ``dPhi/dt0 = -(dPhi/dy0) f(t0, y0)``), the
    tangent is ``dys[i] = s(ts[i]) + f(ts[i], ys[i]) dts[i]``.
    """
    y0, ts, params, _ = r
    dy0, dts, dparams = x
    n = y0.shape[0]
    f, args = prob.f, prob.args(params)
    ts_ = prob_times(prob, ts)
    s0 = _zeros_like(y0) if dy0 is None else dy0
    if dts is not None:
        s0 = s0 - f(ts_[0], y0, args) * dts[0]
    aug = Problem(
        variational_rhs(f, prob.static, n), None, prob.opts._replace(jac=None, dense=False), prob.known_ts
    )
    zs, _ = method.apply(
        loop, aug, jnp.concatenate([y0, s0.astype(y0.dtype)]), ts, (params, fill_zeros(dparams, params))
    )
    return (
        zs[:, n:]
        if dts is None
        else add_time_shift(zs[:, n:], f, ts_, zs[:, :n], args, dts, prob.opts.tstops)
    )


def add_time_shift(dys: Array, f: Callable, ts: Array, ys: Array, args, dts: Array, tstops=None) -> Array:
    """``dys + f(ts[i], ys[i]) dts[i]`` at every save: moving a save time moves along the trajectory
    (:func:`save_slopes`)."""
    fs = save_slopes(f, ts, ys, args, tstops)
    return dys + fs * dts[:, None].astype(fs.dtype)


def save_slopes(f: Callable, ts: Array, ys: Array, args, tstops=None) -> Array:
    """``f(ts[i], ys[i], args)`` for every save: the derivative of the solution along time
    there. At a save time that is one of ``tstops`` (where ``f`` may jump) it is the
    one-sided derivative from the side the solve comes from (``f`` just before it in the
    direction of integration), which is what the solver's steps, ending there,
    integrate; every sensitivity method gives this one."""
    ts = jnp.asarray(ts)
    if tstops is not None:
        direction = jnp.sign(ts[-1] - ts[0]).astype(ts.dtype)
        at_stop = jnp.any(ts[:, None] == jnp.asarray(tstops, ts.dtype)[None, :], axis=1)
        ts = jnp.where(
            at_stop, jnp.where(direction > 0, next_float(ts, -jnp.inf), next_float(ts, jnp.inf)), ts
        )
    return jax.vmap(f, in_axes=(0, 0, None))(ts, ys, args)


def _zeros_like(v) -> Array:
    return jnp.zeros(jnp.shape(v), jnp.result_type(v))


def fill_zeros(tangent, primal):
    """``tangent`` with zeros wherever it has ``None`` for an array leaf of ``primal``."""
    return jtu.tree_map(lambda p, d: _zeros_like(p) if d is None else d, primal, tangent)


def keep_present(x_struct, full: tuple) -> tuple:
    """``full = (dy0, dts, dparams)`` with ``None`` wherever ``x_struct`` has no input tangent."""
    sy, st, sp = x_struct
    y, t, p = full
    p = jtu.tree_map(lambda s, v: None if s is None else v, sp, p, is_leaf=lambda v: v is None)
    return (None if sy is None else y, None if st is None else t, p)


def nan_if(bad: Array, tree):
    """``tree`` with every leaf NaN where ``bad``."""
    return jtu.tree_map(lambda v: jnp.where(bad, jnp.nan, v), tree)
