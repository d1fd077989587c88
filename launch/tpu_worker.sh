#!/usr/bin/env bash
# Runs on each Cloud TPU VM worker (tpu.sh calls it over ssh): installs the
# project and starts, inspects and stops background jobs that survive ssh exits.
#
# Usage (from the checkout at $CFG_REMOTE_ROOT/repo):
#   tpu_worker.sh install PYTHON_VERSION JAX_VERSION LIBTPU_FIND_LINKS_URL
#   tpu_worker.sh start MODE MAIN_FLAGS...   # MODE: train | evaluate | sample
#   tpu_worker.sh status MODE                # running | exit=N | stopped=N | missing
#   tpu_worker.sh stop MODE                  # SIGTERM: the job checkpoints and exits
#   tpu_worker.sh logs MODE LINES FOLLOW     # FOLLOW: 1 to keep following
#
# Layout under $CFG_REMOTE_ROOT (default ~/cfg_guidance): repo/ (this checkout),
# venv/ (Python with jax[tpu]), logs/MODE.{log,pid,exit}.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REMOTE_ROOT="${CFG_REMOTE_ROOT:-$HOME/cfg_guidance}"
VENV="$REMOTE_ROOT/venv"
LOGS="$REMOTE_ROOT/logs"

install() {
  (($# == 3)) || die "install takes PYTHON_VERSION JAX_VERSION LIBTPU_FIND_LINKS_URL"
  local python_version="$1" jax_version="$2" find_links="$3"
  export PATH="$HOME/.local/bin:$PATH"
  # TPU VM images ship Python 3.10; JAX 0.10 needs >= 3.11, which uv provides.
  if ! command -v uv >/dev/null; then
    python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh
  fi
  [[ -x "$VENV/bin/python" ]] || uv venv --python "$python_version" "$VENV"
  uv pip install --python "$VENV/bin/python" -e "${REPO_ROOT}[tf]" \
    "jax[tpu]==$jax_version" --find-links "$find_links"
  "$VENV/bin/python" -c 'import jax, cfg_guidance; print("jax", jax.__version__)'
}

job_running() {
  local pid_file="$LOGS/$1.pid"
  [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null
}

start() {
  local mode="$1"
  shift
  check_mode "$mode"
  if job_running "$mode"; then
    log "$mode already running on $(hostname) (pid $(cat "$LOGS/$mode.pid"))"
    return 0
  fi
  mkdir -p "$LOGS"
  rm -f "$LOGS/$mode.exit" "$LOGS/$mode.pid"
  # setsid + nohup + no inherited stdio: the job outlives the ssh session.
  setsid nohup bash "${BASH_SOURCE[0]}" _run "$mode" "$@" >/dev/null 2>&1 </dev/null &
  # setsid may fork and exit at once, so its pid ($!) can be dead before the job runs.
  # The job records its own pid; wait for it (up to 10 s), so that a `status` right
  # after `start` says running, not missing (which the watcher would restart).
  local _
  for _ in $(seq 100); do
    [[ -s "$LOGS/$mode.pid" || -f "$LOGS/$mode.exit" ]] && break
    sleep 0.1
  done
  log "started $mode on $(hostname); log: $LOGS/$mode.log"
}

# The detached job: runs main, forwards SIGTERM to it, records its exit status.
_run() {
  local mode="$1" child outcome
  shift
  # Our own pid: `start` recorded setsid's, which may have forked.
  echo "$$" >"$LOGS/$mode.pid"
  cd "$REPO_ROOT"
  echo "=== $(date -u +%FT%TZ) $(hostname): python -m cfg_guidance.main $*" >>"$LOGS/$mode.log"
  "${CFG_REMOTE_PYTHON:-$VENV/bin/python}" -m cfg_guidance.main "$@" >>"$LOGS/$mode.log" 2>&1 &
  child=$!
  # A signalled job saved a checkpoint and stopped early: "stopped", not finished.
  outcome="exit"
  trap 'outcome=stopped; kill -TERM "$child" 2>/dev/null || true' TERM INT
  wait_child "$child"
  echo "$outcome=$WAIT_STATUS" >"$LOGS/$mode.exit.tmp"
  mv "$LOGS/$mode.exit.tmp" "$LOGS/$mode.exit"
}

status() {
  local mode="$1"
  check_mode "$mode"
  if [[ -f "$LOGS/$mode.exit" ]]; then
    cat "$LOGS/$mode.exit"
  elif job_running "$mode"; then
    echo running
  else
    echo missing
  fi
}

stop() {
  local mode="$1"
  check_mode "$mode"
  if job_running "$mode"; then
    kill -TERM "$(cat "$LOGS/$mode.pid")"
    log "sent SIGTERM to $mode on $(hostname)"
  else
    log "no $mode job running on $(hostname)"
  fi
}

logs() {
  local mode="$1" lines="$2" follow="$3"
  check_mode "$mode"
  [[ -f "$LOGS/$mode.log" ]] || die "no log at $LOGS/$mode.log on $(hostname)"
  if is_true "$follow"; then
    tail -n "$lines" -F "$LOGS/$mode.log"
  else
    tail -n "$lines" "$LOGS/$mode.log"
  fi
}

main() {
  (($# >= 1)) || die "usage: tpu_worker.sh install|start|status|stop|logs ..."
  local command="$1"
  shift
  case "$command" in
    install) install "$@" ;;
    start | _run) (($# >= 1)) || die "$command needs MODE"; "$command" "$@" ;;
    status | stop) (($# == 1)) || die "$command takes MODE"; "$command" "$1" ;;
    logs) (($# == 3)) || die "logs takes MODE LINES FOLLOW"; logs "$@" ;;
    *) die "unknown command '$command': expected install, start, status, stop or logs" ;;
  esac
}

main "$@"
