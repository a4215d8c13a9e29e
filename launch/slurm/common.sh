# Sourced by the sbatch scripts beside it: the network and NCCL settings, and
# `run_on_every_node SCRIPT [ARG ...]`, which runs SCRIPT with its ARGs on every GPU of the
# allocation: srun starts one torchrun per node, and the torchruns meet at the allocation's first
# node. 300 s before the time limit Slurm sends the batch shell USR1 (#SBATCH
# --signal=B:USR1@300); the shell creates $STOP_FILE, which the training scripts pass as
# train.stop_file: training saves a checkpoint at the end of its step and exits, and the job
# requeues itself. The requeued job runs the same command, and training resumes from that
# checkpoint (train.resume=auto). Leave enough time for a step and a save.
#
# Submit from the repository root, in the environment that runs llmscale (its venv activated):
# sbatch starts the job in the submission folder with the submitting shell's environment.
#
# The scripts' #SBATCH lines:
#   --ntasks-per-node=1       one torchrun per node; it starts the node's NPROC_PER_NODE ranks
#   --gpus-per-node, --exclusive   whole nodes: every GPU and core, no neighbour on the network
#   --requeue                 Slurm may put the job back in the queue (node failure, preemption),
#                             and the job may requeue itself (requeue_job below)
#   --signal=B:USR1@300       USR1 to the batch shell only (B:), 300 s before the time limit;
#                             only where the work resumes (a rerun from scratch could loop)
#   --open-mode=append        a requeued job adds to its output file instead of emptying it
#   --output=runs/slurm/%x-%j.out   one file per job (%x: job name, %j: job id)

set -euo pipefail

# Static rendezvous at the first node: global rank = SLURM_NODEID x NPROC_PER_NODE + local rank,
# so ranks follow Slurm's node order and each node's log folder holds a known slice of them.
# (Not `| head -n 1`: under pipefail, scontrol ended by SIGPIPE would end the script.)
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${hosts%%$'\n'*}
# The same on every node and in every requeue of the job, with nothing to agree on first;
# 20000-29999 stays below Linux's ephemeral ports (32768+), which outgoing connections take.
MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))
# One process per GPU; set NPROC_PER_NODE for fewer, or for nodes without GPUs.
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
# Next to the job's own output (#SBATCH --output=runs/slurm/%x-%j.out).
LOG_DIR=runs/slurm/$SLURM_JOB_NAME-$SLURM_JOB_ID
# On the shared file system, where rank 0 of the training looks for it after every step.
STOP_FILE=$LOG_DIR/stop
export MASTER_ADDR MASTER_PORT NPROC_PER_NODE LOG_DIR STOP_FILE

# Network and NCCL settings. A value already in the environment (a site's module) wins.
# NCCL_SOCKET_IFNAME is left to the site: unset, NCCL prefers ib* interfaces and avoids lo and
# docker*, and any fixed value here would switch that choice off on every cluster. Name it
# (NCCL_SOCKET_IFNAME=ib0 sbatch ...) where nodes carry interfaces the others cannot reach
# (virtual bridges, VPNs). Likewise NCCL_IB_HCA, where a node has HCAs training must not use.
# InfiniBand retry timeout, 4.096 us x 2^22 (~17 s) a try, several times NCCL's default: on
# large jobs a congested fabric outlasts the default and a passing stall becomes a fatal error.
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
# On a NCCL error or a collective past its timeout the watchdog aborts the communicators and
# ends the process, so a lost node ends the job (srun --kill-on-bad-exit then stops the other
# nodes) instead of leaving ranks hung until the time limit. (torch >= 2.2 reads this name;
# the old NCCL_ASYNC_ERROR_HANDLING only draws a deprecation warning.)
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Off: blocking wait makes the host thread wait out every collective, stalling the queueing of
# the next kernels; the watchdog above already catches timeouts.
export TORCH_NCCL_BLOCKING_WAIT=${TORCH_NCCL_BLOCKING_WAIT:-0}
# Warnings and errors, with their cause; INFO also prints the topology and transports chosen.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# Each rank's share of the node's cores for its CPU work (data, optimizer offload); torchrun
# would set 1, and every rank taking all cores oversubscribes the node.
cores_per_rank=$((SLURM_CPUS_ON_NODE / NPROC_PER_NODE))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores_per_rank > 0 ? cores_per_rank : 1))}
# CUDA_DEVICE_MAX_CONNECTIONS stays unset here: 1 orders kernels for Megatron's tensor/sequence-
# parallel overlap, and llmscale sets it itself when parallel.tp > 1; data-parallel plans leave
# it unset, since 1 would put ZeRO's communication streams in one hardware queue behind the
# compute kernels.

stop_for_requeue() {
    echo "llmscale: the time limit is near; asking training to save a checkpoint and stop" \
         "($STOP_FILE)"
    mkdir -p "$LOG_DIR"
    touch "$STOP_FILE"
    requeue_when_done=1
}

run_on_every_node() {
    requeue_when_done=0
    trap stop_for_requeue USR1
    echo "llmscale: $SLURM_NNODES node(s) x $NPROC_PER_NODE process(es), rendezvous at" \
         "$MASTER_ADDR:$MASTER_PORT; per-rank logs under $LOG_DIR/node<N>/"
    # --kill-on-bad-exit: a node whose torchrun fails takes the others down with it.
    # --label: prefixes each output line with its node's index. The command is in single quotes:
    # SLURM_NODEID is read on each node, where srun sets it to that node's index.
    # torchrun --tee 3: every rank's stdout and stderr to its own files, at
    # $LOG_DIR/node<N>/requeue<K>_<random>/attempt_0/<local rank>/{stdout,stderr}.log (K: times
    # the job was requeued; --rdzv_id only names the folder under a static rendezvous);
    # --local_ranks_filter 0: only local rank 0 of each node also to the job's output.
    srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_ON_NODE" \
        --kill-on-bad-exit=1 --label \
        bash -c 'exec torchrun --nnodes="$SLURM_NNODES" --node_rank="$SLURM_NODEID" \
            --nproc_per_node="$NPROC_PER_NODE" --master_addr="$MASTER_ADDR" \
            --master_port="$MASTER_PORT" --rdzv_id="requeue${SLURM_RESTART_COUNT:-0}" \
            --log_dir="$LOG_DIR/node$SLURM_NODEID" --tee=3 --local_ranks_filter=0 "$@"' \
        torchrun "$@" &
    # Waiting on srun in the background lets bash run the USR1 trap at once; the trap ends that
    # wait, so wait again until training has saved and exited.
    local srun_pid=$! status=0
    wait "$srun_pid" || status=$?
    while kill -0 "$srun_pid" 2>/dev/null; do
        status=0
        wait "$srun_pid" || status=$?
    done
    if ((requeue_when_done)); then
        echo "llmscale: requeueing job $SLURM_JOB_ID to resume from its newest checkpoint"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$status"
}
