"""ShareGPT loading: salvage of truncated files, per-record validation and skip counts, subset selection."""
import json
from collections import Counter

import pytest

from clover.data.conversations import (Conversation, conversations_from_answers, load_conversations,
                                       normalise_record, select_conversations, sharegpt_default_path)
from clover.errors import CloverError


def turn(speaker, text):
    return {"from": speaker, "value": text}


GOOD = {"id": "good", "conversations": [turn("system", "Be nice."), turn("human", "Hi"), turn("gpt", " Hello! "),
                                        turn("user", "Bye"), turn("chatgpt", "Bye."), turn("human", "unanswered")]}
LEADING_REPLY = {"conversations": [turn("gpt", "orphan reply"), turn("human", "Q"), turn("bard", "A")]}
BAD = {  # skip reason -> a record skipped for it; each reason once
    "missing fields": {"id": "no-value", "conversations": [turn("human", "Q"), {"from": "gpt"}]},
    "non-string value": {"conversations": [turn("human", "Q"), turn("gpt", 42)]},
    "empty turn": {"conversations": [turn("human", "Q"), turn("gpt", " \n ")]},
    "unknown role": {"conversations": [turn("human", "Q"), turn("robot", "A")]},
    "roles do not alternate": {"conversations": [turn("human", "Q"), turn("human", "Q2"), turn("gpt", "A")]},
    "no assistant reply": {"conversations": [turn("human", "Q")]},
}
RECORDS = [GOOD, LEADING_REPLY, *BAD.values()]
EXPECTED_SKIPS = Counter(list(BAD))


def check_good_records(conversations):
    good, leading = conversations
    assert (good.id, good.index) == ("good", 0)
    assert good.messages == [
        {"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello! "}, {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye."},
    ]
    assert (leading.id, leading.index) == ("record_1", 1)
    assert leading.messages == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_json_array_skip_reasons(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(RECORDS, indent=2))
    conversations, report = load_conversations(path)
    check_good_records(conversations)
    assert report.skipped == EXPECTED_SKIPS
    assert (report.records_read, report.kept, report.truncated_tail) == (len(RECORDS), 2, False)
    assert f"read {len(RECORDS)} records, kept 2" in report.summary() and "empty turn 1" in report.summary()


@pytest.mark.parametrize("record, reason", [
    ("not an object", "missing fields"),
    ({"id": "no-conversations"}, "missing fields"),
    ({"conversations": [turn("human", "Q"), "not a turn"]}, "missing fields"),
    ({"conversations": [turn(None, "Q")]}, "non-string value"),
    ({"conversations": [turn("human", "Q"), turn("gpt", "A"), turn("system", "S")]}, "roles do not alternate"),
    ({"conversations": [turn("gpt", "A1"), turn("gpt", "A2")]}, "roles do not alternate"),
    ({"conversations": []}, "no assistant reply"),
    ({"conversations": [turn("system", "S"), turn("gpt", "A")]}, "no assistant reply"),
])
def test_normalise_record_reasons(record, reason):
    assert normalise_record(record) == reason


def test_jsonl_with_an_invalid_line(tmp_path):
    path = tmp_path / "sharegpt.jsonl"
    lines = [json.dumps(record) for record in RECORDS]
    lines.insert(3, '{"id": "broken", "conversations": [')
    path.write_text("\n".join(lines) + "\n\n")
    conversations, report = load_conversations(path)
    check_good_records(conversations)
    assert report.skipped == EXPECTED_SKIPS + Counter({"invalid JSON": 1})
    assert (report.records_read, report.truncated_tail) == (len(RECORDS) + 1, False)


def test_jsonl_cut_in_the_last_line(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD)[:30])
    conversations, report = load_conversations(path)
    assert len(conversations) == 1 and report.truncated_tail and report.dropped_truncated == 1
    assert not report.skipped


@pytest.mark.parametrize("cut_after", ['{', '"Q4', '"A4 \xf0\x9f', '"A4 \xf0\x9f\x99\x82"\n      }\n    ]'])
def test_truncated_json_array_keeps_complete_records(tmp_path, cut_after):
    records = [{"id": f"r{i}", "conversations": [turn("human", f"Q{i} é"), turn("gpt", f"A{i} 🙂")]}
               for i in range(5)]
    data = json.dumps(records, indent=2, ensure_ascii=False).encode()
    last_start = data.index(b'{\n    "id": "r4"')
    cut = data.index(cut_after.encode("latin-1"), last_start) + len(cut_after)  # may end inside a UTF-8 sequence
    path = tmp_path / "cut.json"
    path.write_bytes(data[:cut])
    conversations, report = load_conversations(path)
    assert [c.id for c in conversations] == ["r0", "r1", "r2", "r3"]
    assert report.truncated_tail and report.dropped_truncated == 1 and report.records_read == 4
    assert "the file is truncated: 1 incomplete record at the end dropped" in report.summary()


def test_json_array_cut_between_records(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text(json.dumps([GOOD, GOOD])[:-1] + ",\n")
    conversations, report = load_conversations(path)
    assert len(conversations) == 2 and report.truncated_tail and report.dropped_truncated == 0


def test_unusable_files(tmp_path):
    with pytest.raises(CloverError, match="missing.json"):
        load_conversations(tmp_path / "missing.json")
    not_json = [("text.json", "hello world"), ("empty.json", ""), ("pretty.json", json.dumps(GOOD, indent=1))]
    for name, content in not_json:
        (tmp_path / name).write_text(content)
        with pytest.raises(CloverError, match=name):
            load_conversations(tmp_path / name)


def test_packaged_sharegpt_salvage():
    conversations, report = load_conversations()
    assert report.path == sharegpt_default_path()
    assert report.truncated_tail and report.dropped_truncated == 1
    assert report.kept == len(conversations) > 15000
    assert report.records_read == report.kept + sum(report.skipped.values())
    assert len({c.index for c in conversations}) == len(conversations)
    assert all(m["role"] in ("system", "user", "assistant") for c in conversations[:100] for m in c.messages)


def make_conversations(n):
    return [Conversation(f"c{i}", i, [{"role": "user", "content": str(i)}]) for i in range(n)]


def test_select_conversations_is_deterministic():
    items = make_conversations(50)
    first = select_conversations(items, 0, 20)
    assert [c.id for c in first] == [c.id for c in select_conversations(list(reversed(items)), 0, 20)]
    assert [c.id for c in first] != [c.id for c in select_conversations(items, 0, 20, seed=1)]
    rest = select_conversations(items, 20, None)
    assert len(first) == 20 and len(rest) == 30
    assert sorted(c.index for c in first + rest) == list(range(50))
    assert [c.index for c in first] != list(range(20))  # shuffled


@pytest.mark.parametrize("start, end", [(5, 5), (6, 2), (-1, 10)])
def test_select_conversations_rejects_bad_ranges(start, end):
    with pytest.raises(CloverError, match="range"):
        select_conversations(make_conversations(10), start, end)


def test_conversations_from_answers():
    questions = [
        {"question_id": 81, "category": "writing", "turns": ["Q1", "Q2"]},
        {"question_id": 82, "category": "math", "turns": ["no answer"]},
        {"question_id": 83, "category": "coding", "turns": ["Q3"]},
    ]
    answers = [{"question_id": 83, "choices": [{"turns": ["A3"]}]},
               {"question_id": 81, "choices": [{"turns": ["A1", "A2"]}]}]
    first, third = conversations_from_answers(questions, answers)
    assert (first.id, first.index, third.id, third.index) == ("question_81", 0, "question_83", 2)
    assert [m["content"] for m in first.messages] == ["Q1", "A1", "Q2", "A2"]
    assert [m["role"] for m in third.messages] == ["user", "assistant"]
