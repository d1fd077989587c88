#!/usr/bin/env bash
# Submits launch/slurm_train.sbatch: multi-node, multi-GPU cfg_guidance jobs on SLURM,
# requeued on preemption or at the time limit and resumed from the workdir.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/slurm.sh [--flag=value ...] [--config.FIELD=VALUE ...]

Submits one job: N nodes, one process per node, each driving all GPUs of its node
(`srun python -m cfg_guidance.main ...`; jax.distributed.initialize() finds its peers
from SLURM's environment). Run it from a login node whose filesystem the compute
nodes share. Prints the job id and where its log goes.

Settings (flag, or environment variable):
  --config=PATH          CFG_CONFIG: relative to the repo root          required
  --workdir=DIR          CFG_WORKDIR: shared absolute path or gs://      required
  --mode=MODE            CFG_MODE: train (default) | evaluate | sample
  --nodes=N              CFG_NODES (default 1)
  --gpus-per-node=G      CFG_GPUS_PER_NODE (default 8)
  --cpus-per-node=C      CFG_CPUS_PER_NODE (default: the partition's default)
  --partition=P          CFG_PARTITION
  --account=A            CFG_ACCOUNT
  --qos=Q                CFG_QOS
  --time=T               CFG_TIME: limit, e.g. 24:00:00 or 2-00:00:00 (default 24:00:00)
  --job-name=NAME        CFG_JOB_NAME (default cfg_guidance)
  --log-dir=DIR          CFG_LOG_DIR: where NAME-JOBID.out goes (default REPO/logs/slurm)
  --no-requeue           CFG_REQUEUE=0: neither SLURM nor the job requeues it
  --max-requeues=N       CFG_MAX_REQUEUES: self-requeues at the time limit (default 50)
  --signal-seconds=S     CFG_SIGNAL_SECONDS: warn the job S s before the limit (300)
  --venv=DIR             CFG_VENV: virtualenv the job activates
  --install              CFG_INSTALL=1: pip install -e REPO and jax[cudaXX] into the
                         venv (or the current python) before submitting
  --cuda=12|13           CFG_CUDA (default 12)
  --jax-version=V        CFG_JAX_VERSION (default 0.10.2)
  --dry-run              CFG_DRY_RUN=1: print every command instead of running it
  -h, --help

Example:
  launch/slurm.sh --nodes=4 --gpus-per-node=8 --partition=gpu --time=2-00:00:00 \
    --config=configs/imagenet128.py --workdir=/shared/runs/imagenet128 \
    --venv=/shared/venvs/cfg
EOF
}

CONFIG="${CFG_CONFIG:-}"
WORKDIR="${CFG_WORKDIR:-}"
MODE="${CFG_MODE:-train}"
NODES="${CFG_NODES:-1}"
GPUS_PER_NODE="${CFG_GPUS_PER_NODE:-8}"
CPUS_PER_NODE="${CFG_CPUS_PER_NODE:-}"
PARTITION="${CFG_PARTITION:-}"
ACCOUNT="${CFG_ACCOUNT:-}"
QOS="${CFG_QOS:-}"
TIME_LIMIT="${CFG_TIME:-24:00:00}"
JOB_NAME="${CFG_JOB_NAME:-cfg_guidance}"
LOG_DIR="${CFG_LOG_DIR:-$REPO_ROOT/logs/slurm}"
REQUEUE="${CFG_REQUEUE:-1}"
MAX_REQUEUES="${CFG_MAX_REQUEUES:-50}"
SIGNAL_SECONDS="${CFG_SIGNAL_SECONDS:-300}"
VENV="${CFG_VENV:-}"
INSTALL="${CFG_INSTALL:-0}"
CUDA="${CFG_CUDA:-12}"
JAX_VERSION="${CFG_JAX_VERSION:-0.10.2}"

parse_flags() {
  local arg
  for arg in "$@"; do
    case "$arg" in
      --config.*) add_override "$arg" ;;
      --config*) CONFIG="$(flag_value "$arg")" ;;
      --workdir*) WORKDIR="$(flag_value "$arg")" ;;
      --mode*) MODE="$(flag_value "$arg")" ;;
      --nodes*) NODES="$(flag_value "$arg")" ;;
      --gpus-per-node*) GPUS_PER_NODE="$(flag_value "$arg")" ;;
      --cpus-per-node*) CPUS_PER_NODE="$(flag_value "$arg")" ;;
      --partition*) PARTITION="$(flag_value "$arg")" ;;
      --account*) ACCOUNT="$(flag_value "$arg")" ;;
      --qos*) QOS="$(flag_value "$arg")" ;;
      --time*) TIME_LIMIT="$(flag_value "$arg")" ;;
      --job-name*) JOB_NAME="$(flag_value "$arg")" ;;
      --log-dir*) LOG_DIR="$(flag_value "$arg")" ;;
      --no-requeue) REQUEUE=0 ;;
      --max-requeues*) MAX_REQUEUES="$(flag_value "$arg")" ;;
      --signal-seconds*) SIGNAL_SECONDS="$(flag_value "$arg")" ;;
      --venv*) VENV="$(flag_value "$arg")" ;;
      --install) INSTALL=1 ;;
      --cuda*) CUDA="$(flag_value "$arg")" ;;
      --jax-version*) JAX_VERSION="$(flag_value "$arg")" ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      *) die "unknown flag '$arg' (see --help)" ;;
    esac
  done
}

check_settings() {
  check_config "$CONFIG"
  require "$WORKDIR" --workdir CFG_WORKDIR
  [[ "$WORKDIR" == gs://?* || "$WORKDIR" == /* ]] ||
    die "--workdir (\$CFG_WORKDIR) must be an absolute path on a filesystem every node" \
      "shares, or gs://..., got '$WORKDIR'"
  check_mode "$MODE"
  require_int "$NODES" --nodes CFG_NODES
  require_int "$GPUS_PER_NODE" --gpus-per-node CFG_GPUS_PER_NODE
  [[ -z "$CPUS_PER_NODE" ]] || require_int "$CPUS_PER_NODE" --cpus-per-node CFG_CPUS_PER_NODE
  # SLURM's formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
  [[ "$TIME_LIMIT" =~ ^([0-9]+-)?[0-9]+(:[0-9]{1,2}){0,2}$ ]] ||
    die "--time (\$CFG_TIME) must be a SLURM time like 24:00:00 or 2-00:00:00, got '$TIME_LIMIT'"
  [[ "$JOB_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] ||
    die "--job-name (\$CFG_JOB_NAME) may hold letters, digits, '_', '.', '-', got '$JOB_NAME'"
  check_bool "$REQUEUE" --no-requeue CFG_REQUEUE
  check_bool "$INSTALL" --install CFG_INSTALL
  check_bool "$DRY_RUN" --dry-run CFG_DRY_RUN
  require_int "$MAX_REQUEUES" --max-requeues CFG_MAX_REQUEUES 0
  require_int "$SIGNAL_SECONDS" --signal-seconds CFG_SIGNAL_SECONDS
  if [[ -n "$VENV" ]]; then
    [[ "$VENV" == /* && "$VENV" != *,* ]] ||
      die "--venv (\$CFG_VENV) must be an absolute path without commas, got '$VENV'"
    is_true "$INSTALL" || [[ -f "$VENV/bin/activate" ]] || is_true "$DRY_RUN" ||
      die "--venv (\$CFG_VENV): no virtualenv at $VENV (create it, or pass --install)"
  fi
}

install() {
  local python=python requirement
  requirement="$(jax_cuda_requirement "$CUDA" "$JAX_VERSION")"
  if [[ -n "$VENV" ]]; then
    [[ -x "$VENV/bin/python" ]] || run python3 -m venv "$VENV"
    python="$VENV/bin/python"
  fi
  run "$python" -m pip install -e "${REPO_ROOT}[tf]" "$requirement"
}

submit() {
  local args=(--parsable "--job-name=$JOB_NAME" "--nodes=$NODES" --ntasks-per-node=1
    "--gpus-per-node=$GPUS_PER_NODE" "--time=$TIME_LIMIT" "--chdir=$REPO_ROOT"
    "--output=$LOG_DIR/%x-%j.out" --open-mode=append
    "--signal=B:USR1@$SIGNAL_SECONDS")
  local exports="ALL,CFG_REQUEUE=$REQUEUE,CFG_MAX_REQUEUES=$MAX_REQUEUES"
  [[ -z "$VENV" ]] || exports+=",CFG_VENV=$VENV"
  args+=("--export=$exports")
  if is_true "$REQUEUE"; then args+=(--requeue); else args+=(--no-requeue); fi
  [[ -z "$CPUS_PER_NODE" ]] || args+=("--cpus-per-task=$CPUS_PER_NODE")
  [[ -z "$PARTITION" ]] || args+=("--partition=$PARTITION")
  [[ -z "$ACCOUNT" ]] || args+=("--account=$ACCOUNT")
  [[ -z "$QOS" ]] || args+=("--qos=$QOS")
  main_args "$CONFIG" "$WORKDIR" "$MODE"

  run mkdir -p "$LOG_DIR"
  if is_true "$DRY_RUN"; then
    run sbatch "${args[@]}" "$LAUNCH_DIR/slurm_train.sbatch" "${MAIN_ARGS[@]}"
    return 0
  fi
  local job_id
  job_id="$(sbatch "${args[@]}" "$LAUNCH_DIR/slurm_train.sbatch" "${MAIN_ARGS[@]}")"
  job_id="${job_id%%;*}"
  echo "submitted job $job_id: $NODES node(s) x $GPUS_PER_NODE GPU(s), $MODE with $CONFIG"
  echo "log:    tail -F $LOG_DIR/$JOB_NAME-$job_id.out"
  echo "status: squeue -j $job_id    cancel: scancel $job_id"
}

main() {
  parse_flags "$@"
  check_settings
  if is_true "$INSTALL"; then install; fi
  submit
}

main "$@"
