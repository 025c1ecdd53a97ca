"""Reply regeneration (python -m clover.ge_data.regenerate) on a tiny random Llama with SmolLM2's tokenizer: the output
is ShareGPT that the data dump reads, replies equal batch-1 greedy decoding through the chat template, a killed run
resumes with every conversation exactly once, too-long prompts are skipped and counted, bad flags are one error line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clover.data.conversations import Conversation, load_conversations, select_conversations
from clover.data.templates import get_template
from clover.ge_data import regenerate
from clover.ge_data.allocation import load_selection
from clover.ge_data.regen_worker import longest_first
from clover.generate.plain import generate_plain
from clover.model.base import BaseModel
from clover.model.loading import load_tokenizer, resolve_model_path
from tests.conftest import SINGLE_THREAD_ENV, SMOLLM2, save_tiny

MAX_LEN = 96  # the longest prompt answered: --max-len is MAX_LEN + the reply cap of 6
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory) -> Path:
    """A tiny random Llama over SmolLM2's vocabulary, with its tokenizer and chat template."""
    folder = save_tiny(tmp_path_factory.mktemp("tiny_chat"), "llama", vocab_size=49152, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(resolve_model_path(SMOLLM2) / name, folder / name)
    return folder


def write_sharegpt(path: Path, n: int, long_ids=()) -> Path:
    """``n`` conversations (every third has two turns, one a system message); those in ``long_ids`` have a first
    question far over MAX_LEN tokens."""
    records = []
    for i in range(n):
        question = "word " * 200 if i in long_ids else f"Question number {i}?"
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": f"Old answer {i}."}]
        if i % 3 == 1:
            turns = [{"from": "system", "value": "Be brief."}] + turns
        if i % 3 == 2:
            turns += [{"from": "human", "value": "And then?"}, {"from": "gpt", "value": "Old follow-up."}]
        records.append({"id": f"conv_{i}", "conversations": turns})
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def regen_args(model: Path, data: Path, outdir: Path, *extra: str) -> list[str]:
    return ["--model_path", str(model), "--dataset", str(data), "--outdir", str(outdir),
            "--max_len", str(MAX_LEN + 6), "--max_new_tokens", "6", "--batch_size", "3", "--shard_size", "2",
            "--temperature", "0", "--top_p", "1", *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_output_is_sharegpt_that_allocation_reads(tiny_chat, tmp_path):
    data = write_sharegpt(tmp_path / "data.jsonl", 7, long_ids=(4,))
    out = tmp_path / "out"
    totals = regenerate.main(regen_args(tiny_chat, data, out))
    assert totals["complete"] and totals["shards_done"] == 4
    assert totals["conversations"] == 6 and totals["skipped"] == {regenerate.SKIP_LONG_PROMPT: 1}
    assert totals["turns"] == 8 and sum(totals["finish_reasons"].values()) == 8
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_model"] == str(tiny_chat) and manifest["seed"] == 0
    assert manifest["sampling"] == {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "greedy": True}
    per_turn = {cid: reasons for shard in manifest["shards"] for cid, _, reasons in shard["per_turn"]}
    assert set(per_turn) == {f"conv_{i}" for i in range(7) if i != 4}
    assert all(len(r) == (2 if cid in ("conv_2", "conv_5") else 1) and set(r) <= {"eos", "length"}
               for cid, r in per_turn.items())
    # the merged file is what allocation's loader and selection read; the shards keep the selection order
    convs, report = load_conversations(out / regenerate.MERGED)
    assert report.kept == 6 and not report.skipped
    selected = [c.id for c in select_conversations(load_conversations(data)[0], 0, None, seed=0)]
    assert [c.id for c in convs] == [cid for cid in selected if cid != "conv_4"]
    sel, _ = load_selection(argparse.Namespace(eval=False, question_file=None, dataset=str(out / regenerate.MERGED),
                                               start=0, end=None, seed=0))
    assert len(sel) == 6
    # human turns and system messages kept, replies regenerated: batch-1 greedy through the same template
    template = get_template(load_tokenizer(tiny_chat))
    base = BaseModel.from_pretrained(tiny_chat, dtype="fp32", max_len=MAX_LEN + 6)
    original = {c.id: c for c in load_conversations(data)[0]}
    for conv in convs:
        old = original[conv.id].messages
        assert [m for m in conv.messages if m["role"] != "assistant"] == [m for m in old if m["role"] != "assistant"]
        messages = []
        for m in conv.messages:
            if m["role"] == "assistant":
                result = generate_plain(base, template.encode_prompt(messages), max_new_tokens=6,
                                        stop_token_ids=template.stop_token_ids)
                tokens = result.tokens[:-1] if result.finish_reason == "stop" else result.tokens
                assert m["content"] == template.tokenizer.decode(tokens, skip_special_tokens=True)
            messages.append(m)


def test_interrupted_run_resumes_exactly_once(tiny_chat, tmp_path):
    data = write_sharegpt(tmp_path / "data.jsonl", 9)
    out, ref = tmp_path / "out", tmp_path / "ref"
    regenerate.main(regen_args(tiny_chat, data, ref))

    class Stop(Exception):
        pass

    def stop_after_first(index):
        raise Stop(index)

    with pytest.raises(Stop):
        regenerate.main(regen_args(tiny_chat, data, out), on_shard=stop_after_first)
    assert len(list(out.glob("shard_*.jsonl"))) == 1 and not (out / regenerate.MERGED).exists()
    (out / ".shard_000003.jsonl.1234abcd.tmp").write_text('{"id": "half')  # what a kill during a write leaves
    totals = regenerate.main(regen_args(tiny_chat, data, out))
    assert totals["complete"] and totals["conversations"] == 9
    assert not list(out.glob(".*.tmp"))
    assert read_jsonl(out / regenerate.MERGED) == read_jsonl(ref / regenerate.MERGED)
    # killed for real (SIGKILL) mid-way, then rerun: still every conversation once, nothing half-written
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "clover.ge_data.regenerate",
                             *regen_args(tiny_chat, data, killed, "--batch_size", "1")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=SINGLE_THREAD_ENV)
    deadline = time.time() + 240
    while proc.poll() is None and not (killed / "shard_000000.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for shard in killed.glob("shard_*.jsonl"):
        assert all(line.endswith("}") for line in shard.read_text().splitlines())
    regenerate.main(regen_args(tiny_chat, data, killed))
    records = read_jsonl(killed / regenerate.MERGED)
    assert sorted(r["id"] for r in records) == sorted(f"conv_{i}" for i in range(9))
    assert records == read_jsonl(ref / regenerate.MERGED)


def test_rerun_with_other_settings_is_refused(tiny_chat, tmp_path):
    data = write_sharegpt(tmp_path / "data.jsonl", 3)
    out = tmp_path / "out"
    regenerate.main(regen_args(tiny_chat, data, out))
    from clover.errors import CloverError

    with pytest.raises(CloverError, match="another configuration"):
        regenerate.main(regen_args(tiny_chat, data, out, "--temperature", "0.7"))
    totals = regenerate.main(regen_args(tiny_chat, data, out, "--temperature", "0.7", "--top_p", "0.9",
                                        "--overwrite"))
    assert totals["complete"] and totals["conversations"] == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampling"]["temperature"] == 0.7 and not manifest["sampling"]["greedy"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clover.ge_data.regenerate", *args], capture_output=True, text=True,
                          timeout=300, env=SINGLE_THREAD_ENV)


@pytest.mark.parametrize("flags, needle", [
    (("--batch_size", "0"), "--batch_size"),
    (("--batch-size", "-3"), "--batch-size"),
    (("--temperature", "-0.5"), "--temperature"),
    (("--top_p", "0"), "--top_p"),
    (("--start", "5", "--end", "2"), "start < end"),
    (("--max_len", "513"), "context window"),
    (("--max_len", "6"), "no room for a prompt"),
])
def test_bad_flags_are_one_error_line(tiny_chat, tmp_path, flags, needle):
    data = write_sharegpt(tmp_path / "data.jsonl", 2)
    proc = run_cli(*regen_args(tiny_chat, data, tmp_path / "out"), *flags)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_dataset_is_one_error_line(tiny_chat, tmp_path):
    proc = run_cli(*regen_args(tiny_chat, tmp_path / "nope.jsonl", tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.count("error: ") == 1 and "not found" in proc.stderr, proc.stderr


def test_conversations_with_most_turns_start_first():
    """A worker starts a shard's longest conversations (most user turns) first, ties in shard order, so a long chain
    of turns does not run alone at the end; the records still go out in shard order (slots unchanged)."""
    def conv(i, turns):
        messages = [m for _ in range(turns) for m in ({"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": "a"})]
        return Conversation(id=f"c{i}", index=i, messages=messages)

    convs = [conv(0, 1), conv(1, 3), conv(2, 1), conv(3, 2), conv(4, 3)]
    order = longest_first(7, convs)
    assert [d.conv.id for d in order] == ["c1", "c4", "c3", "c0", "c2"]
    assert [d.slot for d in order] == [1, 4, 3, 0, 2] and {d.shard for d in order} == {7}


def test_replies_are_sampled_by_default():
    """Sampled replies (T = 0.7, top-p 0.95) are the default, greedy ones a flag."""
    args = regenerate.build_parser().parse_args(["--outdir", "o"])
    assert (args.temperature, args.top_p, args.top_k) == (0.7, 0.95, 0)
    assert regenerate.build_parser().parse_args(["--outdir", "o", "--temperature", "0"]).temperature == 0
