"""The whole Clover-2 pipeline on one machine, end to end, sized for a CPU by default:

1. training text: the base model writes the replies of a slice of ShareGPT itself, given the human turns
   (``clover regenerate``, sampled at its default T = 0.7, top-p 0.95: on-policy data, what the draft is asked to
   predict at inference); ``--data sharegpt`` keeps ShareGPT's own replies (written by other models) and skips this
   stage;
2. training data: the base model's hidden states on that text (``clover data``);
3. train Clover-2 and EAGLE-1 on the same data with the same budget (``clover train clover2`` / ``eagle``);
4. answers on the question set and the comparison table + figures (``clover compare``): the project's
   plain decoding, transformers' prompt lookup, the training-free sources (``lookup``, ``lookup+recycle``), both
   drafts, Clover-2 with both sources in its tree, and the drafts shipped with the library for this base model
   (trained for hours, next to the minutes of stage 3; ``compare --methods`` runs any other set).

Every stage is the documented command line (printed before it runs) and resumes when rerun: regenerated shards,
finished data shards, trained drafts and answered questions are kept. ``--fast`` is a few-minute smoke version.

    clover pipeline [--fast] [--data regenerated|sharegpt] [--outdir runs/pipeline]
                    [--base-model smollm2-135m-instruct]

(``python -m clover.pipeline`` is the same command.) Everything it writes stays under --outdir.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

from clover.args import CloverArgumentParser, add_base_model, add_outdir, add_questions, add_tree
from clover.errors import CloverError, run_cli
from clover.model.checkpoint import read_draft_config, shipped_drafts
from clover.model.registry import DRAFTS, draft_class

# Per size: conversations (regenerated), max_len (the longest sequence, prompt + reply, regenerated and trained on),
# batch size, epochs, max_steps, questions, max_new_tokens (answers); the reply cap of regenerated data; the
# conversations taken with ShareGPT's own replies instead (--data sharegpt). Both drafts propose from the 8,192 most
# frequent reply tokens (--draft-vocab-size), with which Clover-2's five vocabulary-sized heads train 3.4x faster on
# SmolLM2 (49,152 tokens, hidden size 576; see docs/training.md). The full size regenerates 256 conversations (about
# 5 minutes of the main job on 2 CPU cores; ~77k tokens kept) and trains each draft for one epoch; with ShareGPT's
# replies it takes 440 conversations (~190k tokens).
SIZES = {
    "fast": dict(conversations=32, max_len=256, bs=4, epochs=1, max_steps=None, question_end=6, max_new_tokens=32,
                 regen_new_tokens=64, sharegpt_conversations=32),
    "full": dict(conversations=256, max_len=512, bs=4, epochs=1, max_steps=None, question_end=None,
                 max_new_tokens=64, regen_new_tokens=128, sharegpt_conversations=440),
}
DATA_SOURCES = ("regenerated", "sharegpt")
# the main job's comparison (within its 20 minutes on 2 cores; compare's default set adds transformers generate,
# recycle alone and EAGLE-1 with both sources)
METHODS = ("baseline", "hf_pld", "lookup", "lookup+recycle", *(cls.method for cls in DRAFTS),
           "+".join((DRAFTS[0].method, "lookup", "recycle")))
DRAFT_VOCAB_SIZE = 8192


def run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise CloverError(f"stage failed (exit {proc.returncode}): {' '.join(cmd[:4])} ...; fix the error above and "
                          f"rerun: finished work is kept")
    print(f"[{time.perf_counter() - start:.0f} s]", flush=True)


def shipped_for(model: str) -> dict[str, str]:
    """``{name: draft type}`` of the shipped drafts trained for the base model named ``model``."""
    configs = {name: read_draft_config(folder) for name, folder in shipped_drafts().items()}
    return {name: c["draft_type"] for name, c in configs.items() if c["base"].get("name_or_path") == str(model)}


def pipeline(workdir: Path, model: str, size: str, question_file: str | None, tree: str, budget: int | str,
             source: str = "regenerated") -> None:
    s = SIZES[size]
    py = [sys.executable, "-m"]
    data = workdir / "data"
    if source == "regenerated":
        regen = workdir / "regenerated"
        run(py + ["clover.ge_data.regenerate", "--base-model", model, "--outdir", str(regen), "--start", "0",
                  "--end", str(s["conversations"]), "--max-len", str(s["max_len"]),
                  "--max-new-tokens", str(s["regen_new_tokens"]), "--batch-size", "32", "--shard-size", "32"])
        text = ["--dataset", str(regen / "regenerated.jsonl")]  # every regenerated conversation
    else:
        text = ["--start", "0", "--end", str(s["sharegpt_conversations"])]
    run(py + ["clover.ge_data.allocation", "--base-model", model, "--outdir", str(data), *text,
              "--max-len", str(s["max_len"]), "--shard-size", "32"])
    common = ["--base-model", model, "--data-dir", str(data), "--bs", str(s["bs"]), "--max-len", str(s["max_len"]),
              "--epochs", str(s["epochs"]), "--warmup-steps", "10", "--keep-last", "1",
              "--draft-vocab-size", str(DRAFT_VOCAB_SIZE)]
    if s["max_steps"]:
        common += ["--max-steps", str(s["max_steps"])]
    drafts = []
    for cls in DRAFTS:  # every registered draft, same data, same budget, same learning rate
        ckpt = workdir / "ckpt" / cls.draft_type
        if not (ckpt / "final" / "model.safetensors").is_file():
            run(py + [cls.train_module, *common, "--outdir", str(ckpt), "--lr", "1e-3"])
        drafts += ["--draft", str(ckpt / "final")]
    shipped = shipped_for(model)
    for name, draft_type in shipped.items():  # compared as <method>@<name>, beside the drafts trained above
        drafts += ["--draft", name]
    methods = [*METHODS, *(f"{draft_class(t).method}@{name}" for name, t in shipped.items())]
    cmd = py + ["clover.evaluation.compare", "--base-model", model, *drafts, "--outdir", str(workdir / "compare"),
                "--max-new-tokens", str(s["max_new_tokens"]), "--tree", tree, "--tree-budget", str(budget),
                "--methods", ",".join(methods)]
    if question_file:
        cmd += ["--question-file", question_file]
    if s["question_end"]:
        cmd += ["--question-end", str(s["question_end"])]
    run(cmd)
    print(f"\ntable: {workdir / 'compare' / 'table.md'}; figures: {workdir / 'compare'}/tau_per_group.png, "
          f"speedup_per_group.png")


def build_parser():
    p = CloverArgumentParser(prog="python -m clover.pipeline", description=__doc__)
    add_base_model(p)
    add_outdir(p, "data, checkpoints, answers, the table and the figures, in a subfolder per size and data source",
               default="runs/pipeline", also=("--workdir",))
    p.add_argument("--fast", action="store_true", help="a few-minute smoke version (tiny data and budgets)")
    add_questions(p, subset=False, help="Spec-Bench format questions (default: the shipped set)")
    p.add_argument("--data", choices=DATA_SOURCES, default="regenerated",
                   help="training text: the base model's own replies to ShareGPT's human turns (default), or "
                        "ShareGPT's replies as they are")
    add_tree(p)
    return p


def main(argv=None) -> None:
    a = build_parser().parse_args(argv)
    size = "fast" if a.fast else "full"
    workdir = Path(a.outdir) / (size if a.data == "regenerated" else f"{size}_sharegpt")
    pipeline(workdir, a.base_model, size, a.question_file, a.tree, a.tree_budget, a.data)


if __name__ == "__main__":
    run_cli(main)
