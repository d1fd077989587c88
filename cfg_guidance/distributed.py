"""Multi-process start-up: `jax.distributed.initialize` on pods, clusters or localhost."""

import os

from absl import logging
import jax


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
