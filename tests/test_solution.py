"""The Solution object: the Stats mapping and status messages."""

import jax
import jax.numpy as jnp
import pytest

import diffode


def decay(t, y, args):
    return -y


def test_stats_is_a_read_only_mapping_of_counters():
    sol = diffode.solve(decay, jnp.ones(2), jnp.linspace(0.0, 1.0, 5))
    stats = dict(sol.stats)
    assert set(stats) == {"num_steps", "num_accepted", "num_rejected", "num_fevals"}
    assert int(stats["num_steps"]) == int(stats["num_accepted"]) + int(stats["num_rejected"])
    assert all(v.dtype == jnp.int32 and v.shape == () for v in stats.values())
    with pytest.raises(KeyError):
        sol.stats["no_such_counter"]
    assert "num_fevals=" in repr(sol.stats)


def test_stats_survive_jit_and_vmap():
    ts = jnp.linspace(0.0, 5.0, 4)

    @jax.jit
    def steps(rate):
        return diffode.solve(lambda t, y, a: -a * y, jnp.ones(1), ts, rate).stats

    single = [int(steps(r)["num_steps"]) for r in (0.5, 20.0)]
    batched = jax.vmap(steps)(jnp.array([0.5, 20.0]))["num_steps"]
    # Each batch member reports its own count (a stiffer decay needs more steps).
    assert batched.tolist() == single and single[0] < single[1]


def test_message_names_the_status():
    sol = diffode.solve(decay, jnp.ones(2), jnp.array([0.0, 1.0, 0.5]), throw=False)
    assert int(sol.status) == diffode.Status.TS_NOT_MONOTONIC
    assert "strictly increasing" in sol.message
