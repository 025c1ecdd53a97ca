"""Mean accepted length τ of an answer file per Spec-Bench group and overall.

τ = Σ new_tokens / Σ idxs: tokens committed per decoding step (verification forward), the bonus token included,
so plain decoding gives exactly τ = 1.00; τ−1 is the same without the bonus token (draft tokens accepted per step).
The mean of the per-step ``accept_lengths`` (pooled over all steps, as Spec-Bench's ``evaluation/speed.py`` does)
is computed separately and must agree with the counts. Answer files of the current format and those written before
it (nested per-turn ``accept_lengths``) are both read. Failed answers are excluded and counted.

    clover tau --answer-file answers/clover.jsonl      # or: python -m clover.evaluation.tau_spe ...
"""
from __future__ import annotations

import json
from typing import Sequence

from clover.args import CloverArgumentParser, add_answer_file
from clover.errors import CloverError, run_cli
from clover.evaluation.answers import (GROUPS, category_group, flat_accept_lengths, format_table, is_success,
                                       load_answers, turn_accept_lengths)


def _step_counts(record: dict) -> tuple[int, int]:
    """(new tokens, steps) of an answer, checked against its per-step accept lengths."""
    choices = record["choices"]
    tokens, steps = sum(sum(c["new_tokens"]) for c in choices), sum(sum(c["idxs"]) for c in choices)
    accepted = sum(sum(turn) for c in choices for turn in turn_accept_lengths(c))
    n_accepts = sum(len(turn) for c in choices for turn in turn_accept_lengths(c))
    if (accepted, n_accepts) != (tokens, steps):
        raise CloverError(f"question {record['question_id']}: counts disagree: accept_lengths hold {n_accepts} steps "
                          f"committing {accepted} tokens, but idxs sum to {steps} and new_tokens to {tokens}; "
                          "regenerate this answer")
    return tokens, steps


def _tau(name: str, records: Sequence[dict]) -> dict:
    """τ of successful answers from the counts, and the mean of their per-step accept lengths (checked equal)."""
    counts = [_step_counts(record) for record in records]
    tokens = sum(t for t, _ in counts)
    steps = sum(s for _, s in counts)
    if steps == 0:
        raise CloverError(f"{name}: no decoding steps, so τ is undefined")
    accepts = [a for record in records for c in record["choices"] for a in flat_accept_lengths(c)]
    tau = tokens / steps
    return {"questions": len(records), "new_tokens": tokens, "steps": steps, "tau": tau, "tau_minus_1": tau - 1,
            "mean_accept_length": sum(accepts) / len(accepts)}


def tau_report(answers: Sequence[dict]) -> dict:
    """τ (bonus token included) and τ−1 per group and overall as a JSON-ready dict; failed answers are counted.

    Every answer's accept lengths are checked against its counts (CloverError if they disagree), so
    ``mean_accept_length`` equals ``tau``.
    """
    successes = [record for record in answers if is_success(record)]
    if not successes:
        raise CloverError("no successful answers to measure")
    groups = {group: [r for r in successes if category_group(r["category"]) == group] for group in GROUPS}
    return {"groups": {group: _tau(group, records) for group, records in groups.items() if records},
            "overall": _tau("overall", successes),
            "excluded": {"failed": len(answers) - len(successes)}}


def measure_tau(method: str, draft, answer_file, *, base_model: str, question_end: int, max_new_tokens: int,
                tree: str, question_file=None) -> float:
    """τ of ``method`` with ``draft`` (a checkpoint folder or shipped name) on the first ``question_end`` questions
    (default: the shipped set), greedy, fp32, no warm-up, answers written to ``answer_file``: a shipped draft's
    acceptance floor is measured and checked with this."""
    from clover.evaluation.gen_answer import generate_answers

    generate_answers(method, base_model, answer_file, question_file, draft, max_new_tokens=max_new_tokens, tree=tree,
                     question_end=question_end, dtype="fp32", warmup=0, progress=False)
    report = tau_report(load_answers(answer_file))
    if report["excluded"]["failed"]:
        raise CloverError(f"{method} with {draft} failed {report['excluded']['failed']} question(s); see "
                          f"{answer_file}")
    return report["overall"]["tau"]


def format_tau_report(report: dict) -> str:
    """The report as an aligned table with a legend."""
    keys = ["questions", "new_tokens", "steps", "tau", "tau_minus_1"]
    rows = [[name] + [stats[k] for k in keys]
            for name, stats in [*report["groups"].items(), ("overall", report["overall"])]]
    lines = [format_table(["group", "questions", "tokens", "steps", "tau", "tau-1"], rows),
             "tau = new tokens / decoding steps (bonus token included); tau-1 = without the bonus token"]
    if report["excluded"]["failed"]:
        lines.append(f"excluded {report['excluded']['failed']} failed question(s)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = CloverArgumentParser(prog="python -m clover.evaluation.tau_spe", description=__doc__.split("\n")[0])
    add_answer_file(parser, also=("--path",), help="answer file (JSON lines) to measure")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = parser.parse_args(argv)
    report = tau_report(load_answers(args.answer_file))
    print(json.dumps(report, indent=2) if args.json else format_tau_report(report))


if __name__ == "__main__":
    run_cli(main)
