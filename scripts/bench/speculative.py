"""Benchmark: plain decoding, EAGLE-1 and Clover-2 (fixed tree, dynamic tree with a fixed budget, dynamic tree with
the `auto` budget) on the same questions, in one run, in fp32 and bf16, plus transformers generate and prompt-lookup
decoding as peers. Reports tokens/s (median over --runs passes), τ (tokens per step, bonus token included), speedups
over the project's plain decoding and over transformers, and, per dtype, how many outputs are token-identical to plain
decoding. Writes figs/bench_speculative.json and prints a table.

``--breakdown`` instead profiles the steps of each draft with the dynamic ``auto`` tree in fp32 (``step_profile.py``:
base forward, draft calls and their matmul share, tree building, verification, commit, the rest, host syncs) on the
first ``--breakdown-prompts`` shipped questions, and writes figs/bench_step_breakdown.json. ``--compile`` runs
every method of the project on the compiled decoding forwards (``BaseModel.compile_decode``; compiled per method).

    python scripts/bench/speculative.py --clover-draft runs/pipeline/full/ckpt/clover2/final \\
        --eagle-draft runs/pipeline/full/ckpt/eagle/final [--question-file Q --per-group 2] [--runs 3]
    python scripts/bench/speculative.py --clover-draft C --eagle-draft E --breakdown
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clover.args import (CloverArgumentParser, add_base_model, add_max_new_tokens, add_option, add_questions,
                         positive_int)
from clover.evaluation.answers import load_answers
from clover.evaluation.gen_answer import generate_answers
from clover.evaluation.tau_spe import tau_report
from machine import cpu_flags, cpu_model  # noqa: E402  (scripts/bench/machine.py, beside this script)


def configs(args):
    yield "transformers generate", "hf", None, "mc_sim_7b_63", "auto"
    yield "transformers prompt lookup", "hf_pld", None, "mc_sim_7b_63", "auto"
    yield "clover plain", "baseline", None, "mc_sim_7b_63", "auto"
    for label, method, draft in (("EAGLE-1", "eagle", args.eagle_draft), ("Clover-2", "clover", args.clover_draft)):
        if draft:
            yield f"{label} fixed mc_sim_7b_63", method, draft, "mc_sim_7b_63", "auto"
            yield f"{label} dynamic budget {args.tree_budget}", method, draft, "dynamic", str(args.tree_budget)
            yield f"{label} dynamic auto", method, draft, "dynamic", "auto"


def main():
    p = CloverArgumentParser(description=__doc__)
    add_base_model(p)
    p.add_argument("--clover-draft", default=None, help="Clover-2 checkpoint (omit to leave it out)")
    p.add_argument("--eagle-draft", default=None, help="EAGLE-1 checkpoint (omit to leave it out)")
    add_questions(p)
    add_max_new_tokens(p, 96, help="cap per turn, the same for every method")
    add_option(p, "--tree-budget", "--budget", "--total-token", type=positive_int, default=10, metavar="N",
               help="node budget of the fixed-budget dynamic tree (default 10; 'auto' always runs too)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated dtypes to run")
    p.add_argument("--runs", type=positive_int, default=3, help="passes over all methods; tokens/s is their median")
    p.add_argument("--out", default=None, help="results JSON (default figs/bench_speculative.json, with "
                   "--breakdown figs/bench_step_breakdown.json)")
    p.add_argument("--breakdown", action="store_true", help="profile the speculative steps instead (see above)")
    p.add_argument("--breakdown-prompts", type=positive_int, default=6, help="questions profiled (default 6)")
    p.add_argument("--compile", action="store_true",
                   help="compile the base model's decoding forwards first (BaseModel.compile_decode), every method")
    args = p.parse_args()
    print(f"CPU: {cpu_model()} ({platform.machine()}), flags {' '.join(cpu_flags()) or '-'}; "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}", flush=True)
    if args.breakdown:
        return breakdown(args)
    args.out = args.out or "figs/bench_speculative.json"
    results = {"model": args.base_model, "cpu": cpu_model(), "cpu_flags": cpu_flags(),
               "machine": f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}, "
               f"{torch.get_num_threads()} threads, torch {torch.__version__}", "max_new_token": args.max_new_tokens,
               "question_file": args.question_file or "shipped", "question_begin": args.question_begin,
               "question_end": args.question_end,
               "per_group": args.per_group, "runs": args.runs, "compiled": args.compile,
               "dtypes": {}}
    work = Path(tempfile.mkdtemp(prefix="clover-bench-"))
    for dtype in args.dtypes.split(","):
        rows, rates, files = {}, {}, {}
        for r in range(args.runs):  # runs interleave the methods, so machine noise hits them alike
            for label, method, draft, tree, budget in configs(args):
                f = work / dtype / f"{label.replace(' ', '_')}_{r}.jsonl"
                generate_answers(method, args.base_model, f, args.question_file, draft,
                                 max_new_token=args.max_new_tokens, tree=tree, total_token=budget, dtype=dtype,
                                 question_begin=args.question_begin, question_end=args.question_end,
                                 per_group=args.per_group, progress=False, compile=args.compile)
                answers = load_answers(f)
                tokens = sum(sum(c["new_tokens"]) for a in answers for c in a["choices"])
                seconds = sum(sum(c["wall_time"]) for a in answers for c in a["choices"])
                rates.setdefault(label, []).append(tokens / seconds)
                files.setdefault(label, []).append(f)
                print(f"{dtype} run {r + 1}/{args.runs} {label:34s} {tokens / seconds:7.2f} tok/s", flush=True)
        for label, f in files.items():
            answers = load_answers(f[0])
            rows[label] = {"tokens_per_s": statistics.median(rates[label]), "all_runs": rates[label],
                           "tau": tau_report(answers)["overall"]["tau"],
                           "texts": [c["turns"] for a in answers for c in a["choices"]]}
        plain, hf = rows["clover plain"], rows["transformers generate"]
        for row in rows.values():
            row["speedup_vs_plain"] = row["tokens_per_s"] / plain["tokens_per_s"]
            row["speedup_vs_transformers"] = row["tokens_per_s"] / hf["tokens_per_s"]
            row["speedup_vs_prompt_lookup"] = row["tokens_per_s"] / rows["transformers prompt lookup"]["tokens_per_s"]
            row["identical_to_plain"] = sum(a == b for a, b in zip(row["texts"], plain["texts"]))
            row["outputs"] = len(row["texts"])
        results["dtypes"][dtype] = {k: {kk: vv for kk, vv in v.items() if kk != "texts"} for k, v in rows.items()}
    print("\n| dtype | method | tokens/s | τ | vs plain | vs transformers | vs prompt lookup | identical to plain |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for dtype, rows in results["dtypes"].items():
        for label, r in rows.items():
            print(f"| {dtype} | {label} | {r['tokens_per_s']:.1f} | {r['tau']:.2f} | {r['speedup_vs_plain']:.2f}x | "
                  f"{r['speedup_vs_transformers']:.2f}x | {r['speedup_vs_prompt_lookup']:.2f}x | "
                  f"{r['identical_to_plain']}/{r['outputs']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out} ({results['machine']})")


def breakdown(args):
    """Per draft, and for the training-free sources alone and with each draft: where the time of a speculative step
    goes (dynamic ``auto`` tree, fp32)."""
    from clover.data.templates import get_template
    from clover.evaluation.answers import default_question_file, load_questions
    from clover.generate.speculative import SpeculativeModel
    from step_profile import PHASES, step_breakdown

    out = Path(args.out or "figs/bench_step_breakdown.json")
    results = {"model": args.base_model, "cpu": cpu_model(), "cpu_flags": cpu_flags(),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": "fp32",
               "tree": "dynamic auto", "max_new_tokens": args.max_new_tokens, "compiled": args.compile, "drafts": {}}
    both = ["lookup", "recycle"]
    setups = [("lookup + recycling", None, both)]
    for label, draft in (("EAGLE-1", args.eagle_draft), ("Clover-2", args.clover_draft)):
        if draft:
            setups += [(label, draft, []), (f"{label} + lookup + recycling", draft, both)]
    for label, draft, sources in setups:
        model = SpeculativeModel.from_pretrained(args.base_model, draft, dtype="fp32", max_len=2048,
                                                 tree="dynamic", tree_budget="auto", compile=args.compile,
                                                 sources=sources)
        template = get_template(model.tokenizer)
        questions = load_questions(args.question_file or default_question_file())[:args.breakdown_prompts]
        prompts = [template.encode_prompt([{"role": "user", "content": q["turns"][0]}]) for q in questions]
        results["drafts"][label] = row = step_breakdown(model, prompts, args.max_new_tokens)
        ms, mm = row["per_step_ms"], row["matmul_ms_per_step"]
        draft_ms = ms["draft start"] + ms["draft expand"]
        draft_mm = mm.get("draft start", 0.0) + mm.get("draft expand", 0.0)
        overhead = row["step_ms"] - ms["base forward"] - draft_mm
        row["overhead_ms"], row["overhead_share"] = overhead, overhead / row["step_ms"]
        print(f"\n{label}: {row['steps']} steps, τ {row['tau']:.2f}, {row['step_ms']:.1f} ms per step "
              f"(prefills excluded)")
        print("| phase | ms per step | share of the step | of which matmuls (ms, profiled) |")
        print("|---|---:|---:|---:|")
        for phase in PHASES + ("other",):
            print(f"| {phase} | {ms[phase]:.2f} | {ms[phase] / row['step_ms']:.1%} | {mm.get(phase, 0.0):.2f} |")
        print(f"draft calls {draft_ms:.2f} ms, of which matmuls {draft_mm:.2f} ms; everything but the base forward "
              f"and the draft's matmuls: {overhead:.2f} ms = {row['overhead_share']:.1%} of the step; host reads per "
              f"step: {sum(row['host_syncs_per_step'].values()):.2f} item()/int() {row['host_syncs_per_step']}, plus "
              f"the verification's one .tolist()")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
