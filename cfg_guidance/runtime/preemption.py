"""Preemption: a SIGTERM becomes a checkpoint at the next step boundary and a clean exit.

With several processes, JAX's preemption service (started by `jax.distributed.initialize`)
catches the signal and makes every process agree on the same step; a single process
catches SIGTERM itself.
"""

import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """`reached(step)` is True once the job has been told to stop (on every process)."""

  def __init__(self):
    self._multi_process = jax.process_count() > 1
    self._signalled = threading.Event()
    self._previous = None
    if not self._multi_process and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del frame
    logging.warning("Received signal %d: will checkpoint at the next step boundary.", signum)
    self._signalled.set()

  def reached(self, step: int) -> bool:
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
