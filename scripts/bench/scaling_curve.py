"""The scaling curve of one long training run: held-out top-1 per head (the trainer's ``evals.jsonl``) and τ on
Spec-Bench (``--per-group`` questions of each category, greedy) with a fixed tree and the ``auto`` tree, at the
run's snapshots, against tokens seen, for each draft of the run.

    python scripts/bench/scaling_curve.py --run runs/scaling_v1 --drafts clover2,eagle \\
        --question-file spec_bench_question.jsonl [--per-group 10] [--steps 64,128,256,final] \\
        [--trees mc_sim_7b_63,auto] [--max-new-tokens 128] [--jobs 2]

``--run`` holds one trainer ``--outdir`` per draft (``RUN/clover2``, ``RUN/eagle``: the same conversations and seed,
so the same batches), each with ``snapshots/step_{n}/`` (``--snapshot-every``) and ``final/``.

τ comes by replay (:mod:`clover.evaluation.replay`: the base model's greedy answers are decoded once into
``RUN/curve/reference.jsonl``, then replayed through each draft; answers in ``RUN/curve/<draft>/<step>_<tree>_replay
.jsonl``), or with ``--decode`` by speculative decoding itself (``<step>_<tree>.jsonl``); where a point has both,
the table shows both. Answer files resume; ``--jobs 2`` answers with two one-thread processes side by side (the
fixed tree's τ does not depend on time, so the processes may share the cores; the ``auto`` tree's step sizes do, a
little). Prints a table with the CPU model and flags, writes ``--json`` (default figs/scaling_curve.json) and
``--fig`` (figs/scaling_curve.png).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

from clover.args import CloverArgumentParser, add_questions, positive_int
from clover.errors import CloverError, run_cli
from clover.evaluation.answers import is_success, load_answers
from clover.evaluation.tau_spe import tau_report
from clover.io import read_jsonl, write_json
from clover.model.registry import draft_class
from machine import cpu_flags, cpu_model  # scripts/bench/machine.py, beside this script

TREES = {"mc_sim_7b_63": ["--tree", "mc_sim_7b_63"], "auto": ["--tree", "dynamic", "--tree-budget", "auto"]}


def checkpoints(cpdir: Path, steps: list[str], final: str | None = None) -> dict[str, Path | str]:
    """``{step label: draft folder}``: the snapshots named in ``steps`` (numbers) and ``final`` (the run's final/,
    or the draft ``final`` names: its shipped copy)."""
    found = {}
    for step in steps:
        if step == "final" and final:
            found[step] = final
            continue
        folder = cpdir / "final" if step == "final" else cpdir / "snapshots" / f"step_{step}"
        if not (folder / "config.json").is_file():
            raise CloverError(f"{folder} is missing: pass --steps among the run's snapshots "
                              f"({', '.join(p.name for p in sorted((cpdir / 'snapshots').glob('step_*')))}) or final")
        found[step] = folder
    return found


def tokens_at(cpdir: Path, step: str) -> float:
    """Tokens seen at a snapshot step (from the evaluation lines, which record them) or at the end."""
    lines = read_jsonl(cpdir / "evals.jsonl") + read_jsonl(cpdir / "metrics.jsonl")
    if step == "final":
        return read_jsonl(cpdir / "metrics.jsonl")[-1]["tokens"]
    match = [line["tokens"] for line in lines if line["step"] == int(step)]
    if not match:
        raise CloverError(f"{cpdir}: no evaluation at step {step} records its tokens; snapshot at --eval-every steps")
    return match[0]


def answer(job: tuple, args, threads: int) -> Path:
    """Answer the questions with one draft folder and tree (a one-thread subprocess; resumes its answer file): by
    replay (``--reference-file``: the base model's greedy answers, shared by every job) or by decoding."""
    draft_type, folder, tree, out = job
    common = ["--method", draft_class(draft_type).method, "--draft", str(folder), "--answer-file", str(out),
              "--max-new-tokens", str(args.max_new_tokens), "--per-group", str(args.per_group), "--dtype", "fp32",
              *TREES[tree]]
    if args.decode:
        cmd = [sys.executable, "-m", "clover.evaluation.gen_answer", *common, "--warmup", "0"]
    else:
        cmd = [sys.executable, "-m", "clover.evaluation.replay", *common,
               "--reference-file", str(args.run / "curve" / "reference.jsonl")]
    if args.question_file:
        cmd += ["--question-file", args.question_file]
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CloverError(f"answering with {folder} ({tree}) failed: {proc.stderr.strip().splitlines()[-1:]}")
    return out


def check_replay(replay, decoded) -> dict:
    """τ by replay and by decoding over the questions both files answered, and on how many of them every step's
    accept length agrees."""
    a = {r["question_id"]: r for r in load_answers(replay) if is_success(r)}
    b = {r["question_id"]: r for r in load_answers(decoded) if is_success(r)}
    common = sorted(set(a) & set(b))
    same = sum(a[q]["choices"][0]["accept_lengths"] == b[q]["choices"][0]["accept_lengths"] for q in common)
    tau = {key: tau_report([records[q] for q in common])["overall"]["tau"] if common else float("nan")
           for key, records in (("replay", a), ("decoded", b))}
    return {**tau, "questions": len(common), "same_accept_lengths": same}


def answer_name(step: str, tree: str, decode: bool) -> str:
    return f"{step}_{tree}.jsonl" if decode else f"{step}_{tree}_replay.jsonl"


def main(argv=None) -> None:
    p = CloverArgumentParser(prog="python scripts/bench/scaling_curve.py", description=__doc__)
    p.add_argument("--run", type=Path, required=True, help="folder with one trainer --outdir per draft")
    p.add_argument("--drafts", default="clover2,eagle", help="the drafts' folder names in --run (default both)")
    p.add_argument("--steps", default=None,
                   help="comma-separated snapshot steps for τ, and final (default: every snapshot and final)")
    p.add_argument("--trees", default=",".join(TREES), help=f"trees for τ: {', '.join(TREES)} (default both)")
    p.add_argument("--final-drafts", default="", metavar="DRAFT=NAME,...",
                   help="for the final point, these drafts instead of the runs' final/ (e.g. eagle=eagle-smollm2-"
                        "135m-instruct: the shipped bf16 copy)")
    add_questions(p, subset=False)
    p.add_argument("--per-group", type=positive_int, default=10, metavar="N",
                   help="questions of each Spec-Bench category (default 10: Spec-Bench 60)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, metavar="N", help="cap per turn")
    p.add_argument("--jobs", type=positive_int, default=1, help="answering processes side by side")
    p.add_argument("--decode", action="store_true",
                   help="measure τ by decoding (gen_answer) instead of by replay (clover.evaluation.replay: the "
                        "base model's greedy answers, decoded once, replayed through each draft)")
    p.add_argument("--json", type=Path, default=Path("figs/scaling_curve.json"))
    p.add_argument("--fig", type=Path, default=Path("figs/scaling_curve.png"))
    args = p.parse_args(argv)
    trees = args.trees.split(",")
    for tree in trees:
        if tree not in TREES:
            raise CloverError(f"--trees: unknown tree {tree!r}; choose among {', '.join(TREES)}")
    result = {"date": date.today().isoformat(), "cpu": cpu_model(), "flags": cpu_flags(), "run": str(args.run),
              "tau_by": "decoding" if args.decode else "replay",
              "questions": {"file": args.question_file or "shipped", "per_group": args.per_group,
                            "max_new_tokens": args.max_new_tokens}, "drafts": {}}
    finals = dict(item.split("=", 1) for item in args.final_drafts.split(",") if item)
    jobs = []
    for name in args.drafts.split(","):
        cpdir = args.run / name
        snaps = sorted(int(p.name.split("_")[1]) for p in (cpdir / "snapshots").glob("step_*"))
        some = cpdir / "final" if (cpdir / "final").is_dir() else cpdir / "snapshots" / f"step_{snaps[0]}"
        draft_type = json.loads((some / "config.json").read_text())["draft_type"]
        steps = args.steps.split(",") if args.steps else [*map(str, snaps), "final"]
        evals = read_jsonl(cpdir / "evals.jsonl") + read_jsonl(cpdir / "metrics.jsonl")[-1:]  # the end's, if any
        heads = sorted(int(k.rsplit("_", 1)[1]) for k in evals[-1] if k.startswith("test_top1_"))
        result["drafts"][name] = {
            "draft_type": draft_type, "final": finals.get(name, str(cpdir / "final")),
            "held_out": [{"step": e["step"], "tokens": e["tokens"], "top1": [e[f"test_top1_{h}"] for h in heads]}
                         for e in evals],
            "tau": []}
        for step, folder in checkpoints(cpdir, steps, finals.get(name)).items():
            for tree in trees:
                out = args.run / "curve" / name / answer_name(step, tree, args.decode)
                jobs.append((draft_type, folder, tree, out))
                result["drafts"][name]["tau"].append({"step": step, "tokens": tokens_at(cpdir, step), "tree": tree,
                                                      "answers": str(out)})
    cores = os.cpu_count() or 1
    rest = jobs
    if jobs and not args.decode:  # the first replay, alone, decodes the reference answers that all the others read
        answer(jobs[0], args, cores)
        rest = jobs[1:]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: answer(job, args, max(1, cores // args.jobs)), rest))
    print(f"{cpu_model()}; flags {' '.join(cpu_flags())}")
    print(f"τ {'by decoding' if args.decode else 'by replay'}; 'check': where {args.run / 'curve'} also has the "
          f"point measured the other way, τ by replay / by decoding on the questions both answered")
    print(f"{'draft':8} {'step':>6} {'tokens':>10} {'tree':>13} {'τ':>6}  check")
    for name, d in result["drafts"].items():
        for point in d["tau"]:
            point["tau"] = tau_report(load_answers(point["answers"]))["overall"]["tau"]
            other = Path(point["answers"]).with_name(answer_name(point["step"], point["tree"], not args.decode))
            check = ""
            if other.is_file():  # the same point measured the other way: replay against decoding
                replay, decoded = (other, point["answers"]) if args.decode else (point["answers"], other)
                point["check"] = check_replay(replay, decoded)
                check = ("{replay:.3f} / {decoded:.3f} ({questions} questions, {same_accept_lengths} with every "
                         "step's accept length equal)").format(**point["check"])
            print(f"{name:8} {point['step']:>6} {point['tokens']:>10.0f} {point['tree']:>13} {point['tau']:>6.3f}  "
                  f"{check}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, result)
    plot(result, args.fig)
    print(f"wrote {args.json} and {args.fig}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top1, tau) = plt.subplots(1, 2, figsize=(11, 4))
    for name, d in result["drafts"].items():
        points = d["held_out"]
        for head in range(len(points[-1]["top1"])):
            top1.plot([p["tokens"] / 1e6 for p in points], [p["top1"][head] for p in points], marker=".",
                      label=f"{name} head {head}" if head < 3 else None, alpha=1.0 - 0.15 * head)
        for tree in sorted({p["tree"] for p in d["tau"]}):
            pts = [p for p in d["tau"] if p["tree"] == tree]
            tau.plot([p["tokens"] / 1e6 for p in pts], [p["tau"] for p in pts], marker="o", label=f"{name}, {tree}")
    top1.set_xlabel("tokens seen (millions)")
    top1.set_ylabel("held-out top-1")
    top1.legend(fontsize=7)
    tau.set_xlabel("tokens seen (millions)")
    tau.set_ylabel("τ, Spec-Bench (tokens per step)")
    tau.legend(fontsize=7)
    fig.suptitle(f"{result['run']}: {result['cpu']} ({result['date']})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    run_cli(main)
