# Shared helpers for the launch scripts: logging, dry-run, setting validation.
# Sourced, never run; expects `set -euo pipefail` in the caller.
# shellcheck shell=bash
# Globals set here (MAIN_ARGS, WAIT_STATUS, ...) are read by the sourcing scripts.
# shellcheck disable=SC2034

# The repository root: configs/ and cfg_guidance/ live here.
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$LAUNCH_DIR")"
DRY_RUN="${CFG_DRY_RUN:-0}"
# Config overrides (--config.field=value) collected by the caller's flag loop.
OVERRIDES=()

log() {
  echo "[$(basename "$0")] $*" >&2
}

die() {
  echo "error: $*" >&2
  exit 2
}

# Prints a command the way a shell reads it back: words with shell syntax in
# single quotes (an embedded ' becomes '\'').
quote_cmd() {
  local arg words=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      words+=("$arg")
    else
      words+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${words[*]}"
}

# Runs a command, or prints it (prefixed with '+ ') under --dry-run.
run() {
  if is_true "$DRY_RUN"; then
    echo "+ $(quote_cmd "$@")"
    return 0
  fi
  "$@"
}

# check_bool VALUE FLAG VAR: a boolean setting (1/0, true/false, yes/no, on/off).
check_bool() {
  case "$1" in
    1 | true | yes | on | 0 | false | no | off) ;;
    *) die "$2 (\$$3) must be a boolean (1/0, true/false, yes/no), got '$1'" ;;
  esac
}

is_true() {
  case "${1:-0}" in
    1 | true | yes | on) return 0 ;;
    0 | false | no | off | "") return 1 ;;
    *) die "expected a boolean (1/0, true/false, yes/no), got '$1'" ;;
  esac
}

# The value of `--flag=value`; a bare `--flag` is an error that names the flag.
flag_value() {
  case "$1" in
    *=*) echo "${1#*=}" ;;
    *) die "$1 needs a value: $1=VALUE" ;;
  esac
}

# Collects `--config.a.b=value` overrides for cfg_guidance.main.
add_override() {
  [[ "$1" =~ ^--config\.[A-Za-z_][A-Za-z0-9_.]*=.* ]] ||
    die "bad config override '$1': expected --config.FIELD=VALUE"
  OVERRIDES+=("$1")
}

# require VALUE FLAG VAR: fails naming both the flag and the environment variable.
require() {
  [[ -n "$1" ]] || die "$2 (or \$$3) is required"
}

# require_int VALUE FLAG VAR [MIN]: an integer setting, at least MIN (default 1).
require_int() {
  if ! [[ "$1" =~ ^[0-9]+$ ]] || ((10#$1 < ${4:-1})); then
    die "$2 (\$$3) must be an integer >= ${4:-1}, got '$1'"
  fi
}

# The config must be a file inside the repository, named relative to its root,
# because the same relative path is used on the remote machines.
check_config() {
  local config="$1"
  require "$config" --config CFG_CONFIG
  [[ "$config" != /* ]] ||
    die "--config (\$CFG_CONFIG) must be relative to the repository root, got '$config'"
  [[ -f "$REPO_ROOT/$config" ]] ||
    die "--config (\$CFG_CONFIG): '$config' not found under $REPO_ROOT"
}

check_mode() {
  case "$1" in
    train | evaluate | sample) ;;
    *) die "--mode (\$CFG_MODE) must be train, evaluate or sample, got '$1'" ;;
  esac
}

# The flags of `python -m cfg_guidance.main` (DESIGN.md's CLI contract).
main_args() {
  local config="$1" workdir="$2" mode="$3"
  MAIN_ARGS=("--config=$config" "--workdir=$workdir" "--mode=$mode")
  if ((${#OVERRIDES[@]})); then
    MAIN_ARGS+=("${OVERRIDES[@]}")
  fi
}

# wait_child PID: waits for a background child even when trapped signals
# interrupt `wait`; sets WAIT_STATUS to the child's exit status.
wait_child() {
  local pid="$1" rc
  while :; do
    if wait "$pid"; then
      WAIT_STATUS=0
      return 0
    else
      rc=$?
    fi
    # Above 128 with the child still alive: a trapped signal cut the wait short.
    if ((rc > 128)) && kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    WAIT_STATUS=$rc
    return 0
  done
}

# The pip requirement that brings JAX's CUDA plugin: cuda12 or cuda13.
jax_cuda_requirement() {
  local cuda="$1" jax_version="$2"
  case "$cuda" in
    12 | 13) echo "jax[cuda$cuda]==$jax_version" ;;
    *) die "--cuda (\$CFG_CUDA) must be 12 or 13, got '$cuda'" ;;
  esac
}
