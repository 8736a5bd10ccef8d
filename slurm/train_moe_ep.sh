#!/usr/bin/env bash
#SBATCH --job-name=dotmoe-recover
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
# Recovery training of a converted MoE with DeepSpeed expert parallelism (AutoEP + ZeRO-3): the
# experts of each layer are spread over expert_parallel.autoep_size ranks (ds_configs/z3_ep.json).
# Same launcher as slurm/convert_70b.sh (slurm/common.sh): resources, preemption, requeue, plan.
#
#   MODEL=runs/convert-Meta-Llama-3-70B-E8k4/model DATA=/data/recovery sbatch slurm/train_moe_ep.sh
#
# Settings (environment variables), besides the shared ones documented in slurm/convert_70b.sh
# (DEVICE, NODES, GPUS_PER_NODE, GPU_MEM_GB, PLAN*, EXTRA_ARGS, OVERWRITE, MASTER_*, ...):
#   MODEL      the exported MoE folder (OUTPUT/model of a conversion) [runs/convert-Meta-Llama-3-70B-E8k4/model]
#   DATA [demo]  OUTPUT [$SLURM_SUBMIT_DIR/runs/recover-<model>]  STEPS [1000]  SEQ_LEN [4096]
#   BATCH_SIZE [1]  SEED [0]  CHECKPOINT_EVERY [100]  TRAINABLE [all]
#   DS_CONFIG  [ds_configs/z3_ep.json]; its expert_parallel.autoep_size must divide both the number
#              of ranks and the model's number of experts (checked before anything is loaded)
set -euo pipefail

DM_SCRIPT=${BASH_SOURCE[0]}
if [ ! -f "$(dirname "$DM_SCRIPT")/common.sh" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  DM_SCRIPT=$(scontrol show job -o "$SLURM_JOB_ID" | grep -oP '(?<= Command=)\S+' || true)
  [ -f "$(dirname "$DM_SCRIPT")/common.sh" ] || DM_SCRIPT=${SLURM_SUBMIT_DIR:-.}/slurm/train_moe_ep.sh
fi
DOTMOE_HOME=${DOTMOE_HOME:-$(cd "$(dirname "$DM_SCRIPT")/.." && pwd)}
# shellcheck source=slurm/common.sh
source "$DOTMOE_HOME/slurm/common.sh"

[ -n "${SLURM_JOB_ID:-}" ] || dm_submit "$DM_SCRIPT"

dm_common_defaults
: "${MODEL:=${SLURM_SUBMIT_DIR:-$PWD}/runs/convert-Meta-Llama-3-70B-E8k4/model}"
: "${DATA:=demo}"
: "${STEPS:=1000}" "${SEQ_LEN:=4096}" "${BATCH_SIZE:=1}" "${SEED:=0}" "${CHECKPOINT_EVERY:=100}"
: "${TRAINABLE:=all}" "${ACTIVATION_CHECKPOINTING:=1}"
: "${DS_CONFIG:=$DOTMOE_HOME/ds_configs/z3_ep.json}"
: "${OUTPUT:=${SLURM_SUBMIT_DIR:-$PWD}/runs/recover-$(basename "$(dirname "$MODEL")")}"

dm_read_allocation
dm_print_settings MODEL DATA OUTPUT STEPS SEQ_LEN BATCH_SIZE SEED TRAINABLE DS_CONFIG EXTRA_ARGS
dm_preflight_common
[ -f "$MODEL/config.json" ] || dm_die $DM_EXIT_BAD_SETTINGS \
  "MODEL=$MODEL is not a model folder with config.json: point it at the exported MoE (OUTPUT/model of slurm/convert_70b.sh)"
dm_check_data "$DATA"
dm_check_expert_parallel "$MODEL/config.json" "$DS_CONFIG"
dm_check_resume_world "$OUTPUT"
dm_plan --model "${PLAN_MODEL:-$MODEL}" --phase recover --seq_len "$SEQ_LEN" --micro_batch "$BATCH_SIZE" \
  --trainable "$TRAINABLE" \
  --activation_checkpointing="$( [ "$ACTIVATION_CHECKPOINTING" = 1 ] && echo True || echo False )"
dm_rendezvous

# shellcheck disable=SC2206,SC2207  # EXTRA_ARGS and the flag helpers give lists of words
TRAIN_ARGS=(--phase recover --model "$MODEL" --data "$DATA" --output "$OUTPUT" --steps "$STEPS"
  --seq_len "$SEQ_LEN" --batch_size "$BATCH_SIZE" --seed "$SEED" --checkpoint_every "$CHECKPOINT_EVERY"
  --trainable "$TRAINABLE" --threads "$OMP_NUM_THREADS" --deepspeed "$DS_CONFIG"
  $(dm_overwrite_flag "$OUTPUT") $(dm_checkpointing_flag) $EXTRA_ARGS)
dm_launch "$PYTHON" -u "$TRAIN_ENTRY" "${TRAIN_ARGS[@]}"
