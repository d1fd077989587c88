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
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
    s, restored = self._restore_first(step, args)
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
    s, restored = self._restore_first(step, args)
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

  def _restore_first(self, step: int | None, args: ocp.args.Composite) -> tuple[int, Any]:
    """The first of `step` (or of every step, newest first) that restores with `args`."""
    steps = self.all_steps()
    candidates = [step] if step is not None else steps[::-1]
    if not candidates:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    errors = []
    for s in candidates:
      if s not in steps:
        raise CheckpointError(f"no checkpoint for step {s} in {self.directory} "
                              f"(available: {steps})")
      try:
        return s, self._manager.restore(s, args=args)
      except Exception as e:  # pylint: disable=broad-except
        logging.error("Checkpoint %s could not be restored (%s: %s); trying an older one.",
                      self.step_path(s), type(e).__name__, e)
        errors.append(f"{self.step_path(s)}: {type(e).__name__}: {e}")
    raise CheckpointError("no checkpoint could be restored:\n  " + "\n  ".join(errors))

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays, as a restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
