"""Checkpoints: newest first, a corrupt one is reported and skipped, a partial one unseen."""

import logging
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from cfg_guidance.runtime import checkpointing


def _state(value):
  return {"w": jnp.full((4, 3), value, jnp.float32), "step": jnp.asarray(int(value))}


def _save(ckpt, step):
  ckpt.save(step, _state(step), data_state={"step": step}, config={"seed": 0})
  ckpt.wait_until_finished()


def test_corrupt_latest_is_reported_by_path_and_previous_used(tmp_path, caplog):
  ckpt = checkpointing.Checkpointer(tmp_path, max_to_keep=5)
  _save(ckpt, 1)
  _save(ckpt, 2)
  for f in pathlib.Path(ckpt.step_path(2), "state").rglob("*"):
    if f.is_file() and "METADATA" not in f.name.upper():
      f.write_bytes(b"garbage")
  with caplog.at_level(logging.ERROR):
    step, state, data = checkpointing.Checkpointer(tmp_path).restore(
        checkpointing.abstract_like(_state(0)))
  assert step == 1 and data == {"step": 1}
  np.testing.assert_array_equal(np.asarray(state["w"]), 1.0)
  assert str(ckpt.step_path(2)) in caplog.text
  with pytest.raises(checkpointing.CheckpointError, match=str(ckpt.step_path(2))):
    checkpointing.Checkpointer(tmp_path).restore(checkpointing.abstract_like(_state(0)),
                                                 step=2)


def test_unfinished_save_is_never_picked_up(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path)
  _save(ckpt, 1)
  # What an interrupted save leaves: Orbax's temporary directory, never renamed.
  (tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-123" / "state").mkdir(parents=True)
  assert checkpointing.Checkpointer(tmp_path).all_steps() == [1]
  assert checkpointing.Checkpointer(tmp_path).restore(
      checkpointing.abstract_like(_state(0)))[0] == 1


def test_empty_directory_raises_naming_it(tmp_path):
  with pytest.raises(checkpointing.CheckpointError, match=str(tmp_path)):
    checkpointing.Checkpointer(tmp_path).restore(checkpointing.abstract_like(_state(0)))
