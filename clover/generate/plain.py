"""Plain autoregressive decoding on the project's runtime (the baseline every speculative number is compared with)."""
from __future__ import annotations

import time
from typing import Iterator

import torch

from clover.errors import CloverError
from clover.generate.output import GenerationResult, OutputTracker
from clover.generate.sampling import SamplingParams, select_tokens
from clover.model.base import BaseModel


def check_prompt(base: BaseModel, input_ids) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    if ids.numel() == 0:
        raise CloverError("empty prompt: give at least one token")
    if ids.numel() >= base.max_len:
        raise CloverError(f"prompt of {ids.numel()} tokens does not fit the context window of {base.max_len} "
                          f"tokens (shorten it or raise max_len)")
    return ids.to(base.device)


def stream_plain(base: BaseModel, input_ids, params: SamplingParams = SamplingParams(), max_new_tokens: int = 256,
                 stop_token_ids=(), stop_sequences=(), generator: torch.Generator | None = None
                 ) -> Iterator[list[int]]:
    """Yield each new token (as a one-element list); the generator's return value is the GenerationResult."""
    tracker = OutputTracker(max_new_tokens, stop_token_ids, stop_sequences)
    ids = check_prompt(base, input_ids)
    start = time.perf_counter()
    base.reset()
    logits = base(ids, logits_to_keep=1).logits[0, -1]
    while True:
        token = select_tokens(logits, params, generator)
        emitted = tracker.add([int(token)])
        yield emitted
        if tracker.done:
            break
        if base.cache.length + 1 > base.max_len:
            tracker.result.finish_reason = "context"
            break
        logits = base(token.reshape(1, 1), logits_to_keep=1).logits[0, -1]
    tracker.result.wall_time = time.perf_counter() - start
    return tracker.result


def generate_plain(base: BaseModel, input_ids, **kwargs) -> GenerationResult:
    return _drain(stream_plain(base, input_ids, **kwargs))


def _drain(stream) -> GenerationResult:
    while True:
        try:
            next(stream)
        except StopIteration as stop:
            return stop.value
