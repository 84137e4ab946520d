"""A linear map with its own transpose, as a JAX primitive: how every sensitivity method
turns its forward and reverse rules into one derivative that composes with every transformation.

A sensitivity method defines the tangent of a solve as ``dys = A(r) x``: a map
that is linear in the input tangents ``x = (dy0, dts, dparams)`` and depends
non-linearly on residuals ``r`` (the primal inputs). It supplies three functions
(a :class:`LinearOp`):

* ``apply(r, x) = A(r) x``, its forward mode (forward sensitivities, or the
  JVP of the solve loop);
* ``transpose(r, y) = A(r)^T y``, its reverse mode (an adjoint solve, or the
  backward replay of the steps);
* ``vjp_res(r, x, c) = d/dr <c, A(r) x>``, the reverse-mode derivative of the
  tangent itself with respect to the residuals, needed only for reverse-over-
  reverse and reverse-over-forward second derivatives.

:func:`linear_map` binds them as one primitive. Its rules:

* JVP: ``d(A(r) x) = A(r) dx + (dA(r)/dr . dr) x``. The first term is the same
  primitive; the second is another :func:`linear_map`, linear in ``dr``, whose
  forward rule is ``jax.jvp`` of ``apply`` and whose transpose is ``vjp_res``.
* transpose: the same primitive with ``apply`` and ``transpose`` exchanged.
* batching: the same primitive with the three functions vmapped (the
  transpose sums the cotangent of an unbatched input over the batch).

So ``jax.jvp``, ``jax.linearize`` and ``jax.jacfwd`` run ``apply``, ``jax.grad``
and ``jax.vjp`` run ``transpose``, ``jax.hessian`` (forward over reverse) runs
the JVP of ``transpose``, and every combination with ``jit`` and ``vmap``
follows, without ever asking which transformation is running. (JAX's own
``jax.custom_derivatives.linear_call`` has the same idea but neither a batching
rule nor derivatives with respect to its residuals.)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir


class LinearOp:
    """A family of linear maps ``x -> A(r) x`` (see the module docstring).

    Instances are compared by identity: they are parameters of the primitive.
    """

    def apply(self, r, x):
        raise NotImplementedError

    def transpose(self, r, y):
        raise NotImplementedError

    def vjp_res(self, r, x, c):
        """``d/dr <c, A(r) x>``: a pytree shaped like ``r``."""
        raise NotImplementedError

    def out_struct(self, r, x):
        """The ``jax.ShapeDtypeStruct`` pytree of ``apply(r, x)`` (computed without tracing ``apply``)."""
        raise NotImplementedError


def tree_vdot(a, b) -> jax.Array:
    """``sum <a_i, b_i>`` over the leaves of two pytrees of the same structure."""
    terms = [jnp.vdot(x, y) for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b))]
    return sum(terms) if terms else jnp.zeros(())


def _struct(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))


class _Transposed(LinearOp):
    """``y -> A(r)^T y``."""

    def __init__(self, op: LinearOp, x_struct):
        self.op, self.x_struct = op, x_struct

    def apply(self, r, y):
        return self.op.transpose(r, y)

    def transpose(self, r, x):
        return self.op.apply(r, x)

    def vjp_res(self, r, y, c):
        # <c, A^T y> = <A c, y>
        return self.op.vjp_res(r, c, y)

    def out_struct(self, r, y):
        return self.x_struct

    def apply_batched(self, r, y, r_axes, y_axes, size):
        """The batch of ``A(r_b)^T y_b``, one per member, from the op's own batched transpose
        (``None`` where it has none)."""
        batched = getattr(self.op, "transpose_batched", None)
        if batched is None:
            return None
        # Every member's cotangent is its own: batched along 0, never summed.
        per_member = jtu.tree_map(lambda s: 0, self.x_struct)
        return batched(r, y, r_axes, per_member, size)


class _ResidualDerivative(LinearOp):
    """``dr -> (dA(r)/dr . dr) x``: residual ``(r, x)``, linear argument ``dr``."""

    def __init__(self, op: LinearOp):
        self.op = op

    def apply(self, rx, dr):
        r, x = rx
        return jax.jvp(lambda r_: self.op.apply(r_, x), (r,), (dr,))[1]

    def transpose(self, rx, c):
        r, x = rx
        return self.op.vjp_res(r, x, c)

    def vjp_res(self, rx, dr, c):
        # <c, (dA . dr) x> = <vjp_res(r, x, c), dr>, differentiated in (r, x).
        return jax.grad(lambda rx_: tree_vdot(self.op.vjp_res(rx_[0], rx_[1], c), dr), allow_int=True)(rx)

    def out_struct(self, rx, dr):
        return self.op.out_struct(*rx)


def _move_batch(x, axis):
    """A leaf batched along 0 by vmap, put back where its input had its batch axis
    (summed when the input had none: the cotangent of a shared input)."""
    if x is None:
        return None
    if axis is None:
        if x.dtype == jax.dtypes.float0:  # the (empty) cotangent of an integer input
            return np.zeros(x.shape[1:], x.dtype)
        return jnp.sum(x, axis=0)
    return jnp.moveaxis(x, 0, axis)


class _Batched(LinearOp):
    """The batch of maps ``x_b -> A(r_b) x_b`` with ``r`` and ``x`` batched along the given axes."""

    def __init__(self, op: LinearOp, r_axes, x_axes, size: int):
        self.op, self.r_axes, self.x_axes, self.size = op, r_axes, x_axes, size

    def _vmap(self, fn, in_axes):
        return jax.vmap(fn, in_axes=in_axes, out_axes=0, axis_size=self.size)

    def apply(self, r, x):
        # An op may apply itself to the whole batch (``apply_batched``: a transposed
        # op whose transpose takes the batch at once).
        batched = getattr(self.op, "apply_batched", None)
        out = None if batched is None else batched(r, x, self.r_axes, self.x_axes, self.size)
        if out is not None:
            return out
        return self._vmap(self.op.apply, (self.r_axes, self.x_axes))(r, x)

    def transpose(self, r, y):
        # An op may transpose the whole batch itself (``transpose_batched``):
        # the cotangent of an input the members share is then a sum it forms
        # as it goes, rather than one copy per member summed at the end.
        batched = getattr(self.op, "transpose_batched", None)
        out = None if batched is None else batched(r, y, self.r_axes, self.x_axes, self.size)
        if out is not None:
            return jtu.tree_map(
                lambda v, ax: v if v is None or ax is None else jnp.moveaxis(v, 0, ax),
                out,
                self.x_axes,
                is_leaf=lambda v: v is None,
            )
        out = self._vmap(self.op.transpose, (self.r_axes, 0))(r, y)
        return jtu.tree_map(_move_batch, out, self.x_axes, is_leaf=lambda v: v is None)

    def vjp_res(self, r, x, c):
        out = self._vmap(self.op.vjp_res, (self.r_axes, self.x_axes, 0))(r, x, c)
        return jtu.tree_map(_move_batch, out, self.r_axes, is_leaf=lambda v: v is None)

    def out_struct(self, r, x):
        r0 = jtu.tree_map(_unbatched_struct, r, self.r_axes, is_leaf=lambda v: v is None)
        x0 = jtu.tree_map(_unbatched_struct, x, self.x_axes, is_leaf=lambda v: v is None)
        inner = self.op.out_struct(r0, x0)
        return jtu.tree_map(lambda s: jax.ShapeDtypeStruct((self.size,) + s.shape, s.dtype), inner)


def _unbatched_struct(x, axis):
    s = _struct(x)
    if axis is None:
        return s
    return jax.ShapeDtypeStruct(s.shape[:axis] + s.shape[axis + 1 :], s.dtype)


linear_map_p = Primitive("diffode_linear_map")
linear_map_p.multiple_results = True


def linear_map(op: LinearOp, r: Any, x: Any) -> Any:
    """``op.apply(r, x)``, differentiated and batched by the rules in the module docstring."""
    r_flat, r_tree = jtu.tree_flatten(r)
    x_flat, x_tree = jtu.tree_flatten(x)
    out = op.out_struct(r, x)
    out_flat, out_tree = jtu.tree_flatten(out)
    avals = tuple(jax.core.ShapedArray(s.shape, s.dtype) for s in out_flat)
    res = linear_map_p.bind(
        *r_flat, *x_flat, op=op, r_tree=r_tree, x_tree=x_tree, out_tree=out_tree, out_avals=avals
    )
    return jtu.tree_unflatten(out_tree, res)


def _split(args, r_tree):
    n = r_tree.num_leaves
    return args[:n], args[n:]


def _apply_flat(*args, op, r_tree, x_tree, out_tree, out_avals):
    r_flat, x_flat = _split(args, r_tree)
    out = op.apply(jtu.tree_unflatten(r_tree, r_flat), jtu.tree_unflatten(x_tree, x_flat))
    return jtu.tree_leaves(out)


def _impl(*args, **params):
    # Evaluated outside any jit (an eager jax.jvp, or the transposed map of an
    # eager jax.grad): compiled as one program rather than run op by op.
    return jax.jit(functools.partial(_apply_flat, **params))(*args)


def _abstract_eval(*args, op, r_tree, x_tree, out_tree, out_avals):
    return list(out_avals)


def _instantiate(t, primal):
    if type(t) is ad.Zero:
        if not jnp.issubdtype(jnp.result_type(primal), jnp.inexact):
            return np.zeros(np.shape(primal), jax.dtypes.float0)  # an integer residual's tangent
        return jnp.zeros(np.shape(primal), jnp.result_type(primal))
    return t


def _jvp(primals, tangents, *, op, r_tree, x_tree, out_tree, out_avals):
    params = dict(op=op, r_tree=r_tree, x_tree=x_tree, out_tree=out_tree, out_avals=out_avals)
    out = linear_map_p.bind(*primals, **params)
    r_flat, x_flat = _split(primals, r_tree)
    dr_flat, dx_flat = _split(tangents, r_tree)
    r, x = jtu.tree_unflatten(r_tree, r_flat), jtu.tree_unflatten(x_tree, x_flat)
    terms = []
    if any(type(t) is not ad.Zero for t in dx_flat):
        dx = jtu.tree_unflatten(x_tree, [_instantiate(t, p) for t, p in zip(dx_flat, x_flat)])
        terms.append(linear_map(op, r, dx))
    if any(type(t) is not ad.Zero for t in dr_flat):
        dr = jtu.tree_unflatten(r_tree, [_instantiate(t, p) for t, p in zip(dr_flat, r_flat)])
        terms.append(linear_map(_ResidualDerivative(op), (r, x), dr))
    if not terms:
        return out, [ad.Zero(a.to_tangent_aval()) for a in out_avals]
    total = terms[0] if len(terms) == 1 else jtu.tree_map(jnp.add, *terms)
    return out, jtu.tree_leaves(total)


def _transpose(cts, *args, op, r_tree, x_tree, out_tree, out_avals):
    r_flat, x_flat = _split(args, r_tree)
    if any(ad.is_undefined_primal(v) for v in r_flat):
        raise NotImplementedError("diffode: a sensitivity method's tangent is not linear in its residuals")
    x_avals = [v.aval if ad.is_undefined_primal(v) else jax.typeof(v) for v in x_flat]
    x_struct = jtu.tree_unflatten(x_tree, [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in x_avals])
    cts = [jnp.zeros(a.shape, a.dtype) if type(c) is ad.Zero else c for c, a in zip(cts, out_avals)]
    r = jtu.tree_unflatten(r_tree, r_flat)
    y = jtu.tree_unflatten(out_tree, cts)
    x_bar = linear_map(_Transposed(op, x_struct), r, y)
    x_bar_flat = jtu.tree_leaves(x_bar)
    return [None] * len(r_flat) + [
        c if ad.is_undefined_primal(v) else None for c, v in zip(x_bar_flat, x_flat)
    ]


def _batch(args, dims, *, op, r_tree, x_tree, out_tree, out_avals):
    dims = [d if isinstance(d, int) else None for d in dims]
    params = dict(op=op, r_tree=r_tree, x_tree=x_tree, out_tree=out_tree, out_avals=out_avals)
    if all(d is None for d in dims):
        return linear_map_p.bind(*args, **params), [None] * len(out_avals)
    size = next(np.shape(a)[d] for a, d in zip(args, dims) if d is not None)
    r_flat, x_flat = _split(args, r_tree)
    r_dims, x_dims = _split(dims, r_tree)
    r, x = jtu.tree_unflatten(r_tree, r_flat), jtu.tree_unflatten(x_tree, x_flat)
    r_axes = jtu.tree_unflatten(r_tree, r_dims)
    x_axes = jtu.tree_unflatten(x_tree, x_dims)
    out = linear_map(_Batched(op, r_axes, x_axes, size), r, x)
    leaves = jtu.tree_leaves(out)
    return leaves, [0] * len(leaves)


linear_map_p.def_impl(_impl)
linear_map_p.def_abstract_eval(_abstract_eval)
ad.primitive_jvps[linear_map_p] = _jvp
ad.primitive_transposes[linear_map_p] = _transpose
batching.primitive_batchers[linear_map_p] = _batch
mlir.register_lowering(linear_map_p, mlir.lower_fun(_apply_flat, multiple_results=True))
