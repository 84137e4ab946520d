"""Train a neural ODE on a spiral with diffode, equinox and optax.

Run with ``python docs/examples/neural_ode_spiral.py``.

The data are trajectories of the damped linear spiral ``y' = A y`` with
``A = [[-0.1, 2], [-2, -0.1]]`` from a few initial states. The model is
``y' = MLP(y)``: an ``equinox.Module`` passed to ``diffode.solve`` as the vector field
itself, so its weights are what ``jax.grad`` differentiates. The script exits with an
error unless training cuts the loss at least tenfold.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

import diffode

# Everything here is float32, the usual neural-network precision (diffode follows the
# dtype of y0 and never switches x64 on; explicit dtypes keep it float32 even if it is).
DTYPE = jnp.float32


class VectorField(eqx.Module):
    mlp: eqx.nn.MLP

    def __init__(self, key):
        self.mlp = eqx.nn.MLP(2, 2, width_size=32, depth=2, activation=jnp.tanh, dtype=DTYPE, key=key)

    def __call__(self, t, y, args):
        return self.mlp(y)


def solve(model, y0, ts):
    # The default sensitivity method, Auto(), differentiates through the solver's steps
    # here (Direct: an explicit solver and thousands of parameters), the fastest reverse
    # mode for a neural ODE; under vmap it differentiates all trajectories at once.
    sol = diffode.solve(model, y0, ts, solver=diffode.Tsit5(), rtol=1e-3, atol=1e-6)
    return sol.ys


# Data: the exact solution y(t) = expm(A t) y0 at 30 times, from 8 initial states.
A = jnp.array([[-0.1, 2.0], [-2.0, -0.1]], DTYPE)
ts = jnp.linspace(0.0, 3.0, 30, dtype=DTYPE)
y0s = jr.uniform(jr.PRNGKey(0), (8, 2), DTYPE, minval=-1.0, maxval=1.0)
propagators = jax.vmap(lambda t: jax.scipy.linalg.expm(A * t))(ts)  # (30, 2, 2)
data = jnp.einsum("tij,bj->bti", propagators, y0s)  # (8, 30, 2)


@eqx.filter_jit
def loss_fn(model, y0s, data):
    ys = jax.vmap(solve, in_axes=(None, 0, None))(model, y0s, ts)  # one solve per initial state
    return jnp.mean((ys - data) ** 2)


optimizer = optax.adam(3e-3)


@eqx.filter_jit
def train_step(model, opt_state, y0s, data):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, y0s, data)
    updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return loss, eqx.apply_updates(model, updates), opt_state


model = VectorField(jr.PRNGKey(1))
opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
initial = float(loss_fn(model, y0s, data))
for step in range(300):
    loss, model, opt_state = train_step(model, opt_state, y0s, data)
    if step % 50 == 0:
        print(f"step {step:4d}   loss {float(loss):.5f}")
final = float(loss_fn(model, y0s, data))
print(f"loss: initial {initial:.5f}, final {final:.5f} ({initial / final:.0f}x smaller)")
if not final * 10 <= initial:
    raise SystemExit(f"training did not cut the loss tenfold: {initial:.5f} -> {final:.5f}")
