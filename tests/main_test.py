"""The command line, as a user runs it: train a tiny digits model, then sample from it."""

import os
import subprocess
import sys

import numpy as np
import pytest

from cfg_guidance import main
import reporting_test

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.model.base_channels=16", "--config.model.channel_mult=(1,2)",
    "--config.model.num_res_blocks=1", "--config.model.attention_resolutions=(4,)",
    "--config.model.num_groups=8", "--config.model.num_heads=2",
    "--config.model.num_head_channels=-1",
    "--config.train.num_steps=8", "--config.train.batch_size=16",
    "--config.train.log_every=4", "--config.train.checkpoint_every=8",
    "--config.train.sample_every=0", "--config.train.sample_at_end=False",
    "--config.train.evaluate_at_end=False",
    "--config.sample.num_samples=4", "--config.sample.num_steps=4",
    "--config.sample.guidance_weights=(0.0,3.0)", "--config.sample.batch_size=2",
]


# Runs cfg_guidance.main with TensorFlow and TFDS made unimportable (as in a core install,
# where `import tensorflow` raises ImportError).
WITHOUT_TF = ("import sys; sys.modules.update(tensorflow=None, tensorflow_datasets=None); "
              "from cfg_guidance import main; sys.argv[0] = 'cfg-guidance'; main.run_main()")


def run_main(workdir, *args, without_tensorflow=False):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
             WANDB_SILENT="true")
  entry = ["-c", WITHOUT_TF] if without_tensorflow else ["-m", "cfg_guidance.main"]
  cmd = [sys.executable, *entry, "--config=configs/digits.py", f"--workdir={workdir}",
         *TINY, *args]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


def test_cli_trains_then_samples(tmp_path):
  # As a core install runs it (no TensorFlow), with W&B beside TensorBoard, offline.
  proc = run_main(tmp_path, "--config.wandb.enabled=True", "--config.wandb.mode=offline",
                  without_tensorflow=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "checkpoints" / "8").is_dir()
  # Orbax's INFO lines ("[process=0][thread=...]") only with --verbosity=1; its saves
  # happened (the checkpoint above).
  lines = proc.stderr.splitlines()
  assert not [l for l in lines if l.startswith("I") and "[process=0]" in l]
  assert [l for l in lines if "ETA" in l]
  # One steps_per_sec per logging step (4 and 8), read back with TensorBoard's reader.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(tmp_path)).Reload()
  assert [e.step for e in events.Tensors("steps_per_sec")] == [4, 8]
  # The same steps in the W&B run, read back from its offline files.
  wandb_steps = [r.history.step.num for r in reporting_test._wandb_records(tmp_path)
                 if r.WhichOneof("record_type") == "history"
                 and "loss" in map(reporting_test._key, r.history.item)]
  assert wandb_steps == [4, 8]
  proc = run_main(tmp_path, "--mode=sample", without_tensorflow=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # A progress line per batch of 2: 2/4, then 4/4 samples, for each weight.
  progress = [l.split("] ", 1)[1] for l in proc.stderr.splitlines() if "ETA" in l]
  assert [p.split(",")[0] for p in progress] == [
      f"sampling w={w}: {k}/4 samples ({25 * k}%)" for w in (0, 3) for k in (2, 4)]
  with np.load(tmp_path / "samples" / "step_8_w3.npz", allow_pickle=False) as f:
    assert f["images"].shape == (4, 8, 8, 1) and f["images"].dtype == np.uint8
    np.testing.assert_array_equal(f["labels"], [0, 1, 2, 3])
    images = f["images"]
  # ADM's evaluator's layout, read the way evaluator.py reads a sample batch.
  adm = np.load(str(tmp_path / "samples" / "adm" / "step_8_w3.npz"))
  np.testing.assert_array_equal(adm["arr_0"], images)
  np.testing.assert_array_equal(adm["arr_1"], [0, 1, 2, 3])


def test_cli_rejects_bad_config_naming_field(tmp_path):
  proc = run_main(tmp_path, "--config.diffusion.p_uncond=2.0")
  assert proc.returncode != 0
  assert "config.diffusion.p_uncond" in proc.stderr


def test_cli_refuses_a_field_given_twice_before_anything_runs(tmp_path):
  # TINY sets sample.guidance_weights already; ml_collections would run (0, 3, inf).
  proc = run_main(tmp_path, "--config.sample.guidance_weights=(1e999,)")
  assert proc.returncode == 1
  assert ("--config.sample.guidance_weights is given twice ('(0.0,3.0)', then '(1e999,)')"
          in proc.stderr)
  assert not tmp_path.joinpath("checkpoints").exists()


@pytest.mark.parametrize("argv,match", [
    (["--config.grid.guidance_weights=(0,nan)"], r"guidance_weights=\(0,nan\): NaN"),
    (["--config.train.learning_rate", "NaN"], r"learning_rate=NaN: NaN"),
    (["--config.a.b=1", "--x", "--config.a.b", "2"], r"a\.b is given twice \('1', then '2'\)"),
])
def test_command_line_checks(argv, match):
  with pytest.raises(ValueError, match=match):
    main.check_command_line(["prog", *argv])


def test_command_line_checks_pass_paths_and_single_values():
  main.check_command_line(["prog", "--config.data.folder=/data/nan/train",
                           "--config.sample.guidance_weights=(0,1e999)", "--", "--config.a=1",
                           "--config.a=2"])
