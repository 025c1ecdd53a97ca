"""The abstract draft: what every draft model shares, and what each one must say about itself.

A draft reads the base model's last hidden states and proposes a tree of likely next tokens. Callers (the trainer,
the speculative decoder, the evaluation) never ask a draft for its type name; they ask it for the property they
need. A subclass sets the class attributes below and implements ``init_from_base``, ``forward_train``, ``extend``,
``runner``, ``batch_runner`` and ``greedy_chain``; :mod:`clover.model.registry` maps a type name to the class.

Class attributes of a draft class:

* ``draft_type`` (the name written into ``config.json``), ``aliases`` (other names it answers to), ``label``
  (for people, e.g. ``"Clover-2"``) and ``method`` (its method name in answer files and comparisons);
* ``Config`` (a frozen, validated dataclass: the draft's own block of ``config.json``) and ``config_block`` (the
  block's key);
* ``hidden_kind``: the base state it reads, ``"prenorm"`` (the last decoder layer's output) or ``"postnorm"``
  (after the final norm);
* ``train_defaults`` (learning rate, warm-up) and ``train_module`` (its training command, ``python -m ...``).

A draft may propose tokens from a *draft vocabulary*, a subset of the base vocabulary (``draft_vocab_size`` in its
config; 0 = the whole vocabulary): its logits are the frozen LM head's rows for those tokens only, which makes every
draft level and every training head several times cheaper for a base whose vocabulary is large next to its hidden
size (SmolLM2: 49,152 x 576; FR-Spec and EAGLE-3 use the same idea). Verification always uses the full base
distribution, so generation stays lossless; a token outside the subset simply cannot be drafted. The subset (token
ids, ascending) is the persistent buffer ``draft_vocab``, saved in the checkpoint and loaded with strict keys.

Frozen base tensors (LM head, final-norm weight, input embedding) and the RoPE tables are held outside the module's
parameter/buffer registry: they are references to the base model's tensors (no copy while dtype and device agree),
are absent from ``state_dict()`` and so from the checkpoint, are not seen by DDP (which would otherwise broadcast
vocabulary-sized buffers every step) and follow ``.to()`` / ``.half()`` / ``.cuda()`` through an overridden
``_apply``. ``to_empty`` is not supported.

Module names in code may differ from the key names of the original checkpoints: ``checkpoint_names`` maps a
module's name here to its name on disk, and state-dict hooks translate both ways, so checkpoints keep the original
keys.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.utils.checkpoint
from torch import nn

from clover.errors import CloverError
from clover.model.base import BaseModel
from clover.model.cache import KVCache, additive_mask, attention_mask
from clover.model.kernels import PrepackedLinear
from clover.model.layers import LlamaArgs, Rotary
from clover.model.reduce import argmax

BASE_KEYS = ("architecture", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads")


def base_block(base: BaseModel) -> dict:
    """The ``base`` block of a draft config: what identifies the base model the draft was trained for."""
    a = base.args
    return {"name_or_path": base.name_or_path, "architecture": a.architecture, "hidden_size": a.hidden_size,
            "vocab_size": a.vocab_size, "num_attention_heads": a.num_attention_heads,
            "num_key_value_heads": a.num_key_value_heads, "intermediate_size": a.intermediate_size}


def check_base(config: dict, base: BaseModel, where: str = "draft") -> None:
    """CloverError unless the base model matches the one recorded in the draft config."""
    recorded = config.get("base") or {}
    actual = base_block(base)
    for key in BASE_KEYS:
        if recorded.get(key) != actual[key]:
            raise CloverError(f"{where} was trained for a base with {key}={recorded.get(key)!r}, but the base model "
                              f"{base.name_or_path or '(in memory)'} has {key}={actual[key]!r}; pass the base model "
                              f"the draft was trained for ({recorded.get('name_or_path')!r})")


# ---- typed config blocks --------------------------------------------------------------------------------------------
def check_choice(block: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise CloverError(f"{block} config {name}={value!r} is not one of {', '.join(map(str, allowed))}")


def check_positive_int(block: str, name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CloverError(f"{block} config {name} must be an integer >= {minimum}, got {value!r}")


def check_number(block: str, name: str, value, minimum: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise CloverError(f"{block} config {name} must be a number >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    """Base of the drafts' config blocks: a frozen dataclass, validated in ``__post_init__`` by subclasses.

    ``legacy`` holds the value a key takes when a checkpoint written before that key existed lacks it."""

    draft_vocab_size: int = 0

    block: ClassVar[str] = ""
    legacy: ClassVar[dict[str, Any]] = {}

    def __post_init__(self):
        check_positive_int(self.block, "draft_vocab_size", self.draft_vocab_size, minimum=0)

    @classmethod
    def from_block(cls, block: dict, draft_type: str) -> "DraftConfig":
        """The config of a ``config.json`` block: unknown keys and missing keys (other than ``legacy`` ones) are
        errors."""
        if not isinstance(block, dict):
            raise CloverError(f"not a complete {draft_type} config (no '{cls.block}' block); re-save the checkpoint "
                              f"with this version of clover")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(block) - names)
        missing = sorted(names - set(block) - set(cls.legacy))
        if unknown or missing:
            raise CloverError(f"not a complete {draft_type} config (unknown keys {unknown} and missing keys "
                              f"{missing} in its '{cls.block}' block); re-save the checkpoint with this version of "
                              f"clover")
        return cls(**{**cls.legacy, **block})

    @classmethod
    def with_overrides(cls, overrides: dict, draft_type: str) -> "DraftConfig":
        """Defaults updated by ``overrides`` (keys of the block); unknown keys are an error."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise CloverError(f"unknown {draft_type} config option(s) {unknown}; valid options: {sorted(names)}")
        return cls(**overrides)

    def to_block(self) -> dict:
        return dataclasses.asdict(self)


# ---- the draft --------------------------------------------------------------------------------------------------
class DraftModel(nn.Module):
    """What every draft shares: typed config, frozen base tensors kept out of ``state_dict``, RoPE tables, own KV
    cache, the draft vocabulary and the translation of module names to checkpoint keys."""

    draft_type: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    label: ClassVar[str] = ""
    method: ClassVar[str] = ""
    Config: ClassVar[type[DraftConfig]] = DraftConfig
    config_block: ClassVar[str] = ""
    hidden_kind: ClassVar[str] = "postnorm"
    train_defaults: ClassVar[dict] = {}
    train_module: ClassVar[str] = ""
    checkpoint_names: ClassVar[dict[str, str]] = {}  # module name here -> key prefix in checkpoints

    def __init__(self, config: dict, base: BaseModel):
        super().__init__()
        check_base(config, base)
        self.base_info = config["base"]
        self.args = LlamaArgs(**config["llama"])
        self.cfg = self.Config.from_block(config.get(self.config_block), self.draft_type)
        device = base.device
        size = self.cfg.draft_vocab_size
        if size > self.args.vocab_size:
            raise CloverError(f"{self.config_block} config draft_vocab_size must be an integer from 0 (the whole "
                              f"vocabulary) to {self.args.vocab_size}, got {size!r}")
        if size:  # filled by init_draft (from the training data) or by the checkpoint
            self.register_buffer("draft_vocab", torch.arange(size, device=device))
        else:
            self.draft_vocab = None
        self._draft_head = (None, None)  # (key, W_lm[draft_vocab]) cache, see draft_head_weight
        self._logits_head = PrepackedLinear()
        with torch.device(device):  # real tensors even when the module itself is built on the meta device
            rotary = Rotary(self.args)
        frozen = {"lm_head": base.lm_head.weight.detach(), "final_norm": base.model.norm.weight.detach(),
                  "rope_cos": rotary.cos, "rope_sin": rotary.sin}
        separate = self.embedding_source == "input" and base.model.embed_tokens.weight is not base.lm_head.weight
        if separate:
            frozen["embed"] = base.model.embed_tokens.weight.detach()
        self._embed_key = "embed" if separate else "lm_head"  # otherwise E aliases W_lm (never a copy)
        self.frozen = frozen
        self.cache: KVCache | None = None
        self.gradient_checkpointing = False
        if self.checkpoint_names:
            self.register_state_dict_post_hook(_rename_keys(self.checkpoint_names))
            self.register_load_state_dict_pre_hook(_rename_keys({v: k for k, v in self.checkpoint_names.items()}))

    # ---- what callers ask a draft ------------------------------------------------------------------------------
    @property
    def embedding_source(self) -> str:
        """The token embedding ``E`` the draft reads: ``"lm_head"`` (``W_lm`` itself) or ``"input"`` (the base
        input embedding; the same tensor when the base ties them)."""
        return "input"

    @classmethod
    def default_config(cls, base: BaseModel, **overrides) -> dict:
        """The full ``config.json`` of a new draft for ``base``: defaults updated by ``overrides``."""
        return {"draft_type": cls.draft_type, "base": base_block(base), "llama": base.args.to_dict(),
                cls.config_block: cls.Config.with_overrides(overrides, cls.draft_type).to_block()}

    @classmethod
    def ddp_unused_parameters(cls, overrides: dict) -> bool:
        """Whether a draft configured by ``overrides`` leaves trainable weights out of its loss (DDP must know)."""
        return False

    @property
    def config(self) -> dict:
        """The draft's ``config.json`` (a fresh dict)."""
        return {"draft_type": self.draft_type, "base": dict(self.base_info), "llama": self.args.to_dict(),
                self.config_block: self.cfg.to_block()}

    @property
    def max_depth(self) -> int | None:
        """The deepest tree level the draft can propose (None: no limit of its own)."""
        return None

    @property
    def train_heads(self) -> int:
        """Predictions per position in training (one loss and one set of metrics each)."""
        return 1

    @property
    def chain_depth(self) -> int:
        """Depth of the greedy chain the trainer's chain accuracy measures."""
        return self.max_depth or 5

    @property
    def training_noise(self) -> float:
        """Scale of the noise the trainer adds to the input hidden states (0 = none)."""
        return 0.0

    def loss(self, preds: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor,
             mask_alignment: str = "predicted", doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Training loss and metrics of ``forward_train``'s output (see :mod:`clover.model.losses`; ``doc_ids``:
        the conversation of each position of packed rows)."""
        raise NotImplementedError

    def runner(self):
        """A fresh tree runner (:class:`clover.generate.tree.DraftExpander` with ``start``/``reset``)."""
        raise NotImplementedError

    def batch_runner(self, batch: int, capacity: int):
        """A runner for the rows of a batch, with its own draft cache (see :mod:`clover.model.draft_rows`)."""
        raise NotImplementedError

    def greedy_chain(self, hidden: torch.Tensor, next_ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """``[D, B, L]`` (``D`` = :attr:`chain_depth`): at every position, the draft's greedy chain after the root
        ``x_{t+1}``, each depth fed with the draft's own previous token."""
        raise NotImplementedError

    # ---- frozen tensors -----------------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        with torch.no_grad():
            self.frozen = {name: fn(t) for name, t in self.frozen.items()}
        return self

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The base LM head ``W_lm [V, H]`` (frozen)."""
        return self.frozen["lm_head"]

    @property
    def embed_weight(self) -> torch.Tensor:
        """The token embedding table ``E [V, H]`` (frozen): ``W_lm`` itself or the base input embedding."""
        return self.frozen[self._embed_key]

    @property
    def final_norm_weight(self) -> torch.Tensor:
        """The base final-norm weight ``g_f [H]`` (frozen; recomputes post-norm targets from pre-norm states)."""
        return self.frozen["final_norm"]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def draft_head_weight(self) -> torch.Tensor:
        """The LM head rows the draft proposes from: ``W_lm[draft_vocab]`` (cached), or ``W_lm`` itself."""
        w = self.lm_head_weight
        if self.draft_vocab is None:
            return w
        key = (w.data_ptr(), w.dtype, self.draft_vocab.data_ptr())
        if self._draft_head[0] != key:
            self._draft_head = (key, w.index_select(0, self.draft_vocab))
        return self._draft_head[1]

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        """Set the draft vocabulary (as many distinct token ids as ``draft_vocab_size``; stored ascending)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).unique()
        if self.draft_vocab is None or ids.numel() != self.draft_vocab.numel():
            raise CloverError(f"expected {0 if self.draft_vocab is None else self.draft_vocab.numel()} distinct "
                              f"draft-vocabulary token ids, got {ids.numel()}")
        if ids[0] < 0 or ids[-1] >= self.args.vocab_size:
            raise CloverError(f"draft-vocabulary token ids must lie in [0, {self.args.vocab_size})")
        self.draft_vocab.copy_(ids)

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., H] -> [..., V_d]``: logits over the draft vocabulary (column ``j`` is token
        ``draft_vocab[j]``), or over the whole vocabulary when there is none."""
        w = self.draft_head_weight
        return self._logits_head(hidden.to(w.dtype), w)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., H] -> [..., V]`` through the frozen base LM head; with a draft vocabulary only its
        tokens get logits and every other token gets ``-inf`` (probability 0)."""
        logits = self.draft_logits(hidden)
        if self.draft_vocab is None:
            return logits
        full = logits.new_full(logits.shape[:-1] + (self.args.vocab_size,), -torch.inf)
        return full.index_copy_(-1, self.draft_vocab, logits)

    def greedy_tokens(self, hidden: torch.Tensor, rows: int = 2048) -> torch.Tensor:
        """Argmax of the base LM head over ``hidden [..., H]``, in chunks of rows (no full ``[..., V]`` tensor)."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        return torch.cat([argmax(self.lm_logits(c)) for c in flat.split(rows)]).view(hidden.shape[:-1])

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.embed_weight).to(self.dtype)

    def run_layers(self, x: torch.Tensor, start: int, cache: KVCache | None, position_ids: torch.Tensor | None = None,
                   mask=None) -> torch.Tensor:
        """Run the decoder layers on ``x [B, T, H]`` at positions ``start + arange(T)`` (or ``position_ids``) with a
        causal mask over cache + new tokens (or ``mask``), appending to ``cache`` when given."""
        t = x.shape[1]
        if position_ids is None:
            position_ids = torch.arange(start, start + t, device=x.device)
        if mask is None:
            mask = attention_mask(start, None, t, x.device)
        mask = additive_mask(mask, x.dtype)
        cos, sin = Rotary.lookup(self.frozen["rope_cos"], self.frozen["rope_sin"], position_ids, x.dtype)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i, start)
        return x

    # ---- inference cache ----------------------------------------------------------------------------------------
    def allocate_cache(self, max_len: int) -> None:
        """(Re)allocate the draft's own KV cache for ``max_len`` positions (batch 1)."""
        a = self.args
        max_len = min(max_len, a.max_position_embeddings)
        self.cache = KVCache(len(self.layers), 1, a.num_key_value_heads, max_len, a.head_dim, self.dtype, self.device)

    def reset(self) -> None:
        if self.cache is not None:
            self.cache.reset()

    @property
    def cache_length(self) -> int:
        return 0 if self.cache is None else self.cache.length

    def truncate(self, length: int) -> None:
        self._need_cache(0).truncate(length)

    def _need_cache(self, n_new: int) -> KVCache:
        if self.cache is None:
            raise RuntimeError("the draft has no KV cache: call allocate_cache(max_len) first")
        if self.cache.length + n_new > self.cache.capacity:
            raise CloverError(f"draft cache of {self.cache.capacity} positions cannot hold "
                              f"{self.cache.length + n_new}; allocate_cache with a larger max_len")
        return self.cache


def _rename_keys(names: dict[str, str]):
    """A state-dict hook (post-save or pre-load) renaming the key prefixes ``names`` maps, under ``prefix``."""

    def hook(module, state_dict, prefix, *args):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            head, _, rest = key[len(prefix):].partition(".")
            if head in names:
                state_dict[f"{prefix}{names[head]}.{rest}"] = state_dict.pop(key)

    return hook
