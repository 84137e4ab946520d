"""Quickstart: solve Lotka-Volterra with diffode and differentiate the solution.

Run with ``python docs/examples/quickstart.py``.
"""

import jax
import jax.numpy as jnp

import diffode

# diffode follows the dtype of y0 and never changes JAX's configuration; this
# example wants float64, so it switches it on itself.
jax.config.update("jax_enable_x64", True)


def lotka_volterra(t, y, args):
    alpha, beta, gamma, delta = args
    prey, predator = y
    return jnp.stack([alpha * prey - beta * prey * predator, delta * prey * predator - gamma * predator])


y0 = jnp.array([1.0, 1.0])
args = jnp.array([1.5, 1.0, 3.0, 1.0])
ts = jnp.linspace(0.0, 10.0, 101)


@jax.jit
def simulate(args):
    return diffode.solve(lotka_volterra, y0, ts, args, solver=diffode.Tsit5(), rtol=1e-8, atol=1e-8)


sol = simulate(args)
print(f"status: {int(sol.status)} ({sol.message})")
print({k: int(v) for k, v in sol.stats.items()})
for i in (0, 25, 50, 100):
    print(
        f"t = {float(ts[i]):5.2f}   prey = {float(sol.ys[i, 0]):.8f}   predator = {float(sol.ys[i, 1]):.8f}"
    )


def loss(args):
    return jnp.sum(simulate(args).ys ** 2)


# Reverse mode (the default sensitivity method, Auto) and forward mode through the steps.
grad = jax.grad(loss)(args)
grad_fwd = jax.jacfwd(loss)(args)
eps = 1e-6
fd = jnp.array([(loss(args.at[i].add(eps)) - loss(args.at[i].add(-eps))) / (2 * eps) for i in range(4)])
print("d loss / d (alpha, beta, gamma, delta), jax.grad:  ", grad)
print("                                        jax.jacfwd:", grad_fwd)
print("central finite differences:                        ", fd)
