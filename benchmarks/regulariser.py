"""The solver-heuristic regularisers: fewer function evaluations at a comparable loss?

Pal, Ma, Shah and Rackauckas (ICML 2021) add the solver's integrated local error
estimate (or stiffness estimate) to the training loss of a neural ODE, so that
training prefers, among the vector fields that fit the data about equally well,
one the adaptive solver integrates in fewer steps. This script trains small
neural ODEs (equinox MLPs, tanh, float32; Tsit5 at rtol 1e-5, atol 1e-6;
``Direct``; Adam via optax, its rate decayed tenfold on a cosine) with the loss

    loss + lam_error * mean(sol.regularisers.error) + lam_stiffness * mean(sol.regularisers.stiffness)

for a sweep of ``lam`` and several seeds, on two problems:

``rings``
    Under-determined by the loss, in the spirit of Pal et al.'s classification
    experiments: points of the plane in three nested rings with alternating labels
    +1, -1, +1 (radii [0, 0.5], [0.8, 1.3], [1.6, 2.0]), augmented with a zero
    third coordinate (a flow of the plane cannot separate nested rings; Dupont,
    Doucet and Teh 2019). Only the readout ``y_3(T)`` at ``T = 1`` enters the loss,
    ``mean((y_3(T) - label)^2)``: every field that lifts each ring to its label
    fits, the simplest with straight trajectories. MLP 3-32-32-3; 1024 training
    points, minibatches of 128; 512 held-out points; 600 steps, Adam 1e-2.

``spiral``
    A trajectory fit, where the data fix the dynamics: the damped spiral
    ``y' = A y``, A = [[-0.1, 2], [-2, -0.1]], from 16 initial states, 40 saves on
    [0, 6], ``mean((y(t_i) - data)^2)``. MLP 2-64-64-2; the full batch each step;
    64 held-out initial states; 400 steps, Adam 3e-3.

For each trained model it reports the loss without the regulariser on the
training set and on the held-out set, and the function evaluations per
trajectory of a forward solve on the held-out set, and their ratios to the
unregularised run of the same seed (median and range over the seeds). Run::

    python -m benchmarks.regulariser [--quick] [--problems rings,spiral] [--seeds N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import diffode

from . import _timing

RTOL, ATOL = 1e-5, 1e-6
TARGET_NFE, TARGET_LOSS = 0.7, 1.1  # the target: >= 30% fewer evaluations, loss within 10%


class Field(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(y)


@dataclass
class Problem:
    name: str
    dim: int
    width: int
    ts: jnp.ndarray
    train_x: jnp.ndarray
    train_y: jnp.ndarray
    test_x: jnp.ndarray
    test_y: jnp.ndarray
    batch: int | None  # minibatch size; None: the full training set each step
    steps: int
    lr: float  # Adam, with a cosine decay from lr to lr / 10 over the run
    loss: callable  # loss(ys, target), ys the saves of a batch of solves: (batch, len(ts), dim)
    sweep: tuple  # ((error weight, stiffness weight), ...), the first (0, 0)
    notes: dict = field(default_factory=dict)


# --- rings: only the terminal readout enters the loss --------------------------------

RING_BANDS = ((0.0, 0.5, 1.0), (0.8, 1.3, -1.0), (1.6, 2.0, 1.0))  # (inner radius, outer radius, label)


def ring_points(key, num):
    """``num`` points, in turn from each band, uniform over its area; with the zero
    third coordinate, and their labels."""
    band = jnp.arange(num) % len(RING_BANDS)
    lo, hi, label = (jnp.asarray([b[i] for b in RING_BANDS], jnp.float32)[band] for i in range(3))
    u = jax.random.uniform(key, (num,), jnp.float32)
    radius = jnp.sqrt(lo**2 + u * (hi**2 - lo**2))
    angle = jax.random.uniform(jax.random.fold_in(key, 1), (num,), jnp.float32, 0.0, 2 * jnp.pi)
    x = jnp.stack([radius * jnp.cos(angle), radius * jnp.sin(angle), jnp.zeros_like(radius)], -1)
    return x, label


def rings(steps, quick):
    train_x, train_y = ring_points(jax.random.PRNGKey(100), 1024)
    test_x, test_y = ring_points(jax.random.PRNGKey(101), 512)
    sweep = ((0.0, 0.0), (0.01, 0.0), (0.03, 0.0), (0.1, 0.0), (0.0, 0.01), (0.01, 0.003))
    return Problem(
        "rings",
        3,
        32,
        jnp.array([0.0, 1.0], jnp.float32),
        train_x,
        train_y,
        test_x,
        test_y,
        batch=128,
        steps=steps or (40 if quick else 600),
        lr=1e-2,
        loss=lambda ys, y: jnp.mean((ys[:, -1, -1] - y) ** 2),
        sweep=sweep[:2] if quick else sweep,
        notes=dict(bands=RING_BANDS, T=1.0, train_points=1024, test_points=512, batch=128, mlp="3-32-32-3"),
    )


# --- spiral: a trajectory fit ----------------------------------------------------------

SPIRAL_A = jnp.array([[-0.1, 2.0], [-2.0, -0.1]], jnp.float32)


def spiral_states(key, num):
    radius = jax.random.uniform(key, (num,), jnp.float32, 1.2, 2.0)
    angle = jax.random.uniform(jax.random.fold_in(key, 1), (num,), jnp.float32, 0.0, 2 * jnp.pi)
    return jnp.stack([radius * jnp.cos(angle), radius * jnp.sin(angle)], -1)


def spiral(steps, quick):
    ts = jnp.linspace(0.0, 6.0, 40, dtype=jnp.float32)

    def data(y0s):
        return jax.vmap(
            lambda y: diffode.solve(lambda t, y, a: SPIRAL_A @ y, y, ts, rtol=1e-7, atol=1e-8).ys
        )(y0s)

    train_x, test_x = spiral_states(jax.random.PRNGKey(0), 16), spiral_states(jax.random.PRNGKey(1), 64)
    sweep = ((0.0, 0.0), (0.003, 0.0), (0.0, 0.001))
    return Problem(
        "spiral",
        2,
        64,
        ts,
        train_x,
        data(train_x),
        test_x,
        data(test_x),
        batch=None,
        steps=steps or (30 if quick else 400),
        lr=3e-3,
        loss=lambda ys, y: jnp.mean((ys - y) ** 2),
        sweep=sweep[:2] if quick else sweep,
        notes=dict(A=SPIRAL_A.tolist(), saves=40, T=6.0, train_states=16, test_states=64, mlp="2-64-64-2"),
    )


# --- training and evaluation -------------------------------------------------------------


def solve_batch(problem, model, x):
    return jax.vmap(
        lambda y: diffode.solve(
            model, y, problem.ts, rtol=RTOL, atol=ATOL, regularise=True, sensitivity=diffode.Direct()
        )
    )(x)


def make_runner(problem):
    """One compiled training step and evaluation per problem: the weights are traced,
    so every point of the sweep and every seed reuses them."""
    opt = optax.adam(optax.cosine_decay_schedule(problem.lr, problem.steps, 0.1))

    def objective(model, x, y, weights):
        sols = solve_batch(problem, model, x)
        reg = jnp.stack([jnp.mean(sols.regularisers.error), jnp.mean(sols.regularisers.stiffness)])
        return problem.loss(sols.ys, y) + jnp.dot(weights, reg)

    @eqx.filter_jit
    def step(model, state, key, weights):
        if problem.batch is None:
            x, y = problem.train_x, problem.train_y
        else:
            idx = jax.random.choice(key, problem.train_x.shape[0], (problem.batch,), replace=False)
            x, y = problem.train_x[idx], problem.train_y[idx]
        value, grads = eqx.filter_value_and_grad(objective)(model, x, y, weights)
        updates, state = opt.update(grads, state, model)
        return eqx.apply_updates(model, updates), state, value

    @eqx.filter_jit
    def evaluate(model, x, y):
        sols = solve_batch(problem, model, x)
        return dict(
            loss=problem.loss(sols.ys, y),
            nfe=jnp.mean(sols.stats["num_fevals"].astype(jnp.float32)),
            error=jnp.mean(sols.regularisers.error),
            stiffness=jnp.mean(sols.regularisers.stiffness),
        )

    def init(seed):
        model = Field(
            eqx.nn.MLP(
                problem.dim, problem.dim, problem.width, 2, activation=jnp.tanh, key=jax.random.PRNGKey(seed)
            )
        )
        return model, opt.init(eqx.filter(model, eqx.is_array))

    # Compile before timing (the result is discarded).
    model, state = init(0)
    jax.block_until_ready(step(model, state, jax.random.PRNGKey(0), jnp.ones(2, jnp.float32)))
    jax.block_until_ready(evaluate(model, problem.train_x, problem.train_y))
    jax.block_until_ready(evaluate(model, problem.test_x, problem.test_y))

    def train(weights, seed):
        model, state = init(seed)
        w = jnp.asarray(weights, jnp.float32)
        start = time.perf_counter()
        for i in range(problem.steps):
            model, state, value = step(model, state, jax.random.PRNGKey(1000 * seed + i), w)
        jax.block_until_ready(value)
        seconds = time.perf_counter() - start
        tr = {k: float(v) for k, v in evaluate(model, problem.train_x, problem.train_y).items()}
        te = {k: float(v) for k, v in evaluate(model, problem.test_x, problem.test_y).items()}
        return dict(
            problem=problem.name,
            lam_error=weights[0],
            lam_stiffness=weights[1],
            seed=seed,
            train_loss=tr["loss"],
            test_loss=te["loss"],
            nfe=te["nfe"],
            train_nfe=tr["nfe"],
            error=te["error"],
            stiffness=te["stiffness"],
            train_seconds=seconds,
        )

    return train


def label(weights):
    e, s = weights
    return (
        "none"
        if e == s == 0
        else " + ".join(p for p in (e and f"{e:g} error", s and f"{s:g} stiffness") if p)
    )


def summarise(rows, problem):
    base = {r["seed"]: r for r in rows if r["lam_error"] == r["lam_stiffness"] == 0}
    out = []
    for weights in problem.sweep:
        mine = [r for r in rows if (r["lam_error"], r["lam_stiffness"]) == tuple(weights)]
        entry = dict(problem=problem.name, lam_error=weights[0], lam_stiffness=weights[1], seeds=len(mine))
        for key in ("train_loss", "test_loss", "nfe"):
            vals = np.array([r[key] for r in mine])
            ratios = np.array([r[key] / base[r["seed"]][key] for r in mine])
            entry[key] = float(np.median(vals))
            entry[key + "_ratio"] = dict(
                median=float(np.median(ratios)), min=float(ratios.min()), max=float(ratios.max())
            )
        med = lambda k: entry[k + "_ratio"]["median"]  # noqa: E731
        worst = lambda k: entry[k + "_ratio"]["max"]  # noqa: E731
        entry["target_met_median"] = bool(
            med("nfe") <= TARGET_NFE and med("train_loss") <= TARGET_LOSS and med("test_loss") <= TARGET_LOSS
        )
        entry["target_met_every_seed"] = bool(
            worst("nfe") <= TARGET_NFE
            and worst("train_loss") <= TARGET_LOSS
            and worst("test_loss") <= TARGET_LOSS
        )
        out.append(entry)
    return out


def table(summary):
    def rng(r):
        return f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"

    lines = [
        "| problem | regulariser (lambda) | train loss | test loss | NFE/trajectory | train loss / none "
        "| test loss / none | NFE / none |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['problem']} | {label((s['lam_error'], s['lam_stiffness']))} | {s['train_loss']:.3g} "
            f"| {s['test_loss']:.3g} | {s['nfe']:.1f} | {rng(s['train_loss_ratio'])} "
            f"| {rng(s['test_loss_ratio'])} | {rng(s['nfe_ratio'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: rings only (unless --problems), few steps, one seed, two sweep points",
    )
    parser.add_argument("--problems", default=None, help="comma-separated, from rings,spiral (default both)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; 1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="Adam steps (default per problem)")
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--results", action="store_true", help="write the summary into its section of RESULTS.md"
    )
    args = parser.parse_args()
    seeds = range(args.seeds or (1 if args.quick else 3))
    builders = dict(rings=rings, spiral=spiral)
    start = time.perf_counter()
    rows, summary, settings = [], [], {}
    problems = args.problems or ("rings" if args.quick else "rings,spiral")
    for name in problems.split(","):
        problem = builders[name](args.steps, args.quick)
        settings[name] = dict(problem.notes, steps=problem.steps, lr=problem.lr, sweep=problem.sweep)
        train = make_runner(problem)
        mine = []
        for weights in problem.sweep:
            for seed in seeds:
                mine.append(train(weights, seed))
                print(
                    {k: (round(v, 6) if isinstance(v, float) else v) for k, v in mine[-1].items()}, flush=True
                )
        rows += mine
        summary += summarise(mine, problem)
    print(
        f"\nmedian (range) over {len(seeds)} seed(s); ratios against the unregularised run of the same seed\n"
    )
    print(table(summary))
    if args.results:
        _timing.write_section("regulariser", table(summary))
    for s in summary:
        if s["lam_error"] or s["lam_stiffness"]:
            print(
                f"{s['problem']}, {label((s['lam_error'], s['lam_stiffness']))}: target (NFE <= {TARGET_NFE} x, "
                f"losses <= {TARGET_LOSS} x) met by the median: {s['target_met_median']}, "
                f"by every seed: {s['target_met_every_seed']}"
            )
    total = time.perf_counter() - start
    print(f"\ntotal {total:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                dict(
                    rtol=RTOL,
                    atol=ATOL,
                    seeds=list(seeds),
                    quick=args.quick,
                    settings=settings,
                    total_seconds=total,
                    summary=summary,
                    rows=rows,
                ),
                fh,
                indent=1,
            )


if __name__ == "__main__":
    main()
