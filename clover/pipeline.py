"""The whole Clover-2 pipeline on one machine, end to end, sized for a CPU by default:

1. training data: the base model's hidden states on a slice of ShareGPT (``clover.ge_data.allocation``);
2. train Clover-2 and EAGLE-1 on the same data with the same budget (``clover.train.main_clover2`` / ``main``);
3. answers of every method on the question set and the comparison table + figures (``clover.evaluation.compare``).

Every stage is the documented command line (printed before it runs) and resumes when rerun: finished shards,
trained drafts and answered questions are kept. ``--fast`` is a few-minute smoke version.

    python -m clover.pipeline [--fast] [--workdir runs/pipeline] [--base-model smollm2-135m-instruct]
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from clover.args import CloverArgumentParser, add_base_model, add_questions, add_tree
from clover.errors import CloverError, run_cli
from clover.model.registry import DRAFTS

# (conversations, max_len, batch size, epochs, max_steps, questions, max_new_token) per size. Both drafts propose
# from the 8,192 most frequent reply tokens (--draft-vocab-size), with which Clover-2's five vocabulary-sized heads
# train 3.4x faster on SmolLM2 (49,152 tokens, hidden size 576; see the README); the full size trains each draft for
# one epoch (~90 optimizer steps) on ~190k tokens.
SIZES = {
    "fast": dict(conversations=32, max_len=256, bs=4, epochs=1, max_steps=None, question_end=6, max_new_token=32),
    "full": dict(conversations=440, max_len=512, bs=4, epochs=1, max_steps=None, question_end=None,
                 max_new_token=64),
}
DRAFT_VOCAB_SIZE = 8192


def run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise CloverError(f"stage failed (exit {proc.returncode}): {' '.join(cmd[:4])} ...; fix the error above and "
                          f"rerun: finished work is kept")
    print(f"[{time.perf_counter() - start:.0f} s]", flush=True)


def pipeline(workdir: Path, model: str, size: str, question_file: str | None, tree: str, budget: int | str) -> None:
    s = SIZES[size]
    py = [sys.executable, "-m"]
    data = workdir / "data"
    run(py + ["clover.ge_data.allocation", "--base-model", model, "--data-dir", str(data), "--start", "0",
              "--end", str(s["conversations"]), "--max-len", str(s["max_len"]), "--shard-size", "32"])
    common = ["--base-model", model, "--data-dir", str(data), "--bs", str(s["bs"]), "--max-len", str(s["max_len"]),
              "--epochs", str(s["epochs"]), "--warmup-steps", "10", "--keep-last", "1",
              "--draft-vocab-size", str(DRAFT_VOCAB_SIZE)]
    if s["max_steps"]:
        common += ["--max-steps", str(s["max_steps"])]
    drafts = []
    for cls in DRAFTS:  # every registered draft, same data, same budget, same learning rate
        ckpt = workdir / "ckpt" / cls.draft_type
        if not (ckpt / "final" / "model.safetensors").is_file():
            run(py + [cls.train_module, *common, "--ckpt-dir", str(ckpt), "--lr", "1e-3"])
        drafts += ["--draft", str(ckpt / "final")]
    cmd = py + ["clover.evaluation.compare", "--base-model", model, *drafts, "--outdir", str(workdir / "compare"),
                "--max-new-tokens", str(s["max_new_token"]), "--tree", tree, "--tree-budget", str(budget)]
    if question_file:
        cmd += ["--question-file", question_file]
    if s["question_end"]:
        cmd += ["--question-end", str(s["question_end"])]
    run(cmd)
    print(f"\ntable: {workdir / 'compare' / 'table.md'}; figures: figs/tau_per_group.png, figs/speedup_per_group.png")


def main(argv=None) -> None:
    p = CloverArgumentParser(prog="python -m clover.pipeline", description=__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    add_base_model(p)
    p.add_argument("--workdir", default="runs/pipeline", help="where data, checkpoints and answers go")
    p.add_argument("--fast", action="store_true", help="a few-minute smoke version (tiny data and budgets)")
    add_questions(p, subset=False, help="Spec-Bench format questions (default: the shipped set)")
    add_tree(p, "dynamic")
    a = p.parse_args(argv)
    workdir = Path(a.workdir) / ("fast" if a.fast else "full")
    pipeline(workdir, a.base_model, "fast" if a.fast else "full", a.question_file, a.tree, a.tree_budget)


if __name__ == "__main__":
    run_cli(main)
