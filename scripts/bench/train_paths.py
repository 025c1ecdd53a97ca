"""Benchmark: the ways to train Clover-2 and EAGLE-1 on the same conversations, one epoch each, timed as whole
commands: the hidden-state dump then offline training of each draft; online training of each draft alone; and both
drafts online together (``clover train clover2,eagle``: one base pass for both).

    python scripts/bench/train_paths.py --conversations runs/pipeline/full/regenerated/regenerated.jsonl \\
        [--workdir runs/train_paths] [--max-len 512] [--bs 4] [--threads 2]

Every command runs alone with ``--threads`` torch threads (the main job's flags: batch 4, lr 1e-3, 10 warm-up steps,
an 8,192-token draft vocabulary, one epoch). Reports wall seconds per command and path, training tokens per second of
each path (the tokens of one epoch of both drafts over the path's total time) and each draft's held-out loss, so that
the paths can be seen to train the same thing. Prints a table with the CPU model and flags and writes ``--json``
(default figs/train_paths.json). ``--workdir`` is emptied first.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from clover.args import CloverArgumentParser, add_base_model, add_max_len, positive_int
from clover.errors import CloverError, run_cli
from clover.io import read_jsonl, write_json
from machine import cpu_flags, cpu_model  # scripts/bench/machine.py, beside this script

DRAFTS = ("clover2", "eagle")


def timed(cmd: list[str], threads: int) -> float:
    """Wall seconds of ``cmd`` (a ``python -m`` command line), run alone with ``threads`` torch threads."""
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *cmd], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise CloverError(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds


def last_metrics(outdir: Path) -> dict:
    return read_jsonl(outdir / "metrics.jsonl")[-1]


def main(argv=None) -> None:
    p = CloverArgumentParser(description=__doc__.split("\n\n")[0])
    add_base_model(p)
    p.add_argument("--conversations", required=True, help="ShareGPT JSON/JSONL conversations to train on")
    p.add_argument("--workdir", type=Path, default=Path("runs/train_paths"), help="scratch folder (emptied first)")
    add_max_len(p, 512, "conversations are truncated to it (the main job's length)")
    p.add_argument("--bs", type=positive_int, default=4)
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads of every command")
    p.add_argument("--json", type=Path, default=Path("figs/train_paths.json"))
    args = p.parse_args(argv)
    run_cli(lambda: bench(args))


def bench(args) -> None:
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    flags = ["--base-model", args.base_model, "--bs", str(args.bs), "--max-len", str(args.max_len), "--epochs", "1",
             "--warmup-steps", "10", "--lr", "1e-3", "--draft-vocab-size", "8192", "--num-workers", "0"]
    seconds: dict[str, float] = {}
    seconds["dump"] = timed(["clover.ge_data.allocation", "--base-model", args.base_model, "--dataset",
                             args.conversations, "--outdir", str(work / "data"), "--max-len", str(args.max_len),
                             "--shard-size", "32"], args.threads)
    for draft in DRAFTS:
        seconds[f"offline {draft}"] = timed(["clover", "train", draft, "--data-dir", str(work / "data"), *flags,
                                             "--outdir", str(work / "offline" / draft)], args.threads)
    for draft in DRAFTS:
        seconds[f"online {draft}"] = timed(["clover", "train", draft, "--conversations", args.conversations, *flags,
                                            "--outdir", str(work / "online" / draft)], args.threads)
    seconds["online together"] = timed(["clover", "train", ",".join(DRAFTS), "--conversations", args.conversations,
                                        *flags, "--outdir", str(work / "together")], args.threads)

    tokens = {draft: last_metrics(work / "online" / draft)["tokens"] for draft in DRAFTS}
    paths = {"dump + offline, each draft": seconds["dump"] + sum(seconds[f"offline {d}"] for d in DRAFTS),
             "online, each draft alone": sum(seconds[f"online {d}"] for d in DRAFTS),
             "online, both together": seconds["online together"]}
    held_out = {f"{where} {draft}": last_metrics(work / where / draft)["test_loss"]
                for where in ("offline", "online", "together") for draft in DRAFTS}
    result = {"date": date.today().isoformat(), "cpu": cpu_model(), "cpu_flags": cpu_flags(), "threads": args.threads,
              "conversations": args.conversations, "max_len": args.max_len, "bs": args.bs,
              "epoch_tokens": tokens, "command_seconds": seconds, "path_seconds": paths,
              "path_tokens_per_s": {k: sum(tokens.values()) / v for k, v in paths.items()},
              "held_out_loss": held_out}
    print(f"\n{cpu_model()} ({' '.join(cpu_flags())}), {args.threads} threads, {date.today()}")
    for name, value in seconds.items():
        print(f"  {name:<18} {value:7.1f} s")
    print(f"one epoch of both drafts ({sum(tokens.values()):,.0f} training tokens):")
    for name, value in paths.items():
        print(f"  {name:<28} {value:7.1f} s  {sum(tokens.values()) / value:6.0f} tokens/s")
    print("held-out loss: " + ", ".join(f"{k} {v:.3f}" for k, v in held_out.items()))
    write_json(args.json, result)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
