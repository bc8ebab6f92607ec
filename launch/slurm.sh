#!/usr/bin/env bash
# Submit launch/slurm.sbatch with the node and GPU counts as flags, after checking the
# settings on the login node (a typo should not wait in the queue for hours).
set -euo pipefail
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "slurm.sh: error: needs bash >= 4.4, this is $BASH_VERSION" >&2
  exit 2
fi

LAUNCHER=slurm.sh
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REPO_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
JOB_SCRIPT=$REPO_DIR/launch/slurm.sbatch

usage() {
  cat <<'EOF'
Usage: launch/slurm.sh [options] --config=FILE --workdir=DIR [-- EXTRA TRAINING FLAGS]

Submits launch/slurm.sbatch: NODES nodes x GPUS processes, one per GPU.

Submission options:
  --nodes N             nodes (default 1)
  --gpus-per-node G     GPUs per node = processes per node (default 8)
  --cpus-per-task C     CPU cores per process (default: the script's #SBATCH value)
  --time T              time limit, e.g. 24:00:00
  --partition P, --account A, --qos Q, --job-name NAME, --dependency D
                        passed to sbatch (--dependency=afterany:JOBID chains a resume)
  --dry-run             print the sbatch command and the srun line of the job
  -h, --help            this text

Job options (see launch/slurm.sbatch --help): --config, --workdir, --data-dir, --venv,
--log-dir, --gpu-bind; the repo is this checkout.

Example:
  launch/slurm.sh --nodes=2 --gpus-per-node=4 --partition=gpu \
      --config=configs/coco.py --workdir=/shared/runs/coco \
      --data-dir=/shared/tensorflow_datasets -- --config.batch_size=64
EOF
}

is_count() { [[ $1 =~ ^[0-9]+$ ]] && (($1 >= 1)); }

nodes=1
gpus_per_node=8
cpus_per_task=$(sed -n 's/^#SBATCH --cpus-per-task=\([0-9]*\).*/\1/p' "$JOB_SCRIPT")
dry_run=0
sbatch_args=()
job_args=()
extra_args=()

while (($# > 0)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra_args=("$@"); break ;;
    --nodes | --gpus-per-node | --cpus-per-task | --time | --partition | --account | --qos | \
      --job-name | --dependency | --config | --workdir | --data-dir | --venv | --log-dir | \
      --gpu-bind)
      need_value "$1" "$#"
      set -- "$1=$2" "${@:3}"
      ;;
    --nodes=*) nodes=${1#*=}; shift ;;
    --gpus-per-node=*) gpus_per_node=${1#*=}; shift ;;
    --cpus-per-task=*) cpus_per_task=${1#*=}; sbatch_args+=("$1"); shift ;;
    --time=* | --partition=* | --account=* | --qos=* | --job-name=* | --dependency=*)
      sbatch_args+=("$1"); shift ;;
    --config=* | --workdir=* | --data-dir=* | --venv=* | --log-dir=* | --gpu-bind=*)
      job_args+=("$1"); shift ;;
    *) die "unknown option '$1' (training flags go after --)" ;;
  esac
done

is_count "$nodes" || die "--nodes must be a positive integer, got '$nodes'"
is_count "$gpus_per_node" || die "--gpus-per-node must be a positive integer, got '$gpus_per_node'"
[[ -z $cpus_per_task ]] || is_count "$cpus_per_task" ||
  die "--cpus-per-task must be a positive integer, got '$cpus_per_task'"

sbatch_cmd=(sbatch "--nodes=$nodes" "--ntasks-per-node=$gpus_per_node"
            "--gpus-per-node=$gpus_per_node" "${sbatch_args[@]}"
            "$JOB_SCRIPT" "--repo=$REPO_DIR" "${job_args[@]}")
((${#extra_args[@]} == 0)) || sbatch_cmd+=(-- "${extra_args[@]}")

# The job script checks its settings and prints its srun line for the counts asked for.
srun_plan=$(SLURM_CPUS_PER_TASK=$cpus_per_task SLURM_JOB_NUM_NODES=$nodes \
  SLURM_NTASKS_PER_NODE=$gpus_per_node SLURM_GPUS_ON_NODE=$gpus_per_node \
  SLURM_JOB_ID=JOBID SLURM_SUBMIT_DIR=$PWD \
  bash "$JOB_SCRIPT" --dry-run "--repo=$REPO_DIR" "${job_args[@]}" -- "${extra_args[@]}") ||
  exit $?

if ((dry_run)); then
  quote_all "${sbatch_cmd[@]}"
  echo
  echo "# the job then runs (JOBID = the SLURM job id):"
  echo "$srun_plan"
  exit 0
fi

command -v sbatch >/dev/null || die "sbatch not found: run this on the cluster's login node"
echo "+ $(quote_all "${sbatch_cmd[@]}")" >&2
"${sbatch_cmd[@]}"
