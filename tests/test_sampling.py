"""Token selection: the processed distribution (temperature, top-k, top-p nucleus) and draws from it. Top-p looks for
its nucleus among the most likely tokens first; it must give what sorting the whole vocabulary gives, also when a
nucleus is wider than those candidates."""
from __future__ import annotations

import pytest
import torch

from clover.generate import sampling
from clover.generate.sampling import SamplingParams, processed_probs, select_tokens


def sorted_reference(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """softmax(logits / T), top-k, then the top-p nucleus by a full sort (the token crossing top_p kept)."""
    x = logits.float() / params.temperature
    if params.top_k:
        x = x.masked_fill(x < x.topk(params.top_k, dim=-1).values[..., -1:], float("-inf"))
    probs = x.softmax(-1)
    ranked, order = probs.sort(dim=-1, descending=True)
    ranked = ranked.masked_fill(ranked.cumsum(-1) - ranked >= params.top_p, 0.0)
    out = torch.zeros_like(probs).scatter_(-1, order, ranked)
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("candidates", [8, 1024])
@pytest.mark.parametrize("params", [SamplingParams(0.7, 0.95), SamplingParams(1.0, 0.5, 20), SamplingParams(1.3, 0.9)])
def test_nucleus_matches_a_full_sort(monkeypatch, candidates, params):
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", candidates)
    gen = torch.Generator().manual_seed(0)
    # peaked rows (small nucleus) and flat rows (a nucleus wider than 8 candidates: the full-sort fallback)
    logits = torch.cat([torch.randn(6, 3000, generator=gen) * 6, torch.randn(6, 3000, generator=gen) * 0.3])
    got, want = processed_probs(logits, params), sorted_reference(logits, params)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert torch.equal(got > 0, want > 0)


def test_draws_stay_in_the_nucleus_and_follow_it(monkeypatch):
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", 16)
    params = SamplingParams(0.8, 0.9)
    logits = torch.randn(1, 500, generator=torch.Generator().manual_seed(1)) * 4
    probs = processed_probs(logits, params)[0]
    gen = torch.Generator().manual_seed(2)
    draws = select_tokens(logits.expand(20000, -1), params, gen)
    counts = torch.bincount(draws, minlength=500).float()
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(torch.nonzero(probs).flatten().tolist())
    freq = counts / counts.sum()
    assert (freq - probs).abs().sum() / 2 < 0.02  # total variation; ~0.005 expected from 20k draws


def test_greedy_is_argmax_and_shapes_are_kept():
    logits = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(select_tokens(logits, SamplingParams()), logits.argmax(-1))
    assert select_tokens(logits, SamplingParams(0.7, 0.95), torch.Generator().manual_seed(0)).shape == (3, 4)


def test_zero_probability_tokens_are_never_drawn():
    """Tokens outside top-k (probability 0) before, between and after the kept ones are never drawn: the inverse-CDF
    draw gives them empty intervals."""
    logits = torch.full((1, 12), -5.0)
    logits[0, [3, 7]] = 2.0  # the only tokens top-k = 2 keeps
    params = SamplingParams(1.0, 1.0, 2)
    draws = select_tokens(logits.expand(5000, -1), params, torch.Generator().manual_seed(4))
    assert set(draws.tolist()) == {3, 7}
