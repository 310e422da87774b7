"""Child program for tests/test_launchers.py, started by ``launch.local.run_local``.

Takes the same distributed flags as ``train.main`` (``--coordinator_address``, ``--num_processes``,
``--process_id``), joins the job with ``jax.distributed.initialize``, builds one global array over
all devices of all processes from process-local rows, and prints its jitted global sum as
``GLOBAL_SUM=<value> process=<i> process_count=<n> device_count=<d>``.

``--fail_on_process=K`` makes process K exit with code 3 at once (before importing jax) and every
other process sleep; it tests that the launcher kills the survivors.
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator_address", required=True)
    ap.add_argument("--num_processes", type=int, required=True)
    ap.add_argument("--process_id", type=int, required=True)
    ap.add_argument("--rows_per_device", type=int, default=3)
    ap.add_argument("--fail_on_process", type=int, default=-1)
    args, _ = ap.parse_known_args()

    if args.fail_on_process >= 0:
        if args.process_id == args.fail_on_process:
            print(f"process {args.process_id}: failing on purpose", flush=True)
            return 3
        print(f"process {args.process_id}: sleeping", flush=True)
        time.sleep(120)
        return 0

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    jax.distributed.initialize(
        coordinator_address=args.coordinator_address,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    assert jax.process_count() == args.num_processes, jax.process_count()
    assert jax.process_index() == args.process_id, jax.process_index()

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    # Global rows are 0..(device_count*rows_per_device - 1); each process holds its contiguous block.
    local_rows = jax.local_device_count() * args.rows_per_device
    start = jax.process_index() * local_rows
    local = np.arange(start, start + local_rows, dtype=np.float32)
    global_array = jax.make_array_from_process_local_data(sharding, local)
    assert global_array.shape == (jax.device_count() * args.rows_per_device,), global_array.shape

    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(global_array)
    print(
        f"GLOBAL_SUM={float(total)} process={jax.process_index()} "
        f"process_count={jax.process_count()} device_count={jax.device_count()}",
        flush=True,
    )
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
