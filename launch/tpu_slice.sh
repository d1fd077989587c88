# Cloud TPU slices for tpu.sh: the accelerator table (workers, chips, devices),
# the gcloud calls that create, describe, delete and ssh into a slice, and `setup`.
# shellcheck shell=bash
# Sourced by tpu.sh, which sets NAME, PROJECT, ZONE, ...; TPU_* are read there.
# shellcheck disable=SC2034
#
# | type          | suffix counts        | chips/host | hosts                  | JAX devices | runtime               |
# |---------------|----------------------|------------|------------------------|-------------|-----------------------|
# | v4-N          | TensorCores, 2/chip  | 4          | N/8                    | N/2         | tpu-ubuntu2204-base   |
# | v5p-N         | TensorCores, 2/chip  | 4          | N/8                    | N/2         | v2-alpha-tpuv5        |
# | v5litepod-N   | chips, 1 core/chip   | 4 (8 at 8) | 1 if N <= 8, else N/4  | N           | v2-alpha-tpuv5-lite   |
# | v6e-N         | chips, 1 core/chip   | 4 (8 at 8) | 1 if N <= 8, else N/4  | N           | v2-alpha-tpuv6e       |
#
# v4 and v5p run one "megacore" JAX device per chip. v5e/v6e single-host VMs hold
# 1, 4 or 8 chips; multi-host slices (16 to 256 chips) are built of 4-chip VMs.
# Sources: cloud.google.com/tpu/docs/{v4,v5p,v5e,v6e} and .../runtimes.

# tpu_topology TYPE: sets TPU_HOSTS, TPU_CHIPS, TPU_DEVICES, TPU_RUNTIME or dies.
tpu_topology() {
  local type="$1" family size
  [[ "$type" =~ ^(v4|v5p|v5litepod|v6e)-([1-9][0-9]*)$ ]] ||
    die "--accelerator (\$CFG_ACCELERATOR) must be v4-N, v5p-N, v5litepod-N or v6e-N" \
      "(e.g. v4-32, v5litepod-64, v5p-128), got '$type'"
  family="${BASH_REMATCH[1]}"
  size="${BASH_REMATCH[2]}"
  case "$family" in
    v4 | v5p)
      ((size >= 8 && size % 8 == 0)) ||
        die "--accelerator (\$CFG_ACCELERATOR): $family counts TensorCores (8 per host), got '$type'"
      TPU_CHIPS=$((size / 2))
      TPU_HOSTS=$((size / 8))
      TPU_DEVICES=$TPU_CHIPS
      ;;
    v5litepod | v6e)
      case "$size" in
        1 | 4 | 8 | 16 | 32 | 64 | 128 | 256) ;;
        *) die "--accelerator (\$CFG_ACCELERATOR): $family-N takes N in 1 4 8 16 32 64 128 256, got '$type'" ;;
      esac
      TPU_CHIPS=$size
      TPU_HOSTS=$((size <= 8 ? 1 : size / 4))
      TPU_DEVICES=$size
      ;;
  esac
  case "$family" in
    v4) TPU_RUNTIME=tpu-ubuntu2204-base ;;
    v5p) TPU_RUNTIME=v2-alpha-tpuv5 ;;
    v5litepod) TPU_RUNTIME=v2-alpha-tpuv5-lite ;;
    v6e) TPU_RUNTIME=v2-alpha-tpuv6e ;;
  esac
}

create_slice() {
  local extra=()
  read -r -a extra <<<"$CREATE_FLAGS"
  # ${a[@]+"${a[@]}"}: an empty array under `set -u` in macOS's bash 3.2.
  if is_true "$SPOT"; then extra=(--spot ${extra[@]+"${extra[@]}"}); fi
  if [[ "$PROVISIONING" == queued ]]; then
    run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" \
      --project="$PROJECT" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
      --runtime-version="$RUNTIME_VERSION" ${extra[@]+"${extra[@]}"}
  else
    run gcloud compute tpus tpu-vm create "$NAME" --project="$PROJECT" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME_VERSION" ${extra[@]+"${extra[@]}"}
  fi
}

delete_slice() {
  if [[ "$PROVISIONING" == queued ]]; then
    # --force also deletes the TPU VM the queued resource holds.
    run gcloud compute tpus queued-resources delete "$NAME" --project="$PROJECT" \
      --zone="$ZONE" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" --project="$PROJECT" --zone="$ZONE" --quiet
  fi
}

# Sets DESCRIBE to the command that prints the queued resource's state (queued)
# or the TPU VM's (direct).
describe_command() {
  if [[ "$PROVISIONING" == queued ]]; then
    DESCRIBE=(gcloud compute tpus queued-resources describe "$NAME" --project="$PROJECT"
      --zone="$ZONE" --format='value(state.state)')
  else
    DESCRIBE=(gcloud compute tpus tpu-vm describe "$NAME" --project="$PROJECT"
      --zone="$ZONE" --format='value(state)')
  fi
}

# The slice's state; NOT_FOUND when describe fails.
slice_state() {
  local state
  describe_command
  state="$("${DESCRIBE[@]}" 2>/dev/null)" || state=NOT_FOUND
  echo "${state:-NOT_FOUND}"
}

# ready | lost | pending
state_class() {
  case "$1" in
    READY | ACTIVE) echo ready ;;
    PREEMPTED | SUSPENDED | SUSPENDING | FAILED | TERMINATED | STOPPED | NOT_FOUND) echo lost ;;
    *) echo pending ;;
  esac
}

# ssh WORKER COMMAND: runs a shell command on one worker or on all of them.
ssh_workers() {
  local extra=()
  read -r -a extra <<<"$SSH_FLAGS"
  run gcloud compute tpus tpu-vm ssh "$NAME" --project="$PROJECT" --zone="$ZONE" \
    --worker="$1" --command="$2" ${extra[@]+"${extra[@]}"}
}

# scp_workers LOCAL_FILE REMOTE_PATH: copies a file to every worker (REMOTE_PATH
# relative to the home directory).
scp_workers() {
  local extra=()
  read -r -a extra <<<"$SSH_FLAGS"
  run gcloud compute tpus tpu-vm scp "$1" "$NAME:$2" --project="$PROJECT" --zone="$ZONE" \
    --worker=all ${extra[@]+"${extra[@]}"}
}

# Without --repo-url, every worker gets this checkout's HEAD: no repository URL,
# and no credentials on the VMs. Archived once, so recoveries ship the same code.
copy_checkout() {
  if [[ -z "$TARBALL" ]]; then
    TARBALL="$(mktemp)"
    trap 'rm -f "$TARBALL"' EXIT
    [[ -z "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]] ||
      log "uncommitted changes stay here: the workers get HEAD" \
        "($(git -C "$REPO_ROOT" rev-parse --short HEAD))"
    run git -C "$REPO_ROOT" archive --format=tar.gz --output="$TARBALL" HEAD
  fi
  scp_workers "$TARBALL" "$REMOTE_TARBALL"
}

setup_command() {
  local fetch q_args
  if [[ -n "$REPO_URL" ]]; then
    fetch="[ -d .git ] || git init -q; git remote remove origin 2>/dev/null || true;"
    fetch+=" git remote add origin $(quote_cmd "$REPO_URL");"
    fetch+=" git fetch -q --depth=1 origin $(quote_cmd "$REPO_REF");"
    fetch+=" git checkout -q --force FETCH_HEAD;"
  else
    fetch="tar -xzf \"\$HOME/$REMOTE_TARBALL\";"
  fi
  q_args="$(quote_cmd "$PYTHON_VERSION" "$JAX_VERSION" "$LIBTPU_URL")"
  echo "set -eu; mkdir -p \"$REMOTE_REPO\"; cd \"$REMOTE_REPO\"; $fetch" \
    "bash launch/tpu_worker.sh install $q_args"
}

cmd_setup() {
  [[ -n "$REPO_URL" ]] || copy_checkout
  ssh_workers all "$(setup_command)"
}

# Polls until the slice is usable; returns 1 if it is lost on the way.
wait_ready() {
  local state last=""
  if is_true "$DRY_RUN"; then
    echo "# dry run: would poll the state of $NAME until READY/ACTIVE"
    return 0
  fi
  while :; do
    state="$(slice_state)"
    [[ "$state" == "$last" ]] || log "$NAME: $state"
    last="$state"
    case "$(state_class "$state")" in
      ready) return 0 ;;
      lost) return 1 ;;
    esac
    sleep "$POLL_SECONDS"
  done
}
