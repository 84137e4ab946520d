"""Butcher tableaus: validated coefficient data for Runge-Kutta methods."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class ButcherTableau:
    """Coefficients of an ``s``-stage Runge-Kutta method.

    The method advances ``y1 = y0 + h * sum_i b[i] * k[i]`` with stages
    ``k[i] = f(t0 + c[i] h, y0 + h * sum_j a[i, j] k[j])``.

    Args:
        a: ``(s, s)`` stage matrix. Strictly lower triangular for explicit methods.
        b: ``(s,)`` weights of the propagated solution.
        c: ``(s,)`` nodes; must equal the row sums of ``a``.
        order: classical order of the propagated solution.
        b_error: ``(s,)`` weights of the error estimate ``b - b_hat`` (``None`` when
            the method has no embedded pair). They must sum to zero.
        b_interp: ``(s, d)`` monomial coefficients of a continuous extension,
            ``b_i(theta) = sum_j b_interp[i, j] * theta**(j + 1)``, so that
            ``y(t0 + theta h) = y0 + h * sum_i b_i(theta) k[i]``. ``None`` means the
            stepper falls back to cubic Hermite interpolation.
        name: label used in error messages and reprs.

    Construction checks shapes, the row-sum condition, consistency
    (``sum(b) == 1``), the embedded weights and the interpolant's end point, and
    raises ``ValueError`` naming the failed condition.
    """

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    order: int
    b_error: np.ndarray | None = None
    b_interp: np.ndarray | None = None
    name: str = "tableau"

    def __post_init__(self):
        a, b, c = (np.asarray(x, dtype=np.float64) for x in (self.a, self.b, self.c))
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", b)
        object.__setattr__(self, "c", c)
        s = b.shape[0]
        if a.shape != (s, s) or c.shape != (s,) or b.ndim != 1:
            raise ValueError(f"{self.name}: inconsistent shapes a{a.shape}, b{b.shape}, c{c.shape}")
        # Row sums: c_i = sum_j a_ij (the nodes are where the stages are evaluated).
        if not np.allclose(a.sum(axis=1), c, rtol=0, atol=1e-12):
            raise ValueError(f"{self.name}: row sums of a do not equal c")
        if not np.isclose(b.sum(), 1.0, rtol=0, atol=1e-12):
            raise ValueError(f"{self.name}: weights b sum to {b.sum()}, not 1")
        if self.order < 1:
            raise ValueError(f"{self.name}: order must be >= 1")
        if self.b_error is not None:
            e = np.asarray(self.b_error, dtype=np.float64)
            object.__setattr__(self, "b_error", e)
            if e.shape != (s,):
                raise ValueError(f"{self.name}: b_error must have shape ({s},)")
            if not np.isclose(e.sum(), 0.0, rtol=0, atol=1e-12):
                raise ValueError(
                    f"{self.name}: error weights b - b_hat must sum to 0 (both solutions must be consistent)"
                )
        if self.b_interp is not None:
            bi = np.asarray(self.b_interp, dtype=np.float64)
            object.__setattr__(self, "b_interp", bi)
            if bi.ndim != 2 or bi.shape[0] != s:
                raise ValueError(f"{self.name}: b_interp must have shape ({s}, d)")
            # The continuous extension must reproduce the step's end point.
            if not np.allclose(bi.sum(axis=1), b, rtol=0, atol=1e-10):
                raise ValueError(f"{self.name}: b_interp(1) does not equal b")

    @property
    def num_stages(self) -> int:
        return self.b.shape[0]

    @property
    def explicit(self) -> bool:
        return bool(np.all(np.triu(self.a) == 0))

    @property
    def fsal(self) -> bool:
        """First-same-as-last: the last stage is ``f(t0 + h, y1)``."""
        return bool(self.explicit and self.c[-1] == 1.0 and np.array_equal(self.a[-1], self.b))

    @property
    def embedded(self) -> bool:
        return self.b_error is not None
