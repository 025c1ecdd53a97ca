"""Spec-Bench question files and answer files: loading, validation, building, appending and resuming.

A question is one JSON line ``{"question_id": int, "category": str, "turns": [str, ...], "reference": ...}``.
Its category maps to one of six groups (:data:`GROUPS`); MT-bench's eight categories form the ``mt_bench`` group.

An answer is one JSON line per question::

    {"question_id", "category", "model_id", "base_model", "method", "tstamp",
     "choices": [{"index": 0, "turns": [str], "new_tokens": [int], "idxs": [int], "decoding_steps": [int],
                  "wall_time": [float], "accept_lengths": [int, ...], "accept_lengths_per_turn": [[int, ...], ...]}]}

``turns``, ``new_tokens``, ``idxs``, ``decoding_steps`` and ``wall_time`` have one entry per turn: the answer text,
tokens generated, decoding steps, seconds. A decoding step is a forward pass that commits tokens: the prefill (which
yields the first token) and every verification step after it; ``idxs`` is the name the original Clover scripts read,
``decoding_steps`` the one Spec-Bench writes, and both hold the same counts. ``accept_lengths_per_turn[t]`` lists the
tokens committed by each step of turn ``t``, bonus token included, so ``sum(accept_lengths_per_turn[t]) ==
new_tokens[t]`` and ``len(accept_lengths_per_turn[t]) == idxs[t]``. ``accept_lengths`` is the same numbers as one flat
list over the turns in order, Spec-Bench's convention (its ``evaluation/speed.py`` averages the concatenation over
questions), so per choice ``sum(accept_lengths) == sum(new_tokens)`` and ``len(accept_lengths) ==
sum(decoding_steps)``. A question whose generation failed has ``"error": "message"`` instead of ``choices`` and
carries no numbers.

Files written before the flat list was introduced hold ``accept_lengths`` nested per turn and no ``decoding_steps``
or ``accept_lengths_per_turn``. They are still read (:func:`turn_accept_lengths` gives the per-turn split of either
format), loaded records are converted to the current format, and rewriting a file (:func:`sort_answer_file`, which
every generation run that answers a question ends with, or ``python -m clover.evaluation.answers --upgrade FILE``)
writes it in the current format.
"""
from __future__ import annotations

import json
import math
import operator
import os
import time
from pathlib import Path
from typing import Sequence

from clover.args import CloverArgumentParser
from clover.errors import CloverError, run_cli
from clover.io import append_jsonl, write_text

GROUPS = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
_KNOWN_CATEGORIES = MT_BENCH_CATEGORIES + GROUPS[1:]
_RECORD_STRINGS = ("category", "model_id", "base_model", "method")
_TURN_LISTS = ("turns", "new_tokens", "idxs", "wall_time")  # one entry per turn in both formats
PER_TURN_KEY = "accept_lengths_per_turn"


def category_group(category: str) -> str:
    """The group of a question category: an MT-bench category gives ``mt_bench``, any other group is its own name."""
    if category in MT_BENCH_CATEGORIES:
        return "mt_bench"
    if category in GROUPS[1:]:
        return category
    raise CloverError(f"unknown question category {category!r}; known categories: {', '.join(_KNOWN_CATEGORIES)}")


def default_question_file() -> Path:
    """The question set shipped with clover (six groups, four questions each)."""
    return Path(__file__).with_name("questions.jsonl")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read_json_lines(path: str | os.PathLike) -> list[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of a JSON-lines file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CloverError(f"file not found: {path}; check the path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CloverError(f"cannot read {path}: {err}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise CloverError(f"{path}:{number}: not valid JSON ({err.msg}); fix or delete that line") from None
    return rows


def _check_question(question: object) -> None:
    """Raise ValueError describing what is wrong with one parsed question line."""
    if not isinstance(question, dict):
        raise ValueError("a question must be a JSON object")
    if not _is_int(question.get("question_id")):
        raise ValueError('missing or non-integer "question_id"')
    if not isinstance(question.get("category"), str):
        raise ValueError('missing or non-string "category"')
    turns = question.get("turns")
    if not isinstance(turns, list) or not turns:
        raise ValueError('"turns" must be a non-empty list of strings')
    if not all(isinstance(turn, str) for turn in turns):
        raise ValueError('every entry of "turns" must be a string')


def load_questions(path: str | os.PathLike, begin: int | None = None, end: int | None = None,
                   per_group: int | None = None) -> list[dict]:
    """Validated questions of a JSON-lines file, sliced ``[begin:end]`` by position in the file; with ``per_group``,
    a stratified subset of that slice: ``per_group`` questions of every category group, evenly spaced within the
    group (so MT-bench's subset spans its categories), in file order."""
    questions = []
    seen: set[int] = set()
    for number, question in _read_json_lines(path):
        try:
            _check_question(question)
            category_group(question["category"])
        except (ValueError, CloverError) as err:
            raise CloverError(f"{path}:{number}: {err}") from None
        if question["question_id"] in seen:
            raise CloverError(f"{path}:{number}: duplicate question_id {question['question_id']}; ids must be unique")
        seen.add(question["question_id"])
        questions.append(question)
    if not questions:
        raise CloverError(f"no questions in {path}")
    questions = questions[begin:end]
    if per_group is None:
        return questions
    if per_group < 1:
        raise CloverError(f"per_group must be >= 1, got {per_group}")
    groups: dict[str, list[int]] = {}
    for i, question in enumerate(questions):
        groups.setdefault(category_group(question["category"]), []).append(i)
    keep = {members[j * len(members) // min(per_group, len(members))] for members in groups.values()
            for j in range(min(per_group, len(members)))}
    return [q for i, q in enumerate(questions) if i in keep]


def _is_accept_list(value: object) -> bool:
    return isinstance(value, list) and all(_is_int(a) and a >= 1 for a in value)


def _check_choice(choice: object, index: int = 0) -> None:
    """Raise ValueError describing what is wrong with choice number ``index`` of a successful answer (either the
    current format or the one with nested per-turn ``accept_lengths`` written before it)."""
    if not isinstance(choice, dict) or choice.get("index") != index:
        raise ValueError(f'choice {index} must be an object with "index": {index}')
    for key in _TURN_LISTS:
        if not isinstance(choice.get(key), list):
            raise ValueError(f'choice field "{key}" must be a list with one entry per turn')
    n_turns = len(choice["turns"])
    if n_turns == 0:
        raise ValueError('choice "turns" is empty')
    for key in _TURN_LISTS[1:]:
        if len(choice[key]) != n_turns:
            raise ValueError(f'choice "{key}" has {len(choice[key])} entries for {n_turns} turns')
    current = PER_TURN_KEY in choice
    per_turn = choice[PER_TURN_KEY] if current else choice.get("accept_lengths")
    name = PER_TURN_KEY if current else "accept_lengths"
    if not current and _is_accept_list(per_turn) and per_turn:
        raise ValueError(f'"accept_lengths" is a flat list but "{PER_TURN_KEY}" is missing, so the steps cannot be '
                         "split into turns; regenerate this answer")
    if not isinstance(per_turn, list) or len(per_turn) != n_turns:
        raise ValueError(f'choice "{name}" must be a list with one list of accept lengths per turn ({n_turns})')
    for t in range(n_turns):
        new_tokens, steps, seconds = choice["new_tokens"][t], choice["idxs"][t], choice["wall_time"][t]
        accepts = per_turn[t]
        if not isinstance(choice["turns"][t], str):
            raise ValueError(f"turn {t}: the answer text must be a string")
        if not (_is_int(new_tokens) and new_tokens >= 0 and _is_int(steps) and steps >= 0):
            raise ValueError(f"turn {t}: new_tokens and idxs must be non-negative integers")
        if not (isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds)
                and seconds > 0):
            raise ValueError(f"turn {t}: wall_time must be a positive number of seconds, got {seconds!r}")
        if not _is_accept_list(accepts):
            raise ValueError(f"turn {t}: accept_lengths must be a list of integers >= 1 (the bonus token included)")
        if len(accepts) != steps or sum(accepts) != new_tokens:
            raise ValueError(f"turn {t}: counts disagree: {len(accepts)} accept lengths summing to {sum(accepts)} "
                             f"but idxs={steps} and new_tokens={new_tokens}")
    if not current:
        if "decoding_steps" in choice:
            raise ValueError(f'a choice with "decoding_steps" needs "{PER_TURN_KEY}" too')
        return
    if choice.get("decoding_steps") != choice["idxs"]:
        raise ValueError(f'"decoding_steps" must equal "idxs" (the steps of every turn), got '
                         f'{choice.get("decoding_steps")!r} and {choice["idxs"]!r}')
    if choice.get("accept_lengths") != [a for turn in per_turn for a in turn]:
        raise ValueError(f'"accept_lengths" must be the concatenation of "{PER_TURN_KEY}" over the turns in order')


def turn_accept_lengths(choice: dict) -> list[list[int]]:
    """The accept lengths of a choice split per turn, for the current format and for files written before it."""
    return choice[PER_TURN_KEY] if PER_TURN_KEY in choice else choice["accept_lengths"]


def flat_accept_lengths(choice: dict) -> list[int]:
    """The accept lengths of a choice as one list over its turns in order (Spec-Bench's ``accept_lengths``)."""
    return [a for turn in turn_accept_lengths(choice) for a in turn]


def check_answer(record: object) -> None:
    """Raise ValueError describing what is wrong with one answer record (successful or failed)."""
    if not isinstance(record, dict):
        raise ValueError("an answer must be a JSON object")
    if not _is_int(record.get("question_id")):
        raise ValueError('missing or non-integer "question_id"')
    for key in _RECORD_STRINGS:
        if not isinstance(record.get(key), str):
            raise ValueError(f'missing or non-string "{key}"')
    try:
        category_group(record["category"])
    except CloverError as err:
        raise ValueError(str(err)) from None
    if not isinstance(record.get("tstamp"), (int, float)) or isinstance(record.get("tstamp"), bool):
        raise ValueError('missing or non-numeric "tstamp"')
    if ("error" in record) == ("choices" in record):
        raise ValueError('an answer needs exactly one of "choices" (success) or "error" (failure)')
    if "error" in record:
        if not isinstance(record["error"], str) or not record["error"]:
            raise ValueError('"error" must be a non-empty message')
        return
    choices = record["choices"]
    if not isinstance(choices, list) or not choices:
        raise ValueError('"choices" must be a non-empty list (one entry per sampled choice)')
    for index, choice in enumerate(choices):
        _check_choice(choice, index)


def is_success(record: dict) -> bool:
    """Whether an answer record holds a generated answer (not an error)."""
    return "error" not in record


def _header(question_id: int, category: str, model_id: str, base_model: str, method: str,
            tstamp: float | None) -> dict:
    return {"question_id": question_id, "category": category, "model_id": model_id, "base_model": base_model,
            "method": method, "tstamp": time.time() if tstamp is None else tstamp}


def _validated(record: dict) -> dict:
    try:
        check_answer(record)
    except ValueError as err:
        raise CloverError(f"invalid answer for question {record.get('question_id')}: {err}") from None
    return record


def make_choice(index: int, turns: Sequence[str], accept_lengths: Sequence[Sequence[int]],
                wall_time: Sequence[float], verified: Sequence[int] | None = None) -> dict:
    """One choice of an answer in the current format; per turn ``new_tokens``, ``idxs`` and ``decoding_steps`` are
    derived from ``accept_lengths``, which is stored both flat and per turn.

    ``accept_lengths[t]`` lists the tokens committed by each decoding step of turn ``t`` (the prefill's first token
    is a step of length 1), bonus token included (plain decoding: one 1 per generated token). ``verified[t]``
    (speculative decoding only) is the number of tokens the base model verified in turn ``t``'s steps after the
    prefill, roots included (``verified_tokens``; a field Spec-Bench's scripts ignore).
    """
    accepts = [[operator.index(a) for a in turn] for turn in accept_lengths]
    steps = [len(a) for a in accepts]
    choice = {"index": index, "turns": list(turns), "new_tokens": [sum(a) for a in accepts], "idxs": steps,
              "decoding_steps": list(steps), "wall_time": [float(s) for s in wall_time],
              "accept_lengths": [a for turn in accepts for a in turn], PER_TURN_KEY: accepts}
    if verified is not None:
        choice["verified_tokens"] = [operator.index(v) for v in verified]
    return choice


def current_format(record: dict) -> dict:
    """A valid answer record in the current format (unchanged if it already is); other fields are kept."""
    if not is_success(record) or all(PER_TURN_KEY in c for c in record["choices"]):
        return record
    choices = []
    for choice in record["choices"]:
        made = make_choice(choice["index"], choice["turns"], turn_accept_lengths(choice), choice["wall_time"])
        choices.append({**made, **{k: v for k, v in choice.items() if k not in made}})
    return {**record, "choices": choices}


def answer_record(question_id: int, category: str, *, model_id: str, base_model: str, method: str,
                  turns: Sequence[str] = (), accept_lengths: Sequence[Sequence[int]] = (),
                  wall_time: Sequence[float] = (), choices: Sequence[dict] | None = None,
                  tstamp: float | None = None) -> dict:
    """A validated successful answer: one choice from ``turns``/``accept_lengths``/``wall_time``, or several
    ``choices`` made with :func:`make_choice`. ``tstamp`` defaults to now."""
    if choices is None:
        choices = [make_choice(0, turns, accept_lengths, wall_time)]
    return _validated({**_header(question_id, category, model_id, base_model, method, tstamp),
                       "choices": list(choices)})


def error_record(question_id: int, category: str, *, model_id: str, base_model: str, method: str, error: str,
                 tstamp: float | None = None) -> dict:
    """A validated record of a question whose generation failed with message ``error``; it holds no numbers."""
    return _validated({**_header(question_id, category, model_id, base_model, method, tstamp), "error": error})


def append_answer(path: str | os.PathLike, record: dict) -> None:
    """Append one answer as a JSON line (creating the file and its folder) and flush it to disk."""
    append_jsonl(path, _validated(record))


def _latest_answers(path: str | os.PathLike) -> list[dict]:
    """Validated answers of a file in the current format, sorted by question_id, the last line winning for a
    repeated id; may be empty."""
    latest: dict[int, dict] = {}
    for number, record in _read_json_lines(path):
        try:
            check_answer(record)
        except ValueError as err:
            raise CloverError(f"{path}:{number}: {err}") from None
        latest[record["question_id"]] = current_format(record)
    return [latest[qid] for qid in sorted(latest)]


def load_answers(path: str | os.PathLike) -> list[dict]:
    """Validated answers of a file in the current format (older files are converted), sorted by question_id; for a
    repeated question_id the last line wins."""
    answers = _latest_answers(path)
    if not answers:
        raise CloverError(f"no answers in {path}; generate answers first")
    return answers


def done_question_ids(path: str | os.PathLike) -> set[int]:
    """Ids of questions with a successful answer in ``path`` (none if it does not exist yet), to resume a run."""
    if not Path(path).exists():
        return set()
    return {record["question_id"] for record in _latest_answers(path) if is_success(record)}


def sort_answer_file(path: str | os.PathLike) -> None:
    """Rewrite an answer file sorted by question_id without repeated ids, in the current format, atomically
    (:func:`clover.io.write_text`)."""
    write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in load_answers(path)))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned; floats with two decimals."""
    cells = [list(headers)] + [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = CloverArgumentParser(
        prog="python -m clover.evaluation.answers",
        description="Rewrite answer files in the current record format (flat accept_lengths, decoding_steps), "
                    "sorted by question_id without repeated ids, so Spec-Bench's evaluation scripts read them.")
    parser.add_argument("--upgrade", nargs="+", required=True, metavar="FILE", help="answer files to rewrite in place")
    args = parser.parse_args(argv)
    for path in args.upgrade:
        sort_answer_file(path)
        print(f"rewrote {path}")


if __name__ == "__main__":
    run_cli(main)
