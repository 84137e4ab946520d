"""Where forward sensitivities stop paying: the measurement behind ``diffode.Auto``.

A dense neural-ODE-like problem ``y' = tanh(W y + b)`` with ``n`` states and
``p = n**2 + n`` parameters, gradient of ``sum(ys**2)`` over 20 save points in
``t in [0, 2]``, Tsit5, rtol = atol = 1e-6, float64. For growing ``n`` it times
(median run time, interleaved) ``ForwardSensitivity`` against
``InterpolatingAdjoint`` and ``BacksolveAdjoint`` and prints the augmented size
``n * (p + 1)`` at which the adjoint becomes faster. Run::

    python -m benchmarks.auto_threshold
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)

import sys  # noqa: E402

import jax.numpy as jnp  # noqa: E402

import diffode  # noqa: E402

from . import _timing  # noqa: E402

SIZES = (2, 4, 8, 12, 16, 24)


def field(t, y, params):
    w, b = params
    return jnp.tanh(w @ y + b)


def grad_fn(method, n):
    ts = jnp.linspace(0.0, 2.0, 20)

    def loss(params, y0):
        return jnp.sum(diffode.solve(field, y0, ts, params, rtol=1e-6, atol=1e-6, sensitivity=method).ys ** 2)

    return jax.jit(jax.grad(loss))


def main() -> None:
    rows = []
    for n in SIZES:
        key = jax.random.PRNGKey(n)
        params = (jax.random.normal(key, (n, n)) / jnp.sqrt(n), jnp.zeros(n))
        y0 = jnp.linspace(-1.0, 1.0, n)
        cands = {
            "ForwardSensitivity": grad_fn(diffode.ForwardSensitivity(), n),
            "InterpolatingAdjoint": grad_fn(diffode.InterpolatingAdjoint(), n),
            "BacksolveAdjoint": grad_fn(diffode.BacksolveAdjoint(), n),
        }
        print(f"# n = {n}", file=sys.stderr)
        t = _timing.run_times({k: (f, (params, y0)) for k, f in cands.items()}, repeats=5, min_time=0.05)
        size = n * (n * n + n + 1)
        rows.append((n, size, {k: v.median * 1e3 for k, v in t.items()}))
    print("| n | n·(p+1) | ForwardSensitivity (ms) | InterpolatingAdjoint (ms) | BacksolveAdjoint (ms) |")
    print("|---:|---:|---:|---:|---:|")
    for n, size, r in rows:
        print(f"| {n} | {size} | {r['ForwardSensitivity']:.3f} | {r['InterpolatingAdjoint']:.3f} | "
              f"{r['BacksolveAdjoint']:.3f} |")
    faster = [size for n, size, r in rows if r["ForwardSensitivity"] <= r["InterpolatingAdjoint"]]
    slower = [size for n, size, r in rows if r["ForwardSensitivity"] > r["InterpolatingAdjoint"]]
    print(f"\nForwardSensitivity no slower than InterpolatingAdjoint up to n·(p+1) = {max(faster) if faster else 0}; "
          f"slower from {min(slower) if slower else 'never (in this range)'}")


if __name__ == "__main__":
    main()
