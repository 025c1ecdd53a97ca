"""Drafting for the rows of a batch: one ragged draft cache for all of them, and each draft call made once for every
row that needs it.

A draft's *batch runner* (``draft.batch_runner(batch, capacity)``: :class:`~clover.model.clover2.Clover2BatchRunner`,
:class:`~clover.model.eagle.EagleBatchRunner`) does what its batch-1 runner does, for many rows at once:

* ``start(rows, hidden, next_ids)``: feed each row its committed pairs (a different number per row, padded into one
  forward of the draft's layers over a :class:`~clover.model.cache.RaggedKVCache`); returns each row's logits for
  the children of its root;
* ``expand(rows, parent_rows, tokens, depths)``: one tree level of every row in one call (one read of the draft's
  weights and of its LM head for all of them); returns each row's logits ``[R_i, V]``;
* ``reset(row)``: the row starts a new sequence;
* ``move_row(src, dst)``: row ``dst`` takes over row ``src``'s sequence (the decoder keeps its busy rows at the
  front, so that no forward spans an idle row).

:class:`BatchRow` is one row of a batch runner with the batch-1 runner's interface, so that everything written for
one sequence (the tree builders, :class:`~clover.generate.speculative.SpeculativeModel`) runs on a row unchanged.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from clover.model.cache import RaggedKVCache
from clover.model.layers import Rotary


def row_cache(draft, batch: int, capacity: int) -> RaggedKVCache:
    """A draft cache of ``batch`` rows of up to ``capacity`` positions (capped at the context window)."""
    a = draft.args
    return RaggedKVCache(len(draft.layers), batch, a.num_key_value_heads, min(capacity, a.max_position_embeddings),
                         a.head_dim, draft.dtype, draft.device)


def _slots(rows: Sequence[int], sizes: Sequence[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every real token when row ``rows[i]`` holds ``sizes[i]`` tokens, left-aligned, row by row."""
    at_row = np.repeat(np.asarray(rows, dtype=np.int64), sizes)
    at_col = np.concatenate([np.arange(n) for n in sizes])
    return torch.from_numpy(at_row).to(device), torch.from_numpy(at_col).to(device)


def pad_rows(rows: Sequence[int], tensors: Sequence[torch.Tensor], span: int) -> tuple[torch.Tensor, np.ndarray]:
    """Row ``rows[i]`` of ``[span, T, ...]`` := ``tensors[i] [1, n_i, ...]`` (left-aligned, zeros after it and in the
    rows not listed); returns it and the counts ``n [span]`` (host; 0 for the rows not listed)."""
    counts = np.zeros(span, dtype=np.int64)
    counts[list(rows)] = sizes = [t.shape[1] for t in tensors]
    first = tensors[0]
    out = first.new_zeros((span, int(counts.max())) + tuple(first.shape[2:]))
    out[_slots(rows, sizes, out.device)] = torch.cat([t[0] for t in tensors])
    return out, counts


def unpad_rows(x: torch.Tensor, rows: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`pad_rows`: the real tokens of ``x [S, T, ...]``, row ``rows[0]``'s first, ``[sum(sizes),
    ...]``."""
    return x[_slots(rows, sizes, x.device)]


def extend_rows(draft, cache: RaggedKVCache, rows: Sequence[int], hidden: Sequence[torch.Tensor],
                next_ids: Sequence[torch.Tensor], features) -> tuple[torch.Tensor, np.ndarray]:
    """Append each row's committed pairs (``hidden[i] [1, n_i, H]``, ``next_ids[i] [1, n_i]``) to its rows of
    ``cache`` in one forward of the draft's layers over ``features(hidden, ids)`` (padded ``[S, T, H]`` and ``[S, T]``);
    returns each row's output at its last pair ``[R, H]`` and the counts ``n [S]`` (host)."""
    span = max(rows) + 1
    hidden, counts = pad_rows(rows, hidden, span)
    ids, _ = pad_rows(rows, next_ids, span)
    x = run_rows(draft, features(hidden, ids), cache, counts)
    return last_of_rows(x, rows, counts), counts


def run_rows(draft, x: torch.Tensor, cache: RaggedKVCache, counts: np.ndarray, position_ids: torch.Tensor | None = None,
             tree_mask: torch.Tensor | None = None, past_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The draft's decoder layers on ``x [S, T, H]`` for the rows ``0 .. S-1`` of ``cache``, row ``r`` appending its
    first ``counts[r]`` tokens after its own cached ones (causal, or as ``tree_mask``/``past_mask`` say: see
    :meth:`RaggedKVCache.begin`); the rest of each row is padding that nothing sees."""
    positions, mask = cache.begin(x.shape[1], counts, slice(0, x.shape[0]), position_ids, tree_mask, past_mask)
    cos, sin = Rotary.lookup(draft.frozen["rope_cos"], draft.frozen["rope_sin"], positions, x.dtype)
    for i, layer in enumerate(draft.layers):
        x = layer(x, cos, sin, mask, cache, i, 0)
    cache.end()
    return x


def last_of_rows(x: torch.Tensor, rows: Sequence[int], counts: np.ndarray) -> torch.Tensor:
    """``[R, H]``: each listed row's output at its last real token."""
    index = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=x.device)
    return x[index, torch.from_numpy(counts[list(rows)] - 1).to(x.device)]


class BatchRow:
    """Row ``row`` of a batch runner, with a batch-1 runner's ``start``/``expand``/``reset``."""

    def __init__(self, batch, row: int):
        self.batch, self.row = batch, row
        self.vocab = batch.vocab

    def reset(self) -> None:
        self.batch.reset(self.row)

    def start(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        return self.batch.start([self.row], [hidden], [next_ids])[0]

    def expand(self, parent_rows: torch.Tensor, tokens: torch.Tensor, depth: int) -> torch.Tensor:
        return self.batch.expand([self.row], [parent_rows], [tokens], [depth])[0]
