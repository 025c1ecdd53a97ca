"""Draft training losses, one function per draft type, used by training and evaluation alike.

Per head ``i``: ``regression_weight * Lv_i + distill_weight * Lp_i``, where ``Lv_i`` is the masked mean over
positions of ``mean_H SmoothL1_{beta=1}(prediction - target)`` and ``Lp_i`` the masked mean of the soft cross-entropy
between the head's logits and the base distribution ``softmax(W_lm target)``. Clover-2 weights head ``i`` by
``decay^i * heads_coefficient`` and sums over heads. Denominators are ``max(sum of mask, 1)``.

Alignment: ``target[t] = h_{t+1}`` (post-norm) and head ``i`` at position ``t`` predicts ``h_{t+1+i}``, whose base
logits predict the token ``x_{t+2+i}``. With ``mask_alignment="predicted"`` (default) that position counts when the
data mask of the predicted token, ``loss_mask[t+2+i]``, is set; ``"eagle"`` keeps the original ``loss_mask[t+i]``.
Either way the mask depends only on the target index ``s = t+i``, so the masked target rows are gathered once and
the vocabulary terms run in chunks of rows, with the gradient of the (frozen-``W_lm``) cross-entropy formed inside
the chunk loop: no ``[B, L, V]`` tensor is materialised, for any head.

With a draft vocabulary (token ids ``draft_vocab``, see :mod:`clover.model.draft`) the heads' logits are over
those tokens only and the base distribution is restricted to them and renormalised; the top-k metrics still compare
with the base's argmax over the whole vocabulary, so they count the positions a smaller vocabulary cannot draft as
misses.

Metrics: a :class:`Metrics`, per-head sums (weighted head loss, mask count, regression and distillation loss sums,
top-k hit counts of the base argmax) that add up exactly across batches and processes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clover.model.layers import rms_norm

TOPK = (1, 2, 3)
FIELDS = ("loss", "count", "vloss_sum", "ploss_sum") + tuple(f"top{k}_correct" for k in TOPK)


@dataclass
class Metrics:
    """Summable per-head statistics of the loss over one or more batches: ``sums[i, j]`` is field ``FIELDS[j]``
    of head ``i`` (``loss``: the head's weighted loss, summed over batches; ``count``: masked positions;
    ``vloss_sum`` / ``ploss_sum``: regression / distillation loss summed over positions; ``top{k}_correct``:
    positions whose base argmax is in the head's top-k), and ``batches`` the number of batches."""

    sums: torch.Tensor  # [N, len(FIELDS)], detached
    batches: float = 1.0

    @classmethod
    def zeros(cls, n_heads: int, device=None) -> "Metrics":
        return cls(torch.zeros(n_heads, len(FIELDS), device=device), 0.0)

    def __getitem__(self, field: str) -> torch.Tensor:
        """Field ``field`` of every head, ``[N]``."""
        return self.sums[:, FIELDS.index(field)]

    def __add__(self, other: "Metrics") -> "Metrics":
        return Metrics(self.sums + other.sums.to(self.sums.device), self.batches + other.batches)

    def vector(self) -> torch.Tensor:
        """Everything as one flat vector (to reduce across processes); inverse :meth:`from_vector`."""
        return torch.cat([self.sums.flatten().float(), self.sums.new_tensor([self.batches]).float()])

    @classmethod
    def from_vector(cls, vector: torch.Tensor, n_heads: int) -> "Metrics":
        return cls(vector[:-1].view(n_heads, len(FIELDS)), float(vector[-1]))

    @property
    def loss(self) -> float:
        """Mean total loss per batch."""
        return float(self["loss"].sum()) / max(self.batches, 1)

    def mean(self, name: str) -> torch.Tensor:
        """Per-head mean over masked positions of ``vloss`` or ``ploss``, ``[N]``."""
        return self[f"{name}_sum"] / self["count"].clamp(min=1)

    def accuracy(self, k: int) -> torch.Tensor:
        """Per-head top-``k`` accuracy, ``[N]``."""
        return self[f"top{k}_correct"] / self["count"].clamp(min=1)

    def summary(self, prefix: str = "") -> dict:
        """Flat dict for logs: ``{prefix}loss`` and ``{prefix}top{k}_{i}`` per head ``i``."""
        out = {f"{prefix}loss": self.loss}
        for k in TOPK:
            out |= {f"{prefix}top{k}_{i}": a for i, a in enumerate(self.accuracy(k).tolist())}
        return out


def target_from_prenorm(hidden_prenorm: torch.Tensor, final_norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Post-norm states from stored pre-norm ones: the base's final RMSNorm."""
    return rms_norm(hidden_prenorm, final_norm_weight, eps)


def clover_loss(preds: torch.Tensor, target_hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                loss_mask: torch.Tensor, cfg, mask_alignment: str = "predicted",
                chunk_size: int = 1024, draft_vocab: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """Clover-2 loss for ``preds [N, B, L, H]`` (``forward_train``), ``target_hidden [B, L, H]`` (post-norm
    ``h_{t+1}`` at index ``t``), ``loss_mask [B, L]`` (data mask of token ``x_t`` at index ``t``) and the Clover-2
    config (``regression_weight``, ``distill_weight``, ``decay_coefficient``, ``heads_coefficient``). Packed rows
    give ``doc_ids [B, L]`` (the conversation of each position): a head's prediction counts only when the position
    it predicts from and the token it predicts are in one conversation."""
    head_weights = [cfg.decay_coefficient ** i * cfg.heads_coefficient for i in range(preds.shape[0])]
    return _loss(preds, target_hidden, lm_head_weight, _target_mask(loss_mask, mask_alignment), head_weights,
                 cfg.regression_weight, cfg.distill_weight, chunk_size, draft_vocab,
                 _same_doc(doc_ids, mask_alignment))


def eagle_loss(pred: torch.Tensor, target: torch.Tensor, lm_head_weight: torch.Tensor, loss_mask: torch.Tensor,
               cfg, chunk_size: int = 1024, mask_alignment: str = "predicted",
               draft_vocab: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, Metrics]:
    """EAGLE-1 loss ``regression_weight * Lv + distill_weight * Lp`` for ``pred [B, L, H]`` (one head, metrics as
    head 0 of :func:`clover_loss`; ``cfg`` is the EAGLE-1 config; ``doc_ids`` as there)."""
    return _loss(pred[None], target, lm_head_weight, _target_mask(loss_mask, mask_alignment), [1.0],
                 cfg.regression_weight, cfg.distill_weight, chunk_size, draft_vocab, _same_doc(doc_ids, mask_alignment))


def _target_mask(loss_mask: torch.Tensor, alignment: str) -> torch.Tensor:
    """Mask per target index ``s`` (``[B, L]``): ``loss_mask[s + 2]`` ("predicted", 0 past the end) or
    ``loss_mask[s]`` ("eagle")."""
    loss_mask = loss_mask.float()
    if alignment == "predicted":
        return F.pad(loss_mask[:, 2:], (0, min(2, loss_mask.shape[1])))
    if alignment == "eagle":
        return loss_mask
    raise ValueError(f"mask_alignment must be 'predicted' or 'eagle', got {alignment!r}")


def _same_doc(doc_ids: torch.Tensor | None, alignment: str):
    """For packed rows: ``same(b, t, s)``, whether position ``t`` (where a head predicts from) and the end of what
    target index ``s`` stands for (the predicted token ``x_{s+2}``, or with the "eagle" alignment the target state
    ``h_{s+1}``) lie in one conversation; None for unpacked rows."""
    if doc_ids is None:
        return None
    reach = 2 if alignment == "predicted" else 1
    ahead = torch.cat([doc_ids[:, reach:], doc_ids.new_full((doc_ids.shape[0], min(reach, doc_ids.shape[1])), -1)], 1)
    return lambda b, t, s: doc_ids[b, t] == ahead[b, s]


def _loss(preds, target, weight_lm, target_mask, head_weights, regression_weight, distill_weight, chunk_size,
          draft_vocab, same_doc=None):
    n = preds.shape[0]
    b_idx, s_idx = target_mask.nonzero(as_tuple=True)
    heads = torch.arange(n, device=preds.device)[:, None]
    weights = target_mask[b_idx, s_idx].float()[None] * (s_idx[None] >= heads)  # [N, M]: head i needs t = s-i >= 0
    if same_doc is not None:
        weights = weights * same_doc(b_idx[None], (s_idx[None] - heads).clamp(min=0), s_idx[None])
    rows = preds[heads, b_idx[None], (s_idx[None] - heads).clamp(min=0)]  # [N, M, H]
    targets = target[b_idx, s_idx]  # [M, H]
    reg = F.smooth_l1_loss(rows.float(), targets.float().expand_as(rows), reduction="none", beta=1.0).mean(-1)
    v_sum = (reg * weights).sum(-1)
    need_grad = torch.is_grad_enabled() and rows.requires_grad
    p_sum, correct = _SoftCrossEntropy.apply(rows, targets, weight_lm.detach(), weights, chunk_size, need_grad,
                                             draft_vocab)
    count = weights.sum(-1)
    denom = count.clamp(min=1.0)
    vloss, ploss = v_sum / denom, p_sum / denom
    head_loss = (regression_weight * vloss + distill_weight * ploss) * torch.tensor(head_weights, device=preds.device)
    loss = head_loss.sum()
    sums = torch.cat([torch.stack([head_loss.detach(), count, v_sum.detach(), p_sum.detach()], 1), correct], 1)
    return loss, Metrics(sums.float(), 1.0)


class _SoftCrossEntropy(torch.autograd.Function):
    """Per head ``n``: ``sum_m w[n, m] * CE(softmax(W_d y_m), log_softmax(W_d p[n, m]))`` and weighted top-k hit
    counts of the teacher's argmax over the whole vocabulary, over chunks of rows; ``W_d`` is ``W`` or its
    draft-vocabulary rows. ``W`` is frozen, so the gradient w.r.t. ``p``, ``w * (softmax(W_d p) - softmax(W_d y))
    @ W_d``, is formed chunk by chunk in the forward pass and only that ``[N, M, H]`` tensor is kept for backward."""

    @staticmethod
    def forward(ctx, rows, targets, weight_lm, weights, chunk_size, need_grad, draft_vocab):
        n, m, _ = rows.shape
        weight_draft = weight_lm if draft_vocab is None else weight_lm.index_select(0, draft_vocab)
        ce = torch.zeros(n, device=rows.device)
        correct = torch.zeros(n, len(TOPK), device=rows.device)
        grad = torch.zeros_like(rows) if need_grad else None
        k = min(max(TOPK), weight_draft.shape[0])
        for start in range(0, m, chunk_size):
            chunk = slice(start, start + chunk_size)
            teacher = F.linear(targets[chunk].to(weight_lm.dtype), weight_lm).float()
            ref = teacher.argmax(-1, keepdim=True)
            if draft_vocab is not None:
                teacher = teacher[:, draft_vocab]
            q = teacher.softmax(-1)
            for i in range(n):
                w = weights[i, chunk]
                logp = F.linear(rows[i, chunk].to(weight_draft.dtype), weight_draft).float().log_softmax(-1)
                ce[i] += (w * -(q * logp).sum(-1)).sum()
                top = logp.topk(k, -1).indices
                if draft_vocab is not None:
                    top = draft_vocab[top]
                hits = (top == ref).float().cumsum(-1)  # [c, k]: ref within the top-1..k
                correct[i, :k] += (w[:, None] * hits).sum(0)
                if need_grad:
                    g = (logp.exp() - q) * w[:, None]
                    grad[i, chunk] = (g.to(weight_draft.dtype) @ weight_draft).to(rows.dtype)
        ctx.mark_non_differentiable(correct)
        ctx.save_for_backward(grad)
        return ce, correct

    @staticmethod
    def backward(ctx, grad_ce, grad_correct):
        (grad,) = ctx.saved_tensors
        return grad * grad_ce.to(grad.dtype)[:, None, None], None, None, None, None, None, None
