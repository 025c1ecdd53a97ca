"""clover.model.reduce: the chunked argmax is torch.argmax exactly, the chunked top-k torch.topk's values (and its
indices where the values differ), on every shape and vocabulary size, ties and NaN included."""
from __future__ import annotations

import pytest
import torch

from clover.model.reduce import _chunk_length, argmax, topk

VOCABS = (49152, 32000, 151936, 128256, 50257, 1000)  # SmolLM2, Llama-2, Qwen2, Llama-3, GPT-2 (no chunking), tiny


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("shape", [(1,), (7,), (2, 3)])
def test_argmax_is_torch_argmax(vocab, shape):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(*shape, vocab, generator=g)
    assert torch.equal(argmax(x), x.argmax(-1))


def test_argmax_takes_the_first_maximum_and_counts_nan_as_the_maximum():
    x = torch.randn(6, 49152, generator=torch.Generator().manual_seed(0))
    x[0, [300, 40000]] = 50.0   # ties in two chunks: the first
    x[1, [5000, 5001]] = 50.0   # ties in one chunk: the first
    x[2, :] = -torch.inf        # no finite value
    x[3, [7, 30000]] = torch.nan
    x[4, :] = 1.0               # all equal
    x[5, 49151] = 99.0          # the last element
    assert _chunk_length(x) == 256
    assert torch.equal(argmax(x), x.argmax(-1))
    assert argmax(x).tolist()[:2] == [300, 5000] and argmax(x)[3].item() == 7


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("k", [1, 4, 8, 33])
def test_topk_is_torch_topk(vocab, k):
    x = torch.randn(5, vocab, generator=torch.Generator().manual_seed(k))
    values, index = topk(x, k)
    top = x.topk(k, dim=-1)
    assert torch.equal(values, top.values) and torch.equal(index, top.indices)


def test_topk_with_ties_returns_the_tied_values_at_distinct_indices():
    x = torch.zeros(3, 32768)
    x[0, ::1000] = 1.0  # 33 equal maxima over many chunks
    x[1, 100:110] = 2.0
    values, index = topk(x, 8)
    assert torch.equal(values, x.topk(8, dim=-1).values)
    assert torch.equal(x.gather(1, index), values)
    assert all(len(set(row)) == 8 for row in index.tolist())


def test_other_devices_and_short_rows_use_torch():
    assert _chunk_length(torch.zeros(2, 1000)) is None  # too few chunks
    assert _chunk_length(torch.zeros(2, 50257)) is None  # no chunk length divides it
    assert _chunk_length(torch.zeros(2, 0)) is None
    assert argmax(torch.zeros(3, 0, 49152)).shape == (3, 0)
