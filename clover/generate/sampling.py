"""Logits processing (temperature, top-k, top-p) and token selection, shared by plain and speculative decoding."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from clover.errors import CloverError


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` is greedy decoding; otherwise tokens are sampled from the processed distribution."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise CloverError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise CloverError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise CloverError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution tokens are sampled from: softmax(logits / T) restricted to top-k and the top-p nucleus
    (the token that crosses ``top_p`` is kept), renormalised. Works on any leading shape."""
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly higher-ranked tokens
        sorted_p = sorted_p.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def select_tokens(logits: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits [..., V]``: argmax when greedy, else an independent draw per row."""
    if params.greedy:
        return logits.argmax(-1)
    probs = processed_probs(logits, params)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])
