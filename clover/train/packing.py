"""Packing conversations into full rows (``clover train --pack``).

A batch of whole conversations is as long as its longest one, and the drafts compute every padded position: at
batch 4 over ShareGPT-like data a fifth of the positions are padding. Packed, each row of a batch holds several
conversations back to back, up to ``--max-len`` tokens, and the drafts keep them apart: positions restart at 0 for
each conversation (``position_ids``), attention stays within a conversation (a block-causal mask from ``doc_ids``),
and a head's loss at a position counts only when what it predicts lies in the same conversation. The base model's
hidden states are those of each conversation alone (the dump's, or, online, one stateless forward per
conversation), so a packed batch gives every conversation exactly the predictions and per-position losses it gets
unpacked (tested); only which conversations share a batch changes.

Packs are made once, from the conversations in a seeded random order, each into the first pack with room for it
(first fit); each epoch then shuffles the packs.
"""
from __future__ import annotations

import random

import torch

from clover.errors import CloverError


def pack_lengths(lengths: list[int], max_len: int, seed: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into packs of at most ``max_len`` tokens: the items in a ``seed``-shuffled
    order, each into the first pack it fits (first fit), a pack's items in the order they came."""
    if max(lengths, default=0) > max_len:
        raise CloverError(f"an item of {max(lengths)} tokens does not fit a pack of {max_len}; raise --max-len")
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    packs: list[list[int]] = []
    room: list[int] = []
    for i in order:
        k = next((k for k, free in enumerate(room) if free >= lengths[i]), None)
        if k is None:
            packs.append([])
            room.append(max_len)
            k = len(packs) - 1
        packs[k].append(i)
        room[k] -= lengths[i]
    return packs


class PackedDataset(torch.utils.data.Dataset):
    """The items of ``dataset`` (:class:`~clover.train.data.ConversationDataset` or
    :class:`~clover.ge_data.dataset.HiddenStateDataset`) packed into rows of at most ``max_len`` tokens: an item is
    the concatenation of its conversations' tensors with ``position_ids`` (0, 1, ... per conversation) and
    ``doc_ids`` (1, 2, ... per conversation; 0 is padding after collation)."""

    def __init__(self, dataset, max_len: int, seed: int = 0):
        self.dataset = dataset
        self.packs = pack_lengths(item_lengths(dataset), max_len, seed)  # collated as ``dataset`` is (collate_for)
        # online items are token ids only: each pack is built once and kept, so that its tensors stay the same
        # objects (the online collation recognises a batch it computed by its tensors)
        self.kept: dict[int, dict] | None = None if hasattr(dataset, "lengths") else {}

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        if self.kept is None:
            return self._pack(k)
        if k not in self.kept:
            self.kept[k] = self._pack(k)
        return self.kept[k]

    def _pack(self, k: int) -> dict[str, torch.Tensor]:
        items = [self.dataset[i] for i in self.packs[k]]
        out = {key: torch.cat([item[key] for item in items]) for key in items[0]}
        out["position_ids"] = torch.cat([torch.arange(item["input_ids"].numel()) for item in items])
        out["doc_ids"] = torch.cat([torch.full((item["input_ids"].numel(),), j + 1, dtype=torch.long)
                                    for j, item in enumerate(items)])
        return out

    def token_counts(self, vocab_size: int) -> torch.Tensor:
        return self.dataset.token_counts(vocab_size)


def item_lengths(dataset) -> list[int]:
    """Tokens of each item of an unpacked dataset, without loading its hidden states."""
    if hasattr(dataset, "lengths"):  # a dump: lengths from its index
        return list(dataset.lengths)
    return [ids.numel() for ids, _ in dataset.items]


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, T]`` True where query ``t`` may attend to key ``u``: ``u <= t`` in the same conversation."""
    t = doc_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]


def doc_lengths(doc_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: at each position, the number of tokens of its conversation."""
    return (doc_ids[:, :, None] == doc_ids[:, None, :]).sum(-1)
