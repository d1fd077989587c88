"""Orbax checkpoints of the train state, the data-iterator position and the config.

Saves are atomic (Orbax writes to a temporary directory and renames it when complete), so
an interrupted save is never picked up. A latest checkpoint that fails to restore, or whose
parameters are not finite, is reported by path and the previous one is used instead;
nothing is deleted (training moves it aside, to checkpoints/unreadable/, so that it can save
that step again). A save that Orbax refuses or that fails raises at once. `WorkdirLock`
keeps a second training process off a workdir in use.
"""

import datetime
import fcntl
import json
import logging
import os
import re
import socket
from typing import Any, Callable

from etils import epath
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """No checkpoint in a directory could be restored."""


class Checkpointer:
  """Saves and restores `{state, data, config}` under `workdir/checkpoints`."""

  def __init__(self, workdir: str | epath.Path, *, max_to_keep: int | None = 3,
               create: bool = True):
    self.directory = epath.Path(workdir) / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data", "config"))
    self.unreadable: list[int] = []  # Steps the last restore passed over, newest first.

  def all_steps(self) -> list[int]:
    self._manager.reload()  # Another process (or job) may have written since.
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_path(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def save(self, step: int, state: Any, *, data_state: dict | None = None,
           config: dict | None = None, force: bool = False) -> None:
    """Starts an asynchronous save; every process must call it.

    Raises CheckpointError if an earlier asynchronous save failed, or if Orbax declines
    this one (it saves no step at or below the newest on disk).
    """
    self.check_for_errors()
    saved = self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            config=ocp.args.JsonSave(json.loads(json.dumps(config or {}, default=str)))),
        force=force)
    if not saved:
      raise CheckpointError(
          f"Orbax did not save step {step} to {self.step_path(step)} (the newest "
          f"checkpoint there is step {self.latest_step()}; Orbax saves no step at or below "
          "it). Nothing was written.")

  def check_for_errors(self) -> None:
    """Raises CheckpointError if an asynchronous save has failed."""
    try:
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"a checkpoint save under {self.directory} failed: "
                            f"{type(e).__name__}: {e}") from e

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[int, Any, dict]:
    """Restores `(step, state, data_state)`; `abstract_state` gives structure and shardings.

    With `step=None`, tries the newest checkpoint first and falls back to older ones when
    a checkpoint cannot be read. An explicit `step` must restore or raise.
    """
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
    s, restored = self._restore_first(step, args, lambda r: check_finite(r.state, "state"))
    return s, restored.state, dict(restored.data or {})

  def restore_subtree(self, name: str, abstract: Any, step: int | None = None
                      ) -> tuple[int, Any, dict]:
    """`(step, state.<name>, config)`: one field of the saved state and the run's config.

    Reads only that field's arrays (e.g. the EMA parameters, not the optimizer's
    moments), whatever else the state holds. Falls back as `restore` does.
    """
    target = {name: abstract}
    args = ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True),
        config=ocp.args.JsonRestore())
    s, restored = self._restore_first(
        step, args, lambda r: check_finite(r.state[name], f"state.{name}"))
    if not restored.config:
      raise CheckpointError(f"{self.step_path(s)} holds no config: it was not written by "
                            "cfg_guidance's training.")
    return s, restored.state[name], dict(restored.config)

  def read_config(self, step: int | None = None) -> dict:
    """The config saved with checkpoint `step` (None: the newest), as a dict."""
    step = self.latest_step() if step is None else step
    if step is None or step not in self.all_steps():
      raise CheckpointError(f"no checkpoint {'' if step is None else f'for step {step} '}"
                            f"in {self.directory} (available: {self.all_steps()})")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"cannot read the config of {self.step_path(step)}: "
                            f"{type(e).__name__}: {e}") from e
    if not restored.config:
      raise CheckpointError(f"{self.step_path(step)} holds no config: it was not written "
                            "by cfg_guidance's training.")
    return dict(restored.config)

  def _restore_first(self, step: int | None, args: ocp.args.Composite,
                     check: Callable[[Any], None]) -> tuple[int, Any]:
    """The first of `step` (or of every step, newest first) that restores with `args`
    and passes `check`; the steps that did not are left in `self.unreadable`."""
    steps = self.all_steps()
    candidates = [step] if step is not None else steps[::-1]
    if not candidates:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    errors, self.unreadable = [], []
    for s in candidates:
      if s not in steps:
        raise CheckpointError(f"no checkpoint for step {s} in {self.directory} "
                              f"(available: {steps})")
      try:
        restored = self._manager.restore(s, args=args)
        check(restored)
        return s, restored
      except Exception as e:  # pylint: disable=broad-except
        logging.error("Checkpoint %s could not be restored (%s: %s)%s.", self.step_path(s),
                      type(e).__name__, e, "" if step is not None else "; trying an older one")
        errors.append(f"{self.step_path(s)}: {type(e).__name__}: {e}")
        self.unreadable.append(s)
    raise CheckpointError("no checkpoint could be restored:\n  " + "\n  ".join(errors))

  def set_aside(self, steps: list[int]) -> list[epath.Path]:
    """Moves checkpoints to checkpoints/unreadable/<step>-<UTC time> (process 0; every
    process must call it), so that training can save those steps again."""
    moved = []
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    for s in steps:
      target = self.directory / "unreadable" / f"{s}-{stamp}"
      if jax.process_index() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        self.step_path(s).rename(target)
        logging.warning("Moved unreadable checkpoint %s to %s.", self.step_path(s), target)
      moved.append(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("checkpoints_set_aside")
    self._manager.reload()
    return moved

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


class NonFiniteCheckpointError(ValueError):
  """Restored arrays hold NaN or inf."""


def check_finite(tree: Any, what: str) -> None:
  """Raises NonFiniteCheckpointError naming the leaves of `tree` that are not finite."""
  pairs = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  if not pairs:
    return
  paths, leaves = zip(*pairs)
  finite = jax.device_get(jax.jit(lambda ls: jnp.stack([jnp.isfinite(x).all() for x in ls]))(
      list(leaves)))
  bad = [p for p, ok in zip(paths, finite) if not ok]
  if bad:
    raise NonFiniteCheckpointError(
        f"{what} holds NaN or inf in {len(bad)} of {len(leaves)} arrays, e.g. {bad[:3]}")


class WorkdirInUseError(RuntimeError):
  """Another training process holds the workdir."""


class WorkdirLock:
  """An exclusive lock on `workdir/train.lock` for the life of one training run.

  An `flock`, so the operating system releases it when the holder exits, however it
  exits (SIGKILL included): there are no stale locks. Process 0 of a job takes it and
  every process learns the outcome. Object-store paths (gs://) cannot be locked: there
  the lock is skipped with a warning.
  """

  def __init__(self, workdir: str | epath.Path):
    self.path = epath.Path(workdir) / "train.lock"
    self._fd = None

  def __enter__(self) -> "WorkdirLock":
    from cfg_guidance.runtime import distributed  # pylint: disable=g-import-not-at-top
    holder = None
    if jax.process_index() == 0:
      holder = self._acquire()
    if not distributed.chief_says(holder is None):
      self.__exit__()
      raise WorkdirInUseError(
          f"{self.path.parent} is in use by another training process"
          f"{f' ({holder})' if holder else ''}: two trainers would overwrite each other's "
          f"checkpoints. Wait for it to finish, stop it, or choose another --workdir. (The "
          f"lock is {self.path}, released when its holder exits.)")
    return self

  def _acquire(self) -> str | None:
    """None when taken; else what the holder wrote."""
    if re.match(r"^[a-z][a-z0-9+.-]*://", str(self.path)):
      logging.warning("%s is not a local path: it cannot be locked against a second "
                      "training process.", self.path)
      return None
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 512).decode(errors="replace").strip()
      os.close(fd)
      return holder or "unknown holder"
    os.ftruncate(fd, 0)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {now}".encode())
    self._fd = fd
    return None

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays, as a restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
