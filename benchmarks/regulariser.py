"""The solver-heuristic regulariser: fewer function evaluations at a comparable loss.

Pal, Ma, Shah and Rackauckas (ICML 2021) add the solver's integrated local error
estimate to the training loss of a neural ODE, so that training prefers
dynamics the adaptive solver can integrate in fewer steps. This script trains
the same neural ODE (an equinox MLP 2-64-64-2, tanh, float32) on a damped
spiral (``y' = A y``, A = [[-0.1, 2], [-2, -0.1]]) from 16 initial states,
40 saves on [0, 6], Tsit5 at rtol 1e-5, atol 1e-6,
with Adam for a fixed number of steps and the same seed, once with the plain
mean-squared loss and once for each ``lambda`` with
``mse + lambda * mean(sol.regularisers.error)``. It reports, for the trained
models, the mean-squared error (without the regulariser) and the function
evaluations per trajectory of a forward solve, on the training states and on 64
held-out ones. Run::

    python -m benchmarks.regulariser [--steps N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import diffode

A = jnp.array([[-0.1, 2.0], [-2.0, -0.1]], jnp.float32)
TS = jnp.linspace(0.0, 6.0, 40, dtype=jnp.float32)
RTOL, ATOL = 1e-5, 1e-6
LAMBDAS = (0.0, 3e-3, 1e-2, 3e-2)


def spiral(t, y, args):
    return A @ y


class Field(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return self.mlp(y)


def initial_states(key, num):
    radius = jax.random.uniform(key, (num,), jnp.float32, 1.2, 2.0)
    angle = jax.random.uniform(jax.random.fold_in(key, 1), (num,), jnp.float32, 0.0, 2 * jnp.pi)
    return jnp.stack([radius * jnp.cos(angle), radius * jnp.sin(angle)], -1)


def data(y0s):
    return jax.vmap(lambda y: diffode.solve(spiral, y, TS, rtol=1e-7, atol=1e-8).ys)(y0s)


def solve_batch(model, y0s, regularise):
    return jax.vmap(lambda y: diffode.solve(model, y, TS, rtol=RTOL, atol=ATOL, regularise=regularise,
                                            sensitivity=diffode.Direct()))(y0s)


def train(lam: float, steps: int, y0s, target, seed: int = 0):
    model = Field(eqx.nn.MLP(2, 2, 64, 2, activation=jnp.tanh, key=jax.random.PRNGKey(seed)))
    opt = optax.adam(3e-3)

    def loss_fn(model):
        sols = solve_batch(model, y0s, regularise=lam > 0)
        mse = jnp.mean((sols.ys - target) ** 2)
        reg = jnp.mean(sols.regularisers.error) if lam > 0 else 0.0
        return mse + lam * reg

    @eqx.filter_jit
    def step(model, state):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, state = opt.update(grads, state, model)
        return eqx.apply_updates(model, updates), state, loss

    state = opt.init(eqx.filter(model, eqx.is_array))
    start = time.perf_counter()
    for _ in range(steps):
        model, state, loss = step(model, state)
    jax.block_until_ready(loss)
    return model, time.perf_counter() - start


@eqx.filter_jit
def evaluate(model, y0s, target):
    sols = solve_batch(model, y0s, regularise=True)
    return (jnp.mean((sols.ys - target) ** 2), jnp.mean(sols.stats["num_fevals"].astype(jnp.float32)),
            jnp.mean(sols.regularisers.error))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    train_y0 = initial_states(jax.random.PRNGKey(0), 16)
    test_y0 = initial_states(jax.random.PRNGKey(1), 64)
    train_ys, test_ys = data(train_y0), data(test_y0)
    rows = []
    for lam in LAMBDAS:
        model, seconds = train(lam, args.steps, train_y0, train_ys)
        tr = [float(v) for v in evaluate(model, train_y0, train_ys)]
        te = [float(v) for v in evaluate(model, test_y0, test_ys)]
        rows.append(dict(lam=lam, train_mse=tr[0], train_nfe=tr[1], test_mse=te[0], test_nfe=te[1],
                         error_reg=tr[2], train_seconds=seconds))
        print(rows[-1], flush=True)
    base = rows[0]
    print(f"\n{args.steps} Adam steps; ratios against lambda = 0\n")
    print("| lambda | train MSE | test MSE | MSE / unregularised | NFE per trajectory (test) | NFE / unregularised |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['lam']:g} | {r['train_mse']:.3g} | {r['test_mse']:.3g} | {r['test_mse'] / base['test_mse']:.2f} "
              f"| {r['test_nfe']:.1f} | {r['test_nfe'] / base['test_nfe']:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(steps=args.steps, rtol=RTOL, atol=ATOL, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
