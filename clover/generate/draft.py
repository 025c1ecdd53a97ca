"""Adapters that let the tree builders drive either draft with the same two calls.

``start(hidden, next_ids)`` feeds the newly committed positions to the draft (pairs of a base hidden state at
position ``p`` and the token at ``p + 1``, the last pair using the not-yet-committed root) and returns the logits for
the root's children; ``expand(parent_rows, tokens, depth)`` returns the logits for the children of a batch of tree
nodes (see :class:`clover.generate.tree.DraftExpander`). Logits are over the draft's vocabulary: column ``j`` is token
``vocab[j]`` (``vocab`` is None when the draft proposes from the whole vocabulary).
"""
from __future__ import annotations

import torch


class Clover2Runner:
    """Clover-2: the trunk runs once per step on committed positions; the tree grows through the RNN heads only."""

    hidden_kind = "prenorm"

    def __init__(self, draft):
        self.draft = draft
        self.vocab = draft.draft_vocab
        self.states = None

    def reset(self) -> None:
        self.draft.reset()

    def start(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        trunk = self.draft.extend(hidden, next_ids)[0, -1:]
        self.states, out = self.draft.head(trunk, None, 0)
        return self.draft.draft_logits(out)[0]

    def expand(self, parent_rows: torch.Tensor, tokens: torch.Tensor, depth: int) -> torch.Tensor:
        self.states, out = self.draft.head(self.states[parent_rows], tokens, depth)
        return self.draft.draft_logits(out)


class EagleRunner:
    """EAGLE-1: tree nodes run through the draft's decoder layer, attending to the committed prefix and their own
    expanded ancestors; their cache entries are dropped before the next step."""

    hidden_kind = "postnorm"

    def __init__(self, draft):
        self.draft = draft
        self.vocab = draft.draft_vocab
        self.committed = 0

    def reset(self) -> None:
        self.draft.reset()
        self.committed = 0

    def start(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        self.draft.truncate(self.committed)
        feats = self.draft.extend(hidden, next_ids)[0, -1:]
        self.committed = self.draft.cache_length
        self.feats = feats
        self.ancestors = torch.zeros(1, 0, dtype=torch.bool, device=feats.device)  # over tree cache entries
        return self.draft.draft_logits(feats)[0]

    def expand(self, parent_rows: torch.Tensor, tokens: torch.Tensor, depth: int) -> torch.Tensor:
        r = tokens.numel()
        device = tokens.device
        self.ancestors = torch.cat([self.ancestors[parent_rows], torch.eye(r, dtype=torch.bool, device=device)], 1)
        mask = torch.cat([torch.ones(r, self.committed, dtype=torch.bool, device=device), self.ancestors], 1)
        positions = torch.full((r,), self.committed + depth - 1, dtype=torch.long, device=device)
        self.feats = self.draft.tree_step(self.feats[parent_rows], tokens, positions, mask)
        return self.draft.draft_logits(self.feats)


def runner_for(draft):
    kind = getattr(draft, "draft_type", None) or draft.config["draft_type"]
    return {"clover2": Clover2Runner, "eagle": EagleRunner}[kind](draft)
