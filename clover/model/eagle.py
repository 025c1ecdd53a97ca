"""The EAGLE-1 draft as used for the Clover-2 comparison (spec §6.1, with the RoPE fix B2).

``f_t = fc([E_in(x_{t+1}) ; h_t])`` (embedding first; ``E_in`` = the frozen base input embedding, ``h_t`` the
post-norm base state), then ``num_layers`` Llama decoder layers with the base's RoPE/GQA configuration, the first
without an input norm, and no final norm: the output at ``t`` is the predicted post-norm feature ``h_{t+1}``.
Trainable weights keep PyTorch's default initialisation. At inference tree nodes run through the decoder layers
with a tree mask, appending their keys/values to the draft cache (the caller truncates back afterwards).
"""
from __future__ import annotations

import torch
from torch import nn

from clover.errors import CloverError
from clover.model.base import BaseModel
from clover.model.checkpoint import DraftModel, make_config
from clover.model.layers import DecoderLayer

DEFAULTS = {"num_layers": 1, "regression_weight": 1.0, "distill_weight": 0.1, "input_noise": 0.2,
            "draft_vocab_size": 0}


def default_config(base: BaseModel, **overrides) -> dict:
    """EAGLE-1 draft config for ``base`` (``input_noise`` is the training input-noise scale, applied by the
    trainer)."""
    return make_config("eagle", "eagle", base, DEFAULTS, overrides)


class EagleDraft(DraftModel):
    draft_type = "eagle"
    config_block = "eagle"
    default_config = staticmethod(default_config)

    def __init__(self, config: dict, base: BaseModel):
        n_layers = config["eagle"]["num_layers"]
        if not isinstance(n_layers, int) or n_layers < 1:
            raise CloverError(f"eagle config num_layers must be a positive integer, got {n_layers!r}")
        super().__init__(config, base, "input")
        h = self.args.hidden_size
        self.fc = nn.Linear(2 * h, h)
        self.layers = nn.ModuleList(DecoderLayer(self.args, input_layernorm=i > 0) for i in range(n_layers))

    def init_from_base(self, base: BaseModel, hidden_sample: torch.Tensor | None = None) -> None:
        """Nothing to copy: EAGLE-1 keeps PyTorch's default initialisation (the embedding is the frozen base one)."""

    def _features(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.embed(ids), hidden.to(self.dtype)], dim=-1))

    # ---- training -----------------------------------------------------------------------------------------------
    def forward_train(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """Predicted features ``[B, L, H]`` from post-norm states ``[B, L, H]`` and shifted ids ``[B, L]``
        (``next_ids[t] = x_{t+1}``); the output at ``t`` targets ``h_{t+1}``."""
        return self.run_layers(self._features(hidden, next_ids), 0, None)

    def forward(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`forward_train` (call the module itself when it is wrapped by DDP)."""
        return self.forward_train(hidden, next_ids)

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
