#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice): create, install, run, logs, stop, delete.
#
# On a pod slice every worker runs the same command; jax.distributed.initialize() finds
# its peers from the TPU metadata, so the command carries no process flags. Training runs
# detached from the ssh session (setsid + nohup) with its output in ~/ctran_logs/train.log
# on each worker, so closing the laptop does not stop it.
set -euo pipefail
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "tpu_vm.sh: error: needs bash >= 4.4, this is $BASH_VERSION (macOS: brew install bash)" >&2
  exit 2
fi

LAUNCHER=tpu_vm.sh
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# On the workers; the ~ is left for the remote shell to expand.
# shellcheck disable=SC2088
REMOTE_REPO='~/ctran_jax' REMOTE_VENV='~/ctran_venv' REMOTE_LOG='~/ctran_logs/train.log'

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND [options] [-- EXTRA TRAINING FLAGS]

Commands:
  create    create the TPU VM (gcloud compute tpus tpu-vm create)
  install   on every worker: copy this checkout (or clone --repo-url) to ~/ctran_jax,
            make a Python venv ~/ctran_venv, pip install -e . and jax[tpu]
  run       on every worker, in the background: the training command, appending to
            ~/ctran_logs/train.log (refuses while a run is still going)
  logs      follow the log of one worker (--worker, default 0: process 0 logs progress)
  stop      stop the training on every worker (SIGTERM, SIGKILL after 30 s)
  delete    delete the TPU VM
  (worker-start / worker-stop are what run / stop execute on each worker)

Options (environment variable in brackets):
  --name NAME             TPU VM name, required [CTRAN_TPU_NAME]
  --zone ZONE             zone, e.g. us-central2-b, required [CTRAN_TPU_ZONE]
  --project PROJECT       project (default: gcloud's configured one) [CTRAN_TPU_PROJECT]
  --accelerator-type T    e.g. v4-8, v4-32, v5litepod-16 (default v4-8) [CTRAN_TPU_TYPE]
  --version V             TPU software version (default tpu-ubuntu2204-base) [CTRAN_TPU_VERSION]
  --spot                  create a Spot TPU (preemptible; resume by re-running) [CTRAN_TPU_SPOT=1]
  --repo-url URL          install: git clone URL instead of copying this checkout [CTRAN_REPO_URL]
  --ref REF               install with --repo-url: branch, tag or commit (default HEAD)
                          [CTRAN_REPO_REF]
  --python-version V      install: Python of the venv (default 3.11) [CTRAN_PYTHON_VERSION]
  --jax-version V         install: jax[tpu]==V (default 0.10.2, as setup.cfg) [CTRAN_JAX_VERSION]
  --config FILE           run: config, relative to the repo (configs/coco.py), required
                          [CTRAN_CONFIG]
  --workdir DIR           run: gs://bucket/runs/NAME, required [CTRAN_WORKDIR]
  --data-dir DIR          run: TFDS data_dir, e.g. gs://bucket/tfds [CTRAN_DATA_DIR]
  --worker W              logs: worker number or 'all' (default 0)
  --dry-run               print every command, one per line, instead of running it
  -h, --help              this text

Flags after -- are appended to the training command (--config.batch_size=64 ...).

Example (a v4-32 slice, 4 hosts):
  export CTRAN_TPU_NAME=ctran CTRAN_TPU_ZONE=us-central2-b CTRAN_TPU_TYPE=v4-32
  launch/tpu_vm.sh create
  launch/tpu_vm.sh install
  launch/tpu_vm.sh run --config=configs/coco.py --workdir=gs://my-bucket/runs/coco \
      --data-dir=gs://my-bucket/tfds -- --config.batch_size=64
  launch/tpu_vm.sh logs
  launch/tpu_vm.sh delete
EOF
}

warn() { echo "tpu_vm.sh: warning: $*" >&2; }

dry_run=0

run() {  # run ARGV...: execute, or print it quoted under --dry-run
  if ((dry_run)); then
    quote_all "$@"
    echo
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

# ---------------------------------------------------------------------------------------
# On a worker.

# worker-start CMD...: start CMD detached, appending to ~/ctran_logs/train.log.
worker_start() {
  (($# > 0)) || die "worker-start needs a command after --"
  local log_dir=$HOME/ctran_logs
  local log=$log_dir/train.log pid_file=$log_dir/train.pid pid
  mkdir -p "$log_dir"
  if [[ -f $pid_file ]] && pid=$(<"$pid_file") && kill -0 "$pid" 2>/dev/null; then
    die "$(hostname): a run is still going (pid $pid, log $log);" \
      "stop it first: launch/tpu_vm.sh stop"
  fi
  printf '=== %s %s: %s\n' "$(date -u +%FT%TZ)" "$(hostname)" "$(quote_all "$@")" >>"$log"
  setsid nohup "$@" >>"$log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$pid_file"
  echo "$(hostname): started pid $pid, log $log"
}

# worker-stop: SIGTERM the run's process group, SIGKILL it 30 s later if still there.
worker_stop() {
  local pid_file=$HOME/ctran_logs/train.pid pid i
  if ! [[ -f $pid_file ]] || ! pid=$(<"$pid_file") || ! kill -0 "$pid" 2>/dev/null; then
    echo "$(hostname): no run going"
    return 0
  fi
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  for ((i = 0; i < 150; i++)); do
    kill -0 "$pid" 2>/dev/null || { echo "$(hostname): stopped pid $pid"; return 0; }
    sleep 0.2
  done
  kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  echo "$(hostname): killed pid $pid (no exit 30 s after SIGTERM)"
}

# ---------------------------------------------------------------------------------------
# On this machine.

gcloud_tpu() {  # gcloud_tpu SUBCOMMAND ARGS...: gcloud compute tpus tpu-vm ... --zone --project
  local sub=$1
  shift
  local args=(gcloud compute tpus tpu-vm "$sub" "$@" "--zone=$zone")
  [[ -z $project ]] || args+=("--project=$project")
  run "${args[@]}"
}

on_workers() {  # on_workers WORKER STEP...: the steps joined with '; ', run on the workers
  local remote="" step worker=$1
  shift
  for step in "$@"; do
    remote+="${remote:+; }$step"
  done
  gcloud_tpu ssh "$name" "--worker=$worker" "--command=$remote"
}

cmd_create() {
  local extra=()
  ((spot)) && extra+=(--spot)
  gcloud_tpu create "$name" "--accelerator-type=$accelerator_type" "--version=$version" \
    "${extra[@]}"
}

copy_checkout() {  # tar the checkout (what git tracks or would track), copy, unpack
  local tarball=${TMPDIR:-/tmp}/ctran_jax-$name.tar.gz
  local git_list=(git -C "$REPO_DIR" ls-files -z --cached --others --exclude-standard)
  local tar_cmd=(tar -czf "$tarball" -C "$REPO_DIR" --null -T -)
  # GNU tar: skip files deleted but not yet committed (bsdtar lacks the option).
  if tar --version 2>/dev/null | grep -q GNU; then
    tar_cmd=(tar -czf "$tarball" -C "$REPO_DIR" --null --ignore-failed-read -T -)
  fi
  if [[ -d $REPO_DIR/.git ]]; then
    if ((dry_run)); then
      echo "$(quote_all "${git_list[@]}") | $(quote_all "${tar_cmd[@]}")"
    else
      echo "+ packing $REPO_DIR (git ls-files) into $tarball" >&2
      "${git_list[@]}" | "${tar_cmd[@]}"
    fi
  else
    run tar -czf "$tarball" -C "$REPO_DIR" --exclude=./.venv --exclude='*.egg-info' \
      --exclude=__pycache__ .
  fi
  gcloud_tpu scp "$tarball" "$name:ctran_jax.tar.gz" --worker=all
  on_workers all \
    "rm -rf $REMOTE_REPO && mkdir -p $REMOTE_REPO" \
    "tar -xzf ctran_jax.tar.gz -C $REMOTE_REPO && rm ctran_jax.tar.gz"
}

clone_repo() {
  on_workers all "set -e" \
    "[ -d $REMOTE_REPO/.git ] || git clone --quiet $(quote "$repo_url") $REMOTE_REPO" \
    "cd $REMOTE_REPO" \
    "git fetch --quiet origin $(quote "$repo_ref")" \
    "git checkout --quiet --detach FETCH_HEAD" \
    "git log -1 --oneline"
}

cmd_install() {
  if [[ -n $repo_url ]]; then
    clone_repo
  else
    copy_checkout
  fi
  # uv brings its own Python when the image's is older than the one jax needs.
  # shellcheck disable=SC2088  # ~ is expanded on the worker
  local uv='~/.local/bin/uv' venv_python=$REMOTE_VENV/bin/python
  on_workers all "set -e" \
    "PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --quiet --upgrade uv" \
    "[ -x $venv_python ] || $uv venv --seed --python $(quote "$python_version") $REMOTE_VENV" \
    "$uv pip install --python $venv_python -e $REMOTE_REPO \"jax[tpu]==$jax_version\"" \
    "$venv_python -c \"import jax, sys; print(sys.version, jax.__version__)\""
}

cmd_run() {
  [[ -n $config ]] || die "run needs --config (or CTRAN_CONFIG), e.g. --config=configs/coco.py"
  [[ -n $workdir ]] ||
    die "run needs --workdir (or CTRAN_WORKDIR), e.g. --workdir=gs://BUCKET/runs/NAME"
  local config_file=${config%%:*}
  if [[ $config_file != /* && ! -f $REPO_DIR/$config_file ]]; then
    die "config file '$config_file' not found in $REPO_DIR (paths are relative to the repo)"
  fi
  if [[ $workdir != gs://* ]]; then
    warn "--workdir=$workdir is not a gs:// path: it is on each worker's own disk (lost with" \
      "the VM, and on a multi-host slice the hosts would not share checkpoints)"
  fi
  local train=(python -m ctran_jax.main "--config=$config" "--workdir=$workdir")
  [[ -z $data_dir ]] || train+=("--config.data.data_dir=$data_dir")
  train+=("${extra_args[@]}")
  # The remote shell expands ~ and runs this repo's worker-start there.
  local start="cd $REMOTE_REPO && bash launch/tpu_vm.sh worker-start --"
  on_workers all "$start $REMOTE_VENV/bin/$(quote_all "${train[@]}")"
}

cmd_logs() {
  on_workers "$worker" "tail -n 200 -F $REMOTE_LOG"
}

cmd_stop() {
  on_workers all "cd $REMOTE_REPO && bash launch/tpu_vm.sh worker-stop"
}

cmd_delete() {
  gcloud_tpu delete "$name" --quiet
}

# ---------------------------------------------------------------------------------------

(($# > 0)) || { usage >&2; exit 2; }
subcommand=$1
shift
case $subcommand in
  -h | --help | help) usage; exit 0 ;;
  worker-start)
    [[ ${1:-} != -- ]] || shift
    worker_start "$@"
    exit 0 ;;
  worker-stop) worker_stop; exit 0 ;;
  create | install | run | logs | stop | delete) ;;
  *) die "unknown command '$subcommand' (create, install, run, logs, stop, delete)" ;;
esac

name=${CTRAN_TPU_NAME:-}
zone=${CTRAN_TPU_ZONE:-}
project=${CTRAN_TPU_PROJECT:-}
accelerator_type=${CTRAN_TPU_TYPE:-v4-8}
version=${CTRAN_TPU_VERSION:-tpu-ubuntu2204-base}
spot=${CTRAN_TPU_SPOT:-0}
repo_url=${CTRAN_REPO_URL:-}
repo_ref=${CTRAN_REPO_REF:-HEAD}
python_version=${CTRAN_PYTHON_VERSION:-3.11}
jax_version=${CTRAN_JAX_VERSION:-0.10.2}
config=${CTRAN_CONFIG:-}
workdir=${CTRAN_WORKDIR:-}
data_dir=${CTRAN_DATA_DIR:-}
worker=0
extra_args=()

while (($# > 0)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --spot) spot=1; shift ;;
    --) shift; extra_args=("$@"); break ;;
    --*=*)
      option=${1%%=*}
      set -- "$option" "${1#*=}" "${@:2}"
      ;;
    --name | --zone | --project | --accelerator-type | --version | --repo-url | --ref | \
      --python-version | --jax-version | --config | --workdir | --data-dir | --worker)
      need_value "$1" "$#"
      case $1 in
        --name) name=$2 ;;
        --zone) zone=$2 ;;
        --project) project=$2 ;;
        --accelerator-type) accelerator_type=$2 ;;
        --version) version=$2 ;;
        --repo-url) repo_url=$2 ;;
        --ref) repo_ref=$2 ;;
        --python-version) python_version=$2 ;;
        --jax-version) jax_version=$2 ;;
        --config) config=$2 ;;
        --workdir) workdir=$2 ;;
        --data-dir) data_dir=$2 ;;
        --worker) worker=$2 ;;
      esac
      shift 2
      ;;
    *) die "unknown option '$1' (training flags go after --)" ;;
  esac
done

case $spot in
  1 | true | yes) spot=1 ;;
  0 | false | no | "") spot=0 ;;
  *) die "CTRAN_TPU_SPOT must be 1 or 0, got '$spot'" ;;
esac
[[ -n $name ]] || die "--name (or CTRAN_TPU_NAME) is required: the TPU VM's name"
[[ -n $zone ]] || die "--zone (or CTRAN_TPU_ZONE) is required, e.g. --zone=us-central2-b"
[[ $worker == all || $worker =~ ^[0-9]+$ ]] ||
  die "--worker must be a number or 'all', got '$worker'"
if ((${#extra_args[@]})) && [[ $subcommand != run ]]; then
  die "flags after -- are training flags, only for 'run'"
fi
if ((!dry_run)) && ! command -v gcloud >/dev/null; then
  die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk) and run" \
    "'gcloud auth login', or use --dry-run to see the commands"
fi

"cmd_$subcommand"
