"""What the trainer computes on a batch: the draft's inputs and loss, held-out metrics, chain accuracy, and the
epoch's summary line.

Every draft reads a base hidden state ``h_t`` (pre-norm or post-norm, as its ``hidden_kind`` says) paired with the
next token ``x_{t+1}`` and is trained towards the post-norm state ``h_{t+1}``; the post-norm states are recomputed
from the stored pre-norm ones with the base's final norm. One loss function per draft (the draft's ``loss``) serves
training and evaluation alike.
"""
from __future__ import annotations

import torch

from clover.model.losses import TOPK, Metrics, target_from_prenorm
from clover.train.data import collate_for
from clover.train.packing import block_causal_mask, doc_lengths


def ahead(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x[:, t + k]`` at index ``t`` (dim 1), zero past the end."""
    k = min(k, x.shape[1])
    return torch.cat([x[:, k:], x.new_zeros((x.shape[0], k) + x.shape[2:])], 1)


def model_inputs(draft, batch: dict, noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden input, next ids, post-norm states)`` of a collated batch: the draft reads pre-norm or post-norm
    ``h_t`` paired with ``x_{t+1}``. ``noise`` > 0 adds EAGLE's training input noise,
    ``U(-0.5, 0.5) * noise * 512 / length`` per conversation (its length counted in tokens)."""
    pre = batch["hidden_prenorm"]
    post = target_from_prenorm(pre, draft.final_norm_weight, draft.args.rms_norm_eps)
    hidden = pre if draft.hidden_kind == "prenorm" else post
    if noise:
        if "doc_ids" in batch:  # packed rows: each conversation's own length
            length = doc_lengths(batch["doc_ids"])[:, :, None]
        else:
            length = batch["attention_mask"].sum(1).clamp(min=1)[:, None, None]
        hidden = hidden + (torch.rand_like(hidden, dtype=torch.float32) - 0.5) * (noise * 512 / length)
    return hidden, ahead(batch["input_ids"], 1), post


def batch_loss(model, draft, batch: dict, mask_alignment: str, noise: float = 0.0) -> tuple[torch.Tensor, Metrics]:
    """The draft's loss on a batch (``model`` is the possibly wrapped module, ``draft`` the bare one)."""
    hidden, next_ids, post = model_inputs(draft, batch, noise)
    loss_mask = batch["loss_mask"]
    if mask_alignment == "eagle":  # the mask of x_t gates target h_{t+1}: drop each row's last position (no target)
        loss_mask = loss_mask * ahead(batch["attention_mask"], 1)
    doc_ids = batch.get("doc_ids")
    if doc_ids is None:
        preds = model(hidden, next_ids)
    else:  # packed rows (clover.train.packing): positions per conversation, attention within it
        preds = model(hidden, next_ids, batch["position_ids"], block_causal_mask(doc_ids))
    return draft.loss(preds, ahead(post, 1), loss_mask, mask_alignment, doc_ids)


def shard(dataset, rank: int, world: int, limit: int | None = None) -> torch.utils.data.Subset:
    """Items ``rank, rank + world, ...`` of the first ``limit``: each item on exactly one process."""
    return torch.utils.data.Subset(dataset, range(rank, min(len(dataset), limit or len(dataset)), world))


def batches(dataset, batch_size: int, device):
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_for(dataset)):
        yield {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(draft, dataset, batch_size: int, mask_alignment: str) -> Metrics:
    """The training loss's metrics summed over ``dataset``."""
    draft.eval()
    total = Metrics.zeros(draft.train_heads, draft.device)
    for batch in batches(dataset, batch_size, draft.device):
        total = total + batch_loss(draft, draft, batch, mask_alignment)[1]
    return total


@torch.no_grad()
def chain_counts(draft, dataset, batch_size: int) -> torch.Tensor:
    """``[2, D]`` (correct, total) of the top-1 chain accuracy: a position ``t`` counts at depth ``k`` when the base
    model's greedy continuation after ``x_{t+1}`` is known for ``k + 1`` tokens (the data follows the base's greedy
    tokens up to there, and they are reply tokens); it is correct when the first ``k + 1`` draft tokens all equal
    it."""
    draft.eval()
    depth = draft.chain_depth
    counts = torch.zeros(2, depth)
    for batch in batches(dataset, batch_size, draft.device):
        hidden, next_ids, post = model_inputs(draft, batch)
        base = draft.greedy_tokens(post)  # base[t] = the base's greedy token after x_0..x_t
        chain = draft.greedy_chain(hidden, next_ids, batch["attention_mask"].sum(1).tolist())
        eligible = torch.ones_like(base, dtype=torch.bool)
        hit = torch.ones_like(eligible)
        for k in range(depth):
            eligible &= ahead(batch["loss_mask"], 2 + k).bool()
            if k:
                eligible &= ahead(batch["input_ids"], 1 + k) == ahead(base, k)
            hit &= chain[k] == ahead(base, 1 + k)
            counts[0, k] += (eligible & hit).sum().item()
            counts[1, k] += eligible.sum().item()
    return counts


def format_summary(s: dict, epochs: int, n_heads: int) -> str:
    """One console line per epoch: losses, held-out per-head top-1/2/3, chain accuracy per depth, throughput."""
    parts = [f"epoch {s['epoch']}/{epochs}", f"step {s['step']}", f"train loss {s['train_loss']:.4f}"]
    if "test_loss" in s:
        parts.append(f"test loss {s['test_loss']:.4f}")
        for k in TOPK:
            parts.append(f"top-{k} " + " ".join(f"{s[f'test_top{k}_{i}']:.3f}" for i in range(n_heads)))
    if "chain_acc" in s:
        parts.append("chain " + " ".join(f"{a:.3f}" for a in s["chain_acc"]))
    parts.append(f"{s['tokens_per_s']:.0f} tok/s")
    return " | ".join(parts)
