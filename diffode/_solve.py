"""``solve``: the one entry point. Trace-time checks, flattening, closure conversion, and the
hand-over of the loop to the sensitivity method."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from typing import Any, Callable

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, ArrayLike, PyTree

from ._controller import PIDController
from ._events import as_events, evented_solve, flat_conditions, jump_solve
from ._integrate import IntegrateOptions, integrate, known_value, time_direction
from ._regularisers import Regularisers
from ._solution import MESSAGE_LIST, MESSAGES, Solution, Stats, Status
from ._util import raise_on_failure, vmap_size
from ._validate import check_max_steps, check_y0, rhs_structure_problem
from .sensitivity import (
    AbstractSensitivity,
    Auto,
    BacksolveAdjoint,
    Direct,
    InterpolatingAdjoint,
    Problem,
    split_args,
)
from .sensitivity.direct import direct_solve
from .solvers.base import AbstractSolver
from .solvers.colouring import Sparsity
from .solvers.explicit_rk import ExplicitRK, Tsit5
from .solvers.linear import GMRES, LU
from .solvers.structured import SparseLU

_COUNTERS = ("num_steps", "num_accepted", "num_rejected", "num_fevals")


def _strong(tree):
    """``tree`` with every inexact array leaf of a strong (not weak) dtype.

    A Python float differentiated by ``jax.grad`` arrives as a weakly typed array;
    the closure-converted ``f`` is called with exactly the types it was traced
    with, and custom derivative rules may not preserve weakness.
    """
    return jtu.tree_map(
        lambda x: lax.convert_element_type(x, x.dtype) if eqx.is_inexact_array(x) else x, tree
    )


def _failed(ts, y0, status: Status) -> Solution:
    """A solution that records a failure detected before any step (throw=False)."""
    ys = jtu.tree_map(lambda x: jnp.full((ts.shape[0],) + jnp.shape(x), jnp.nan, jnp.result_type(x)), y0)
    stats = Stats(jnp.zeros(len(_COUNTERS), jnp.int32), _COUNTERS)
    return Solution(ts=ts, ys=ys, stats=stats, status=jnp.asarray(status, jnp.int32))


def _solve(
    f: Callable[[Array, PyTree, Any], PyTree],
    y0: PyTree,
    ts: ArrayLike,
    args: PyTree = None,
    *,
    solver: AbstractSolver | None = None,
    rtol: ArrayLike = 1e-6,
    atol: ArrayLike = 1e-8,
    dt0: ArrayLike | None = None,
    adaptive: bool = True,
    max_steps: int = 4096,
    controller: PIDController | None = None,
    jac: Callable[[Array, PyTree, Any], Array] | None = None,
    jac_sparsity: Any = None,
    sensitivity: Any = None,
    throw: bool = True,
    dense: bool = False,
    regularise: bool = False,
    tstops: ArrayLike | None = None,
    progress: bool = False,
    events: Any = None,
    save_fn: Callable | None = None,
    final_check: bool = True,  # private: False leaves the final status check to the caller
    batched: int = 0,  # private: the size of a jax.vmap around the call (see `solve`)
) -> Solution:
    """Solve ``dy/dt = f(t, y, args)`` from ``ts[0]`` to ``ts[-1]``, saving at every ``ts``.

    Args:
        f: right-hand side; returns a pytree with the structure of ``y``.
        y0: initial state, any pytree of floating arrays (mixed dtypes allowed).
        ts: strictly increasing or strictly decreasing save times; decreasing
            times integrate backwards. ``sol.ys[0]`` is ``y0``.
        args: any pytree passed to ``f`` (arrays, equinox modules, ...).
        solver: the stepper, :class:`Tsit5` by default.
        rtol, atol: relative and absolute tolerances of the local error test:
            scalars, or per component (an array shaped like ``y0``, or a pytree
            with ``y0``'s structure whose leaves broadcast to its leaves). They are
            not differentiated. ``rtol`` below 4 epsilons of the state's dtype
            (4.8e-7 in float32, 8.9e-16 in float64) is raised to that, with a
            warning: rounding makes tighter tolerances unreachable. Neural ODEs in
            float32 usually train at ``rtol=1e-3``, ``atol=1e-6``.
        dt0: initial step; chosen automatically when ``None`` (Hairer, Norsett and
            Wanner, vol. I, II.4). Required for fixed steps.
        adaptive: ``False`` takes fixed steps of ``dt0``, landing exactly on
            every entry of ``ts``. Solvers without an error estimate always do.
        max_steps: bound on attempted steps (accepted plus rejected): any Python
            or NumPy integer from 1 to ``2**31 - 2``.
        controller: a :class:`PIDController`; its defaults suit most problems.
        jac: ``jac(t, y, args)``, the Jacobian of ``f`` with respect to ``y`` as an
            ``(n, n)`` matrix over the raveled state (``jax.flatten_util.ravel_pytree``
            order). Only implicit solvers use it; by default they take ``jax.jacfwd``.
        jac_sparsity: where the Jacobian may be nonzero, as in scipy's ``solve_ivp``:
            a boolean (or 0/1) ``(n, n)`` array (NumPy, JAX outside ``jit``, or a
            scipy sparse matrix) over the raveled state. Implicit solvers then form
            the Jacobian from one ``jax.jvp`` per colour of a column colouring
            (:mod:`diffode.solvers.colouring`; about 8 for a 2-D five-point stencil
            with two species) instead of ``n``, and an implicit solver whose
            ``linear_solver`` is dense :class:`LU` (the default) uses
            :class:`SparseLU` for the pattern instead (also as a :class:`GMRES`
            preconditioner). An entry missing from the pattern is read as zero.
            Not with ``jac``.
        sensitivity: how the solve is differentiated: :class:`Direct`,
            :class:`ForwardSensitivity`, :class:`BacksolveAdjoint`,
            :class:`InterpolatingAdjoint` or :class:`Auto` (``None``: ``Auto()``).
            Forward mode (``jax.jvp``/``jax.jacfwd``) always works; reverse mode
            (``jax.grad``/``jax.jacrev``/``jax.hessian``) goes through the method.
        throw: raise on failure (bad input, ``max_steps``, step underflow, ...).
            With ``False`` the failure is reported in ``sol.status`` instead and
            unreached entries of ``ys`` are NaN.
        dense: keep every step's interpolant so that ``sol.evaluate(t)`` works. The
            interpolant is differentiated as :class:`Direct` does (forward mode through
            the steps, reverse mode by replaying them), whatever ``sensitivity`` is.
        regularise: also return ``sol.regularisers`` (:class:`Regularisers`): the
            accepted steps' integrated error estimate and stiffness estimate, for
            adding ``lambda * sol.regularisers.error`` to a training loss (Pal et al.,
            ICML 2021). Needs an adaptive explicit Runge-Kutta solver; differentiated
            as :class:`Direct` does (``sensitivity`` must be ``None``, ``Auto`` or
            ``Direct``).
        tstops: times where ``f`` is discontinuous (a forcing that switches, a
            dosing time): every step lands exactly on each of them and the solver
            restarts there (a fresh ``f(t, y)`` instead of the carried one, the
            step-size controller's memory cleared), as SUNDIALS' ``tstop`` and
            ``tstops`` of DifferentialEquations.jl do, so that the solution keeps the
            solver's order across them. A 1-D array in the units of ``ts``; entries
            outside the open span of ``ts`` are ignored; they are not differentiated
            (they are constants of the problem, like the discontinuities of ``f``).
            Works with every solver, sensitivity method and transformation.
        events: an :class:`Event` or a sequence of them. A terminal event stops the
            solve at the first root of its condition (located on the solver's
            interpolant) or at its first given time: ``sol.event_t``, ``sol.event_y``
            and ``sol.event_index`` report it (NaN, NaN and -1 when none fired), and the
            entries of ``ys`` after it are NaN. A non-terminal event replaces the state
            by its ``apply(t, y, args)`` and the solve goes on; a save at that time
            shows the state after the jump. Event times are differentiated by the
            implicit function theorem, with ``Direct`` or ``ForwardSensitivity`` (and
            ``Auto``; the continuous adjoints raise when an event has a condition);
            events at given times work with every method and are differentiated with
            respect to their times too. See ``docs/discontinuities.md``.
        save_fn: ``save_fn(t, y, args) -> pytree``: what each save keeps instead of
            the state (an observable, a few components of a large state), so that
            the saves cost its size, not the state's: ``sol.ys`` is its output with a
            leading axis of ``len(ts)``. Differentiated as :class:`Direct` does
            (``sensitivity`` must be ``None``, ``Auto`` or ``Direct``); not with events.
        progress: show the progress of the solve, ``t`` against the span, on
            standard error while it runs (also under ``jit`` and ``vmap``, through
            ``jax.debug.callback``; under ``vmap`` the slowest member's ``t``). It does
            not change results or derivatives; off (the default) it costs nothing.

    Returns:
        A :class:`Solution`.
    """

    solver = Tsit5() if solver is None else solver
    controller = PIDController() if controller is None else controller
    if sensitivity is not None and not isinstance(sensitivity, AbstractSensitivity):
        raise TypeError(
            f"sensitivity must be a diffode sensitivity method (e.g. diffode.Direct()), got {sensitivity!r}"
        )
    if not isinstance(solver, AbstractSolver):
        raise TypeError(f"solver must be a diffode solver, got {solver!r}")
    max_steps = check_max_steps(max_steps)

    # Save times known before tracing stay NumPy: constants of the program (jnp.asarray
    # would make them a traced value inside the jit).
    ts = ts.value if isinstance(ts, _KnownTimes) else jnp.asarray(ts)
    if ts.ndim != 1 or ts.shape[0] == 0:
        raise ValueError(f"ts must be a non-empty 1-D array, got shape {ts.shape}")
    check_y0(y0)
    y0 = jtu.tree_map(jnp.asarray, y0)

    fixed = (not adaptive) or (not solver.embedded)
    if fixed and dt0 is None:
        why = "adaptive=False" if not adaptive else f"{type(solver).__name__} has no error estimate, so"
        raise ValueError(f"{why} fixed steps need dt0")

    y_flat, unravel = ravel_pytree(y0)
    dtype = y_flat.dtype
    tdtype = jnp.result_type(dtype, ts.dtype) if jnp.issubdtype(ts.dtype, jnp.floating) else dtype
    ts_t = ts.astype(tdtype)

    # f's output structure is checked at trace time (abstractly: no evaluation).
    out0 = eqx.filter_eval_shape(f, ts_t[0], y0, args)
    problem = rhs_structure_problem(out0, y0)
    saved = y0 if save_fn is None else _save_structure(save_fn, ts_t[0], y0, args)
    if problem is not None:
        if throw:
            raise ValueError(f"{MESSAGES[Status.RHS_STRUCTURE_MISMATCH]} {problem}")
        return _failed(ts, saved, Status.RHS_STRUCTURE_MISMATCH)

    # f (a function, a closure or an equinox Module) and jac become pytrees whose
    # arrays, closed-over values included, are explicit inputs: every one of them
    # is differentiated, and none leaks out of a custom derivative rule.
    args = _strong(args)
    t_ex = ts_t[0]
    fc = _explicit_inputs(f, t_ex, y0, args)
    jc = None
    n = y_flat.shape[0]
    if jac is not None:
        jc = _explicit_inputs(jac, t_ex, y0, args)
        jac_shape = jnp.shape(jax.eval_shape(jc, t_ex, y0, args))
        if jac_shape != (n, n):
            raise ValueError(
                f"jac returned shape {jac_shape}, but the state has {n} components, so the Jacobian "
                f"must be ({n}, {n}) over the raveled state"
            )

    sparsity = None
    if jac_sparsity is not None:
        if jac is not None:
            raise ValueError("give jac or jac_sparsity, not both (jac_sparsity builds the Jacobian from f)")
        sparsity = jac_sparsity if isinstance(jac_sparsity, Sparsity) else Sparsity(jac_sparsity)
        sparsity.check_size(n)
        solver = _sparse_default(solver, sparsity)

    def flatten(out):
        return jnp.concatenate([jnp.ravel(x).astype(dtype) for x in jtu.tree_leaves(out)])

    def f_flat(t, y, a):
        fc, _, args, *_ = a
        return flatten(fc(lax.convert_element_type(t, tdtype), unravel(y), args))

    def jac_flat(t, y, a):
        _, jc, args, *_ = a
        return jnp.asarray(jc(lax.convert_element_type(t, tdtype), unravel(y), args), dtype)

    def coloured_jac(t, y, a):
        return sparsity.jacobian(lambda z: f_flat(t, z, a), y)

    rtol, atol = (_flat_tolerance(name, tol, y0) for name, tol in (("rtol", rtol), ("atol", atol)))
    rtol = _resolvable_rtol(rtol, dtype)
    if batched and isinstance(solver, ExplicitRK):
        solver = solver.unrolled()
    opts = IntegrateOptions(
        solver=solver,
        controller=controller,
        rtol=rtol,
        atol=atol,
        dt0=dt0,
        fixed=fixed,
        max_steps=max_steps,
        dense=dense,
        jac=jac_flat if jac is not None else coloured_jac if sparsity is not None else None,
        throw=throw,
        batched=batched,
        tstops=_check_tstops(tstops, tdtype),
        progress=bool(progress),
    )
    method = Auto() if sensitivity is None else sensitivity
    if regularise:
        _check_regularise(solver, fixed, method)
        opts = opts._replace(regularise=True)
    extra = ()
    out_unravel = unravel
    if save_fn is not None:
        if events is not None:
            raise NotImplementedError("save_fn cannot be combined with events yet")
        _check_direct("save_fn", "a function of the saved states", method)
        out_unravel = ravel_pytree(saved)[1]
        # Its closed-over arrays are explicit (and differentiated), as f's: the last argument.
        extra = (_explicit_inputs(save_fn, t_ex, y0, args),)
        opts = opts._replace(
            save_fn=lambda t, y, a: flatten(a[-1](lax.convert_element_type(t, tdtype), unravel(y), a[2]))
        )
    evs = None
    if events is not None:
        evs = as_events(events)
        if dense or regularise:
            raise NotImplementedError("events cannot be combined with dense=True or regularise=True yet")
        # Each condition's and state change's closed-over arrays are explicit (and
        # differentiated), as f's.
        ecs = tuple(
            tuple(None if fn is None else _explicit_inputs(fn, t_ex, y0, args) for fn in (e.cond_fn, e.apply))
            for e in evs
        )
        for e in evs:
            _check_apply(e.apply, t_ex, y0, args)
        conds = flat_conditions(
            evs, unravel, lambda a, e: functools.partial(_call_cond, a[3][e][0], tdtype, a[2])
        )
        applies = tuple(
            None if e.apply is None else functools.partial(_call_apply, e_, flatten, unravel, tdtype)
            for e_, e in enumerate(evs)
        )
        if conds:
            method = _event_method(method, solver)
        params, static = split_args((fc, jc, args, ecs))
    else:
        params, static = split_args((fc, jc, args) + extra)
    known_ts = known_value(ts_t)
    prob = Problem(f_flat, static, opts, known_ts)
    ts_arg = None if known_ts is not None else ts_t
    reg = None
    if dense or regularise or save_fn is not None:
        # Interpolation pieces, regularisers and saves of save_fn: Direct's rules differentiate them.
        direct = (
            method
            if isinstance(method, Direct)
            else (Direct(memory_budget=method.memory_budget) if isinstance(method, Auto) else Direct())
        )
        ys, counters, pieces, reg = direct_solve(direct, integrate, prob, y_flat, ts_arg, params)
        reg = None if reg is None else Regularisers(reg[..., 0], reg[..., 1])
    elif evs is not None:
        solve_to = lambda p, y0, ts, q: method.apply(integrate, p, y0, ts, q)  # noqa: E731
        if all(e.terminal and e.cond_fn is not None for e in evs):
            out = evented_solve(prob, y_flat, ts_arg, params, conds, solve_to)
        else:
            out = jump_solve(prob, y_flat, ts_arg, params, evs, conds, applies, solve_to)
        ys, counters, event_t, event_y, event_index = out
        pieces = None
    else:
        ys, counters = method.apply(integrate, prob, y_flat, ts_arg, params)
        pieces = None
    direction = time_direction(ts_t)
    stat_names = _COUNTERS + solver.stat_names
    status = counters[0]
    event = {}
    if evs is not None:
        if throw and final_check:
            # The check rides on every output a program may use alone.
            ys, event_t, event_y = raise_on_failure((ys, event_t, event_y), status, MESSAGE_LIST)
        event = dict(event_t=event_t.astype(ts_t.dtype), event_y=unravel(event_y), event_index=event_index)
    elif throw and final_check:
        ys = raise_on_failure(ys, status, MESSAGE_LIST)
    return Solution(
        ts=ts,
        ys=jax.vmap(out_unravel)(ys),
        stats=Stats(counters, stat_names, offset=1),
        status=status,
        dense_output=pieces,
        regularisers=reg,
        direction=direction,
        unravel=unravel,
        **event,
    )


def _sparse_default(solver: AbstractSolver, sparsity: Sparsity) -> AbstractSolver:
    """``solver`` with its dense :class:`LU` (or a :class:`GMRES`'s dense LU
    preconditioner) replaced by :class:`SparseLU` for ``sparsity``."""
    ls = getattr(solver, "linear_solver", None)
    if type(ls) is LU:
        new = SparseLU(sparsity)
    elif isinstance(ls, GMRES) and type(ls.preconditioner) is LU:
        new = dataclasses.replace(ls, preconditioner=SparseLU(sparsity))
    else:
        return solver
    return eqx.tree_at(lambda s: s.linear_solver, solver, new)


def _save_structure(save_fn, t, y0, args):
    """Zeros shaped like ``save_fn``'s output (checked at trace time: real arrays)."""
    out = eqx.filter_eval_shape(save_fn, t, y0, args)
    leaves = jtu.tree_leaves(out)
    if not leaves or not all(
        isinstance(x, jax.ShapeDtypeStruct) and jnp.issubdtype(x.dtype, jnp.floating) for x in leaves
    ):
        raise ValueError(
            f"save_fn(t, y, args) must return a non-empty pytree of real floating arrays, got {out}"
        )
    return jtu.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), out)


def _call_cond(cond, tdtype, args, t, y):
    """An event condition at user time ``t`` as a scalar of the state's dtype."""
    out = jnp.asarray(cond(lax.convert_element_type(t, tdtype), y, args))
    if out.size != 1:
        raise ValueError(f"an Event's cond_fn must return a scalar, got shape {out.shape}")
    return out.reshape(())


def _call_apply(e, flatten, unravel, tdtype, t, y, a):
    """Event ``e``'s state change on flat states, ``a`` the problem's arguments."""
    return flatten(a[3][e][1](lax.convert_element_type(t, tdtype), unravel(y), a[2]))


def _check_apply(apply, t, y0, args) -> None:
    """Raise at trace time unless ``apply(t, y, args)`` returns a state shaped like ``y0``."""
    if apply is None:
        return
    problem = rhs_structure_problem(eqx.filter_eval_shape(apply, t, y0, args), y0, "apply")
    if problem is not None:
        raise ValueError(f"an Event's apply(t, y, args) must return the new state, shaped like y0: {problem}")


def _event_method(method, solver):
    """The sensitivity method a solve with condition events uses: the continuous adjoints run
    backwards from ``ts[-1]`` and are not supported; ``Auto`` keeps its choice where that is
    not one."""
    if isinstance(method, (BacksolveAdjoint, InterpolatingAdjoint)):
        raise NotImplementedError(
            f"{type(method).__name__} does not support events: its backward solve starts at ts[-1], past the "
            "event. Use Direct or ForwardSensitivity (or Auto, which picks one of them with events)."
        )
    if isinstance(method, Auto) and not isinstance(method._adjoint(solver), Direct):
        return Direct(memory_budget=method.memory_budget)
    return method


def _check_tstops(tstops, tdtype):
    """``tstops`` as a 1-D array of the solve's time dtype (not differentiated), or ``None``."""
    if tstops is None:
        return None
    try:
        arr = jnp.asarray(tstops)
    except TypeError as e:
        raise TypeError(f"tstops must be a 1-D array of times, got {type(tstops).__name__}") from e
    if arr.ndim > 1 or not (
        jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)
    ):
        raise ValueError(
            f"tstops must be a 1-D array of real times, got shape {arr.shape} and dtype {arr.dtype}"
        )
    return lax.stop_gradient(arr.reshape(-1).astype(tdtype))


def _check_regularise(solver, fixed: bool, method) -> None:
    """Raise unless ``solve(..., regularise=True)`` can compute and differentiate the regularisers."""
    if not isinstance(solver, ExplicitRK) or fixed:
        raise ValueError(
            f"regularise=True needs an adaptive explicit Runge-Kutta solver (such as Tsit5), got "
            f"{type(solver).__name__}{' with fixed steps' if fixed else ''}: the regularisers are its error "
            "estimate and the stiffness estimate from its first and last stages"
        )
    _check_direct("regularise=True", "sums over the solver's discrete steps", method)


def _check_direct(option: str, what: str, method) -> None:
    """Raise unless ``method`` is ``Direct`` or ``Auto`` (which then uses ``Direct``): ``option``
    makes the solve's outputs ``what``, which only ``Direct``'s replay differentiates."""
    if not isinstance(method, (Auto, Direct)):
        raise ValueError(
            f"{option} is differentiated by Direct (the outputs are {what}, which {type(method).__name__} does "
            "not differentiate): use sensitivity=None, Auto() or Direct()"
        )


#: The smallest relative tolerance a solve runs with, in units of the state dtype's epsilon.
RTOL_FLOOR_EPS = 4


def _resolvable_rtol(rtol, dtype):
    """``rtol`` raised to ``RTOL_FLOOR_EPS`` epsilons of the state's dtype where it is positive
    and smaller (zero, absolute control alone, and negative values, which the input
    check reports, are left as they are).

    Below that floor the rounding error of a step, about ``eps * |y|``, is as large
    as the error allowed, so the controller rejects steps and shrinks them until
    ``max_steps`` runs out, and the solution is no more accurate for it (scipy's
    ``solve_ivp`` raises its ``rtol`` to ``100 * eps`` for the same reason). A static
    tolerance that is raised gives a warning when the solve is traced; a traced
    one is raised silently (its value is unknown then).
    """
    floor = RTOL_FLOOR_EPS * float(jnp.finfo(dtype).eps)
    if isinstance(rtol, jax.Array):
        return jnp.where((rtol > 0) & (rtol < floor), jnp.asarray(floor, rtol.dtype), rtol)
    values = np.asarray(rtol)
    low = (values > 0) & (values < floor)
    if np.any(low):
        warnings.warn(
            f"rtol={np.min(values[low]):.3g} is below what {jnp.dtype(dtype).name} resolves: solving with "
            f"rtol={floor:.3g} ({RTOL_FLOOR_EPS} x eps) where it is smaller; tighter tolerances need float64 "
            f"states (JAX's 64-bit mode, which the caller switches on)",
            stacklevel=3,
        )
        return np.where(low, floor, rtol)
    return rtol


def _flat_tolerance(name: str, tol, y0):
    """``rtol`` or ``atol`` as the loop takes it: a scalar, or one entry per component of the raveled state.

    A per-component tolerance is an array shaped like ``y0`` (or broadcastable to
    it), or a pytree with ``y0``'s structure whose leaves broadcast to ``y0``'s.
    Tolerances given as Python or NumPy values stay NumPy values (constants of the
    compiled program, never tracers).
    """
    if jtu.treedef_is_leaf(jtu.tree_structure(tol)) and np.ndim(tol) == 0:
        return tol
    if jtu.treedef_is_leaf(jtu.tree_structure(y0)) and isinstance(tol, (list, tuple)):
        tol = np.asarray(tol)  # one array state: a list of tolerances is an array
    want, got = jtu.tree_structure(y0), jtu.tree_structure(tol)
    if want != got:
        raise ValueError(
            f"{name} must be a scalar, or match y0: an array shaped like y0, or a pytree with y0's "
            f"structure {want}; got structure {got}"
        )
    xnp = jnp if any(isinstance(t, jax.Array) for t in jtu.tree_leaves(tol)) else np
    parts = []
    for (path, leaf), t in zip(jtu.tree_leaves_with_path(y0), jtu.tree_leaves(tol)):
        try:
            parts.append(xnp.ravel(xnp.broadcast_to(t, np.shape(leaf))))
        except ValueError:
            raise ValueError(
                f"{name}{jtu.keystr(path)} has shape {np.shape(t)}, which does not broadcast to "
                f"y0{jtu.keystr(path)}'s shape {np.shape(leaf)}"
            ) from None
    return xnp.concatenate(parts)


class _KnownTimes:
    """Save times known before tracing, hashed by value: a static argument of the eager cache,
    so the compiled program keeps them as constants (checked and converted at trace time)."""

    def __init__(self, ts):
        self.value = np.asarray(ts)
        self._key = (self.value.shape, self.value.dtype.str, self.value.tobytes())

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _KnownTimes) and self._key == other._key


def _explicit_inputs(fn, t, y, args):
    """``fn`` as a pytree whose array leaves are everything it depends on besides its arguments.

    A pytree with array leaves (an ``equinox.Module``) is used as it is: its arrays
    are its leaves. Any other callable is closure-converted
    (``equinox.filter_closure_convert``), which hoists the arrays it closes over;
    when it closes over none (a module-level function) it is used as it is, so that
    it is traced directly rather than through the converted jaxpr.
    """
    if jtu.tree_leaves(eqx.filter(fn, eqx.is_array)):
        return fn
    converted = eqx.filter_closure_convert(fn, t, y, args)
    return converted if jtu.tree_leaves(eqx.filter(converted, eqx.is_array)) else fn


def _any_abstract(*trees) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jtu.tree_leaves(trees))


_solve_compiled = eqx.filter_jit(functools.partial(_solve, final_check=False))
# Inside a transformation the solve is still one jitted call: under an enclosing `jit`
# it is inlined, and under an eager `grad`, `jvp` or `vmap` JAX transforms and
# compiles it as a whole (and caches it) instead of running it operation by operation.
_solve_jitted = eqx.filter_jit(_solve)


def _public_signature(fn) -> inspect.Signature:
    """``fn``'s signature without its private flags (``final_check``, ``batched``)."""
    sig = inspect.signature(fn)
    return sig.replace(
        parameters=[p for n, p in sig.parameters.items() if n not in ("final_check", "batched")]
    )


_SIGNATURE = _public_signature(_solve)


@functools.wraps(_solve)
def solve(f, y0, ts, args=None, **options) -> Solution:
    bound = _SIGNATURE.bind(f, y0, ts, args, **options)
    bound.apply_defaults()
    opts = dict(bound.arguments)
    f, y0, ts, args = (opts.pop(k) for k in ("f", "y0", "ts", "args"))
    # Static options of the jitted solve: neither may become a traced array.
    opts["max_steps"] = check_max_steps(opts["max_steps"])  # a NumPy int is an array to filter_jit
    if opts["jac_sparsity"] is not None and not isinstance(opts["jac_sparsity"], Sparsity):
        opts["jac_sparsity"] = Sparsity(opts["jac_sparsity"])
    if _any_abstract(f, y0, ts, args, opts["rtol"], opts["atol"], opts["dt0"]):
        # Inside a transformation: part of the caller's program. A vmap around
        # this call is visible here but not inside the jitted solve (JAX traces
        # it unbatched and batches the traced program), so it is passed on: the
        # loop takes its batched form (see "The loop" in docs/design.md).
        batched = vmap_size(f, y0, ts, args, opts["rtol"], opts["atol"], opts["dt0"])
        if not _any_abstract(ts):
            # Save times the caller closed over (a training loss): constants of the program,
            # checked at trace time, as in the eager call.
            ts = _KnownTimes(ts)
        return _solve_jitted(f, y0, ts, args, batched=batched, **opts)
    # Called eagerly (a research script): one compiled program per problem
    # structure, reused by every later call with the same f, shapes and options;
    # the final status is checked here, in Python.
    try:
        y0 = jtu.tree_map(jnp.asarray, y0)
    except TypeError:
        pass  # _solve's own check explains what is wrong with y0
    sol = _solve_compiled(f, y0, _KnownTimes(ts), args, **opts)
    if not opts["throw"]:
        return sol
    if isinstance(sol.status, jax.core.Tracer):
        # Called with constant inputs inside a transformation (a jit closing
        # over everything): the check is part of the caller's program.
        return eqx.tree_at(lambda s: s.ys, sol, raise_on_failure(sol.ys, sol.status, MESSAGE_LIST))
    code = int(np.max(np.asarray(sol.status)))
    if code != Status.SUCCESS:
        raise eqx.EquinoxRuntimeError(MESSAGES[code])
    return sol


solve.__signature__ = _SIGNATURE
