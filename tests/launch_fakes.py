"""Fake gcloud/sbatch/srun/python/uv executables and a fake repo for the launch/ tests."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

LAUNCH_DIR = pathlib.Path(__file__).resolve().parent.parent / "launch"

# Records its arguments (one JSON list per call) and answers from FAKE_SCRIPT:
# `describe` pops the next slice state, `ssh ... status` the next job status.
# With FAKE_WORKERS (a folder of worker home folders 0, 1, ...), `tpu-vm ssh` runs its
# command in bash on the chosen workers and `tpu-vm scp` copies into their homes.
FAKE_CLI = r"""
import json, os, shutil, subprocess, sys

name = os.path.basename(sys.argv[0])
args = sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as f:
  f.write(json.dumps([name] + args) + "\n")


def pop(key, default):
  path = os.environ.get("FAKE_SCRIPT", "")
  if not os.path.exists(path):
    return default
  with open(path) as f:
    script = json.load(f)
  queue = script.get(key) or [default]
  value = queue.pop(0) if len(queue) > 1 else queue[0]
  script[key] = queue
  with open(path, "w") as f:
    json.dump(script, f)
  return value


def on_workers(args):
  root = os.environ["FAKE_WORKERS"]
  worker = next(a for a in args if a.startswith("--worker=")).split("=", 1)[1]
  rc = 0
  for home in sorted(os.listdir(root)) if worker == "all" else [worker]:
    home = os.path.join(root, home)
    if args[3] == "scp":
      shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
      continue
    command = next(a for a in args if a.startswith("--command=")).split("=", 1)[1]
    rc = max(rc, subprocess.call(["bash", "-c", command], cwd=home,
                                 env=dict(os.environ, HOME=home)))
  return rc


if name == "gcloud" and os.environ.get("FAKE_WORKERS") and args[3] in ("ssh", "scp"):
  sys.exit(on_workers(args))
elif name == "gcloud" and "describe" in args:
  state = pop("describe", "READY")
  if state == "NOT_FOUND":
    sys.exit("ERROR: (gcloud.compute.tpus) NOT_FOUND: " + args[4])
  print(state)
elif name == "gcloud" and "ssh" in args:
  command = next(a for a in args if a.startswith("--command="))
  if " status " in command:
    print(pop("status_all" if "--worker=all" in args else "status0", "running"))
elif name == "gcloud" and "create" in args:
  sys.exit(int(pop("create_rc", "0")))
elif name == "sbatch":
  print("12345;cluster")
"""

# A job step that runs until SIGTERM (or exits at once with $FAKE_SRUN_EXIT).
FAKE_SRUN = r"""#!/usr/bin/env bash
printf '%s\n' "$@" > "$FAKE_DIR/srun.args"
echo "${JAX_LOCAL_DEVICE_IDS:-}" > "$FAKE_DIR/srun.devices"
if [[ -n "${FAKE_SRUN_EXIT:-}" ]]; then exit "$FAKE_SRUN_EXIT"; fi
trap 'echo TERM >> "$FAKE_DIR/srun.signals"; exit 0' TERM
touch "$FAKE_DIR/srun.started"
while :; do sleep 0.02; done
"""

# Stands in for python: records its argv, cwd and CUDA_VISIBLE_DEVICES; with
# FAKE_PY_WAIT=1 it runs until SIGTERM, else exits with $FAKE_PY_EXIT (0).
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$(pwd)|${CUDA_VISIBLE_DEVICES:-}|$*" >> "$FAKE_DIR/python.calls"
echo "main output"
if [[ "${FAKE_PY_WAIT:-0}" == 1 ]]; then
  trap 'echo TERM >> "$FAKE_DIR/python.signals"; exit 0' TERM
  while :; do sleep 0.02; done
fi
exit "${FAKE_PY_EXIT:-0}"
"""

# Stands in for uv on a TPU worker: records HOME and argv; `uv venv ... DIR` makes
# DIR/bin/python the fake python.
FAKE_UV = r"""#!/usr/bin/env bash
echo "$HOME|$*" >> "$FAKE_DIR/uv.calls"
if [[ "$1" == venv ]]; then
  mkdir -p "${!#}/bin"
  cp "$FAKE_DIR/bin/python" "${!#}/bin/python"
fi
"""


class Env:
  """A copy of launch/ inside a fake repo, fake executables first on PATH."""

  def __init__(self, tmp_path):
    self.root = tmp_path / "repo"
    shutil.copytree(LAUNCH_DIR, self.root / "launch")
    (self.root / "configs").mkdir()
    for name in ("imagenet64.py", "digits.py"):
      (self.root / "configs" / name).write_text("def get_config(): ...\n")
    self.fake = tmp_path / "fake"
    (self.fake / "bin").mkdir(parents=True)
    for name in ("gcloud", "sbatch", "scontrol", "squeue"):
      self._write_exe(name, f"#!{sys.executable} -S\n{FAKE_CLI}")
    self._write_exe("srun", FAKE_SRUN)
    self._write_exe("uv", FAKE_UV)
    self.python = self._write_exe("python", FAKE_PYTHON)
    self.calls_file = self.fake / "calls.jsonl"
    self.script_file = self.fake / "script.json"
    self.env = {k: v for k, v in os.environ.items()
                if not k.startswith(("CFG_", "SLURM_", "CLOUDSDK_", "FAKE_"))}
    self.env.update(PATH=f"{self.fake / 'bin'}:{os.environ['PATH']}",
                    HOME=str(tmp_path / "home"), FAKE_CALLS=str(self.calls_file),
                    FAKE_SCRIPT=str(self.script_file), FAKE_DIR=str(self.fake),
                    CFG_POLL_SECONDS="0")

  def _write_exe(self, name, text):
    path = self.fake / "bin" / name
    path.write_text(text)
    path.chmod(0o755)
    return path

  def script(self, **queues):
    self.script_file.write_text(json.dumps(queues))

  def run(self, script, *args, timeout=30, **env):
    return subprocess.run(["bash", str(self.root / "launch" / script), *args],
                          cwd=self.root, env={**self.env, **env}, capture_output=True,
                          text=True, timeout=timeout, check=False)

  def calls(self):
    if not self.calls_file.exists():
      return []
    return [json.loads(line) for line in self.calls_file.read_text().splitlines()]

  def lines(self, name):
    """The lines a fake wrote to FAKE_DIR/NAME (python.calls, uv.calls, ...)."""
    path = self.fake / name
    return path.read_text().splitlines() if path.exists() else []


def kind(call):
  """A short name for a fake call: create, delete, describe, scp, setup, start, status..."""
  if call[0] != "gcloud":
    return call[0]
  if "ssh" in call:
    command = next(a for a in call if a.startswith("--command="))
    for word in ("install", "start", "status", "logs", "stop"):
      if f" {word} " in command + " ":
        return word if word != "install" else "setup"
  for word in ("create", "delete", "describe", "scp"):
    if word in call:
      return word
  return "?"


def flag(call, name):
  return next(a.split("=", 1)[1] for a in call if a.startswith(f"--{name}="))


def wait_for(predicate, timeout=10.0):
  deadline = time.monotonic() + timeout
  while not predicate():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.02)
