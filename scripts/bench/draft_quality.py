"""Learning curves of the drafts: held-out top-1 per head against optimizer steps, every variant trained on the same
data with the same optimiser, plus how much head 0 relies on the token ``x_{t+1}`` at the end.

    python scripts/bench/draft_quality.py --data-dir D [--variants clover2,clover2_unscaled,eagle,...] \
        [--max-steps 1000] [--eval-every 100] [--bs 4] [--max-len 512] [--lr 1e-3] [--draft-vocab-size 8192]

Each variant is one run of the project's trainer (``python -m clover.train.main_clover2`` / ``clover.train.main``
with ``--eval_every``) into ``--out-dir/VARIANT``; a variant whose run finished is not trained again (delete its
folder to redo it). After training, the final draft is evaluated twice on the held-out split: as is, and with every
``x_{t+1}`` replaced by a random token of the draft vocabulary (same hidden states, same targets): a head that uses
the token loses accuracy, one that predicts from ``h_t`` alone does not. Prints a table with the CPU model and flags,
writes ``--json`` (default figs/draft_learning_curves.json) and ``--fig`` (figs/draft_learning_curves.png).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from clover.args import CloverArgumentParser, add_base_model, add_data_dir, add_dtype, add_max_len, add_seed
from clover.errors import CloverError, run_cli
from clover.ge_data.dataset import HiddenStateDataset
from clover.io import read_jsonl, write_json
from clover.model.base import BaseModel
from clover.model.checkpoint import load_draft
from clover.model.registry import draft_class
from clover.train.evaluate import evaluate
from machine import cpu_flags, cpu_model  # scripts/bench/machine.py, beside this script

# name -> (draft type, draft config overrides); every other setting is shared by all variants
VARIANTS = {
    "clover2": ("clover2", {}),                                   # the library's defaults
    "clover2_first": ("clover2", {"init_from_layer": "first"}),   # trunk copied from the base's first layer
    "clover2_last": ("clover2", {"init_from_layer": "last"}),     # ... from its last layer
    "clover2_unscaled": ("clover2", {"token_scale": 1.0}),        # AD0 as in the original code
    "clover2_fc": ("clover2", {"fuse": "fc"}),                    # README ablation: FC instead of AD0
    "clover2_input": ("clover2", {"embedding": "input"}),         # README ablation: base input embedding
    "eagle": ("eagle", {}),
}


def cpu_description() -> str:
    """CPU model and the flags that decide CPU matmul speed (AVX-512, bf16, AMX), cores and torch threads."""
    return f"{cpu_model()}; {os.cpu_count()} cores; {' '.join(cpu_flags()) or 'no AVX flags seen'}; torch " \
           f"{torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads"


def train_variant(name: str, args, out: Path) -> Path:
    """Run the trainer for one variant (skipped when its final draft exists); returns its checkpoint folder."""
    draft_type, overrides = VARIANTS[name]
    cpdir = out / name
    if (cpdir / "final" / "config.json").is_file() and (cpdir / "evals.jsonl").is_file():
        print(f"{name}: finished run found in {cpdir}, not retrained")
        return cpdir
    if cpdir.exists():  # an interrupted run: start it again (its evals would mix two runs)
        shutil.rmtree(cpdir)
    cpdir.mkdir(parents=True)
    config = cpdir.parent / f".{name}.config.json"
    config.write_text(json.dumps(overrides))
    cmd = [sys.executable, "-m", draft_class(draft_type).train_module, "--base-model", args.base_model,
           "--data-dir", args.data_dir, "--outdir", str(cpdir), "--configpath", str(config), "--bs", str(args.bs),
           "--max-len", str(args.max_len), "--epochs", str(args.epochs), "--max-steps", str(args.max_steps),
           "--eval-every", str(args.eval_every), "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps),
           "--test-fraction", str(args.test_fraction), "--draft-vocab-size", str(args.draft_vocab_size),
           "--dtype", args.dtype, "--seed", str(args.seed), "--keep-last", "1", "--num-workers", "0"]
    print(f"{name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    (cpdir / "train_seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return cpdir


class RandomNextTokens(torch.utils.data.Dataset):
    """The held-out items with every token id replaced by a random draft-vocabulary token (seeded per item): the
    drafts' targets (hidden states) and loss masks stay, only the tokens they are fed change."""

    def __init__(self, data, vocab: torch.Tensor, seed: int = 0):
        self.data, self.vocab, self.seed = data, vocab, seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.data[i])
        gen = torch.Generator().manual_seed(self.seed + i)
        picks = torch.randint(0, len(self.vocab), item["input_ids"].shape, generator=gen)
        item["input_ids"] = self.vocab[picks].to(item["input_ids"].dtype)
        return item


def final_accuracy(cpdir: Path, args, base: BaseModel, test_set) -> dict:
    """Held-out top-1 per head of the final draft, with the true and with random next tokens."""
    draft = load_draft(cpdir / "final", base, dtype="fp32")
    vocab = draft.draft_vocab if draft.draft_vocab is not None else torch.arange(base.args.vocab_size)
    result = {}
    for label, data in (("true", test_set), ("random", RandomNextTokens(test_set, vocab.cpu()))):
        result[f"top1_{label}"] = evaluate(draft, data, args.bs, "predicted").accuracy(1).tolist()
    for key in ("token_scale", "init_from_layer"):  # the Clover-2 settings the variants differ in
        if hasattr(draft.cfg, key):
            result[key] = getattr(draft.cfg, key)
    return result


def read_curve(cpdir: Path) -> list[dict]:
    points = read_jsonl(cpdir / "evals.jsonl")
    return [{"step": p["step"], "top1": [p[k] for k in sorted((k for k in p if k.startswith("test_top1_")),
                                                                key=lambda k: int(k.rsplit("_", 1)[1]))]}
            for p in points]


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results.items():
        steps = [p["step"] for p in r["curve"]]
        left.plot(steps, [p["top1"][0] for p in r["curve"]], marker="o", label=name)
        heads = r["final"]["top1_true"]
        right.plot(range(len(heads)), heads, marker="o", label=name)
    left.set(xlabel="optimizer step", ylabel="held-out top-1, head 0", title="learning curves")
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set(xlabel="head (tokens ahead - 1)", ylabel="held-out top-1 at the last step", title="per head")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    p = CloverArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_dir(p)
    add_base_model(p, help="the one the data was dumped with")
    p.add_argument("--out-dir", default="runs/draft_quality", help="one checkpoint folder per variant")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--max-steps", type=int, default=1000, help="optimizer steps per variant")
    p.add_argument("--epochs", type=int, default=2, help="epochs the schedule spans (--max-steps may stop earlier)")
    p.add_argument("--eval-every", type=int, default=100, help="held-out evaluation every this many steps")
    p.add_argument("--bs", type=int, default=4, help="batch size")
    add_max_len(p, 512, "conversations are truncated to it")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate, every variant")
    p.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--draft-vocab-size", type=int, default=8192, help="draft vocabulary (0 = whole vocabulary)")
    p.add_argument("--test-fraction", type=float, default=0.02, help="held-out share of the data")
    add_dtype(p, "; training autocast", names=("fp32", "bf16"), default="fp32")
    add_seed(p, "initialisation, split and data order")
    p.add_argument("--json", default="figs/draft_learning_curves.json", help="results file")
    p.add_argument("--fig", default="figs/draft_learning_curves.png", help="figure")
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise CloverError(f"--variants: unknown {unknown or 'none given'}; choose from {', '.join(VARIANTS)}")
    for flag in ("max_steps", "eval_every", "bs", "max_len", "epochs"):
        if getattr(args, flag) < 1:
            raise CloverError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    machine = cpu_description()
    print(machine, flush=True)
    out = Path(args.out_dir)
    base = BaseModel.from_pretrained(args.base_model, dtype="fp32", max_len=1)
    test_set = HiddenStateDataset(args.data_dir, split="test", max_len=args.max_len, test_fraction=args.test_fraction,
                                  seed=args.seed)
    results = {}
    for name in names:
        cpdir = train_variant(name, args, out)
        final = final_accuracy(cpdir, args, base, test_set)
        curve = read_curve(cpdir)
        last = json.loads((cpdir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
        if not curve or curve[-1]["step"] != last:  # the run's last step, when --eval-every does not divide it
            curve.append({"step": last, "top1": final["top1_true"]})
        results[name] = {"curve": curve, "final": final,
                         "train_seconds": float((cpdir / "train_seconds.txt").read_text())
                         if (cpdir / "train_seconds.txt").is_file() else None}
    settings = {k: getattr(args, k) for k in ("data_dir", "base_model", "max_steps", "epochs", "eval_every", "bs",
                                              "max_len", "lr", "warmup_steps", "draft_vocab_size", "test_fraction",
                                              "dtype", "seed")}
    report = {"date": date.today().isoformat(), "machine": machine, "settings": settings,
              "held_out_conversations": len(test_set), "variants": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, report, indent=1)
    steps = max(r["curve"][-1]["step"] for r in results.values())
    plot(results, Path(args.fig), f"{args.base_model}, {steps} steps of batch {args.bs} at max_len {args.max_len}, "
                                  f"lr {args.lr}, {len(test_set)} held-out conversations; {machine.split(';')[0]}")
    print(f"\n{machine}\n| variant | " + " | ".join(f"step {p['step']}" for p in results[names[0]]["curve"])
          + " | final top-1 per head | head 0, random x_{t+1} | drop |")
    for name, r in results.items():
        f = r["final"]
        print(f"| {name} | " + " | ".join(f"{p['top1'][0]:.3f}" for p in r["curve"]) + " | "
              + " ".join(f"{a:.3f}" for a in f["top1_true"]) + f" | {f['top1_random'][0]:.3f} | "
              f"{f['top1_true'][0] - f['top1_random'][0]:.3f} |")
    print(f"wrote {args.json} and {args.fig}")


if __name__ == "__main__":
    run_cli(main)
