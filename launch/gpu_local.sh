#!/usr/bin/env bash
# One machine, all its GPUs: runs `python -m cfg_guidance.main` as a single JAX
# process that drives every visible GPU (data parallel over the `data` mesh axis).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu_local.sh [--flag=value ...] [--config.FIELD=VALUE ...]

Settings (flag, or environment variable):
  --config=PATH        CFG_CONFIG: relative to the repo root            required
  --workdir=DIR        CFG_WORKDIR: local path or gs://                  required
  --mode=MODE          CFG_MODE: train (default) | evaluate | sample
  --gpus=LIST          CFG_GPUS: CUDA_VISIBLE_DEVICES, e.g. 0,1,2,3 (default: all)
  --python=PATH        CFG_PYTHON: interpreter to use (default python)
  --install            CFG_INSTALL=1: pip install -e REPO and jax[cudaXX] first
  --cuda=12|13         CFG_CUDA (default 12)
  --jax-version=V      CFG_JAX_VERSION (default 0.10.2)
  --dry-run            CFG_DRY_RUN=1: print every command instead of running it
  -h, --help

Training resumes from the workdir's latest checkpoint: stop it any time and run the
same command again to continue.

Example:
  launch/gpu_local.sh --install --config=configs/cifar10.py --workdir=$HOME/runs/cifar10
EOF
}

CONFIG="${CFG_CONFIG:-}"
WORKDIR="${CFG_WORKDIR:-}"
MODE="${CFG_MODE:-train}"
GPUS="${CFG_GPUS:-}"
PYTHON="${CFG_PYTHON:-python}"
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
      --gpus*) GPUS="$(flag_value "$arg")" ;;
      --python*) PYTHON="$(flag_value "$arg")" ;;
      --install) INSTALL=1 ;;
      --cuda*) CUDA="$(flag_value "$arg")" ;;
      --jax-version*) JAX_VERSION="$(flag_value "$arg")" ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      *) die "unknown flag '$arg' (see --help)" ;;
    esac
  done
}

main() {
  local requirement
  parse_flags "$@"
  check_config "$CONFIG"
  require "$WORKDIR" --workdir CFG_WORKDIR
  check_mode "$MODE"
  check_bool "$INSTALL" --install CFG_INSTALL
  check_bool "$DRY_RUN" --dry-run CFG_DRY_RUN
  requirement="$(jax_cuda_requirement "$CUDA" "$JAX_VERSION")"
  if [[ -n "$GPUS" ]]; then
    [[ "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] ||
      die "--gpus (\$CFG_GPUS) must be a comma-separated list of GPU indices, got '$GPUS'"
  fi

  cd "$REPO_ROOT"
  if is_true "$INSTALL"; then
    run "$PYTHON" -m pip install -e "${REPO_ROOT}[tf]" "$requirement"
  fi
  main_args "$CONFIG" "$WORKDIR" "$MODE"
  if [[ -n "$GPUS" ]]; then
    run env "CUDA_VISIBLE_DEVICES=$GPUS" "$PYTHON" -m cfg_guidance.main "${MAIN_ARGS[@]}"
  else
    run "$PYTHON" -m cfg_guidance.main "${MAIN_ARGS[@]}"
  fi
}

main "$@"
