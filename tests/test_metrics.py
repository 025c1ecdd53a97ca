"""Question and answer files, and the speed and τ metrics, checked against hand-computed numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from clover.errors import CloverError
from clover.evaluation.answers import (GROUPS, MT_BENCH_CATEGORIES, answer_record, append_answer, category_group,
                                       current_format, default_question_file, done_question_ids, error_record,
                                       load_answers, load_questions, sort_answer_file, turn_accept_lengths)
from clover.evaluation.speed_spe import speed_report
from clover.evaluation.tau_spe import tau_report

REPO = Path(__file__).resolve().parents[1]


def ok(qid, category, accepts, seconds, method="clover", base_model="tiny"):
    return answer_record(qid, category, model_id=f"tiny-{method}", base_model=base_model, method=method,
                         turns=[f"answer {t}" for t in range(len(accepts))], accept_lengths=accepts,
                         wall_time=seconds, tstamp=1.0)


def failed(qid, category, method="clover", base_model="tiny"):
    return error_record(qid, category, model_id=f"tiny-{method}", base_model=base_model, method=method,
                        error="out of memory", tstamp=1.0)


# Speculative answers: q1 12 tokens / 4 steps / 1.5 s, q2 8 / 4 / 2 s, q3 8 / 2 / 0.5 s, q4 failed, q5 6 / 2 / 1 s.
CLOVER = [
    ok(1, "writing", [[3, 3, 2], [4]], [1.0, 0.5]),
    ok(2, "translation", [[2, 2, 2, 2]], [2.0]),
    ok(3, "translation", [[4, 4]], [0.5]),
    failed(4, "qa"),
    ok(5, "rag", [[3, 3]], [1.0]),
]
# Plain decoding: q1 12 tokens / 3 s, q2 8 / 4 s, q3 8 / 2 s, q4 5 / 1 s, q6 only here; q5 missing.
BASELINE = [
    ok(1, "writing", [[1] * 8, [1] * 4], [2.0, 1.0], method="baseline"),
    ok(2, "translation", [[1] * 8], [4.0], method="baseline"),
    ok(3, "translation", [[1] * 8], [2.0], method="baseline"),
    ok(4, "qa", [[1] * 5], [1.0], method="baseline"),
    ok(6, "math_reasoning", [[1] * 3], [1.0], method="baseline"),
]


# The same five answers as CLOVER, as the writer before flat accept_lengths stored them (nested per turn, no
# decoding_steps): what an existing answer file holds.
LEGACY_CLOVER = [
    {"question_id": 1, "category": "writing", "model_id": "tiny-clover", "base_model": "tiny", "method": "clover",
     "tstamp": 1.0, "choices": [{"index": 0, "turns": ["answer 0", "answer 1"], "new_tokens": [8, 4], "idxs": [3, 1],
                                 "wall_time": [1.0, 0.5], "accept_lengths": [[3, 3, 2], [4]]}]},
    {"question_id": 2, "category": "translation", "model_id": "tiny-clover", "base_model": "tiny", "method": "clover",
     "tstamp": 1.0, "choices": [{"index": 0, "turns": ["answer 0"], "new_tokens": [8], "idxs": [4],
                                 "wall_time": [2.0], "accept_lengths": [[2, 2, 2, 2]]}]},
    {"question_id": 3, "category": "translation", "model_id": "tiny-clover", "base_model": "tiny", "method": "clover",
     "tstamp": 1.0, "choices": [{"index": 0, "turns": ["answer 0"], "new_tokens": [8], "idxs": [2],
                                 "wall_time": [0.5], "accept_lengths": [[4, 4]]}]},
    {"question_id": 4, "category": "qa", "model_id": "tiny-clover", "base_model": "tiny", "method": "clover",
     "tstamp": 1.0, "error": "out of memory"},
    {"question_id": 5, "category": "rag", "model_id": "tiny-clover", "base_model": "tiny", "method": "clover",
     "tstamp": 1.0, "choices": [{"index": 0, "turns": ["answer 0"], "new_tokens": [6], "idxs": [2],
                                 "wall_time": [1.0], "accept_lengths": [[3, 3]]}]},
]

# Multi-turn answers with turns of different lengths (the case where nested accept_lengths are ragged), every
# question successful: a file Spec-Bench's evaluation/speed.py can read as it is.
MULTI_TURN = [
    ok(11, "writing", [[1, 3, 3, 2], [1, 4, 4, 1, 2]], [1.0, 0.75]),
    ok(12, "coding", [[1, 2], [1, 1, 1, 4, 4, 4]], [0.25, 2.0]),
    ok(13, "roleplay", [[1, 4, 4, 4, 4, 3], [1]], [1.5, 0.125]),
    ok(21, "translation", [[1, 2, 2, 2]], [0.5]),
    ok(31, "summarization", [[1, 1, 3]], [0.4]),
    ok(35, "qa", [[1, 3, 1, 3, 2]], [0.8]),
    ok(41, "math_reasoning", [[1, 4, 4, 4, 4, 4, 4]], [1.25]),
    ok(51, "rag", [[1, 2, 1, 2]], [0.6]),
]


def spec_bench_numbers(path: Path, group: str | None = None) -> tuple[float, float]:
    """(mean accepted tokens, tokens per second) of an answer file computed the way Spec-Bench's evaluation/speed.py
    computes them: read every line as JSON, keep the lines of ``group`` (all with None), take only each line's first
    choice, pool its ``accept_lengths`` lists into one list and average it with numpy, and average the per-line rates
    sum(new_tokens) / sum(wall_time)."""
    pooled, rates = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if group is not None and category_group(record["category"]) != group:
                continue
            first = record["choices"][0]
            pooled += first["accept_lengths"]
            rates.append(sum(first["new_tokens"]) / sum(first["wall_time"]))
    return float(np.mean(pooled)), float(np.mean(np.array(rates)))


def write_answers(path: Path, records) -> Path:
    for record in records:
        append_answer(path, record)
    return path


def write_lines(path: Path, objects) -> Path:
    path.write_text("".join(json.dumps(o) + "\n" for o in objects), encoding="utf-8")
    return path


# --- questions -------------------------------------------------------------------------------------------------


def test_category_group():
    assert [category_group(c) for c in MT_BENCH_CATEGORIES] == ["mt_bench"] * 8
    assert [category_group(g) for g in GROUPS[1:]] == list(GROUPS[1:])
    with pytest.raises(CloverError, match="'poetry'.*known categories: writing"):
        category_group("poetry")
    with pytest.raises(CloverError, match="unknown question category 'mt_bench'"):
        category_group("mt_bench")


def test_shipped_questions_load_with_six_groups_of_four():
    questions = load_questions(default_question_file())
    assert len(questions) == 24
    assert len({q["question_id"] for q in questions}) == 24
    by_group = Counter(category_group(q["category"]) for q in questions)
    assert list(by_group) == list(GROUPS) and set(by_group.values()) == {4}
    mt_bench = [q for q in questions if q["category"] in MT_BENCH_CATEGORIES]
    assert len({q["category"] for q in mt_bench}) == 4
    assert all(len(q["turns"]) == 2 for q in mt_bench)
    assert all(len(q["turns"]) == 1 for q in questions if q not in mt_bench)


def test_load_questions_slices_by_position(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [{"question_id": 10 + i, "category": "qa", "turns": ["?"]}
                                              for i in range(5)])
    assert [q["question_id"] for q in load_questions(path, begin=1, end=3)] == [11, 12]
    assert [q["question_id"] for q in load_questions(path, begin=3)] == [13, 14]


def test_load_questions_stratified_subset(tmp_path):
    # 8 qa questions, 4 math_reasoning, 2 MT-bench (writing, coding): 2 per group, evenly spaced, in file order
    rows = [{"question_id": i, "category": "qa", "turns": ["?"]} for i in range(8)]
    rows += [{"question_id": 10 + i, "category": "math_reasoning", "turns": ["?"]} for i in range(4)]
    rows += [{"question_id": 20, "category": "writing", "turns": ["?"]},
             {"question_id": 21, "category": "coding", "turns": ["?"]}]
    path = write_lines(tmp_path / "q.jsonl", rows)
    assert [q["question_id"] for q in load_questions(path, per_group=2)] == [0, 4, 10, 12, 20, 21]
    assert [q["question_id"] for q in load_questions(path, per_group=3)] == [0, 2, 5, 10, 11, 12, 20, 21]
    assert [q["question_id"] for q in load_questions(path, begin=8, per_group=1)] == [10, 20]
    with pytest.raises(CloverError, match="per_group must be >= 1"):
        load_questions(path, per_group=0)


@pytest.mark.parametrize("bad, message", [
    ({"question_id": 2, "category": "qa"}, '"turns" must be a non-empty list'),
    ({"question_id": 2, "category": "qa", "turns": []}, '"turns" must be a non-empty list'),
    ({"question_id": 2, "category": "qa", "turns": ["a", 3]}, "must be a string"),
    ({"category": "qa", "turns": ["a"]}, '"question_id"'),
    ({"question_id": 2, "category": "poetry", "turns": ["a"]}, "unknown question category 'poetry'"),
    ({"question_id": 1, "category": "qa", "turns": ["a"]}, "duplicate question_id 1"),
])
def test_load_questions_rejects_bad_lines_with_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "q.jsonl", [{"question_id": 1, "category": "qa", "turns": ["?"]}, bad])
    with pytest.raises(CloverError, match=f"q.jsonl:2: .*{message}"):
        load_questions(path)


# --- answers ---------------------------------------------------------------------------------------------------


def test_answer_record_derives_counts():
    choice = CLOVER[0]["choices"][0]
    assert choice["new_tokens"] == [8, 4] and choice["idxs"] == [3, 1] and choice["wall_time"] == [1.0, 0.5]
    assert "choices" not in CLOVER[3] and CLOVER[3]["error"] == "out of memory"
    with pytest.raises(CloverError, match="wall_time"):
        ok(1, "qa", [[1]], [0.0])
    with pytest.raises(CloverError, match="accept_lengths"):
        ok(1, "qa", [[2, 0]], [1.0])


def test_answer_record_stores_accept_lengths_flat_and_per_turn():
    choice = CLOVER[0]["choices"][0]
    assert choice["accept_lengths"] == [3, 3, 2, 4]  # flat over the turns, in order (Spec-Bench)
    assert choice["accept_lengths_per_turn"] == [[3, 3, 2], [4]]
    assert choice["decoding_steps"] == choice["idxs"] == [3, 1]
    assert turn_accept_lengths(choice) == [[3, 3, 2], [4]]


def test_invariants_of_every_written_choice(tmp_path):
    path = write_answers(tmp_path / "a.jsonl", CLOVER + MULTI_TURN + BASELINE[:4])
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    choices = [c for record in lines if "choices" in record for c in record["choices"]]
    assert len(choices) == 16
    for c in choices:
        assert sum(c["accept_lengths"]) == sum(c["new_tokens"])
        assert len(c["accept_lengths"]) == sum(c["decoding_steps"])
        assert c["decoding_steps"] == c["idxs"] == [len(turn) for turn in c["accept_lengths_per_turn"]]
        assert c["new_tokens"] == [sum(turn) for turn in c["accept_lengths_per_turn"]]
        assert c["accept_lengths"] == [a for turn in c["accept_lengths_per_turn"] for a in turn]
        assert all(len(c[key]) == len(c["turns"]) for key in ("new_tokens", "idxs", "decoding_steps", "wall_time"))
        assert all(isinstance(a, int) for a in c["accept_lengths"])


def test_spec_bench_reader_agrees_with_tau_and_speed(tmp_path):
    path = write_answers(tmp_path / "clover.jsonl", MULTI_TURN)
    answers = load_answers(path)
    tau, speed = tau_report(answers), speed_report(answers)
    mean_accepted, tokens_per_s = spec_bench_numbers(path)
    assert mean_accepted == pytest.approx(tau["overall"]["tau"], rel=1e-12)
    assert mean_accepted == pytest.approx(tau["overall"]["mean_accept_length"], rel=1e-12)
    assert tokens_per_s == pytest.approx(speed["overall"]["tokens_per_s_mean"], rel=1e-12)
    assert mean_accepted == pytest.approx(113 / 47)  # hand count: 113 tokens in 47 steps
    for group in GROUPS:
        mean_accepted, tokens_per_s = spec_bench_numbers(path, group)
        assert mean_accepted == pytest.approx(tau["groups"][group]["tau"], rel=1e-12)
        assert tokens_per_s == pytest.approx(speed["groups"][group]["tokens_per_s_mean"], rel=1e-12)


def test_legacy_answer_file_gives_the_same_numbers(tmp_path):
    path = write_lines(tmp_path / "old.jsonl", LEGACY_CLOVER)
    answers = load_answers(path)
    assert answers == [CLOVER[0], CLOVER[1], CLOVER[2], CLOVER[3], CLOVER[4]]  # converted to the current format
    assert done_question_ids(path) == {1, 2, 3, 5}
    # the numbers of the hand-computed tests above, from the old file and from the old records themselves
    for records in (answers, LEGACY_CLOVER):
        tau, speed = tau_report(records), speed_report(records)
        assert tau["overall"]["tau"] == pytest.approx(34 / 12) and tau["overall"]["steps"] == 12
        assert tau["overall"]["mean_accept_length"] == tau["overall"]["tau"]
        assert tau["groups"]["translation"]["tau"] == pytest.approx(16 / 6)
        assert speed["overall"]["tokens_per_s_total"] == pytest.approx(6.8)
        assert speed["overall"]["tokens_per_s_mean"] == pytest.approx(8.5)
        assert tau["excluded"] == speed["excluded"] == {"failed": 1}
    assert speed_report(answers, BASELINE) == speed_report(CLOVER, BASELINE)
    assert current_format(LEGACY_CLOVER[0]) == CLOVER[0] and current_format(CLOVER[0]) is CLOVER[0]


def test_resuming_a_legacy_file_rewrites_it_in_the_current_format(tmp_path):
    path = write_lines(tmp_path / "old.jsonl", LEGACY_CLOVER)
    retry = ok(4, "qa", [[1, 2, 3], [1]], [0.5, 0.25])
    append_answer(path, retry)  # what a resumed run appends: the failed question, answered now
    assert done_question_ids(path) == {1, 2, 3, 4, 5}  # the mixed file reads
    sort_answer_file(path)  # what every run ends with
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert lines == [CLOVER[0], CLOVER[1], CLOVER[2], retry, CLOVER[4]]
    mean_accepted, tokens_per_s = spec_bench_numbers(path)
    assert mean_accepted == pytest.approx(tau_report(load_answers(path))["overall"]["tau"])
    assert tokens_per_s == pytest.approx(speed_report(load_answers(path))["overall"]["tokens_per_s_mean"])


@pytest.mark.parametrize("change, message", [
    ({"accept_lengths": [3, 3, 2, 4]}, '"accept_lengths" is a flat list but "accept_lengths_per_turn" is missing'),
    ({"decoding_steps": [3, 1]}, '"decoding_steps" needs "accept_lengths_per_turn"'),
    ({"accept_lengths": [[3, 3], [4]]}, "turn 0: counts disagree"),
])
def test_load_answers_rejects_bad_legacy_choices(tmp_path, change, message):
    bad = json.loads(json.dumps(LEGACY_CLOVER[0]))
    bad["choices"][0].update(change)
    with pytest.raises(CloverError, match=f"a.jsonl:1: .*{message}"):
        load_answers(write_lines(tmp_path / "a.jsonl", [bad]))


@pytest.mark.parametrize("change, message", [
    ({"decoding_steps": [4]}, '"decoding_steps" must equal "idxs"'),
    ({"accept_lengths": [3, 3, 4, 2]}, '"accept_lengths" must be the concatenation'),
    ({"accept_lengths": [[3, 3, 2], [4]]}, '"accept_lengths" must be the concatenation'),
    ({"accept_lengths_per_turn": [[3, 3, 2, 4]]}, "one list of accept lengths per turn"),
])
def test_load_answers_rejects_inconsistent_current_choices(tmp_path, change, message):
    bad = json.loads(json.dumps(CLOVER[0]))
    bad["choices"][0].update(change)
    with pytest.raises(CloverError, match=f"a.jsonl:1: .*{message}"):
        load_answers(write_lines(tmp_path / "a.jsonl", [bad]))


def test_answer_file_round_trip_sorted_last_wins(tmp_path):
    path = write_answers(tmp_path / "a.jsonl", [CLOVER[2], CLOVER[0], CLOVER[3], CLOVER[1]])
    retry = ok(4, "qa", [[2, 1]], [0.25])
    append_answer(path, retry)
    assert load_answers(path) == [CLOVER[0], CLOVER[1], CLOVER[2], retry]


def test_load_answers_rejects_disagreeing_counts(tmp_path):
    broken = json.loads(json.dumps(CLOVER[1]))
    broken["choices"][0]["new_tokens"] = [9]
    path = write_lines(tmp_path / "a.jsonl", [CLOVER[0], broken])
    with pytest.raises(CloverError, match="a.jsonl:2: .*counts disagree"):
        load_answers(path)


def test_load_answers_rejects_error_with_numbers(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [{**CLOVER[0], "error": "boom"}])
    with pytest.raises(CloverError, match='a.jsonl:1: .*exactly one of "choices"'):
        load_answers(path)


def test_empty_answer_file(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(CloverError, match="no answers in .*a.jsonl"):
        load_answers(path)
    assert done_question_ids(path) == set()


def test_done_question_ids_skips_errors(tmp_path):
    path = tmp_path / "a.jsonl"
    assert done_question_ids(path) == set()
    write_answers(path, CLOVER)
    assert done_question_ids(path) == {1, 2, 3, 5}
    append_answer(path, ok(4, "qa", [[1]], [0.1]))
    assert done_question_ids(path) == {1, 2, 3, 4, 5}


def test_sort_answer_file(tmp_path):
    path = write_answers(tmp_path / "a.jsonl", [CLOVER[4], CLOVER[1], CLOVER[0], CLOVER[1]])
    sort_answer_file(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["question_id"] for line in lines] == [1, 2, 5]
    assert list(tmp_path.iterdir()) == [path]


# --- speed -----------------------------------------------------------------------------------------------------


def test_speed_without_baseline():
    report = speed_report(CLOVER)
    assert list(report["groups"]) == ["mt_bench", "translation", "rag"]
    translation = report["groups"]["translation"]
    assert translation["new_tokens"] == 16 and translation["wall_time"] == pytest.approx(2.5)
    assert translation["tokens_per_s_total"] == pytest.approx(6.4)  # 16 tokens / 2.5 s
    assert translation["tokens_per_s_mean"] == pytest.approx(10.0)  # (4 + 16) / 2
    overall = report["overall"]
    assert overall["questions"] == 4
    assert overall["tokens_per_s_total"] == pytest.approx(6.8)  # 34 / 5.0
    assert overall["tokens_per_s_mean"] == pytest.approx(8.5)  # (8 + 4 + 16 + 6) / 4
    assert report["excluded"] == {"failed": 1}
    assert "speedup_total" not in overall


def test_speed_with_baseline():
    report = speed_report(CLOVER, BASELINE)
    assert report["excluded"] == {"failed": 1, "missing": 1, "missing_in_baseline": 1}
    assert list(report["groups"]) == ["mt_bench", "translation"]
    assert report["groups"]["mt_bench"]["speedup_total"] == pytest.approx(2.0)  # 8 / 4 tok/s
    translation = report["groups"]["translation"]
    assert translation["base_tokens_per_s_total"] == pytest.approx(16 / 6)
    assert translation["speedup_total"] == pytest.approx(2.4)  # 6.4 / (16 / 6)
    assert translation["speedup_mean"] == pytest.approx(10 / 3)  # 10 / ((2 + 4) / 2)
    overall = report["overall"]
    assert overall["questions"] == 3
    assert overall["tokens_per_s_total"] == pytest.approx(7.0)  # 28 / 4.0
    assert overall["speedup_total"] == pytest.approx(2.25)  # 7.0 / (28 / 9.0)
    assert overall["speedup_mean"] == pytest.approx(2.8)  # ((8 + 4 + 16) / 3) / ((4 + 2 + 4) / 3)


def test_speed_of_baseline_against_itself_is_one():
    report = speed_report(BASELINE, BASELINE)
    assert report["overall"]["speedup_total"] == 1.0 and report["overall"]["speedup_mean"] == 1.0


def test_speed_rejects_mixed_base_models():
    other = [ok(1, "writing", [[1] * 12], [3.0], method="baseline", base_model="huge")]
    with pytest.raises(CloverError, match="'tiny'.*'huge'"):
        speed_report(CLOVER, other)
    with pytest.raises(CloverError, match="'huge' and 'tiny'"):
        speed_report(CLOVER + [ok(7, "qa", [[1]], [1.0], base_model="huge")])


def test_speed_needs_a_successful_answer():
    with pytest.raises(CloverError, match="no question was answered successfully"):
        speed_report([CLOVER[3]])


# --- tau -------------------------------------------------------------------------------------------------------


def test_tau_hand_computed():
    report = tau_report(CLOVER)
    assert report["groups"]["mt_bench"]["tau"] == 3.0  # 12 tokens / 4 steps
    translation = report["groups"]["translation"]
    assert (translation["new_tokens"], translation["steps"]) == (16, 6)
    assert translation["tau"] == pytest.approx(16 / 6)
    overall = report["overall"]
    assert overall["tau"] == pytest.approx(34 / 12)  # not the mean of per-question τ, which is 3.0
    assert overall["tau_minus_1"] == pytest.approx(22 / 12)
    assert overall["mean_accept_length"] == overall["tau"]
    assert report["excluded"] == {"failed": 1}


def test_tau_of_plain_decoding_is_exactly_one():
    report = tau_report(BASELINE)
    assert report["overall"]["tau"] == 1.0 and report["overall"]["tau_minus_1"] == 0.0
    assert all(stats["tau"] == 1.0 for stats in report["groups"].values())


def test_tau_rejects_disagreeing_counts():
    broken = json.loads(json.dumps(CLOVER[2]))
    broken["choices"][0]["idxs"] = [3]
    with pytest.raises(CloverError, match="question 3: counts disagree"):
        tau_report([CLOVER[0], broken])


# --- command lines ---------------------------------------------------------------------------------------------


def run_module(module, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_speed_and_tau(tmp_path):
    answers = write_answers(tmp_path / "clover.jsonl", CLOVER)
    baseline = write_answers(tmp_path / "baseline.jsonl", BASELINE)

    speed = run_module("clover.evaluation.speed_spe", "--path", answers, "--base_path", baseline)
    assert speed.returncode == 0, speed.stderr
    assert "translation" in speed.stdout and "6.40" in speed.stdout and "2.40" in speed.stdout
    assert "2.25" in speed.stdout and "2.80" in speed.stdout
    assert "excluded 3 question(s)" in speed.stdout

    speed_json = run_module("clover.evaluation.speed_spe", "--path", answers, "--json")
    assert json.loads(speed_json.stdout)["overall"]["tokens_per_s_total"] == pytest.approx(6.8)

    tau = run_module("clover.evaluation.tau_spe", "--path", answers)
    assert tau.returncode == 0, tau.stderr
    assert "2.83" in tau.stdout and "1.83" in tau.stdout and "tau-1" in tau.stdout

    empty = tmp_path / "empty.jsonl"
    empty.touch()
    failure = run_module("clover.evaluation.tau_spe", "--path", empty)
    assert failure.returncode == 2 and failure.stderr.startswith("error: no answers in")


def test_cli_upgrade_and_legacy_files(tmp_path):
    old = write_lines(tmp_path / "old.jsonl", LEGACY_CLOVER)
    tau = run_module("clover.evaluation.tau_spe", "--path", old)
    assert tau.returncode == 0, tau.stderr
    assert "2.83" in tau.stdout and "1.83" in tau.stdout  # the numbers of the current-format file

    upgrade = run_module("clover.evaluation.answers", "--upgrade", old)
    assert upgrade.returncode == 0, upgrade.stderr
    lines = [json.loads(line) for line in old.read_text(encoding="utf-8").splitlines()]
    assert lines == CLOVER
    missing = run_module("clover.evaluation.answers", "--upgrade", tmp_path / "nothing.jsonl")
    assert missing.returncode == 2 and "file not found" in missing.stderr
