r"""Benchmark: the 2-D Brusselator, large stiff systems (issue 15).

Run from the repository root::

    python -m benchmarks.brusselator --quick                       # N = 4, 8, six candidates (about 1 minute)
    python -m benchmarks.brusselator --out benchmarks/brusselator.json --plot --grad
    python -m benchmarks.brusselator --sizes 16,32 --solvers "diffode Rodas5P,scipy BDF sparse"

Problem: the 2-D Brusselator as posed in SciML's problem library and benchmarks
(``prob_ode_brusselator_2d`` in DiffEqProblemLibrary.jl,
lib/ODEProblemLibrary/src/brusselator_prob.jl, and the "Brusselator
Work-Precision Diagrams" page of SciMLBenchmarks,
https://docs.sciml.ai/SciMLBenchmarksOutput/stable/StiffODE/Bruss/; there from
Hairer and Wanner, Solving ODEs II, p. 152). On an N x N grid
``x_i = (i - 1) / (N - 1)``, ``y_j`` alike, both ends included, with periodic
neighbours (index N + 1 is 1, index 0 is N) and ``dx = 1 / (N - 1)``::

    u' = a (u_{i-1,j} + u_{i+1,j} + u_{i,j-1} + u_{i,j+1} - 4 u_ij) + B + u^2 v - (A + 1) u + f(x, y, t)
    v' = a (v_{i-1,j} + v_{i+1,j} + v_{i,j-1} + v_{i,j+1} - 4 v_ij) + A u - u^2 v

with ``a = 10 s / dx^2`` (``s`` the alpha scale, 1 by default), A = 3.4, B = 1,
``f = 5`` where ``(x - 0.3)^2 + (y - 0.6)^2 <= 0.1^2`` and ``t >= 1.1`` (else 0),
``u(0) = 22 (y (1 - y))^1.5``, ``v(0) = 27 (x (1 - x))^1.5``, t in [0, 11.5].
2 N^2 states, stored as ``[u.ravel(), v.ravel()]`` (u[i, j] at i N + j).

float64, rtol = 1e-6, atol = 1e-8 (``--plot``: 1e-4 ... 1e-8 at N = 16, atol =
rtol / 100). The script pins every library to one thread before numpy and jax
are imported (``THREAD_ENV``, recorded in the output), so all candidates run
alike on one core.

Candidates (``CANDIDATES``; ``--solvers`` picks by name):

* diffode ``Rodas5P``, ``Kvaerno5`` and ``Radau5``, Jacobians by ``jax.jacfwd``,
  with each linear solver (``linear_solver=``) and with a ``jac_sparsity=``
  pattern ("+sparsity": Jacobians from coloured ``jvp``\ s, and ``SparseLU``,
  the block-tridiagonal LU in a level ordering, in place of dense LU; "GMRES+LU
  +sparsity": GMRES preconditioned by ``SparseLU`` factors kept across
  steps). An entry whose constructor or ``solve`` rejects the keyword
  (``TypeError``) is recorded as skipped with the reason, so it starts working
  once the API accepts it;
* diffrax ``Kvaerno5`` with ``PIDController`` at the same tolerances;
* SciPy ``solve_ivp(method="BDF")`` with ``jac_sparsity`` (the stencil pattern;
  SciPy's grouped finite differences and sparse LU), and with the dense
  ``jax.jacfwd`` Jacobian;
* SUNDIALS CVODE (scikit-sundae; BDF, Newton) with its dense, band and sparse
  (SuperLU_MT) linear solvers and its own difference-quotient Jacobians. In the
  natural order the band is half the matrix (the u-v coupling sits N^2 away,
  the periodic wrap in j N (N - 1)); "CVODE band (folded)" renumbers the
  states (rows of the grid ordered 0, N-1, 1, N-2, ..., u and v interleaved per
  cell) so that the half-bandwidth is 4 N. The bandwidths used are recorded.

The non-JAX candidates call the same jitted JAX right-hand side (and
Jacobian) through Python; their "compile" is the compile of those functions.

Measured per candidate and N: compile time (``jax.jit(...).lower().compile()``
after ``jax.clear_caches()``: trace, lower and compile without a run, i.e. a
first call minus one run), run time (median over repeats after a warm-up call,
``jax.block_until_ready`` before the timer stops; 5 repeats under 1 s, 3 under
10 s, 1 above; the candidates of one N interleaved), accepted and rejected
steps, f evaluations, Jacobian evaluations and LU decompositions where the
library reports them, the error at t = 11.5 against a reference (SciPy
``Radau`` with the analytic sparse Jacobian, rtol = 1e-10, atol = 1e-12,
restarted at the forcing's switch-on t = 1.1; cached in /tmp; checked against
the same solver at rtol = 1e-12, atol = 1e-14), and the growth exponent of run time from
N = 8 to 32 (least-squares slope of log time against log N). A candidate is
skipped at a size when its run time, extrapolated from the smaller sizes, would
exceed ``--cap`` seconds.

``--grad``: ``jax.grad`` of ``sum(u(11.5))`` with respect to (alpha scale, A, B)
at N = 4, 8 and 16 (N = 4 seeds the run-time extrapolation), diffode ``Rodas5P`` with each sensitivity method and diffrax
``Kvaerno5`` with ``RecursiveCheckpointAdjoint``, against central differences
(steps 0.1%, 0.2% and 0.4% of each parameter, Richardson-extrapolated) of the reference
solver at rtol = 1e-10.

``--grad-accuracy N``: the gradient's error at rtol 1e-6, 1e-7, 1e-8 against a reference
from two independent tight solves (:func:`tight_gradient`), diffode ``Auto`` with
``Rodas5P`` (with and without ``jac_sparsity``) and ``Radau5`` against diffrax.
``--grad-memory N``: the compiled gradient's planned temporaries at ``max_steps`` 1e3,
1e4 and 1e5.
"""

from __future__ import annotations

import os

# One thread for every library, set before numpy / scipy / jax are imported.
THREAD_ENV = {
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
}
os.environ.update(THREAD_ENV)

import jax  # noqa: E402

# The benchmark runs in float64; diffode itself never switches x64 on.
jax.config.update("jax_enable_x64", True)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402

import diffode  # noqa: E402

from . import _timing  # noqa: E402
from .solve_lv import environment  # noqa: E402

T0, T1, T_ON = 0.0, 11.5, 1.1
PARAMS = (1.0, 3.4, 1.0)  # alpha scale, A, B
RTOL, ATOL = 1e-6, 1e-8
REF_TOL = dict(rtol=1e-10, atol=1e-12)
SIZES_FULL = (4, 8, 16, 32)
SIZES_QUICK = (4, 8)
PLOT_RTOLS = (1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
MAX_STEPS = 100_000
DEFAULT_SLOPE = 4.0  # growth exponent assumed when a candidate has only one size measured yet
# Candidates that factor a dense (or half-bandwidth n/2) matrix: O(n^3) = O(N^6) per LU once that
# dominates, so their extrapolation from N >= 16 never assumes less than N^6 (smaller sizes understate it).
DENSE_SLOPE = 6.0
CACHE_DIR = "/tmp"


# ---------------------------------------------------------------------------
# The problem.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bruss:
    N: int

    @property
    def n(self) -> int:
        return 2 * self.N * self.N

    @property
    def dx(self) -> float:
        return 1.0 / (self.N - 1)

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        g = np.linspace(0.0, 1.0, self.N)
        return np.meshgrid(g, g, indexing="ij")  # x varies along axis 0 (i), y along axis 1 (j)

    def pulse_mask(self) -> np.ndarray:
        x, y = self.grid()
        return (((x - 0.3) ** 2 + (y - 0.6) ** 2) <= 0.1**2).astype(np.float64)

    def y0(self) -> np.ndarray:
        x, y = self.grid()
        return np.concatenate([(22.0 * (y * (1 - y)) ** 1.5).ravel(), (27.0 * (x * (1 - x)) ** 1.5).ravel()])

    def rhs(self) -> Callable:
        N, mask = self.N, jnp.asarray(self.pulse_mask())
        inv_dx2 = 1.0 / self.dx**2

        def lap(w):
            return jnp.roll(w, 1, 0) + jnp.roll(w, -1, 0) + jnp.roll(w, 1, 1) + jnp.roll(w, -1, 1) - 4.0 * w

        def f(t, y, p):
            scale, A, B = p[0], p[1], p[2]
            alpha = 10.0 * scale * inv_dx2
            u, v = y[: N * N].reshape(N, N), y[N * N :].reshape(N, N)
            uuv = u * u * v
            forcing = jnp.where(t >= T_ON, 5.0, 0.0) * mask
            du = alpha * lap(u) + B + uuv - (A + 1.0) * u + forcing
            dv = alpha * lap(v) + A * u - uuv
            return jnp.concatenate([du.ravel(), dv.ravel()])

        return f

    def laplacian(self) -> sp.csr_matrix:
        """The periodic 5-point stencil (without the factor) on one species, N^2 x N^2."""
        N = self.N
        idx = np.arange(N * N).reshape(N, N)
        rows, cols, vals = [idx.ravel()], [idx.ravel()], [np.full(N * N, -4.0)]
        for axis in (0, 1):
            for s in (1, -1):
                rows.append(idx.ravel())
                cols.append(np.roll(idx, s, axis).ravel())
                vals.append(np.ones(N * N))
        L = sp.coo_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(N * N,) * 2
        )
        return L.tocsr()  # duplicates (N <= 2 only) are summed

    def sparse_jac(self, p) -> Callable:
        """Analytic Jacobian as a SciPy CSC matrix (used by the reference solver)."""
        N = self.N
        scale, A, _ = (float(q) for q in p)
        aL = (10.0 * scale / self.dx**2) * self.laplacian()

        def jac(t, y):
            u, v = y[: N * N], y[N * N :]
            return sp.bmat(
                [
                    [aL + sp.diags(2 * u * v - (A + 1.0)), sp.diags(u * u)],
                    [sp.diags(A - 2 * u * v), aL - sp.diags(u * u)],
                ],
                format="csc",
            )

        return jac

    def sparsity(self) -> sp.csr_matrix:
        """Jacobian pattern (0/1): the stencil on each species plus the u-v coupling of a cell."""
        L = (self.laplacian() != 0).astype(np.float64)
        eye = sp.identity(self.N * self.N)
        return (sp.bmat([[L, eye], [eye, L]]) != 0).astype(np.float64).tocsr()

    def folded_order(self) -> np.ndarray:
        """``perm`` with ``z = y[perm]`` of small bandwidth: grid rows j in the order 0, N-1, 1, N-2, ...,
        so that periodic neighbours in j are at most two rows apart, and u, v interleaved per cell."""
        N = self.N
        rows = [j for k in range((N + 1) // 2) for j in dict.fromkeys((k, N - 1 - k))]
        perm = [s * N * N + i * N + j for j in rows for i in range(N) for s in (0, 1)]
        return np.asarray(perm)


def bandwidth(pattern: sp.spmatrix) -> tuple[int, int]:
    c = pattern.tocoo()
    return int(max(0, np.max(c.row - c.col))), int(max(0, np.max(c.col - c.row)))


# ---------------------------------------------------------------------------
# Reference solutions (SciPy Radau, analytic sparse Jacobian, restarted at t = 1.1), cached.
# ---------------------------------------------------------------------------


def tight_solve(
    N: int, p, method: str = "Radau", rtol: float = REF_TOL["rtol"], atol: float = REF_TOL["atol"]
) -> np.ndarray:
    from scipy.integrate import solve_ivp

    pb = Bruss(N)
    f = jax.jit(pb.rhs())
    pj = jnp.asarray(p, jnp.float64)
    fn = lambda t, y: np.asarray(f(t, y, pj))  # noqa: E731
    y = pb.y0()
    if method == "CVODE":
        from sksundae.cvode import CVODE

        def rhsfn(t, y, yp):
            yp[:] = fn(t, y)

        for a, b in ((T0, T_ON), (T_ON, T1)):
            s = CVODE(
                rhsfn, rtol=rtol, atol=atol, linsolver="sparse", sparsity=pb.sparsity(), max_num_steps=10**7
            )
            y = np.asarray(s.solve(np.array([a, 0.5 * (a + b), b]), y).y[-1])
        return y
    jac = pb.sparse_jac(p)
    for a, b in ((T0, T_ON), (T_ON, T1)):
        sol = solve_ivp(fn, (a, b), y, method=method, jac=jac, rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference solve failed at N = {N}: {sol.message}")
        y = sol.y[:, -1]
    return y


def reference(N: int, p=PARAMS, rtol: float = REF_TOL["rtol"], atol: float = REF_TOL["atol"]) -> np.ndarray:
    """SciPy Radau at tight tolerances, cached to an .npz in /tmp."""
    key = hashlib.sha1(repr((N, tuple(float(q) for q in p), rtol, atol, "v1")).encode()).hexdigest()[:16]
    path = os.path.join(CACHE_DIR, f"diffode_brusselator_ref_{N}_{key}.npz")
    if os.path.exists(path):
        return np.load(path)["y1"]
    y1 = tight_solve(N, p, "Radau", rtol, atol)
    np.savez(path, y1=y1, N=N, p=np.asarray(p), rtol=rtol, atol=atol)
    return y1


# ---------------------------------------------------------------------------
# Candidates. ``build(pb)`` returns a Runner or raises Skip. A runner's ``call(rtol, atol)``
# returns something blockable; ``result(out)`` turns that into (y1 in natural order, stats).
# ---------------------------------------------------------------------------


class Skip(Exception):
    pass


@dataclasses.dataclass
class Runner:
    call: Callable[[float, float], Any]
    result: Callable[[Any], tuple[np.ndarray, dict[str, Any]]]
    compile_s: float
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def compile_aot(fn: Callable, *args) -> tuple[float, Any]:
    """Trace + lower + compile of ``jax.jit(fn)`` from cold caches: (seconds, executable)."""
    jax.clear_caches()
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return time.perf_counter() - t0, compiled


def _scalar(x) -> jax.Array:
    return jnp.asarray(x, jnp.float64)


def diffusion_preconditioner(pb: Bruss) -> Callable:
    """``make(op)`` for ``diffode.GMRES``: ``(shift I - scale a L)^-1`` per species, by FFT.

    The stiffness of the Brusselator is its diffusion ``a L`` (eigenvalues down
    to ``-8 a``, ``a = 10 / dx^2``; the reaction terms are O(10)). On the periodic
    grid ``L`` is diagonal in Fourier space (eigenvalues ``2 cos(2 pi k / N) +
    2 cos(2 pi l / N) - 4``), so this inverse costs two FFTs and never forms a
    matrix: the classic physics-based preconditioner for Newton-Krylov solvers
    of reaction-diffusion systems (Brown and Hindmarsh 1989; SUNDIALS' CVODE
    examples precondition with the stiff part alike). Built for PARAMS' alpha
    scale."""
    N = pb.N
    k = 2 * np.pi * np.arange(N) / N
    lam = jnp.asarray((10.0 * PARAMS[0] / pb.dx**2) * (2 * np.cos(k)[:, None] + 2 * np.cos(k)[None, :] - 4.0))

    def make(op):
        denom = (0.0 if op.shift is None else op.shift) - op.scale * lam

        def apply(v):
            w = jnp.fft.ifft2(jnp.fft.fft2(v.reshape(2, N, N)) / denom)
            return (w if jnp.iscomplexobj(v) or jnp.iscomplexobj(denom) else w.real).reshape(v.shape)

        return apply

    return make


# GMRES+LU: GMRES preconditioned by the LU factors the Jacobian-reuse policy keeps
# (with a pattern, SparseLU's). GMRES+FFT: matrix-free, J never formed, preconditioned
# by the diffusion inverse above.
LINEAR_SOLVERS = {
    "LU": lambda pb: diffode.LU(),
    "GMRES": lambda pb: diffode.GMRES(),
    "GMRES+LU": lambda pb: diffode.GMRES(preconditioner=diffode.LU()),
    "GMRES+FFT": lambda pb: diffode.GMRES(preconditioner=diffusion_preconditioner(pb)),
}


def make_diffode(solver_name: str, linsolver: str | None, sparse: bool) -> Callable[[Bruss], Runner]:
    def build(pb: Bruss) -> Runner:
        cls = getattr(diffode, solver_name)
        kwargs = {}
        if linsolver is not None:
            try:
                solver = cls(linear_solver=LINEAR_SOLVERS[linsolver](pb))
            except TypeError as e:
                raise Skip(f"{solver_name}(linear_solver={linsolver}()) raises TypeError: {e}")
        else:
            solver = cls()
        if sparse:
            if "jac_sparsity" not in inspect.signature(diffode.solve).parameters:
                raise Skip("diffode.solve takes no jac_sparsity= keyword (yet)")
            kwargs["jac_sparsity"] = pb.sparsity()  # a SciPy sparse 0/1 pattern
        f = pb.rhs()
        ts = jnp.asarray([T0, T1])

        def solve(y0, p, rtol, atol):
            sol = diffode.solve(
                f, y0, ts, p, solver=solver, rtol=rtol, atol=atol, max_steps=MAX_STEPS, throw=False, **kwargs
            )
            st = sol.stats
            stats = dict(
                status=sol.status,
                steps=st["num_accepted"],
                rejected=st["num_rejected"],
                fevals=st["num_fevals"],
            )
            for k, name in (
                ("jac", "num_jac_evals"),
                ("lu", "num_lu_decomps"),
                ("newton", "num_newton_iters"),
            ):
                if name in st:
                    stats[k] = st[name]
            return sol.ys[-1], stats

        y0, p = jnp.asarray(pb.y0()), jnp.asarray(PARAMS)
        c, exe = compile_aot(solve, y0, p, _scalar(RTOL), _scalar(ATOL))
        return Runner(lambda rtol, atol: exe(y0, p, _scalar(rtol), _scalar(atol)), jax_result, c)

    return build


def jax_result(out) -> tuple[np.ndarray, dict[str, Any]]:
    y1, stats = out
    return np.asarray(y1), {k: int(v) for k, v in stats.items()}


def build_diffrax(pb: Bruss) -> Runner:
    import diffrax

    term = diffrax.ODETerm(pb.rhs())

    def solve(y0, p, rtol, atol):
        sol = diffrax.diffeqsolve(
            term,
            diffrax.Kvaerno5(),
            T0,
            T1,
            None,
            y0,
            p,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=MAX_STEPS,
            throw=False,
        )
        status = jnp.where(sol.result == diffrax.RESULTS.successful, 0, 1)
        return sol.ys[-1], dict(
            status=status, steps=sol.stats["num_accepted_steps"], rejected=sol.stats["num_rejected_steps"]
        )

    y0, p = jnp.asarray(pb.y0()), jnp.asarray(PARAMS)
    c, exe = compile_aot(solve, y0, p, _scalar(RTOL), _scalar(ATOL))
    return Runner(lambda rtol, atol: exe(y0, p, _scalar(rtol), _scalar(atol)), jax_result, c)


def numpy_rhs(pb: Bruss, perm: np.ndarray | None = None, jacobian: bool = False):
    """The jitted JAX right-hand side (and optionally its dense Jacobian) as NumPy callables,
    in the ordering ``z = y[perm]``; returns (f, jac or None, compile seconds)."""
    f = pb.rhs()
    p = jnp.asarray(PARAMS)
    if perm is not None:
        inv = np.argsort(perm)
        f0 = f
        f = lambda t, z, p: f0(t, z[inv], p)[perm]  # noqa: E731
    z0 = jnp.asarray(pb.y0() if perm is None else pb.y0()[perm])
    c, fe = compile_aot(f, _scalar(0.0), z0, p)
    fn = lambda t, y: np.asarray(fe(_scalar(t), jnp.asarray(y), p))  # noqa: E731
    jn = None
    if jacobian:
        c2, je = compile_aot(jax.jacfwd(f, argnums=1), _scalar(0.0), z0, p)
        c += c2
        jn = lambda t, y: np.asarray(je(_scalar(t), jnp.asarray(y), p))  # noqa: E731
    fn(0.0, np.asarray(z0))
    return fn, jn, c


def make_scipy_bdf(mode: str) -> Callable[[Bruss], Runner]:
    def build(pb: Bruss) -> Runner:
        from scipy.integrate import solve_ivp

        fn, jn, c = numpy_rhs(pb, jacobian=(mode == "dense"))
        kw = dict(jac=jn) if mode == "dense" else dict(jac_sparsity=pb.sparsity())
        y0 = pb.y0()

        def call(rtol, atol):
            return solve_ivp(fn, (T0, T1), y0, method="BDF", rtol=rtol, atol=atol, **kw)

        def result(sol):
            return sol.y[:, -1], dict(
                status=0 if sol.success else 1,
                steps=len(sol.t) - 1,
                fevals=int(sol.nfev),
                jac=int(sol.njev),
                lu=int(sol.nlu),
            )

        info = dict(
            jacobian="jax.jacfwd, dense" if mode == "dense" else "SciPy grouped differences (jac_sparsity)"
        )
        return Runner(call, result, c, info)

    return build


def make_cvode(linsolver: str, folded: bool = False) -> Callable[[Bruss], Runner]:
    def build(pb: Bruss) -> Runner:
        from sksundae.cvode import CVODE

        perm = pb.folded_order() if folded else None
        fn, _, c = numpy_rhs(pb, perm)
        pattern = pb.sparsity()
        if perm is not None:
            pattern = pattern[perm][:, perm]
        opts: dict[str, Any] = dict(method="BDF", linsolver=linsolver, max_num_steps=MAX_STEPS)
        info: dict[str, Any] = dict(jacobian="CVODE difference quotients")
        if linsolver == "band":
            lb, ub = bandwidth(pattern)
            opts.update(lband=lb, uband=ub)
            info.update(lband=lb, uband=ub, ordering="folded, u/v interleaved" if folded else "natural")
        elif linsolver == "sparse":
            opts.update(sparsity=pattern.tocsc())
            info.update(
                jacobian="scikit-sundae's sparse difference quotients (sparsity=)", nnz=int(pattern.nnz)
            )

        def rhsfn(t, y, yp):
            yp[:] = fn(t, y)

        z0 = pb.y0() if perm is None else pb.y0()[perm]
        inv = None if perm is None else np.argsort(perm)

        def call(rtol, atol):
            return CVODE(rhsfn, rtol=rtol, atol=atol, **opts).solve(np.array([T0, T1]), z0)

        def result(sol):
            z1 = np.asarray(sol.y[-1])
            return (z1 if inv is None else z1[inv]), dict(
                status=0 if sol.success else 1, steps=len(sol.t) - 1, fevals=int(sol.nfev), jac=int(sol.njev)
            )

        return Runner(call, result, c, info)

    return build


# name -> (builder, growth exponent assumed for extrapolation before two sizes are measured)
DIFFODE_TABLE = [
    ("Rodas5P", None, False),
    ("Rodas5P", "GMRES", False),
    ("Rodas5P", None, True),
    ("Kvaerno5", "LU", False),
    ("Kvaerno5", "GMRES", False),
    ("Kvaerno5", "LU", True),
    ("Radau5", None, False),
    ("Radau5", "GMRES", False),
    ("Radau5", None, True),
    ("Kvaerno5", "GMRES+LU", True),
    ("Rodas5P", "GMRES+FFT", False),
    ("Kvaerno5", "GMRES+FFT", False),
    ("Radau5", "GMRES+FFT", False),
]


def diffode_name(solver: str, linsolver: str | None, sparse: bool) -> str:
    return "diffode " + solver + (f" {linsolver}" if linsolver else "") + (" +sparsity" if sparse else "")


CANDIDATES: dict[str, Callable[[Bruss], Runner]] = {
    **{diffode_name(*e): make_diffode(*e) for e in DIFFODE_TABLE},
    "diffrax Kvaerno5": build_diffrax,
    "scipy BDF sparse": make_scipy_bdf("sparse"),
    "scipy BDF dense jac": make_scipy_bdf("dense"),
    "CVODE dense": make_cvode("dense"),
    "CVODE band": make_cvode("band"),
    "CVODE band (folded)": make_cvode("band", folded=True),
    "CVODE sparse": make_cvode("sparse"),
}


# --quick: one candidate per library and linear-solver kind, none of the slow GMRES ones.
QUICK_CANDIDATES = (
    "diffode Rodas5P",
    "diffode Kvaerno5 LU",
    "diffode Radau5",
    "diffrax Kvaerno5",
    "scipy BDF sparse",
    "CVODE sparse",
)


# ---------------------------------------------------------------------------
# Measurement.
# ---------------------------------------------------------------------------


def blocked(fn: Callable, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def repeats_for(t: float) -> int:
    return 5 if t < 1.0 else 3 if t < 10.0 else 1


def interleaved_runs(
    calls: dict[str, Callable[[], Any]], first: dict[str, float]
) -> dict[str, dict[str, Any]]:
    """Run-time samples after the warm-up calls (seconds in ``first``), interleaved across candidates,
    order reversed every other round; ``number`` calls per sample for the fast ones (>= 0.2 s a sample)."""
    reps = {n: repeats_for(t) for n, t in first.items()}
    number = {n: max(1, min(1000, math.ceil(0.2 / max(t, 1e-6)))) for n, t in first.items()}
    samples: dict[str, list[float]] = {n: [] for n in calls}
    names = list(calls)
    for r in range(max(reps.values(), default=0)):
        for n in names if r % 2 == 0 else reversed(names):
            if r < reps[n]:
                samples[n].append(sum(blocked(calls[n]) for _ in range(number[n])) / number[n])
    return {n: dict(_timing.Timing(tuple(s), number[n]).as_dict()) for n, s in samples.items()}


def errors(y1: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    e = np.abs(np.asarray(y1, np.float64) - ref)
    return dict(max_abs_error=float(np.max(e)), max_rel_error=float(np.max(e) / np.max(np.abs(ref))))


def slope(ns, ts) -> float | None:
    if len(ns) < 2:
        return None
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def is_dense(name: str) -> bool:
    return not any(k in name for k in ("GMRES", "sparse", "folded"))


def predict(history: list[tuple[int, float]], N: int, dense: bool = False) -> float | None:
    """Run time at N extrapolated from the measured (N, seconds) of smaller sizes: the slope of the last
    two sizes, clamped to [2, 6] (at least DENSE_SLOPE for dense factorisations)."""
    if not history:
        return None
    s = DEFAULT_SLOPE if len(history) < 2 else slope(*zip(*history[-2:]))
    n0, t0 = history[-1]
    # Below N = 16 the run time is mostly per-step overhead, not factorisations: no dense floor there.
    s = min(max(s, DENSE_SLOPE if dense and n0 >= 16 else 2.0), 6.0)
    return t0 * (N / n0) ** s


def run_size(
    N: int, names: list[str], history: dict[str, list[tuple[int, float]]], cap: float, log
) -> tuple[dict[str, Any], dict[str, Runner]]:
    pb = Bruss(N)
    t0 = time.perf_counter()
    ref = reference(N)
    out: dict[str, Any] = dict(N=N, n=pb.n, reference_s=time.perf_counter() - t0, results={})
    res = out["results"]
    runners: dict[str, Runner] = {}
    for name in names:
        guess = predict(history.get(name, []), N, is_dense(name))
        if guess is not None and guess > cap:
            res[name] = dict(
                skipped=f"extrapolated run time {guess:.0f} s > cap {cap:.0f} s "
                f"(from N = {history[name][-1][0]}: {history[name][-1][1]:.2f} s)"
            )
            log(f"N={N} {name}: skipped ({res[name]['skipped']})")
            continue
        try:
            runners[name] = CANDIDATES[name](pb)
        except Skip as e:
            res[name] = dict(skipped=str(e))
            log(f"N={N} {name}: skipped ({e})")
            continue
        except Exception as e:  # recorded, not fatal (diffode's internals may be mid-refactor)
            res[name] = dict(failed=f"{type(e).__name__}: {str(e)[:300]}")
            log(f"N={N} {name}: failed ({res[name]['failed']})")
            continue
        res[name] = dict(compile_s=runners[name].compile_s, **runners[name].info)
        if guess is not None:
            res[name]["predicted_run_s"] = guess
    first: dict[str, float] = {}
    for name, r in list(runners.items()):
        t = time.perf_counter()
        try:
            raw = jax.block_until_ready(r.call(RTOL, ATOL))
        except Exception as e:
            res[name] = dict(failed=f"{type(e).__name__}: {str(e)[:300]}")
            del runners[name]
            continue
        first[name] = time.perf_counter() - t
        y1, stats = r.result(raw)
        res[name].update(stats=stats, warmup_s=first[name], **errors(y1, ref))
        log(
            f"N={N} {name}: warm-up {first[name]:.3f} s, compile {r.compile_s:.2f} s, "
            f"err {res[name]['max_abs_error']:.1e}, {stats}"
        )
    slow = {n: t for n, t in first.items() if t > cap}
    for n, t in slow.items():  # one run over the cap is all it gets
        res[n]["run_s"] = _timing.Timing((t,)).as_dict()
        res[n]["note"] = "warm-up run over the cap: that run is the only sample"
    calls = {n: (lambda r=r: r.call(RTOL, ATOL)) for n, r in runners.items() if n not in slow}
    for n, timing in interleaved_runs(calls, {n: first[n] for n in calls}).items():
        res[n]["run_s"] = timing
    for n in runners:
        history.setdefault(n, []).append((N, res[n]["run_s"]["median"]))
    return out, runners


def work_precision(N: int, runners: dict[str, Runner], cap: float, rtols, log) -> dict[str, Any]:
    ref = reference(N)
    out: dict[str, Any] = dict(N=N, rtols=list(rtols), atol_over_rtol=ATOL / RTOL, results={})
    for name, r in runners.items():
        rows = []
        last = None
        for rtol in rtols:
            if last is not None and last * 2.5 > cap:
                rows.append(dict(rtol=rtol, skipped=f"extrapolated > cap {cap:.0f} s"))
                continue
            atol = rtol * ATOL / RTOL
            t = time.perf_counter()
            raw = jax.block_until_ready(r.call(rtol, atol))
            t_first = time.perf_counter() - t
            y1, stats = r.result(raw)
            ts = (
                [blocked(r.call, rtol, atol) for _ in range(3 if t_first < 2 else 1)]
                if t_first <= cap
                else [t_first]
            )
            last = _timing.median(ts)
            rows.append(dict(rtol=rtol, atol=atol, run_s=last, stats=stats, **errors(y1, ref)))
            log(f"plot N={N} {name} rtol={rtol:g}: {last:.3f} s, err {rows[-1]['max_abs_error']:.1e}")
        out["results"][name] = rows
    return out


def plot(wp: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    colours = plt.cm.tab20(np.linspace(0, 1, 20))
    for k, (name, rows) in enumerate(wp["results"].items()):
        pts = [(r["max_abs_error"], r["run_s"]) for r in rows if "run_s" in r and r["stats"]["status"] == 0]
        if not pts:
            continue
        e, t = zip(*pts)
        style = "-o" if name.startswith("diffode") else "--s" if name.startswith("diffrax") else ":^"
        ax.loglog(e, t, style, label=name, ms=4, color=colours[k % 20])
    ax.set_xlabel("max abs error at t = 11.5 (vs SciPy Radau, rtol 1e-10)")
    ax.set_ylabel("run time (s, median)")
    ax.set_title(
        f"2-D Brusselator, N = {wp['N']} ({2 * wp['N'] ** 2} states), rtol 1e-4 ... 1e-8, atol = rtol/100",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------
# Gradients.
# ---------------------------------------------------------------------------


def fd_gradient(N: int, h_rel: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Central differences of sum(u(t1)) with steps h, 2h, 4h (h = h_rel |p_i|), Richardson-extrapolated
    from h and 2h; the second array is |R(h, 2h) - R(2h, 4h)|, an estimate of the reference's own error."""
    p0 = np.asarray(PARAMS)
    n2 = N * N

    def loss(p):
        return float(np.sum(reference(N, tuple(p))[:n2]))

    g, spread = np.zeros(3), np.zeros(3)
    for i in range(3):
        h = h_rel * abs(p0[i])
        d = {}
        for k in (1, 2, 4):
            e = np.zeros(3)
            e[i] = k * h
            d[k] = (loss(p0 + e) - loss(p0 - e)) / (2 * k * h)
        g[i] = (4 * d[1] - d[2]) / 3
        spread[i] = abs(g[i] - (4 * d[2] - d[4]) / 3)
    return g, spread


def gradient_candidates(pb: Bruss) -> dict[str, Callable]:
    import diffrax

    f = pb.rhs()
    y0 = jnp.asarray(pb.y0())
    ts = jnp.asarray([T0, T1])
    n2 = pb.N * pb.N

    def diffode_loss(sensitivity, **kw):
        def loss(p):
            sol = diffode.solve(
                f,
                y0,
                ts,
                p,
                solver=diffode.Rodas5P(),
                rtol=RTOL,
                atol=ATOL,
                max_steps=MAX_STEPS,
                sensitivity=sensitivity,
                **kw,
            )
            return jnp.sum(sol.ys[-1][:n2])

        return loss

    def diffrax_loss(p):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(f),
            diffrax.Kvaerno5(),
            T0,
            T1,
            None,
            y0,
            p,
            stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
            max_steps=MAX_STEPS,
            adjoint=diffrax.RecursiveCheckpointAdjoint(),
        )
        return jnp.sum(sol.ys[-1][:n2])

    return {
        "diffode Rodas5P Auto": jax.grad(diffode_loss(diffode.Auto())),
        "diffode Rodas5P Direct": jax.grad(diffode_loss(diffode.Direct())),
        "diffode Rodas5P Direct +sparsity": jax.grad(
            diffode_loss(diffode.Direct(), jac_sparsity=pb.sparsity())
        ),
        "diffode Rodas5P InterpolatingAdjoint": jax.grad(diffode_loss(diffode.InterpolatingAdjoint())),
        "diffode Rodas5P ForwardSensitivity": jax.grad(diffode_loss(diffode.ForwardSensitivity())),
        "diffrax Kvaerno5 RecursiveCheckpointAdjoint": jax.grad(diffrax_loss),
    }


def run_gradients(sizes, cap: float, names: list[str] | None, log) -> dict[str, Any]:
    out: dict[str, Any] = dict(
        loss="sum(u(11.5))",
        params=["alpha scale", "A", "B"],
        values=list(PARAMS),
        fd=(
            "central differences of SciPy Radau (rtol 1e-10, atol 1e-12), steps 0.1% and 0.2% "
            "of each parameter, Richardson-extrapolated; spread = difference to the same "
            "with steps 0.2% and 0.4%"
        ),
        sizes={},
    )
    history: dict[str, list[tuple[int, float]]] = {}
    for N in sizes:
        pb = Bruss(N)
        t0 = time.perf_counter()
        g_ref, spread = fd_gradient(N)
        log(f"grad N={N}: FD reference {g_ref} (spread {spread}) in {time.perf_counter() - t0:.1f} s")
        res: dict[str, Any] = {}
        p = jnp.asarray(PARAMS)
        for name, g in gradient_candidates(pb).items():
            if names and not any(s in name for s in names):
                continue
            guess = predict(history.get(name, []), N)
            if guess is not None and guess > cap:
                res[name] = dict(skipped=f"extrapolated run time {guess:.0f} s > cap {cap:.0f} s")
                log(f"grad N={N} {name}: skipped ({res[name]['skipped']})")
                continue
            try:
                c, exe = compile_aot(g, p)
                t_first = blocked(exe, p)
            except Exception as e:  # a method that does not apply is recorded, not fatal
                res[name] = dict(failed=f"{type(e).__name__}: {str(e)[:300]}")
                log(f"grad N={N} {name}: failed {res[name]['failed']}")
                continue
            n_rep = (3 if t_first < 2 else 1) if t_first <= cap else 0
            ts = [blocked(exe, p) for _ in range(n_rep)] or [t_first]
            gv = np.asarray(exe(p))
            rel = np.abs(gv - g_ref) / np.abs(g_ref)
            res[name] = dict(
                compile_s=c,
                run_s=_timing.Timing(tuple(ts)).as_dict(),
                grad=gv.tolist(),
                rel_error=rel.tolist(),
                max_rel_error=float(np.max(rel)),
            )
            history.setdefault(name, []).append((N, _timing.median(ts)))
            log(
                f"grad N={N} {name}: run {_timing.median(ts):.3f} s, compile {c:.2f} s, max rel err {np.max(rel):.1e}"
            )
        out["sizes"][str(N)] = dict(fd_gradient=g_ref.tolist(), fd_spread=spread.tolist(), results=res)
    return out


def tight_gradient(N: int, log) -> tuple[np.ndarray, float]:
    """A reference gradient from two independent tight solves: ``Direct`` through ``Radau5``
    at rtol 1e-11 (the discrete derivative of a very accurate solution) and
    ``InterpolatingAdjoint`` (the continuous adjoint equations, solved backwards) through
    ``Rodas5P`` at rtol 1e-10; returns the first and their largest relative difference."""
    pb = Bruss(N)
    f, y0, ts, n2 = pb.rhs(), jnp.asarray(pb.y0()), jnp.asarray([T0, T1]), N * N
    p = jnp.asarray(PARAMS)

    def grad(solver, method, rtol):
        def loss(q):
            sol = diffode.solve(
                f, y0, ts, q, solver=solver, rtol=rtol, atol=rtol / 100, max_steps=200_000, sensitivity=method
            )
            return jnp.sum(sol.ys[-1][:n2])

        return np.asarray(jax.jit(jax.grad(loss))(p))

    t0 = time.perf_counter()
    a = grad(diffode.Radau5(), diffode.Direct(memory_budget=None), 1e-11)
    b = grad(diffode.Rodas5P(), diffode.InterpolatingAdjoint(memory_budget=None), 1e-10)
    spread = float(np.max(np.abs(a - b) / np.abs(a)))
    log(
        f"grad accuracy N={N}: reference {a} (Radau5 Direct 1e-11 vs Rodas5P InterpolatingAdjoint 1e-10: "
        f"{spread:.1e}) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return a, spread


def run_gradient_accuracy(N: int, rtols, log) -> dict[str, Any]:
    """Gradient error against :func:`tight_gradient` and run time, per tolerance (atol = rtol/100):
    diffode ``Auto`` with ``Rodas5P`` (with and without ``jac_sparsity``) and with ``Radau5``,
    and diffrax ``Kvaerno5`` + ``RecursiveCheckpointAdjoint``."""
    import diffrax

    ref, spread = tight_gradient(N, log)
    pb = Bruss(N)
    f, y0, ts, n2 = pb.rhs(), jnp.asarray(pb.y0()), jnp.asarray([T0, T1]), N * N
    p = jnp.asarray(PARAMS)

    def diffode_grad(solver, rtol, **kw):
        def loss(q):
            sol = diffode.solve(
                f, y0, ts, q, solver=solver, rtol=rtol, atol=rtol / 100, max_steps=MAX_STEPS, **kw
            )
            return jnp.sum(sol.ys[-1][:n2])

        return jax.grad(loss)

    def diffrax_grad(rtol):
        def loss(q):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(f),
                diffrax.Kvaerno5(),
                T0,
                T1,
                None,
                y0,
                q,
                stepsize_controller=diffrax.PIDController(rtol=rtol, atol=rtol / 100),
                max_steps=MAX_STEPS,
                adjoint=diffrax.RecursiveCheckpointAdjoint(),
            )
            return jnp.sum(sol.ys[-1][:n2])

        return jax.grad(loss)

    cands = {
        "diffode Rodas5P Auto": lambda r: diffode_grad(diffode.Rodas5P(), r),
        "diffode Rodas5P Auto +sparsity": lambda r: diffode_grad(
            diffode.Rodas5P(), r, jac_sparsity=pb.sparsity()
        ),
        "diffode Radau5 Auto": lambda r: diffode_grad(diffode.Radau5(), r),
        "diffrax Kvaerno5 RecursiveCheckpointAdjoint": diffrax_grad,
    }
    res: dict[str, list[dict[str, Any]]] = {}
    for name, make in cands.items():
        rows = res.setdefault(name, [])
        for rtol in rtols:
            if name.startswith("diffrax") and rtol < 1e-6:
                continue  # 10 s at 1e-6 (N = 8); tighter ones grow past the script's budget
            c, exe = compile_aot(make(rtol), p)
            t_first = blocked(exe, p)
            times = [blocked(exe, p) for _ in range(repeats_for(t_first))] or [t_first]
            g = np.asarray(exe(p))
            err = float(np.max(np.abs(g - ref) / np.abs(ref)))
            rows.append(dict(rtol=rtol, run_s=_timing.median(times), compile_s=c, max_rel_error=err))
            log(
                f"grad accuracy N={N} {name} rtol {rtol:g}: run {_timing.median(times):.3f} s, error {err:.1e}"
            )
    return dict(
        N=N,
        reference=ref.tolist(),
        reference_spread=spread,
        reference_how="Radau5 + Direct at rtol 1e-11 (atol 1e-13); spread = max relative difference "
        "to Rodas5P + InterpolatingAdjoint at rtol 1e-10",
        results=res,
    )


def run_gradient_agreement(N: int, log, rtol: float = 1e-10) -> dict[str, Any]:
    """Every diffode method's gradient at a tight tolerance (``Rodas5P`` with
    ``jac_sparsity``, atol = rtol/100): their largest pairwise relative difference, and
    each one's difference to the finite-difference reference of :func:`fd_gradient`."""
    pb = Bruss(N)
    f, y0, ts, n2 = pb.rhs(), jnp.asarray(pb.y0()), jnp.asarray([T0, T1]), N * N
    p = jnp.asarray(PARAMS)
    fd, spread = fd_gradient(N)
    methods = {
        "Auto": diffode.Auto(),
        "Direct": diffode.Direct(),
        "ForwardSensitivity": diffode.ForwardSensitivity(),
        "InterpolatingAdjoint": diffode.InterpolatingAdjoint(),
    }
    grads, res = {}, {}
    for name, m in methods.items():

        def loss(q, m=m):
            sol = diffode.solve(
                f,
                y0,
                ts,
                q,
                solver=diffode.Rodas5P(),
                rtol=rtol,
                atol=rtol / 100,
                max_steps=200_000,
                sensitivity=m,
                jac_sparsity=pb.sparsity(),
            )
            return jnp.sum(sol.ys[-1][:n2])

        t0 = time.perf_counter()
        g = np.asarray(jax.block_until_ready(jax.jit(jax.grad(loss))(p)))
        grads[name] = g
        res[name] = dict(
            grad=g.tolist(),
            seconds=time.perf_counter() - t0,
            vs_fd=float(np.max(np.abs(g - fd) / np.abs(fd))),
        )
        log(
            f"grad agreement N={N} {name}: {g} in {res[name]['seconds']:.1f} s (compile included), "
            f"vs FD {res[name]['vs_fd']:.1e}"
        )
    pair = max(float(np.max(np.abs(a - b) / np.abs(b))) for a in grads.values() for b in grads.values())
    log(f"grad agreement N={N}: largest pairwise relative difference {pair:.1e}; FD spread {spread}")
    return dict(N=N, rtol=rtol, fd=fd.tolist(), fd_spread=spread.tolist(), pairwise=pair, results=res)


def run_gradient_memory(N: int, max_steps_list, log) -> dict[str, Any]:
    """Planned temporaries (``memory_analysis().temp_size_in_bytes``) of the compiled
    ``jax.grad`` of :func:`gradient_candidates`' loss for several ``max_steps``: diffode
    ``Rodas5P`` with ``Auto``, ``Direct`` and ``InterpolatingAdjoint`` (default budgets),
    and diffrax ``Kvaerno5`` with ``RecursiveCheckpointAdjoint``. Compiled, not run."""
    import diffrax

    pb = Bruss(N)
    f, y0, ts, n2 = pb.rhs(), jnp.asarray(pb.y0()), jnp.asarray([T0, T1]), N * N
    p = jnp.asarray(PARAMS)

    def diffode_loss(method, max_steps):
        def loss(q):
            sol = diffode.solve(
                f,
                y0,
                ts,
                q,
                solver=diffode.Rodas5P(),
                rtol=RTOL,
                atol=ATOL,
                max_steps=max_steps,
                sensitivity=method,
            )
            return jnp.sum(sol.ys[-1][:n2])

        return loss

    def diffrax_loss(max_steps):
        def loss(q):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(f),
                diffrax.Kvaerno5(),
                T0,
                T1,
                None,
                y0,
                q,
                stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
                max_steps=max_steps,
                adjoint=diffrax.RecursiveCheckpointAdjoint(),
            )
            return jnp.sum(sol.ys[-1][:n2])

        return loss

    cands = {
        "diffode Rodas5P Auto": lambda m: diffode_loss(diffode.Auto(), m),
        "diffode Rodas5P Direct": lambda m: diffode_loss(diffode.Direct(), m),
        "diffode Rodas5P InterpolatingAdjoint": lambda m: diffode_loss(diffode.InterpolatingAdjoint(), m),
        "diffrax Kvaerno5 RecursiveCheckpointAdjoint": diffrax_loss,
    }
    res: dict[str, dict[str, float]] = {}
    for name, make in cands.items():
        for m in max_steps_list:
            compiled = jax.jit(jax.grad(make(m))).lower(p).compile()
            mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
            res.setdefault(name, {})[str(m)] = mib
            log(f"grad memory N={N} {name} max_steps={m}: {mib:.1f} MiB")
    return dict(N=N, unit="MiB of planned temporaries", results=res)


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


def growth(sizes_out: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    pts: dict[str, list[tuple[int, float]]] = {}
    for so in sizes_out:
        for name, r in so["results"].items():
            if "run_s" in r and so["N"] >= 8:
                pts.setdefault(name, []).append((so["N"], r["run_s"]["median"]))
    return {
        name: dict(sizes=[n for n, _ in p], exponent=slope(*zip(*p)) if len(p) >= 2 else None)
        for name, p in pts.items()
    }


def report(out: dict[str, Any]) -> str:
    lines = [f"# 2-D Brusselator, rtol {RTOL:g}, atol {ATOL:g}; threads: {THREAD_ENV}"]
    sizes = [so["N"] for so in out["sizes"]]
    names = list(dict.fromkeys(n for so in out["sizes"] for n in so["results"]))
    lines.append(
        "| candidate | "
        + " | ".join(f"N={N}: run s (compile s) steps/rej err" for N in sizes)
        + " | exponent |"
    )
    lines.append("|---" * (len(sizes) + 2) + "|")
    for name in names:
        cells = []
        for so in out["sizes"]:
            r = so["results"].get(name)
            if r is None:
                cells.append("")
            elif "skipped" in r or "failed" in r:
                cells.append("skipped" if "skipped" in r else "failed")
            else:
                st = r["stats"]
                bad = "" if st["status"] == 0 else f" FAILED({st['status']})"
                cells.append(
                    f"{r['run_s']['median']:.3g} ({r['compile_s']:.2f}) {st['steps']}/"
                    f"{st.get('rejected', '-')} {r['max_abs_error']:.1e}{bad}"
                )
        ex = out["growth"].get(name, {}).get("exponent")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'' if ex is None else f'{ex:.2f}'} |")
    skipped = {
        (so["N"], n): r.get("skipped") or "failed: " + r["failed"]
        for so in out["sizes"]
        for n, r in so["results"].items()
        if "skipped" in r or "failed" in r
    }
    for (N, n), why in skipped.items():
        lines.append(f"# skipped N={N} {n}: {why}")
    if "gradients" in out:
        for N, g in out["gradients"]["sizes"].items():
            lines.append(
                f"# gradients N={N}: FD {np.array(g['fd_gradient'])} (spread {np.array(g['fd_spread'])})"
            )
            for name, r in g["results"].items():
                if "run_s" in r:
                    lines.append(
                        f"  {name}: run {r['run_s']['median']:.3f} s, compile {r['compile_s']:.2f} s, "
                        f"max rel err {r['max_rel_error']:.1e}"
                    )
                else:
                    lines.append(f"  {name}: {r}")
    if "gradient_memory" in out:
        gm = out["gradient_memory"]
        lines.append(
            f"# gradient memory N={gm['N']} ({gm['unit']}) at max_steps "
            + ", ".join(next(iter(gm["results"].values())).keys())
        )
        for name, row in gm["results"].items():
            lines.append(f"  {name}: " + ", ".join(f"{v:.1f}" for v in row.values()))
    if "gradient_accuracy" in out:
        ga = out["gradient_accuracy"]
        lines.append(
            f"# gradient accuracy N={ga['N']}: reference {np.array(ga['reference'])} "
            f"(two-method spread {ga['reference_spread']:.1e})"
        )
        for name, rows in ga["results"].items():
            lines.append(
                f"  {name}: "
                + "; ".join(f"rtol {r['rtol']:g}: {r['run_s']:.3f} s, {r['max_rel_error']:.1e}" for r in rows)
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.brusselator", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--sizes", help="comma-separated N (default 4,8,16,32)")
    ap.add_argument(
        "--solvers", help="comma-separated candidate names (default: all): " + ", ".join(CANDIDATES)
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="N = 4, 8 only, the candidates in QUICK_CANDIDATES, no reference self-check "
        "(plot at N = 8, gradients at N = 4, 8)",
    )
    ap.add_argument("--cap", type=float, default=120.0, help="skip a run extrapolated to take longer (s)")
    ap.add_argument("--out", metavar="PATH", help="write the results as JSON to PATH")
    ap.add_argument("--results", action="store_true", help="write the report into its section of RESULTS.md")
    ap.add_argument(
        "--plot",
        nargs="?",
        const="benchmarks/brusselator.png",
        metavar="PATH",
        help="work-precision plot at N = 16 (8 with --quick), saved to PATH",
    )
    ap.add_argument(
        "--grad", action="store_true", help="gradient part at N = 4, 8 and 16 (4, 8 with --quick)"
    )
    ap.add_argument("--grad-only", action="store_true", help="only the gradient part")
    ap.add_argument(
        "--grad-accuracy",
        type=int,
        metavar="N",
        help="gradient error against a tight two-method reference at rtol 1e-6, 1e-7, 1e-8, on N x N",
    )
    ap.add_argument(
        "--grad-tight",
        type=int,
        metavar="N",
        help="every diffode method's gradient at rtol 1e-10 on N x N: agreement with each other and FD",
    )
    ap.add_argument(
        "--grad-memory",
        type=int,
        metavar="N",
        help="compiled memory of the gradients at max_steps 1e3, 1e4, 1e5, on N x N",
    )
    ap.add_argument(
        "--grad-methods",
        help="comma-separated substrings of the gradient candidates' names "
        "(default: all); --sizes picks their N (those <= 16)",
    )
    a = ap.parse_args(argv)

    sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else list(SIZES_QUICK if a.quick else SIZES_FULL)
    names = (
        [s.strip() for s in a.solvers.split(",")]
        if a.solvers
        else list(QUICK_CANDIDATES if a.quick else CANDIDATES)
    )
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        ap.error(f"unknown candidates {unknown}; choose from {list(CANDIDATES)}")
    plot_N = 8 if a.quick else 16
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", file=sys.stderr, flush=True)

    # Sanity checks of the problem code: the analytic sparse Jacobian (used by the reference) equals
    # jax.jacfwd, and the sparsity pattern covers it.
    pb = Bruss(5)
    yt = np.random.default_rng(0).uniform(0.5, 2.0, pb.n)
    J = np.asarray(jax.jacfwd(pb.rhs(), argnums=1)(2.0, jnp.asarray(yt), jnp.asarray(PARAMS)))
    assert np.allclose(pb.sparse_jac(PARAMS)(2.0, yt).toarray(), J, rtol=1e-12, atol=1e-9)
    assert np.all((pb.sparsity().toarray() != 0) >= (J != 0))

    out: dict[str, Any] = dict(
        environment=environment(),
        thread_env=THREAD_ENV,
        problem=dict(
            form="SciML prob_ode_brusselator_2d (periodic, grid includes 0 and 1, dx = 1/(N-1), alpha = 10/dx^2)",
            params=dict(alpha_scale=PARAMS[0], A=PARAMS[1], B=PARAMS[2]),
            t=[T0, T1],
            rtol=RTOL,
            atol=ATOL,
        ),
        reference=dict(solver="scipy Radau, analytic sparse Jacobian, restarted at t = 1.1", **REF_TOL),
        cap_s=a.cap,
        max_steps=MAX_STEPS,
        sizes=[],
    )
    history: dict[str, list[tuple[int, float]]] = {}
    keep: dict[str, Runner] = {}
    for N in (
        [] if a.grad_only or ((a.grad_accuracy or a.grad_memory or a.grad_tight) and not a.sizes) else sizes
    ):
        so, runners = run_size(N, names, history, a.cap, log)
        # The reference against the same solver at 100x tighter tolerances (N <= 16; minutes at N = 32).
        so["reference_check"] = "not run at N > 16 (time)" if N > 16 else "not run (--quick)"
        if N <= 16 and not a.quick:
            t0 = time.perf_counter()
            other = reference(N, PARAMS, 1e-12, 1e-14)
            so["reference_check"] = dict(
                against="scipy Radau, rtol 1e-12, atol 1e-14",
                seconds=time.perf_counter() - t0,
                **errors(other, reference(N)),
            )
        log(f"N={N} reference check: {so['reference_check']}")
        out["sizes"].append(so)
        if N == plot_N:
            keep = runners
        else:
            del runners
    out["growth"] = growth(out["sizes"])
    if a.plot and not a.grad_only:
        if not keep:
            so, keep = run_size(plot_N, names, {}, a.cap, log)
        rtols = (1e-4, 1e-6, 1e-8) if a.quick else PLOT_RTOLS
        out["work_precision"] = work_precision(plot_N, keep, a.cap, rtols, log)
        plot(out["work_precision"], a.plot)
        log(f"wrote {a.plot}")
    keep = {}
    if a.grad or a.grad_only:
        grad_sizes = [N for N in sizes if N <= 16] if a.sizes else [4, 8] if a.quick else [4, 8, 16]
        grad_names = [s.strip() for s in a.grad_methods.split(",")] if a.grad_methods else None
        out["gradients"] = run_gradients(grad_sizes, a.cap, grad_names, log)
    if a.grad_tight:
        out["gradient_agreement"] = run_gradient_agreement(a.grad_tight, log)
    if a.grad_memory:
        out["gradient_memory"] = run_gradient_memory(a.grad_memory, (10**3, 10**4, 10**5), log)
    if a.grad_accuracy:
        out["gradient_accuracy"] = run_gradient_accuracy(a.grad_accuracy, (1e-6, 1e-7, 1e-8), log)
    out["wall_s"] = time.perf_counter() - t_start
    text = report(out)
    print(text)
    if a.results:
        _timing.write_section("brusselator", text)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=1)
        log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
