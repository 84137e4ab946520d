"""An ensemble solved by two processes, each with two CPU devices, as on two hosts.

Run with ``python docs/examples/ensemble_multiprocess.py``: the script starts its two
workers itself (``--worker PORT ID``), on this machine, and waits for them. Each
worker joins the same JAX runtime (``jax.distributed.initialize``), builds its half of
a batch of Lotka-Volterra parameters as a global array
(``jax.make_array_from_process_local_data``), and calls ``diffode.solve_ensemble``,
the same call as on one process: the four devices of the two processes solve two
members each. Process 0 checks the gathered result, and the gradient of a loss over
the whole batch with respect to the shared initial state, against a solve in one
process, and prints them. On real hosts, run one worker per host with the first
host's address as ``coordinator_address``.
"""

import os
import socket
import subprocess
import sys

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
MEMBERS = 8  # a multiple of the 4 devices: the results stay split across them


def parameters():
    """Every member's (alpha, beta, gamma, delta): the classic values, each scaled in [0.5, 1.5]."""
    import numpy as np

    scale = np.random.default_rng(0).uniform(0.5, 1.5, (MEMBERS, 4))
    return np.array([1.5, 1.0, 3.0, 1.0]) * scale


def lotka_volterra(t, y, args):
    import jax.numpy as jnp

    alpha, beta, gamma, delta = args[0], args[1], args[2], args[3]
    prey, predator = y[0], y[1]
    return jnp.stack([alpha * prey - beta * prey * predator, delta * prey * predator - gamma * predator])


def worker(port: int, process_id: int) -> None:
    import jax

    # Before any other JAX call: join the runtime of all processes.
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=NUM_PROCESSES, process_id=process_id
    )
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import diffode

    assert jax.process_count() == NUM_PROCESSES and len(jax.devices()) == NUM_PROCESSES * DEVICES_PER_PROCESS
    # Shared inputs are NumPy arrays (the same in every process); the batched one is a
    # global array of which each process holds its own rows.
    ts = np.linspace(0.0, 10.0, 11)
    y0 = np.array([1.0, 1.0])
    mesh = Mesh(np.asarray(jax.devices()), ("members",))
    members = NamedSharding(mesh, PartitionSpec("members"))
    rows = MEMBERS // NUM_PROCESSES
    mine = parameters()[process_id * rows : (process_id + 1) * rows]
    args = jax.make_array_from_process_local_data(members, mine, (MEMBERS, 4))

    def solve(y0, args):
        return diffode.solve_ensemble(
            lotka_volterra, y0, ts, args, batch_y0=False, batch_args=True, rtol=1e-8, atol=1e-8
        )

    def loss(y0, args):  # the mean final prey population over the whole batch
        return jnp.mean(solve(y0, args).ys[:, -1, 0])

    sol = solve(y0, args)
    grad = jax.grad(loss)(y0, args)  # a shared input: summed over both processes' members
    ys = multihost_utils.process_allgather(sol.ys, tiled=True)  # every process gets all rows
    spans = sorted({d.process_index for d in sol.ys.sharding.device_set})
    if process_id == 0:
        # The reference: plain vmap over the whole batch, in this process alone.
        def one(y0, a):
            return diffode.solve(lotka_volterra, y0, ts, a, rtol=1e-8, atol=1e-8).ys

        def ref_solve(y0):
            return jax.vmap(one, in_axes=(None, 0))(y0, parameters())

        ref = ref_solve(y0)
        ref_grad = jax.grad(lambda y: jnp.mean(ref_solve(y)[:, -1, 0]))(y0)
        err = float(np.max(np.abs(ys - np.asarray(ref))))
        grad_err = float(np.max(np.abs(np.asarray(grad) - np.asarray(ref_grad))))
        where = f"{len(jax.devices())} devices of processes {spans}"
        print(f"{MEMBERS} members on {where}; result split {sol.ys.sharding.spec}")
        for i in range(MEMBERS):
            print(f"member {i}: prey(10) = {ys[i, -1, 0]:.8f}, predator(10) = {ys[i, -1, 1]:.8f}")
        print(f"d mean prey(10) / d y0 = {np.asarray(grad)}")
        print(f"largest difference from one process: states {err:.1e}, gradient {grad_err:.1e}")
        # The same arithmetic per member; only the order of the gradient's sum over members differs.
        if err > 1e-10 or grad_err > 1e-10 or spans != list(range(NUM_PROCESSES)):
            sys.exit("the multi-process ensemble does not match the single-process solve")


def launch() -> None:
    """Start the workers on a free local port and wait for both; fail if either fails."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
    )
    script = os.path.abspath(__file__)
    procs = [
        subprocess.Popen([sys.executable, script, "--worker", str(port), str(i)], env=env)
        for i in range(NUM_PROCESSES)
    ]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        raise RuntimeError(f"worker exit codes {codes}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]), int(sys.argv[3]))
    else:
        launch()
