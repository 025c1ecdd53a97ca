"""Packing conversations into full rows: every conversation lands in exactly one pack within the length limit, and a
packed batch gives each conversation exactly the per-position losses, counts and top-k hits it gets alone (both
drafts, both mask alignments, online hidden states and dumped ones)."""
from __future__ import annotations

import pytest
import torch

from clover.ge_data.dataset import collate
from clover.model.base import BaseModel
from clover.model.checkpoint import init_draft
from clover.train.data import ConversationDataset
from clover.train.evaluate import batch_loss, evaluate
from clover.train.packing import PackedDataset, pack_lengths
from tests.conftest import save_tiny

VOCAB = 97


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return BaseModel.from_pretrained(save_tiny(tmp_path_factory.mktemp("llama"), "llama"), dtype="fp32", max_len=128)


def conversations(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` random conversations of 5-40 tokens, replies (loss mask 1) after a prompt of a few tokens."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 41, (1,), generator=gen))
        prompt = int(torch.randint(1, 4, (1,), generator=gen))
        mask = torch.ones(length, dtype=torch.long)
        mask[:prompt] = 0
        out.append((torch.randint(3, VOCAB, (length,), generator=gen), mask))
    return out


def test_pack_lengths_places_every_item_once_within_the_limit():
    lengths = [int(x) for x in torch.randint(1, 60, (200,), generator=torch.Generator().manual_seed(0))]
    packs = pack_lengths(lengths, 64, seed=3)
    assert sorted(i for pack in packs for i in pack) == list(range(200))
    assert all(sum(lengths[i] for i in pack) <= 64 for pack in packs)
    assert len(packs) < 0.7 * len(lengths)  # first fit fills rows: far fewer rows than items
    assert packs == pack_lengths(lengths, 64, seed=3) and packs != pack_lengths(lengths, 64, seed=4)
    with pytest.raises(Exception, match="does not fit"):
        pack_lengths([65], 64, seed=0)


@pytest.mark.parametrize("draft_type", ["clover2", "eagle"])
@pytest.mark.parametrize("alignment", ["predicted", "eagle"])
def test_packed_rows_give_each_conversation_its_own_losses(tiny_base, draft_type, alignment):
    torch.manual_seed(0)
    draft = init_draft(draft_type, tiny_base, **({"init_from_layer": "last"} if draft_type == "clover2" else {}))
    online = ConversationDataset(conversations(23, seed=1), tiny_base, split="all")
    packed = PackedDataset(online, max_len=96, seed=0)
    assert len(packed) < len(online) / 2
    alone = evaluate(draft, online, 3, alignment)
    together = evaluate(draft, packed, 2, alignment)
    # everything but the per-batch mean loss adds up over positions: the same positions, the same numbers
    torch.testing.assert_close(together.sums[:, 1:], alone.sums[:, 1:], rtol=1e-4, atol=1e-3)
    assert alone["count"].min() > 0

    # from a dump's items (hidden states in the item, plain collation): the same again
    dumped = [{**online[i], "hidden_prenorm": online.collate([online[i]])["hidden_prenorm"][0]}
              for i in range(len(online))]
    items = PackedDataset.__new__(PackedDataset)
    items.dataset, items.packs, items.kept = dumped, packed.packs, None
    total = None
    for k in range(0, len(items), 2):
        batch = collate([items[j] for j in range(k, min(k + 2, len(items)))])
        metrics = batch_loss(draft, draft, batch, alignment)[1]
        total = metrics if total is None else total + metrics
    torch.testing.assert_close(total.sums[:, 1:], alone.sums[:, 1:], rtol=1e-4, atol=1e-3)


def test_packed_items_keep_positions_and_conversations_apart(tiny_base):
    online = ConversationDataset(conversations(6, seed=2), tiny_base, split="all")
    packed = PackedDataset(online, max_len=80, seed=1)
    for k in range(len(packed)):
        item = packed[k]
        assert item is packed[k]  # online packs are built once: the collation recognises their tensors
        docs = item["doc_ids"].unique_consecutive(return_counts=True)
        assert docs[0].tolist() == list(range(1, len(packed.packs[k]) + 1))
        assert docs[1].tolist() == [online[i]["input_ids"].numel() for i in packed.packs[k]]
        starts = torch.cat([torch.zeros(1, dtype=torch.long), docs[1].cumsum(0)[:-1]])
        assert (item["position_ids"][starts] == 0).all()
        assert torch.equal(item["input_ids"], torch.cat([online[i]["input_ids"] for i in packed.packs[k]]))
