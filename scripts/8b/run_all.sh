#!/usr/bin/env bash
# Clover-2 vs EAGLE-1 on Llama-3-8B-Instruct with the paper's hyper-parameters: 68k ShareGPT conversations,
# 4 GPUs, per-GPU batch 4, Clover-2 lr 1e-3 / EAGLE-1 lr 3e-5, 21 epochs, tree mc_sim_7b_63, greedy.
# Edit the variables below; the stages are in scripts/paper_recipe.sh and resume where they stopped when rerun.
set -euo pipefail
BASE=/path/to/Meta-Llama-3-8B-Instruct          # local HF checkpoint folder
WORK=/path/to/work/llama3_8b          # data, checkpoints and answers go here (~25 GB of bf16 hidden states)
QUESTIONS=/path/to/spec_bench_question.jsonl
GPUS=0,1,2,3
NPROC=4
TEMPLATE=llama3
DTYPE=bf16
source "$(dirname "$0")/../paper_recipe.sh"
