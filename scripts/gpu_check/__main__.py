"""python -m gpu_check {checks|bench|report} --out DIR [--dry-run] [--budget SECONDS]

``checks`` writes DIR/checks.json, ``bench`` DIR/bench.json; ``report`` merges them (and the environment) into
DIR/gpu_check.json and DIR/gpu_check.md and exits 0 only when every check passed and the benchmark ran. Run through
scripts/gpu_check.sh, which sets PYTHONPATH and runs the parts in order.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from clover import io as clover_io
from gpu_check.common import environment, header, pick_device, test_helpers


def quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:
        pass


def write_json(path: Path, data) -> None:
    clover_io.write_json(path, data, default=str)


def run_checks(args, device) -> int:
    from gpu_check.checks import Context, all_checks

    deadline = time.perf_counter() + args.budget
    helpers = test_helpers()
    results = []
    record = {"part": "checks", "device": str(device), "dry_run": args.dry_run, "budget_s": args.budget,
              "pytest_stand_in": helpers.pytest_stand_in, "checks": results}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = Context(device, args.dry_run, Path(tmp), helpers, time_left=lambda: deadline - time.perf_counter())
        planned = [(name, thunk) for name, thunk in all_checks(ctx)
                   if not args.only or any(name.startswith(p) for p in args.only)]
        record["planned"] = [name for name, _ in planned]  # the report fails any of these that never finished
        for name, thunk in planned:
            start = time.perf_counter()
            entry = {"name": name, "passed": False, "seconds": None, "details": None, "error": None}
            try:
                entry["details"] = thunk()
                entry["passed"] = True
            except Exception as err:  # a failed check is recorded and the next one runs
                entry["error"] = f"{type(err).__name__}: {err}"
                entry["traceback"] = traceback.format_exc()[-4000:]
            if device.type == "cuda":
                torch.cuda.empty_cache()
            entry["seconds"] = round(time.perf_counter() - start, 2)
            results.append(entry)
            status = "PASS" if entry["passed"] else "FAIL"
            print(f"[{status}] {name} ({entry['seconds']:.1f} s)" + ("" if entry["passed"] else f": {entry['error']}"),
                  flush=True)
            write_json(args.out / "checks.json", record)  # partial results survive a kill
    record["seconds"] = round(args.budget - (deadline - time.perf_counter()), 1)
    write_json(args.out / "checks.json", record)
    return 0 if results and all(r["passed"] for r in results) else 1


def run_bench(args, device) -> int:
    from gpu_check import bench

    record = {"part": "bench", "device": str(device), "dry_run": args.dry_run}
    try:
        record["results"] = bench.run(device, args.dry_run)
        record["ok"] = True
    except Exception as err:
        record.update(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-4000:])
        print(record["traceback"], file=sys.stderr)
    write_json(args.out / "bench.json", record)
    print("bench: " + ("done" if record["ok"] else f"FAILED: {record['error']}"), flush=True)
    return 0 if record["ok"] else 1


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# GPU check", "", header(env), ""]
    lines.append(f"dry run: {report['dry_run']}; checks passed: {report['checks_passed']}/{report['checks_total']}; "
                 f"benchmark: {'ran' if report['bench_ok'] else 'FAILED or missing'}; all passed: "
                 f"{report['all_passed']}")
    lines += ["", "## Checks", "", "| check | result | seconds |", "|---|---|---:|"]
    for c in report["checks"]:
        result = "pass" if c["passed"] else "FAIL: " + (c.get("error") or "").splitlines()[0][:120].replace("|", "/")
        lines.append(f"| {c['name']} | {result} | {'-' if c['seconds'] is None else c['seconds']} |")
    b = report.get("bench")
    if b:
        shape = b["shape"]
        lines += ["", f"## Benchmark: random weights, hidden {shape['hidden_size']}, {shape['num_hidden_layers']} "
                      f"layers, {shape['num_attention_heads']} heads, intermediate {shape['intermediate_size']}, "
                      f"vocabulary {shape['vocab_size']}, {b['dtype']} on {b['device']}", ""]
        d = b["decode"]
        lines += ["| plain greedy decoding | tokens/s |", "|---|---:|",
                  f"| clover runtime (`generate_plain`) | {d['clover_tokens_per_s']:.1f} |",
                  f"| transformers `generate` | {d['transformers_tokens_per_s']:.1f} |", "",
                  f"{d['prompt_tokens']}-token prompt, {d['new_tokens']} new tokens, median of {d['runs']} runs; "
                  f"speedup {d['speedup']:.2f}x; identical leading tokens {d['identical_prefix_tokens']}/"
                  f"{d['new_tokens']}.", ""]
        f = b["forward"]
        sizes = list(f["ms"])
        lines += [f"One forward over a {f['cache_tokens']}-token cache (ms, logits at every position):", "",
                  "| tokens | " + " | ".join(sizes) + " |", "|---|" + "---:|" * len(sizes),
                  "| ms | " + " | ".join(f"{f['ms'][s]:.2f}" for s in sizes) + " |",
                  "| vs 1 token | " + " | ".join(f"{f['relative_to_1'][s]:.2f}x" for s in sizes) + " |", ""]
        dr = b["drafts"]
        cols = ["start_1", "start_4", "level_4", "level_8"]
        lines += ["Draft costs (ms; start = feed 1 or 4 committed positions and propose the root's children, level = "
                  "one tree level on 4 or 8 nodes; the LM head over the whole vocabulary included, and in brackets "
                  "without it):", "",
                  "| draft | params (M) | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
        for kind, label in (("clover2", "Clover-2 (extend / RNN head)"), ("eagle", "EAGLE-1 (extend / tree_step)")):
            lines.append(f"| {label} | {dr[kind]['trainable_params_M']} | " + " | ".join(
                f"{_fmt_ms(dr[kind][c]['median_s'])} ({_fmt_ms(dr[kind][c + '_without_lm_head']['median_s'])})"
                for c in cols) + " |")
        lines += ["", f"EAGLE-1 level / Clover-2 level (8 nodes): {dr['eagle_over_clover2_level_8']:.2f}x with the "
                      f"LM head, {dr['eagle_over_clover2_level_8_without_lm_head']:.2f}x without; for scale, one base "
                      f"forward of 1 token costs {f['ms']['1']:.2f} ms. CUDA graphs: {b['cuda_graphs']}."]
    elif report.get("bench_error"):
        lines += ["", f"Benchmark failed: {report['bench_error']}"]
    return "\n".join(lines) + "\n"


def run_report(args, device) -> int:
    def load(name):
        path = args.out / name
        return json.loads(path.read_text()) if path.is_file() else None

    checks, bench = load("checks.json"), load("bench.json")
    env = environment(device)
    results = list(checks["checks"]) if checks else []
    finished = {c["name"] for c in results}
    for name in (checks or {}).get("planned", []):
        if name not in finished:
            results.append({"name": name, "passed": False, "seconds": None, "details": None,
                            "error": "not run: the checks part was stopped before it (time limit or crash)"})
    report = {"environment": env, "dry_run": args.dry_run, "device": str(device), "checks": results,
              "checks_passed": sum(c["passed"] for c in results), "checks_total": len(results),
              "pytest_stand_in": checks.get("pytest_stand_in") if checks else None,
              "bench_ok": bool(bench and bench.get("ok")),
              "bench": bench.get("results") if bench and bench.get("ok") else None,
              "bench_error": (bench or {}).get("error", None if bench else "bench.json missing (not run or killed)")}
    if checks is None:
        report["checks_error"] = "checks.json missing (not run or killed)"
    report["parts"] = args.parts
    report["all_passed"] = (("checks" not in args.parts or (bool(results) and all(c["passed"] for c in results)))
                            and ("bench" not in args.parts or report["bench_ok"]))
    write_json(args.out / "gpu_check.json", report)
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report), flush=True)
    return 0 if report["all_passed"] else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=("checks", "bench", "report"))
    p.add_argument("--out", type=Path, required=True, help="results folder")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    p.add_argument("--budget", type=float, default=240.0,
                   help="seconds for the checks part: the sampling checks run until it is spent (at least 15 s each)")
    p.add_argument("--parts", nargs="+", choices=("checks", "bench"), default=["checks", "bench"],
                   help="report: the parts that were run (and must have passed)")
    p.add_argument("--only", nargs="*", default=None, help="run only the checks whose names start with these")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    quiet_transformers()
    device = pick_device(args.dry_run)
    if args.dry_run:
        torch.set_num_threads(1)  # tiny shapes: one thread is fastest (and shares a busy machine best)
    if args.part != "report":
        print(header(environment(device)), flush=True)
    return {"checks": run_checks, "bench": run_bench, "report": run_report}[args.part](args, device)


if __name__ == "__main__":
    sys.exit(main())
