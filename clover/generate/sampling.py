"""Logits processing (temperature, top-k, top-p) and token selection, shared by plain and speculative decoding."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from clover.errors import CloverError
from clover.model.reduce import argmax, topk


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


# top-p looks for its nucleus among this many most likely tokens first (a top-k, much cheaper on a CPU than sorting
# the whole vocabulary), and sorts everything only for the rows whose nucleus is wider
NUCLEUS_CANDIDATES = 1024


def _candidates(logits: torch.Tensor, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The processed distribution as ``(probs, index)``: softmax(logits / T), restricted to top-k and then to the
    top-p nucleus (the token that crosses ``top_p`` is kept), renormalised. ``probs [..., K]`` gives the probability
    of the vocabulary entries ``index [..., K]``, ranked: the ``NUCLEUS_CANDIDATES`` most likely when every row's
    nucleus is among them, else the whole vocabulary sorted; without top-p, ``index`` is None and ``probs`` covers
    the vocabulary in order."""
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = topk(logits, min(params.top_k, logits.shape[-1]))[0][..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p >= 1:
        return probs, None
    vocab = probs.shape[-1]
    k = min(NUCLEUS_CANDIDATES, vocab)
    sort_all = k == vocab or probs.device.type != "cpu"  # on a GPU sorting is cheap and the check a device sync
    if not sort_all:
        ranked, index = probs.topk(k, dim=-1)  # descending
        total = ranked.cumsum(-1)
        sort_all = not bool((total[..., -1] >= params.top_p).all())  # some nucleus is wider than the candidates
    if sort_all:
        ranked, index = probs.sort(dim=-1, descending=True)
        total = ranked.cumsum(-1)
    before = total - ranked  # mass of strictly higher-ranked tokens
    ranked = ranked.masked_fill(before >= params.top_p, 0.0)
    return ranked / ranked.sum(-1, keepdim=True), index


def processed_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution tokens are sampled from: softmax(logits / T) restricted to top-k and the top-p nucleus
    (the token that crosses ``top_p`` is kept), renormalised, over the whole vocabulary. Works on any leading
    shape."""
    probs, index = _candidates(logits, params)
    if index is None:
        return probs
    return torch.zeros(logits.shape, dtype=probs.dtype, device=probs.device).scatter_(-1, index, probs)


def select_tokens(logits: torch.Tensor, params: SamplingParams,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits [..., V]``: argmax when greedy, else an independent draw per row from
    :func:`processed_probs` (drawn among the nucleus candidates only, without building the full distribution)."""
    if params.greedy:
        return argmax(logits)
    probs, index = _candidates(logits, params)
    flat = probs.reshape(-1, probs.shape[-1])
    # inverse-CDF draw (torch.multinomial costs ~0.25 ms per row on a CPU): u in [0, total), token i drawn when
    # cdf[i-1] <= u < cdf[i], so a token of probability 0 (an empty interval) is never drawn
    cdf = flat.cumsum(-1)
    total = cdf[:, -1:]
    u = torch.rand(flat.shape[0], 1, generator=generator, device=flat.device, dtype=cdf.dtype) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # rounding could give u == total
    draw = torch.searchsorted(cdf, u, right=True)
    if index is not None:
        draw = index.reshape(flat.shape).gather(1, draw)
    return draw.view(probs.shape[:-1])
