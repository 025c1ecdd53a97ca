#!/usr/bin/env bash
# The paper's recipe, shared by scripts/7b/run_all.sh and scripts/8b/run_all.sh, which set BASE, WORK,
# QUESTIONS, GPUS, NPROC, TEMPLATE and DTYPE and then source this file. Every stage resumes when rerun.
set -euo pipefail
: "${BASE:?}" "${WORK:?}" "${QUESTIONS:?}" "${GPUS:?}" "${NPROC:?}" "${TEMPLATE:?}" "${DTYPE:?}"

# 1. training data: hidden states of 68k ShareGPT conversations, one worker per GPU
python -m clover.ge_data.allocation --model_path "$BASE" --outdir "$WORK/data" --gpus "$GPUS" \
    --template "$TEMPLATE" --start 0 --end 68000 --max_len 2048 --dtype "$DTYPE"
# 2. baseline answers (plain decoding), then the monitoring set (the base model's own answers)
python -m clover.evaluation.gen_answer --method baseline --base-model-path "$BASE" --question-file "$QUESTIONS" \
    --answer-file "$WORK/answers/baseline.jsonl" --max-new-token 1024 --template "$TEMPLATE" --dtype "$DTYPE"
python -m clover.ge_data.allocation --model_path "$BASE" --outdir "$WORK/eval_data" --gpus "${GPUS%%,*}" \
    --template "$TEMPLATE" --eval --question-file "$QUESTIONS" --max-new-tokens 1024 --dtype "$DTYPE"
# 3. train Clover-2 and EAGLE-1 (DDP over the GPUs; any accelerate config works, e.g. DeepSpeed)
accelerate launch --multi_gpu --num_processes "$NPROC" --mixed_precision bf16 -m clover.train.main_clover2 \
    --basepath "$BASE" --tmpdir "$WORK/data" --evaldata "$WORK/eval_data" --cpdir "$WORK/ckpt/clover" \
    --bs 4 --lr 1e-3 --epochs 21 --warmup_steps 2000 --max_len 2048 --gradient_checkpointing
accelerate launch --multi_gpu --num_processes "$NPROC" --mixed_precision bf16 -m clover.train.main \
    --basepath "$BASE" --tmpdir "$WORK/data" --evaldata "$WORK/eval_data" --cpdir "$WORK/ckpt/eagle" \
    --bs 4 --lr 3e-5 --epochs 21 --warmup_steps 500 --max_len 2048
# 4. speculative answers and metrics
for METHOD in clover eagle; do
    python -m clover.evaluation.gen_answer --method "$METHOD" --base-model-path "$BASE" \
        --draft-model-path "$WORK/ckpt/$METHOD/final" --question-file "$QUESTIONS" \
        --answer-file "$WORK/answers/$METHOD.jsonl" --max-new-token 1024 --template "$TEMPLATE" --dtype "$DTYPE" \
        --tree mc_sim_7b_63
    python -m clover.evaluation.speed_spe --path "$WORK/answers/$METHOD.jsonl" --base_path "$WORK/answers/baseline.jsonl"
    python -m clover.evaluation.tau_spe --path "$WORK/answers/$METHOD.jsonl"
done
