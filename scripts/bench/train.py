"""Benchmark: draft training throughput of Clover-2 and EAGLE-1 on SmolLM2 hidden-state data, the cost of one draft
step per tree level at inference (Clover-2 ``head`` vs EAGLE ``tree_step`` on 4 rows over a 300-entry draft cache),
and fp32 vs bf16 on this CPU (what ``--dtype auto`` decides on). Prints a table and writes figs/bench_train.json.

    python scripts/bench/train.py [--data-dir DIR] [--base-model smollm2-135m-instruct] [--steps 6] [--bs 2] \\
        [--threads 1]

Training steps are the trainer's own (``batch_loss`` + backward + AdamW) on the same batches for both drafts, after
one untimed warm-up step; tokens/s counts every real (unpadded) position. Without ``--data-dir`` the script first
dumps 16 ShareGPT conversations of at most 256 tokens with ``python -m clover.ge_data.allocation`` into a temporary
folder.
"""
from __future__ import annotations

import itertools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from clover.args import CloverArgumentParser, add_base_model, add_data_dir, add_option
from clover.ge_data.dataset import HiddenStateDataset, collate
from clover.model.base import BaseModel
from clover.model.checkpoint import init_draft
from clover.train.trainer import batch_loss

ROWS, CACHE = 4, 300
MATMUL_ROWS = (1, 4, 64, 512)


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def train_throughput(base, data, draft_type: str, steps: int, bs: int, bf16: bool = False) -> dict:
    """tokens/s and s/step of ``steps`` training steps (after a warm-up step), fp32 or under bf16 autocast."""
    torch.manual_seed(0)
    draft = init_draft(draft_type, base).train()
    params = [p for p in draft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    noise = draft.config["eagle"]["input_noise"] if draft_type == "eagle" else 0.0
    loader = torch.utils.data.DataLoader(data, batch_size=bs, collate_fn=collate)
    seconds, tokens = 0.0, 0
    for i, batch in zip(range(steps + 1), itertools.cycle(loader)):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = batch_loss(draft, draft, batch, "predicted", noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:  # step 0 is the warm-up
            seconds += time.perf_counter() - start
            tokens += int(batch["attention_mask"].sum())
    return {"tokens_per_s": tokens / seconds, "s_per_step": seconds / steps, "steps": steps, "batch_size": bs,
            "trainable_params_M": sum(p.numel() for p in params) / 1e6}


@torch.no_grad()
def draft_step_ms(base, runs: int) -> dict:
    """ms per tree level for ROWS rows: the draft step alone and with the LM-head logits the tree needs."""
    h, v = base.args.hidden_size, base.args.vocab_size
    tokens = torch.randint(v, (ROWS,))
    clover = init_draft("clover2", base).eval()
    state = torch.randn(ROWS, h)
    eagle = init_draft("eagle", base).eval()
    eagle.allocate_cache(CACHE + ROWS)
    feats = eagle.extend(torch.randn(1, CACHE, h), torch.randint(v, (1, CACHE)))[0, -ROWS:]
    positions, mask = torch.full((ROWS,), CACHE), torch.ones(ROWS, CACHE + ROWS, dtype=torch.bool)

    def eagle_step():
        out = eagle.tree_step(feats, tokens, positions, mask)
        eagle.truncate(CACHE)
        return out

    return {"clover2_head": median_ms(lambda: clover.head(state, tokens, 1), runs),
            "clover2_head_with_logits": median_ms(lambda: clover.draft_logits(clover.head(state, tokens, 1)[1]), runs),
            "eagle_tree_step": median_ms(eagle_step, runs),
            "eagle_tree_step_with_logits": median_ms(lambda: eagle.draft_logits(eagle_step()), runs)}


def matmul_ms(h: int, runs: int) -> dict:
    """``[rows, h] @ [h, 4h]`` in fp32, bf16 and fp32 inputs under bf16 autocast."""
    w = torch.randn(4 * h, h)
    out = {}
    for rows in MATMUL_ROWS:
        x = torch.randn(rows, h)
        xb, wb = x.bfloat16(), w.bfloat16()

        def autocast():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return x @ w.T
        out[rows] = {"fp32": median_ms(lambda: x @ w.T, runs), "bf16": median_ms(lambda: xb @ wb.T, runs),
                     "bf16_autocast": median_ms(autocast, runs)}
    return out


def dump_data(model: str, folder: Path) -> None:
    subprocess.run([sys.executable, "-m", "clover.ge_data.allocation", "--base-model", model, "--outdir",
                    str(folder), "--end", "16", "--max-len", "256"], check=True)


def main():
    parser = CloverArgumentParser(description=__doc__)
    add_base_model(parser)
    add_data_dir(parser, required=False, also=("--data",),
                 help="hidden-state data folder of --base-model (default: dump 16 conversations)")
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per draft")
    add_option(parser, "--bf16-steps", "--bf16_steps", type=int, default=2,
               help="timed Clover-2 training steps under bf16 autocast")
    parser.add_argument("--bs", type=int, default=2, help="batch size of the timed steps")
    parser.add_argument("--runs", type=int, default=30, help="repetitions of each inference timing (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default); 1 gives "
                                                                "stable timings on a machine shared with other jobs")
    parser.add_argument("--out", default="figs/bench_train.json", help="results JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.data_dir) if args.data_dir else Path(tmp) / "data"
        if not args.data_dir:
            dump_data(args.base_model, folder)
        data = HiddenStateDataset(folder, max_len=256)
        base = BaseModel.from_pretrained(args.base_model, dtype="fp32", max_len=1)
        results = {"model": args.base_model, "cpu": platform.processor() or platform.machine(),
                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                   "mkldnn_bf16_supported": torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                   "data": {"conversations": len(data), "tokens": sum(data.lengths)}, "train": {}}
        for draft_type in ("clover2", "eagle"):
            results["train"][draft_type] = train_throughput(base, data, draft_type, args.steps, args.bs)
        results["train"]["clover2_bf16_autocast"] = train_throughput(base, data, "clover2", args.bf16_steps, args.bs,
                                                                     bf16=True)
        results["draft_step_ms"] = draft_step_ms(base, args.runs)
        results["matmul_ms"] = matmul_ms(base.args.hidden_size, args.runs)

    print(f"\n{args.base_model} on {results['cpu']} ({results['threads']} threads, {results['cpu_capability']}, native "
          f"bf16: {results['mkldnn_bf16_supported']}); {len(data)} conversations, {results['data']['tokens']} tokens")
    print("training (batch %d)            params (M)  tokens/s  s/step" % args.bs)
    for name, r in results["train"].items():
        print(f"{name:30s} {r['trainable_params_M']:10.2f} {r['tokens_per_s']:9.1f} {r['s_per_step']:7.2f}")
    print(f"one tree level, {ROWS} rows ({CACHE}-entry cache for EAGLE), median of {args.runs} runs (ms):")
    for name, ms in results["draft_step_ms"].items():
        print(f"  {name:30s} {ms:8.3f}")
    print(f"[rows, {base.args.hidden_size}] @ [{base.args.hidden_size}, {4 * base.args.hidden_size}] (ms):")
    print("  rows      fp32      bf16  bf16 autocast")
    for rows, r in results["matmul_ms"].items():
        print(f"  {rows:4d} {r['fp32']:9.3f} {r['bf16']:9.3f} {r['bf16_autocast']:14.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
