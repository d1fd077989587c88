#!/usr/bin/env bash
# Cloud TPU VM launcher: create a slice, install the project on every worker,
# train / evaluate / sample with a gs:// workdir, follow logs, recreate on preemption.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck source=tpu_slice.sh
source "$LAUNCH_DIR/tpu_slice.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh COMMAND [--flag=value ...] [--config.FIELD=VALUE ...]

Commands:
  create     create the slice and wait until it is READY/ACTIVE
  setup      copy this checkout (or clone --repo-url) to every worker, install jax[tpu]
  train      start training on every worker (nohup; log ~/cfg_guidance/logs/train.log)
  evaluate   start --mode=evaluate against the same workdir (all workers, or --worker=0
             on a single-host slice); `sample` likewise for --mode=sample
  logs       print / follow a job's log on one worker (--job, --worker, --lines, --no-follow)
  status     print the slice state and the job state on worker 0
  stop       SIGTERM the job on every worker (it checkpoints and exits)
  delete     delete the slice (and its queued resource)
  hosts      print workers, chips and JAX devices for --accelerator; calls nothing
  run        create + setup + train, then watch: a preempted slice (PREEMPTED, or
             queued resource SUSPENDED/FAILED) is deleted, recreated, set up and the
             same train command restarted; training resumes from its checkpoint

Settings (flag, or environment variable):
  --project=ID           CFG_PROJECT (or CLOUDSDK_CORE_PROJECT)   required
  --zone=ZONE            CFG_ZONE, e.g. us-central2-b                required
  --name=NAME            CFG_NAME: the TPU (and queued resource)     required
  --accelerator=TYPE     CFG_ACCELERATOR: v4-32, v5litepod-64, v5p-128, v6e-8, ...
  --workdir=gs://...     CFG_WORKDIR: checkpoints, metrics, samples; must be gs://
  --config=PATH          CFG_CONFIG: relative to the repo root, e.g. configs/imagenet64.py
  --spot                 CFG_SPOT=1: Spot capacity (preemptible, cheaper)
  --provisioning=MODE    CFG_PROVISIONING: queued (default; `queued-resources create`)
                         or direct (`tpu-vm create`)
  --runtime-version=V    CFG_RUNTIME_VERSION (default: by accelerator, see tpu_slice.sh)
  --repo-url=URL         CFG_REPO_URL: git URL the workers clone (public, or with your
                         own credentials on the VMs; none are stored here). Unset:
                         setup copies this checkout's HEAD (git archive + scp)
  --repo-ref=REF         CFG_REPO_REF: branch, tag or commit of --repo-url (default main)
  --jax-version=V        CFG_JAX_VERSION (default 0.10.2)
  --libtpu-url=URL       CFG_LIBTPU_URL: pip --find-links for libtpu (default JAX's)
  --python-version=V     CFG_PYTHON_VERSION: the workers' venv Python (default 3.11)
  --worker=all|N         CFG_WORKER (default: all for jobs, 0 for logs)
  --job=MODE             CFG_JOB: train | evaluate | sample, for logs/status/stop
  --lines=N / --no-follow  CFG_LOG_LINES, CFG_FOLLOW=0 for logs
  --poll-seconds=N       CFG_POLL_SECONDS: watch interval for run (default 60)
  --max-recreates=N      CFG_MAX_RECREATES: slice recreations before run gives up (20)
  --max-restarts=N       CFG_MAX_RESTARTS: job restarts on a healthy slice (3)
  --delete-when-done     CFG_DELETE_WHEN_DONE=1: run deletes the slice after training
  --ssh-flags="..."      CFG_SSH_FLAGS: extra `tpu-vm ssh`/`scp` flags, e.g. --internal-ip
  --create-flags="..."   CFG_CREATE_FLAGS: extra create flags, e.g. "--reserved
                         --network=NET --service-account=SA --scopes=cloud-platform"
  --dry-run              CFG_DRY_RUN=1: print every command instead of running it
  -h, --help

Example:
  launch/tpu.sh run --project=my-proj --zone=us-central2-b --name=cfg-64 \
    --accelerator=v4-32 --spot --workdir=gs://my-bucket/cfg/imagenet64 \
    --config=configs/imagenet64.py
EOF
}

PROJECT="${CFG_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}"
ZONE="${CFG_ZONE:-}"
NAME="${CFG_NAME:-}"
ACCELERATOR="${CFG_ACCELERATOR:-}"
WORKDIR="${CFG_WORKDIR:-}"
CONFIG="${CFG_CONFIG:-}"
SPOT="${CFG_SPOT:-0}"
PROVISIONING="${CFG_PROVISIONING:-queued}"
RUNTIME_VERSION="${CFG_RUNTIME_VERSION:-}"
REPO_URL="${CFG_REPO_URL:-}"
REPO_REF="${CFG_REPO_REF:-main}"
JAX_VERSION="${CFG_JAX_VERSION:-0.10.2}"
LIBTPU_URL="${CFG_LIBTPU_URL:-https://storage.googleapis.com/jax-releases/libtpu_releases.html}"
PYTHON_VERSION="${CFG_PYTHON_VERSION:-3.11}"
WORKER="${CFG_WORKER:-}"
JOB="${CFG_JOB:-train}"
LOG_LINES="${CFG_LOG_LINES:-100}"
FOLLOW="${CFG_FOLLOW:-1}"
POLL_SECONDS="${CFG_POLL_SECONDS:-60}"
MAX_RECREATES="${CFG_MAX_RECREATES:-20}"
MAX_RESTARTS="${CFG_MAX_RESTARTS:-3}"
DELETE_WHEN_DONE="${CFG_DELETE_WHEN_DONE:-0}"
SSH_FLAGS="${CFG_SSH_FLAGS:-}"
CREATE_FLAGS="${CFG_CREATE_FLAGS:-}"
# The worker-side helper inside the checkout that `setup` makes on every VM.
REMOTE_REPO="\$HOME/cfg_guidance/repo"
REMOTE_HELPER="$REMOTE_REPO/launch/tpu_worker.sh"
# Without --repo-url: the archive of this checkout, in each worker's home.
REMOTE_TARBALL="cfg_guidance-repo.tar.gz"
TARBALL=""

parse_flags() {
  local arg
  for arg in "$@"; do
    case "$arg" in
      --project*) PROJECT="$(flag_value "$arg")" ;;
      --zone*) ZONE="$(flag_value "$arg")" ;;
      --name*) NAME="$(flag_value "$arg")" ;;
      --accelerator*) ACCELERATOR="$(flag_value "$arg")" ;;
      --workdir*) WORKDIR="$(flag_value "$arg")" ;;
      --config.*) add_override "$arg" ;;
      --config*) CONFIG="$(flag_value "$arg")" ;;
      --spot) SPOT=1 ;;
      --provisioning*) PROVISIONING="$(flag_value "$arg")" ;;
      --runtime-version*) RUNTIME_VERSION="$(flag_value "$arg")" ;;
      --repo-url*) REPO_URL="$(flag_value "$arg")" ;;
      --repo-ref*) REPO_REF="$(flag_value "$arg")" ;;
      --jax-version*) JAX_VERSION="$(flag_value "$arg")" ;;
      --libtpu-url*) LIBTPU_URL="$(flag_value "$arg")" ;;
      --python-version*) PYTHON_VERSION="$(flag_value "$arg")" ;;
      --worker*) WORKER="$(flag_value "$arg")" ;;
      --job*) JOB="$(flag_value "$arg")" ;;
      --lines*) LOG_LINES="$(flag_value "$arg")" ;;
      --no-follow) FOLLOW=0 ;;
      --poll-seconds*) POLL_SECONDS="$(flag_value "$arg")" ;;
      --max-recreates*) MAX_RECREATES="$(flag_value "$arg")" ;;
      --max-restarts*) MAX_RESTARTS="$(flag_value "$arg")" ;;
      --delete-when-done) DELETE_WHEN_DONE=1 ;;
      --ssh-flags*) SSH_FLAGS="$(flag_value "$arg")" ;;
      --create-flags*) CREATE_FLAGS="$(flag_value "$arg")" ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      *) die "unknown flag '$arg' (see --help)" ;;
    esac
  done
}

# --- validation: each check names the flag and its variable -----------------

check_slice_settings() {
  require "$PROJECT" --project CFG_PROJECT
  [[ "$PROJECT" =~ ^([a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$ ]] ||
    die "--project (\$CFG_PROJECT) is not a valid project ID: '$PROJECT'"
  require "$ZONE" --zone CFG_ZONE
  [[ "$ZONE" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] ||
    die "--zone (\$CFG_ZONE) is not a zone like us-central2-b: '$ZONE'"
  require "$NAME" --name CFG_NAME
  [[ "$NAME" =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] ||
    die "--name (\$CFG_NAME) must be lowercase letters, digits and '-', starting with a letter: '$NAME'"
  case "$PROVISIONING" in
    queued | direct) ;;
    *) die "--provisioning (\$CFG_PROVISIONING) must be queued or direct, got '$PROVISIONING'" ;;
  esac
}

check_accelerator() {
  require "$ACCELERATOR" --accelerator CFG_ACCELERATOR
  tpu_topology "$ACCELERATOR"
  RUNTIME_VERSION="${RUNTIME_VERSION:-$TPU_RUNTIME}"
}

describe_accelerator() {
  echo "$ACCELERATOR: $TPU_HOSTS worker(s), $TPU_CHIPS chips, $TPU_DEVICES JAX devices" \
    "(runtime $RUNTIME_VERSION)"
}

check_job_settings() {
  require "$WORKDIR" --workdir CFG_WORKDIR
  [[ "$WORKDIR" =~ ^gs://[a-z0-9][-a-z0-9_.]{1,221}[a-z0-9](/.*)?$ ]] ||
    die "--workdir (\$CFG_WORKDIR) must be a gs://BUCKET/PATH that every worker can reach," \
      "got '$WORKDIR'"
  check_config "$CONFIG"
}

check_setup_settings() {
  if [[ -n "$REPO_URL" ]]; then
    require "$REPO_REF" --repo-ref CFG_REPO_REF
  elif [[ ! -e "$REPO_ROOT/.git" ]] ||
    ! git -C "$REPO_ROOT" rev-parse -q --verify HEAD >/dev/null; then
    die "--repo-url (or \$CFG_REPO_URL) is required: $REPO_ROOT is not a git checkout" \
      "with a commit to copy to the workers"
  fi
  [[ "$JAX_VERSION" =~ ^[0-9]+(\.[0-9]+)*$ ]] ||
    die "--jax-version (\$CFG_JAX_VERSION) must look like 0.10.2, got '$JAX_VERSION'"
}

check_worker() {
  [[ "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] ||
    die "--worker (\$CFG_WORKER) must be 'all' or a worker index, got '$WORKER'"
}

cmd_create() {
  create_slice
  wait_ready || die "$NAME did not come up (state $(slice_state))"
}

# The remote command that starts MODE in the background on each worker.
job_command() {
  local mode="$1"
  main_args "$CONFIG" "$WORKDIR" "$mode"
  echo "bash \"$REMOTE_HELPER\" start $(quote_cmd "$mode" "${MAIN_ARGS[@]}")"
}

cmd_job() {
  local mode="$1"
  ssh_workers "${WORKER:-all}" "$(job_command "$mode")"
}

status_command() {
  echo "bash \"$REMOTE_HELPER\" status $JOB"
}

# The job's state on worker 0: running | exit=N | stopped=N | missing, or
# unknown when ssh fails.
job_status() {
  local out
  out="$(ssh_workers 0 "$(status_command)" 2>/dev/null)" || out=""
  out="$(tail -n 1 <<<"$out")"
  case "$out" in
    running | missing | exit=* | stopped=*) echo "$out" ;;
    *) echo unknown ;;
  esac
}

# True when every worker reports a clean exit; a worker that saved and stopped
# on a preemption signal reports stopped=N instead.
all_workers_finished() {
  local out
  out="$(ssh_workers all "$(status_command)" 2>/dev/null)" || return 1
  (($(grep -cx 'exit=0' <<<"$out") == TPU_HOSTS))
}

cmd_logs() {
  ssh_workers "${WORKER:-0}" "bash \"$REMOTE_HELPER\" logs $JOB $LOG_LINES $FOLLOW"
}

cmd_status() {
  if is_true "$DRY_RUN"; then
    describe_command
    run "${DESCRIBE[@]}"
    ssh_workers 0 "$(status_command)"
    return 0
  fi
  echo "slice $NAME: $(slice_state)"
  echo "$JOB on worker 0: $(job_status)"
}

cmd_stop() {
  ssh_workers "${WORKER:-all}" "bash \"$REMOTE_HELPER\" stop $JOB"
}

# Deletes a lost slice and creates it again; gives up after MAX_RECREATES.
RECREATES=0
RESTARTS=0
recreate() {
  local state="$1"
  RECREATES=$((RECREATES + 1))
  ((RECREATES <= MAX_RECREATES)) ||
    die "$NAME lost $RECREATES times; giving up (--max-recreates / \$CFG_MAX_RECREATES)"
  log "$NAME is $state: recreating ($RECREATES/$MAX_RECREATES)"
  if [[ "$state" != NOT_FOUND ]]; then delete_slice || log "delete failed; creating anyway"; fi
  create_slice
}

# Brings the slice up, recreating it while it keeps getting lost.
bring_up() {
  local state
  state="$(slice_state)"
  case "$(state_class "$state")" in
    ready) log "$NAME exists and is $state: reusing it" ;;
    lost)
      [[ "$state" == NOT_FOUND ]] || delete_slice
      create_slice
      ;;
  esac
  until wait_ready; do recreate "$(slice_state)"; done
}

# While watching, a failed gcloud call must not end the watch: the functions
# below return non-zero instead, and the next poll tries again.

# A lost slice: recreate it, set it up and start the same job (it resumes).
recover() {
  recreate "$1" || return 1
  until wait_ready; do recreate "$(slice_state)" || return 1; done
  RESTARTS=0
  cmd_setup && cmd_job "$JOB"
}

# The job stopped on a healthy slice: set up and start it again.
restart_job() {
  RESTARTS=$((RESTARTS + 1))
  ((RESTARTS <= MAX_RESTARTS)) ||
    die "$JOB stopped $RESTARTS times on a healthy slice; giving up" \
      "(--max-restarts / \$CFG_MAX_RESTARTS); see: launch/tpu.sh logs --job=$JOB"
  log "$1: restarting $JOB ($RESTARTS/$MAX_RESTARTS)"
  cmd_setup && cmd_job "$JOB"
}

# Training is done when worker 0 exited 0, every worker exited 0 without a
# preemption signal, and the slice is still up one poll later: JAX saves and
# exits 0 on a preemption notice shortly before the slice goes away.
finished() {
  all_workers_finished || return 1
  sleep "$POLL_SECONDS"
  [[ "$(state_class "$(slice_state)")" == ready ]]
}

# Polls the slice and the job until training finishes; recreates a lost slice.
watch() {
  local state status
  while :; do
    sleep "$POLL_SECONDS"
    state="$(slice_state)"
    case "$(state_class "$state")" in
      pending) continue ;;
      lost)
        recover "$state" || log "recovering $NAME failed; retrying at the next poll"
        continue
        ;;
    esac
    status="$(job_status)"
    case "$status" in
      running | unknown) ;;
      exit=0)
        if finished; then
          log "$JOB finished on $NAME; results in $WORKDIR"
          if is_true "$DELETE_WHEN_DONE"; then delete_slice; fi
          return 0
        fi
        ;;
      # Stopped (signalled), failed, or gone after a VM restart. If the slice is
      # being preempted, the next poll sees it lost and recreates it.
      *) restart_job "$JOB on worker 0 is $status" || log "restart failed; retrying" ;;
    esac
  done
}

cmd_run() {
  if is_true "$DRY_RUN"; then
    create_slice
    wait_ready
    cmd_setup
    cmd_job "$JOB"
    echo "# dry run: would poll every ${POLL_SECONDS}s; on PREEMPTED/SUSPENDED/FAILED:" \
      "delete, create, setup and start the same $JOB command"
    return 0
  fi
  bring_up
  cmd_setup
  cmd_job "$JOB"
  watch
}

main() {
  (($# >= 1)) || { usage >&2; exit 2; }
  local command="$1"
  shift
  case "$command" in
    -h | --help) usage; exit 0 ;;
  esac
  parse_flags "$@"
  require_int "$POLL_SECONDS" --poll-seconds CFG_POLL_SECONDS 0
  require_int "$MAX_RECREATES" --max-recreates CFG_MAX_RECREATES 0
  require_int "$MAX_RESTARTS" --max-restarts CFG_MAX_RESTARTS 0
  require_int "$LOG_LINES" --lines CFG_LOG_LINES
  check_mode "$JOB"
  check_bool "$SPOT" --spot CFG_SPOT
  check_bool "$FOLLOW" --no-follow CFG_FOLLOW
  check_bool "$DELETE_WHEN_DONE" --delete-when-done CFG_DELETE_WHEN_DONE
  check_bool "$DRY_RUN" --dry-run CFG_DRY_RUN
  [[ -z "$WORKER" ]] || check_worker
  case "$command" in
    hosts) check_accelerator; describe_accelerator ;;
    create) check_slice_settings; check_accelerator; describe_accelerator >&2; cmd_create ;;
    setup) check_slice_settings; check_setup_settings; cmd_setup ;;
    train | evaluate | sample)
      check_slice_settings; check_job_settings; cmd_job "$command" ;;
    logs) check_slice_settings; cmd_logs ;;
    status) check_slice_settings; cmd_status ;;
    stop) check_slice_settings; cmd_stop ;;
    delete) check_slice_settings; delete_slice ;;
    run)
      check_slice_settings; check_accelerator; check_setup_settings; check_job_settings
      describe_accelerator >&2
      [[ "$JOB" == train ]] || die "run watches training; use --job=train (got '$JOB')"
      [[ "${WORKER:-all}" == all ]] || die "run trains on every worker; drop --worker=$WORKER"
      cmd_run
      ;;
    *) die "unknown command '$command': expected create, setup, train, evaluate, sample," \
      "logs, status, stop, delete, hosts or run (see --help)" ;;
  esac
}

main "$@"
