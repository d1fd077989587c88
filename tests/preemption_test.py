"""SIGTERM mid-run: checkpoint at the next step boundary, exit 0, resume bit-identically."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

import train_test

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = [
    "--config.model.base_channels=16", "--config.model.channel_mult=(1,2)",
    "--config.model.num_res_blocks=1", "--config.model.attention_resolutions=(4,)",
    "--config.model.num_groups=8", "--config.model.num_heads=2",
    "--config.model.num_head_channels=-1", "--config.model.dropout=0.1",
    "--config.train.batch_size=16", "--config.train.learning_rate=0.002",
    "--config.train.warmup_steps=2", "--config.train.log_every=1",
    "--config.train.checkpoint_every=1000", "--config.train.sample_every=0",
    "--config.train.sample_at_end=False", "--config.train.evaluate_at_end=False",
]


def _main(workdir, num_steps):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.Popen(
      [sys.executable, "-m", "cfg_guidance.main", "--config=configs/digits.py",
       f"--workdir={workdir}", f"--config.train.num_steps={num_steps}", *TINY_FLAGS],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_saves_exits_zero_and_resumes_exactly(tmp_path):
  num_steps = 200
  proc = _main(tmp_path / "run", num_steps)
  events = tmp_path / "run"
  deadline = time.time() + 300
  # Wait until training is under way (the first metrics are written), then preempt.
  while time.time() < deadline and proc.poll() is None:
    if any(p.name.startswith("events.out") and p.stat().st_size > 2000
           for p in events.glob("*")):
      break
    time.sleep(0.5)
  time.sleep(1.0)
  proc.send_signal(signal.SIGTERM)
  log = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, log[-4000:]
  steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert len(steps) == 1 and 0 < steps[0] < num_steps, (steps, log[-2000:])

  restart = _main(tmp_path / "run", num_steps)
  log = restart.communicate(timeout=600)[0]
  assert restart.returncode == 0, log[-4000:]
  reference = _main(tmp_path / "reference", num_steps)
  log = reference.communicate(timeout=600)[0]
  assert reference.returncode == 0, log[-4000:]

  config = train_test.tiny_config(num_steps=num_steps)
  train_test.assert_trees_equal(
      train_test.restored_state(config, tmp_path / "run", num_steps),
      train_test.restored_state(config, tmp_path / "reference", num_steps))
  np.testing.assert_equal(
      sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()
             if p.name.isdigit())[-1], num_steps)
