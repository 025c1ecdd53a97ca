"""Training-data dump on SmolLM2: stored states equal a fresh forward, masks round-trip, interrupted runs resume
without duplicates, multi-worker runs, one-line errors, atomic shard writes; the lazy dataset that reads the dump.

Forwards run single-threaded (here and in the CLI subprocesses): on a 2-core machine shared with other busy processes,
two torch threads per forward can be 30x slower than one.
"""
from __future__ import annotations

import errno
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from clover.data.conversations import load_conversations, select_conversations
from clover.data.templates import get_template
from clover.errors import CloverError
from clover.ge_data import allocation, dataset as dataset_module
from clover.ge_data.dataset import HiddenStateDataset, collate, shard_files
from clover.ge_data.worker import greedy_generate
from clover.generate.plain import generate_plain
from clover.model.loading import resolve_model_path
from tests.conftest import SINGLE_THREAD_ENV, SMOLLM2

MAX_LEN = 128
REPLIES = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Name a prime number.", "Seven is a prime number."),
    ("Say hello in Spanish.", "Hola!"),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What colour is the sky?", "It is usually blue during the day."),
    ("Give me a synonym of quick.", "Fast."),
    ("What is 12 times 3?", "12 times 3 is 36."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
]


def write_sharegpt(path: Path, n: int, with_long: bool = False) -> Path:
    """``n`` short conversations (some two-turn); ``with_long`` adds one whose reply falls beyond MAX_LEN tokens."""
    records = []
    for i in range(n):
        question, answer = REPLIES[i % len(REPLIES)]
        turns = [{"from": "human", "value": f"{question} ({i})"}, {"from": "gpt", "value": answer}]
        if i % 2:
            turns += [{"from": "human", "value": "Thanks!"}, {"from": "gpt", "value": f"You are welcome, #{i}."}]
        records.append({"id": f"conv_{i}", "conversations": turns})
    if with_long:
        records.append({"id": "too_long", "conversations": [{"from": "human", "value": "word " * 300},
                                                             {"from": "gpt", "value": "ok"}]})
    path.write_text(json.dumps(records))
    return path


def dump_args(data: Path, outdir: Path, *extra: str) -> list[str]:
    return ["--model_path", SMOLLM2, "--outdir", str(outdir), "--dataset", str(data), "--max_len", str(MAX_LEN),
            *extra]


pytestmark = pytest.mark.usefixtures("single_thread")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clover.ge_data.allocation", *args], capture_output=True,
                          text=True, timeout=300, env=SINGLE_THREAD_ENV)


def read_shards(folder: Path) -> list[dict]:
    """Per conversation: shard file, conversation index, id, ids, mask and hidden states."""
    convs = []
    for path in shard_files(folder):
        with safe_open(str(path), framework="pt") as f:
            t = {key: f.get_tensor(key) for key in f.keys()}
            ids = json.loads(f.metadata()["conversation_ids"])
        offsets = t["offsets"].tolist()
        for k, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
            convs.append({"file": path.name, "index": int(t["conv_index"][k]), "id": ids[k],
                          "input_ids": t["input_ids"][a:b], "loss_mask": t["loss_mask"][a:b],
                          "hidden_prenorm": t["hidden_prenorm"][a:b]})
    return convs


def selected_indices(data: Path, **kwargs) -> list[int]:
    return [c.index for c in select_conversations(load_conversations(data)[0], 0, None, **kwargs)]


@pytest.fixture(scope="module")
def fp32_dump(tmp_path_factory):
    """Five conversations (one too long to keep any reply) dumped in fp32, two per shard."""
    root = tmp_path_factory.mktemp("dump")
    data = write_sharegpt(root / "data.json", 4, with_long=True)
    allocation.main(dump_args(data, root / "out", "--hidden-dtype", "fp32", "--shard_size", "2"))
    return data, root / "out"


# ---- the dump --------------------------------------------------------------------------------------------------

def test_fp32_states_equal_a_fresh_forward(fp32_dump, smollm2_base):
    data, out = fp32_dump
    convs = read_shards(out)
    assert len(convs) == 4
    for conv in convs:
        assert conv["input_ids"].dtype == torch.int32 and conv["loss_mask"].dtype == torch.uint8
        fresh = smollm2_base(conv["input_ids"].long()[None], use_cache=False).hidden_prenorm[0]
        assert conv["hidden_prenorm"].dtype == torch.float32
        assert torch.equal(conv["hidden_prenorm"], fresh)


def test_bf16_states_are_the_rounded_forward(tmp_path, smollm2_base):
    data = write_sharegpt(tmp_path / "data.json", 2)
    allocation.main(dump_args(data, tmp_path / "out"))  # default --hidden-dtype: bf16
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dtype"] == "bf16" and manifest["compute_dtype"] == "fp32"
    for conv in read_shards(tmp_path / "out"):
        fresh = smollm2_base(conv["input_ids"].long()[None], use_cache=False).hidden_prenorm[0]
        assert conv["hidden_prenorm"].dtype == torch.bfloat16
        assert torch.equal(conv["hidden_prenorm"], fresh.to(torch.bfloat16))
        torch.testing.assert_close(conv["hidden_prenorm"].float(), fresh, rtol=1e-2, atol=1e-2)


def test_masks_round_trip_and_manifest(fp32_dump, smollm2_tokenizer):
    data, out = fp32_dump
    template = get_template(smollm2_tokenizer, "auto")
    records = {c.index: c for c in load_conversations(data)[0]}
    convs = read_shards(out)
    for conv in convs:
        ids, mask = template.encode_with_mask(records[conv["index"]].messages, MAX_LEN)
        assert conv["input_ids"].tolist() == ids and conv["loss_mask"].tolist() == mask
        assert conv["id"] == records[conv["index"]].id and any(mask)
    manifest = json.loads((out / "manifest.json").read_text())
    totals = manifest["totals"]
    assert manifest["selected"] == 5 and manifest["num_shards"] == 3 and totals["complete"]
    assert totals["conversations"] == 4 and totals["skipped"] == {"no masked token after truncation": 1}
    assert totals["tokens"] == sum(len(c["input_ids"]) for c in convs)
    assert totals["masked_tokens"] == sum(int(c["loss_mask"].sum()) for c in convs)
    assert totals["bytes"] == sum(p.stat().st_size for p in shard_files(out))
    assert [r["file"] for r in manifest["shards"]] == [p.name for p in shard_files(out)]
    assert (manifest["hidden_size"], manifest["template"], manifest["base_model"]) == (576, "tokenizer", SMOLLM2)
    # the selection is the seeded shuffle, in shard order
    kept = [c["index"] for c in convs]
    assert kept == [i for i in selected_indices(data) if i in kept]


def test_killed_run_resumes_without_duplicates(tmp_path):
    data = write_sharegpt(tmp_path / "data.json", 6)
    out = tmp_path / "out"
    args = dump_args(data, out, "--shard_size", "1")
    proc = subprocess.Popen([sys.executable, "-m", "clover.ge_data.allocation", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=SINGLE_THREAD_ENV)
    deadline = time.monotonic() + 240
    while not (out / "shard_000000.safetensors").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(shard_files(out))
    assert 1 <= done_before < 6, "the run was not interrupted"
    (out / "shard_000005.safetensors.tmp").write_bytes(b"half a shard")  # what a kill during a write leaves

    result = allocation.main(args)
    assert result["shards_done"] == 6 and result["complete"]
    indices = [c["index"] for c in read_shards(out)]
    assert indices == selected_indices(data)  # every conversation once, in selection order
    assert not list(out.glob("*.tmp"))
    mtimes = {p: p.stat().st_mtime_ns for p in shard_files(out)}
    again = allocation.main(args)  # nothing left to do
    assert again["run_tokens"] == 0 and {p: p.stat().st_mtime_ns for p in shard_files(out)} == mtimes


def test_two_cpu_workers(tmp_path):
    data = write_sharegpt(tmp_path / "data.json", 5)
    out = tmp_path / "out"
    proc = run_cli(*dump_args(data, out, "--workers", "2", "--shard_size", "2"))
    assert proc.returncode == 0, proc.stderr
    assert "summary: 5 conversations" in proc.stdout
    assert [p.name for p in shard_files(out)] == [f"shard_{j:06d}.safetensors" for j in range(3)]
    assert [c["index"] for c in read_shards(out)] == selected_indices(data)


def test_write_failure_leaves_no_shard(tmp_path, monkeypatch):
    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    data = write_sharegpt(tmp_path / "data.json", 1)
    with pytest.raises(CloverError, match="cannot write .*shard_000000.safetensors: No space left on device"):
        allocation.main(dump_args(data, tmp_path / "out"))
    assert not shard_files(tmp_path / "out") and not list((tmp_path / "out").glob("*.tmp"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["totals"]["shards_done"] == 0 and not manifest["totals"]["complete"]


def assert_one_error_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("case", ["unknown model", "missing dataset", "unreadable dataset", "empty range",
                                  "gpu id", "bad flag", "other config"])
def test_bad_input_is_one_error_line(case, tmp_path, fp32_dump):
    data, out = fp32_dump
    garbage = tmp_path / "garbage.json"
    garbage.write_text("not json at all")
    args, needles = {
        "unknown model": (["--model_path", "no-such-model"], ["unknown model 'no-such-model'"]),
        "missing dataset": (["--dataset", str(tmp_path / "missing.json")], ["dataset file not found"]),
        "unreadable dataset": (["--dataset", str(garbage)], ["neither a JSON array nor JSONL"]),
        "empty range": (["--start", "3", "--end", "3"], ["--start 3 --end 3"]),
        "gpu id": (["--gpus", "7"], ["GPU id 7 is out of range"]),
        "bad flag": (["--template", "nope"], ["--template: invalid choice: 'nope'"]),
        "other config": (["--outdir", str(out), "--hidden-dtype", "bf16"],
                         ["another configuration", "dtype: 'fp32'"]),
    }[case]
    base = dump_args(data, tmp_path / "out", "--hidden-dtype", "fp32", "--shard_size", "2")
    assert_one_error_line(run_cli(*base, *args), *needles)
    assert len(shard_files(out)) == 3  # the existing data is untouched


def test_overwrite_starts_over(fp32_dump, tmp_path):
    data, out = fp32_dump
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    small = write_sharegpt(tmp_path / "one.json", 1)
    result = allocation.main(dump_args(small, copy, "--hidden-dtype", "fp32", "--overwrite"))
    assert result["conversations"] == 1 and [p.name for p in shard_files(copy)] == ["shard_000000.safetensors"]


# ---- eval mode ---------------------------------------------------------------------------------------------------

def test_greedy_generate_matches_plain_decoding(smollm2_base, smollm2_tokenizer):
    template = get_template(smollm2_tokenizer)
    prompt = template.encode_prompt([{"role": "user", "content": "Name three colours."}])
    ours = greedy_generate(smollm2_base, prompt, template.stop_token_ids, 12)
    plain = generate_plain(smollm2_base, prompt, max_new_tokens=12, stop_token_ids=template.stop_token_ids).tokens
    assert ours == [t for t in plain if t not in template.stop_token_ids]


def test_eval_mode_answers_and_dumps(tmp_path, smollm2_tokenizer):
    questions = tmp_path / "questions.jsonl"
    questions.write_text("\n".join(json.dumps(q) for q in [
        {"question_id": 7, "category": "writing", "turns": ["Say hi.", "Say bye."]},
        {"question_id": 9, "category": "qa", "turns": ["What is 2+2?"]}]))
    out = tmp_path / "eval"
    allocation.main(["--model_path", SMOLLM2, "--outdir", str(out), "--eval", "--question-file", str(questions),
                     "--max-new-tokens", "6", "--max_len", str(MAX_LEN)])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["mode"] == "eval" and manifest["max_new_tokens"] == 6
    convs = read_shards(out)
    assert sorted(c["id"] for c in convs) == ["question_7", "question_9"]
    for conv in convs:
        text = smollm2_tokenizer.decode(conv["input_ids"].tolist())
        turns = 2 if conv["id"] == "question_7" else 1
        assert text.count("<|im_start|>assistant") == turns and conv["loss_mask"].sum() > 0


# ---- the dataset ---------------------------------------------------------------------------------------------------

def test_dataset_reads_lazily(fp32_dump, monkeypatch):
    _, out = fp32_dump
    calls = []
    real = dataset_module.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.handle = real(*args, **kwargs)

        def get_tensor(self, key):
            calls.append(("tensor", key))
            return self.handle.get_tensor(key)

        def get_slice(self, key):
            calls.append(("slice", key))
            return self.handle.get_slice(key)

    monkeypatch.setattr(dataset_module, "safe_open", Spy)
    ds = HiddenStateDataset(out, max_len=10)
    assert {key for kind, key in calls if kind == "tensor"} == {"offsets"}
    item = ds[1]
    assert ("tensor", "hidden_prenorm") not in calls
    assert item["hidden_prenorm"].shape == (10, 576) and item["input_ids"].dtype == torch.long
    expected = read_shards(out)[1]
    assert torch.equal(item["hidden_prenorm"], expected["hidden_prenorm"][:10])
    assert torch.equal(item["loss_mask"], expected["loss_mask"][:10].long())


def test_dataset_split_is_deterministic(fp32_dump):
    _, out = fp32_dump
    every = HiddenStateDataset(out)
    train = HiddenStateDataset(out, split="train", test_fraction=0.5, seed=3)
    test = HiddenStateDataset(out, split="test", test_fraction=0.5, seed=3)
    assert len(every) == 4 and len(test) == math.ceil(0.5 * 4)
    assert sorted(train.items + test.items) == every.items and not set(train.items) & set(test.items)
    assert train.items == sorted(train.items) and test.items == sorted(test.items)
    assert HiddenStateDataset(out, split="test", test_fraction=0.5, seed=3).items == test.items
    assert len({tuple(HiddenStateDataset(out, split="test", test_fraction=0.5, seed=s).items)
                for s in range(10)}) > 1


def test_collate_pads_right(fp32_dump):
    _, out = fp32_dump
    ds = HiddenStateDataset(out)
    items = [ds[i] for i in range(len(ds))]
    batch = collate(items)
    lengths = [len(item["input_ids"]) for item in items]
    assert lengths == ds.lengths and len(set(lengths)) > 1
    assert batch["input_ids"].shape == (4, max(lengths)) and batch["hidden_prenorm"].shape == (4, max(lengths), 576)
    for row, item in enumerate(items):
        n = lengths[row]
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert torch.equal(batch["hidden_prenorm"][row, :n], item["hidden_prenorm"])
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert not batch["input_ids"][row, n:].any() and not batch["loss_mask"][row, n:].any()
        assert not batch["hidden_prenorm"][row, n:].any()


def test_dataset_in_dataloader_workers(fp32_dump):
    _, out = fp32_dump
    ds = HiddenStateDataset(out)
    ds[0]  # an open handle in the parent must not travel to the workers
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[2]["hidden_prenorm"], ds[2]["hidden_prenorm"])
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate)
    assert sum(int(b["attention_mask"].sum()) for b in loader) == sum(ds.lengths)


def test_dataset_errors(fp32_dump, tmp_path):
    _, out = fp32_dump
    ds = HiddenStateDataset(out)
    assert ds.manifest["hidden_size"] == 576
    ds.check_compatible(576, 49152, SMOLLM2)
    ds.check_compatible(576, 49152, str(resolve_model_path(SMOLLM2)) + "/")
    with pytest.raises(CloverError, match="another base model .*hidden_size 576 != 64"):
        ds.check_compatible(64, 49152)
    with pytest.raises(CloverError, match="another base model"):
        ds.check_compatible(576, 49152, "some-other-model")
    with pytest.raises(CloverError, match="no training data in .*clover data"):
        HiddenStateDataset(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "shard_000001.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CloverError, match="corrupt shard .*shard_000001.safetensors"):
        HiddenStateDataset(broken)
