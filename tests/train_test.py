"""Training system: a tiny digits run end to end, exact resume, sharding, NaN handling."""

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from cfg_guidance import samples, train
from cfg_guidance import state as state_lib
from cfg_guidance.data import pipeline
from cfg_guidance.runtime import checkpointing, sharding
from configs import digits


def tiny_config(**train_overrides):
  config = digits.get_config()
  m = config.model
  m.base_channels, m.channel_mult, m.num_res_blocks = 16, (1, 2), 1
  m.attention_resolutions, m.num_heads, m.num_head_channels = (4,), 2, -1
  m.num_groups, m.dropout = 8, 0.1
  t = config.train
  t.num_steps, t.batch_size, t.learning_rate, t.warmup_steps = 24, 16, 2e-3, 2
  t.log_every, t.checkpoint_every, t.sample_every, t.sample_at_end = 4, 12, 12, False
  t.evaluate_at_end = False
  t.update(train_overrides)
  config.grid.classes, config.grid.num_steps = (0, 1, 2), 4
  s = config.sample
  s.guidance_weights, s.num_samples, s.batch_size, s.num_steps = (0.0, 2.0), 6, 4, 4
  return config


def restored_state(config, workdir, step=None):
  mesh = sharding.create_mesh(jax.devices()[:1])
  tx = train.make_optimizer(config.train)
  state, _ = state_lib.create(config.model, config.sharding, seed=config.seed, mesh=mesh,
                              tx=tx)
  ckpt = checkpointing.Checkpointer(workdir, create=False)
  return ckpt.restore(checkpointing.abstract_like(state), step=step)[1]


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("tiny_run")
  config = tiny_config()
  state = train.run(config, str(workdir))
  return config, workdir, state


def test_tiny_run_loss_falls_and_writes_outputs(tiny_run):
  config, workdir, state = tiny_run
  assert int(state.step) == config.train.num_steps
  acc = event_accumulator.EventAccumulator(
      str(workdir), size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  tags = acc.Tags()
  losses = [_scalar(e) for e in acc.Tensors("loss")]
  assert len(losses) == config.train.num_steps // config.train.log_every
  assert losses[-1] < 0.8 * losses[0], losses
  assert "ema_samples" in tags["tensors"]
  ckpt = checkpointing.Checkpointer(workdir, create=False)
  assert ckpt.all_steps() == [12, 24]
  pngs = sorted(p.name for p in (workdir / "grids").iterdir())
  assert pngs == ["step_00000012.png", "step_00000024.png"]


def _scalar(event):
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  return float(tensor_util.make_ndarray(event.tensor_proto))


def test_exact_resume_is_bit_identical(tiny_run, tmp_path):
  config, workdir, _ = tiny_run
  half = tiny_config(num_steps=12)
  train.run(half, str(tmp_path))
  train.run(tiny_config(), str(tmp_path))  # Resumes at 12, runs to 24.
  assert_trees_equal(restored_state(config, workdir, 24),
                     restored_state(config, tmp_path, 24))


@pytest.mark.parametrize("fsdp", [False, True])
def test_one_and_eight_devices_agree(tmp_path, fsdp):
  config = tiny_config(num_steps=6, checkpoint_every=6, sample_every=0, log_every=3)
  config.sharding.fsdp, config.sharding.fsdp_min_size = fsdp, 64
  one = train.run(config, str(tmp_path / "one"),
                                 mesh=sharding.create_mesh(jax.devices()[:1]))
  eight = train.run(config, str(tmp_path / "eight"),
                                   mesh=sharding.create_mesh(jax.devices()[:8]))
  if fsdp:  # Some parameters really are split over the 8 devices.
    specs = [x.sharding.spec for x in jax.tree.leaves(eight.params)]
    assert any(sharding.DATA_AXIS in spec for spec in specs)
  # Adam divides by √v, so round-off in near-zero gradients moves a parameter by up to a
  # fraction of one step (lr = 2e-3): hence atol 1e-4; a sharding bug moves whole steps.
  for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-4)


def _poison(monkeypatch, bad_positions):
  """Makes the batches at the given positions of the data stream all-NaN."""
  create = pipeline.create_dataset

  class Poisoned:
    def __init__(self, inner):
      self.inner, self.count = inner, 0

    def __next__(self):
      batch = dict(next(self.inner))
      if self.count in bad_positions:
        batch["image"] = np.full_like(batch["image"], np.nan)
      self.count += 1
      return batch

    def get_state(self):
      return self.inner.get_state()

    def set_state(self, state):
      self.inner.set_state(state)

    def __getattr__(self, name):  # num_classes, example_shape, ...
      return getattr(self.inner, name)

  monkeypatch.setattr(pipeline, "create_dataset",
                      lambda *a, **k: Poisoned(create(*a, **k)))


def test_nan_batch_is_skipped_and_counted(tmp_path, monkeypatch):
  _poison(monkeypatch, {3})
  config = tiny_config(num_steps=6, checkpoint_every=6, sample_every=0, log_every=3)
  state = train.run(config, str(tmp_path))
  assert int(state.num_nonfinite) == 1 and int(state.step) == 6
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_repeated_nans_stop_training_and_keep_checkpoint(tmp_path, monkeypatch):
  _poison(monkeypatch, set(range(6, 100)))
  config = tiny_config(num_steps=20, checkpoint_every=5, sample_every=0, log_every=5,
                       max_consecutive_nonfinite=3)
  with pytest.raises(train.NonFiniteError, match=r"3 consecutive .* step"):
    train.run(config, str(tmp_path))
  state = restored_state(config, tmp_path)
  assert int(state.step) == 5
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_sample_mode_writes_documented_npz(tiny_run):
  config, workdir, _ = tiny_run
  paths = samples.run(config, str(workdir))
  assert [p.name for p in paths] == ["step_24_w0.npz", "step_24_w2.npz"]
  with np.load(paths[1], allow_pickle=False) as f:
    assert f["images"].dtype == np.uint8 and f["images"].shape == (6, 8, 8, 1)
    assert f["labels"].shape == (6,) and f["guidance_weight"].shape == (6,)
    np.testing.assert_array_equal(f["guidance_weight"], 2.0)
    first = f["images"].copy()
  assert paths[1].with_suffix(".png").exists()
  again = samples.run(config, str(workdir))
  with np.load(again[1], allow_pickle=False) as f:
    np.testing.assert_array_equal(f["images"], first)


@pytest.mark.parametrize("field,value,match", [
    ("data.name", "mnist", "config.data.name"),
    ("train.batch_size", 12, "config.train.batch_size"),
    ("diffusion.p_uncond", 1.5, "config.diffusion.p_uncond"),
])
def test_bad_configs_fail_before_compute(tmp_path, field, value, match):
  config = tiny_config()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=match):
    train.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_unwritable_workdir_is_named(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match="--workdir"):
    train.run(tiny_config(), str(blocker / "sub"))


def test_toy2d_trains_and_draws_fig2_with_the_learned_model(tmp_path):
  from configs import toy2d  # pylint: disable=g-import-not-at-top
  config = toy2d.get_config()
  config.model.hidden, config.model.num_blocks = 32, 1
  t = config.train
  t.num_steps, t.batch_size, t.log_every, t.checkpoint_every = 20, 64, 10, 20
  config.sample.num_samples, config.sample.num_steps = 30, 8
  state = train.run(config, str(tmp_path))
  assert int(state.step) == 20
  samples.run(config, str(tmp_path))  # What main runs next (toy2d's sample_at_end).
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(tmp_path / "samples" / "step_20_fig2.png") as image:
    # Three rows (exact densities, exact-score samples, learned samples) × three weights.
    assert image.size == (3 * 3 * 80, 3 * 3 * 80)
