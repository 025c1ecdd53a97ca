"""Draft training on a tiny random Llama: the loss goes down for both drafts, an interrupted and resumed run ends
with the same weights as an uninterrupted one, checkpoint retention, ``final/`` loads strictly, bad input gives a
one-line error, and a real two-process CPU launch.

The data is dumped with the real worker code (``dump_shard``, ``write_shard``, ``write_manifest``) and the tiny base's
real forward; since the tiny base has no tokenizer, messages carry token ids and a stand-in template reads them.
"""
from __future__ import annotations

import json
import math
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clover.data.conversations import Conversation
from clover.ge_data.allocation import write_manifest
from clover.ge_data.dataset import HiddenStateDataset, collate, shard_path
from clover.ge_data.worker import WorkerJob, dump_shard, greedy_generate, write_shard
from clover.model.base import BaseModel
from clover.model.checkpoint import init_draft, load_draft, read_draft_config, save_draft
from clover.train.evaluate import chain_counts, evaluate, model_inputs
from tests.conftest import save_tiny

# Runs compared bit for bit are separate processes, so nothing may be chosen by timing in each: the base model's
# few-row matmul kernels (online runs) are pinned here and the autocast dtype by PINNED_DTYPE (--dtype auto times bf16
# against fp32 in each process; on a machine where the two are close, fresh runs can differ).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CLOVER_ONE_ROW_KERNEL": "packed",
       "CLOVER_FEW_ROWS_KERNEL": "packed"}
PINNED_DTYPE = ["--dtype", "fp32"]
FAST = ["--bs", "4", "--num_workers", "0", "--warmup_steps", "2", "--lr", "3e-3", "--test_fraction", "0.1",
        *PINNED_DTYPE]


class IdTemplate:
    """Stand-in chat template for a tokenizer-less base: message contents are lists of token ids; the loss mask is 1
    on assistant tokens."""

    name = "ids"

    def encode_with_mask(self, messages, max_len):
        ids, mask = [], []
        for m in messages:
            ids += m["content"]
            mask += [int(m["role"] == "assistant")] * len(m["content"])
        return ids[:max_len], mask[:max_len]


def dump(base_dir: Path, outdir: Path, n: int, seed: int, shard_size: int = 8) -> Path:
    """``n`` conversations (a random prompt, then the tiny base's greedy answer) dumped like the real allocation."""
    base = BaseModel.from_pretrained(base_dir, dtype="fp32", max_len=128)
    gen = torch.Generator().manual_seed(seed)
    convs = []
    for i in range(n):
        prompt = torch.randint(3, base.args.vocab_size, (int(torch.randint(4, 10, (1,), generator=gen)),),
                               generator=gen).tolist()
        answer = greedy_generate(base, prompt, (), int(torch.randint(12, 30, (1,), generator=gen)))
        convs.append(Conversation(f"c{i}", i, [{"role": "user", "content": prompt},
                                               {"role": "assistant", "content": answer}]))
    outdir.mkdir(parents=True)
    job = WorkerJob(worker=0, model=str(base_dir), device="cpu", hidden_dtype="bf16", compute_dtype="fp32",
                    template="ids", max_len=128, outdir=str(outdir))
    for j in range(0, n, shard_size):
        tensors, metadata = dump_shard(base, IdTemplate(), convs[j:j + shard_size], job)
        write_shard(shard_path(outdir, j // shard_size), tensors, metadata)
    manifest = {"base_model": str(base_dir), "base_folder": str(Path(base_dir).resolve()), "hidden_size":
                base.args.hidden_size, "vocab_size": base.args.vocab_size, "template": "ids", "dtype": "bf16",
                "max_len": 128, "num_shards": -(-n // shard_size)}
    write_manifest(outdir, manifest)
    return outdir


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight the training subprocesses for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    base_dir = save_tiny(root / "base", "llama")
    return {"root": root, "base": base_dir, "data": dump(base_dir, root / "data", 32, seed=1),
            "eval": dump(base_dir, root / "eval", 8, seed=2)}


def launch(module: str, *args, launcher=(sys.executable, "-m"), env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, f"clover.train.{module}", *map(str, args)], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=600)


def common(s, cpdir, *extra):
    return ["--basepath", s["base"], "--tmpdir", s["data"], "--cpdir", cpdir, *FAST, *extra]


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def train_metrics(draft, s) -> dict:
    data = HiddenStateDataset(s["data"], split="train", test_fraction=0.1)
    return evaluate(draft, data, 4, "predicted").summary()


@pytest.mark.parametrize("module,draft_type", [("main_clover2", "clover2"), ("main", "eagle")])
def test_loss_goes_down_and_checkpoints(setup, module, draft_type):
    s = setup
    cpdir = s["root"] / f"ckpt_{draft_type}"
    result = ok(launch(module, *common(s, cpdir, "--epochs", "6", "--keep_last", "2", "--resume",
                                       "--evaldata", s["eval"])))
    assert "no checkpoint in" in result.stdout  # --resume without a checkpoint starts fresh, with a note
    assert sorted(p.name for p in cpdir.glob("epoch_*")) == ["epoch_5", "epoch_6"]  # --keep_last 2
    assert json.loads((cpdir / "epoch_6" / "trainer_state" / "trainer.json").read_text())["epoch"] == 6
    history = [json.loads(line) for line in (cpdir / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1]["test_loss"] < history[0]["test_loss"]
    assert len(history[-1]["chain_acc"]) == 5  # Clover-2: one depth per head; EAGLE: the tree depth
    assert all(0 <= a <= 1 for a in history[-1]["chain_acc"])

    base = BaseModel.from_pretrained(s["base"], dtype="fp32", max_len=1)
    before = train_metrics(init_draft(draft_type, base), s)
    final = load_draft(cpdir / "final", base, expected_type=draft_type)  # strict keys
    after = train_metrics(final, s)
    assert after["loss"] < 0.9 * before["loss"] and after["top1_0"] > before["top1_0"]
    assert set(weights(cpdir / "final")) == set(final.state_dict())  # trainable weights only
    for name, tensor in weights(cpdir / "epoch_6").items():
        assert torch.equal(tensor, weights(cpdir / "final")[name])


@pytest.mark.parametrize("draft_type", ["clover2", "eagle"])
def test_chain_accuracy_follows_generation(setup, draft_type):
    """The vectorised chain equals the generation runner's greedy chain at every position, and the counts equal a
    per-position reference: depth k of position t counts when tokens t+2..t+2+k are reply tokens and the data
    follows the base's greedy tokens up to t+1+k; it is correct when draft tokens 0..k equal the base's greedy
    tokens."""
    base = BaseModel.from_pretrained(setup["base"], dtype="fp32", max_len=1)
    torch.manual_seed(0)
    draft = init_draft(draft_type, base, **({"num_heads": 3} if draft_type == "clover2" else {})).eval()
    data = HiddenStateDataset(setup["eval"])
    batch = collate([data[i] for i in range(3)])
    hidden, next_ids, post = model_inputs(draft, batch)
    lengths = batch["attention_mask"].sum(1).tolist()
    chain = draft.greedy_chain(hidden, next_ids, lengths)
    runner = draft.runner()
    for t in range(0, lengths[0], 5):
        draft.allocate_cache(64)
        runner.reset()
        tokens = [int(runner.start(hidden[:1, :t + 1], next_ids[:1, :t + 1]).argmax())]
        for depth in range(1, chain.shape[0]):
            tokens.append(int(runner.expand(torch.tensor([0]), torch.tensor(tokens[-1:]), depth).argmax()))
        assert chain[:, 0, t].tolist() == tokens, t

    greedy_tokens = draft.lm_logits(post).argmax(-1)
    ids, mask = batch["input_ids"], batch["loss_mask"]
    correct, total = torch.zeros(chain.shape[0]), torch.zeros(chain.shape[0])
    for row, n in enumerate(lengths):
        for t in range(n):
            for k in range(chain.shape[0]):
                if t + 2 + k >= n or not all(mask[row, t + 2 + j] for j in range(k + 1)) or not all(
                        ids[row, t + 2 + j] == greedy_tokens[row, t + 1 + j] for j in range(k)):
                    break
                total[k] += 1
                correct[k] += all(chain[j, row, t] == greedy_tokens[row, t + 1 + j] for j in range(k + 1))
    counts = chain_counts(draft, torch.utils.data.Subset(data, range(3)), 4)
    assert counts.tolist() == [correct.tolist(), total.tolist()]
    assert total[0] > 0


@pytest.mark.parametrize("module,draft_type", [("main_clover2", "clover2"), ("main", "eagle")])
def test_draft_vocabulary_from_the_training_replies(setup, module, draft_type):
    """``--draft_vocab_size K``: the draft vocabulary is the K most frequent reply tokens of the training split, is
    saved with the draft, and training with it lowers the loss."""
    from clover.model.checkpoint import top_tokens

    s = setup
    cpdir = s["root"] / f"vocab_{draft_type}"
    result = ok(launch(module, *common(s, cpdir, "--epochs", "4", "--draft_vocab_size", "48")))
    assert "the 48 most frequent reply tokens cover" in result.stdout
    base = BaseModel.from_pretrained(s["base"], dtype="fp32", max_len=1)
    final = load_draft(cpdir / "final", base, expected_type=draft_type)
    counts = HiddenStateDataset(s["data"], split="train", test_fraction=0.1).token_counts(base.args.vocab_size)
    assert torch.equal(final.draft_vocab, top_tokens(counts, 48))
    assert final.config[final.config_block]["draft_vocab_size"] == 48
    history = [json.loads(line) for line in (cpdir / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["test_loss"] < history[0]["test_loss"]


def same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.mark.parametrize("module", ["main_clover2", "main"])  # EAGLE-1 draws training noise: the RNG must resume too
def test_resume_inside_an_epoch_gives_the_same_weights(setup, module):
    s = setup
    straight, interrupted = s["root"] / f"straight_{module}", s["root"] / f"interrupted_{module}"
    ok(launch(module, *common(s, straight, "--epochs", "2")))
    steps = json.loads((straight / "epoch_1" / "trainer_state" / "trainer.json").read_text())["global_step"]
    # stop two optimizer steps into epoch 2: epoch_1 and a step checkpoint inside epoch 2
    ok(launch(module, *common(s, interrupted, "--epochs", "2", "--max_steps", steps + 2)))
    assert sorted(p.name for p in interrupted.glob("epoch_*")) == ["epoch_1"]
    progress = json.loads((interrupted / f"step_{steps + 2}" / "trainer_state" / "trainer.json").read_text())
    assert progress["epoch"] == 1 and progress["batches_done"] == 2
    result = ok(launch(module, *common(s, interrupted, "--epochs", "2", "--resume")))
    assert f"resumed from {interrupted / f'step_{steps + 2}'}" in result.stdout
    assert not list(interrupted.glob("step_*"))  # superseded by epoch_2
    for folder in ("epoch_2", "final"):
        same_weights(straight / folder, interrupted / folder)
    # the epoch's metrics line covers the whole epoch, the part before the stop included
    lines = [json.loads(x) for x in (interrupted / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()][-1]
    assert lines[-1]["train_loss"] == pytest.approx(want["train_loss"], rel=1e-6)
    # and from an epoch's end
    again = s["root"] / f"again_{module}"
    shutil.copytree(interrupted / "epoch_1", again / "epoch_1")
    ok(launch(module, *common(s, again, "--epochs", "2", "--resume")))
    same_weights(straight / "final", again / "final")


def test_a_wsd_run_extends_from_its_stable_checkpoint(setup):
    """Resuming a 2-epoch warmup-stable-decay run from stable/ with 3 epochs ends exactly where a 3-epoch run does."""
    s = setup
    two, three, extended = (s["root"] / name for name in ("wsd2", "wsd3", "wsd_extended"))
    wsd = ["--schedule", "wsd", "--decay-fraction", "0.25"]
    ok(launch("main", *common(s, two, "--epochs", "2", *wsd)))
    progress = json.loads((two / "stable" / "trainer_state" / "trainer.json").read_text())
    steps = 2 * json.loads((two / "epoch_1" / "trainer_state" / "trainer.json").read_text())["global_step"]
    assert progress["global_step"] == steps - round(0.25 * steps)
    ok(launch("main", *common(s, three, "--epochs", "3", *wsd)))
    ok(launch("main", *common(s, extended, "--epochs", "3", *wsd, "--resume-from", two / "stable")))
    same_weights(three / "final", extended / "final")


def test_a_run_starts_from_a_given_draft(setup):
    """--init-draft: the run starts from that draft's weights and config (with lr 0 it ends exactly there), whose draft
    vocabulary it keeps; the run's own result can then be continued the same way."""
    s = setup
    first, still, further = (s["root"] / name for name in ("init_first", "init_still", "init_further"))
    ok(launch("main_clover2", *common(s, first, "--epochs", "1", "--draft-vocab-size", "50")))
    ok(launch("main_clover2", *common(s, still, "--epochs", "1", "--init-draft", first / "final", "--lr", "0")))
    same_weights(first / "final", still / "final")
    ok(launch("main_clover2", *common(s, further, "--epochs", "2", "--init-draft", first / "final")))
    before, after = (json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]) for d in (first, further))
    assert after["test_loss"] < before["test_loss"]
    assert json.loads((further / "final" / "config.json").read_text()) == \
        json.loads((first / "final" / "config.json").read_text())


def test_resuming_loads_no_pickle(setup, monkeypatch, tmp_path):
    """Checkpoints hold safetensors and JSON only, and a resume (in this process) never unpickles anything."""
    import pickle

    from clover.train.cli import build_parser
    from clover.train.trainer import train

    s = setup
    cpdir = tmp_path / "ckpt"
    ok(launch("main", *common(s, cpdir, "--epochs", "2", "--max_steps", "3")))
    files = [p for p in cpdir.rglob("*") if p.is_file() and "logs" not in p.parts]
    assert files and {p.suffix for p in files} <= {".json", ".jsonl", ".safetensors"}, files

    def refuse(*args, **kwargs):
        raise AssertionError("a resume unpickled something")

    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    args = build_parser("eagle").parse_args(list(map(str, common(s, cpdir, "--epochs", "2", "--resume"))))
    history = train(args, "eagle")
    assert history[-1]["epoch"] == 2 and (cpdir / "epoch_2").is_dir()


def test_a_resume_takes_the_draft_vocabulary_and_token_scale_from_its_checkpoint(setup, monkeypatch):
    """A resumed Clover-2 run neither counts the training replies' tokens for its draft vocabulary nor runs the base
    over training data to measure its token_scale (online, a base forward over 32 conversations): the checkpoint
    has both, and its weights replace the new draft's."""
    from clover.train import trainer
    from clover.train.cli import build_parser

    s = setup
    cpdir = s["root"] / "resume_kept"
    flags = ("--epochs", "2", "--draft_vocab_size", "48")
    ok(launch("main_clover2", *common(s, cpdir, *flags, "--max_steps", "3")))
    (stopped,) = cpdir.glob("step_*")
    saved_vocab = weights(stopped)["draft_vocab"]
    saved_scale = read_draft_config(stopped)["clover"]["token_scale"]

    def refuse(*args, **kwargs):
        raise AssertionError("a resume measured the training data again")

    monkeypatch.setattr(trainer, "hidden_sample", refuse)
    monkeypatch.setattr(HiddenStateDataset, "token_counts", refuse)
    args = build_parser("clover2").parse_args(list(map(str, common(s, cpdir, *flags, "--resume"))))
    assert trainer.train(args, "clover2")[-1]["epoch"] == 2
    assert torch.equal(weights(cpdir / "final")["draft_vocab"], saved_vocab)
    assert read_draft_config(cpdir / "final")["clover"]["token_scale"] == saved_scale


def test_max_time_stops_with_a_checkpoint_to_resume(setup):
    s = setup
    cpdir = s["root"] / "timed"
    result = ok(launch("main", *common(s, cpdir, "--epochs", "1", "--max-time", "0", "--snapshot-every", "1")))
    assert "stopped by --max-time" in result.stdout
    assert [p.name for p in cpdir.glob("step_*")] == ["step_1"] and (cpdir / "final").is_dir()
    assert [p.name for p in (cpdir / "snapshots").iterdir()] == ["step_1"]
    ok(launch("main", *common(s, cpdir, "--epochs", "1", "--resume")))
    assert (cpdir / "epoch_1").is_dir() and not list(cpdir.glob("step_*"))


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_bad_input_is_a_one_line_error(setup, tmp_path):
    s = setup
    empty = tmp_path / "empty"
    empty.mkdir()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not training data")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(s["data"], corrupt)
    shard_path(corrupt, 1).write_bytes(b"\x00" * 100)
    other_base = save_tiny(tmp_path / "other_base", "llama", hidden_size=32, vocab_size=101)
    other_data = dump(other_base, tmp_path / "other_data", 4, seed=3)
    eagle_ckpt = tmp_path / "eagle_ckpt"  # what --resume finds: a completed epoch of an EAGLE run
    save_draft(init_draft("eagle", BaseModel.from_pretrained(s["base"], dtype="fp32", max_len=1)),
               eagle_ckpt / "epoch_1")
    (eagle_ckpt / "epoch_1" / "trainer_state").mkdir()
    progress = {"epoch": 1, "global_step": 7, "seed": 0, "test_fraction": 0.1}
    (eagle_ckpt / "epoch_1" / "trainer_state" / "trainer.json").write_text(json.dumps(progress))
    cases = {
        "empty": (common(s, tmp_path / "c1", "--tmpdir", empty), "no training data"),
        "foreign": (common(s, tmp_path / "c2", "--tmpdir", foreign), "no training data"),
        "corrupt": (common(s, tmp_path / "c3", "--tmpdir", corrupt), "corrupt shard"),
        "other base": (common(s, tmp_path / "c4", "--tmpdir", other_data), "another base model"),
        "resume type": (common(s, eagle_ckpt, "--resume"), "holds a 'eagle' draft"),
        "no resume": (common(s, eagle_ckpt), "already holds checkpoints (epoch_1)"),
        "not a checkpoint": (common(s, tmp_path / "c6", "--resume-from", empty), "not a checkpoint folder"),
        "bad time": (common(s, tmp_path / "c7", "--max-time", "soon"), "expected a duration"),
        "bad config": (common(s, tmp_path / "c5", "--configpath", tmp_path / "missing.json"), "--configpath"),
        "init with config": (common(s, tmp_path / "c8", "--init-draft", eagle_ckpt / "epoch_1", "--draft-vocab-size",
                                    "50"), "brings its own config and weights; drop --draft-vocab-size"),
        "init of another type": (common(s, tmp_path / "c9", "--init-draft", eagle_ckpt / "epoch_1"),
                                 "'eagle' draft but a 'clover2' draft is needed"),
        "init nowhere": (common(s, tmp_path / "c10", "--init-draft", "no-such-draft"),
                         "neither a checkpoint folder nor a shipped draft"),
    }
    procs = {name: subprocess.Popen([sys.executable, "-m", "clover.train.main_clover2", *map(str, argv)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for name, (argv, _) in cases.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        line = error_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        assert cases[name][1] in line, (name, line)


def test_two_process_cpu_launch(setup):
    """accelerate's multi-process launcher on a machine without GPUs: DDP over gloo (``--cpu`` would start a single
    process unless MPI is set up)."""
    s = setup
    cpdir = s["root"] / "ddp"
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m")
    # 28 training conversations, 2 processes x 5 per batch: an epoch is 3 optimizer steps
    result = ok(launch("main_clover2", *common(s, cpdir, "--epochs", "1", "--max_steps", "3", "--bs", "5"),
                       launcher=launcher, env={"CUDA_VISIBLE_DEVICES": ""}))
    assert "2 process(es)" in result.stdout
    state = cpdir / "epoch_1" / "trainer_state"
    assert json.loads((state / "trainer.json").read_text())["global_step"] == 3
    assert {"rng_0.safetensors", "rng_1.safetensors"} <= {p.name for p in state.iterdir()}  # each process's RNG
    # the LR schedule advanced once per optimizer step, not once per process
    assert json.loads((state / "scheduler.json").read_text())["last_epoch"] == 3
    base = BaseModel.from_pretrained(s["base"], dtype="fp32", max_len=1)
    load_draft(cpdir / "final", base, expected_type="clover2")


# ---- online training (SmolLM2 and its chat template) ---------------------------------------------------------------
def conversations_file(path: Path) -> Path:
    """A few short ShareGPT-schema conversations, one of them two turns long."""
    records = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"Count from {i} to {i + 5}."},
                                                 {"from": "gpt", "value": ", ".join(str(i + k) for k in range(6))}]}
               for i in range(10)]
    records[0]["conversations"] += [{"from": "human", "value": "And back?"},
                                    {"from": "gpt", "value": "5, 4, 3, 2, 1, 0."}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_online_hidden_states_equal_the_dump(smollm2_base, smollm2_tokenizer, tmp_path):
    from clover.data.conversations import load_conversations
    from clover.data.templates import get_template
    from clover.train.data import ConversationDataset, encode

    conversations, _ = load_conversations(conversations_file(tmp_path / "c.jsonl"))
    template = get_template(smollm2_tokenizer)
    job = WorkerJob(worker=0, model="smollm2-135m-instruct", device="cpu", hidden_dtype="fp32",
                    compute_dtype="fp32", template=template.name, max_len=64, outdir=str(tmp_path))
    dumped, _ = dump_shard(smollm2_base, template, conversations, job)
    online = ConversationDataset(encode(conversations, template, 64), smollm2_base, split="all")
    batch = online.collate([online[i] for i in range(len(online))])
    offsets = dumped["offsets"].tolist()
    for row in range(len(online)):
        a, b = offsets[row], offsets[row + 1]
        n = int(batch["attention_mask"][row].sum())
        assert n == b - a
        assert torch.equal(batch["input_ids"][row, :n], dumped["input_ids"][a:b].long())
        assert torch.equal(batch["loss_mask"][row, :n], dumped["loss_mask"][a:b].long())
        assert torch.equal(batch["hidden_prenorm"][row, :n], dumped["hidden_prenorm"][a:b])  # fp32 both
        assert not batch["hidden_prenorm"][row, n:].any()  # zero past the row's end, as the dump's collate pads
    assert not batch["hidden_prenorm"].is_inference()  # autograd may use it


def test_online_training_trains_and_resumes(tmp_path):
    data = conversations_file(tmp_path / "c.jsonl")
    args = ["--conversations", data, "--outdir", tmp_path / "ckpt", "--max-len", "64", "--bs", "2",
            "--num_workers", "0", "--test_fraction", "0.2", "--warmup_steps", "1"]
    result = ok(launch("main", *args, "--epochs", "2", "--max_steps", "3"))
    assert "training EAGLE-1 (" in result.stdout and "on 8 conversations (2 held out)" in result.stdout
    ok(launch("main", *args, "--epochs", "2", "--resume"))
    history = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history][-2:] == [1, 2] and history[-1]["step"] == 8
    assert history[-1]["tokens"] > 0 and "test_top1_0" in history[-1]
    error = launch("main", *args, "--data-dir", tmp_path)
    assert error.returncode == 2 and "not both" in error.stderr


def test_packed_online_training_trains_and_resumes_only_packed(tmp_path):
    """--pack: the 8 training conversations go into fewer rows, a run stops and resumes; resuming without --pack is
    refused (other batches)."""
    data = conversations_file(tmp_path / "c.jsonl")
    args = ["--conversations", data, "--outdir", tmp_path / "ckpt", "--max-len", "160", "--bs", "2", "--pack",
            "--num_workers", "0", "--test_fraction", "0.2", "--warmup_steps", "1", "--epochs", "2"]
    result = ok(launch("main_clover2", *args, "--max_steps", "2"))
    rows = re.search(r"on 8 conversations packed into (\d+) rows \(2 held out\)", result.stdout)
    assert rows and int(rows[1]) < 8
    ok(launch("main_clover2", *args, "--resume"))
    history = [json.loads(line) for line in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["epoch"] == 2 and history[-1]["step"] == 2 * math.ceil(int(rows[1]) / 2)
    error = launch("main_clover2", *[a for a in args if a != "--pack"], "--resume")
    assert error.returncode != 0 and "--pack True there, False now" in error.stderr


def test_a_resumed_run_keeps_its_autocast_and_its_measured_token_scale(tmp_path):
    """--dtype auto resumes in the dtype the run started with (timed again, it could come out the other way), and a
    resumed Clover-2 keeps the token_scale it measured at initialisation, also resumed in another dtype (online, the
    base's states, and so the measurement, depend on the dtype)."""
    data = conversations_file(tmp_path / "c.jsonl")
    args = ["--conversations", data, "--max-len", "64", "--bs", "2", "--num_workers", "0", "--test_fraction", "0.2",
            "--warmup_steps", "1", "--epochs", "2"]
    scale = {}
    for dtype, autocast in (("bf16", "autocast bf16"), ("fp32", "autocast off (fp32)")):
        out = tmp_path / dtype
        ok(launch("main_clover2", *args, "--outdir", out, "--dtype", dtype, "--max_steps", "1"))
        scale[dtype] = read_draft_config(out / "step_1")["clover"]["token_scale"]
        result = ok(launch("main_clover2", *args, "--outdir", out, "--resume", "--max_steps", "2"))  # --dtype auto
        assert autocast in result.stdout
    assert scale["bf16"] != scale["fp32"]  # measured again in fp32, the bf16 run's config would not match
    result = ok(launch("main_clover2", *args, "--outdir", tmp_path / "bf16", "--resume", "--dtype", "fp32"))
    assert "autocast off (fp32)" in result.stdout
    assert read_draft_config(tmp_path / "bf16" / "final")["clover"]["token_scale"] == scale["bf16"]


def test_drafts_trained_together_equal_drafts_trained_alone(tmp_path):
    """clover train clover2,eagle: one base pass for both drafts, each ending exactly where it ends trained alone, also
    when the joint run is stopped and resumed."""
    data = conversations_file(tmp_path / "c.jsonl")
    args = ["--conversations", data, "--max-len", "64", "--bs", "2", "--num_workers", "0", "--test_fraction", "0.2",
            "--warmup_steps", "1", "--epochs", "2", "--lr", "1e-3", *PINNED_DTYPE]
    for module, draft_type in (("main_clover2", "clover2"), ("main", "eagle")):
        ok(launch(module, *args, "--outdir", tmp_path / "alone" / draft_type))
    joint = ["clover2,eagle", *args, "--outdir", tmp_path / "together"]
    ok(launch("joint", *joint, "--max_steps", "5"))  # inside epoch 2 (4 optimizer steps an epoch)
    result = ok(launch("joint", *joint, "--resume"))
    assert result.stdout.count("resumed from") == 2
    batches = re.search(r"the base model computed (\d+) of the (\d+) batches the 2 drafts read", result.stdout)
    assert batches and 2 * int(batches[1]) <= int(batches[2])  # each batch's states computed once at most
    for draft_type in ("clover2", "eagle"):
        same_weights(tmp_path / "alone" / draft_type / "final", tmp_path / "together" / draft_type / "final")
        alone, together = ((tmp_path / where / draft_type / "metrics.jsonl").read_text().splitlines()[-1]
                           for where in ("alone", "together"))
        assert json.loads(alone)["test_loss"] == json.loads(together)["test_loss"]
    error = launch("joint", "clover2,clover2", *args, "--outdir", tmp_path / "x")
    assert error.returncode == 2 and "two or more different draft types" in error.stderr


def test_drafts_trained_together_from_a_dump(setup):
    """The same from dumped shards (no base pass to share; the drafts still take turns on the same batches)."""
    s = setup
    root = s["root"] / "together_offline"
    for module, draft_type in (("main_clover2", "clover2"), ("main", "eagle")):
        ok(launch(module, *common(s, root / "alone" / draft_type, "--epochs", "1")))
    ok(launch("joint", "clover2,eagle", *common(s, root / "together", "--epochs", "1")))
    for draft_type in ("clover2", "eagle"):
        same_weights(root / "alone" / draft_type / "final", root / "together" / draft_type / "final")
