# Sourced by the sbatch templates: run one command so that a preemption requeues the job.
#
# SLURM sends SIGUSR1 to this batch shell (--signal=B:USR1@SECONDS) before the
# time limit. The trap passes it to the training processes (the children of
# `accelerate launch`, not the launcher, which would just die); they save a
# checkpoint, write OUTPUT_DIR/PREEMPTED and exit 75. On preemption SLURM sends
# SIGTERM to every process of the job itself, with the same effect (set the
# partition's GraceTime long enough for one checkpoint). We wait until the
# whole process group has exited, then requeue when the marker is there (the
# marker, not the status: accelerate launch reports a child's 75 as 1). The
# requeued job runs the same command, which resumes with
# --resume_from_checkpoint latest.

forward_to_workers() {  # usage: forward_to_workers LAUNCHER_PID
    echo "[$(date -Is)] signal received: asking the run to checkpoint and stop"
    pkill -USR1 -P "$1" 2>/dev/null || true
}

run_requeueable() {  # usage: run_requeueable OUTPUT_DIR COMMAND_STRING
    local out="$1" cmd="$2" status child
    echo "[$(date -Is)] ${SLURM_JOB_ID:-local} task ${SLURM_ARRAY_TASK_ID:--}: $cmd"
    setsid bash -c "exec $cmd" &  # its own process group: we can wait for every process of the run
    child=$!
    trap 'forward_to_workers $child' USR1 TERM
    # `wait` returns early when a trapped signal arrives: wait again until the launcher has exited,
    # then until its process group is empty (workers may still be writing their checkpoint).
    while true; do
        wait "$child"
        status=$?
        kill -0 "$child" 2>/dev/null || break
    done
    while pgrep -g "$child" >/dev/null 2>&1; do sleep 1; done
    trap - USR1 TERM
    if [ "$status" -eq 75 ] || [ -f "$out/PREEMPTED" ]; then
        local job="${SLURM_JOB_ID:-}"
        if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then job="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"; fi
        echo "[$(date -Is)] preempted, checkpoint in $out: requeueing ${job:-(not a SLURM job)}"
        if [ -n "$job" ]; then scontrol requeue "$job"; fi
        return 75
    fi
    return "$status"
}
