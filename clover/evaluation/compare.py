"""Peers side by side on the same questions, machine and caps: transformers ``generate`` (plain), transformers
prompt-lookup decoding, the project's plain decoding, its training-free sources (prompt lookup, token recycling, both
in one tree), EAGLE-1 and Clover-2, alone and with both sources in their tree. Writes one answer file per method
(resumable), a markdown table and results.json (per method: questions answered, failed with the first error, and
identical to plain decoding; tokens/s, speedup over the project's plain decoding and τ, overall and per group, over
the questions every method answered) and the plots, all under --outdir.

    clover compare --draft runs/clover2 --draft runs/eagle \\
        [--question-file spec_bench_question.jsonl] [--max-new-tokens 128] [--outdir runs/compare]

(``python -m clover.evaluation.compare`` is the same command.)
"""
from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

import torch

from clover.args import (CloverArgumentParser, add_base_model, add_max_new_tokens, add_outdir, add_questions,
                         add_runtime, add_sampling, add_tree)
from clover.errors import CloverError, run_cli
from clover.evaluation.answers import GROUPS, is_success, load_answers
from clover.evaluation.gen_answer import METHODS, generate_answers, method_parts
from clover.generate.sources import SOURCE_NAMES
from clover.io import write_json, write_text
from clover.evaluation.speed_spe import speed_report
from clover.evaluation.tau_spe import tau_report
from clover.model.checkpoint import read_draft_config
from clover.model.loading import DEFAULT_MODEL
from clover.model.registry import draft_class

PEER_LABELS = {"hf": "transformers generate", "hf_pld": "transformers prompt lookup", "baseline": "clover plain"}
SOURCE_LABELS = {"lookup": "lookup", "recycle": "recycling"}
TRAINING_FREE = (*SOURCE_NAMES, "+".join(SOURCE_NAMES))  # compared by default, with or without a checkpoint


def split_tag(method: str) -> tuple[str, str | None]:
    """``(method without its draft's tag, tag or None)``: a second draft of a type is compared under a tagged method,
    its draft's name after ``@`` (``clover@clover2-smollm2-135m-instruct+lookup+recycle``)."""
    parts = method.split("+")
    tags = [part.partition("@")[2] for part in parts if "@" in part]
    if not tags:
        return method, None
    if len(tags) > 1 or not tags[0]:
        raise CloverError(f"method {method!r}: at most one draft, tagged as <method>@<name>")
    return "+".join(part.partition("@")[0] for part in parts), tags[0]


def label(method: str) -> str:
    if method in PEER_LABELS:
        return PEER_LABELS[method]
    untagged, tag = split_tag(method)
    drafted, sources = method_parts(untagged)
    name = [drafted.label + (f" ({tag})" if tag else "")] if drafted else []
    return " + ".join(name + [SOURCE_LABELS[s] for s in sources])


def draft_method(method: str) -> str | None:
    """The key of the trained draft inside ``method`` in :func:`draft_checkpoints` (its method, tagged for a second
    draft of a type; None: no trained draft)."""
    untagged, tag = split_tag(method)
    parts = method_parts(untagged)
    if not parts or not parts[0]:
        return None
    return parts[0].method + (f"@{tag}" if tag else "")


def draft_checkpoints(drafts) -> dict[str, str]:
    """``{key: checkpoint folder or shipped name}`` for ``drafts``: the first draft of a type under its type's method
    (``clover``), every further one under that method tagged with its name (``clover@<name>``: a shipped draft's
    name, else its folder's)."""
    by_key = {}
    for draft in drafts or ():
        cls = draft_class(read_draft_config(draft)["draft_type"], f"{draft}/config.json")
        key, name = cls.method, Path(str(draft)).name
        if key in by_key:
            key = f"{cls.method}@{name}"
            if key in by_key or "+" in name or "@" in name:
                raise CloverError(f"two {cls.label} drafts named {name!r} ({by_key.get(key)} and {draft}); give "
                                  f"each draft a folder name of its own without '+' or '@'")
        by_key[key] = str(draft)
    return by_key


def run_comparison(outdir, base_model=DEFAULT_MODEL, drafts=(), question_file=None, methods=None,
                   max_new_tokens=128, temperature=0.0, tree="dynamic", tree_budget="auto", dtype="auto",
                   device="cpu", figs=None, question_begin=None, question_end=None, warmup=1, progress=True,
                   per_group=None, compile=False) -> dict:
    """Answer the questions with every method (``methods``; default: the peers, the training-free sources alone and
    together, and per checkpoint in ``drafts`` its draft alone and with both sources), then write ``results.json``,
    ``table.md`` and the plots (into ``figs``, default ``outdir``). A method of a draft type that no checkpoint has is
    left out. Speeds and τ are computed over the questions every method answered; each method's failures are
    counted and its first error kept."""
    outdir = Path(outdir)
    checkpoints = draft_checkpoints(drafts)
    if methods is None:
        methods = [*PEER_LABELS, *TRAINING_FREE, *checkpoints,
                   *("+".join((m, *SOURCE_NAMES)) for m in checkpoints)]
    for m in methods:
        method_parts(split_tag(m)[0])  # unknown names are errors
    methods = [m for m in methods if draft_method(m) is None or draft_method(m) in checkpoints]
    if "baseline" not in methods:
        raise CloverError("the comparison needs the 'baseline' method (the project's plain decoding) as reference")
    files = {}
    for method in methods:
        untagged, tag = split_tag(method)
        files[method] = generate_answers(untagged, base_model, outdir / "answers" / f"{method}.jsonl", question_file,
                                         checkpoints.get(draft_method(method)), temperature=temperature,
                                         model_id=f"{Path(str(base_model)).name}-{method}-temperature-{temperature}",
                                         max_new_tokens=max_new_tokens, tree=tree, tree_budget=tree_budget,
                                         dtype=dtype, device=device, question_begin=question_begin,
                                         question_end=question_end, warmup=warmup, progress=progress,
                                         per_group=per_group, compile=compile)
    answers = {method: load_answers(files[method]) for method in methods}
    common = set.intersection(*({a["question_id"] for a in records if is_success(a)} for records in answers.values()))
    plain_turns = {a["question_id"]: a["choices"][0]["turns"] for a in answers["baseline"] if is_success(a)}
    checks = {method: answer_checks(records, plain_turns) for method, records in answers.items()}
    if not common:
        failing = "; ".join(f"{m}: {c['first_error']}" for m, c in checks.items() if c["first_error"])
        raise CloverError(f"no question was answered by every method, so no speed can be compared ({failing}); the "
                          f"answer files are in {outdir / 'answers'}")
    questions = {"file": str(question_file or "shipped"), "begin": question_begin, "end": question_end,
                 "per_group": per_group, "asked": len(answers["baseline"]), "answered_by_every_method": len(common)}
    results = {"date": datetime.date.today().isoformat(), "base_model": str(base_model), "device": device,
               "dtype": dtype, "tree": tree, "tree_budget": tree_budget, "max_new_tokens": max_new_tokens,
               "temperature": temperature, "questions": questions, "compiled_forwards": compile,
               "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
               "methods": {}}
    base = [a for a in answers["baseline"] if a["question_id"] in common]
    for method, records in answers.items():
        kept = [a for a in records if a["question_id"] in common]
        results["methods"][method] = {**checks[method], "speed": speed_report(kept, base), "tau": tau_report(kept)}
    write_json(outdir / "results.json", results, ensure_ascii=False)
    write_text(outdir / "table.md", markdown_table(results) + "\n")
    plot(results, Path(figs or outdir))
    return results


def answer_checks(answers, plain_turns: dict) -> dict:
    """Questions answered and failed (with the first error), answers identical to plain decoding's on the questions
    both answered (greedy decoding must give the same text), and for the project's speculative decoding the mean
    number of tokens verified per step after the prefill. ``plain_turns``: ``{question_id: turns}`` of plain
    decoding's answers."""
    done = [a for a in answers if is_success(a)]
    failed = [a for a in answers if not is_success(a)]
    identical = sum(a["choices"][0]["turns"] == plain_turns.get(a["question_id"]) for a in done)
    verified = steps = 0
    for choice in (c for a in done for c in a["choices"] if "verified_tokens" in c):
        verified += sum(choice["verified_tokens"])
        steps += sum(n - 1 for n in choice["decoding_steps"])  # the prefill of each turn verifies no tree
    return {"answered": len(done), "failed": len(failed),
            "first_error": f"question {failed[0]['question_id']}: {failed[0]['error']}" if failed else None,
            "identical_to_plain": identical, "compared_with_plain": sum(a["question_id"] in plain_turns for a in done),
            "verified_per_step": verified / steps if steps else None}


def markdown_table(results: dict) -> str:
    methods = results["methods"]
    groups = [g for g in GROUPS if g in methods["baseline"]["speed"]["groups"]]
    lines = ["| method | answered | failed | identical to plain | tokens/s | speedup | τ | tokens verified per step | "
             + " | ".join(f"τ {g} | speedup {g}" for g in groups) + " |",
             "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * len(groups)]
    for method, r in methods.items():
        s, t = r["speed"], r["tau"]
        nodes = r["verified_per_step"]
        cells = [label(method), str(r["answered"]), str(r["failed"]),
                 f"{r['identical_to_plain']}/{r['compared_with_plain']}",
                 f"{s['overall']['tokens_per_s_total']:.1f}", f"{s['overall']['speedup_total']:.2f}x",
                 f"{t['overall']['tau']:.2f}", "–" if nodes is None else f"{nodes:.1f}"]
        for g in groups:
            cells += [f"{t['groups'][g]['tau']:.2f}" if g in t["groups"] else "–",
                      f"{s['groups'][g]['speedup_total']:.2f}x" if g in s["groups"] else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    q = results["questions"]
    lines.append("")
    lines.append(f"tokens/s, speedup and τ over the {q['answered_by_every_method']} of {q['asked']} questions every "
                 f"method answered; speedup = total tokens / total time relative to clover plain decoding; τ = tokens "
                 f"per decoding step, bonus token included; identical to plain = answers equal to plain decoding's, "
                 f"of those both answered. {results['date']}, {results['base_model']}, {results['device']} "
                 f"({results['machine']}), dtype {results['dtype']}, tree {results['tree']}, max "
                 f"{results['max_new_tokens']} new tokens, temperature {results['temperature']}"
                 f"{', compiled forwards' if results.get('compiled_forwards') else ''}.")
    failures = [(m, r) for m, r in methods.items() if r["failed"]]
    if failures:
        lines.append("")
        lines += [f"- {label(m)} failed {r['failed']} question(s); first error: {r['first_error']}"
                  for m, r in failures]
    return "\n".join(lines)


def plot(results: dict, figs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs.mkdir(parents=True, exist_ok=True)
    methods = results["methods"]
    groups = [g for g in GROUPS if g in methods["baseline"]["speed"]["groups"]] + ["overall"]
    for key, metric, ylabel, name in (("tau", "tau", "τ (tokens per step)", "tau_per_group.png"),
                                      ("speed", "speedup_total", "speedup over clover plain", "speedup_per_group.png")):
        fig, ax = plt.subplots(figsize=(11, 4.4))
        width = 0.8 / len(methods)
        for i, (method, r) in enumerate(methods.items()):
            rep = r[key]
            values = [(rep["overall"] if g == "overall" else rep["groups"].get(g, {})).get(metric, 0) for g in groups]
            ax.bar([x + i * width for x in range(len(groups))], values, width, label=label(method))
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(groups))], groups, fontsize=8)
        ax.axhline(1.0, color="gray", linewidth=0.6)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{results['base_model']} on {results['device']} ({results['date']})", fontsize=9)
        ax.legend(fontsize=7, ncol=min(len(methods), 5), loc="upper center", bbox_to_anchor=(0.5, -0.1))
        fig.tight_layout()
        fig.savefig(figs / name, dpi=120)
        plt.close(fig)


def build_parser():
    p = CloverArgumentParser(prog="python -m clover.evaluation.compare", description=__doc__)
    add_base_model(p)
    p.add_argument("--draft", action="append", dest="drafts", default=[], metavar="FOLDER|NAME",
                   help="a draft checkpoint folder or shipped draft name, its type read from its config.json; repeat "
                        "for several drafts (a second draft of a type is compared as <method>@<its name>)")
    for old in ("--clover-draft", "--eagle-draft"):  # the old spellings, one flag per draft
        p.add_argument(old, action="append", dest="drafts", help=argparse.SUPPRESS)
    add_questions(p)
    p.add_argument("--methods", default=None,
                   help="comma-separated methods: " + ", ".join(METHODS) + ", or another '+' combination of one "
                        "draft and the sources (default: the peers, lookup, recycle, lookup+recycle, and per --draft "
                        "its draft alone and with lookup+recycle)")
    add_max_new_tokens(p, 128, help="cap per turn, the same for every method")
    add_sampling(p, top=False, seed_help=None)
    add_tree(p)
    add_runtime(p, max_len=None)
    add_outdir(p, "answers/, table.md, results.json and the plots", default="runs/compare")
    p.add_argument("--figs", default=None, metavar="FOLDER",
                   help="write the plots here instead of --outdir (the README's figures: --figs figs)")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    methods = a.methods.split(",") if a.methods else None
    results = run_comparison(a.outdir, a.base_model, a.drafts, a.question_file, methods, a.max_new_tokens,
                             a.temperature, a.tree, a.tree_budget, a.dtype, a.device, a.figs, a.question_begin,
                             a.question_end, per_group=a.per_group, compile=a.compile)
    print(markdown_table(results))


if __name__ == "__main__":
    run_cli(main)
