#!/usr/bin/env bash
# One node's launcher for a multi-node run without SLURM: start it on every node with the same settings and that
# node's NODE_RANK. It starts NPROC_PER_NODE workers of `python -m launch <args>` (loom) and rendezvous with the
# other nodes at MASTER_ADDR:MASTER_PORT (torchrun's c10d rendezvous, hosted by node 0's launcher).
#
#   # on node 0 (10.0.0.1) and node 1, from the repository root:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 launch/torchrun_multinode.sh train --config my_run.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 launch/torchrun_multinode.sh train --config my_run.yaml
#
# Settings (environment):
#   NNODES            number of nodes (default 1)
#   NODE_RANK         this node, 0..NNODES-1 (default: SLURM_NODEID, else 0); node 0 hosts the rendezvous
#   MASTER_ADDR       address of node 0, reachable from every node (default 127.0.0.1)
#   MASTER_PORT       rendezvous port on node 0 (default 29500)
#   NPROC_PER_NODE    workers per node, normally one per GPU (default: the GPUs torch sees, at least 1)
#   MAX_RESTARTS      elastic restarts of the whole worker group after a failure (default 0: fail fast); each
#                     restart resumes from the latest checkpoint (train.resume: auto)
#   RDZV_ID           a name shared by the nodes of one run (default: SLURM_JOB_ID, else "loom")
#   ACCELERATE_CONFIG an Accelerate config (launch/accelerate/zero3.yaml, fsdp2.yaml, ...): launch through
#                     `accelerate launch` with that strategy instead of plain DDP under torchrun
#   LOG_DIR           if set: this node's output in $LOG_DIR/node<NODE_RANK>.log and each worker's in
#                     $LOG_DIR/node<NODE_RANK>/ (torchrun --log-dir), besides the console
#   SHUTDOWN_TIMEOUT  seconds the workers get to write their checkpoint after SIGTERM/SIGUSR1 (default 300)
#   TRAIN_MODULE      the Python module the workers run (default: launch, i.e. loom)
#   PYTHON            the interpreter (default: python)
# Global ranks are handed out by the rendezvous: node 1's worker may be rank 0 (the one that writes checkpoints'
# shared files, logs and exports); the run directory must be on storage all nodes share.
#
# Faults: SIGTERM or SIGUSR1 to this script (SLURM pre-emption, `kill`) is passed to the workers, which write a
# checkpoint and exit; the script then exits 0, and running the same command again resumes. A worker that dies
# stops the worker group (torchrun names the failed rank and its error); with MAX_RESTARTS > 0 the group restarts
# from the latest checkpoint, otherwise the script exits non-zero. Ranks on other nodes notice at their next
# collective; set train.collective_timeout_s so that a rank that hangs (rather than dies) cannot stall them longer.
set -euo pipefail

NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"
RDZV_ID="${RDZV_ID:-${SLURM_JOB_ID:-loom}}"
SHUTDOWN_TIMEOUT="${SHUTDOWN_TIMEOUT:-300}"
TRAIN_MODULE="${TRAIN_MODULE:-launch}"
PYTHON="${PYTHON:-python}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE="$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')"
fi

if ! [[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "$NNODES" ]]; then
    echo "torchrun_multinode.sh: NODE_RANK=$NODE_RANK must be in 0..$((NNODES - 1)) (NNODES=$NNODES)" >&2
    exit 2
fi
if [[ -n "${ACCELERATE_CONFIG:-}" && ! -f "$ACCELERATE_CONFIG" ]]; then
    echo "torchrun_multinode.sh: ACCELERATE_CONFIG=$ACCELERATE_CONFIG does not exist" >&2
    exit 2
fi

# torchrun passes these signals on to the workers (the trainer checkpoints on SIGTERM and SIGUSR1) and waits
# SHUTDOWN_TIMEOUT seconds before killing them; PET_* variables are torchrun's own defaults, so they also reach
# the torchrun agent that `accelerate launch` runs in-process.
export PET_SIGNALS_TO_HANDLE="SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
export PET_SHUTDOWN_TIMEOUT="$SHUTDOWN_TIMEOUT"
# With restarts, the workers must not share the agents' rendezvous store: a restarted group would read the
# previous attempt's addresses from it and fail to connect (pytorch/pytorch#135712). Each attempt then gets a
# fresh store hosted by its rank 0.
if [[ "$MAX_RESTARTS" != 0 ]]; then
    export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
fi
# Node 0 hosts the rendezvous store: say so, rather than let torchrun guess from host names.
if [[ "$NODE_RANK" == 0 ]]; then is_host=true; else is_host=false; fi

if [[ -n "${LOG_DIR:-}" ]]; then
    mkdir -p "$LOG_DIR/node$NODE_RANK"
    # The tee ignores the stop signals (they are meant for the training), so the log outlives them.
    exec > >(trap '' INT TERM USR1 HUP; exec tee -a "$LOG_DIR/node$NODE_RANK.log") 2>&1
    worker_logs="$LOG_DIR/node$NODE_RANK"
else
    worker_logs=""
fi
prefix="[node${NODE_RANK} rank\${rank}]: "

if [[ -n "${ACCELERATE_CONFIG:-}" ]]; then
    cmd=("$PYTHON" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG"
         --num_machines "$NNODES" --machine_rank "$NODE_RANK" --num_processes "$((NNODES * NPROC_PER_NODE))"
         --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
         --rdzv_backend c10d --rdzv_conf "is_host=$is_host" --max_restarts "$MAX_RESTARTS"
         ${worker_logs:+--log_dir "$worker_logs" --tee 3} -m "$TRAIN_MODULE" "$@")
    export PET_RDZV_ID="$RDZV_ID"  # torchrun options that `accelerate launch` does not expose
    export PET_LOG_LINE_PREFIX_TEMPLATE="$prefix"
else
    cmd=("$PYTHON" -m torch.distributed.run
         --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE"
         --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID"
         --rdzv-conf "is_host=$is_host" --max-restarts "$MAX_RESTARTS"
         --log-line-prefix-template "$prefix" ${worker_logs:+--log-dir "$worker_logs" --tee 3}
         -m "$TRAIN_MODULE" "$@")
fi

echo "[node$NODE_RANK] $(hostname): $NNODES node(s) x $NPROC_PER_NODE worker(s), rendezvous $MASTER_ADDR:$MASTER_PORT" \
     "(id $RDZV_ID), max restarts $MAX_RESTARTS${ACCELERATE_CONFIG:+, accelerate config $ACCELERATE_CONFIG}"

# Run the launcher in the background so that this shell can pass stop signals on and still wait for it.
stop_signal=""
launcher=""
# shellcheck disable=SC2317  # called by the traps below
forward() {  # forward RECEIVED [SEND]
    stop_signal="$1"
    echo "[node$NODE_RANK] received SIG$1: the workers checkpoint and exit" >&2
    if [[ -n "$launcher" ]]; then kill -s "${2:-$1}" "$launcher" 2>/dev/null || true; fi
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap 'forward INT TERM' INT  # SIGTERM is the one the trainer answers with a checkpoint
# (A plain `cmd &` would start with SIGINT ignored, as bash does for background jobs without job control.)
( trap - INT QUIT; exec "${cmd[@]}" ) &
launcher=$!
if [[ -n "$stop_signal" ]]; then  # a signal that came before the launcher
    forward "$stop_signal" "$([[ "$stop_signal" == INT ]] && echo TERM || echo "$stop_signal")"
fi
status=0
while true; do
    wait "$launcher" && status=0 || status=$?
    # `wait` also returns (status > 128) when a trapped signal arrives; keep waiting while the launcher lives.
    if ! kill -0 "$launcher" 2>/dev/null; then
        break
    fi
done
if [[ -n "$stop_signal" ]]; then
    echo "[node$NODE_RANK] stopped by SIG$stop_signal (launcher status $status); run the same command to resume" >&2
    exit 0
fi
if [[ "$status" != 0 ]]; then
    echo "[node$NODE_RANK] FAILED: the launcher exited with status $status (see the failed rank above)" >&2
fi
exit "$status"
