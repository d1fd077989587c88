"""Orbax checkpoints of the train state, the data-iterator position and the config.

Saves are atomic (Orbax writes to a temporary directory and renames it when complete), so
an interrupted save is never picked up. A latest checkpoint that fails to restore is
reported by path and the previous one is used instead; nothing is deleted.
"""

import json
import logging
from typing import Any

from etils import epath
import jax
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
    """Starts an asynchronous save; every process must call it."""
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
            config=ocp.args.JsonSave(json.loads(json.dumps(config or {}, default=str)))),
        force=force)

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[int, Any, dict]:
    """Restores `(step, state, data_state)`; `abstract_state` gives structure and shardings.

    With `step=None`, tries the newest checkpoint first and falls back to older ones when
    a checkpoint cannot be read. An explicit `step` must restore or raise.
    """
    candidates = [step] if step is not None else self.all_steps()[::-1]
    if not candidates:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    errors = []
    for s in candidates:
      if s not in self.all_steps():
        raise CheckpointError(f"no checkpoint for step {s} in {self.directory} "
                              f"(available: {self.all_steps()})")
      try:
        restored = self._manager.restore(
            s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                       data=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        logging.error("Checkpoint %s could not be restored (%s: %s); trying an older one.",
                      self.step_path(s), type(e).__name__, e)
        errors.append(f"{self.step_path(s)}: {type(e).__name__}: {e}")
        continue
      return s, restored.state, dict(restored.data or {})
    raise CheckpointError("no checkpoint could be restored:\n  " + "\n  ".join(errors))

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays, as a restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
