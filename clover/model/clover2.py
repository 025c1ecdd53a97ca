"""The Clover-2 draft: an attention-decoder trunk and regressive (RNN) heads over the frozen base model.

Trunk: an Attention Decoder ``AD0`` fuses each pre-norm base state ``h~_t`` with the embedding of the token
``x_{t+1}`` (a per-head cosine gate, no mixing across positions), then ``K`` Llama decoder layers with the base's
RoPE/GQA configuration (causal, own KV cache at inference) and an RMSNorm give the trunk state ``c0_t``. Options:
``trunk_input="normed"`` passes ``h~_t`` through a learned RMSNorm first (the trunk then works at the scale of a
normalised state, not of the residual stream); ``trunk_init="random"`` starts the layers from PyTorch's default
initialisation instead of copies of a base layer.
The token side of AD0 is multiplied by ``token_scale``: real Llama-family models carry a few huge channels in the
pre-norm residual stream (SmolLM2: per-token norm ~780 against embedding rows of norm ~3), so an unscaled embedding
adds a signal ~1e-4 of the state and head 0 learns to ignore ``x_{t+1}``. ``token_scale`` is measured once at
initialisation (median per-token norm of the states AD0 reads / median embedding-row norm) and recorded in the
config; a config without the key (checkpoints written before it existed) means 1.0, the original behaviour.
Heads: head 0 is ``norm(FC0 c0)``; head ``i >= 1`` is one RNN step ``c_i = AD1(c_{i-1}, E[y_i])``,
``norm(FC1 [c_i ; E[y_i]])``; logits come from the frozen base LM head. ``E`` is ``W_lm`` itself (default) or the
base input embedding.

Modules: ``token_fuse`` (AD0), ``layers.k``, ``trunk_norm``, ``head0_fc`` (FC0), ``rnn_fuse`` (AD1), ``rnn_fc``
(FC1), ``head_norm``; checkpoints keep the original key names (``clover_head_mlp_rnn``, ``clover_norm``,
``clover_head_mlp``, ``clover_head_mlp_rnn2``, ``clover_head_mlp2``, ``clover_head_norm``). The ``fuse="fc"`` ablation
replaces AD0 by ``fuse_fc`` (Linear 2H -> H on ``[state ; embedding]``).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clover.errors import CloverError
from clover.model.base import BaseModel
from clover.model.draft import DraftConfig, DraftModel, check_choice, check_number, check_positive_int
from clover.model.draft_rows import extend_rows, row_cache
from clover.model.layers import AttentionDecoder, DecoderLayer, RMSNorm
from clover.model.losses import clover_loss


@dataclasses.dataclass(frozen=True)
class Clover2Config(DraftConfig):
    """The ``clover`` block of a Clover-2 ``config.json``. ``init_from_layer`` is a layer index of the base (see
    :meth:`Clover2Draft.default_config` for ``"first"``/``"last"``); ``token_scale`` is ``"auto"`` until the draft
    is initialised, then the measured number (absent in checkpoints written before it existed: 1.0)."""

    num_heads: int = 5
    num_layers: int = 2
    heads_coefficient: float = 1.0
    decay_coefficient: float = 0.7
    embedding: str = "lm_head"  # E = the LM head (tied) or "input", the base input embedding
    fuse: str = "attention"  # AD0, or the "fc" ablation
    init_from_layer: int = 0
    init_noise: str = "symmetric"  # or "one_sided", the original U[0, 0.01)
    trunk_input: str = "prenorm"  # or "normed": the pre-norm state through a learned RMSNorm before AD0
    trunk_init: str = "copy"  # the trunk layers start as copies of base layer init_from_layer, or "random"
    regression_weight: float = 10.0
    distill_weight: float = 1.0
    draft_vocab_size: int = 0
    token_scale: float | str = "auto"

    block: ClassVar[str] = "clover"
    legacy: ClassVar[dict] = {"token_scale": 1.0, "trunk_input": "prenorm", "trunk_init": "copy"}

    def __post_init__(self):
        super().__post_init__()
        b = self.block
        check_choice(b, "embedding", self.embedding, ("lm_head", "input"))
        check_choice(b, "fuse", self.fuse, ("attention", "fc"))
        check_choice(b, "init_noise", self.init_noise, ("symmetric", "one_sided"))
        check_choice(b, "trunk_input", self.trunk_input, ("prenorm", "normed"))
        check_choice(b, "trunk_init", self.trunk_init, ("copy", "random"))
        check_positive_int(b, "num_heads", self.num_heads)
        check_positive_int(b, "num_layers", self.num_layers)
        check_positive_int(b, "init_from_layer", self.init_from_layer, minimum=0)
        for name in ("heads_coefficient", "decay_coefficient", "regression_weight", "distill_weight"):
            check_number(b, name, getattr(self, name))
        scale = self.token_scale
        if scale != "auto" and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0):
            raise CloverError(f"token_scale={scale!r} must be 'auto' (measured at initialisation) or a positive "
                              f"number (1.0 = the original unscaled embedding)")


@torch.no_grad()
def measure_token_scale(states: torch.Tensor, embed_weight: torch.Tensor) -> float:
    """Median per-token norm of the states AD0 reads (pre-norm, or normed with ``trunk_input="normed"``) over median
    embedding-row norm (medians: the first position of a sequence, an attention sink, has a norm several times the
    others)."""
    states = states.reshape(-1, states.shape[-1]).float()
    rows = embed_weight.float().norm(dim=-1)
    return round(float(states.norm(dim=-1).median() / rows.median().clamp(min=1e-12)), 4)


@torch.no_grad()
def probe_prenorm(base: BaseModel, length: int = 64, seed: int = 0) -> torch.Tensor:
    """Pre-norm states ``[length, H]`` of the base on a fixed random token sequence (a stateless forward: the
    base's cache is untouched)."""
    length = min(length, base.args.max_position_embeddings)
    ids = torch.randint(0, base.args.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    return base(ids.to(base.device), logits_to_keep=0, use_cache=False).hidden_prenorm[0]


class Clover2Draft(DraftModel):
    draft_type = "clover2"
    aliases = ("clover", "clover-2")
    label = "Clover-2"
    method = "clover"
    Config = Clover2Config
    config_block = "clover"
    hidden_kind = "prenorm"
    train_defaults = {"lr": 1e-3, "warmup_steps": 2000}
    train_module = "clover.train.main_clover2"
    checkpoint_names = {"token_fuse": "clover_head_mlp_rnn", "trunk_norm": "clover_norm",
                        "head0_fc": "clover_head_mlp", "rnn_fuse": "clover_head_mlp_rnn2", "rnn_fc": "clover_head_mlp2",
                        "head_norm": "clover_head_norm"}

    def __init__(self, config: dict, base: BaseModel):
        super().__init__(config, base)
        cfg, a = self.cfg, self.args
        h, eps = a.hidden_size, a.rms_norm_eps
        if h % a.num_attention_heads:
            raise CloverError(f"hidden_size {h} is not divisible by num_attention_heads {a.num_attention_heads}")
        if cfg.init_from_layer >= a.num_hidden_layers:
            raise CloverError(f"clover config init_from_layer={cfg.init_from_layer} is not a layer of the base model "
                              f"(it has {a.num_hidden_layers} layers)")
        self.num_heads = cfg.num_heads
        self.token_scale = 1.0 if cfg.token_scale == "auto" else float(cfg.token_scale)  # "auto": init_from_base
        if cfg.trunk_input == "normed":
            self.input_norm = RMSNorm(h, eps)
        if cfg.fuse == "attention":
            self.token_fuse = AttentionDecoder(h, a.num_attention_heads, eps)
        else:
            self.fuse_fc = nn.Linear(2 * h, h)
        self.layers = nn.ModuleList(DecoderLayer(a) for _ in range(cfg.num_layers))
        self.trunk_norm = RMSNorm(h, eps)
        self.head0_fc = nn.Linear(h, h)
        self.rnn_fuse = AttentionDecoder(h, a.num_attention_heads, eps)
        self.rnn_fc = nn.Linear(2 * h, h)
        self.head_norm = RMSNorm(h, eps)

    @classmethod
    def default_config(cls, base: BaseModel, **overrides) -> dict:
        """Clover-2 draft config for ``base``. ``init_from_layer`` accepts an index (negative counts from the end),
        ``"last"`` or ``"first"`` and is recorded as a non-negative int. Default: the base's first layer, which
        trained better drafts than the last one in this project's measurements (scripts/bench/draft_quality.py,
        README)."""
        n_layers = base.args.num_hidden_layers
        layer = overrides.get("init_from_layer", Clover2Config.init_from_layer)
        layer = {"last": n_layers - 1, "first": 0}.get(layer, layer)
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
            raise CloverError(f"init_from_layer={layer!r} is not a layer of the base model (it has {n_layers} "
                              f"layers); use an index, 'first' or 'last'")
        return super().default_config(base, **{**overrides, "init_from_layer": layer % n_layers})

    @classmethod
    def ddp_unused_parameters(cls, overrides: dict) -> bool:
        return overrides.get("num_heads", Clover2Config.num_heads) == 1  # a single head never runs the RNN step

    @property
    def embedding_source(self) -> str:
        return self.cfg.embedding

    @property
    def max_depth(self) -> int:
        return self.num_heads

    @property
    def train_heads(self) -> int:
        return self.num_heads

    def loss(self, preds, target, loss_mask, mask_alignment="predicted", doc_ids=None):
        return clover_loss(preds, target, self.lm_head_weight, loss_mask, self.cfg, mask_alignment,
                           draft_vocab=self.draft_vocab, doc_ids=doc_ids)

    def runner(self) -> "Clover2Runner":
        return Clover2Runner(self)

    def batch_runner(self, batch: int, capacity: int) -> "Clover2BatchRunner":
        return Clover2BatchRunner(self, batch, capacity)

    # ---- initialisation (training from scratch only) ------------------------------------------------------------
    @torch.no_grad()
    def init_from_base(self, base: BaseModel, hidden_sample: torch.Tensor | None = None) -> None:
        """Trunk layers := copies of base layer ``init_from_layer`` (:meth:`copy_trunk_layers`; with
        ``trunk_init="random"`` they keep PyTorch's default initialisation, as EAGLE-1's layer does); the input norm
        (``trunk_input="normed"``), the trunk norm and the head norm := the base final norm; AD blocks and FCs :=
        identity paths plus small noise (``init_noise``), biases 0, so that ``AD(x, y) ~ x`` and the heads pass the
        state through. ``token_scale="auto"`` is measured from ``hidden_sample`` (pre-norm states
        ``[..., H]`` of the training data) or, without one, from the base's states on a fixed random probe."""
        cfg = self.cfg
        needs_states = cfg.token_scale == "auto" or (cfg.trunk_input == "normed" and cfg.trunk_init == "copy")
        if hidden_sample is None and needs_states:  # states: for token_scale and the copies' shrink only
            hidden_sample = probe_prenorm(base)
        states = None if hidden_sample is None else hidden_sample.to(self.trunk_norm.weight.device,
                                                                      self.trunk_norm.weight.dtype)
        if cfg.trunk_input == "normed":
            self.input_norm.weight.copy_(base.model.norm.weight)
        if cfg.token_scale == "auto":
            self.token_scale = measure_token_scale(self.trunk_input(states), self.embed_weight)
            self.cfg = cfg = dataclasses.replace(cfg, token_scale=self.token_scale)
        if cfg.trunk_init == "copy":
            self.copy_trunk_layers(base, states)
        for norm in (self.trunk_norm, self.head_norm):
            norm.weight.copy_(base.model.norm.weight)
        h = self.args.hidden_size
        eye = torch.eye(h, device=self.trunk_norm.weight.device)
        low = -0.01 if cfg.init_noise == "symmetric" else 0.0  # "one_sided" = the original U[0, 0.01)

        def noisy(linear: nn.Linear, identity_cols: bool):
            linear.weight.uniform_(low, 0.01)
            if identity_cols:
                linear.weight[:, :h] += eye
            linear.bias.zero_()

        blocks = [self.rnn_fuse] + ([self.token_fuse] if cfg.fuse == "attention" else [])
        for block in blocks:
            block.input_layernorm.weight.fill_(1.0)
            noisy(block.q, True)
            noisy(block.k, True)
            noisy(block.v, False)
        for fc in [self.head0_fc, self.rnn_fc] + ([self.fuse_fc] if cfg.fuse == "fc" else []):
            noisy(fc, True)

    @torch.no_grad()
    def copy_trunk_layers(self, base: BaseModel, states: torch.Tensor | None) -> None:
        """Every trunk layer := base layer ``init_from_layer``; with ``trunk_input="normed"`` its output projections
        are shrunk as the normalised ``states`` are smaller than the pre-norm ones, so the copies change the trunk's
        stream as much, relatively, as they change the pre-norm one."""
        source = base.model.layers[self.cfg.init_from_layer].state_dict()
        for layer in self.layers:
            layer.load_state_dict(source)
        if self.cfg.trunk_input != "normed":
            return
        shrink = float(self.trunk_input(states).norm(dim=-1).median() / states.norm(dim=-1).median())
        for out in [p for layer in self.layers for p in (layer.self_attn.o_proj, layer.mlp.down_proj)]:
            out.weight.mul_(shrink)
            if out.bias is not None:
                out.bias.mul_(shrink)

    # ---- shared pieces ------------------------------------------------------------------------------------------
    def trunk_input(self, hidden_prenorm: torch.Tensor) -> torch.Tensor:
        """What AD0 reads of the base state: ``h~_t`` itself, or ``input_norm(h~_t)`` (``trunk_input="normed"``)."""
        return self.input_norm(hidden_prenorm) if self.cfg.trunk_input == "normed" else hidden_prenorm

    def fuse(self, hidden_prenorm: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """AD0 (or the ``fc`` ablation) on the pairs ``(trunk_input(h~_t), token_scale * E[x_{t+1}])``."""
        hidden_prenorm = self.trunk_input(hidden_prenorm)
        if self.token_scale != 1.0:
            emb = emb * self.token_scale
        if self.cfg.fuse == "fc":
            return self.fuse_fc(torch.cat([hidden_prenorm, emb], dim=-1))
        return self.token_fuse(hidden_prenorm, emb)

    def rnn_step(self, state: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One head ``i >= 1``: ``c_i = AD1(c_{i-1}, e)``, ``h = norm(FC1 [c_i ; e])``."""
        state = self.rnn_fuse(state, emb)
        return state, self.head_norm(self.rnn_fc(torch.cat([state, emb], dim=-1)))

    def head0(self, state: torch.Tensor) -> torch.Tensor:
        return self.head_norm(self.head0_fc(state))

    # ---- training -----------------------------------------------------------------------------------------------
    def trunk(self, hidden_prenorm: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """Trunk states ``c0 [B, L, H]`` for a whole sequence (positions ``0 .. L-1``, causal, no cache)."""
        return self._trunk(hidden_prenorm, self.embed(next_ids))

    def _trunk(self, hidden_prenorm: torch.Tensor, emb: torch.Tensor, position_ids: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden_prenorm = hidden_prenorm.to(self.dtype)
        if self.gradient_checkpointing and self.training:
            x = checkpoint(self.fuse, hidden_prenorm, emb, use_reentrant=False)
        else:
            x = self.fuse(hidden_prenorm, emb)
        return self.trunk_norm(self.run_layers(x, 0, None, position_ids, mask))

    def forward_train(self, hidden_prenorm: torch.Tensor, next_ids: torch.Tensor,
                      position_ids: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced predictions ``[N, B, L, H]`` from pre-norm states ``[B, L, H]`` and shifted ids ``[B, L]``
        (``next_ids[t] = x_{t+1}``): head ``i`` at ``t`` sees ``h~_0..t`` and ``x_{t+1}..x_{t+1+i}`` and predicts
        ``h_{t+1+i}``; positions ``t >= L - i`` are zero. Packed rows (:mod:`clover.train.packing`) give
        ``position_ids [B, L]`` and the trunk's attention ``mask [B, 1, L, L]`` (True = attend)."""
        emb = self.embed(next_ids)
        c0 = self._trunk(hidden_prenorm, emb, position_ids, mask)
        if self.gradient_checkpointing and self.training:
            return checkpoint(self._heads_train, c0, emb, use_reentrant=False)
        return self._heads_train(c0, emb)

    def forward(self, hidden_prenorm: torch.Tensor, next_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Same as :meth:`forward_train` (call the module itself when it is wrapped by DDP)."""
        return self.forward_train(hidden_prenorm, next_ids, position_ids, mask)

    def _heads_train(self, c0: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        length = c0.shape[1]
        outs = [self.head0(c0)]
        state = c0
        for i in range(1, self.num_heads):
            state, out = self.rnn_step(state[:, :max(length - i, 0)], emb[:, i:])
            outs.append(F.pad(out, (0, 0, 0, length - out.shape[1])))
        return torch.stack(outs)

    @torch.no_grad()
    def greedy_chain(self, hidden_prenorm: torch.Tensor, next_ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        state = self.trunk(hidden_prenorm, next_ids)  # one causal pass gives the trunk state of every prefix
        tokens = []
        for depth in range(self.num_heads):
            state, out = self.head(state, tokens[-1] if tokens else None, depth)
            tokens.append(self.greedy_tokens(out))
        return torch.stack(tokens)

    # ---- inference (batch 1) ------------------------------------------------------------------------------------
    @torch.no_grad()
    def extend(self, hidden_states: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """Append ``n`` committed pairs (pre-norm ``h~_p [1, n, H]``, ``x_{p+1} [1, n]``) to the draft cache at
        positions ``cache_length ..``; returns the trunk states ``c0 [1, n, H]``."""
        cache = self._need_cache(hidden_states.shape[1])
        start = cache.length
        x = self.fuse(hidden_states.to(self.dtype), self.embed(next_ids))
        x = self.run_layers(x, start, cache)
        cache.length = start + hidden_states.shape[1]
        return self.trunk_norm(x)

    @torch.no_grad()
    def head(self, state: torch.Tensor, tokens: torch.Tensor | None, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One tree level for ``R`` rows: ``depth 0`` = head 0 on the trunk state (``tokens`` ignored, the state is
        returned unchanged); ``depth >= 1`` = one RNN step with the tokens ``[R]`` chosen at the previous depth.
        Returns ``(new_state [R, H], hidden [R, H])``; logits = :meth:`draft_logits` of ``hidden``."""
        if depth == 0:
            return state, self.head0(state)
        if tokens is None:
            raise ValueError("head(depth >= 1) needs the tokens of the previous depth")
        return self.rnn_step(state, self.embed(tokens))


class Clover2Runner:
    """Drives a Clover-2 draft for the tree builders: the trunk runs once per step on the newly committed positions;
    the tree grows through the RNN heads only (see :class:`clover.generate.tree.DraftExpander`)."""

    def __init__(self, draft: Clover2Draft):
        self.draft = draft
        self.vocab = draft.draft_vocab
        self.states = None

    def reset(self) -> None:
        self.draft.reset()

    def start(self, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """Feed committed pairs ``(h~_p, x_{p+1})`` (the last one pairs with the not-yet-committed root); returns
        the logits of the root's children."""
        trunk = self.draft.extend(hidden, next_ids)[0, -1:]
        self.states, out = self.draft.head(trunk, None, 0)
        return self.draft.draft_logits(out)[0]

    def expand(self, parent_rows: torch.Tensor, tokens: torch.Tensor, depth: int) -> torch.Tensor:
        self.states, out = self.draft.head(self.states[parent_rows], tokens, depth)
        return self.draft.draft_logits(out)


class Clover2BatchRunner:
    """:class:`Clover2Runner` for the rows of a batch (see :mod:`clover.model.draft_rows`): one trunk forward over
    every starting row's new pairs, one head call per tree level for every row."""

    def __init__(self, draft: Clover2Draft, batch: int, capacity: int):
        self.draft, self.vocab = draft, draft.draft_vocab
        self.cache = row_cache(draft, batch, capacity)
        self.states: list[torch.Tensor | None] = [None] * batch

    def reset(self, row: int) -> None:
        self.cache.truncate_rows(row, 0)

    def move_row(self, src: int, dst: int) -> None:
        """Row ``dst`` takes over row ``src``'s sequence (``src`` is left empty)."""
        self.cache.move_row(src, dst)
        self.states[dst], self.states[src] = self.states[src], None

    @torch.no_grad()
    def start(self, rows: list[int], hidden: list[torch.Tensor], next_ids: list[torch.Tensor]) -> list[torch.Tensor]:
        draft = self.draft
        last, _ = extend_rows(draft, self.cache, rows, hidden, next_ids,
                              lambda h, ids: draft.fuse(h.to(draft.dtype), draft.embed(ids)))
        states, out = draft.head(draft.trunk_norm(last), None, 0)
        for j, row in enumerate(rows):
            self.states[row] = states[j:j + 1]
        return list(draft.draft_logits(out))

    @torch.no_grad()
    def expand(self, rows: list[int], parent_rows: list[torch.Tensor], tokens: list[torch.Tensor],
               depths: list[int]) -> list[torch.Tensor]:
        counts = [t.numel() for t in tokens]
        parents = torch.cat([self.states[row][p] for row, p in zip(rows, parent_rows)])
        states, out = self.draft.head(parents, torch.cat(tokens), max(depths))  # every depth >= 1: one RNN step
        for row, state in zip(rows, states.split(counts)):
            self.states[row] = state
        return list(self.draft.draft_logits(out).split(counts))
