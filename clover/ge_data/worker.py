"""One data-dump worker: load the base model once on its device, then turn each assigned shard of conversations
into token ids, loss masks and pre-norm hidden states and write it atomically (see :mod:`clover.ge_data.dataset`
for the format).

Each conversation runs alone through a stateless full-sequence forward (batch 1, no padding) in the compute dtype
(``--dtype``; auto: fp32 on CPU, where bf16 matmuls are slower, bf16 on CUDA) and the states are rounded once to the
storage dtype (``--hidden-dtype``, bf16 by default). In eval mode the
conversations hold only user turns, which are first answered greedily by the base model, turn by turn.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from clover.data.conversations import Conversation
from clover.data.templates import ChatTemplate, get_template
from clover.errors import CloverError
from clover.ge_data.dataset import shard_path
from clover.generate.plain import generate_plain
from clover.io import save_safetensors
from clover.model.base import DTYPES, BaseModel, parse_dtype
from clover.model.loading import load_tokenizer

SKIP_NO_MASK = "no masked token after truncation"


@dataclass
class WorkerJob:
    worker: int  # index (also the tqdm bar's position)
    model: str  # base model as the user named it
    device: str  # "cpu" or "cuda:N"
    hidden_dtype: str  # storage dtype of the hidden states: bf16 | fp16 | fp32
    compute_dtype: str  # dtype of the forward: fp32 | bf16 | fp16
    template: str
    max_len: int
    outdir: str
    shards: list[tuple[int, list[Conversation]]] = field(default_factory=list)  # (shard index, its conversations)
    threads: int | None = None  # torch threads (CPU workers)
    max_new_tokens: int | None = None  # eval mode: answer each user turn greedily with at most this many tokens


def compute_dtype(choice: str, device: str) -> str:
    """The name of the dtype the forward runs in for ``--dtype choice`` (auto: fp32 on CPU, bf16 on CUDA)."""
    chosen = parse_dtype(choice, torch.device(device))
    return next(name for name, dtype in DTYPES.items() if dtype == chosen)


def run_worker(job: WorkerJob, on_shard=None) -> dict:
    """Dump every shard of ``job``; ``on_shard(index)`` is called after each shard file is in place. Returns the
    tokens dumped and the seconds spent on it after loading the model."""
    if job.threads:
        torch.set_num_threads(job.threads)
    template = get_template(load_tokenizer(job.model), job.template)
    cache = job.max_len + job.max_new_tokens if job.max_new_tokens else 1  # the dump forward does not use the cache
    base = BaseModel.from_pretrained(job.model, dtype=job.compute_dtype, device=job.device,
                                     max_len=cache)
    total = sum(len(convs) for _, convs in job.shards)
    tokens, start = 0, time.perf_counter()
    with tqdm(total=total, desc=f"worker {job.worker}", unit="conv", position=job.worker, leave=True) as bar:
        for index, convs in job.shards:
            tensors, metadata = dump_shard(base, template, convs, job, bar)
            write_shard(shard_path(job.outdir, index), tensors, metadata)
            tokens += tensors["input_ids"].numel()
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):.0f} tok/s")
            if on_shard is not None:
                on_shard(index)
    return {"tokens": tokens, "seconds": time.perf_counter() - start}


def dump_shard(base: BaseModel, template: ChatTemplate, convs: list[Conversation], job: WorkerJob,
               bar=None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The shard tensors and metadata for ``convs``; conversations with no masked token are skipped and counted."""
    start = time.perf_counter()
    ids, masks, hiddens, kept = [], [], [], []
    storage = DTYPES[job.hidden_dtype]
    for conv in convs:
        messages = conv.messages
        if job.max_new_tokens:
            messages = answer_turns(base, template, messages, job.max_new_tokens)
        try:
            conv_ids, mask = template.encode_with_mask(messages, job.max_len)
        except CloverError as err:
            raise CloverError(f"conversation {conv.id!r} (record {conv.index}): {err}") from None
        if any(mask):
            out = base(torch.tensor([conv_ids], device=base.device), use_cache=False, logits_to_keep=0)
            hiddens.append(out.hidden_prenorm[0].to(device="cpu", dtype=storage))
            ids.append(torch.tensor(conv_ids, dtype=torch.int32))
            masks.append(torch.tensor(mask, dtype=torch.uint8))
            kept.append(conv)
        if bar is not None:
            bar.update()
    lengths = torch.tensor([0] + [len(x) for x in ids], dtype=torch.int64)
    hidden_size = base.args.hidden_size
    tensors = {
        "input_ids": torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int32),
        "loss_mask": torch.cat(masks) if masks else torch.zeros(0, dtype=torch.uint8),
        "hidden_prenorm": torch.cat(hiddens) if hiddens else torch.zeros(0, hidden_size, dtype=storage),
        "offsets": lengths.cumsum(0),
        "conv_index": torch.tensor([c.index for c in kept], dtype=torch.int64),
    }
    skipped = len(convs) - len(kept)
    metadata = {
        "conversation_ids": json.dumps([c.id for c in kept]),
        "base_model": job.model,
        "template": template.name,
        "dtype": job.hidden_dtype,
        "conversations": str(len(kept)),
        "tokens": str(tensors["input_ids"].numel()),
        "masked_tokens": str(int(tensors["loss_mask"].sum())),
        "skipped": json.dumps({SKIP_NO_MASK: skipped} if skipped else {}),
        "seconds": f"{time.perf_counter() - start:.3f}",
    }
    return tensors, metadata


def write_shard(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a shard atomically: to a temporary name next to ``path``, flushed to disk, then renamed into place."""
    try:
        save_safetensors(path, tensors, metadata)
    except OSError as err:
        raise CloverError(f"cannot write {path}: {err.strerror or err} (disk full or folder not writable?); "
                          f"free space and rerun the same command to resume") from None


def answer_turns(base: BaseModel, template: ChatTemplate, user_turns: list[dict], max_new_tokens: int) -> list[dict]:
    """The conversation with each user turn answered greedily by the base model, turn by turn."""
    messages = []
    for turn in user_turns:
        messages.append(turn)
        reply = greedy_generate(base, template.encode_prompt(messages), template.stop_token_ids, max_new_tokens)
        messages.append({"role": "assistant", "content": template.tokenizer.decode(reply, skip_special_tokens=True)})
    return messages


def greedy_generate(base: BaseModel, prompt: list[int], stop_token_ids, max_new_tokens: int) -> list[int]:
    """Greedy decoding with the project's plain decoding loop: new token ids, without the stop token; stops at a
    stop token, after ``max_new_tokens`` or when the cache is full."""
    room = min(max_new_tokens, base.max_len - len(prompt))
    if room <= 0:
        return []
    result = generate_plain(base, prompt, max_new_tokens=room, stop_token_ids=stop_token_ids)
    return result.tokens[:-1] if result.finish_reason == "stop" else result.tokens
