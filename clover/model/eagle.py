"""The EAGLE-1 draft as used for the Clover-2 comparison, with the base's own RoPE configuration.

``f_t = fc([E_in(x_{t+1}) ; h_t])`` (embedding first; ``E_in`` = the frozen base input embedding, ``h_t`` the
post-norm base state), then ``num_layers`` Llama decoder layers with the base's RoPE/GQA configuration, the first
without an input norm, and no final norm: the output at ``t`` is the predicted post-norm feature ``h_{t+1}``.
Trainable weights keep PyTorch's default initialisation. At inference tree nodes run through the decoder layers
with a tree mask, appending their keys/values to the draft cache (the runner truncates back afterwards).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from clover.model.base import BaseModel
from clover.model.draft import DraftConfig, DraftModel, check_number, check_positive_int
from clover.model.cache import KVCache
from clover.model.draft_rows import extend_rows, pad_rows, row_cache, run_rows, unpad_rows
from clover.model.layers import DecoderLayer
from clover.model.losses import eagle_loss

CHAIN_DEPTH = 5  # EAGLE's chain accuracy is measured to the depth of the verification tree


@dataclasses.dataclass(frozen=True)
class EagleConfig(DraftConfig):
    """The ``eagle`` block of an EAGLE-1 ``config.json`` (``input_noise``: the scale of the training input noise,
    applied by the trainer)."""

    num_layers: int = 1
    regression_weight: float = 1.0
    distill_weight: float = 0.1
    input_noise: float = 0.2
    draft_vocab_size: int = 0

    block: ClassVar[str] = "eagle"

    def __post_init__(self):
        super().__post_init__()
        check_positive_int(self.block, "num_layers", self.num_layers)
        for name in ("regression_weight", "distill_weight", "input_noise"):
            check_number(self.block, name, getattr(self, name))


class EagleDraft(DraftModel):
    draft_type = "eagle"
    aliases = ("eagle1", "eagle-1")
    label = "EAGLE-1"
    method = "eagle"
    Config = EagleConfig
    config_block = "eagle"
    hidden_kind = "postnorm"
    train_defaults = {"lr": 3e-5, "warmup_steps": 500}
    train_module = "clover.train.main"

    def __init__(self, config: dict, base: BaseModel):
        super().__init__(config, base)
        h = self.args.hidden_size
        self.fc = nn.Linear(2 * h, h)
        self.layers = nn.ModuleList(DecoderLayer(self.args, input_layernorm=i > 0) for i in range(self.cfg.num_layers))

    @property
    def chain_depth(self) -> int:
        return CHAIN_DEPTH

    @property
    def training_noise(self) -> float:
        return self.cfg.input_noise

    def loss(self, preds, target, loss_mask, mask_alignment="predicted", doc_ids=None):
        return eagle_loss(preds, target, self.lm_head_weight, loss_mask, self.cfg, mask_alignment=mask_alignment,
                          draft_vocab=self.draft_vocab, doc_ids=doc_ids)

    def runner(self) -> "EagleRunner":
        return EagleRunner(self)

    def batch_runner(self, batch: int, capacity: int) -> "EagleBatchRunner":
        return EagleBatchRunner(self, batch, capacity)

    def init_from_base(self, base: BaseModel, hidden_sample: torch.Tensor | None = None) -> None:
        """Nothing to copy: EAGLE-1 keeps PyTorch's default initialisation (the embedding is the frozen base one)."""

    def _features(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.embed(ids), hidden.to(self.dtype)], dim=-1))

    # ---- training -----------------------------------------------------------------------------------------------
    def forward_train(self, hidden: torch.Tensor, next_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted features ``[B, L, H]`` from post-norm states ``[B, L, H]`` and shifted ids ``[B, L]``
        (``next_ids[t] = x_{t+1}``); the output at ``t`` targets ``h_{t+1}``. Packed rows give ``position_ids`` and
        an attention ``mask`` (see :meth:`Clover2Draft.forward_train`)."""
        return self.run_layers(self._features(hidden, next_ids), 0, None, position_ids, mask)

    def forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Same as :meth:`forward_train` (call the module itself when it is wrapped by DDP)."""
        return self.forward_train(hidden, next_ids, position_ids, mask)

    @torch.no_grad()
    def greedy_chain(self, hidden: torch.Tensor, next_ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """The inference path (``extend`` + ``tree_step``), one conversation at a time; each depth is fed the
        draft's own predicted features."""
        chains = torch.zeros(CHAIN_DEPTH, *next_ids.shape, dtype=torch.long, device=next_ids.device)
        a, saved = self.args, self.cache
        for row, n in enumerate(lengths):
            self.cache = KVCache(len(self.layers), 1, a.num_key_value_heads, n * CHAIN_DEPTH, a.head_dim, self.dtype,
                                 self.device)
            feats = self.extend(hidden[row:row + 1, :n], next_ids[row:row + 1, :n])[0]
            chains[0, row, :n] = tokens = self.greedy_tokens(feats)
            eye = torch.eye(n, dtype=torch.bool, device=feats.device)
            mask = torch.ones(n, n, dtype=torch.bool, device=feats.device).tril()  # node t sees the prefix 0..t
            for depth in range(1, CHAIN_DEPTH):
                mask = torch.cat([mask, eye], 1)  # ... its own chain so far, and itself
                positions = (torch.arange(n, device=feats.device) + depth).clamp(max=a.max_position_embeddings - 1)
                feats = self.tree_step(feats, tokens, positions, mask)
                chains[depth, row, :n] = tokens = self.greedy_tokens(feats)
        self.cache = saved
        return chains

    # ---- inference (batch 1) ------------------------------------------------------------------------------------
    @torch.no_grad()
    def extend(self, hidden_states: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """Append ``n`` committed pairs (post-norm ``h_p [1, n, H]``, ``x_{p+1} [1, n]``) to the draft cache at
        positions ``cache_length ..``; returns the predicted features ``[1, n, H]``."""
        cache = self._need_cache(hidden_states.shape[1])
        start = cache.length
        out = self.run_layers(self._features(hidden_states, next_ids), start, cache)
        cache.length = start + hidden_states.shape[1]
        return out

    @torch.no_grad()
    def tree_step(self, features: torch.Tensor, tokens: torch.Tensor, position_ids: torch.Tensor,
                  mask: torch.Tensor) -> torch.Tensor:
        """Run ``R`` tree nodes (parent features ``[R, H]``, their tokens ``[R]``, positions ``[R]``) through the
        draft, attending as ``mask [R, cache_length + R]`` says (True = attend) and appending their keys/values at
        ``cache_length``. Returns the nodes' predicted features ``[R, H]``."""
        r = tokens.numel()
        cache = self._need_cache(r)
        start = cache.length
        if tuple(mask.shape) != (r, start + r):
            raise ValueError(f"tree mask must be [{r}, {start + r}] (cache length + nodes), got {tuple(mask.shape)}")
        x = self._features(features, tokens)[None]
        out = self.run_layers(x, start, cache, position_ids=position_ids, mask=mask.to(torch.bool))
        cache.length = start + r
        return out[0]


class EagleRunner:
    """Drives an EAGLE-1 draft for the tree builders: tree nodes run through the draft's decoder layer, attending
    to the committed prefix and their own expanded ancestors; their cache entries are dropped before the next
    step (see :class:`clover.generate.tree.DraftExpander`)."""

    def __init__(self, draft: EagleDraft):
        self.draft = draft
        self.vocab = draft.draft_vocab
        self.committed = 0

    def reset(self) -> None:
        self.draft.reset()
        self.committed = 0

    def start(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """Feed committed pairs ``(h_p, x_{p+1})`` (the last one pairs with the not-yet-committed root); returns
        the logits of the root's children."""
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


class EagleBatchRunner:
    """:class:`EagleRunner` for the rows of a batch (see :mod:`clover.model.draft_rows`): one forward of the draft's
    layers over every starting row's new pairs, and one per tree level over every row's nodes, each node attending
    to its row's committed prefix and its own expanded ancestors."""

    def __init__(self, draft: EagleDraft, batch: int, capacity: int):
        self.draft, self.vocab = draft, draft.draft_vocab
        self.cache = row_cache(draft, batch, capacity)
        self.committed = np.zeros(batch, dtype=np.int64)  # each row's committed positions (host, exact)
        self.feats: list[torch.Tensor | None] = [None] * batch
        self.ancestors: list[torch.Tensor | None] = [None] * batch  # per row: its last level's nodes x its tree

    def reset(self, row: int) -> None:
        self.cache.truncate_rows(row, 0)
        self.committed[row] = 0

    def move_row(self, src: int, dst: int) -> None:
        """Row ``dst`` takes over row ``src``'s sequence (``src`` is left empty)."""
        self.cache.move_row(src, dst)
        self.committed[dst], self.committed[src] = self.committed[src], 0
        for per_row in (self.feats, self.ancestors):
            per_row[dst], per_row[src] = per_row[src], None

    @torch.no_grad()
    def start(self, rows: list[int], hidden: list[torch.Tensor], next_ids: list[torch.Tensor]) -> list[torch.Tensor]:
        span = max(rows) + 1
        self.cache.truncate_rows(slice(0, span), self.committed[:span])  # drop the last step's tree nodes
        feats, counts = extend_rows(self.draft, self.cache, rows, hidden, next_ids, self.draft._features)
        self.committed[:span] += counts
        for j, row in enumerate(rows):
            self.feats[row] = feats[j:j + 1]
            self.ancestors[row] = torch.zeros(1, 0, dtype=torch.bool, device=feats.device)
        return list(self.draft.draft_logits(feats))

    @torch.no_grad()
    def expand(self, rows: list[int], parent_rows: list[torch.Tensor], tokens: list[torch.Tensor],
               depths: list[int]) -> list[torch.Tensor]:
        span, device = max(rows) + 1, tokens[0].device
        counts = np.zeros(span, dtype=np.int64)
        counts[rows] = sizes = [t.numel() for t in tokens]
        width, past = int(counts.max()), max(self.ancestors[row].shape[1] for row in rows)
        # what each node sees of its row's tree so far: its ancestors (the columns before a shorter tree: committed)
        past_mask = torch.ones(span, width, past, dtype=torch.bool, device=device)
        positions = torch.zeros(span, width, dtype=torch.long, device=device)
        for row, p, n, depth in zip(rows, parent_rows, sizes, depths):
            seen = self.ancestors[row][p]
            past_mask[row, :n, past - seen.shape[1]:] = seen
            self.ancestors[row] = torch.cat([seen, torch.eye(n, dtype=torch.bool, device=device)], 1)
            positions[row] = int(self.committed[row]) + depth - 1
        parents = torch.cat([self.feats[row][p] for row, p in zip(rows, parent_rows)])
        x, _ = pad_rows(rows, list(self.draft._features(parents, torch.cat(tokens))[None].split(sizes, dim=1)), span)
        eye = torch.eye(width, dtype=torch.bool, device=device)
        out = run_rows(self.draft, x, self.cache, counts, positions, eye, past_mask if past else None)
        feats = unpad_rows(out, rows, sizes)
        for row, f in zip(rows, feats.split(sizes)):
            self.feats[row] = f
        return list(self.draft.draft_logits(feats).split(sizes))
