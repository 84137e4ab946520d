"""Explicit Runge-Kutta methods: one generic stepper and the named tableaus."""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np

from .._util import finite_filler, fused_sum
from .base import AbstractTableauSolver, StepResult
from .butcher import ButcherTableau


def _lincomb(coeffs, ks):
    """``sum_i coeffs[i] * ks[i]`` with Python-float coefficients, skipping zeros.

    Unrolled with literal coefficients so that XLA fuses it into one kernel.
    """
    out = None
    for c, k in zip(coeffs, ks):
        c = float(c)
        if c == 0.0:
            continue
        term = k if c == 1.0 else c * k
        out = term if out is None else out + term
    return jnp.zeros_like(ks[0]) if out is None else out


# Row lengths up to which a weighted sum of rows is a reduction (see _weighted_rows).
_SMALL_ROWS = 64
# States of this many components or more unroll the stages by default (see ExplicitRK).
UNROLL_MIN_SIZE = 16384


def _sum_rows(x):
    """``jnp.sum(x, axis=0)`` kept in XLA's fused loops (:func:`~diffode._util.fused_sum`).

    Under ``jax.vmap`` the input grows with the batch (stages x components x
    members): a batched Tsit5 solve of Lotka-Volterra (7 x 2 x members elements)
    with a plain sum fell from 75,000 to 13,000 members a second between 292 and
    293 members with the stage loop, and from 91,000 to 38,000 with the stages
    unrolled (whose saves interpolate with this sum).
    """
    return fused_sum(x, (0,))


def _weighted_rows(w, rows):
    """``sum_i w[i] * rows[i]`` for traced weights ``w`` and rows stacked along axis 0.

    Short rows: one multiply-and-reduce kernel (one kernel fewer than a dot),
    also under ``jax.vmap`` at any batch size (see :func:`_sum_rows`).
    Longer rows: a dot. XLA's CPU backend runs a reduction over the leading
    axis in a library kernel that is twice as slow as the dot on rows of 2048
    and some 40 times slower on rows of 1e5.
    """
    if math.prod(rows.shape[1:]) <= _SMALL_ROWS:
        return _sum_rows(w.reshape((-1,) + (1,) * (rows.ndim - 1)) * rows)
    return jnp.tensordot(w, rows, axes=1, precision=lax.Precision.HIGHEST)


def hermite(theta, h, y0, y1, f0, f1):
    """Cubic Hermite interpolation on ``[t0, t0 + h]`` from end values and slopes."""
    dy = y1 - y0
    hf0 = h * f0
    return y0 + theta * (hf0 + theta * ((3 * dy - 2 * hf0 - h * f1) + theta * (hf0 + h * f1 - 2 * dy)))


class ExplicitRK(AbstractTableauSolver):
    """Generic explicit Runge-Kutta stepper driven by a :class:`ButcherTableau`.

    Every step ends with ``f(t1, y1)``: for FSAL tableaus it is the last stage,
    otherwise one extra evaluation that the next step reuses as its first stage,
    so the count per step is unchanged and every method gets (at least) cubic
    Hermite dense output. The step's dense data are its stage derivatives.

    Args:
        tableau: the method's coefficients.
        stage_loop: ``True`` evaluates the stages after the first in one
            ``lax.fori_loop``, so that ``f`` is compiled once per step rather
            than once per stage: much faster compilation, for a small loop
            overhead per stage at run time. ``False`` unrolls the stages, which
            runs faster when ``f`` is cheap and the solve is compiled once and
            run many times. ``None`` (the default) loops for states of fewer
            than ``UNROLL_MIN_SIZE`` (16384) components and unrolls larger
            ones: there each stage of the loop reads every stored stage, a
            memory cost that grows with the state, while the compile time saved
            does not.
    """

    tableau: ButcherTableau = eqx.field(static=True)
    stage_loop: bool | None = eqx.field(static=True, default=None, kw_only=True)

    def __check_init__(self):
        if not self.tableau.explicit:
            raise ValueError(f"{self.tableau.name}: ExplicitRK needs a strictly lower-triangular a")

    def init(self, f, t0, y0, f0):
        return f0

    def unrolled(self) -> "ExplicitRK":
        """This solver with its stages unrolled, unless the user chose ``stage_loop``: the
        form for a batch's step, large even when its members are small (6-20% faster
        there, the VJP of a replayed step included, for about 10% more compile time)."""
        return self if self.stage_loop is not None else dataclasses.replace(self, stage_loop=False)

    def loops_stages(self, y0) -> bool:
        """Whether a step from ``y0`` evaluates its stages in a loop (see ``stage_loop``)."""
        if self.stage_loop is None:
            return y0.size < UNROLL_MIN_SIZE
        return self.stage_loop

    def dense_zeros(self, y0):
        rows = self.tableau.num_stages + (0 if self.tableau.fsal else 1)
        return jnp.zeros((rows,) + y0.shape, y0.dtype)

    def step(self, f, t0, y0, h, f0, tol=None):
        tab = self.tableau
        a, c, b, b_error = tab.a, tab.c, tab.b, tab.b_error
        if not tab.fsal:
            # One more row: the final evaluation f(t0 + h, y1), with weights b.
            s = tab.num_stages
            a = np.block([[a, np.zeros((s, 1))], [b, 0.0]])
            c, b = np.append(c, 1.0), np.append(b, 0.0)
            b_error = None if b_error is None else np.append(b_error, 0.0)
        m = a.shape[0]  # evaluations per step, counting the one reused from the last step
        if self.loops_stages(y0):
            dense = self._stages_looped(f, t0, y0, h, f0, a, c)
            stages = [f0] + [dense[i] for i in range(1, m)]
        else:
            stages = [f0]
            for i in range(1, m):
                stages.append(f(t0 + float(c[i]) * h, y0 + h * _lincomb(a[i, :i], stages)))
            dense = jnp.stack(stages)
        y1 = y0 + h * _lincomb(b, stages)
        y_error = None if b_error is None else h * _lincomb(b_error, stages)
        return StepResult(y1, y_error, dense, stages[-1], f0, True, m - 1, {})

    @staticmethod
    def _stages_looped(f, t0, y0, h, f0, a, c):
        """All ``m`` stage derivatives as an ``(m, n)`` array: row 0 is ``f0``, rows 1 to
        ``m - 1`` are evaluated in one ``fori_loop``.

        Stage ``i`` combines the stored stages with row ``i`` of ``a`` (zero on and
        above the diagonal), so rows not yet written, which hold finite filler,
        meet zero coefficients.
        """
        m, dtype = a.shape[0], y0.dtype
        a_all = jnp.asarray(a, dtype)
        nodes = jnp.asarray(c, dtype)

        def stage(i, ks):
            yi = y0 + h * _weighted_rows(a_all[i], ks)
            return lax.dynamic_update_index_in_dim(ks, f(t0 + nodes[i] * h, yi), i, 0)

        filler = finite_filler(jax.ShapeDtypeStruct((m - 1,) + y0.shape, dtype))
        return lax.fori_loop(1, m, stage, jnp.concatenate([f0[None], filler]))

    def interpolate(self, h, y0, y1, dense, theta):
        """The tableau's continuous extension, or cubic Hermite without one."""
        bi = self.tableau.b_interp
        if bi is None:
            return hermite(theta, h, y0, y1, dense[0], dense[-1])
        # w_i = sum_j bi[i, j] theta^(j+1): a few powers of theta, one weighted
        # sum of constant columns, then one reduction over the stages. Far fewer
        # operations to trace and compile than a polynomial per stage.
        bi = np.asarray(bi)
        power, w = theta, None
        for j in range(bi.shape[1]):
            if j:
                power = power * theta
            if np.any(bi[:, j]):
                term = jnp.asarray(bi[:, j], dense.dtype) * power
                w = term if w is None else w + term
        return y0 + h * _weighted_rows(w, dense[: bi.shape[0]])


# ----------------------------------------------------------------------------
# Low-order methods. Embedded estimates compare against explicit Euler.
# ----------------------------------------------------------------------------

EULER_TABLEAU = ButcherTableau(a=[[0.0]], b=[1.0], c=[0.0], order=1, name="Euler")

MIDPOINT_TABLEAU = ButcherTableau(
    a=[[0, 0], [0.5, 0]],
    b=[0, 1],
    c=[0, 0.5],
    order=2,
    b_error=[-1, 1],
    name="Midpoint",
)

HEUN_TABLEAU = ButcherTableau(
    a=[[0, 0], [1, 0]],
    b=[0.5, 0.5],
    c=[0, 1],
    order=2,
    b_error=[-0.5, 0.5],
    name="Heun",
)

# Ralston (1962), "Runge-Kutta methods with minimum error bounds", Math. Comp. 16.
RALSTON_TABLEAU = ButcherTableau(
    a=[[0, 0], [2 / 3, 0]],
    b=[0.25, 0.75],
    c=[0, 2 / 3],
    order=2,
    b_error=[-0.75, 0.75],
    name="Ralston",
)

RK4_TABLEAU = ButcherTableau(
    a=[[0, 0, 0, 0], [0.5, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 1, 0]],
    b=[1 / 6, 1 / 3, 1 / 3, 1 / 6],
    c=[0, 0.5, 0.5, 1],
    order=4,
    name="RK4",
)

# Bogacki and Shampine (1989), "A 3(2) pair of Runge-Kutta formulas",
# Appl. Math. Lett. 2(4). FSAL; the embedded solution is second order.
BOSH3_TABLEAU = ButcherTableau(
    a=[[0, 0, 0, 0], [0.5, 0, 0, 0], [0, 0.75, 0, 0], [2 / 9, 1 / 3, 4 / 9, 0]],
    b=[2 / 9, 1 / 3, 4 / 9, 0],
    c=[0, 0.5, 0.75, 1],
    order=3,
    b_error=[2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8],
    name="Bosh3",
)

# ----------------------------------------------------------------------------
# Tsitouras (2011), "Runge-Kutta pairs of order 5(4) satisfying only the first
# column simplifying assumption", Comput. Math. Appl. 62(2), 770-775: the
# tableau (Table 1) and the continuous extension of section 3, expanded to
# monomials. Values as tabulated in the paper (and in diffrax/OrdinaryDiffEq).
# ----------------------------------------------------------------------------
_TSIT5_A = np.array(
    [
        [
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
        ],
        [
            1.6100000000000000e-01,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
        ],
        [
            -8.4806554923569887e-03,
            3.3548065549235700e-01,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
        ],
        [
            2.8971530571054935e00,
            -6.3594484899750752e00,
            4.3622954328695815e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
        ],
        [
            5.3258648284392569e00,
            -1.1748883564062828e01,
            7.4955393428898365e00,
            -9.2495066361755252e-02,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
        ],
        [
            5.8614554429464203e00,
            -1.2920969317847110e01,
            8.1593678985761589e00,
            -7.1584973281400996e-02,
            -2.8269050394068383e-02,
            0.0000000000000000e00,
            0.0000000000000000e00,
        ],
        [
            9.6460766818065230e-02,
            1.0000000000000000e-02,
            4.7988965041449960e-01,
            1.3790085741037419e00,
            -3.2900695154360808e00,
            2.3247105240997739e00,
            0.0000000000000000e00,
        ],
    ]
)
_TSIT5_B = np.array(
    [
        0.09646076681806523,
        0.01,
        0.4798896504144996,
        1.379008574103742,
        -3.290069515436081,
        2.324710524099774,
        0.0,
    ]
)
_TSIT5_BERR = np.array(
    [
        0.0017800110522257773,
        0.0008164344596567463,
        -0.007880878010261994,
        0.1447110071732629,
        -0.5823571654525552,
        0.45808210592918686,
        -0.015151515151515152,
    ]
)
_TSIT5_C = np.array([0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0])
_TSIT5_BINTERP = np.array(
    [
        [0.9999999999999999, -2.763706197274826, 2.9132554618219126, -1.0530884977290216],
        [0.0, 0.13169999999999998, -0.2234, 0.1017],
        [0.0, 3.930296236894751, -5.941033872131505, 2.490627285651253],
        [-0.0, -12.411077166933676, 30.33818863028232, -16.548102889244902],
        [0.0, 37.50931341651104, -88.1789048947664, 47.37952196281928],
        [-0.0, -27.896526289197286, 65.09189467479368, -34.87065786149661],
        [0.0, 1.5, -4.0, 2.5],
    ]
)

TSIT5_TABLEAU = ButcherTableau(
    a=_TSIT5_A,
    b=_TSIT5_B,
    c=_TSIT5_C,
    order=5,
    b_error=_TSIT5_BERR,
    b_interp=_TSIT5_BINTERP,
    name="Tsit5",
)

# ----------------------------------------------------------------------------
# Dormand and Prince (1980), "A family of embedded Runge-Kutta formulae",
# J. Comput. Appl. Math. 6(1); the 4th-order continuous extension of Shampine
# (1986), "Some practical Runge-Kutta formulas", Math. Comp. 46, as given in
# Hairer, Norsett and Wanner, vol. I, section II.6 (values as in scipy's RK45).
# ----------------------------------------------------------------------------
_DOPRI5_A7 = np.array(
    [
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.075, 0.225, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.9777777777777777, -3.7333333333333334, 3.5555555555555554, 0.0, 0.0, 0.0, 0.0],
        [2.9525986892242035, -11.595793324188385, 9.822892851699436, -0.2908093278463649, 0.0, 0.0, 0.0],
        [
            2.8462752525252526,
            -10.757575757575758,
            8.906422717743473,
            0.2784090909090909,
            -0.2735313036020583,
            0.0,
            0.0,
        ],
        [
            0.09114583333333333,
            0.0,
            0.44923629829290207,
            0.6510416666666666,
            -0.322376179245283,
            0.13095238095238096,
            0.0,
        ],
    ]
)
_DOPRI5_B = np.array(
    [
        0.09114583333333333,
        0.0,
        0.44923629829290207,
        0.6510416666666666,
        -0.322376179245283,
        0.13095238095238096,
        0.0,
    ]
)
_DOPRI5_E = np.array(
    [
        -0.0012326388888888888,
        0.0,
        0.0042527702905061394,
        -0.03697916666666667,
        0.05086379716981132,
        -0.0419047619047619,
        0.025,
    ]
)
_DOPRI5_C = np.array([0.0, 0.2, 0.3, 0.8, 0.8888888888888888, 1.0, 1.0])
_DOPRI5_P = np.array(
    [
        [1.0, -2.8535800653862835, 3.0717434641059005, -1.1270175653862835],
        [0.0, 0.0, 0.0, 0.0],
        [0.0, 4.023133379230305, -6.249321565289, 2.675424484351598],
        [0.0, -3.7324019615885042, 10.068970589843675, -5.685526961588504],
        [0.0, 2.5548038301849423, -6.399112377351017, 3.5219323679207912],
        [0.0, -1.3744241142186024, 3.272657752246729, -1.7672812570757455],
        [0.0, 1.3824689317781436, -3.764937863556287, 2.382468931778144],
    ]
)

DOPRI5_TABLEAU = ButcherTableau(
    a=_DOPRI5_A7,
    b=_DOPRI5_B,
    c=_DOPRI5_C,
    order=5,
    b_error=_DOPRI5_E,
    b_interp=_DOPRI5_P,
    name="Dopri5",
)

# ----------------------------------------------------------------------------
# Prince and Dormand (1981), "High order embedded Runge-Kutta formulae",
# J. Comput. Appl. Math. 7(1): RK8(7)13M plus a FSAL stage, with a continuous
# extension after Bogacki and Shampine (1990), "Interpolating high-order
# Runge-Kutta formulas", Comput. Math. Appl. 20(3) (values as in diffrax).
# ----------------------------------------------------------------------------
_DOPRI8_A = np.array(
    [
        [
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
        ],
        [
            5.5555555555555552e-02,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
        ],
        [
            2.0833333333333332e-02,
            6.2500000000000000e-02,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
        ],
        [
            3.1250000000000000e-02,
            0.0000000000000000e00,
            9.3750000000000000e-02,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
        ],
        [
            3.1250000000000000e-01,
            0.0000000000000000e00,
            -1.1718750000000000e00,
            1.1718750000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
        ],
        [
            3.7499999999999999e-02,
            0.0000000000000000e00,
            0.0000000000000000e00,
            1.8750000000000000e-01,
            1.4999999999999999e-01,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
        ],
        [
            4.7910137111111112e-02,
            0.0000000000000000e00,
            0.0000000000000000e00,
            1.1224871277777777e-01,
            -2.5505673777777779e-02,
            1.2846823888888888e-02,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
        ],
        [
            1.6917989787292281e-02,
            0.0000000000000000e00,
            0.0000000000000000e00,
            3.8784827848604320e-01,
            3.5977369851500331e-02,
            1.9697021421566607e-01,
            -1.7271385234050185e-01,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
        ],
        [
            6.9095753359192297e-02,
            0.0000000000000000e00,
            0.0000000000000000e00,
            -6.3424797672885413e-01,
            -1.6119757522460407e-01,
            1.3865030945882525e-01,
            9.4092861403575623e-01,
            2.1163632648194397e-01,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
        ],
        [
            1.8355699683904539e-01,
            0.0000000000000000e00,
            0.0000000000000000e00,
            -2.4687680843155926e00,
            -2.9128688781630047e-01,
            -2.6473020233117376e-02,
            2.8478387641928005e00,
            2.8138733146984979e-01,
            1.2374489986331466e-01,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
        ],
        [
            -1.2154248173958881e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            1.6672608665945774e01,
            9.1574182841681795e-01,
            -6.0566058043574706e00,
            -1.6003573594156180e01,
            1.4849303086297663e01,
            -1.3371575735289849e01,
            5.1341826481796380e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
        ],
        [
            2.5886091643826425e-01,
            0.0000000000000000e00,
            0.0000000000000000e00,
            -4.7744857854892047e00,
            -4.3509301377703252e-01,
            -3.0494833320722416e00,
            5.5779200399360995e00,
            6.1558315898610401e00,
            -5.0621045867369387e00,
            2.1939261731806790e00,
            1.3462799865933495e-01,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
        ],
        [
            8.2242759962650747e-01,
            0.0000000000000000e00,
            0.0000000000000000e00,
            -1.1658673257277664e01,
            -7.5762211669093615e-01,
            7.1397358815958156e-01,
            1.2075774986890057e01,
            -2.1276591139204029e00,
            1.9901662070489554e00,
            -2.3428647154404028e-01,
            1.7589857770794226e-01,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
        ],
        [
            4.1747491141530244e-02,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            0.0000000000000000e00,
            -5.5452328611239311e-02,
            2.3931280720118009e-01,
            7.0351066940344298e-01,
            -7.5975961381446089e-01,
            6.6056303092228630e-01,
            1.5818748251012332e-01,
            -2.3810953875286281e-01,
            2.5000000000000000e-01,
            0.0000000000000000e00,
        ],
    ]
)
_DOPRI8_B = np.array(
    [
        0.041747491141530244,
        0.0,
        0.0,
        0.0,
        0.0,
        -0.05545232861123931,
        0.2393128072011801,
        0.703510669403443,
        -0.7597596138144609,
        0.6605630309222863,
        0.15818748251012332,
        -0.2381095387528628,
        0.25,
        0.0,
    ]
)
_DOPRI8_BERR = np.array(
    [
        0.012194277465176744,
        0.0,
        0.0,
        0.0,
        0.0,
        0.7731539478765578,
        -0.07192809284993823,
        -1.763834521196444,
        1.787182038027448,
        -0.7829855527544889,
        0.07877188662899604,
        -0.28255398319730723,
        0.25,
        0.0,
    ]
)
_DOPRI8_C = np.array(
    [
        0.0,
        0.05555555555555555,
        0.08333333333333333,
        0.125,
        0.3125,
        0.375,
        0.1475,
        0.465,
        0.5648654513822595,
        0.65,
        0.9246562776405044,
        1.0,
        1.0,
        1.0,
    ]
)
_DOPRI8_BINTERP = np.array(
    [
        [
            1.0,
            -6.6910181737837595,
            19.999006933368396,
            -30.061056828966645,
            22.139650499809406,
            -6.34483493928604,
        ],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [
            0.0,
            -7.6142658045872675,
            52.227353279294555,
            -121.49996277313346,
            116.44221495503422,
            -39.61079198522025,
        ],
        [
            0.0,
            10.728139263042886,
            -46.89191641810936,
            83.17210046398478,
            -67.14513188259572,
            20.376121380879145,
        ],
        [
            0.0,
            0.5526637063753649,
            -0.18908932250105956,
            9.572450755599366,
            -16.56722435274965,
            7.334709882679536,
        ],
        [0.0, 4.218656262566515, -35.70759759462221, 87.84060576772056, -89.9916014847245, 32.88017743524592],
        [
            0.0,
            -0.6627209125361597,
            6.273644808324035,
            -17.415210777076297,
            22.623748964853284,
            -10.158899052642676,
        ],
        [
            0.0,
            -1.2636789001135462,
            10.316088127245076,
            -28.590328951479098,
            32.23623401673554,
            -12.540126809878256,
        ],
        [
            0.0,
            5.410603789859042,
            -34.76507698666118,
            81.66309505843414,
            -82.10203154883598,
            29.555300148451604,
        ],
        [
            0.0,
            -7.032137906794574,
            47.745797107822554,
            -114.93752913770093,
            116.26621857911195,
            -41.79234864243906,
        ],
        [
            0.0,
            2.3537586759714983,
            -19.008209934160803,
            50.255836422617605,
            -53.90207774663854,
            20.300692582210083,
        ],
    ]
)

DOPRI8_TABLEAU = ButcherTableau(
    a=_DOPRI8_A,
    b=_DOPRI8_B,
    c=_DOPRI8_C,
    order=8,
    b_error=_DOPRI8_BERR,
    b_interp=_DOPRI8_BINTERP,
    name="Dopri8",
)


class Euler(ExplicitRK):
    """Explicit Euler, order 1. Fixed steps only (no error estimate)."""

    tableau: ButcherTableau = eqx.field(static=True, default=EULER_TABLEAU)


class Midpoint(ExplicitRK):
    """Explicit midpoint, order 2, with an embedded Euler estimate."""

    tableau: ButcherTableau = eqx.field(static=True, default=MIDPOINT_TABLEAU)


class Heun(ExplicitRK):
    """Heun's method (explicit trapezoid), order 2, embedded Euler estimate."""

    tableau: ButcherTableau = eqx.field(static=True, default=HEUN_TABLEAU)


class Ralston(ExplicitRK):
    """Ralston's method, order 2 with minimal error bound; embedded Euler estimate."""

    tableau: ButcherTableau = eqx.field(static=True, default=RALSTON_TABLEAU)


class RK4(ExplicitRK):
    """The classical Runge-Kutta method, order 4. Fixed steps only."""

    tableau: ButcherTableau = eqx.field(static=True, default=RK4_TABLEAU)


class Bosh3(ExplicitRK):
    """Bogacki-Shampine 3(2), FSAL. Cheap for loose tolerances."""

    tableau: ButcherTableau = eqx.field(static=True, default=BOSH3_TABLEAU)


class Tsit5(ExplicitRK):
    """Tsitouras 5(4), FSAL, with a 4th-order interpolant. The default."""

    tableau: ButcherTableau = eqx.field(static=True, default=TSIT5_TABLEAU)


class Dopri5(ExplicitRK):
    """Dormand-Prince 5(4), FSAL, with Shampine's 4th-order interpolant."""

    tableau: ButcherTableau = eqx.field(static=True, default=DOPRI5_TABLEAU)


class Dopri8(ExplicitRK):
    """Prince-Dormand 8(7), FSAL, for tight tolerances. Its continuous extension is of lower order (interpolation error O(h^6))."""

    tableau: ButcherTableau = eqx.field(static=True, default=DOPRI8_TABLEAU)
