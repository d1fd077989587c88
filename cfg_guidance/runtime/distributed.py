"""Multi-process start-up (`jax.distributed.initialize` on pods, clusters or localhost),
and the few host-side collectives the jobs use."""

import os

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np


def _auto_detected() -> bool:
  """True on a multi-host Cloud TPU slice or inside a multi-task SLURM job."""
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in tpu_hosts.split(",") if h]) > 1:
    return True
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins the other processes of the job, or does nothing for a single process.

  With explicit arguments (all three), they are passed on; otherwise JAX finds its peers
  itself on Cloud TPU and under SLURM.
  """
  given = [a is not None for a in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise ValueError("--coordinator_address, --num_processes and --process_id go together; "
                     f"got {coordinator_address!r}, {num_processes!r}, {process_id!r}.")
  if all(given):
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must lie in [0, --num_processes="
                       f"{num_processes}).")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif _auto_detected():
    jax.distributed.initialize()
  else:
    return
  logging.info("Joined process group: process %d of %d.", jax.process_index(),
               jax.process_count())


def gather(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
  """Every process's rows, concatenated in process order (identity in one process).

  Every process must call it with arrays of the same shapes.
  """
  if jax.process_count() == 1:
    return arrays
  return tuple(np.asarray(a) for a in multihost_utils.process_allgather(arrays, tiled=True))


def chief_says(flag: bool) -> bool:
  """Process 0's answer on every process, so that collective loops agree."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def chief_value(value: int) -> int:
  """Process 0's integer on every process."""
  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier called `name`."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
