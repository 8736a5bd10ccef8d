#!/usr/bin/env bash
#SBATCH --job-name=dotmoe-convert
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# DOT-MoE conversion of a dense ~70B model over several nodes: one task per GPU, ZeRO-3.
#
#   sbatch slurm/convert_70b.sh                              # the defaults below (Llama-3-70B, 8x8 GPUs)
#   MODEL=/models/Qwen2.5-72B DATA=/data/calib OUTPUT=/scratch/qwen-moe sbatch slurm/convert_70b.sh
#   sbatch --nodes=4 slurm/convert_70b.sh                   # resources: sbatch's own options, or
#   NODES=4 GPUS_PER_NODE=8 TIME=12:00:00 bash slurm/convert_70b.sh   # ... which submits with them
#
# Settings (environment variables; sbatch passes the submitting shell's environment to the job):
#   MODEL           dense model: local folder (on a shared file system) or hub id [meta-llama/Meta-Llama-3-70B]
#   DATA            calibration text: files, folder, glob or datasets hub name [demo: the shipped excerpt]
#   OUTPUT          run folder; a requeued or resubmitted job resumes from OUTPUT/checkpoints
#                   [$SLURM_SUBMIT_DIR/runs/convert-<model>-E<E>k<k>]
#   NUM_EXPERTS [8]  TOP_K [4]  SHARED_NEURONS [0]  METHOD [dot]  STEPS [1000]  SEQ_LEN [4096]
#   BATCH_SIZE [1] (sequences per GPU per step)  SEED [0]  CHECKPOINT_EVERY [100]
#   TRAINABLE [assignment]  KD_WEIGHT [0] (self-distillation)
#   DS_CONFIG       DeepSpeed config [ds_configs/z3.json]
#   EXTRA_ARGS      more flags for dotmoe_ds/train.py
#   OVERWRITE=1     start afresh in an existing OUTPUT (first attempt only; a requeue always resumes)
#   DEVICE          gpu | cpu (gloo on CPUs, for tests: submit with SBATCH_GPUS_PER_NODE=0) [gpu]
#   NODES, GPUS_PER_NODE, TIME, PARTITION, ACCOUNT, SBATCH_ARGS: resources when submitting with
#                   `bash slurm/convert_70b.sh`; inside a job they must match the allocation
#   GPU_MEM_GB [80]  PLAN [check|warn|off]  PLAN_MODEL (config for the plan)  PLAN_ARGS
#   ACTIVATION_CHECKPOINTING [1]  passes --gradient_checkpointing (the plan assumes it too; a 70B
#                   conversion does not fit 80 GB without it)
#   MASTER_ADDR, MASTER_PORT, DIST_TIMEOUT_MIN [10], REQUEUE_EXIT_CODE [75], MAX_RESTARTS [20],
#   PYTHON [.venv/bin/python], TRAIN_ENTRY [dotmoe_ds/train.py]
# Preemption: SLURM sends SIGUSR1 900 s before the time limit (and SIGTERM on preemption); the
# trainer checkpoints at the next step and exits REQUEUE_EXIT_CODE; this script then requeues the job.
set -euo pipefail

# sbatch runs a copy of this file from its spool folder: find the checkout (see slurm/README.md)
DM_SCRIPT=${BASH_SOURCE[0]}
if [ ! -f "$(dirname "$DM_SCRIPT")/common.sh" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  DM_SCRIPT=$(scontrol show job -o "$SLURM_JOB_ID" | grep -oP '(?<= Command=)\S+' || true)
  [ -f "$(dirname "$DM_SCRIPT")/common.sh" ] || DM_SCRIPT=${SLURM_SUBMIT_DIR:-.}/slurm/convert_70b.sh
fi
DOTMOE_HOME=${DOTMOE_HOME:-$(cd "$(dirname "$DM_SCRIPT")/.." && pwd)}
# shellcheck source=slurm/common.sh
source "$DOTMOE_HOME/slurm/common.sh"

[ -n "${SLURM_JOB_ID:-}" ] || dm_submit "$DM_SCRIPT"

dm_common_defaults
: "${MODEL:=meta-llama/Meta-Llama-3-70B}"
: "${DATA:=demo}"
: "${NUM_EXPERTS:=8}" "${TOP_K:=4}" "${SHARED_NEURONS:=0}" "${METHOD:=dot}"
: "${STEPS:=1000}" "${SEQ_LEN:=4096}" "${BATCH_SIZE:=1}" "${SEED:=0}" "${CHECKPOINT_EVERY:=100}"
: "${TRAINABLE:=assignment}" "${KD_WEIGHT:=0}" "${ACTIVATION_CHECKPOINTING:=1}"
: "${DS_CONFIG:=$DOTMOE_HOME/ds_configs/z3.json}"
: "${OUTPUT:=${SLURM_SUBMIT_DIR:-$PWD}/runs/convert-$(basename "$MODEL")-E${NUM_EXPERTS}k${TOP_K}}"

dm_read_allocation
dm_print_settings MODEL DATA OUTPUT NUM_EXPERTS TOP_K SHARED_NEURONS METHOD STEPS SEQ_LEN BATCH_SIZE \
  SEED TRAINABLE KD_WEIGHT DS_CONFIG EXTRA_ARGS
dm_preflight_common
dm_check_model "$MODEL" MODEL
dm_check_data "$DATA"
dm_check_resume_world "$OUTPUT"
# --recon: the dot50 recipe's reconstruction term (--recon_weight 1 unless EXTRA_ARGS sets it)
dm_plan --model "${PLAN_MODEL:-$MODEL}" --num_experts "$NUM_EXPERTS" --top_k "$TOP_K" \
  --shared_neurons "$SHARED_NEURONS" --seq_len "$SEQ_LEN" --micro_batch "$BATCH_SIZE" \
  --trainable "$TRAINABLE" --distillation="$( [ "$KD_WEIGHT" = 0 ] && echo False || echo True )" \
  --activation_checkpointing="$( [ "$ACTIVATION_CHECKPOINTING" = 1 ] && echo True || echo False )" --recon=True
dm_rendezvous

# shellcheck disable=SC2206,SC2207  # EXTRA_ARGS and the flag helpers give lists of words
TRAIN_ARGS=(--model "$MODEL" --data "$DATA" --output "$OUTPUT" --num_experts "$NUM_EXPERTS" --top_k "$TOP_K"
  --shared_neurons "$SHARED_NEURONS" --method "$METHOD" --steps "$STEPS" --seq_len "$SEQ_LEN"
  --batch_size "$BATCH_SIZE" --seed "$SEED" --checkpoint_every "$CHECKPOINT_EVERY"
  --trainable "$TRAINABLE" --kd_weight "$KD_WEIGHT" --threads "$OMP_NUM_THREADS"
  --deepspeed "$DS_CONFIG" $(dm_overwrite_flag "$OUTPUT") $(dm_checkpointing_flag) $EXTRA_ARGS)
dm_launch "$PYTHON" -u "$TRAIN_ENTRY" "${TRAIN_ARGS[@]}"
