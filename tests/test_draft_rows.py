"""Drafting for the rows of a batch: a batch runner's rows give the logits of batch-1 runners (each with its own draft
cache) through ragged starts, tree levels of different sizes, rows that skip a step and a row that starts over; the
ragged cache's past mask narrows what new tokens see of the cached tree nodes, and only that."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from clover.model.base import BaseModel
from clover.model.cache import RaggedKVCache
from clover.model.checkpoint import init_draft
from clover.model.draft_rows import BatchRow, pad_rows
from tests.conftest import save_tiny

VOCAB = 97


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return BaseModel.from_pretrained(save_tiny(tmp_path_factory.mktemp("llama"), "llama"), dtype="fp32", max_len=160)


def pairs(gen, n: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, n, hidden, generator=gen), torch.randint(3, VOCAB, (1, n), generator=gen)


@pytest.mark.parametrize("kind", ["clover2", "eagle"])
def test_batch_runner_rows_give_the_logits_of_batch_one_runners(tiny_base, kind):
    draft = init_draft(kind, tiny_base, **({"init_from_layer": "last"} if kind == "clover2" else {})).eval()
    batch = draft.batch_runner(4, 160)
    alone = {}
    for row in (0, 2, 3):  # row 1 stays idle
        own = copy.deepcopy(draft)
        own.allocate_cache(160)
        alone[row] = own.runner()
    rows = {row: BatchRow(batch, row) for row in alone}
    gen = torch.Generator().manual_seed(0)
    h = tiny_base.args.hidden_size

    def check_step(starting: dict[int, int], levels: list[dict[int, tuple[list[int], list[int]]]]) -> None:
        inputs = {row: pairs(gen, n, h) for row, n in starting.items()}
        got = batch.start(list(inputs), *zip(*inputs.values()))
        for row, logits in zip(inputs, got):
            torch.testing.assert_close(logits, alone[row].start(*inputs[row]), atol=1e-5, rtol=1e-5)
        for depth, level in enumerate(levels, start=1):
            order = list(level)
            parents = [torch.tensor(level[row][0]) for row in order]
            tokens = [torch.tensor(level[row][1]) for row in order]
            got = batch.expand(order, parents, tokens, [depth] * len(order))
            for row, p, t, logits in zip(order, parents, tokens, got):
                assert logits.shape[0] == t.numel()
                torch.testing.assert_close(logits, alone[row].expand(p, t, depth), atol=1e-5, rtol=1e-5)

    # three rows of different lengths; tree levels of 2/3/1 nodes, then 1/4/2 with other parents
    check_step({0: 3, 2: 1, 3: 5}, [{0: ([0, 0], [5, 9]), 2: ([0, 0, 0], [4, 7, 11]), 3: ([0], [8])},
                                    {0: ([1], [12]), 2: ([2, 0, 1, 1], [3, 4, 5, 6]), 3: ([0, 0], [20, 21])}])
    # row 2 skips a step (its pairs wait, as after a plain step); a level that only two rows expand
    check_step({0: 2, 3: 1}, [{0: ([0, 0, 0], [30, 31, 32]), 3: ([0], [33])}, {0: ([2], [40])}])
    check_step({2: 4, 3: 2}, [{2: ([0], [17]), 3: ([0, 0], [18, 19])}])
    rows[0].reset()  # row 0 starts a new sequence
    alone[0].reset()
    check_step({0: 6, 2: 1}, [{0: ([0, 0], [50, 51]), 2: ([0], [52])}])


def test_past_mask_narrows_what_new_tokens_see_of_the_cached_tree():
    """Row 0: a prefix of 4, then 2 tree nodes; row 1: a prefix of 3, then 1 tree node (the past mask's first column
    is, for it, a prefix slot, so it must be seen)."""
    cache = RaggedKVCache(1, 2, 1, 16, 4, torch.float32, "cpu")
    cache.begin(6, np.array([6, 4]))
    cache.end()
    past = torch.tensor([[[False, True], [True, False]],
                         [[True, True], [True, True]]])
    _, mask = cache.begin(2, np.array([2, 1]), tree_mask=torch.eye(2, dtype=torch.bool), past_mask=past)
    cache.end()
    seen = (mask[:, 0] == 0).int().tolist()
    assert seen[0] == [[1, 1, 1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0, 1]]
    assert seen[1][0] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert cache.lengths.tolist() == [8, 5]


def test_pad_rows_places_each_row_and_counts_it():
    a, b = torch.arange(6.).view(1, 3, 2), torch.arange(10., 12.).view(1, 1, 2)
    out, counts = pad_rows([2, 0], [a, b], 4)
    assert counts.tolist() == [1, 0, 3, 0] and out.shape == (4, 3, 2)
    assert torch.equal(out[2], a[0]) and torch.equal(out[0, 0], b[0, 0]) and not out[0, 1:].any()
    assert not out[1].any() and not out[3].any()
    assert isinstance(counts, np.ndarray)
