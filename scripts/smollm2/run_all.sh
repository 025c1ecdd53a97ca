#!/usr/bin/env bash
# The 7b/8b recipe sized for a 2-core CPU with the embedded SmolLM2-135M-Instruct (what `python -m clover.pipeline`
# runs, spelled out). Every stage resumes where it stopped when rerun.
set -euo pipefail
BASE=smollm2-135m-instruct
WORK=${WORK:-runs/smollm2}
QUESTIONS=${QUESTIONS:-}            # empty = the shipped question set; or ../shared/data/spec_bench_question.jsonl
QARGS=${QUESTIONS:+--question-file $QUESTIONS}
PER_GROUP=${PER_GROUP:-}            # e.g. 10: a stratified subset (10 questions per category group)
QARGS="$QARGS ${PER_GROUP:+--per-group $PER_GROUP}"
CONVS=${CONVS:-440}
DRAFT_VOCAB=${DRAFT_VOCAB:-8192}    # both drafts propose from the 8,192 most frequent reply tokens (0 = all)

python -m clover.ge_data.allocation --model_path "$BASE" --outdir "$WORK/data" --start 0 --end "$CONVS" \
    --max_len 512 --shard_size 32
python -m clover.train.main_clover2 --basepath "$BASE" --tmpdir "$WORK/data" --cpdir "$WORK/ckpt/clover2" \
    --bs 4 --lr 1e-3 --epochs 1 --warmup_steps 10 --max_len 512 --draft_vocab_size "$DRAFT_VOCAB"
python -m clover.train.main --basepath "$BASE" --tmpdir "$WORK/data" --cpdir "$WORK/ckpt/eagle" \
    --bs 4 --lr 1e-3 --epochs 1 --warmup_steps 10 --max_len 512 --draft_vocab_size "$DRAFT_VOCAB"
for METHOD in baseline clover eagle; do
    DRAFT=()
    [ "$METHOD" = clover ] && DRAFT=(--draft-model-path "$WORK/ckpt/clover2/final")
    [ "$METHOD" = eagle ] && DRAFT=(--draft-model-path "$WORK/ckpt/eagle/final")
    python -m clover.evaluation.gen_answer --method "$METHOD" --base-model-path "$BASE" "${DRAFT[@]}" $QARGS \
        --answer-file "$WORK/answers/$METHOD.jsonl" --max-new-token 64 --tree dynamic --total-token auto
done
for METHOD in clover eagle; do
    python -m clover.evaluation.speed_spe --path "$WORK/answers/$METHOD.jsonl" --base_path "$WORK/answers/baseline.jsonl"
    python -m clover.evaluation.tau_spe --path "$WORK/answers/$METHOD.jsonl"
done
