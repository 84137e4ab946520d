"""``solve_ensemble``: a batch of solves split across devices, one block of members per device."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import ArrayLike, PyTree

from ._solution import MESSAGE_LIST, MESSAGES, Solution, Status
from ._solve import solve
from ._util import raise_on_failure
from ._validate import check_max_steps, rhs_structure_problem
from .solvers.colouring import Sparsity

#: The name of the mesh axis that holds the members.
AXIS = "members"


def solve_ensemble(
    f: Callable,
    y0: PyTree,
    ts: ArrayLike,
    args: PyTree = None,
    *,
    batch_y0: bool = True,
    batch_args: Any = False,
    devices: Sequence[jax.Device] | None = None,
    **solve_kwargs,
) -> Solution:
    """Solve a batch of problems ("members"), the batch split evenly across devices.

    Every batched input has the members along its leading axis; member ``i`` is
    ``solve(f, y0[i], ts, args[i], **solve_kwargs)``. The result is that of
    ``jax.vmap`` of :func:`solve` over the batch (a :class:`Solution` whose
    arrays all have the members first), computed as one program in which each
    device solves its own contiguous block of members (``jax.shard_map`` over a
    1-D mesh of ``devices`` whose axis is named ``"members"``). Each block's loop
    runs until that block's slowest member is done: the devices never wait for
    each other inside the solve. With one device the result is exactly
    ``jax.vmap(solve)``'s.

    The result's arrays are sharded along the members:
    ``NamedSharding(mesh, PartitionSpec("members"))``. A batch whose size is not
    a multiple of the number of devices is padded with copies of its last member
    up to the next multiple, solved, and cut back to its size; a cut array does not
    split evenly across the devices, so JAX returns it replicated on each of them.
    To keep such results sharded, give a multiple of the device count.

    Works eagerly (one compiled program per problem structure, as :func:`solve`),
    under ``jax.jit``, and under ``jax.grad``/``jax.jvp`` of a loss over the batch:
    derivatives of a shared input (a shared ``y0``, shared ``args``, the arrays of
    an ``equinox.Module`` passed as ``f``) are summed over all members and
    devices. With several processes (``jax.distributed.initialize``), pass global
    arrays (``jax.make_array_from_process_local_data``) for the batched inputs and
    NumPy arrays, or replicated global arrays, for the shared ones; ``devices``
    defaults to every process's devices. See ``docs/ensembles.md``.

    Args:
        f, y0, ts, args: as for :func:`solve`.
        batch_y0: whether ``y0`` holds the members (every leaf has a leading
            member axis). ``False``: one ``y0`` for all members.
        batch_args: which leaves of ``args`` hold the members: ``True`` (all),
            ``False`` (none, the default), or a pytree prefix of ``args`` with a
            bool for each subtree, such as ``(True, False)`` for per-member rate
            constants and shared settings.
        devices: the devices to split the batch across, ``jax.devices()`` by default.
        **solve_kwargs: any other option of :func:`solve` (``solver``, ``rtol``,
            ``sensitivity``, ``throw``, ...), the same for every member. With
            ``throw=True`` (the default) a failure of any member raises, with the
            message of the batch's largest status code: called eagerly, an
            ``equinox.EquinoxRuntimeError`` once the program has run; inside
            ``jit`` or ``grad``, from the program on every device at once (JAX's
            ``JaxRuntimeError`` quoting it). With ``throw=False`` each member
            reports its own ``status``, and a failed member's values and
            derivatives are NaN, the others' unaffected. Either way a failed
            backward solve of :class:`BacksolveAdjoint` or
            :class:`InterpolatingAdjoint` makes that member's derivatives NaN
            rather than raising (an error raised on one device alone would leave
            the others waiting for it).
    """
    devices = tuple(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("solve_ensemble needs at least one device, got an empty devices")
    mask = _batched_leaves(args, batch_args)
    members = (jtu.tree_leaves(y0) if batch_y0 else []) + [
        x for x, b in zip(jtu.tree_leaves(args), mask) if b
    ]
    if not members:
        raise ValueError(
            "solve_ensemble has nothing to batch: set batch_y0=True (y0 holds the members) and/or "
            "batch_args (which leaves of args hold them); for a single problem use diffode.solve"
        )
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in members}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise ValueError(
            "every batched input needs the same number of members along its leading axis, got leading "
            f"sizes {sorted(str(s) for s in sizes)}"
        )
    # Options that solve needs as Python values, not arrays (the program below traces arrays).
    if "max_steps" in solve_kwargs:
        solve_kwargs["max_steps"] = check_max_steps(solve_kwargs["max_steps"])
    sparsity = solve_kwargs.get("jac_sparsity")
    if sparsity is not None and not isinstance(sparsity, Sparsity):
        solve_kwargs["jac_sparsity"] = Sparsity(sparsity)
    throw = bool(solve_kwargs.pop("throw", True))
    mesh = Mesh(np.asarray(devices, dtype=object), (AXIS,))
    problem = (f, y0, ts, args, solve_kwargs, batch_y0, mask, mesh, sizes.pop())
    # Called eagerly, the status is checked here, after the program (as solve does); inside
    # a transformation, by the program itself.
    traced = any(isinstance(x, jax.core.Tracer) for x in jtu.tree_leaves((f, y0, ts, args, solve_kwargs)))
    sol, code = _ensemble(*problem, throw, throw and traced)
    if throw and not traced:
        if isinstance(code, jax.core.Tracer):  # inside a jit that closes over every input
            sol, code = _ensemble(*problem, throw, True)
        elif int(code) != Status.SUCCESS:
            raise eqx.EquinoxRuntimeError(MESSAGES[int(code)])
    return sol


def _batched_leaves(args, batch_args) -> tuple[bool, ...]:
    """One bool per leaf of ``args``: whether it holds the members (``batch_args`` is a
    bool or a pytree prefix of ``args`` with bool leaves)."""
    try:
        full = jtu.tree_map(lambda b, sub: jtu.tree_map(lambda _: bool(b), sub), batch_args, args)
    except ValueError as e:
        raise ValueError(
            f"batch_args must be a bool or a pytree prefix of args with a bool for each subtree: {e}"
        ) from None
    return tuple(jtu.tree_leaves(full))


@eqx.filter_jit
def _ensemble(
    f,
    y0,
    ts,
    args,
    solve_kwargs,
    batch_y0: bool,
    mask: tuple[bool, ...],
    mesh: Mesh,
    size: int,
    throw: bool,
    check: bool,
):
    """The batch's :class:`Solution` and its largest status code (replicated); ``check``
    makes the program itself raise on a failure."""
    padded = -(-size // mesh.size) * mesh.size

    def pad(x):
        # Copies of the last member: they cost what it costs, and fail only where it fails.
        x = jnp.asarray(x)
        return x if padded == size else jnp.concatenate([x, jnp.repeat(x[-1:], padded - size, axis=0)])

    a_leaves, a_def = jtu.tree_flatten(args)
    batched = (
        jtu.tree_map(pad, y0) if batch_y0 else None,
        [pad(x) for x, b in zip(a_leaves, mask) if b],
    )
    # Everything else is the same for every member: its arrays enter every device whole.
    shared = (f, ts, None if batch_y0 else y0, [x for x, b in zip(a_leaves, mask) if not b], solve_kwargs)
    dynamic, static = eqx.partition(shared, eqx.is_array)

    def block(batched, dynamic):
        f, ts, y0_shared, a_shared, kwargs = eqx.combine(dynamic, static)

        def member(y0_m, a_batched):
            own, common = iter(a_batched), iter(a_shared)
            a = jtu.tree_unflatten(a_def, [next(own) if b else next(common) for b in mask])
            y = y0_m if batch_y0 else y0_shared
            if throw:  # what solve(..., throw=True) reports when it is traced
                problem = rhs_structure_problem(eqx.filter_eval_shape(f, jnp.asarray(ts)[0], y, a), y)
                if problem is not None:
                    raise ValueError(f"{MESSAGES[Status.RHS_STRUCTURE_MISMATCH]} {problem}")
            return solve(f, y, ts, a, throw=False, **kwargs)

        sol = jax.vmap(member)(*batched)
        # The members' own checks (throw=True) would raise on one device only, and the
        # others would then wait forever for it at the program's next collective (a gather
        # of the results, the sum of a shared input's derivative). So every device checks
        # the largest status of the whole batch, and all of them raise together.
        code = lax.pmax(jnp.max(sol.status), AXIS)
        if check:
            arrays, rest = eqx.partition(sol, eqx.is_inexact_array)
            sol = eqx.combine(raise_on_failure(arrays, code, MESSAGE_LIST), rest)
        return sol, code

    # check_vma=False: the solve's loops and custom rules carry no replication types; every
    # output is split along the members, and the derivative of a replicated input is
    # summed over the devices (what JAX does for it without the check).
    sol, code = jax.shard_map(
        block,
        mesh=mesh,
        in_specs=(PartitionSpec(AXIS), PartitionSpec()),
        out_specs=(PartitionSpec(AXIS), PartitionSpec()),
        check_vma=False,
    )(batched, dynamic)
    return (sol if padded == size else jtu.tree_map(lambda x: x[:size], sol)), code
