"""Decoding speed of an answer file per Spec-Bench group, and the speedup over a baseline answer file.

Two throughputs are reported, per group and overall: ``tok/s total`` = total new tokens / total wall time, and
``tok/s mean`` = the mean of the per-question rates (a question's new tokens / its wall time, all turns together).
With ``--baseline-file`` the speedup is the ratio of the total throughputs (and, also shown, the ratio of the means),
over the questions answered successfully in both files. Failed answers are excluded and counted. With one choice
per question, ``tok/s mean`` is the "Tokens per second" that Spec-Bench's ``evaluation/speed.py`` prints for the same
file. Only ``new_tokens`` and ``wall_time`` are read, which both answer formats (see
:mod:`clover.evaluation.answers`) hold per turn.

    clover speed --answer-file answers/clover.jsonl --baseline-file answers/baseline.jsonl
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Sequence

from clover.args import CloverArgumentParser, add_answer_file, add_option
from clover.errors import CloverError, run_cli
from clover.evaluation.answers import GROUPS, category_group, format_table, is_success, load_answers

_EXCLUSION_TEXT = {
    "failed": "failed in the answers",
    "missing": "missing from the answers",
    "failed_in_baseline": "failed in the baseline",
    "missing_in_baseline": "missing from the baseline",
}


def _base_model(answers: Sequence[dict], what: str) -> str:
    models = sorted({record["base_model"] for record in answers})
    if not models:
        raise CloverError(f"no {what} to measure")
    if len(models) > 1:
        raise CloverError(f"the {what} mix base models {models[0]!r} and {models[1]!r}; "
                          "keep one base model per answer file")
    return models[0]


def _tokens_and_seconds(record: dict) -> tuple[int, float]:
    choices = record["choices"]
    return sum(sum(c["new_tokens"]) for c in choices), sum(sum(c["wall_time"]) for c in choices)


def _rates(records: Sequence[dict]) -> dict:
    """Totals and both throughputs of a non-empty list of successful answers."""
    pairs = [_tokens_and_seconds(record) for record in records]
    tokens = sum(t for t, _ in pairs)
    seconds = sum(s for _, s in pairs)
    return {"questions": len(records), "new_tokens": tokens, "wall_time": seconds,
            "tokens_per_s_total": tokens / seconds, "tokens_per_s_mean": sum(t / s for t, s in pairs) / len(pairs)}


def _exclusion(record: dict | None, base: dict | None, with_baseline: bool) -> str | None:
    """Why a question is left out of the comparison, or None if it counts."""
    if record is None:
        return "missing"
    if not is_success(record):
        return "failed"
    if not with_baseline:
        return None
    if base is None:
        return "missing_in_baseline"
    if not is_success(base):
        return "failed_in_baseline"
    if base["category"] != record["category"]:
        raise CloverError(f"question {record['question_id']} has category {record['category']!r} in the answers but "
                          f"{base['category']!r} in the baseline; compare answers to the same question file")
    return None


def speed_report(answers: Sequence[dict], base_answers: Sequence[dict] | None = None) -> dict:
    """Throughput per group and overall, and with ``base_answers`` the speedup, as a JSON-ready dict.

    Questions are matched by question_id; a question counts only if it succeeded in ``answers`` and, with a
    baseline, also in ``base_answers``. ``excluded`` counts the others by reason.
    """
    base_model = _base_model(answers, "answers")
    with_baseline = base_answers is not None
    if with_baseline:
        base_base_model = _base_model(base_answers, "baseline answers")
        if base_base_model != base_model:
            raise CloverError(f"the answers use base model {base_model!r} but the baseline uses {base_base_model!r}; "
                              "compare answer files generated with the same base model")
    by_id = {record["question_id"]: record for record in answers}
    base_by_id = {record["question_id"]: record for record in base_answers or ()}
    excluded: Counter[str] = Counter()
    kept: list[int] = []
    for qid in sorted(by_id.keys() | base_by_id.keys()):
        reason = _exclusion(by_id.get(qid), base_by_id.get(qid), with_baseline)
        if reason is None:
            kept.append(qid)
        else:
            excluded[reason] += 1
    if not kept:
        raise CloverError("no question was answered successfully" + (" in both files" if with_baseline else ""))

    def entry(qids: list[int]) -> dict:
        stats = _rates([by_id[q] for q in qids])
        if with_baseline:
            base = _rates([base_by_id[q] for q in qids])
            stats.update(base_tokens_per_s_total=base["tokens_per_s_total"],
                         base_tokens_per_s_mean=base["tokens_per_s_mean"],
                         speedup_total=stats["tokens_per_s_total"] / base["tokens_per_s_total"],
                         speedup_mean=stats["tokens_per_s_mean"] / base["tokens_per_s_mean"])
        return stats

    groups = {group: [q for q in kept if category_group(by_id[q]["category"]) == group] for group in GROUPS}
    return {"base_model": base_model,
            "groups": {group: entry(qids) for group, qids in groups.items() if qids},
            "overall": entry(kept),
            "excluded": {reason: excluded[reason] for reason in _EXCLUSION_TEXT if excluded[reason]}}


def format_speed_report(report: dict) -> str:
    """The report as an aligned table with a legend and the exclusions."""
    with_baseline = "speedup_total" in report["overall"]
    headers = ["group", "questions", "tokens", "time_s", "tok/s_total", "tok/s_mean"]
    keys = ["questions", "new_tokens", "wall_time", "tokens_per_s_total", "tokens_per_s_mean"]
    if with_baseline:
        headers += ["base_tok/s_total", "base_tok/s_mean", "speedup_total", "speedup_mean"]
        keys += ["base_tokens_per_s_total", "base_tokens_per_s_mean", "speedup_total", "speedup_mean"]
    rows = [[name] + [stats[k] for k in keys]
            for name, stats in [*report["groups"].items(), ("overall", report["overall"])]]
    lines = [f"base model: {report['base_model']}", format_table(headers, rows),
             "tok/s_total = total new tokens / total wall time; tok/s_mean = mean of per-question tokens/s"]
    if with_baseline:
        lines.append("speedup_total = ratio of tok/s_total to the baseline's; speedup_mean = ratio of tok/s_mean")
    excluded = report["excluded"]
    if excluded:
        reasons = ", ".join(f"{n} {_EXCLUSION_TEXT[reason]}" for reason, n in excluded.items())
        lines.append(f"excluded {sum(excluded.values())} question(s): {reasons}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = CloverArgumentParser(prog="python -m clover.evaluation.speed_spe", description=__doc__.split("\n")[0])
    add_answer_file(parser, also=("--path",), help="answer file (JSON lines) to measure")
    add_option(parser, "--baseline-file", "--base_path", default=None, metavar="FILE",
               help="baseline answer file (e.g. plain decoding) to compute the speedup over")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    report = speed_report(load_answers(args.answer_file),
                          load_answers(args.baseline_file) if args.baseline_file else None)
    print(json.dumps(report, indent=2) if args.json else format_speed_report(report))


if __name__ == "__main__":
    run_cli(main)
