#!/usr/bin/env bash
# Start N processes of one multi-host JAX job on this machine (a stand-in for N hosts).
#
# Every process runs the same command with
#   --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i
# appended, which is how ctran_jax.main is told about its peers off TPU VMs and SLURM.
# Why a script and not a for loop: the processes have to be waited for together (one
# that dies leaves the others blocked in a collective), Ctrl-C has to reach them (bash
# starts background children with SIGINT ignored) and the exit status has to say that
# something failed.
set -euo pipefail
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "local.sh: error: needs bash >= 4.4, this is $BASH_VERSION (macOS: brew install bash)" >&2
  exit 2
fi

LAUNCHER=local.sh
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/local.sh [options] [-- COMMAND [ARGS...]]

Run N processes of one JAX job on this machine, process i with
  --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i
appended to COMMAND. Without COMMAND the command is
  python -m ctran_jax.main --config=CONFIG --workdir=WORKDIR

Options:
  -n, --num-processes N   processes to start (default 2)
  --cpu-devices K         fake K CPU devices per process: JAX_PLATFORMS=cpu and
                          XLA_FLAGS+=--xla_force_host_platform_device_count=K
  --port PORT             coordinator port on 127.0.0.1 (default: a free port)
  --config FILE           config of the default command (default configs/default.py)
  --workdir DIR           workdir of the default command; logs go to DIR/logs
  --log-dir DIR           where process_<i>.log are written (default WORKDIR/logs);
                          one of --workdir / --log-dir is required
  --kill-after SECONDS    after passing on Ctrl-C/TERM (or after a process failed),
                          SIGKILL what still runs this much later (default 10)
  --dry-run               print the commands instead of running them
  -h, --help              this text

Process i writes WORKDIR/logs/process_<i>.log; process 0 also prints to the terminal.
Ctrl-C or SIGTERM is passed on to every process as SIGTERM (a second one sends SIGKILL).
When a process fails (exits non-zero or is killed) the others get SIGTERM, and SIGKILL
--kill-after seconds later; the last line names the process that failed first. Exit
status: that of the first process to fail, 0 when all succeed, 130/143 when interrupted
and every process still exited 0.
Environment: PYTHON (default python) runs the default command.

Examples:
  launch/local.sh --workdir /tmp/ctran_2proc --cpu-devices 4
  launch/local.sh -n 2 --cpu-devices 4 --workdir /tmp/w -- \
      python -m ctran_jax.main --config=configs/default.py --workdir=/tmp/w \
      --config.num_train_steps=20
EOF
}

is_int() { [[ $1 =~ ^[0-9]+$ ]]; }

num_processes=2
cpu_devices=""
port=""
config="configs/default.py"
workdir=""
log_dir=""
kill_after=10
dry_run=0
command=()

while (($# > 0)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    -n | --num-processes) need_value "$1" "$#"; num_processes=$2; shift 2 ;;
    --num-processes=*) num_processes=${1#*=}; shift ;;
    --cpu-devices) need_value "$1" "$#"; cpu_devices=$2; shift 2 ;;
    --cpu-devices=*) cpu_devices=${1#*=}; shift ;;
    --port) need_value "$1" "$#"; port=$2; shift 2 ;;
    --port=*) port=${1#*=}; shift ;;
    --config) need_value "$1" "$#"; config=$2; shift 2 ;;
    --config=*) config=${1#*=}; shift ;;
    --workdir) need_value "$1" "$#"; workdir=$2; shift 2 ;;
    --workdir=*) workdir=${1#*=}; shift ;;
    --log-dir) need_value "$1" "$#"; log_dir=$2; shift 2 ;;
    --log-dir=*) log_dir=${1#*=}; shift ;;
    --kill-after) need_value "$1" "$#"; kill_after=$2; shift 2 ;;
    --kill-after=*) kill_after=${1#*=}; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; command=("$@"); break ;;
    *) die "unknown option '$1' (a command to run goes after --)" ;;
  esac
done

{ is_int "$num_processes" && ((num_processes >= 1)); } ||
  die "--num-processes must be a positive integer, got '$num_processes'"
[[ -z $cpu_devices ]] || { is_int "$cpu_devices" && ((cpu_devices >= 1)); } ||
  die "--cpu-devices must be a positive integer, got '$cpu_devices'"
is_int "$kill_after" || die "--kill-after must be a whole number of seconds, got '$kill_after'"
if [[ -n $port ]]; then
  { is_int "$port" && ((port >= 1 && port <= 65535)); } ||
    die "--port must be a port number (1-65535), got '$port'"
fi

python=${PYTHON:-python}
if ((${#command[@]} == 0)); then
  [[ -n $workdir ]] || die "--workdir is required (the training workdir; logs go to WORKDIR/logs)"
  command=("$python" -m ctran_jax.main "--config=$config" "--workdir=$workdir")
fi
if [[ -z $log_dir ]]; then
  [[ -n $workdir ]] || die "--workdir or --log-dir is required (where process_<i>.log go)"
  log_dir=$workdir/logs
fi
if ((!dry_run)) && ! command -v "${command[0]}" >/dev/null; then
  if [[ ${command[0]} == "$python" ]]; then
    die "'$python' not found: activate the venv (. .venv/bin/activate) or set PYTHON"
  fi
  die "command not found: '${command[0]}'"
fi

free_port() {
  local py
  for py in "${PYTHON:-}" python3 python; do
    if [[ -n $py ]] && command -v "$py" >/dev/null; then
      "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
      return
    fi
  done
  echo $((20000 + RANDOM % 20000))
}
[[ -n $port ]] || port=$(free_port)

env_prefix=()
if [[ -n $cpu_devices ]]; then
  xla_flags=""
  for flag in ${XLA_FLAGS:-}; do  # keep the caller's XLA flags, but our device count
    [[ $flag == --xla_force_host_platform_device_count=* ]] || xla_flags+="$flag "
  done
  xla_flags+="--xla_force_host_platform_device_count=$cpu_devices"
  env_prefix=(JAX_PLATFORMS=cpu "XLA_FLAGS=$xla_flags")
fi

process_command() {  # process_command I: the full argv of process I into $argv
  argv=("${command[@]}" "--coordinator_address=127.0.0.1:$port"
        "--num_processes=$num_processes" "--process_id=$1")
}

if ((dry_run)); then
  echo "mkdir -p $(quote "$log_dir")"
  for ((i = 0; i < num_processes; i++)); do
    process_command "$i"
    log=$log_dir/process_$i.log
    if ((i == 0)); then
      redirect="2>&1 | tee $(quote "$log") &"
    else
      redirect="> $(quote "$log") 2>&1 &"
    fi
    echo "$(quote_all "${env_prefix[@]}" "${argv[@]}") $redirect"
  done
  echo "wait"
  exit 0
fi

mkdir -p "$log_dir" || die "cannot create the log directory '$log_dir'"
if ((${#env_prefix[@]})); then
  export JAX_PLATFORMS=cpu XLA_FLAGS=$xla_flags
fi

pids=()
alive=()
stop_at=""         # SECONDS after which what still runs gets SIGKILL
interrupted=""     # the signal that stopped us, if any
first_status=0
statuses=()

signal_children() {  # signal_children SIGNAL: send SIGNAL to every live process
  local i
  for ((i = 0; i < num_processes; i++)); do
    if ((alive[i])); then
      kill -s "$1" "${pids[i]}" 2>/dev/null || true
    fi
  done
}

stop_children() {  # stop_children REASON: TERM now, KILL after --kill-after
  if [[ -z $stop_at ]]; then
    echo "local.sh: $1: sending SIGTERM to the processes still running" >&2
    stop_at=$((SECONDS + kill_after))
    signal_children TERM
  fi
}

# shellcheck disable=SC2329  # called by the traps below
on_signal() {
  if [[ -n $interrupted ]]; then
    echo "local.sh: second $1: sending SIGKILL" >&2
    signal_children KILL
    return
  fi
  interrupted=$1
  stop_children "got SIG$1"
}

# shellcheck disable=SC2329  # called by the trap below
on_exit() {  # never leave processes behind, whatever ended the script
  if ((${#pids[@]})); then
    signal_children KILL
  fi
}

trap 'on_signal INT' INT
trap 'on_signal TERM' TERM
trap on_exit EXIT

for ((i = 0; i < num_processes; i++)); do
  process_command "$i"
  log=$log_dir/process_$i.log
  if ((i == 0)); then
    "${argv[@]}" > >(tee "$log") 2>&1 &
  else
    "${argv[@]}" >"$log" 2>&1 &
  fi
  pids[i]=$!
  alive[i]=1
done
echo "local.sh: $num_processes processes (pids ${pids[*]}), coordinator 127.0.0.1:$port," \
  "logs in $log_dir/process_<i>.log" >&2

# What an exit status says, for the messages. 75 and 76 are ctran_jax.main's statuses for
# a stalled step and a lost peer; 134 (SIGABRT) is how jax ends a process whose peer died.
describe_status() {
  local status=$1 name
  case $status in
    75) echo "status 75: no training step within --step_timeout" ;;
    76) echo "status 76: lost a peer process" ;;
    134) echo "status 134: aborted (SIGABRT; jax aborts a process whose peer died)" ;;
    *)
      if ((status > 128)) && name=$(kill -l "$((status - 128))" 2>/dev/null); then
        echo "status $status: killed by SIG$name"
      else
        echo "status $status"
      fi
      ;;
  esac
}

# A process that exited because another one died is not the cause: when several are seen
# exited in the same poll, those (75, 76, 134) are ranked after the others.
is_consequence() { [[ $1 == 75 || $1 == 76 || $1 == 134 ]]; }

first_failed=""
running=$num_processes
while ((running > 0)); do
  exited=()
  for ((i = 0; i < num_processes; i++)); do
    if ((alive[i])) && ! kill -0 "${pids[i]}" 2>/dev/null; then
      status=0
      wait "${pids[i]}" || status=$?
      alive[i]=0
      running=$((running - 1))
      statuses[i]=$status
      exited+=("$i")
    fi
  done
  for pass in cause consequence; do  # see is_consequence
    for i in "${exited[@]}"; do
      status=${statuses[i]}
      if ((status == 0)) || { [[ $pass == cause ]] && is_consequence "$status"; } ||
        { [[ $pass == consequence ]] && ! is_consequence "$status"; }; then
        continue
      fi
      if [[ -n $first_failed ]]; then
        echo "local.sh: process $i exited, $(describe_status "$status")" >&2
        continue
      fi
      first_failed=$i
      first_status=$status
      if [[ -n $interrupted ]]; then  # stopped by us: not a failure to report
        echo "local.sh: process $i exited, $(describe_status "$status")" >&2
        continue
      fi
      echo "local.sh: process $i failed first, $(describe_status "$status")" \
        "(log: $log_dir/process_$i.log)" >&2
      stop_children "process $i failed"
    done
  done
  if [[ -n $stop_at ]] && ((running > 0 && SECONDS >= stop_at)); then
    still=()
    for ((i = 0; i < num_processes; i++)); do
      ((alive[i] == 0)) || still+=("$i")
    done
    echo "local.sh: still running ${kill_after}s after SIGTERM: sending SIGKILL to" \
      "process ${still[*]}" >&2
    signal_children KILL
    stop_at=$((SECONDS + 3600))
  fi
  ((running == 0)) || sleep 0.1
done
pids=()
wait || true  # lets tee flush process 0's last lines

if [[ -n $first_failed && -z $interrupted ]]; then
  echo "local.sh: job failed: process $first_failed failed first" \
    "($(describe_status "$first_status")); exit status $first_status;" \
    "its log: $log_dir/process_$first_failed.log" >&2
fi
if ((first_status != 0)); then
  exit "$first_status"
fi
case $interrupted in
  INT) exit 130 ;;
  TERM) exit 143 ;;
esac
exit 0
