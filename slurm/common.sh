# shellcheck shell=bash
# What slurm/convert_70b.sh and slurm/train_moe_ep.sh share; sourced by them, never run.
#
# A job script sets DM_SCRIPT and DOTMOE_HOME, sources this file and then, in order:
#   dm_submit          outside a job (`bash slurm/convert_70b.sh`): submit the script with sbatch,
#                      resources from NODES / GPUS_PER_NODE / DEVICE / TIME / PARTITION / ACCOUNT /
#                      SBATCH_ARGS (SLURM has no environment variable for --nodes)
#   dm_common_defaults, then its own defaults (MODEL, NUM_EXPERTS, ...)
#   dm_read_allocation, dm_print_settings
#   dm_preflight_common, dm_check_* , dm_plan
#                      every check that needs no model: exit 2 (bad settings) or 3 (the memory plan
#                      does not fit) with the problem and the fix, before torch is even imported
#   dm_rendezvous      MASTER_ADDR/MASTER_PORT/WORLD_SIZE from SLURM's variables
#   dm_launch CMD...   srun one task per GPU (RANK/LOCAL_RANK per task), forward SIGUSR1/SIGTERM to
#                      the tasks, requeue the job when the trainer checkpointed after a signal (exit
#                      REQUEUE_EXIT_CODE), or fail with the reason; the rerun resumes.

DM_EXIT_BAD_SETTINGS=2
DM_EXIT_PLAN=3

dm_log() { echo "[dotmoe $(date +%T)] $*"; }
dm_die() { # exit-code message...
  local code=$1; shift
  echo "[dotmoe $(date +%T)] ERROR: $*" >&2
  exit "$code"
}

# ------------------------------------------------------------------------------ settings

# Defaults every phase shares; a job script sets its own before calling dm_main.
dm_common_defaults() {
  : "${DEVICE:=gpu}"                      # gpu (NCCL) | cpu (gloo; tests, debugging)
  if [ -z "${PYTHON:-}" ]; then
    PYTHON=$DOTMOE_HOME/.venv/bin/python; [ -x "$PYTHON" ] || PYTHON=$(command -v python3)
  fi
  : "${TRAIN_ENTRY:=$DOTMOE_HOME/dotmoe_ds/train.py}"
  : "${REQUEUE_EXIT_CODE:=75}"            # the trainer's exit code after a signal-triggered checkpoint
  : "${MAX_RESTARTS:=20}"                 # requeues before the job gives up
  : "${DIST_TIMEOUT_MIN:=10}"             # collective timeout (DeepSpeed reads DEEPSPEED_TIMEOUT)
  : "${PLAN:=check}"                      # check: refuse a plan that does not fit; warn; off
  : "${PLAN_ARGS:=}"                      # more tools/plan_memory.py flags
  : "${EXTRA_ARGS:=}"                     # more trainer flags
  : "${OVERWRITE:=0}"                     # 1: pass --overwrite on the first attempt (never on a requeue)
}

# `bash slurm/<script>.sh` outside a job: submit it with the resources the environment asks for.
dm_submit() { # script-path
  local script=$1 gpus=${GPUS_PER_NODE:-8}
  local args=(--nodes="${NODES:-8}" --ntasks-per-node="$gpus")
  if [ "${DEVICE:-gpu}" = cpu ]; then args+=(--gpus-per-node=0); else args+=(--gpus-per-node="$gpus"); fi
  [ -n "${TIME:-}" ] && args+=(--time="$TIME")
  [ -n "${PARTITION:-}" ] && args+=(--partition="$PARTITION")
  [ -n "${ACCOUNT:-}" ] && args+=(--account="$ACCOUNT")
  # shellcheck disable=SC2206  # SBATCH_ARGS is a list of sbatch options, split on purpose
  args+=(${SBATCH_ARGS:-})
  dm_log "submitting: sbatch ${args[*]} $script"
  exec sbatch "${args[@]}" "$script"
}

# The allocation as SLURM made it: NNODES, TASKS_PER_NODE, WORLD_SIZE, CPUS_PER_TASK.
dm_read_allocation() {
  NNODES=${SLURM_JOB_NUM_NODES:?not inside a SLURM job}
  if [ -n "${SLURM_NTASKS_PER_NODE:-}" ]; then TASKS_PER_NODE=$SLURM_NTASKS_PER_NODE
  elif [ -n "${SLURM_NTASKS:-}" ]; then TASKS_PER_NODE=$(( SLURM_NTASKS / NNODES ))
  else TASKS_PER_NODE=1; fi
  WORLD_SIZE=$(( NNODES * TASKS_PER_NODE ))
  local cpus=${SLURM_CPUS_ON_NODE:-1}
  CPUS_PER_TASK=$(( cpus / TASKS_PER_NODE )); [ "$CPUS_PER_TASK" -ge 1 ] || CPUS_PER_TASK=1
}

dm_print_settings() { # names...
  dm_log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 )) on ${SLURM_JOB_NODELIST}:" \
         "$NNODES nodes x $TASKS_PER_NODE tasks = $WORLD_SIZE ranks, $CPUS_PER_TASK CPUs per task, device $DEVICE"
  local name
  for name in "$@"; do printf '    %-18s %s\n' "$name" "${!name}"; done
}

# ------------------------------------------------------------------------------ preflight

# A path-like value that does not exist is a mistake; a bare `org/name` may be a hub id.
dm_looks_like_path() { case "$1" in /*|./*|../*|~*) return 0 ;; *) [ -e "${1%%/*}" ] && [ "${1%%/*}" != "$1" ] ;; esac; }

dm_check_model() { # value what
  local value=$1 what=$2
  if [ -d "$value" ]; then
    [ -f "$value/config.json" ] || dm_die $DM_EXIT_BAD_SETTINGS "$what=$value is a folder without config.json: point it at a Hugging Face model folder"
  elif dm_looks_like_path "$value"; then
    dm_die $DM_EXIT_BAD_SETTINGS "$what=$value does not exist (on $(hostname -s)): set $what to a model folder on a file system every node sees, or a hub id"
  fi
}

dm_check_data() { # value
  local entry entries
  [ -z "$1" ] && return 0
  IFS=, read -r -a entries <<< "$1"
  for entry in "${entries[@]}"; do
    entry=${entry%%[@:]*}
    if ! compgen -G "$entry" >/dev/null && dm_looks_like_path "$entry"; then
      dm_die $DM_EXIT_BAD_SETTINGS "DATA entry '$entry' does not exist: set DATA to text/json/jsonl/parquet files, a folder, or a datasets hub name"
    fi
  done
}

# Every node must see the same tree; everything that fails here fails before torch is imported.
dm_preflight_common() {
  [ -x "$PYTHON" ] || dm_die $DM_EXIT_BAD_SETTINGS "PYTHON=$PYTHON is not an executable: set PYTHON or create $DOTMOE_HOME/.venv (bash tools/setup_env.sh)"
  [ -f "$TRAIN_ENTRY" ] || dm_die $DM_EXIT_BAD_SETTINGS "TRAIN_ENTRY=$TRAIN_ENTRY does not exist"
  if [ -n "${NODES:-}" ] && [ "$NODES" != "$NNODES" ]; then
    dm_die $DM_EXIT_BAD_SETTINGS "NODES=$NODES but the job has $NNODES nodes: with sbatch, pass --nodes=$NODES (no environment variable sets it), or submit with 'NODES=$NODES bash $DM_SCRIPT'"
  fi
  if [ -n "${GPUS_PER_NODE:-}" ] && [ "$GPUS_PER_NODE" != "$TASKS_PER_NODE" ]; then
    dm_die $DM_EXIT_BAD_SETTINGS "GPUS_PER_NODE=$GPUS_PER_NODE but the job runs $TASKS_PER_NODE tasks per node: with sbatch, pass --ntasks-per-node=$GPUS_PER_NODE, or submit with 'GPUS_PER_NODE=$GPUS_PER_NODE bash $DM_SCRIPT'"
  fi
  case "$DEVICE" in
    gpu)
      local gpus=${SLURM_GPUS_ON_NODE:-0}
      [ "$gpus" -ge "$TASKS_PER_NODE" ] || dm_die $DM_EXIT_BAD_SETTINGS \
        "DEVICE=gpu but the job has $gpus GPU(s) per node for $TASKS_PER_NODE tasks per node (one task per GPU): request --gpus-per-node=$TASKS_PER_NODE, or set DEVICE=cpu (with SBATCH_GPUS_PER_NODE=0) to run on CPUs" ;;
    cpu) ;;
    *) dm_die $DM_EXIT_BAD_SETTINGS "DEVICE=$DEVICE: use gpu or cpu" ;;
  esac
  [ -f "$DS_CONFIG" ] || dm_die $DM_EXIT_BAD_SETTINGS "DS_CONFIG=$DS_CONFIG does not exist: use one of $DOTMOE_HOME/ds_configs/*.json"
  "$PYTHON" -c 'import json, sys; json.load(open(sys.argv[1]))' "$DS_CONFIG" 2>/dev/null \
    || dm_die $DM_EXIT_BAD_SETTINGS "DS_CONFIG=$DS_CONFIG is not valid JSON"
}

# ZeRO checkpoints are partitioned per rank: a run can only resume with the world size that wrote it.
dm_check_resume_world() { # output-dir
  local latest=$1/checkpoints/latest written
  [ -f "$latest" ] || return 0
  if [ "$OVERWRITE" = 1 ] && [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then return 0; fi
  written=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["world_size"])' \
            "$1/checkpoints/$(cat "$latest")/dotmoe_meta.json" 2>/dev/null || echo "")
  if [ -n "$written" ] && [ "$written" != "$WORLD_SIZE" ]; then
    dm_die $DM_EXIT_BAD_SETTINGS "$1 holds a checkpoint written by $written ranks but this job has $WORLD_SIZE: ZeRO checkpoints are partitioned per rank; resubmit with $written ranks (nodes x GPUs per node) to resume, or OVERWRITE=1 (or another OUTPUT) to start afresh"
  fi
  [ -n "$written" ] && dm_log "resuming from $1/checkpoints/$(cat "$latest") (written by $written ranks)"
  return 0
}

# AutoEP spreads each layer's experts over expert_parallel.autoep_size ranks: that size must divide
# both the world size and the number of experts.
dm_check_expert_parallel() { # model-config ds-config
  local verdict
  verdict=$("$PYTHON" - "$1" "$2" "$WORLD_SIZE" <<'EOF'
import json, sys
model, ds, world = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), int(sys.argv[3])
experts = model.get("num_local_experts") or model.get("num_experts")
if not experts:
    print(f"MODEL is not an MoE (no num_local_experts / num_experts in {sys.argv[1]}): point it at the exported MoE folder")
    sys.exit()
ep_cfg = ds.get("expert_parallel") or {}
ep = int(ep_cfg.get("autoep_size", 1)) if ep_cfg.get("enabled") else 1
if world % ep or experts % ep:
    fits = [n for n in range(1, world + 1) if world % n == 0 and experts % n == 0]
    print(f"{experts} experts cannot be spread over expert_parallel.autoep_size={ep} on {world} ranks: the size must "
          f"divide both the number of ranks and the number of experts; set autoep_size in {sys.argv[2]} to one of "
          f"{fits}, or change the number of nodes / GPUs per node")
else:
    print(f"OK {experts} experts, expert-parallel size {ep}, {world // ep} expert-data-parallel replicas")
EOF
) || dm_die $DM_EXIT_BAD_SETTINGS "cannot read the model config $1 or the DeepSpeed config $2 (see the error above)"
  case "$verdict" in
    OK*) dm_log "expert parallelism: ${verdict#OK }" ;;
    *) dm_die $DM_EXIT_BAD_SETTINGS "$verdict" ;;
  esac
}

# The memory plan (tools/plan_memory.py): printed always, refused (exit 3) when it does not fit.
dm_plan() { # planner flags...
  [ "$PLAN" = off ] && { dm_log "memory plan skipped (PLAN=off)"; return 0; }
  local mem=${GPU_MEM_GB:-}
  if [ -z "$mem" ]; then
    if [ "$DEVICE" = gpu ]; then mem=80
    else mem=$(awk -v t="$TASKS_PER_NODE" '/MemTotal/ {printf "%.1f", $2 / 1048576 / t}' /proc/meminfo); fi
  fi
  local rc=0
  # shellcheck disable=SC2086  # PLAN_ARGS is a list of flags
  "$PYTHON" "$DOTMOE_HOME/tools/plan_memory.py" --nodes "$NNODES" --gpus_per_node "$TASKS_PER_NODE" \
    --gpu_memory_gb "$mem" --device "$DEVICE" --ds_config "$DS_CONFIG" "$@" $PLAN_ARGS || rc=$?
  case "$rc" in
    0) ;;
    3) if [ "$PLAN" = warn ]; then dm_log "WARNING: the plan does not fit; starting anyway (PLAN=warn)"
       else dm_die $DM_EXIT_PLAN "refusing to start: the memory plan does not fit $mem GiB per rank (see above; PLAN=warn starts anyway)"; fi ;;
    *) dm_die $DM_EXIT_BAD_SETTINGS "the memory planner refused the settings (see above)" ;;
  esac
}

# ------------------------------------------------------------------------------ launch

dm_rendezvous() {
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  # from the job id, so jobs sharing a node do not collide; the same after a requeue
  MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
  export MASTER_ADDR MASTER_PORT WORLD_SIZE
  export LOCAL_WORLD_SIZE=$TASKS_PER_NODE
  export DEEPSPEED_TIMEOUT=$DIST_TIMEOUT_MIN
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS_PER_TASK}
  export PYTHONUNBUFFERED=1
  if [ "$DEVICE" = cpu ]; then export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES=""; fi
  dm_log "rendezvous: MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT WORLD_SIZE=$WORLD_SIZE" \
         "(RANK=SLURM_PROCID, LOCAL_RANK=SLURM_LOCALID per task), OMP_NUM_THREADS=$OMP_NUM_THREADS"
}

DM_STEP_PID=""
DM_SIGNALS=""
dm_forward_signal() { # signal
  DM_SIGNALS="$DM_SIGNALS $1"
  dm_log "received SIG$1: forwarding it to the tasks (they checkpoint at the next step and exit $REQUEUE_EXIT_CODE)"
  if [ -n "$DM_STEP_PID" ]; then kill -s "$1" "$DM_STEP_PID" 2>/dev/null || true; fi
}

# srun one task per GPU; the per-task wrapper maps SLURM's task variables to torch's.
dm_run_tasks() { # command...
  DM_STEP_LOG=$(mktemp "${TMPDIR:-/tmp}/dotmoe-step-${SLURM_JOB_ID}.XXXXXX")
  # the batch shell gets SIGUSR1 (--signal=B:USR1@...) and SIGTERM; srun passes both on to the tasks
  trap 'dm_forward_signal USR1' USR1
  trap 'dm_forward_signal TERM' TERM
  # the step's stderr (srun's messages, the tasks' errors) goes to the job log and to DM_STEP_LOG,
  # which dm_explain_failure reads once tee has drained it
  local tee_fd tee_pid
  exec {tee_fd}> >(tee "$DM_STEP_LOG" >&2)
  tee_pid=$!
  # shellcheck disable=SC2016  # the variables are the task's own, expanded by the task's shell
  srun --nodes="$NNODES" --ntasks="$WORLD_SIZE" --ntasks-per-node="$TASKS_PER_NODE" \
       --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 --label \
       bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID NODE_RANK=$SLURM_NODEID; exec "$@"' dotmoe-task "$@" \
       2>&"$tee_fd" {tee_fd}>&- &
  DM_STEP_PID=$!
  local rc
  while :; do
    rc=0; wait "$DM_STEP_PID" || rc=$?
    # wait returns early (status > 128) when a trapped signal arrives; srun is still running then
    if [ "$rc" -gt 128 ] && kill -0 "$DM_STEP_PID" 2>/dev/null; then continue; fi
    break
  done
  DM_STEP_PID=""
  trap - USR1 TERM
  exec {tee_fd}>&-
  local _
  for _ in $(seq 100); do kill -0 "$tee_pid" 2>/dev/null || break; sleep 0.1; done
  return "$rc"
}

# Print why the step failed: srun's own errors, then the tasks' last error lines.
dm_explain_failure() { # exit-code
  local rc=$1
  echo "[dotmoe $(date +%T)] FAILED: the job step exited with status $rc" >&2
  if [ -s "${DM_STEP_LOG:-}" ]; then
    local srun_lines task_lines
    # (|| true: a grep that matches nothing must not end the script under set -e -o pipefail)
    srun_lines=$(grep -E '^srun: (error|Job step aborted|forcing job termination)|slurmstepd.*(error|CANCELLED|Killed)' "$DM_STEP_LOG" | tail -n 8 || true)
    task_lines=$(grep -E 'Error|error:|Timeout|timed out|Timed out|NCCL|gloo|Killed|Traceback|Aborted|out of memory' "$DM_STEP_LOG" \
                 | grep -vE '^srun: |slurmstepd' | tail -n 8 || true)
    [ -n "$srun_lines" ] && { echo "  reported by srun:" >&2; echo "$srun_lines" | sed 's/^/    /' >&2; }
    [ -n "$task_lines" ] && { echo "  last errors of the tasks:" >&2; echo "$task_lines" | sed 's/^/    /' >&2; }
    if grep -qE '[Tt]imed out|collective operation timeout|[Tt]imeout.*(NCCL|gloo|collective)' "$DM_STEP_LOG"; then
      echo "  reason: a collective timed out: a rank died, hung or lost its network (NCCL/gloo); DIST_TIMEOUT_MIN=$DIST_TIMEOUT_MIN" >&2
    elif grep -qE 'Node failure|NODE_FAIL' "$DM_STEP_LOG"; then
      echo "  reason: a node failed; SLURM requeues the job itself (--requeue) and the rerun resumes" >&2
    elif grep -qE 'task [0-9]+: (Killed|Exited with exit code)' "$DM_STEP_LOG"; then
      echo "  reason: $(grep -oE 'task [0-9]+: (Killed|Exited with exit code [0-9]+)' "$DM_STEP_LOG" | head -n 1) (the first rank to fail; --kill-on-bad-exit stopped the others)" >&2
    fi
  fi
}

# Run the tasks and act on how they ended: done, requeue, or fail with the reason.
dm_launch() { # command...
  local rc=0
  dm_run_tasks "$@" || rc=$?
  if [ "$rc" = 0 ]; then
    dm_log "finished"; rm -f "$DM_STEP_LOG"; exit 0
  fi
  # The trainer exits REQUEUE_EXIT_CODE only once its checkpoint is complete. srun reports the
  # highest task status, so a rank that srun stopped during its teardown can hide that code.
  if [ "$rc" = "$REQUEUE_EXIT_CODE" ] || grep -qE "task [0-9]+: Exited with exit code $REQUEUE_EXIT_CODE\b" "$DM_STEP_LOG"; then
    rm -f "$DM_STEP_LOG"
    dm_requeue "the trainer saved a complete checkpoint${DM_SIGNALS:+ after SIG${DM_SIGNALS# }}"
  fi
  # A stop signal that arrives before the trainer catches it (while it loads the model) kills it;
  # the job must still go on: the rerun resumes from the last checkpoint, or starts afresh.
  if [ -n "$DM_SIGNALS" ] && { [ "$rc" = 138 ] || [ "$rc" = 143 ]; }; then
    rm -f "$DM_STEP_LOG"
    dm_requeue "the tasks died of SIG${DM_SIGNALS# } before they could checkpoint"
  fi
  dm_explain_failure "$rc"
  rm -f "$DM_STEP_LOG"
  exit "$rc"
}

dm_requeue() { # what-happened
  local code=$REQUEUE_EXIT_CODE out
  if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_RESTARTS" ]; then
    dm_die "$code" "$1, but the job was already requeued $MAX_RESTARTS times (MAX_RESTARTS): resubmit it to continue"
  fi
  dm_log "$1; requeueing job $SLURM_JOB_ID (the rerun resumes from the latest complete checkpoint)"
  if out=$(scontrol requeue "$SLURM_JOB_ID" 2>&1); then exit 0; fi
  # `scontrol requeue` or a preemption by SLURM itself got there first (it sent the SIGTERM)
  if scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -qE 'JobState=(PENDING|REQUEUED|REQUEUE_HOLD|REQUEUE_FED)' \
     || echo "$out" | grep -qi 'pending'; then
    dm_log "SLURM is already requeueing job $SLURM_JOB_ID"; exit 0
  fi
  dm_die "$code" "scontrol requeue $SLURM_JOB_ID failed ($out): resubmit the same command; it resumes from the checkpoint"
}

# The first attempt may start afresh (OVERWRITE=1); a requeued attempt resumes, so it never passes
# --overwrite, except when the attempt before it stopped before its first checkpoint: then the run
# folder holds nothing but what that attempt created, and the trainer would refuse to reuse it.
dm_overwrite_flag() { # output-dir
  if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
    [ "$OVERWRITE" = 1 ] && echo --overwrite
  elif [ -f "$1/config.json" ] && [ ! -f "$1/checkpoints/latest" ] && [ ! -f "$1/results.json" ]; then
    echo --overwrite
  fi
  return 0
}

# Activation checkpointing: what the memory plan assumes is what the trainer is told to do.
dm_checkpointing_flag() {
  if [ "${ACTIVATION_CHECKPOINTING:-0}" = 1 ]; then echo --gradient_checkpointing; fi
  return 0
}
