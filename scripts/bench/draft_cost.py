"""What drafting costs each draft on this CPU: Clover-2's trunk and regressive heads against EAGLE-1's decoder layer,
at SmolLM2-135M's shape (the embedded model) and at Vicuna-7B's (hidden 4096, vocabulary 32,000; a base of one random
layer stands in for the 7B model, which does not fit this machine in fp32: a draft reads only the base's sizes,
embeddings and LM head, so its cost is the same).

    python scripts/bench/draft_cost.py [--shapes smollm2,vicuna7b] [--reps 10]

The measurement is the GPU check's (``scripts/gpu_check/bench.py``, ``draft_costs``), here in fp32 on the CPU: after a
512-position draft cache, a start on 1 and 4 new positions (``runner.start``) and one tree level on 4 and 8 nodes
(``runner.expand``), each with the LM head over the whole vocabulary and without it (the draft's own layers alone:
what the Clover-2 paper compares when it reports its regressive heads up to 9.3% faster than a decoder layer).
Prints a table with the CPU model and flags and writes ``--out`` (default figs/bench_draft_cost.json).
"""
from __future__ import annotations

import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/, for the GPU check's measurement

from gpu_check.bench import CACHE, VICUNA_7B, build_models, draft_costs  # noqa: E402

from clover.args import CloverArgumentParser  # noqa: E402
from clover.errors import run_cli  # noqa: E402
from clover.io import write_json  # noqa: E402
from clover.model.base import BaseModel  # noqa: E402
from machine import cpu_flags, cpu_model  # noqa: E402  (scripts/bench/machine.py, beside this script)


def base_for(shape: str) -> BaseModel:
    if shape == "smollm2":
        return BaseModel.from_pretrained("smollm2-135m-instruct", dtype="fp32", max_len=CACHE + 256)
    _, base = build_models({**VICUNA_7B, "num_hidden_layers": 1}, torch.float32, torch.device("cpu"),
                           max_len=CACHE + 256)
    return base


def main(argv=None) -> None:
    p = CloverArgumentParser(prog="python scripts/bench/draft_cost.py", description=__doc__)
    p.add_argument("--shapes", default="smollm2,vicuna7b", help="comma-separated: smollm2, vicuna7b")
    p.add_argument("--reps", type=int, default=10, help="timed calls per number (median)")
    p.add_argument("--out", default="figs/bench_draft_cost.json", help="results JSON")
    args = p.parse_args(argv)
    print(f"CPU: {cpu_model()}, flags {' '.join(cpu_flags())}; {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, fp32")
    results = {"date": str(date.today()), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": "fp32", "shapes": {}}
    for shape in args.shapes.split(","):
        base = base_for(shape)
        with torch.inference_mode():
            res = draft_costs(base, args.reps, torch.device("cpu"), torch.float32)
        results["shapes"][shape] = {"hidden_size": base.args.hidden_size, "vocab_size": base.args.vocab_size, **res}
        print(f"\n{shape} (hidden {base.args.hidden_size}, vocabulary {base.args.vocab_size}), ms per call (median "
              f"of {args.reps}), with the LM head / without it:")
        keys = [k for k in res["clover2"] if k.startswith(("start_", "level_")) and "without" not in k]
        print("| draft | " + " | ".join(keys) + " |")
        print("|---|" + "---:|" * len(keys))
        for kind in ("clover2", "eagle"):
            r = res[kind]
            cells = (f"{1e3 * r[k]['median_s']:.2f} / {1e3 * r[k + '_without_lm_head']['median_s']:.2f}" for k in keys)
            print(f"| {kind} | " + " | ".join(cells) + " |")
        print(f"EAGLE-1 / Clover-2, one level of 8 nodes: {res['eagle_over_clover2_level_8']:.2f} with the LM head, "
              f"{res['eagle_over_clover2_level_8_without_lm_head']:.2f} without")
        del base
    write_json(args.out, results)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
