"""What the trainer trains on: the shards ``clover data`` dumped, or conversations whose hidden states the frozen base
model computes in the training loop (online training).

Online, instead of reading shards that ``clover data`` dumped, ``clover train --conversations FILE`` tokenizes the
conversations (ShareGPT JSON / JSONL, e.g. the main job's ``regenerated.jsonl``) with their loss masks once, and each
batch's pre-norm hidden states come from the base model as the batch is collated (:class:`OnlineCollate`): the same
stateless full-sequence forward the dump runs, one conversation at a time. Nothing is written to disk, so nothing has
to outlive the machine, and the hidden states are fp32 rather than the dump's bf16 storage.

The conversations are shuffled with ``--seed`` and split into training and held-out ones as ``clover data`` and the
offline trainer do (:func:`clover.data.conversations.select_conversations`,
:func:`clover.ge_data.dataset.split_indices`), so a draft trained online and one trained offline on a dump of the same
file (same seed) see the same conversations in each split.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from tqdm import tqdm

from clover.data.conversations import Conversation, load_conversations, select_conversations
from clover.data.templates import get_template
from clover.errors import CloverError
from clover.ge_data.dataset import HiddenStateDataset, collate, split_indices
from clover.model.base import BaseModel
from clover.model.loading import load_tokenizer
from clover.train.packing import PackedDataset


def encode(conversations: list[Conversation], template, max_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input_ids, loss_mask)`` of each conversation, truncated to ``max_len``; conversations without a reply
    token after truncation are left out (as the dump leaves them out)."""
    encoded = []
    for conv in tqdm(conversations, desc="tokenizing", unit="conv", leave=False):
        try:
            ids, mask = template.encode_with_mask(conv.messages, max_len)
        except CloverError as err:
            raise CloverError(f"conversation {conv.id!r} (record {conv.index}): {err}") from None
        if any(mask):
            encoded.append((torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)))
    return encoded


class ConversationDataset(torch.utils.data.Dataset):
    """One item per encoded conversation (:func:`encode`) of ``split``: ``input_ids`` and ``loss_mask``
    (LongTensor ``[L]``); ``collate`` batches items and adds the base model's hidden states."""

    def __init__(self, encoded: list[tuple[torch.Tensor, torch.Tensor]], base: BaseModel, split: str = "all",
                 test_fraction: float = 0.05, seed: int = 0):
        self.items = [encoded[i] for i in split_indices(len(encoded), split, test_fraction, seed)]
        self.collate = OnlineCollate(base)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, mask = self.items[i]
        return {"input_ids": ids, "loss_mask": mask}

    def token_counts(self, vocab_size: int) -> torch.Tensor:
        """``[vocab_size]`` occurrences of each token id among the reply tokens (loss mask 1)."""
        counts = torch.zeros(vocab_size, dtype=torch.long)
        for ids, mask in self.items:
            counts += torch.bincount(ids[mask.bool()], minlength=vocab_size)
        return counts


class OnlineCollate:
    """:func:`clover.ge_data.dataset.collate`, then the base model's pre-norm hidden states (``hidden_prenorm [B, T,
    H]``, zero past each row's end, a tensor autograd may use): each conversation alone through the dump's stateless
    full-sequence forward, so no padding is computed and the states are the dump's.

    The states of the last few batches are kept: drafts trained together (:mod:`clover.train.joint`) draw the same
    batches one after the other from one dataset, so the base model runs once per batch for all of them."""

    KEEP = 8  # batches

    def __init__(self, base: BaseModel):
        self.base = base
        self.recent: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.batches = self.base_batches = 0  # batches collated; those the base model computed (not kept ones)

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = collate(items)
        self.batches += 1
        key = tuple((item["input_ids"].data_ptr(), item["input_ids"].numel()) for item in items)
        if key in self.recent:
            self.recent.move_to_end(key)
        else:
            self.recent[key] = self._hidden(items, batch["input_ids"].shape)
            self.base_batches += 1
            if len(self.recent) > self.KEEP:
                self.recent.popitem(last=False)
        batch["hidden_prenorm"] = self.recent[key].clone()  # each draft's batch its own tensor
        return batch

    def _hidden(self, items: list[dict[str, torch.Tensor]], shape) -> torch.Tensor:
        hidden = torch.zeros(*shape, self.base.args.hidden_size, dtype=self.base.dtype)
        for row, item in enumerate(items):
            ids, start = item["input_ids"], 0
            # a packed item (clover.train.packing): each of its conversations alone
            for n in (item["doc_ids"].unique_consecutive(return_counts=True)[1].tolist() if "doc_ids" in item
                      else [ids.numel()]):
                out = self.base(ids[None, start:start + n].to(self.base.device), use_cache=False, logits_to_keep=0)
                hidden[row, start:start + n] = out.hidden_prenorm[0].cpu()
                start += n
        return hidden


def collate_for(dataset):
    """The collate function of ``dataset`` (or of the dataset a ``Subset`` or a
    :class:`~clover.train.packing.PackedDataset` takes its items from)."""
    inner = getattr(dataset, "dataset", dataset)
    return getattr(inner, "collate", collate)


def load_data(args, base) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset, HiddenStateDataset | None]:
    """Train and held-out splits of the data folder (checked against the base model) or, online, of the
    conversations, and the monitoring set."""
    max_len = min(args.max_len, base.args.max_position_embeddings)
    split = dict(test_fraction=args.test_fraction, seed=args.seed)
    if args.conversations:
        conversations, _ = load_conversations(args.conversations)
        # the dump's order (clover data shuffles with --seed), so that the held-out split is the dump's too
        skip, count = args.skip_conversations, args.max_conversations
        conversations = select_conversations(conversations, skip, None if count is None else skip + count, args.seed)
        if not conversations:
            raise CloverError(f"--skip-conversations {skip} leaves none of the conversations in {args.conversations}")
        encoded = encode(conversations, get_template(load_tokenizer(args.base_model), args.template), max_len)
        train_set = ConversationDataset(encoded, base, split="train", **split)
        test_set = ConversationDataset(encoded, base, split="test", **split)
        source = args.conversations
    else:
        train_set = HiddenStateDataset(args.data_dir, split="train", max_len=max_len, **split)
        train_set.check_compatible(base.args.hidden_size, base.args.vocab_size, args.base_model)
        test_set = HiddenStateDataset(args.data_dir, split="test", max_len=max_len, **split)
        source = args.data_dir
    if len(train_set) == 0:
        raise CloverError(f"{source} has no training conversations left after holding out --test-fraction "
                          f"{args.test_fraction}; use more data or lower --test-fraction")
    if args.pack:  # the held-out split stays one conversation per row, so that its metrics do not depend on packing
        train_set = PackedDataset(train_set, max_len, args.seed)
    monitor = None
    if args.evaldata:  # an empty string means "none"
        monitor = HiddenStateDataset(args.evaldata, max_len=max_len, split="all")
        monitor.check_compatible(base.args.hidden_size, base.args.vocab_size, args.base_model)
    return train_set, test_set, monitor


def conversation_count(dataset) -> str:
    """How many conversations a training set has (and, packed, in how many rows)."""
    if isinstance(dataset, PackedDataset):
        return f"{len(dataset.dataset)} conversations packed into {len(dataset)} rows"
    return f"{len(dataset)} conversations"


def hidden_sample(dataset, conversations: int = 32) -> torch.Tensor:
    """Pre-norm states of the first conversations of ``dataset``: what a draft measures its initial scales on."""
    batch = collate_for(dataset)([dataset[i] for i in range(min(conversations, len(dataset)))])
    return batch["hidden_prenorm"][batch["attention_mask"].bool()]
