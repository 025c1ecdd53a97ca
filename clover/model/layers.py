"""Llama-family building blocks shared by the base runtime and the drafts: config, RMSNorm, RoPE, attention, MLP,
decoder layer (the KV caches are in :mod:`clover.model.cache`), and Clover-2's attention decoder.

State-dict names mirror Hugging Face's (``self_attn.q_proj``, ``mlp.gate_proj``, ...) so checkpoints load with strict
key checks; the q/k/v and gate/up projections run fused (one matmul each), split and joined by state-dict hooks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, asdict

import torch
import torch.nn.functional as F
from torch import nn

from clover.errors import CloverError
from clover.model.cache import KVCache, RaggedKVCache
from clover.model.kernels import PrepackedLinear


@dataclass
class LlamaArgs:
    """The architecture facts a Llama-family forward needs, read from an HF ``config.json``."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "LlamaArgs":
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        heads = cfg["num_attention_heads"]
        # transformers 5 moved rope_theta/rope_scaling into `rope_parameters`; accept both spellings.
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} or None)
        if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
            scaling = None
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        max_pos = cfg.get("max_position_embeddings", 4096)
        window = cfg.get("sliding_window")
        if window and (arch == "MistralForCausalLM" or cfg.get("use_sliding_window")):
            max_pos = min(max_pos, window)  # within the window, sliding-window attention is plain causal attention
        eos = cfg.get("eos_token_id")
        is_qwen2 = arch == "Qwen2ForCausalLM"
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            qkv_bias=is_qwen2 or bool(cfg.get("attention_bias", False)),
            o_bias=(not is_qwen2) and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """``g * z / sqrt(mean(z^2) + eps)``: statistics in fp32, result cast back before the weight (as HF Llama)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:class:`RMSNorm` as a function (e.g. the base's final norm applied to stored pre-norm states)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one call, the same arithmetic as below
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_inv_freq(args: LlamaArgs) -> torch.Tensor:
    """Inverse frequencies for the model's RoPE configuration: default, linear, dynamic (within the trained window)
    or llama3 scaling."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = args.rope_scaling
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "dynamic":
        return inv_freq  # NTK rescaling only applies beyond max_position_embeddings, which the cache never exceeds
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    raise CloverError(f"unsupported rope_scaling type {kind!r}; supported: linear, dynamic, llama3")


class Rotary(nn.Module):
    """Precomputed cos/sin tables indexed by explicit position ids."""

    def __init__(self, args: LlamaArgs, max_positions: int | None = None):
        super().__init__()
        n = max_positions or args.max_position_embeddings
        freqs = torch.outer(torch.arange(n, dtype=torch.float32), rope_inv_freq(args))
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Return cos, sin of shape ``[..., T, 1, head_dim]``-broadcastable as ``[B, 1, T, d]``."""
        return self.lookup(self.cos, self.sin, position_ids, dtype)

    @staticmethod
    def lookup(cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows ``position_ids`` of the tables ``cos``/``sin`` in ``dtype``, laid out as :meth:`forward`'s."""
        return cos[position_ids].to(dtype).unsqueeze(-3), sin[position_ids].to(dtype).unsqueeze(-3)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) whose no-grad calls use :class:`PrepackedLinear`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prepacked = PrepackedLinear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prepacked(x, self.weight, self.bias)


def fused_state_dict_names(module: nn.Module, fused: str, parts: dict[str, int]) -> None:
    """Let ``module``'s fused projection ``fused`` (one ``Linear`` whose output rows are the ``parts``' rows, in
    order) read and write state dicts under the separate names ``parts`` (name -> output rows), the names a Hugging
    Face checkpoint, a saved draft and a base layer copied into a draft all use."""
    names, sizes = list(parts), list(parts.values())

    def split(mod, state, prefix, _metadata):
        for kind in ("weight", "bias"):
            whole = state.pop(f"{prefix}{fused}.{kind}", None)
            if whole is not None:
                for name, piece in zip(names, whole.split(sizes)):
                    state[f"{prefix}{name}.{kind}"] = piece.clone()  # its own storage (safetensors refuses views)

    def join(mod, state, prefix, *_):
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{name}.{kind}" for name in names]
            if all(k in state for k in keys):
                state[f"{prefix}{fused}.{kind}"] = torch.cat([state.pop(k) for k in keys])

    module.register_state_dict_post_hook(split)
    module.register_load_state_dict_pre_hook(join)


class Attention(nn.Module):
    """Grouped-query attention with one fused q/k/v projection (``qkv_proj``; state dicts keep ``q_proj``,
    ``k_proj``, ``v_proj``) and RoPE applied to queries and keys in one pass."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        h, d = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, d
        self.qkv_proj = Linear(h, (self.n_heads + 2 * self.n_kv) * d, bias=args.qkv_bias)
        self.o_proj = Linear(self.n_heads * d, h, bias=args.o_bias)
        fused_state_dict_names(self, "qkv_proj", {"q_proj": self.n_heads * d, "k_proj": self.n_kv * d,
                                                  "v_proj": self.n_kv * d})

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        b, t, _ = x.shape
        nq, nk = self.n_heads, self.n_kv
        qkv = self.qkv_proj(x).view(b, t, nq + 2 * nk, self.head_dim).transpose(1, 2)  # [B, heads, T, d]
        q, k = apply_rope(qkv[:, :nq + nk], cos, sin).split([nq, nk], dim=1)
        v = qkv[:, nq + nk:]
        if cache is not None:
            k, v = cache.write(layer, start, k, v)
        if t == 1 and isinstance(cache, RaggedKVCache):
            # batched decoding, one new token per row with a per-row key mask [B, 1, 1, S]: the query heads of a
            # kv head stand in for query positions, so no key/value is repeated per query head
            q = q.reshape(b, nk, nq // nk, self.head_dim)
            return self.o_proj(decode_attention(q, k, v, mask, cache.decode_split()).reshape(b, t, -1))
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            mask = mask[None, None]
        causal = mask == "causal"
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                             enable_gqa=nk != nq)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def decode_attention(q, k, v, mask, split: tuple[int, torch.Tensor] | None) -> torch.Tensor:
    """SDPA of one-token rows; with ``split = (short, rows)`` (:meth:`RaggedKVCache.decode_split`) every row reads
    only the first ``short`` slots and the rows ``rows`` alone read the whole span, their results replacing the
    first ones, so short rows stop paying for the longest row's keys/values."""
    if split is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    short, rows = split
    out = F.scaled_dot_product_attention(q, k[:, :, :short], v[:, :, :short], attn_mask=mask[..., :short])
    return out.index_copy_(0, rows, F.scaled_dot_product_attention(
        q.index_select(0, rows), k.index_select(0, rows), v.index_select(0, rows),
        attn_mask=mask.index_select(0, rows)))


class MLP(nn.Module):
    """SwiGLU with one fused gate/up projection (``gate_up_proj``; state dicts keep ``gate_proj``, ``up_proj``)."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        h, i = args.hidden_size, args.intermediate_size
        self.gate_up_proj = Linear(h, 2 * i, bias=args.mlp_bias)
        self.down_proj = Linear(i, h, bias=args.mlp_bias)
        fused_state_dict_names(self, "gate_up_proj", {"gate_proj": i, "up_proj": i})

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm Llama decoder layer. ``input_layernorm=False`` gives EAGLE-1's first layer (no input norm)."""

    def __init__(self, args: LlamaArgs, input_layernorm: bool = True):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps) if input_layernorm else nn.Identity()
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, start)
        return x + self.mlp(self.post_attention_layernorm(x))


class AttentionDecoder(nn.Module):
    """``AD(x, y) = x + concat_j(cos(q_j, k_j) * v_j)`` with ``q = W_q RMSNorm(x) + b``, ``k, v`` from ``y``
    (the original's ``AttentionDecoder``): one cosine gate per head of size ``H / n_heads``, position-wise."""

    def __init__(self, hidden: int, n_heads: int, eps: float):
        super().__init__()
        self.n_heads, self.eps = n_heads, eps
        self.input_layernorm = RMSNorm(hidden, eps)
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        split = x.shape[:-1] + (self.n_heads, -1)
        q = self.q(self.input_layernorm(x)).view(split)
        k, v = self.k(y).view(split), self.v(y).view(split)
        gate = F.cosine_similarity(q, k, dim=-1, eps=self.eps)
        return x + (gate.unsqueeze(-1) * v).flatten(-2)
