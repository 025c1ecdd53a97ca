"""Benchmark: training-data dump throughput vs the raw forward of the same model on the same token sequences.

Runs ``python -m clover.ge_data.allocation`` in-process on the first N selected ShareGPT conversations (a fresh
output folder), then times ``base(ids, use_cache=False, logits_to_keep=0)`` alone over the dumped sequences, in the
same process with the same threads. Prints tokens/s of the whole run (data and model
loading included), of the dump itself (after model loading: templating, forward, dtype conversion, writing), of the
raw forward, their ratios (target >= 90% for the dump), and the bytes per token on disk; writes figs/bench_ge_data.json.

    python scripts/bench/ge_data.py [--base-model smollm2-135m-instruct] [--end 40] [--max-len 2048] [--dtype bf16]
"""
from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from clover.args import CloverArgumentParser, add_base_model, add_max_len, positive_int
from clover.ge_data import allocation
from clover.ge_data.dataset import shard_files
from clover.ge_data.worker import compute_dtype
from clover.io import read_safetensors
from clover.model.base import DTYPES, BaseModel


def stored_sequences(folder: Path) -> list[torch.Tensor]:
    sequences = []
    for path in shard_files(folder):
        t = read_safetensors(path, keys=("input_ids", "offsets"), what="shard")
        ids, offsets = t["input_ids"].long(), t["offsets"].tolist()
        sequences += [ids[a:b][None] for a, b in zip(offsets[:-1], offsets[1:])]
    return sequences


def forward_seconds(base: BaseModel, sequences: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for ids in sequences:
        base(ids, use_cache=False, logits_to_keep=0)
    return time.perf_counter() - start


def main():
    parser = CloverArgumentParser(description=__doc__)
    add_base_model(parser)
    parser.add_argument("--end", type=positive_int, default=40, help="conversations to dump (default 40)")
    add_max_len(parser, 2048, "conversations are truncated to it")
    parser.add_argument("--hidden-dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                        help="stored dtype of the hidden states")
    parser.add_argument("--out", default="figs/bench_ge_data.json", help="results JSON")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_ge_data_") as tmp:
        outdir = Path(tmp) / "data"
        base = BaseModel.from_pretrained(args.base_model, dtype=compute_dtype("auto", "cpu"), max_len=1)
        start = time.perf_counter()
        run = allocation.main(["--base-model", args.base_model, "--outdir", str(outdir), "--end", str(args.end),
                               "--max-len", str(args.max_len), "--hidden-dtype", args.hidden_dtype,
                               "--gpus", "cpu"])
        whole_seconds = time.perf_counter() - start
        sequences = stored_sequences(outdir)
        forward_seconds(base, sequences[:1])  # warm-up
        raw_seconds = forward_seconds(base, sequences)

    tokens = run["tokens"]
    results = {
        "model": args.base_model, "conversations": run["conversations"], "tokens": tokens, "max_len": args.max_len,
        "storage_dtype": args.hidden_dtype, "compute_dtype": compute_dtype("auto", "cpu"),
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "whole_run_seconds": whole_seconds, "whole_run_tokens_per_s": tokens / whole_seconds,
        "dump_seconds": run["dump_seconds"], "dump_tokens_per_s": tokens / run["dump_seconds"],
        "raw_forward_seconds": raw_seconds, "raw_forward_tokens_per_s": tokens / raw_seconds,
        "dump_over_forward": raw_seconds / run["dump_seconds"], "whole_run_over_forward": raw_seconds / whole_seconds,
        "bytes_on_disk": run["bytes"], "bytes_per_token": run["bytes_per_token"],
        "hidden_bytes_per_token": base.args.hidden_size * DTYPES[args.hidden_dtype].itemsize,
    }
    print(f"\n{args.base_model}: {run['conversations']} conversations, {tokens:,} tokens (max_len {args.max_len}), "
          f"{args.hidden_dtype} storage, {results['compute_dtype']} forward, {results['threads']} threads")
    print(f"whole run (data + model loading included): {whole_seconds:7.1f} s  "
          f"{results['whole_run_tokens_per_s']:8.0f} tokens/s  {results['whole_run_over_forward']:6.1%} of raw forward")
    print(f"dump after model loading:                  {run['dump_seconds']:7.1f} s  "
          f"{results['dump_tokens_per_s']:8.0f} tokens/s  {results['dump_over_forward']:6.1%} of raw forward "
          f"(target >= 90%)")
    print(f"raw forward, same sequences:               {raw_seconds:7.1f} s  "
          f"{results['raw_forward_tokens_per_s']:8.0f} tokens/s")
    print(f"on disk: {run['bytes'] / 2**20:.1f} MiB = {run['bytes_per_token']:.0f} bytes/token "
          f"(hidden state alone {results['hidden_bytes_per_token']} + ids 4 + mask 1)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
