"""Batched decoding: many prompts through one base model at once, with continuous batching.

A :class:`BatchedDecoder` keeps ``batch_size`` rows of a :class:`~clover.model.cache.RaggedKVCache` busy. A free row
takes the next request and prefills its prompt alone (batch 1, at the row's own positions); then every step feeds
the last token of every busy row in one ``[B, 1]`` forward, selects the next tokens on the device and reads back one
small tensor (which rows finished). A row that finishes (a stop token, its ``max_new_tokens``, or the row's capacity)
is handed back as a :class:`Completion` and refilled at once. When no request is waiting and at most half the rows
are busy, the idle rows are dropped from the batch, so they stop costing work.

A request whose prompt starts with what a free row already holds (the previous turn of the same conversation: its
prompt and reply) reuses those keys/values and prefills only the rest. Greedy decoding gives, row for row, the
tokens of batch-1 :func:`clover.generate.plain.generate_plain` (up to fp32 rounding; tested token for token).

    for done in BatchedDecoder(base, batch_size=32, max_len=2304, stop_token_ids=[2]).run(requests):
        print(done.tag, done.finish_reason, done.tokens)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from clover.errors import CloverError
from clover.generate.sampling import SamplingParams, select_tokens
from clover.model.base import BaseModel

FINISH_REASONS = ("eos", "length")


@dataclass
class Request:
    prompt: Sequence[int]  # token ids (at least one)
    max_new_tokens: int | None = None  # None: the decoder's max_new_tokens (also the most a request may ask)
    tag: Any = None  # returned with the completion


@dataclass
class Completion:
    tag: Any
    tokens: list[int]  # new token ids, without the stop token
    finish_reason: str  # "eos" (a stop token ended it) or "length" (max_new_tokens or the row's capacity)
    prompt_tokens: int
    reused_tokens: int = 0  # prompt tokens whose keys/values were kept from the row's previous sequence


class BatchedDecoder:
    """Decode requests ``batch_size`` at a time on ``base`` with a cache of ``max_len`` tokens per row.

    ``max_len`` bounds prompt + reply per row (default: the base's own cache capacity; the cache takes
    ``batch_size * max_len`` positions of keys/values). ``stop_token_ids`` end a reply (eos); ``params`` and
    ``generator`` as in :func:`clover.generate.sampling.select_tokens` (one draw per row and step).
    """

    def __init__(self, base: BaseModel, batch_size: int = 8, max_len: int | None = None,
                 max_new_tokens: int = 256, stop_token_ids: Iterable[int] = (),
                 params: SamplingParams = SamplingParams(), generator: torch.Generator | None = None,
                 reuse_prefix: bool = True):
        if batch_size < 1:
            raise CloverError(f"batch size must be at least 1, got {batch_size}")
        if max_new_tokens < 1:
            raise CloverError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        self.base, self.params, self.generator = base, params, generator
        self.max_new_tokens, self.reuse_prefix = max_new_tokens, reuse_prefix
        self.cache = base.batch_cache(batch_size, max_len or base.max_len)
        self.capacity = self.cache.capacity
        device = base.device
        self.stop_set = set(int(i) for i in stop_token_ids)
        self.stop_ids = torch.tensor(sorted(self.stop_set), dtype=torch.long, device=device)
        # per row, on the device: the last selected token (not yet fed), the reply so far, its length and cap,
        # and whether the row has finished
        self.tok = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.out = torch.zeros(batch_size, max_new_tokens, dtype=torch.long, device=device)
        self.count = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.limit = torch.ones(batch_size, dtype=torch.long, device=device)
        self.done = torch.zeros(batch_size, dtype=torch.bool, device=device)
        # per row, on the host
        self.active = np.zeros(batch_size, dtype=bool)
        self.rows: list[dict | None] = [None] * batch_size  # the request's tag, prompt length, reused tokens
        self.history: list[np.ndarray | None] = [None] * batch_size  # the token ids the row's cache holds
        self.stats = {"steps": 0, "new_tokens": 0, "prefill_tokens": 0, "reused_tokens": 0, "completions": 0}

    @property
    def batch_size(self) -> int:
        return self.cache.batch

    # ---- the loop ---------------------------------------------------------------------------------------------
    def run(self, requests: Iterable[Request] | Callable[[], Request | None]) -> Iterator[Completion]:
        """Yield a :class:`Completion` per request, in the order they finish.

        ``requests``: an iterable, or a function called whenever a row is free that returns the next request or
        None when there is none right now (it may have one after the next completion, e.g. a conversation's next
        turn); the run ends when no row is busy and no request comes.
        """
        source = requests if callable(requests) else _puller(iter(requests))
        while True:
            waiting = self._fill(source)
            if not self.active.any():
                return
            finished = np.flatnonzero(self.done.cpu().numpy() & self.active)  # the step's one host sync
            if finished.size:
                yield from self._finish(finished)
                continue
            if not waiting and self.batch_size > 1 and 2 * int(self.active.sum()) <= self.batch_size:
                self._compact()
            self._step()

    def _fill(self, source) -> bool:
        """Give free rows the next requests; False when the source had none for a free row."""
        free = list(np.flatnonzero(~self.active))
        while free:
            request = source()
            if request is None:
                return False
            prompt = np.asarray(request.prompt, dtype=np.int64).reshape(-1)
            row, keep = self._pick_row(free, prompt)
            free.remove(row)
            self._start(row, request, prompt, keep)
        return True

    def _pick_row(self, free: list[int], prompt: np.ndarray) -> tuple[int, int]:
        """The free row whose cached tokens share the longest prefix with ``prompt``, and that prefix's length
        (at most ``len(prompt) - 1``: the last prompt token is always fed, for its logits)."""
        best, best_keep = free[0], 0
        if self.reuse_prefix:
            for row in free:
                held = self.history[row]
                if held is None:
                    continue
                n = min(len(held), len(prompt) - 1)
                same = held[:n] == prompt[:n]
                keep = n if same.all() else int(np.argmin(same))
                if keep > best_keep:
                    best, best_keep = row, keep
        return best, best_keep

    def _start(self, row: int, request: Request, prompt: np.ndarray, keep: int) -> None:
        n = prompt.size
        if n == 0:
            raise CloverError("empty prompt: give at least one token")
        if n >= self.capacity:
            raise CloverError(f"prompt of {n} tokens does not fit the batch rows of {self.capacity} tokens "
                              f"(shorten it or raise max_len)")
        cap = request.max_new_tokens or self.max_new_tokens
        if not 0 < cap <= self.max_new_tokens:
            raise CloverError(f"a request's max_new_tokens must be in 1..{self.max_new_tokens}, got {cap}")
        self.cache.truncate_rows(row, keep)
        ids = torch.from_numpy(prompt[keep:]).to(self.base.device)[None]
        logits = self.base.forward_batch(ids, self.cache, rows=row).logits[0, -1]
        token = select_tokens(logits, self.params, self.generator)
        limit = min(cap, self.capacity - n + 1)  # every token but the last is fed back, and must fit the row
        self.tok[row] = token
        self.out[row, 0] = token
        self.count[row] = 1
        self.limit[row] = limit
        self.done[row] = torch.isin(token, self.stop_ids) | (limit <= 1)
        self.active[row] = True
        self.rows[row] = {"tag": request.tag, "prompt_tokens": n, "reused_tokens": keep}
        self.history[row] = prompt
        self.stats["prefill_tokens"] += n - keep
        self.stats["reused_tokens"] += keep
        self.stats["new_tokens"] += 1

    def _step(self) -> None:
        """One decoding step of every busy row: feed its last token, select the next one on the device."""
        busy = torch.from_numpy(self.active).to(self.base.device)
        logits = self.base.forward_batch(self.tok[:, None], self.cache, n_new=self.active.astype(np.int64)).logits
        token = select_tokens(logits[:, 0], self.params, self.generator)
        self.tok = torch.where(busy, token, self.tok)
        self.out.scatter_(1, self.count.clamp(max=self.max_new_tokens - 1)[:, None], self.tok[:, None])
        self.count += busy
        self.done = torch.isin(self.tok, self.stop_ids) | (self.count >= self.limit)
        self.stats["steps"] += 1
        self.stats["new_tokens"] += int(self.active.sum())

    def _finish(self, rows: np.ndarray) -> Iterator[Completion]:
        index = torch.from_numpy(rows).to(self.base.device)
        counts = self.count.index_select(0, index).tolist()
        replies = self.out.index_select(0, index).tolist()
        for row, count, reply in zip(rows.tolist(), counts, replies):
            tokens = reply[:count]
            eos = tokens[-1] in self.stop_set
            info = self.rows[row]
            self.active[row], self.rows[row] = False, None
            # the cache holds the prompt and every reply token but the last (never fed)
            self.history[row] = np.concatenate([self.history[row], np.asarray(tokens[:-1], dtype=np.int64)])
            self.stats["completions"] += 1
            yield Completion(tag=info["tag"], tokens=tokens[:-1] if eos else tokens,
                             finish_reason="eos" if eos else "length", prompt_tokens=info["prompt_tokens"],
                             reused_tokens=info["reused_tokens"])

    def _compact(self) -> None:
        """Drop the idle rows from the batch (the cache and every per-row tensor shrink to the busy rows)."""
        keep = np.flatnonzero(self.active)
        index = torch.from_numpy(keep).to(self.base.device)
        self.cache.select_rows(keep)
        for name in ("tok", "out", "count", "limit", "done"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.active = self.active[keep]
        self.rows = [self.rows[i] for i in keep]
        self.history = [self.history[i] for i in keep]


def _puller(iterator: Iterator[Request]) -> Callable[[], Request | None]:
    return lambda: next(iterator, None)


def generate_batched(base: BaseModel, prompts: Sequence[Sequence[int]], batch_size: int = 8,
                     max_new_tokens: int = 256, stop_token_ids: Iterable[int] = (),
                     params: SamplingParams = SamplingParams(), generator: torch.Generator | None = None,
                     max_len: int | None = None) -> tuple[list[Completion], dict]:
    """Decode every prompt (rows of ``batch_size``, refilled as they finish); returns the completions in prompt
    order and the run's statistics (steps, new/prefill/reused tokens, seconds)."""
    if max_len is None:
        max_len = min(base.max_len, max((len(p) for p in prompts), default=1) + max_new_tokens)
    decoder = BatchedDecoder(base, min(batch_size, max(len(prompts), 1)), max_len, max_new_tokens, stop_token_ids,
                             params, generator)
    start = time.perf_counter()
    results: list[Completion | None] = [None] * len(prompts)
    for done in decoder.run(Request(p, tag=i) for i, p in enumerate(prompts)):
        results[done.tag] = done
    return results, {**decoder.stats, "seconds": time.perf_counter() - start}
