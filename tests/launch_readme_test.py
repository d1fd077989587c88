"""Runs each command of launch/README.md as written, against fake gcloud/sbatch/python.

Every command runs through bash after the README's `export CFG_*=...` lines, in the root
of a git checkout of launch/ and configs/. The fake gcloud records its calls and, for
`tpu-vm ssh`/`scp`, runs the command on fake TPU workers (one home folder each), so
setup, train, logs and status really run tpu_worker.sh there, with fake uv and python.
"""

import os
import select
import shlex
import shutil
import signal
import subprocess
import time

import pytest

import readme_commands
from launch_fakes import Env, flag, kind, wait_for

README = "launch/README.md"
EXPORTS = [c for c in readme_commands.commands(README) if c.startswith("export ")]
EXPORTED = dict(w.split("=", 1) for c in EXPORTS for w in shlex.split(c)[1:])

# What the exports and the README promise, written out independently of the scripts.
PROJECT, ZONE, NAME = "my-project", "us-central2-b", "cfg-64"
WORKDIR, CONFIG = "gs://my-bucket/cfg/imagenet64", "configs/imagenet64.py"
LIBTPU = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"
V4_32_WORKERS = 4
SETUP = ["setup"] if "CFG_REPO_URL" in EXPORTED else ["scp", "setup"]

# Each command of launch/README.md and the test that runs it (the exports run before
# every command, in run_readme). A new README command needs a test and a line here.
COVERED = {
    EXPORTS[0]: "run_readme",
    EXPORTS[1]: "run_readme",
    EXPORTS[2]: "run_readme",
    "launch/tpu.sh run --spot": "test_tpu_run_spot",
    "launch/tpu.sh create --spot": "test_tpu_create_spot_waits_until_active",
    "launch/tpu.sh setup": "test_tpu_setup_installs_on_every_worker",
    "launch/tpu.sh train": "test_tpu_train_logs_status",
    "launch/tpu.sh logs": "test_tpu_train_logs_status",
    "launch/tpu.sh status": "test_tpu_train_logs_status",
    "launch/tpu.sh evaluate --name=cfg-eval --accelerator=v4-8 --worker=0":
        "test_tpu_evaluate_on_a_second_slice",
    "launch/tpu.sh delete": "test_tpu_delete",
    "launch/slurm.sh --install --venv=/shared/venvs/cfg --cuda=12 --nodes=4 "
    "--gpus-per-node=8 --partition=gpu --time=2-00:00:00 --config=configs/imagenet128.py "
    "--workdir=/shared/runs/imagenet128":
        "test_slurm_install_and_submit",
    'squeue -u "$USER"; tail -F logs/slurm/cfg_guidance-JOBID.out': "test_slurm_monitoring",
    "launch/gpu_local.sh --install --cuda=12 --config=configs/cifar10.py "
    "--workdir=$HOME/runs/cifar10": "test_gpu_local_install_and_train",
    "launch/gpu_local.sh --gpus=0,1 --config=configs/digits.py --workdir=/tmp/digits "
    "--mode=sample": "test_gpu_local_two_gpus_sample",
}


def test_every_readme_command_is_covered():
  assert readme_commands.commands(README) == list(COVERED)
  assert all(callable(globals().get(name)) for name in COVERED.values())


@pytest.fixture
def env(tmp_path):
  env = Env(tmp_path)
  shutil.copytree(readme_commands.ROOT / "configs", env.root / "configs",
                  dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
  origin = tmp_path / "origin.git"
  env.env.pop("CUDA_VISIBLE_DEVICES", None)
  env.env.update(USER="tester", GIT_CONFIG_NOSYSTEM="1", GIT_ALLOW_PROTOCOL="file",
                 GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
                 GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")
  if "CFG_REPO_URL" in EXPORTED:  # the workers fetch it from a local clone instead
    env.env.update(GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0=f"url.{origin.as_uri()}.insteadOf",
                   GIT_CONFIG_VALUE_0=EXPORTED["CFG_REPO_URL"])
  git(env, "init", "-q", "-b", "main")
  git(env, "add", "-A")
  git(env, "commit", "-q", "-m", "launch README test")
  git(env, "clone", "-q", "--bare", str(env.root), str(origin))
  return env


def git(env, *args):
  return subprocess.run(["git", *args], cwd=env.root, env=env.env, capture_output=True,
                        text=True, check=True).stdout


def workers(env, count):
  """Fake TPU worker homes 0..count-1; ssh/scp of the fake gcloud go to them."""
  root = env.fake / "workers"
  homes = [root / str(i) for i in range(count)]
  for home in homes:
    home.mkdir(parents=True)
  env.env["FAKE_WORKERS"] = str(root)
  return homes


def readme(prefix):
  return readme_commands.find(prefix, README)


def script(command):
  return "\n".join([*EXPORTS, command])


def run_readme(env, command, **extra_env):
  """Runs a command as a reader pastes it: after the README's exports, in the repo root."""
  return subprocess.run(["bash", "-c", script(command)], cwd=env.root,
                        env={**env.env, **extra_env}, capture_output=True, text=True,
                        timeout=60, check=False)


def start_readme(env, command):
  """Starts a command that runs until stopped (tail -F); stop it with stop()."""
  return subprocess.Popen(["bash", "-c", script(command)], cwd=env.root, env=env.env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0,
                          start_new_session=True)


def read_until(process, text, seen=b"", timeout=20.0):
  deadline = time.monotonic() + timeout
  while text.encode() not in seen:
    remaining = deadline - time.monotonic()
    assert remaining > 0, f"no {text!r} in {seen!r}"
    if select.select([process.stdout], [], [], remaining)[0]:
      chunk = os.read(process.stdout.fileno(), 4096)
      assert chunk, f"ended before {text!r}: {seen!r}"
      seen += chunk
  return seen


def stop(process):
  try:
    os.killpg(process.pid, signal.SIGTERM)  # bash, the fakes and tail -F
  except ProcessLookupError:  # it ended early: the assertion that follows says why
    pass
  process.wait(timeout=10)
  process.stdout.close()


def printed(stdout):
  """The commands a --dry-run printed."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


# --- Cloud TPU ----------------------------------------------------------------

def check_installed(env, homes):
  """Each worker holds HEAD of the checkout in ~/cfg_guidance/repo, installed with jax[tpu]."""
  for home in homes:
    repo = home / "cfg_guidance" / "repo"
    for path in ("launch/tpu_worker.sh", CONFIG, "configs/digits.py"):
      assert (repo / path).read_text() == git(env, "show", f"HEAD:{path}"), (home, path)
  assert env.lines("uv.calls") == [
      line for home in homes for line in (
          f"{home}|venv --python 3.11 {home}/cfg_guidance/venv",
          f"{home}|pip install --python {home}/cfg_guidance/venv/bin/python "
          f"-e {home}/cfg_guidance/repo[tf] jax[tpu]==0.10.2 --find-links {LIBTPU}")]


def main_calls(homes, *flags):
  return [f"{home}/cfg_guidance/repo||-m cfg_guidance.main {' '.join(flags)}"
          for home in homes]


def wait_for_exit(homes, job):
  for home in homes:
    wait_for((home / "cfg_guidance" / "logs" / f"{job}.exit").exists)


def test_tpu_run_spot(env):
  homes = workers(env, V4_32_WORKERS)
  env.script(describe=["NOT_FOUND", "ACTIVE"])
  result = run_readme(env, readme("launch/tpu.sh run"))
  assert result.returncode == 0, result.stderr
  assert "v4-32: 4 worker(s), 16 chips" in result.stderr
  calls = env.calls()
  kinds = [kind(c) for c in calls]
  # Not there: create a spot queued resource, wait, set up, start; then poll until
  # worker 0 and then all workers exited 0 and the slice is still up.
  assert kinds[:5 + len(SETUP)] == ["describe", "create", "describe", *SETUP, "start",
                                    "describe"]
  assert kinds[-3:] == ["status", "status", "describe"]
  assert set(kinds[4 + len(SETUP):]) == {"describe", "status"}
  assert calls[1] == ["gcloud", "compute", "tpus", "queued-resources", "create", NAME,
                      f"--node-id={NAME}", f"--project={PROJECT}", f"--zone={ZONE}",
                      "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base",
                      "--spot"]
  assert all(flag(c, "worker") == "all" for c in calls if kind(c) in ("scp", "setup", "start"))
  check_installed(env, homes)
  assert [c for c in env.lines("python.calls") if "cfg_guidance.main" in c] == main_calls(
      homes, f"--config={CONFIG}", f"--workdir={WORKDIR}", "--mode=train")


def test_tpu_create_spot_waits_until_active(env):
  env.script(describe=["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
  result = run_readme(env, readme("launch/tpu.sh create"))
  assert result.returncode == 0, result.stderr
  assert "v4-32: 4 worker(s), 16 chips" in result.stderr
  calls = env.calls()
  assert [kind(c) for c in calls] == ["create", "describe", "describe", "describe"]
  assert calls[0][:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", NAME]
  assert "--spot" in calls[0] and flag(calls[0], "accelerator-type") == "v4-32"


def test_tpu_setup_installs_on_every_worker(env):
  homes = workers(env, V4_32_WORKERS)
  result = run_readme(env, readme("launch/tpu.sh setup"))
  assert result.returncode == 0, result.stderr
  calls = env.calls()
  assert [kind(c) for c in calls] == SETUP
  assert all(flag(c, "worker") == "all" for c in calls)
  if "CFG_REPO_URL" in EXPORTED:  # CFG_REPO_REF defaults to main
    assert (f"git remote add origin {EXPORTED['CFG_REPO_URL']}; "
            "git fetch -q --depth=1 origin main;") in flag(calls[0], "command")
  check_installed(env, homes)


def test_tpu_train_logs_status(env):
  homes = workers(env, V4_32_WORKERS)
  assert run_readme(env, readme("launch/tpu.sh setup")).returncode == 0
  result = run_readme(env, readme("launch/tpu.sh train"))
  assert result.returncode == 0, result.stderr
  wait_for_exit(homes, "train")
  start = env.calls()[-1]
  assert kind(start) == "start" and flag(start, "worker") == "all"
  assert [c for c in env.lines("python.calls") if "cfg_guidance.main" in c] == main_calls(
      homes, f"--config={CONFIG}", f"--workdir={WORKDIR}", "--mode=train")

  # logs: follows ~/cfg_guidance/logs/train.log on worker 0.
  (homes[1] / "cfg_guidance" / "logs" / "train.log").write_text("worker 1\n")
  logs = start_readme(env, readme("launch/tpu.sh logs"))
  try:
    seen = read_until(logs, "main output\n")
    with open(homes[0] / "cfg_guidance" / "logs" / "train.log", "a") as f:
      f.write("step 100\n")
    seen = read_until(logs, "step 100\n", seen)
  finally:
    stop(logs)
  assert b"worker 1" not in seen
  assert kind(env.calls()[-1]) == "logs" and flag(env.calls()[-1], "worker") == "0"

  env.script(describe=["ACTIVE"])
  status = run_readme(env, readme("launch/tpu.sh status"))
  assert status.returncode == 0, status.stderr
  assert status.stdout == f"slice {NAME}: ACTIVE\ntrain on worker 0: exit=0\n"


def test_tpu_evaluate_on_a_second_slice(env):
  (home,) = workers(env, 1)  # v4-8: one worker
  assert run_readme(env, "launch/tpu.sh setup --name=cfg-eval").returncode == 0
  result = run_readme(env, readme("launch/tpu.sh evaluate"))
  assert result.returncode == 0, result.stderr
  wait_for_exit([home], "evaluate")
  call = env.calls()[-1]
  assert kind(call) == "start" and call[5] == "cfg-eval" and flag(call, "worker") == "0"
  assert [c for c in env.lines("python.calls") if "cfg_guidance.main" in c] == main_calls(
      [home], f"--config={CONFIG}", f"--workdir={WORKDIR}", "--mode=evaluate")
  assert (home / "cfg_guidance" / "logs" / "evaluate.exit").read_text() == "exit=0\n"


def test_tpu_delete(env):
  result = run_readme(env, readme("launch/tpu.sh delete"))
  assert result.returncode == 0, result.stderr
  assert env.calls() == [["gcloud", "compute", "tpus", "queued-resources", "delete", NAME,
                          f"--project={PROJECT}", f"--zone={ZONE}", "--force", "--quiet"]]


def test_tpu_setup_without_repo_url_copies_committed_head(env, tmp_path):
  homes = workers(env, 2)
  with open(env.root / CONFIG, "a") as f:
    f.write("# not committed\n")
  tmpdir = tmp_path / "tmpdir"
  tmpdir.mkdir()
  result = run_readme(env, f"unset CFG_REPO_URL\n{readme('launch/tpu.sh setup')}",
                      TMPDIR=str(tmpdir))
  assert result.returncode == 0, result.stderr
  assert "uncommitted changes stay here: the workers get HEAD" in result.stderr
  scp, setup = env.calls()
  assert kind(scp) == "scp" and kind(setup) == "setup"
  assert scp[6:] == [f"{NAME}:cfg_guidance-repo.tar.gz", f"--project={PROJECT}",
                     f"--zone={ZONE}", "--worker=all"]
  check_installed(env, homes)  # HEAD: without the uncommitted line
  assert list(tmpdir.iterdir()) == []  # the archive is removed


def test_tpu_run_without_repo_url_ships_one_archive_across_recreations(env):
  env.script(describe=["NOT_FOUND", "ACTIVE", "SUSPENDED", "ACTIVE"],
             status0=["exit=0"], status_all=["exit=0\n" * V4_32_WORKERS])
  result = run_readme(env, f"unset CFG_REPO_URL\n{readme('launch/tpu.sh run')}")
  assert result.returncode == 0, result.stderr
  calls = env.calls()
  assert [kind(c) for c in calls] == [
      "describe", "create", "describe", "scp", "setup", "start",
      "describe", "delete", "create", "describe", "scp", "setup", "start",  # SUSPENDED
      "describe", "status", "status", "describe"]
  first, second = [c for c in calls if kind(c) == "scp"]
  assert first == second and not os.path.exists(first[4])


# --- SLURM ----------------------------------------------------------------------

def slurm_dry_run(env):
  # --venv=/shared/venvs/cfg with --install creates a venv there and runs its python:
  # outside a test's reach, so this one command runs with CFG_DRY_RUN=1 (unchanged
  # text) and the test checks the commands it prints.
  result = run_readme(env, readme("launch/slurm.sh"), CFG_DRY_RUN="1")
  assert result.returncode == 0, result.stderr
  assert env.calls() == []
  return printed(result.stdout)


def test_slurm_install_and_submit(env):
  commands = slurm_dry_run(env)
  assert commands[:3] == [
      ["python3", "-m", "venv", "/shared/venvs/cfg"],
      ["/shared/venvs/cfg/bin/python", "-m", "pip", "install", "-e", f"{env.root}[tf]",
       "jax[cuda12]==0.10.2"],
      ["mkdir", "-p", f"{env.root}/logs/slurm"]]
  (sbatch,) = commands[3:]
  split = sbatch.index(str(env.root / "launch" / "slurm_train.sbatch"))
  assert sbatch[split + 1:] == ["--config=configs/imagenet128.py",
                                "--workdir=/shared/runs/imagenet128", "--mode=train"]
  options = sbatch[1:split]
  for expected in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
                   "--partition=gpu", "--time=2-00:00:00", "--requeue",
                   "--signal=B:USR1@300", f"--chdir={env.root}",
                   "--export=ALL,CFG_REQUEUE=1,CFG_MAX_REQUEUES=50,CFG_VENV=/shared/venvs/cfg"):
    assert expected in options


def test_slurm_monitoring(env):
  # The file the README tails is where the README's submission sends the job's log.
  (sbatch,) = slurm_dry_run(env)[3:]
  output = flag(sbatch, "output").replace("%x", flag(sbatch, "job-name"))
  command = readme("squeue ")
  tailed = shlex.split(command.split(";")[1])[-1]
  assert output.replace("%j", "JOBID") == f"{env.root}/{tailed}"

  log = env.root / tailed
  log.parent.mkdir(parents=True)
  log.write_text("step 1\n")
  monitor = start_readme(env, command)
  try:
    seen = read_until(monitor, "step 1\n")
    with open(log, "a") as f:
      f.write("step 2\n")
    read_until(monitor, "step 2\n", seen)
  finally:
    stop(monitor)
  assert env.calls() == [["squeue", "-u", "tester"]]


# --- one GPU machine --------------------------------------------------------------

def test_gpu_local_install_and_train(env):
  result = run_readme(env, readme("launch/gpu_local.sh --install"))
  assert result.returncode == 0, result.stderr
  assert env.lines("python.calls") == [
      f"{env.root}||-m pip install -e {env.root}[tf] jax[cuda12]==0.10.2",
      f"{env.root}||-m cfg_guidance.main --config=configs/cifar10.py "
      f"--workdir={env.env['HOME']}/runs/cifar10 --mode=train"]


def test_gpu_local_two_gpus_sample(env):
  result = run_readme(env, readme("launch/gpu_local.sh --gpus"))
  assert result.returncode == 0, result.stderr
  assert env.lines("python.calls") == [
      f"{env.root}|0,1|-m cfg_guidance.main --config=configs/digits.py "
      "--workdir=/tmp/digits --mode=sample"]
