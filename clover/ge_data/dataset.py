"""The on-disk format of dumped training data, and a lazy, memory-mapped dataset over it for the draft trainer.

A data folder holds ``manifest.json`` (base model, template, dtypes, selection, per-shard records; written by
:mod:`clover.ge_data.allocation`) and shard files ``shard_{j:06d}.safetensors``, each with the tensors

* ``input_ids`` int32 ``[N]``: the shard's conversations concatenated (N tokens in all),
* ``loss_mask`` uint8 ``[N]``: 1 on assistant-reply tokens (+ end of turn),
* ``hidden_prenorm`` ``[N, H]`` (storage dtype): the base model's last hidden state *before* the final norm
  (the trainer derives the post-norm state with the base model's final norm),
* ``offsets`` int64 ``[n + 1]``: conversation ``i`` is ``[offsets[i], offsets[i+1])``,
* ``conv_index`` int64 ``[n]``: each conversation's record index in the source file,

and string metadata (conversation ids as a JSON list, base model, template, counts). Shards are written under a
temporary name and renamed into place, so every ``shard_*.safetensors`` file is complete.
"""
from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import torch
from safetensors import safe_open

from clover.errors import CloverError
from clover.model.loading import resolve_model_path

MANIFEST = "manifest.json"
SHARD_GLOB = "shard_*.safetensors"
TENSOR_KEYS = ("input_ids", "loss_mask", "hidden_prenorm", "offsets", "conv_index")
SPLITS = ("all", "train", "test")


def shard_path(folder: str | os.PathLike, index: int) -> Path:
    return Path(folder) / f"shard_{index:06d}.safetensors"


def shard_files(folder: str | os.PathLike) -> list[Path]:
    return sorted(Path(folder).glob(SHARD_GLOB))


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The folder's manifest, or None when there is none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CloverError(f"cannot read {path} ({err}); delete the folder or rerun the data dump with "
                          f"--overwrite") from None


def open_shard(path: Path):
    """A safetensors handle on a shard, after checking that it holds consistent shard tensors."""
    try:
        handle = safe_open(str(path), framework="pt")
        shapes = {key: handle.get_slice(key).get_shape() for key in TENSOR_KEYS}
    except Exception as err:  # SafetensorError, OSError, missing keys
        raise CloverError(f"corrupt shard {path}: {err}; delete it and rerun the data dump to regenerate "
                          f"it") from None
    n_tokens, n_convs = shapes["input_ids"][0], shapes["conv_index"][0]
    if (shapes["loss_mask"] != [n_tokens] or shapes["hidden_prenorm"][:1] != [n_tokens]
            or shapes["offsets"] != [n_convs + 1]):
        raise CloverError(f"corrupt shard {path}: inconsistent tensor shapes {shapes}; delete it and rerun the data "
                          f"dump to regenerate it")
    return handle


class HiddenStateDataset(torch.utils.data.Dataset):
    """One item per conversation: ``input_ids`` and ``loss_mask`` (LongTensor ``[L]``) and ``hidden_prenorm``
    (``[L, H]``, storage dtype), truncated to ``max_len``.

    Shards are read lazily through memory-mapped ``get_slice`` calls; file handles are opened on first use in each
    process, so the dataset can be used by DataLoader workers. The train/test split is by conversation: a seeded
    permutation of all conversations (in sorted shard order) puts ``ceil(test_fraction * n)`` of them in ``test``;
    both splits keep storage order.
    """

    def __init__(self, folder: str | os.PathLike, max_len: int = 2048, split: str = "all",
                 test_fraction: float = 0.05, seed: int = 0):
        check_split(split, test_fraction)  # before any file is read
        self.folder = Path(folder)
        self.max_len = max_len
        manifest = read_manifest(self.folder) if self.folder.is_dir() else None
        self.files = shard_files(self.folder) if manifest is not None else []
        if not self.files:
            raise CloverError(f"no training data in {self.folder}, run clover data first")
        self._manifest = manifest
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()
        items = []  # (file number, start, end) per conversation, in storage order
        for number, path in enumerate(self.files):
            offsets = open_shard(path).get_tensor("offsets").tolist()
            items += [(number, a, b) for a, b in zip(offsets[:-1], offsets[1:])]
        self.items = [items[i] for i in split_indices(len(items), split, test_fraction, seed)]

    @property
    def manifest(self) -> dict:
        return self._manifest

    @property
    def lengths(self) -> list[int]:
        """Item lengths after truncation (for length-grouped batching)."""
        return [min(b - a, self.max_len) for _, a, b in self.items]

    def check_compatible(self, hidden_size: int, vocab_size: int, base_name: str | None = None) -> None:
        """Raise CloverError unless the data was dumped from a base model of this size and, if ``base_name`` is
        given, this model: the same name or folder name as at dump time, or a name resolving to the same folder."""
        m = self._manifest
        problems = [f"{key} {m.get(key)} != {value}" for key, value in (("hidden_size", hidden_size),
                                                                        ("vocab_size", vocab_size))
                    if m.get(key) != value]
        if base_name is not None:
            known = {Path(str(m.get(key, ""))).name for key in ("base_model", "base_folder")}
            if Path(str(base_name)).name not in known and _resolved(base_name) != m.get("base_folder"):
                problems.append(f"base model {m.get('base_model')!r} != {base_name!r}")
        if problems:
            raise CloverError(f"the training data in {self.folder} was dumped from another base model "
                              f"({'; '.join(problems)}); dump data with this base model first")

    def __len__(self) -> int:
        return len(self.items)

    def token_counts(self, vocab_size: int) -> torch.Tensor:
        """``[vocab_size]`` occurrences of each token id among the reply tokens (loss mask 1) of this split, within
        ``max_len``: what a draft vocabulary is chosen from. Reads ids and masks only."""
        counts = torch.zeros(vocab_size, dtype=torch.long)
        for number, a, b in self.items:
            b = min(b, a + self.max_len)
            handle = self._handle(number)
            ids = handle.get_slice("input_ids")[a:b].long()
            counts += torch.bincount(ids[handle.get_slice("loss_mask")[a:b].bool()], minlength=vocab_size)
        return counts

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        number, a, b = self.items[i]
        b = min(b, a + self.max_len)
        handle = self._handle(number)
        return {"input_ids": handle.get_slice("input_ids")[a:b].long(),
                "loss_mask": handle.get_slice("loss_mask")[a:b].long(),
                "hidden_prenorm": handle.get_slice("hidden_prenorm")[a:b]}

    def _handle(self, number: int):
        if self._pid != os.getpid():  # a forked DataLoader worker: open its own handles
            self._handles, self._pid = {}, os.getpid()
        if number not in self._handles:
            self._handles[number] = open_shard(self.files[number])
        return self._handles[number]

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}


def check_split(split: str, test_fraction: float) -> None:
    if split not in SPLITS:
        raise CloverError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if not 0 <= test_fraction <= 1:
        raise CloverError(f"test_fraction must be in [0, 1], got {test_fraction}")


def split_indices(n: int, split: str, test_fraction: float, seed: int) -> list[int]:
    """The items of ``split`` among ``n`` in storage order: a seeded permutation puts ``ceil(test_fraction * n)`` of
    them in ``test``, the rest in ``train``; ``all`` is every item."""
    check_split(split, test_fraction)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    test = set(order[:math.ceil(test_fraction * n)])
    return [i for i in range(n) if split == "all" or (i in test) == (split == "test")]


def _resolved(name_or_path) -> str | None:
    try:
        return str(resolve_model_path(name_or_path).resolve())
    except CloverError:
        return None


def collate(batch: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad items to the longest one (ids 0, mask 0, hidden 0, where items have hidden states; packed items'
    ``position_ids`` and ``doc_ids`` 0); adds ``attention_mask`` (1 = real token)."""
    longest = max(item["input_ids"].shape[0] for item in batch)
    out = {key: torch.zeros(len(batch), longest, dtype=torch.long)
           for key in ("input_ids", "loss_mask", "position_ids", "doc_ids") if key in batch[0]}
    out["attention_mask"] = torch.zeros(len(batch), longest, dtype=torch.long)
    first = batch[0].get("hidden_prenorm")
    if first is not None:
        out["hidden_prenorm"] = torch.zeros(len(batch), longest, first.shape[-1], dtype=first.dtype)
    for row, item in enumerate(batch):
        n = item["input_ids"].shape[0]
        for key, value in out.items():
            if key != "attention_mask":
                value[row, :n] = item[key]
        out["attention_mask"][row, :n] = 1
    return out
