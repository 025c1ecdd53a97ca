"""Draft checkpoints, and the plumbing both drafts share.

A draft checkpoint is a folder with ``config.json`` (the draft config: ``draft_type``, a ``base`` block identifying
the base model, the base's ``llama`` args and the draft's own block) and ``model.safetensors`` holding only the
trainable draft weights. :func:`init_draft` builds a draft from a base model for training from scratch (the only
place where weights are initialised from the base); :func:`load_draft` rebuilds one from a folder with strict key
checks and never runs that initialisation (spec §9 B17, B18).

A draft may propose tokens from a *draft vocabulary*, a subset of the base vocabulary (``draft_vocab_size`` in its
config block; 0 = the whole vocabulary): its logits are the frozen LM head's rows for those tokens only, which makes
every draft level and every training head several times cheaper for a base whose vocabulary is large next to its
hidden size (SmolLM2: 49,152 x 576; FR-Spec and EAGLE-3 use the same idea). Verification always uses the full base
distribution, so generation stays lossless; a token outside the subset simply cannot be drafted. The subset (token
ids, ascending) is the persistent buffer ``draft_vocab``, saved in the checkpoint and loaded with strict keys.

Frozen base tensors (LM head, final-norm weight, input embedding) and the RoPE tables are held by
:class:`DraftModel` outside the module's parameter/buffer registry: they are references to the base model's tensors
(no copy while dtype and device agree), are absent from ``state_dict()`` and so from the checkpoint, are not seen by
DDP (which would otherwise broadcast vocabulary-sized buffers every step) and follow ``.to()`` / ``.half()`` /
``.cuda()`` through an overridden ``_apply``. ``to_empty`` is not supported.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.utils.checkpoint
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from clover.errors import CloverError
from clover.model.base import BaseModel, parse_dtype
from clover.model.layers import KVCache, LlamaArgs, PrepackedLinear, Rotary, attention_mask

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
BASE_KEYS = ("architecture", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads")


def base_block(base: BaseModel) -> dict:
    """The ``base`` block of a draft config: what identifies the base model the draft was trained for."""
    a = base.args
    return {"name_or_path": base.name_or_path, "architecture": a.architecture, "hidden_size": a.hidden_size,
            "vocab_size": a.vocab_size, "num_attention_heads": a.num_attention_heads,
            "num_key_value_heads": a.num_key_value_heads, "intermediate_size": a.intermediate_size}


def make_config(draft_type: str, block_name: str, base: BaseModel, defaults: dict, overrides: dict) -> dict:
    """Full draft config: the draft block ``defaults`` updated by ``overrides``; unknown keys are an error."""
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise CloverError(f"unknown {draft_type} config option(s) {unknown}; valid options: {sorted(defaults)}")
    return {"draft_type": draft_type, "base": base_block(base), "llama": base.args.to_dict(),
            block_name: {**defaults, **overrides}}


def check_base(config: dict, base: BaseModel, where: str = "draft") -> None:
    """CloverError unless the base model matches the one recorded in the draft config."""
    recorded = config.get("base") or {}
    actual = base_block(base)
    for key in BASE_KEYS:
        if recorded.get(key) != actual[key]:
            raise CloverError(f"{where} was trained for a base with {key}={recorded.get(key)!r}, but the base model "
                              f"{base.name_or_path or '(in memory)'} has {key}={actual[key]!r}; pass the base model "
                              f"the draft was trained for ({recorded.get('name_or_path')!r})")


class DraftModel(nn.Module):
    """What both drafts share: config, frozen base tensors kept out of ``state_dict``, RoPE tables, own KV cache."""

    draft_type: str = ""
    config_block: str = ""  # the draft's own block in its config

    def __init__(self, config: dict, base: BaseModel, embedding: str):
        super().__init__()
        check_base(config, base)
        self.config = config
        self.args = LlamaArgs(**config["llama"])
        device = base.device
        size = config[self.config_block].get("draft_vocab_size", 0)
        if not isinstance(size, int) or not 0 <= size <= self.args.vocab_size:
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
        separate = embedding == "input" and base.model.embed_tokens.weight is not base.lm_head.weight
        if separate:
            frozen["embed"] = base.model.embed_tokens.weight.detach()
        self._embed_key = "embed" if separate else "lm_head"  # otherwise E aliases W_lm (never a copy)
        self.frozen = frozen
        self.cache: KVCache | None = None
        self.gradient_checkpointing = False

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        with torch.no_grad():
            self.frozen = {name: fn(t) for name, t in self.frozen.items()}
        return self

    # ---- frozen tensors -----------------------------------------------------------------------------------------
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

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.embed_weight).to(self.dtype)

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for ``position_ids`` (same tables and layout as :class:`clover.model.layers.Rotary`)."""
        cos, sin = self.frozen["rope_cos"], self.frozen["rope_sin"]
        return cos[position_ids].to(dtype).unsqueeze(-3), sin[position_ids].to(dtype).unsqueeze(-3)

    def run_layers(self, x: torch.Tensor, start: int, cache: KVCache | None, position_ids: torch.Tensor | None = None,
                   mask=None) -> torch.Tensor:
        """Run the decoder layers on ``x [B, T, H]`` at positions ``start + arange(T)`` (or ``position_ids``) with a
        causal mask over cache + new tokens (or ``mask``), appending to ``cache`` when given."""
        t = x.shape[1]
        if position_ids is None:
            position_ids = torch.arange(start, start + t, device=x.device)
        if mask is None:
            mask = attention_mask(start, None, t, x.device)
        cos, sin = self.rope(position_ids, x.dtype)
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


# ---- construction, saving, loading ---------------------------------------------------------------------------------
def draft_classes() -> dict[str, type[DraftModel]]:
    from clover.model.clover2 import Clover2Draft
    from clover.model.eagle import EagleDraft

    return {"clover2": Clover2Draft, "eagle": EagleDraft}


def _draft_class(draft_type, where: str) -> type[DraftModel]:
    classes = draft_classes()
    if draft_type not in classes:
        raise CloverError(f"{where}: unknown draft_type {draft_type!r}; known types: {', '.join(classes)}")
    return classes[draft_type]


def init_draft(draft_type: str, base: BaseModel, *, dtype: torch.dtype | str = torch.float32,
               draft_vocab: torch.Tensor | None = None, hidden_sample: torch.Tensor | None = None,
               **config_overrides) -> DraftModel:
    """A new draft for training from scratch: default config updated by ``config_overrides`` (keys of the draft's
    own block, e.g. ``num_heads=3``), trainable weights initialised from the base in fp32 on the base's device.
    With the default ``dtype`` (fp32) the frozen tensors stay the base's own (no copy, base dtype); another
    ``dtype`` casts the whole draft, frozen tensors included. ``draft_vocab`` (token ids, e.g. :func:`top_tokens` of
    the training data's reply-token counts) is required exactly when the config sets ``draft_vocab_size``.
    ``hidden_sample`` (pre-norm states of the training data) lets a draft measure scales it sets at initialisation
    (Clover-2's ``token_scale``)."""
    dtype = parse_dtype(dtype, base.device)
    cls = _draft_class(draft_type, "init_draft")
    config = cls.default_config(base, **config_overrides)
    with torch.device(base.device):
        model = cls(config, base)
    if model.draft_vocab is not None:
        if draft_vocab is None:
            raise CloverError(f"draft_vocab_size={model.draft_vocab.numel()} needs the draft vocabulary: pass "
                              f"draft_vocab (e.g. top_tokens of the training data's reply-token counts)")
        model.set_draft_vocab(draft_vocab)
    elif draft_vocab is not None:
        raise CloverError("draft_vocab was given but the config has no draft_vocab_size")
    model.init_from_base(base, hidden_sample)
    return model if dtype == torch.float32 else model.to(dtype=dtype)


def top_tokens(counts: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` most frequent token ids of ``counts [V]`` (ties: lower id first), ascending: a draft vocabulary."""
    order = torch.sort(-counts.long(), stable=True).indices
    return order[:k].sort().values


def save_draft(model: DraftModel, folder) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (trainable weights only) into ``folder``, each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = folder / f".{WEIGHTS_NAME}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "draft_type": model.draft_type})
    os.replace(tmp, folder / WEIGHTS_NAME)
    tmp = folder / f".{CONFIG_NAME}.tmp"
    tmp.write_text(json.dumps(model.config, indent=2) + "\n")
    os.replace(tmp, folder / CONFIG_NAME)
    return folder


def read_draft_config(folder) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise CloverError(f"draft checkpoint folder {folder} does not exist; pass a folder written by training "
                          f"(config.json + {WEIGHTS_NAME})")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CloverError(f"{folder} has no {CONFIG_NAME}; it is not a draft checkpoint folder")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CloverError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or "draft_type" not in config:
        raise CloverError(f"{path} has no 'draft_type'; it is not a draft config (expected 'clover2' or 'eagle')")
    return config


def load_draft(folder, base: BaseModel, device=None, dtype=None, expected_type: str | None = None) -> DraftModel:
    """Rebuild a draft from a checkpoint folder for ``base``; weights are loaded with strict key checks and cast to
    ``dtype`` (default: the base's) on ``device`` (default: the base's). The draft is returned in eval mode."""
    folder = Path(folder)
    config = read_draft_config(folder)
    draft_type = config["draft_type"]
    cls = _draft_class(draft_type, str(folder / CONFIG_NAME))
    if expected_type is not None and draft_type != expected_type:
        raise CloverError(f"{folder} holds a {draft_type!r} draft but a {expected_type!r} draft is needed; pass a "
                          f"{expected_type} checkpoint or use the method for {draft_type}")
    check_base(config, base, where=f"draft {folder}")
    device = torch.device(device) if device is not None else base.device
    dtype = parse_dtype(dtype, device) if dtype is not None else base.dtype
    try:
        with torch.device("meta"):  # no initialisation: every parameter comes from the file
            model = cls(config, base)
    except (KeyError, TypeError) as err:
        raise CloverError(f"{folder / CONFIG_NAME} is not a complete {draft_type} config ({type(err).__name__}: "
                          f"{err}); re-save the checkpoint with this version of clover") from None
    state = _read_weights(folder / WEIGHTS_NAME, device)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise CloverError(f"{folder / WEIGHTS_NAME} does not match its config: missing keys {missing}, unexpected "
                          f"keys {unexpected}")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # shape mismatches
        raise CloverError(f"{folder / WEIGHTS_NAME} does not match its config: {err}") from None
    return model.to(device=device, dtype=dtype).eval()


def _read_weights(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CloverError(f"{path.parent} has no {WEIGHTS_NAME}; the checkpoint is incomplete")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors raises SafetensorError / OSError for corrupt or truncated files
        raise CloverError(f"cannot read {path}: {err} (is it truncated or corrupt?)") from None
