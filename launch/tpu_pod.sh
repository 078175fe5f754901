#!/usr/bin/env bash
# Cloud TPU pod lifecycle for qstar_jax: create -> setup -> run -> logs -> stop -> delete.
#
# A TPU pod slice is several VMs ("workers"), each owning a few chips. JAX's
# multi-controller runtime wants the *same* program started on every worker;
# `jax.distributed.initialize()` (called by qstar_jax.train) then finds its peers through
# the TPU metadata and builds one global mesh over all chips. So this script only wraps
# gcloud: `--worker=all` fans every remote command out to all workers.
#
#   launch/tpu_pod.sh [options] create | setup | run -- TRAIN_ARGS... | logs | stop | delete | watch -- TRAIN_ARGS...
#   launch/tpu_pod.sh [--accelerator-type TYPE] preflight -- TRAIN_ARGS...
#
# Options (each also read from the environment variable in brackets; flags win):
#   --name NAME               TPU VM name, also the queued-resource id       [TPU_NAME]  (qstar)
#   --zone ZONE               e.g. us-central2-b                             [ZONE]      (required)
#   --project PROJECT         default: gcloud's configured project           [PROJECT]
#   --accelerator-type TYPE   v4-32, v5litepod-64, v5p-128, ...              [ACCELERATOR_TYPE] (v4-32)
#   --version VERSION         TPU software version; default by generation    [TPU_VERSION]
#   --spot | --preemptible    capacity that can be reclaimed (see `watch`)   [PROVISIONING=spot|preemptible]
#   --queued                  request through queued resources (large slices) [QUEUED=1]
#   --stage 'COMMAND'         run on every worker at the end of `setup`, e.g. copy the
#                             converted weights and the data from a bucket   [STAGE]
#   --worker N|all            worker whose log `logs` shows                  [WORKER] (0)
#   --poll SECONDS            `watch` polling interval                       [POLL] (300)
#   --dry-run                 print every command instead of running it
#
# `run` starts `python -m qstar_jax.train TRAIN_ARGS` on every worker under nohup, one log
# per worker in ~/qstar_logs/train-HOSTNAME.log. Checkpoints must be in storage every worker
# sees, so give a bucket path: --workdir gs://BUCKET/runs/NAME. Rerunning the same command
# resumes from the newest checkpoint. `stop` sends SIGTERM: the run saves and exits.
# Without a --config.mesh.* argument `run` and `watch` add --config.mesh.auto=True (the mesh
# with the lowest per-chip peak that fits). `preflight` runs here, before the slice exists:
# the TPU compiler's per-chip memory for --accelerator-type, with the same mesh choice.
# `watch` keeps a spot/preemptible run going: it recreates a preempted slice and reruns.
set -euo pipefail

TPU_NAME="${TPU_NAME:-qstar}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
TPU_VERSION="${TPU_VERSION:-}"
PROVISIONING="${PROVISIONING:-}"
QUEUED="${QUEUED:-0}"
STAGE="${STAGE:-}"
WORKER="${WORKER:-0}"
POLL="${POLL:-300}"
DRY_RUN=0

JAX_VERSION=0.10.2  # requirements.txt's jax; the tpu extra brings the matching libtpu
GCSFS_VERSION=2026.10.1  # lets Orbax's path layer (etils.epath via fsspec) reach gs:// without TensorFlow
UV_VERSION=0.13.8   # makes a Python 3.11 venv on images whose system Python is older
# Paths on the workers, expanded by their shell (hence the quoted tildes).
# shellcheck disable=SC2088
REPO_DIR='~/qstar_jax'
# shellcheck disable=SC2088
VENV_DIR='~/qstar_venv'
# shellcheck disable=SC2088
LOG_DIR='~/qstar_logs'

die() { echo "error: $*" >&2; exit 2; }

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

# Shell-quotes one word so printed commands can be pasted back into a shell.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(quote "$word")"; done
  printf '%s' "$out"
}

# Runs a command, or prints it under --dry-run.
x() {
  if ((DRY_RUN)); then
    quote_all "$@"; echo
  else
    "$@"
  fi
}

resolve_version() {  # TPU_VERSION from the flag, or the usual one for the generation
  if [[ -n "$TPU_VERSION" ]]; then return; fi
  case "$ACCELERATOR_TYPE" in
    v4-*) TPU_VERSION=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) TPU_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) TPU_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) TPU_VERSION=v2-alpha-tpuv6e ;;
    *) die "no default --version for accelerator type $ACCELERATOR_TYPE; pass --version" ;;
  esac
}

zone_flags() {
  ZONE_FLAGS=("--zone=$ZONE")
  if [[ -n "$PROJECT" ]]; then ZONE_FLAGS+=("--project=$PROJECT"); fi
}

provisioning_flags() {
  case "$PROVISIONING" in
    "") PROVISIONING_FLAGS=() ;;
    spot) PROVISIONING_FLAGS=(--spot) ;;
    preemptible)
      if ((QUEUED)); then die "queued resources take --spot, not --preemptible"; fi
      PROVISIONING_FLAGS=(--preemptible) ;;
    *) die "PROVISIONING must be spot or preemptible, got '$PROVISIONING'" ;;
  esac
}

on_workers() {  # on_workers WORKER COMMAND: one ssh command on the given worker(s)
  x gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${ZONE_FLAGS[@]}" "--worker=$1" "--command=$2"
}

cmd_create() {
  resolve_version
  provisioning_flags
  if ((QUEUED)); then
    x gcloud compute tpus queued-resources create "$TPU_NAME" "--node-id=$TPU_NAME" "${ZONE_FLAGS[@]}" \
      "--accelerator-type=$ACCELERATOR_TYPE" "--runtime-version=$TPU_VERSION" ${PROVISIONING_FLAGS[@]+"${PROVISIONING_FLAGS[@]}"}
  else
    x gcloud compute tpus tpu-vm create "$TPU_NAME" "${ZONE_FLAGS[@]}" \
      "--accelerator-type=$ACCELERATOR_TYPE" "--version=$TPU_VERSION" ${PROVISIONING_FLAGS[@]+"${PROVISIONING_FLAGS[@]}"}
  fi
}

cmd_setup() {
  # The committed tree (git archive), so every worker runs exactly one known revision.
  local repo archive
  repo="$(cd "$(dirname "$0")/.." && pwd)"
  archive="${TMPDIR:-/tmp}/qstar_jax-$TPU_NAME.tar.gz"
  x git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
  x gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:qstar_jax.tar.gz" "${ZONE_FLAGS[@]}" --worker=all
  on_workers all "set -e; rm -rf $REPO_DIR && mkdir -p $REPO_DIR $LOG_DIR && tar -xzf ~/qstar_jax.tar.gz -C $REPO_DIR \
&& python3 -m pip install -q --user uv==$UV_VERSION && ~/.local/bin/uv venv -q --python 3.11 $VENV_DIR \
&& VIRTUAL_ENV=$VENV_DIR ~/.local/bin/uv pip install -q -r $REPO_DIR/requirements.txt -e $REPO_DIR 'jax[tpu]==$JAX_VERSION' gcsfs==$GCSFS_VERSION"
  if [[ -n "$STAGE" ]]; then on_workers all "cd $REPO_DIR && $STAGE"; fi
}

check_train_args() {
  (($# > 0)) || die "run needs the training arguments after --, e.g. run -- --config experiments/mistral_owm.py --workdir gs://BUCKET/runs/NAME"
}

train_command() {  # the remote command line that starts training in the background
  printf '%s' "cd $REPO_DIR && . $VENV_DIR/bin/activate && (nohup python -m qstar_jax.train $(quote_all "$@") \
> $LOG_DIR/train-\$(hostname).log 2>&1 < /dev/null & echo \$! > $LOG_DIR/train.pid)"
}

# mesh.auto unless the arguments set a mesh: the program compiles the step for each mesh
# that divides the shapes and trains on the lowest per-chip peak that fits the chips' HBM.
with_mesh_choice() {
  local arg
  for arg in "$@"; do [[ "$arg" == --config.mesh.* ]] && { printf '%s\n' "$@"; return; }; done
  printf '%s\n' "$@" --config.mesh.auto=True
}

cmd_run() {
  check_train_args "$@"
  local args
  mapfile -t args < <(with_mesh_choice "$@")
  on_workers all "$(train_command "${args[@]}")"
}

# On this machine, before the slice exists: the TPU compiler's per-chip memory for the
# accelerator type (needs libtpu: pip install libtpu==0.0.42.1; no TPU, no gcloud).
cmd_preflight() {
  check_train_args "$@"
  local args
  mapfile -t args < <(with_mesh_choice "$@")
  x env JAX_PLATFORMS=cpu python -m qstar_jax.train --preflight --topology "$ACCELERATOR_TYPE" "${args[@]}"
}

cmd_logs() { on_workers "$WORKER" "tail -n 200 -F $LOG_DIR/train-*.log"; }

cmd_stop() { on_workers all "kill -TERM \$(cat $LOG_DIR/train.pid) 2>/dev/null || true"; }

cmd_delete() {
  if ((QUEUED)); then
    x gcloud compute tpus queued-resources delete "$TPU_NAME" "${ZONE_FLAGS[@]}" --force --quiet
  else
    x gcloud compute tpus tpu-vm delete "$TPU_NAME" "${ZONE_FLAGS[@]}" --quiet
  fi
}

slice_state() {  # READY / PREEMPTED / ... (tpu-vm), ACTIVE / SUSPENDED / FAILED / ... (queued)
  if ((QUEUED)); then
    gcloud compute tpus queued-resources describe "$TPU_NAME" "${ZONE_FLAGS[@]}" --format='value(state.state)' 2>/dev/null || true
  else
    gcloud compute tpus tpu-vm describe "$TPU_NAME" "${ZONE_FLAGS[@]}" --format='value(state)' 2>/dev/null || true
  fi
}

# The job is done when worker 0's training process has exited on a healthy slice (train.py
# exits 0 at the last step; a preempted slice shows up as a slice state, not an exit).
job_running() { on_workers 0 "kill -0 \$(cat $LOG_DIR/train.pid) 2>/dev/null" > /dev/null 2>&1; }

recreate_and_run() {
  cmd_delete || true
  cmd_create
  cmd_setup
  cmd_run "$@"
}

cmd_watch() {
  check_train_args "$@"
  if ((DRY_RUN)); then  # what one recovery round runs
    recreate_and_run "$@"
    return
  fi
  local state
  while true; do
    state="$(slice_state)"
    case "$state" in
      READY | ACTIVE)
        if ! job_running; then echo "training process has exited on a healthy slice; done"; return 0; fi ;;
      CREATING | PROVISIONING | WAITING_FOR_RESOURCES | ACCEPTED | STARTING | RESTARTING) ;;
      *)
        echo "slice $TPU_NAME is '${state:-gone}': recreating it and resuming from the last checkpoint"
        recreate_and_run "$@" ;;
    esac
    sleep "$POLL"
  done
}

main() {
  local command="" rest=()
  while (($# > 0)); do
    if [[ "$1" =~ ^--(name|zone|project|accelerator-type|version|stage|worker|poll)$ ]] && (($# < 2)); then
      die "$1 needs a value"
    fi
    case "$1" in
      --name) TPU_NAME="$2"; shift 2 ;;
      --zone) ZONE="$2"; shift 2 ;;
      --project) PROJECT="$2"; shift 2 ;;
      --accelerator-type) ACCELERATOR_TYPE="$2"; shift 2 ;;
      --version) TPU_VERSION="$2"; shift 2 ;;
      --spot) PROVISIONING=spot; shift ;;
      --preemptible) PROVISIONING=preemptible; shift ;;
      --queued) QUEUED=1; shift ;;
      --stage) STAGE="$2"; shift 2 ;;
      --worker) WORKER="$2"; shift 2 ;;
      --poll) POLL="$2"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      -h | --help) usage; exit 0 ;;
      --) shift; rest=("$@"); break ;;
      -*) die "unknown option $1 (see --help)" ;;
      *)
        [[ -z "$command" ]] || die "one subcommand at a time (got '$command' and '$1'); training arguments go after --"
        command="$1"; shift ;;
    esac
  done
  [[ -n "$command" ]] || { usage >&2; exit 2; }
  [[ "$command" == preflight || -n "$ZONE" ]] || die "--zone (or ZONE) is required"
  zone_flags
  case "$command" in
    create | setup | logs | stop | delete)
      ((${#rest[@]} == 0)) || die "$command takes no training arguments"
      "cmd_$command" ;;
    run | watch | preflight) "cmd_$command" ${rest[@]+"${rest[@]}"} ;;
    *) die "unknown subcommand '$command' (create, setup, run, logs, stop, delete, watch, preflight)" ;;
  esac
}

main "$@"
