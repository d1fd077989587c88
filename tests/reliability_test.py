"""Reliability: every bad input a clear error before compute, every fault nothing lost.

Each row is one case: a config change and the message that must name it, or a fault and
what must survive it. README's "What survives what" lists these guarantees.
"""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from cfg_guidance import api, generate, samples, train
from cfg_guidance import state as state_lib
from cfg_guidance.runtime import checkpointing, sharding
import train_test

ROOT = pathlib.Path(__file__).resolve().parent.parent
NAN, INF = float("nan"), float("inf")


def _set(config, overrides: dict):
  for field, value in overrides.items():
    section, name = field.split(".")
    config[section][name] = value
  return config


def _image_folder(root: pathlib.Path, num_classes: int) -> str:
  for c in range(num_classes):
    (root / f"class_{c:02d}").mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 20 * c, np.uint8)).save(root / f"class_{c:02d}" / "a.png")
  return str(root)


# (config changes, what the error must say). Training must fail before any compute.
TRAIN_INPUTS = [
    ({"train.keep_checkpoints": 0}, r"config\.train\.keep_checkpoints=0 must be an int >= 1"),
    ({"train.log_every": 0}, r"config\.train\.log_every=0 must be an int >= 1"),
    ({"train.checkpoint_every": -1}, r"config\.train\.checkpoint_every=-1 must be an int >= 0"),
    ({"train.steps_per_dispatch": 0}, r"config\.train\.steps_per_dispatch=0 must be"),
    ({"train.steps_per_dispatch": 5}, r"num_steps=24 must be a multiple of .*=5"),
    ({"train.learning_rate": INF}, r"config\.train\.learning_rate=inf must be a finite number"),
    ({"train.b2": 2.0}, r"config\.train\.b2=2\.0 must be a finite number in \[0\.0, 1\.0\)"),
    ({"train.batch_size": 0}, r"config\.train\.batch_size=0 must be an int >= 1"),
    ({"train.max_consecutive_nonfinite": 0}, r"config\.train\.max_consecutive_nonfinite=0"),
    ({"model.num_classes": 9},
     r"config\.model\.num_classes=9 but data set digits has labels up to 9 .*label 9 is ∅"),
    ({"model.num_classes": 5}, r"config\.model\.num_classes=5 but .* labels up to 9"),
    ({"model.channels": 3}, r"gives \(8, 8, 1\): set config\.model\.channels=1"),
    ({"model.dtype": "fp16"}, r"config\.model\.dtype"),
    ({"model.attention_impl": "flash"}, r"config\.model\.attention_impl"),
    ({"grid.classes": (0, 11)}, r"config\.grid\.classes=\(0, 11\) must be .* in \[0, 9\]"),
    ({"grid.guidance_weights": (0.0, NAN)}, r"config\.grid\.guidance_weights=\(0\.0, nan\)"),
    ({"diffusion.p_uncond": 2.0}, r"config\.diffusion\.p_uncond=2\.0 must be"),
    ({"diffusion.logsnr_min": 30.0}, r"logsnr_min=30\.0 must be below"),
    ({"data.name": "mnist"}, r"config\.data\.name='mnist' must be one of"),
    ({"train.sample_at_end": True, "sample.batch_size": 0},
     r"config\.sample\.batch_size=0 must be an int >= 1"),
    ({"train.sample_at_end": True, "sample.guidance_weights": (INF,)},
     r"config\.sample\.guidance_weights=\(inf,\) must be a non-empty tuple of finite"),
]


@pytest.mark.parametrize("overrides,match", TRAIN_INPUTS,
                         ids=[",".join(o) + f"={list(o.values())[-1]}" for o, _ in TRAIN_INPUTS])
def test_bad_training_input_is_named_before_compute(tmp_path, overrides, match):
  config = _set(train_test.tiny_config(), overrides)
  with pytest.raises(ValueError, match=match):
    train.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "checkpoints").exists()
  assert not list((tmp_path / "w").glob("events.out*"))


def test_image_folder_with_more_classes_than_the_model_is_named(tmp_path):
  config = train_test.tiny_config()
  config.data.name, config.data.folder = "image_folder", _image_folder(tmp_path / "d", 12)
  config.model.channels = 3
  with pytest.raises(ValueError, match=r"num_classes=10 but data set image_folder at .*d "
                                       r"has labels up to 11 \(12 classes\)"):
    train.run(config, str(tmp_path / "w"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A finished tiny run: checkpoints at steps 4 and 8."""
  workdir = tmp_path_factory.mktemp("reliability")
  config = train_test.tiny_config(num_steps=8, checkpoint_every=4, sample_every=0)
  train.run(config, str(workdir), mesh=_one_device())
  return config, workdir


def _one_device():
  return sharding.create_mesh(jax.devices()[:1])


def _copy(run, tmp_path) -> pathlib.Path:
  shutil.copytree(run[1], tmp_path / "w")
  return tmp_path / "w"


SAMPLE_INPUTS = [
    ({"sample.guidance_weights": (1.0, INF)},
     r"config\.sample\.guidance_weights=\(1\.0, inf\) must be a non-empty tuple of finite"),
    ({"sample.num_samples": 0}, r"config\.sample\.num_samples=0 must be an int >= 1"),
    ({"sample.batch_size": 0}, r"config\.sample\.batch_size=0 must be an int >= 1"),
    ({"sample.classes": (3, 10)}, r"config\.sample\.classes=\(3, 10\) must be .*\[0, 9\]"),
    ({"sample.step": 5}, r"no checkpoint for step 5 .*available: \[4, 8\]"),
    ({"model.num_classes": 9},
     r"does not match the run at .*config\.model\.num_classes=9 \(the run has 10\)"),
]


@pytest.mark.parametrize("overrides,match", SAMPLE_INPUTS,
                         ids=[",".join(o) for o, _ in SAMPLE_INPUTS])
def test_bad_sampling_input_is_named_and_writes_nothing(run, overrides, match):
  config = _set(run[0].copy_and_resolve_references(), overrides)
  with pytest.raises((ValueError, checkpointing.CheckpointError), match=match):
    samples.run(config, str(run[1]))
  assert not (run[1] / "samples").exists()


def test_corrupt_final_checkpoint_is_set_aside_retrained_and_saved(run, tmp_path, caplog):
  """The newest checkpoint unreadable: training resumes from the one before, moves the
  bad one (not deleted) to checkpoints/unreadable/, and saves the final step again, so
  the next run finds it (Orbax saves no step at or below the newest on disk)."""
  config, _ = run
  workdir = _copy(run, tmp_path)
  for f in (workdir / "checkpoints" / "8" / "state").rglob("*"):
    if f.is_file() and "METADATA" not in f.name.upper():
      f.write_bytes(b"garbage")
  state = train.run(config, str(workdir), mesh=_one_device())
  assert int(state.step) == 8
  aside = list((workdir / "checkpoints" / "unreadable").iterdir())
  assert [p.name.split("-")[0] for p in aside] == ["8"]
  train_test.assert_trees_equal(train_test.restored_state(config, workdir, 8),
                                train_test.restored_state(config, run[1], 8))
  assert checkpointing.Checkpointer(workdir).all_steps() == [4, 8]


def _save_nan_ema(config, workdir, step):
  ckpt = checkpointing.Checkpointer(workdir)
  tx = train.make_optimizer(config.train)
  state, _ = state_lib.create(config.model, config.sharding, seed=0, mesh=_one_device(),
                              tx=tx)
  _, state, data = state_lib.restore(ckpt, state)
  nan_ema = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), state.ema_params)
  bad = state_lib.TrainState(**{**vars(state), "ema_params": nan_ema})
  ckpt.save(step, bad, data_state=data, config=config.to_dict())
  ckpt.wait_until_finished()


def test_nan_parameters_in_a_checkpoint_are_named_and_never_sampled(run, tmp_path, caplog):
  config, _ = run
  workdir = _copy(run, tmp_path)
  _save_nan_ema(config, workdir, 12)
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"checkpoints/12: NonFiniteCheckpointError: state\.ema_params "
                           r"holds NaN or inf"):
    api.load(workdir, step=12, mesh=_one_device())
  model = api.load(workdir, mesh=_one_device())  # The newest finite one, the bad named.
  assert model.step == 8 and "checkpoints/12" in caplog.text
  config = config.copy_and_resolve_references()
  config.sample.step = 12
  with pytest.raises(checkpointing.CheckpointError, match="NaN or inf"):
    samples.run(config, str(workdir))
  assert not (workdir / "samples").exists()


def test_nan_samples_raise_naming_labels_and_weights():
  settings = generate.Settings(shape=(2,), null_label=3, num_steps=2, clip_x="none",
                               batch_size=8)  # One batch of 5 and 3 padding rows.

  def eps_fn(z, logsnr, labels):  # ε NaN wherever the label is 1.
    return jnp.where((labels == 1)[:, None], jnp.nan, 0.0 * z)

  with pytest.raises(FloatingPointError,
                     match=r"samples \[1, 4\] came out NaN or inf \(labels \[1\], guidance "
                           r"weights \[2\.0\]\)"):
    generate.draw(eps_fn, [0, 1, 2, 0, 1], 2.0, settings=settings, seed=0,
                  mesh=_one_device())


def test_a_save_orbax_declines_is_an_error(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path)
  ckpt.save(10, {"w": jnp.ones(3)})
  ckpt.wait_until_finished()
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"did not save step 5 .*newest checkpoint there is step 10"):
    ckpt.save(5, {"w": jnp.ones(3)})


def test_checkpoints_path_that_is_a_file_is_named_before_compute(tmp_path):
  (tmp_path / "w").mkdir()
  (tmp_path / "w" / "checkpoints").write_text("not a directory")
  with pytest.raises(ValueError, match=r"w/checkpoints is not a directory"):
    train.run(train_test.tiny_config(), str(tmp_path / "w"))


_HOLD_LOCK = """
import sys, time
from cfg_guidance.runtime import checkpointing
with checkpointing.WorkdirLock(sys.argv[1]):
  print("locked", flush=True)
  time.sleep(600)
"""


def test_second_trainer_on_a_workdir_is_refused_and_a_killed_one_frees_it(tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(workdir)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(checkpointing.WorkdirInUseError,
                       match=rf"is in use by another training process \(pid {holder.pid} on"):
      train.run(train_test.tiny_config(), str(workdir))
    assert not (workdir / "checkpoints").exists()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with checkpointing.WorkdirLock(workdir):  # The OS released the killed holder's lock.
    pass


def test_steps_per_dispatch_with_logging_and_a_checkpoint_only_at_the_end(tmp_path):
  """k = 2 steps per dispatch, logs every 3 (CLU's hooks once failed when a dispatch
  jumped past a logging step), checkpoint_every=0: trains to the end, writes the
  metrics, keeps exactly the final checkpoint."""
  config = train_test.tiny_config(num_steps=6, steps_per_dispatch=2, log_every=3,
                                  checkpoint_every=0, sample_every=0)
  state = train.run(config, str(tmp_path), mesh=_one_device())
  assert int(state.step) == 6
  assert checkpointing.Checkpointer(tmp_path).all_steps() == [6]
  assert list(tmp_path.glob("events.out*"))


_TRAIN_FOREVER = """
import sys
import conftest  # The test process's devices and CPU runtime: the same programs.
import jax
from cfg_guidance import train
from cfg_guidance.runtime import sharding
import train_test
config = train_test.tiny_config(num_steps=10_000, checkpoint_every=4, sample_every=0)
train.run(config, sys.argv[1], mesh=sharding.create_mesh(jax.devices()[:1]))
"""


def test_sigkill_mid_run_resumes_to_identical_parameters(run, tmp_path):
  """A trainer killed with SIGKILL (no chance to save, perhaps inside a checkpoint write)
  once checkpoint 4 exists: rerunning from 4 ends at the parameters of the run that was
  never killed."""
  config, reference = run
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(
      [sys.executable, "-c", _TRAIN_FOREVER, str(workdir)], cwd=ROOT / "tests",
      env=dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", TF_CPP_MIN_LOG_LEVEL="3"),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not (
      workdir / "checkpoints" / "4").is_dir():
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  log = proc.communicate(timeout=60)[0]
  assert proc.returncode == -signal.SIGKILL, log[-3000:]
  for step in checkpointing.Checkpointer(workdir).all_steps():
    if step > 4:  # Saved before the kill landed: take the run up from 4 regardless.
      shutil.rmtree(workdir / "checkpoints" / str(step))
  state = train.run(config, str(workdir), mesh=_one_device())
  assert int(state.step) == 8
  train_test.assert_trees_equal(train_test.restored_state(config, workdir, 8),
                                train_test.restored_state(config, reference, 8))
