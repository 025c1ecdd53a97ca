"""The regeneration worker: one process's share of the shards of ``python -m clover.ge_data.regenerate``, decoded
with batched decoding (:class:`clover.generate.batched.BatchedDecoder`) and written atomically, one shard at a time.
"""
from __future__ import annotations

import json
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from clover.data.conversations import Conversation
from clover.data.templates import get_template
from clover.errors import CloverError
from clover.generate.batched import BatchedDecoder, Request
from clover.generate.sampling import SamplingParams
from clover.io import write_json, write_text
from clover.model.base import BaseModel
from clover.model.loading import load_tokenizer

SKIP_LONG_PROMPT = "first prompt + --max-new-tokens over --max-len"
SKIP_EMPTY_REPLY = "empty first reply"
CUT_LONG_PROMPT = "later prompt + --max-new-tokens over --max-len"
CUT_EMPTY_REPLY = "empty later reply"
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


def shard_path(outdir, index: int) -> Path:
    return Path(outdir) / f"shard_{index:06d}.jsonl"


def stats_path(outdir, index: int) -> Path:
    return Path(outdir) / f"shard_{index:06d}.stats.json"


@dataclass
class RegenJob:
    worker: int  # index (also the tqdm bar's position)
    model: str
    device: str
    dtype: str
    template: str
    max_len: int  # the longest sequence, prompt + reply
    max_new_tokens: int
    batch_size: int
    sampling: dict  # SamplingParams fields
    seed: int
    outdir: str
    shards: list[tuple[int, list[Conversation]]] = field(default_factory=list)
    threads: int | None = None


class _Dialogue:
    """One conversation being regenerated: its user turns, the messages so far and each reply's finish reason."""

    def __init__(self, shard: int, slot: int, conv: Conversation):
        self.shard, self.slot, self.conv = shard, slot, conv
        system = conv.messages[:1] if conv.messages[0]["role"] == "system" else []
        self.messages = list(system)
        self.questions = [m for m in conv.messages if m["role"] == "user"]
        self.finish: list[str] = []
        self.outcome = ""  # "" (kept whole), or why it was skipped or cut short

    def next_messages(self) -> list[dict] | None:
        """The conversation so far with its next user turn, or None after the last one."""
        k = len(self.finish)
        return self.messages + [self.questions[k]] if k < len(self.questions) else None

    def record(self) -> dict:
        turns = [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in self.messages]
        return {"id": self.conv.id, "conversations": turns}


def longest_first(shard: int, convs: list[Conversation]) -> list[_Dialogue]:
    """A shard's dialogues, those with the most user turns first (ties in shard order).

    A conversation's turns are decoded one after another, so one with many turns is a long chain of steps; started
    last, it would keep a few rows busy long after the rest of the batch has finished. Started first, it overlaps
    with the short ones (longest processing time first). Records are still written in shard order."""
    dialogues = [_Dialogue(shard, slot, conv) for slot, conv in enumerate(convs)]
    return sorted(dialogues, key=lambda d: -len(d.questions))


def run_worker(job: RegenJob, on_shard=None) -> dict:
    """Regenerate every shard of ``job``; ``on_shard(index)`` after each shard is on disk. Returns the reply tokens
    generated and the seconds spent after loading the model."""
    if job.threads:
        torch.set_num_threads(job.threads)
    template = get_template(load_tokenizer(job.model), job.template)
    tokenizer = template.tokenizer
    base = BaseModel.from_pretrained(job.model, dtype=job.dtype, device=job.device, max_len=1)  # the batch cache
    params = SamplingParams(job.sampling["temperature"], job.sampling["top_p"], job.sampling["top_k"])
    generator = torch.Generator(device=base.device).manual_seed(job.seed + job.worker)
    decoder = BatchedDecoder(base, job.batch_size, job.max_len, job.max_new_tokens,
                             template.stop_token_ids, params, generator)
    remaining = {index: len(convs) for index, convs in job.shards}
    finished: dict[int, list[_Dialogue | None]] = {index: [None] * len(convs) for index, convs in job.shards}
    fresh = iter([d for index, convs in job.shards for d in longest_first(index, convs)])
    follow_ups: deque[Request] = deque()  # next turns go first, into the row their previous turn just left
    start = time.perf_counter()
    bar = tqdm(total=sum(remaining.values()), desc=f"worker {job.worker}", unit="conv", position=job.worker,
               leave=True, dynamic_ncols=True)

    def prompt_for(dialogue: _Dialogue) -> Request | None:
        messages = dialogue.next_messages()
        if messages is None:
            return None
        try:
            ids = template.encode_prompt(messages)
        except CloverError as err:
            raise CloverError(f"conversation {dialogue.conv.id!r} (record {dialogue.conv.index}): {err}") from None
        if len(ids) + job.max_new_tokens > job.max_len:
            dialogue.outcome = SKIP_LONG_PROMPT if not dialogue.finish else CUT_LONG_PROMPT
            return None
        return Request(ids, tag=dialogue)

    def close(dialogue: _Dialogue) -> None:
        finished[dialogue.shard][dialogue.slot] = dialogue
        remaining[dialogue.shard] -= 1
        bar.update()
        if remaining[dialogue.shard] == 0:
            write_shard(job.outdir, dialogue.shard, finished.pop(dialogue.shard), time.perf_counter() - start)
            if on_shard is not None:
                on_shard(dialogue.shard)

    def source() -> Request | None:
        if follow_ups:
            return follow_ups.popleft()
        for dialogue in fresh:
            request = prompt_for(dialogue)
            if request is not None:
                return request
            close(dialogue)  # skipped before its first turn
        return None

    try:
        for done in decoder.run(source):
            dialogue = done.tag
            reply = tokenizer.decode(done.tokens, skip_special_tokens=True)
            if reply.strip():
                dialogue.messages += [dialogue.questions[len(dialogue.finish)],
                                      {"role": "assistant", "content": reply}]
                dialogue.finish.append(done.finish_reason)
                request = prompt_for(dialogue)
            else:
                dialogue.outcome, request = SKIP_EMPTY_REPLY if not dialogue.finish else CUT_EMPTY_REPLY, None
            if request is not None:
                follow_ups.append(request)
            else:
                close(dialogue)
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{decoder.stats['new_tokens'] / elapsed:.0f} tok/s", refresh=False)
    finally:
        bar.close()
    return {"tokens": decoder.stats["new_tokens"], "seconds": time.perf_counter() - start, **decoder.stats}


def write_shard(outdir, index: int, dialogues: list[_Dialogue], seconds: float) -> None:
    """Write a shard's statistics, then its records, each atomically; the shard counts as done once its
    ``.jsonl`` file exists."""
    kept = [d for d in dialogues if d.finish]
    skipped = Counter(d.outcome for d in dialogues if not d.finish)
    cut = Counter(d.outcome for d in kept if d.outcome)
    stats = {"conversations": len(kept), "turns": sum(len(d.finish) for d in kept), "skipped": dict(skipped),
             "cut_short": dict(cut), "finish_reasons": dict(Counter(r for d in kept for r in d.finish)),
             "per_turn": [[d.conv.id, d.conv.index, d.finish] for d in kept], "worker_seconds": round(seconds, 3)}
    text = "".join(json.dumps(d.record(), ensure_ascii=False) + "\n" for d in kept)
    try:
        write_json(stats_path(outdir, index), stats)
        write_text(shard_path(outdir, index), text)
    except OSError as err:
        raise CloverError(f"cannot write {shard_path(outdir, index)}: {err.strerror or err} (disk full or folder "
                          f"not writable?); free space and rerun the same command to resume") from None
