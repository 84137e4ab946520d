"""The adjoint-method benchmark: every diffode sensitivity method and its peers, on the
problems users bring, in one generated table.

Run from the repository root::

    python -m benchmarks.adjoints [--problems ...] [--methods ...] [--quick] [--out DIR]

It writes into ``--out`` (default ``benchmarks/``) its section of ``RESULTS.md`` (the tables;
the other benchmarks write theirs with ``--results``),
``adjoints.csv`` (one row per case and method) and the plots ``adjoints_run.png``
(run time per method on each problem) and ``adjoints_brusselator.png`` (the scaling
study: run time against the number of states). ``--quick`` uses tiny sizes, one
sample of each measurement and no evaluation counts (a smoke run, which a test runs). A failing case, or a
gradient with NaN, is a table entry, never a crash. A line per case goes to stderr.

The model of Ma, Dixit, Innes, Guo and Rackauckas, "A Comparison of Automatic
Differentiation and Continuous Sensitivity Analysis for Derivatives of Differential
Equation Solutions" (arXiv 1812.01892): the gradient of a loss of the saved states
with respect to the parameters.

Problems (from :mod:`diffode.problems`, and the Brusselator and neural field of the
other benchmarks): Lotka-Volterra (2 states, 4 parameters), a PK/PD model (5 states,
11 parameters), POLLU (20 states, 25 log rate constants, stiff), the 2-D Brusselator
on an N x N grid (2 N^2 states, stiff) with 3 parameters and with the feed rate a field
(N^2 + 2 parameters: states and parameters grow together), and an MLP neural ODE over
a batch (thousands of parameters). From N = 16 (``SPARSE_FROM_N``) diffode's Brusselator
solves pass ``jac_sparsity`` (the stencil pattern), as a user would; diffrax has no
sparse Jacobians and solves them dense.

Metrics per case and method: compile time (cold first call, ``jax.clear_caches()``
first) and run time (median per call, interleaved, ``jax.block_until_ready``), the
compiled program's memory (``memory_analysis``: temporaries, arguments and outputs),
the evaluations of ``f`` in a plain solve and in one gradient call (counted by ``f``
itself, through a host callback, in separate calls that are not timed; a vmapped batch
of evaluations counts once), and the gradient's error relative to a
reference: the forward sensitivity equations solved by SciPy's Radau at rtol 1e-12
(independent of diffode's solvers) where the augmented system has at most
``SCIPY_REFERENCE_MAX`` states, else diffode's ``Radau5`` with
``ForwardSensitivity`` at rtol 1e-11 (past 50,000 sensitivities or 1024 states ``Rodas5P`` with ``Direct``,
the neural ODE ``Tsit5`` with ``Direct``, both at rtol 1e-10).

Peers, in the same run when installed (``pip install -e ".[bench]"``): diffrax
(``RecursiveCheckpointAdjoint``, ``BacksolveAdjoint``, ``ForwardMode``),
``jax.experimental.ode.odeint``, torchdiffeq (``odeint``, ``odeint_adjoint``) and
torchode (``AutoDiffAdjoint``), the last three on the non-stiff problems only (they have
no stiff solver). A peer that is not installed is a "failed: ModuleNotFoundError" entry.
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)  # the benchmark runs in float64

import argparse  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import diffode  # noqa: E402
from diffode import problems  # noqa: E402

from . import _timing  # noqa: E402

#: A candidate whose gradient call takes longer than this (s) is timed by one more call only
#: (and its compile time by one cold call).
SLOW_CALL_S = 2.0
#: Evaluations of f are counted (one more solve and gradient) when a call takes less (s).
COUNT_MAX_CALL_S = 10.0
#: A candidate is skipped where its run time, extrapolated from the problem's previous
#: (smaller) size as (states ratio)^1.5, exceeds this (s): the full run stays within an hour.
CAP_S = 30.0
#: The evaluations of ``f`` so far: incremented by the counting right-hand sides.
FEVALS = [0]
#: The largest augmented system (states x (parameters + 1)) whose reference SciPy solves.
SCIPY_REFERENCE_MAX = 600
REFERENCE_PEER = "diffrax RecursiveCheckpointAdjoint"


@dataclasses.dataclass(frozen=True)
class Case:
    """One gradient problem: ``loss(solve(f, y0, ts, params).ys)`` differentiated in ``params``."""

    problem: str
    label: str
    f: Callable
    y0: Any
    ts: Any
    params: Any
    stiff: bool
    rtol: float
    atol: float
    loss: Callable = lambda ys: jnp.sum(ys**2) / ys.size  # noqa: E731
    tstops: tuple = ()
    batched: bool = False  # y0 has a leading batch axis (vmapped solves, shared params)
    #: Extra keywords of diffode's solves (the Brusselator's ``jac_sparsity``: coloured
    #: Jacobians and ``SparseLU``, as a user of a PDE discretisation would write it).
    diffode_kw: tuple = ()

    @property
    def n(self) -> int:
        return int(np.prod(np.shape(self.y0)[1:] if self.batched else np.shape(self.y0)))

    @property
    def p(self) -> int:
        return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(self.params))


# ---------------------------------------------------------------------------
# The problems.
# ---------------------------------------------------------------------------


def lv_case(quick: bool) -> list[Case]:
    pb = problems.lotka_volterra()
    return [Case("lotka_volterra", "Lotka-Volterra", pb.f, pb.y0, pb.ts(100), pb.args, False, 1e-6, 1e-6)]


def pkpd_case(quick: bool) -> list[Case]:
    pb = problems.pkpd()
    return [Case("pkpd", "PK/PD", pb.f, pb.y0, pb.ts(49), pb.args, False, 1e-6, 1e-8)]


def _pollu_log(t, y, logk):
    return problems.pollu_rhs(t, y, jnp.exp(logk))


def pollu_case(quick: bool) -> list[Case]:
    pb = problems.pollu()
    return [Case("pollu", "POLLU (log k)", _pollu_log, pb.y0, pb.ts(13), jnp.log(pb.args), True, 1e-6, 1e-10)]


#: The Brusselator grids (N x N) of a full run; ``--sizes`` replaces them.
BRUSSELATOR_N = [2, 4, 8, 16, 32]
#: From this N on, diffode's Brusselator solves take ``jac_sparsity`` (coloured Jacobians
#: and ``SparseLU``). Below it dense Jacobians are faster: ``Direct`` at N = 2 and 4 took
#: 9.3 and 59.5 ms a gradient with the pattern, against 6.5 and 28.1 ms dense.
SPARSE_FROM_N = 16


def brusselator_cases(quick: bool) -> list[Case]:
    from .brusselator import PARAMS, T1, T_ON, Bruss

    out = []
    for N in (2,) if quick else BRUSSELATOR_N:
        b = Bruss(N)
        ts = jnp.linspace(0.0, T1, 12)
        out.append(
            Case(
                "brusselator",
                f"Brusselator N={N}",
                b.rhs(),
                jnp.asarray(b.y0()),
                ts,
                jnp.asarray(PARAMS),
                True,
                1e-6,
                1e-8,
                tstops=(T_ON,),
                diffode_kw=(("jac_sparsity", b.sparsity()),) if N >= SPARSE_FROM_N else (),
            )
        )
    return out


def brusselator_field_cases(quick: bool) -> list[Case]:
    """The Brusselator with the feed rate ``B`` a field (one value per grid cell) besides
    the diffusion scale and ``A``: ``p = N^2 + 2`` grows with the grid, as in an inverse
    problem for a spatially varying coefficient."""
    from .brusselator import PARAMS, T1, T_ON, Bruss

    out = []
    for N in (2, 4) if quick else BRUSSELATOR_N:
        b = Bruss(N)
        params = (jnp.asarray(PARAMS[0]), jnp.asarray(PARAMS[1]), jnp.full((N, N), PARAMS[2]))
        out.append(
            Case(
                "brusselator_field",
                f"Brusselator N={N}, B field",
                b.rhs(),
                jnp.asarray(b.y0()),
                jnp.linspace(0.0, T1, 12),
                params,
                True,
                1e-6,
                1e-8,
                tstops=(T_ON,),
                diffode_kw=(("jac_sparsity", b.sparsity()),) if N >= SPARSE_FROM_N else (),
            )
        )
    return out


def neural_case(quick: bool) -> list[Case]:
    from . import neural_ode as nb

    width, batch = (16, 8) if quick else (64, 256)
    params, static = eqx.partition(nb.make_model(width, jnp.float64), eqx.is_inexact_array)
    ts, y0, target = nb.make_data(batch, jnp.float64)

    def f(t, y, p):
        return eqx.combine(p, static)(t, y, None)

    def loss(ys):
        return jnp.mean((ys - target) ** 2)

    loss.target = target  # for the torch peers
    return [
        Case(
            "neural",
            f"neural ODE (MLP {width}, batch {batch})",
            f,
            y0,
            ts,
            params,
            False,
            1e-3,
            1e-6,
            loss=loss,
            batched=True,
        )
    ]


PROBLEMS = {
    "lotka_volterra": lv_case,
    "pkpd": pkpd_case,
    "pollu": pollu_case,
    "brusselator": brusselator_cases,
    "brusselator_field": brusselator_field_cases,
    "neural": neural_case,
}


# ---------------------------------------------------------------------------
# The candidates: each builds grad(params) for a case, or says why it does not apply.
# ---------------------------------------------------------------------------


def _batched(case: Case, solve_one: Callable) -> Callable:
    """``loss(params)`` of a case from ``solve_one(params, y0) -> ys``."""
    if case.batched:
        return lambda p: case.loss(jax.vmap(lambda y: solve_one(p, y))(case.y0))
    return lambda p: case.loss(solve_one(p, case.y0))


def diffode_solve_one(case: Case, method=None) -> Callable:
    solver = diffode.Rodas5P() if case.stiff else diffode.Tsit5()
    f = case.f

    def solve_one(p, y0):
        return diffode.solve(
            f,
            y0,
            case.ts,
            p,
            solver=solver,
            rtol=case.rtol,
            atol=case.atol,
            sensitivity=method,
            tstops=list(case.tstops) or None,
            max_steps=20_000,
            **dict(case.diffode_kw),
        ).ys

    return solve_one


@dataclasses.dataclass(frozen=True)
class Loss:
    """A JAX candidate: ``loss(params)``, differentiated by ``jax.grad`` or (``forward``) ``jax.jacfwd``."""

    fn: Callable
    forward: bool = False

    def gradient(self) -> Callable:
        return (jax.jacfwd if self.forward else jax.grad)(self.fn)


def diffode_candidate(method) -> Callable:
    def make(case: Case):
        if isinstance(method, diffode.ForwardSensitivity) and (
            case.n * (case.p + 1) > 50_000 or case.p > 1000
        ):
            return "skipped: forward sensitivities of more than 1000 parameters or 50000 equations"
        return Loss(_batched(case, diffode_solve_one(case, method)))

    return make


def diffode_jacfwd(case: Case):
    if case.p > 200:
        return "skipped: jacfwd over p > 200 parameters"
    return Loss(_batched(case, diffode_solve_one(case)), forward=True)


def diffrax_candidate(adjoint_name: str, forward: bool = False) -> Callable:
    def make(case: Case):
        import diffrax

        if forward and case.p > 200:
            return "skipped: forward mode over p > 200 parameters"
        solver = diffrax.Kvaerno5() if case.stiff else diffrax.Tsit5()
        controller = diffrax.PIDController(
            rtol=case.rtol, atol=case.atol, jump_ts=jnp.asarray(case.tstops) if case.tstops else None
        )
        f = case.f

        def solve_one(p, y0):
            return diffrax.diffeqsolve(
                diffrax.ODETerm(f),
                solver,
                case.ts[0],
                case.ts[-1],
                None,
                y0,
                p,
                saveat=diffrax.SaveAt(ts=case.ts),
                stepsize_controller=controller,
                adjoint=getattr(diffrax, adjoint_name)(),
                max_steps=20_000,
            ).ys

        return Loss(_batched(case, solve_one), forward)

    return make


def odeint_candidate(case: Case):
    from jax.experimental.ode import odeint

    if case.stiff:
        return "not applicable: odeint has no stiff solver"
    f = case.f

    def solve_one(p, y0):
        return odeint(
            lambda y, t, p: f(t, y, p), y0, case.ts, p, rtol=case.rtol, atol=case.atol, mxstep=20_000
        )

    return Loss(_batched(case, solve_one))


# ---------------------------------------------------------------------------
# torch peers: the same problems written in torch (float64, CPU), timed as the gradient
# of the same loss by loss.backward(). A candidate is then a "torch:" thunk, measured by
# measure_torch.
# ---------------------------------------------------------------------------


def torch_problem(case: Case):
    """``(f(t, y, params), y0, ts, params, loss)`` in torch for the non-stiff problems, or the
    reason there is none."""
    import torch

    T = lambda x: torch.tensor(np.asarray(x), dtype=torch.float64)  # noqa: E731
    if case.stiff:
        return "not applicable: no stiff solver (the problem is stiff)"
    if case.problem == "lotka_volterra":

        def f(t, y, p):
            a, b, c, d = p[0]
            return torch.stack(
                [a * y[..., 0] - b * y[..., 0] * y[..., 1], -c * y[..., 1] + d * y[..., 0] * y[..., 1]], -1
            )

        params = [T(case.params)]
    elif case.problem == "pkpd":

        def f(t, y, p):
            ka, F, CL, V1, Q, V2, ke0, kin, kout, imax, ic50 = p[0]
            gut, central, peripheral, ce, response = (y[..., i] for i in range(5))
            conc = central / V1
            inhibition = imax * ce**2 / (ic50**2 + ce**2)
            return torch.stack(
                [
                    -ka * gut,
                    F * ka * gut - CL * conc - Q * conc + Q * peripheral / V2,
                    Q * conc - Q * peripheral / V2,
                    ke0 * (conc - ce),
                    kin * (1.0 - inhibition) - kout * response,
                ],
                -1,
            )

        params = [T(case.params)]
    elif case.problem == "neural":
        layers = [(T(layer.weight), T(layer.bias)) for layer in case.params.mlp.layers]
        params = [x for wb in layers for x in wb]

        def f(t, y, p):
            for k in range(0, len(p), 2):
                y = y @ p[k].T + p[k + 1]
                y = torch.tanh(y) if k + 2 < len(p) else y
            return y
    else:
        return "not written in torch yet"
    for x in params:
        x.requires_grad_(True)
    target = getattr(case.loss, "target", None)
    f = _counted_torch(f)
    target = None if target is None else T(target)

    def loss(ys):  # the case's loss, in torch: sum of squares, or the neural case's MSE
        return torch.mean((ys - target) ** 2) if target is not None else torch.sum(ys**2) / ys.numel()

    return f, T(case.y0), T(case.ts), params, loss


def _counted_torch(f: Callable) -> Callable:
    def counted(t, y, p):
        FEVALS[0] += 1
        return f(t, y, p)

    return counted


def torchdiffeq_candidate(adjoint: bool) -> Callable:
    def make(case: Case):
        import torchdiffeq

        tp = torch_problem(case)
        if isinstance(tp, str):
            return tp
        f, y0, ts, params, loss = tp
        odeint = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint

        class Field(__import__("torch").nn.Module):
            def __init__(self):
                super().__init__()
                self.p = __import__("torch").nn.ParameterList(params)

            def forward(self, t, y):
                return f(t, y, list(self.p))

        field = Field()
        # (batched neural case: y0 is (batch, 2), solved as one system, as torchdiffeq users do)

        def value():
            ys = odeint(field, y0, ts, rtol=case.rtol, atol=case.atol, method="dopri5")
            return loss(ys.transpose(0, 1) if case.batched else ys)

        def grad():
            field.zero_grad()
            value().backward()
            return np.concatenate([x.grad.detach().numpy().ravel() for x in field.p])

        return ("torch", grad, value)

    return make


def torchode_candidate(case: Case):
    import torch
    import torchode as to

    tp = torch_problem(case)
    if isinstance(tp, str):
        return tp
    f, y0, ts, params, loss = tp
    y0b = y0 if case.batched else y0[None]
    term = to.ODETerm(lambda t, y: f(t, y, params))
    solver = to.AutoDiffAdjoint(
        to.Tsit5(term=term), to.IntegralController(atol=case.atol, rtol=case.rtol, term=term)
    )

    def value():
        problem = to.InitialValueProblem(y0=y0b, t_eval=ts.expand(y0b.shape[0], -1))
        ys = solver.solve(problem).ys  # (batch, T, n)
        return loss(ys if case.batched else ys[0])

    def grad():
        for x in params:
            x.grad = None
        value().backward()
        return np.concatenate([x.grad.detach().numpy().ravel() for x in params])

    torch.set_num_threads(os.cpu_count() or 1)
    return ("torch", grad, value)


METHODS: dict[str, Callable] = {
    "diffode Direct": diffode_candidate(diffode.Direct()),
    "diffode Direct(checkpoints=16)": diffode_candidate(diffode.Direct(checkpoints=16)),
    "diffode ForwardSensitivity": diffode_candidate(diffode.ForwardSensitivity()),
    "diffode BacksolveAdjoint": diffode_candidate(diffode.BacksolveAdjoint()),
    "diffode BacksolveAdjoint(seminorm=True)": diffode_candidate(diffode.BacksolveAdjoint(seminorm=True)),
    "diffode InterpolatingAdjoint": diffode_candidate(diffode.InterpolatingAdjoint()),
    "diffode Auto": diffode_candidate(diffode.Auto()),
    "diffode jax.jacfwd": diffode_jacfwd,
    "diffrax RecursiveCheckpointAdjoint": diffrax_candidate("RecursiveCheckpointAdjoint"),
    "diffrax BacksolveAdjoint": diffrax_candidate("BacksolveAdjoint"),
    "diffrax ForwardMode": diffrax_candidate("ForwardMode", forward=True),
    "jax odeint": odeint_candidate,
    "torchdiffeq odeint": torchdiffeq_candidate(adjoint=False),
    "torchdiffeq odeint_adjoint": torchdiffeq_candidate(adjoint=True),
    "torchode (AutoDiffAdjoint)": torchode_candidate,
}
QUICK_METHODS = (
    "diffode Direct",
    "diffode ForwardSensitivity",
    "diffode Auto",
    "diffrax RecursiveCheckpointAdjoint",
    "jax odeint",
    "torchdiffeq odeint",
    "torchdiffeq odeint_adjoint",
    "torchode (AutoDiffAdjoint)",
)


# ---------------------------------------------------------------------------
# References and metrics.
# ---------------------------------------------------------------------------


def scipy_reference(case: Case) -> np.ndarray:
    """The loss gradient from the forward sensitivity equations, solved by SciPy's Radau."""
    from scipy.integrate import solve_ivp

    y0 = np.asarray(case.y0, np.float64)
    p, unravel = ravel_pytree(case.params)
    n, m = y0.size, p.size

    def aug(t, z):
        y, s = z[:n], z[n:].reshape(n, m)
        f = lambda y, p: case.f(t, y, unravel(p))  # noqa: E731
        jy, jp = jax.jacfwd(f, argnums=(0, 1))(y, p)
        return jnp.concatenate([f(y, p), (jy @ s + jp).ravel()])

    rhs = jax.jit(aug)
    jac = jax.jit(jax.jacfwd(aug, argnums=1))
    ts = np.asarray(case.ts)
    z = np.concatenate([y0, np.zeros(n * m)])
    # One solve per stretch between the tstops (the forcing switches there), each saving at
    # its own save times and ending on the stretch's end, where the next one starts.
    stops = sorted(b for b in case.tstops if ts[0] < b < ts[-1])
    pieces = []
    for a, b in zip([ts[0], *stops], [*stops, ts[-1]]):
        keep = ts[(ts >= a) & ((ts < b) | (b == ts[-1]))]
        sol = solve_ivp(
            lambda t, z: np.asarray(rhs(t, z)),
            (a, b),
            z,
            method="Radau",
            t_eval=np.unique(np.append(keep, b)),
            rtol=1e-12,
            atol=1e-14,
            jac=lambda t, z: np.asarray(jac(t, z)),
        )
        pieces.append(sol.y.T[np.isin(sol.t, keep)])
        z = sol.y[:, -1]
    zs = np.concatenate(pieces)
    ys, sens = zs[:, :n], zs[:, n:].reshape(-1, n, m)
    dl_dys = np.asarray(jax.grad(case.loss)(jnp.asarray(ys)))
    return np.einsum("tn,tnm->m", dl_dys, sens)


def reference_gradient(case: Case):
    if not case.batched and case.n * (case.p + 1) <= SCIPY_REFERENCE_MAX:
        return scipy_reference(case), "SciPy Radau, forward sensitivities, rtol 1e-12"
    if case.batched:
        method, solver, rtol = diffode.Direct(), diffode.Tsit5(), 1e-10
        what = "diffode Tsit5 + Direct, rtol 1e-10"
    elif case.n * (case.p + 1) > 50_000 or case.n > 1024:
        # Too many sensitivities to carry, or a state too large for Radau5's forward
        # sensitivities (N = 32: over 18 minutes against 38 s at N = 16): reverse mode.
        method, solver, rtol = diffode.Direct(), diffode.Rodas5P(), 1e-10
        what = "diffode Rodas5P + Direct, rtol 1e-10"
    else:
        method, solver, rtol = diffode.ForwardSensitivity(), diffode.Radau5(), 1e-11
        what = "diffode Radau5 + ForwardSensitivity, rtol 1e-11"
    f = case.f

    def solve_one(p, y0):
        return diffode.solve(
            f,
            y0,
            case.ts,
            p,
            solver=solver,
            rtol=rtol,
            atol=rtol * 1e-2,
            sensitivity=method,
            tstops=list(case.tstops) or None,
            max_steps=200_000,
            **dict(case.diffode_kw),
        ).ys

    return _flat(jax.jit(jax.grad(_batched(case, solve_one)))(case.params)), what


def _flat(tree) -> np.ndarray:
    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in leaves]) if leaves else np.zeros(0)


def _counted(f: Callable) -> Callable:
    """``f`` that adds one to ``FEVALS`` per evaluation, by a host callback (a vmapped
    batch of evaluations, such as ``jax.jacfwd``'s columns or a batch of members solved
    together, counts once)."""

    def bump():
        FEVALS[0] += 1

    def counted(t, y, p):
        jax.debug.callback(bump)
        return f(t, y, p)

    return counted


def _count(fn: Callable, *args) -> int:
    FEVALS[0] = 0
    jax.block_until_ready(fn(*args))
    return FEVALS[0]


def count_fevals(case: Case, make: Callable) -> dict[str, int]:
    """Evaluations of ``f`` in one plain solve of the candidate's library and in one call of
    its gradient (forward and backward passes together), with ``f`` counting itself."""
    loss = make(dataclasses.replace(case, f=_counted(case.f)))
    return dict(
        fevals_solve=_count(jax.jit(loss.fn), case.params),
        fevals_grad=_count(jax.jit(loss.gradient()), case.params),
    )


def _rel_error(g: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(g - reference)) / max(np.max(np.abs(reference)), 1e-300))


def measure(
    case: Case, name: str, make: Callable, reference: np.ndarray, quick: bool, count: bool = True
) -> dict[str, Any]:
    """One row: ``make(case)``'s gradient timed, its evaluations of ``f`` counted, and
    checked against ``reference``."""
    row = dict(problem=case.problem, case=case.label, n=case.n, p=case.p, method=name)
    try:
        cand = make(case)
        if isinstance(cand, str):
            return dict(row, status=cand)
        if isinstance(cand, tuple):
            return measure_torch(row, cand[1], cand[2], reference, quick)
        fn = jax.jit(cand.gradient())
        jax.clear_caches()
        t0 = time.perf_counter()  # a cold first call: trace, lower, compile and one run
        compiled = fn.lower(case.params).compile()
        g = _flat(jax.block_until_ready(compiled(case.params)))
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(case.params))
        call_s = time.perf_counter() - t0
        slow = call_s > SLOW_CALL_S  # such a candidate gets a few single calls
        if not quick and not slow:  # the median of more cold first calls
            compile_s = _timing.median(
                [compile_s] + list(_timing.compile_time(fn, case.params, repeats=2, warmup=0).samples)
            )
        if slow:  # the median with the probe call, so that one disturbed call does not decide
            more = 2 if call_s < COUNT_MAX_CALL_S else 0
            run_s = _timing.median(
                [call_s] + [_timing.calls_sample(compiled, case.params, number=1) for _ in range(more)]
            )
        else:
            run_s = _timing.run_time(
                compiled, case.params, repeats=3 if quick else 7, min_time=0.02 if quick else 0.2
            ).median
        counts = count_fevals(case, make) if count and call_s < COUNT_MAX_CALL_S else {}
        return dict(
            row,
            status="ok" if np.all(np.isfinite(g)) else "nan in gradient",
            compile_s=compile_s,
            run_ms=1e3 * run_s,
            memory_mb=(mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)
            / 2**20,
            grad_rel_error=_rel_error(g, reference),
            **counts,
        )
    except Exception as e:  # noqa: BLE001 -- a failure is a table entry
        return dict(row, status=f"failed: {_reason(e)}")


def _reason(e: BaseException) -> str:
    """The first line of an error, or of the diffode/equinox error a JAX runtime error quotes."""
    text = str(e)
    quoted = "EquinoxRuntimeError: "
    if quoted in text:
        return "EquinoxRuntimeError: " + text.split(quoted)[-1].splitlines()[0][:160]
    return f"{type(e).__name__}: {text.splitlines()[0][:160] if text else ''}"


def measure_torch(
    row: dict, grad: Callable, value: Callable, reference: np.ndarray, quick: bool
) -> dict[str, Any]:
    """A torch candidate: no compilation (compile = the first call), run = median per call,
    peak memory = the process's resident-set growth during the first call (MiB)."""
    import resource

    import torch

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    FEVALS[0] = 0
    t0 = time.perf_counter()
    g = grad()
    first = time.perf_counter() - t0
    fevals_grad = FEVALS[0]
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    with torch.no_grad():
        FEVALS[0] = 0
        value()
        fevals_solve = FEVALS[0]
    samples = []
    for _ in range(3 if quick else 7):
        t0 = time.perf_counter()
        grad()
        samples.append(time.perf_counter() - t0)
    return dict(
        row,
        status="ok" if np.all(np.isfinite(g)) else "nan in gradient",
        compile_s=first,
        run_ms=1e3 * _timing.median(samples),
        memory_mb=rss,
        fevals_solve=fevals_solve,
        fevals_grad=fevals_grad,
        grad_rel_error=_rel_error(g, reference),
    )


# ---------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------

COLUMNS = (
    "reference",
    "problem",
    "case",
    "n",
    "p",
    "method",
    "status",
    "compile_s",
    "run_ms",
    "memory_mb",
    "fevals_solve",
    "fevals_grad",
    "grad_rel_error",
)


def _fmt(x, spec) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(rows: list[dict], notes: list[str], quick: bool) -> str:
    command = (
        "python -m benchmarks.adjoints"
        + (" --quick" if quick else "")
        + (
            ""
            if quick or BRUSSELATOR_N == [2, 4, 8, 16, 32]
            else " --sizes " + " ".join(map(str, BRUSSELATOR_N))
        )
    )
    lines = ["## Adjoint methods (`adjoints`)", "", f"Generated by `{command}`.", ""]
    lines += [f"- {n}" for n in notes] + [""]
    for label in dict.fromkeys(r["case"] for r in rows):
        group = [r for r in rows if r["case"] == label]
        ref = next((r for r in group if r["method"] == REFERENCE_PEER and r.get("run_ms")), None)
        lines += [
            f"### {label} ({group[0]['n']} states, {group[0]['p']} parameters)",
            "",
            "| method | compile (s) | run (ms) | run / diffrax | memory (MiB) | f evals: solve | f evals: gradient "
            "| gradient error |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in group:
            if r["status"] != "ok" and r.get("run_ms") is None:
                lines.append(f"| {r['method']} | | | | | | | {r['status']} |")
                continue
            ratio = _fmt(r["run_ms"] / ref["run_ms"], ".2f") if ref else ""
            err = _fmt(r["grad_rel_error"], ".1e") + ("" if r["status"] == "ok" else f" ({r['status']})")
            lines.append(
                f"| {r['method']} | {_fmt(r['compile_s'], '.2f')} | {_fmt(r['run_ms'], '.3f')} | {ratio} | "
                f"{_fmt(r['memory_mb'], '.2f')} | {_fmt(r.get('fevals_solve'), '.0f')} | "
                f"{_fmt(r.get('fevals_grad'), '.0f')} | {err} |"
            )
        lines.append("")
    return "\n".join(lines + findings(rows))


def _best(rows: list[dict], pred) -> dict | None:
    ok = [r for r in rows if r["status"] == "ok" and r.get("run_ms") and pred(r["method"])]
    return min(ok, key=lambda r: r["run_ms"]) if ok else None


def _is_diffode(m: str) -> bool:
    return m.startswith("diffode")


def findings(rows: list[dict]) -> list[str]:
    """The discussion: what the tables say, computed from them, so that it stays true when
    they are regenerated."""
    lines = ["### Findings", "", "Computed from the tables above.", ""]
    lines += [
        "| case | n | p | fastest | diffode's fastest / fastest peer: run | compile (JAX peers) "
        "| Auto / diffode's fastest |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    losses = []
    for label in dict.fromkeys(r["case"] for r in rows):
        group = [r for r in rows if r["case"] == label]
        best, ours = _best(group, lambda m: True), _best(group, _is_diffode)
        peer, auto = _best(group, lambda m: not _is_diffode(m)), _best(group, lambda m: m == "diffode Auto")
        if best is None:
            continue
        run = ours["run_ms"] / peer["run_ms"] if ours and peer else None
        jax_peers = [
            r["compile_s"]
            for r in group
            if r.get("compile_s") and not _is_diffode(r["method"]) and not r["method"].startswith("torch")
        ]
        comp = ours["compile_s"] / min(jax_peers) if ours and jax_peers else None
        lines.append(
            f"| {label} | {best['n']} | {best['p']} | {best['method']} ({best['run_ms']:.3g} ms) | "
            f"{_fmt(run, '.2f')} | {_fmt(comp, '.2f')} | {_fmt(auto['run_ms'] / ours['run_ms'] if auto and ours else None, '.2f')} |"
        )
        if run is not None and run > 1:
            losses.append(f"{label} (run time {run:.2f}x {peer['method']})")
        if comp is not None and comp > 1:
            losses.append(f"{label} (compile time {comp:.2f}x the fastest-compiling JAX peer)")
    lines.append("")
    lines.append(
        "- Where diffode loses: "
        + (
            "; ".join(losses) + "."
            if losses
            else "no case in this run: diffode's fastest "
            "method beat every peer's fastest in run time and in compile time."
        )
    )
    reverse = ("diffode Direct", "diffode InterpolatingAdjoint", "diffode BacksolveAdjoint")
    fastest_reverse = {}
    for label in dict.fromkeys(r["case"] for r in rows):
        b = _best([r for r in rows if r["case"] == label], lambda m: m in reverse)
        if b:
            fastest_reverse.setdefault(b["method"], []).append(label)
    lines.append(
        "- The fastest of diffode's reverse modes (Direct, InterpolatingAdjoint, BacksolveAdjoint): "
        + "; ".join(f"{m} on {', '.join(cs)}" for m, cs in fastest_reverse.items())
        + "."
    )
    failed = {}
    for r in rows:
        if str(r["status"]).startswith("failed"):
            failed.setdefault(r["method"], []).append(r["case"])
    for m, cases in failed.items():
        lines.append(f"- {m} failed on: {', '.join(cases)}.")
    for problem, what in (("brusselator", "3 parameters"), ("brusselator_field", "the feed rate a field")):
        group = [r for r in rows if r["problem"] == problem]
        sizes = sorted({(r["n"], r["p"]) for r in group})
        if len(sizes) < 2:
            continue
        lines += ["", f"Scaling, 2-D Brusselator with {what} (run ms; ForwardSensitivity / Direct):", ""]
        lines += [
            "| n | p | n (p + 1) | ForwardSensitivity | Direct | InterpolatingAdjoint | Auto | Forward / Direct |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for n, p in sizes:
            get = {r["method"]: r.get("run_ms") for r in group if r["n"] == n and r.get("status") == "ok"}
            f, d = get.get("diffode ForwardSensitivity"), get.get("diffode Direct")
            lines.append(
                f"| {n} | {p} | {n * (p + 1)} | {_fmt(f, '.3g')} | {_fmt(d, '.3g')} | "
                f"{_fmt(get.get('diffode InterpolatingAdjoint'), '.3g')} | {_fmt(get.get('diffode Auto'), '.3g')} | "
                f"{_fmt(f / d if f and d else None, '.2f')} |"
            )
    platform = jax.default_backend()
    lines += [
        "",
        "- No GPU column: this run had no GPU (JAX's backend was "
        f"`{platform}`); the device machine was not available to this project when it was generated."
        if platform == "cpu"
        else f"- JAX's backend in this run: `{platform}`.",
        "",
        DISCUSSION,
    ]
    return lines


#: What the measurements mean; the numbers are in the tables and findings above.
DISCUSSION = """\
**Reading the results.** On small problems (a few states and parameters) forward
sensitivities are the cheapest exact derivatives: one augmented solve whose extra work is a
`jvp` per stage, against a reverse pass that replays every step. As the parameters grow the
augmented system grows with them while `Direct`'s reverse pass does not, so the crossover
moves with `n` and `p` together: the Brusselator scaling tables show where, and `Auto`'s rule
(its docstring) is set from them and from `benchmarks/auto_threshold.py`. `Direct`
differentiates the discrete solution exactly and replays the recorded steps without
re-solving anything. The continuous adjoints
(`InterpolatingAdjoint`, `BacksolveAdjoint`) integrate a second system backwards with its own
error control, which costs evaluations of `f` (see the gradient column) and, on stiff
problems, factorisations of a larger system; `BacksolveAdjoint` additionally re-solves the
state backwards, which is unstable on stiff problems, and both libraries' backsolve fail
there, as Ma et al. (2018) found in Julia. The torch peers run eagerly, paying Python and
kernel-launch overhead at every stage, which dominates on small problems; their compile
column is their first call, so it is not compared; they have no stiff solvers."""


def plots(rows: list[dict], out: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    done = [r for r in rows if r.get("run_ms")]
    written = []
    labels = list(dict.fromkeys(r["case"] for r in done))
    methods = list(dict.fromkeys(r["method"] for r in done))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(labels)), 4.5))
    width = 0.8 / max(len(methods), 1)
    for k, m in enumerate(methods):
        xs = [
            i + k * width for i, c in enumerate(labels) for r in done if r["case"] == c and r["method"] == m
        ]
        ys = [r["run_ms"] for c in labels for r in done if r["case"] == c and r["method"] == m]
        ax.bar(xs, ys, width, label=m)
    ax.set_xticks([i + 0.4 for i in range(len(labels))], labels, rotation=20, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("gradient run time (ms)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    written.append(os.path.join(out, "adjoints_run.png"))
    fig.savefig(written[-1], dpi=110)
    studies = [
        (pr, title)
        for pr, title in (
            ("brusselator", "3 parameters"),
            ("brusselator_field", "B a field: N^2 + 2 parameters"),
        )
        if len({r["n"] for r in done if r["problem"] == pr}) > 1
    ]
    if studies:
        fig, axes = plt.subplots(1, len(studies), figsize=(6 * len(studies), 4.5), squeeze=False)
        for ax, (pr, title) in zip(axes[0], studies):
            rs = [r for r in done if r["problem"] == pr]
            for m in dict.fromkeys(r["method"] for r in rs):
                pts = sorted((r["n"], r["run_ms"]) for r in rs if r["method"] == m)
                ax.plot(*zip(*pts), marker="o", label=m)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("states (2 N^2)")
            ax.set_ylabel("gradient run time (ms)")
            ax.set_title(f"2-D Brusselator, {title}")
            ax.legend(fontsize=6)
        fig.tight_layout()
        written.append(os.path.join(out, "adjoints_brusselator.png"))
        fig.savefig(written[-1], dpi=110)
    plt.close("all")
    return written


def _replace_row(rows: list[dict], row: dict) -> list[dict]:
    """``rows`` with ``row`` in place of the row of the same case and method, or appended."""
    key = (row["case"], row["method"])
    if any((r["case"], r["method"]) == key for r in rows):
        return [row if (r["case"], r["method"]) == key else r for r in rows]
    return rows + [row]


def read_rows(path: str) -> list[dict]:
    """The rows of an earlier run's CSV, with numbers as numbers and empty cells as ``None``."""
    ints, floats = (
        ("n", "p"),
        ("compile_s", "run_ms", "memory_mb", "fevals_solve", "fevals_grad", "grad_rel_error"),
    )
    rows = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            r = {k: (None if v == "" else v) for k, v in r.items()}
            rows.append(
                {
                    k: int(v)
                    if k in ints and v is not None
                    else float(v)
                    if k in floats and v is not None
                    else v
                    for k, v in r.items()
                }
            )
    return rows


def _earlier_merges(path: str, problem_names) -> list[str]:
    """The "Merged:" notes of the adjoints section in ``path`` for other problems than these."""
    if not os.path.exists(path):
        return []
    text = open(path).read()
    section = text[text.find("<!-- begin adjoints -->") : text.find("<!-- end adjoints -->")]
    merged = [line[2:] for line in section.splitlines() if line.startswith("- Merged: ")]
    return [m for m in merged if m.split(" measured by")[0][len("Merged: ") :] not in problem_names]


def run(
    problem_names, method_filter, quick: bool, out: str, merge: bool = False, count: bool = False
) -> list[dict]:
    """Measure ``method_filter``'s methods (all, or the quick set, when empty) on the cases of
    ``problem_names`` and write the outputs into ``out``. ``quick``: tiny sizes, one sample
    each, and evaluations of ``f`` counted only with ``count``."""
    os.makedirs(out, exist_ok=True)
    exact = bool(method_filter) and all(s in METHODS for s in method_filter)  # full names: just those
    names = [
        m
        for m in METHODS
        if (not method_filter and (not quick or m in QUICK_METHODS))
        or (m in method_filter if exact else any(s in m for s in method_filter or ()))
    ]
    rows, notes = (
        [],
        [
            "torch peers (torchdiffeq, torchode): float64 on the CPU, `dopri5`/`Tsit5`, the same "
            "tolerances; no compilation, so their compile column is the first call, and their memory "
            "the process's resident-set growth in it; not installed means a 'failed: "
            "ModuleNotFoundError' entry.",
            "f evals: evaluations of f counted by f itself (a host callback in JAX, a counter in torch) "
            "in one plain solve of the library's solver and in one gradient call (forward and backward "
            "passes together); a vmapped batch of evaluations (a Jacobian's columns by jacfwd, the "
            "members of a batch) counts once. Not counted for calls over "
            f"{COUNT_MAX_CALL_S:.0f} s.",
            f"jax {jax.__version__}, {os.cpu_count()} CPUs, float64; run times are medians of interleaved "
            "repeats, each call blocked until ready; compile = cold first call.",
        ],
    )
    if merge and os.path.exists(os.path.join(out, "adjoints.csv")):
        rows = read_rows(os.path.join(out, "adjoints.csv"))  # re-measured rows replace theirs
        notes += _earlier_merges(os.path.join(out, "RESULTS.md"), problem_names)
        notes.append(
            f"Merged: {', '.join(problem_names)} measured by a later run "
            f"(`--merge --problems {' '.join(problem_names)}"
            + (f" --methods {' '.join(repr(m) for m in method_filter)}" if method_filter else "")
            + f"`, sizes {BRUSSELATOR_N}); the other rows are the first run's."
        )
    start = time.time()
    for pname in problem_names:
        for case in PROBLEMS[pname](quick):
            try:
                reference, what = reference_gradient(case)
            except Exception as e:  # noqa: BLE001
                reference, what = np.full(case.p, np.nan), f"reference failed: {type(e).__name__}: {e}"[:200]
            for name in names:
                guess = _extrapolated_s(rows, case, name)
                if guess > CAP_S:
                    why = (
                        f"extrapolated from the previous size to {guess:.0f} s a call (cap {CAP_S:.0f} s)"
                        if math.isfinite(guess)
                        else "failed or skipped at a smaller size"
                    )
                    row = dict(
                        problem=case.problem,
                        case=case.label,
                        n=case.n,
                        p=case.p,
                        method=name,
                        status=f"skipped: {why}",
                    )
                else:
                    row = measure(case, name, METHODS[name], reference, quick, count=not quick or count)
                rows = _replace_row(rows, dict(row, reference=what))
                print(
                    f"[{time.time() - start:6.1f} s] {case.label} | {name}: {row['status']}"
                    + (f", {row['run_ms']:.3f} ms" if row.get("run_ms") else ""),
                    file=sys.stderr,
                )
                jax.clear_caches()
            write(rows, notes, quick, out, final=False)  # what is done so far survives an interruption
    write(rows, notes, quick, out, final=True)
    return rows


def _extrapolated_s(rows: list[dict], case: Case, name: str) -> float:
    """The run time (s) of ``name`` on ``case`` extrapolated from its largest smaller size of
    the same problem as (states ratio)^1.5, or 0 when there is none; a smaller size that
    failed or was skipped for its time propagates (infinity). Rows of this size or larger
    (an earlier run's, under ``--merge``) do not count."""
    prev = sorted(
        (r for r in rows if r["problem"] == case.problem and r["method"] == name and int(r["n"]) < case.n),
        key=lambda r: int(r["n"]),
    )
    if not prev:
        return 0.0
    if str(prev[-1]["status"]).startswith(("skipped: extrapolated", "skipped: failed", "failed")):
        return math.inf  # a larger size would take longer, or fail the same way
    if not prev[-1].get("run_ms"):
        return 0.0
    return 1e-3 * prev[-1]["run_ms"] * (case.n / prev[-1]["n"]) ** 1.5


def write(rows: list[dict], notes: list[str], quick: bool, out: str, final: bool) -> None:
    """The CSV, the plots (at the end) and the section of ``RESULTS.md`` of the rows so far."""
    with open(os.path.join(out, "adjoints.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    notes = list(notes) + [
        f"{case}: reference {ref}."
        for case, ref in dict.fromkeys((r["case"], r.get("reference")) for r in rows)
    ]
    if final:
        written = plots(rows, out)
        if written:
            notes.append("Plots: " + ", ".join(f"`{os.path.basename(p)}`" for p in written) + ".")
    else:
        notes.append("Partial: the run has not finished.")
    _timing.write_section("adjoints", markdown(rows, notes, quick), os.path.join(out, "RESULTS.md"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.adjoints", description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", nargs="*", choices=list(PROBLEMS), default=list(PROBLEMS))
    ap.add_argument(
        "--methods",
        nargs="*",
        help="keep the methods whose name contains one of these (only those named, when all are full names)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one sample each (a smoke run)")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="start from --out's adjoints.csv: the cases and methods measured now replace their rows, "
        "the others are kept (to re-measure part of a full run)",
    )
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument(
        "--sizes",
        nargs="*",
        type=int,
        metavar="N",
        help=f"the Brusselator's N of a full run (default {BRUSSELATOR_N})",
    )
    a = ap.parse_args(argv)
    if a.sizes:
        BRUSSELATOR_N[:] = a.sizes
    rows = run(a.problems, a.methods, a.quick, a.out, merge=a.merge)
    print(f"# wrote {a.out}/RESULTS.md, adjoints.csv ({len(rows)} rows)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
