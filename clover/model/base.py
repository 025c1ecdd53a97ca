"""The base-model runtime: a lean Llama-family forward (Llama, Mistral, Qwen2) over a preallocated KV cache.

``forward(ids, positions, tree_mask)`` returns logits and the last layer's hidden state before and after the final
norm; a tree mask lets one pass verify a whole draft tree, and :meth:`BaseModel.commit` keeps only the accepted nodes
in the cache. Weights load from an HF folder's safetensors with strict key checks.

Batched decoding: :meth:`BaseModel.forward_batch` runs rows of different lengths over a separate
:class:`~clover.model.cache.RaggedKVCache` (per-row lengths and positions, a per-row key mask, right padding that no
real token sees); the batch-1 cache and :meth:`BaseModel.forward` above are untouched by it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from clover.errors import CloverError
from clover.io import read_safetensors
from clover.model.cache import KVCache, RaggedKVCache, additive_mask, attention_mask
from clover.model.kernels import PrepackedLinear
from clover.model.layers import DecoderLayer, LlamaArgs, RMSNorm, Rotary
from clover.model.loading import check_architecture, read_config, resolve_model_path

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``/None: fp32 on CPU (exactness), bf16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise CloverError(f"unknown dtype {dtype!r}; use one of auto, fp32, bf16, fp16")
    return DTYPES[dtype]


@dataclass
class BaseOutput:
    logits: torch.Tensor | None      # [B, T', V] for the last T' positions (see ``logits_to_keep``)
    hidden_prenorm: torch.Tensor     # [B, T, H] last decoder layer output (input of the final norm)
    hidden: torch.Tensor             # [B, T, H] after the final norm (what the LM head reads)


class _Inner(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class BaseModel(nn.Module):
    """A Llama-family causal LM with its own KV cache (batch ``B``, capacity ``max_len``)."""

    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.args = args
        self.model = _Inner(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = Rotary(args)
        self.logits_head = PrepackedLinear()  # the LM head product at inference (forward runs without autograd)
        self.cache: KVCache | None = None
        self.name_or_path = ""
        self.compiled_decode = None  # see compile_decode

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path, dtype="auto", device="cpu", max_len: int | None = None,
                        batch: int = 1) -> "BaseModel":
        """Load a built-in name, a ``.gguf`` file or an HF folder; allocate a cache of ``max_len`` positions
        (default: the model's context window)."""
        folder = resolve_model_path(name_or_path)
        config = read_config(folder)
        check_architecture(config, str(folder))
        device = torch.device(device)
        dtype = parse_dtype(dtype, device)
        args = LlamaArgs.from_hf_config(config)
        with torch.device("meta"):
            model = cls(args)
        state = _read_safetensors(folder, device)
        if args.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        expected = {k for k in model.state_dict() if not (args.tie_word_embeddings and k == "lm_head.weight")}
        missing, unexpected = expected - state.keys(), state.keys() - expected
        if missing or unexpected:
            raise CloverError(f"{folder}: weights do not match a {args.architecture} with this config "
                              f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
        model.load_state_dict(state, strict=False, assign=True)
        if args.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.rotary = Rotary(args).to(device)
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        model.name_or_path = str(name_or_path)
        model.folder = folder
        model.allocate_cache(max_len or args.max_position_embeddings, batch)
        return model

    def allocate_cache(self, max_len: int, batch: int = 1) -> None:
        max_len = min(max_len, self.args.max_position_embeddings)
        a = self.args
        p = self.lm_head.weight
        self.cache = KVCache(a.num_hidden_layers, batch, a.num_key_value_heads, max_len, a.head_dim, p.dtype, p.device)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def max_len(self) -> int:
        return self.cache.capacity

    # ---- forward ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                tree_mask: torch.Tensor | None = None, logits_to_keep: int | None = None,
                use_cache: bool = True) -> BaseOutput:
        """Run ``input_ids [B, T]`` after the cached prefix.

        ``position_ids`` (``[T]`` or ``[B, T]``) default to ``cache.length + arange(T)``; a tree passes depths.
        ``tree_mask [T, T]`` (True = attend) replaces the causal block among the new tokens. ``logits_to_keep``:
        None = logits for every position, ``n`` = only the last ``n`` (0 = none). With ``use_cache=False`` the
        cache is neither read nor written (a stateless full-sequence forward, e.g. for data generation).
        """
        b, t = input_ids.shape
        cache = self.cache if use_cache else None
        past = cache.length if cache is not None else 0
        if cache is not None and past + t > cache.capacity:
            raise CloverError(f"sequence of {past + t} tokens exceeds the context window of {cache.capacity}")
        mask = additive_mask(attention_mask(past, tree_mask, t, input_ids.device), self.dtype)  # None: 1 token, no tree
        if (self.compiled_decode is not None and b == 1 and past > 0 and cache is not None
                and (t >= 2 and tree_mask is not None or t == 1 and tree_mask is None and position_ids is None)):
            positions = None if position_ids is None else position_ids.reshape(t)
            prenorm, hidden, logits = self.compiled_decode(input_ids, past, positions, mask)
            cache.length = past + t
            if logits_to_keep is not None:
                logits = logits[:, -logits_to_keep:] if logits_to_keep > 0 else None
            return BaseOutput(logits=logits, hidden_prenorm=prenorm, hidden=hidden)
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device)
        cos, sin = self.rotary(position_ids, self.dtype)
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i, past)
        if cache is not None:
            cache.length = past + t
        return self._output(x, logits_to_keep)

    def _output(self, prenorm: torch.Tensor, logits_to_keep, last: torch.Tensor | None = None) -> BaseOutput:
        """Final norm and the LM head on the positions ``logits_to_keep`` asks for: None = every position, ``n`` =
        the last ``n`` (0 = none), ``"last"`` = each row's position ``last[r]`` (its last real token; None: the
        last column)."""
        hidden = self.model.norm(prenorm)
        if logits_to_keep == "last":
            r = hidden.shape[0]
            picked = hidden[:, -1:] if last is None else hidden.gather(
                1, last.view(r, 1, 1).expand(r, 1, hidden.shape[-1]))
            logits = self.logits_head(picked, self.lm_head.weight)
        elif logits_to_keep is None:
            logits = self.logits_head(hidden, self.lm_head.weight)
        elif logits_to_keep > 0:
            logits = self.logits_head(hidden[:, -logits_to_keep:], self.lm_head.weight)
        else:
            logits = None
        return BaseOutput(logits=logits, hidden_prenorm=prenorm, hidden=hidden)

    def compile_decode(self) -> None:
        """Compile the decoding forwards after a non-empty cache with ``torch.compile`` (see
        :mod:`clover.model.compiled`), now: one token without a tree mask (plain decoding's step) and a tree of two
        or more tokens with its mask (speculative verification), 1-2 minutes each for SmolLM2 on 2 CPU cores (a C++
        compiler is needed), after one eager forward that prepacks every weight the graphs use. The cache is left
        empty. For inference only: the graphs assume the weights no longer change."""
        from clover.model.compiled import CompiledDecode

        self.compiled_decode = CompiledDecode(self)
        zeros = torch.zeros(1, 3, dtype=torch.long, device=self.device)
        self.reset()
        self(zeros[:, :2])  # eager, every position's logits: packs the weights, the LM head's too
        self(zeros[:, :1], logits_to_keep=0)
        self(zeros[:, :2], position_ids=torch.tensor([3, 4], device=self.device),
             tree_mask=torch.ones(2, 2, dtype=torch.bool, device=self.device).tril())
        self.reset()

    # ---- batched decoding ---------------------------------------------------------------------------------------
    def batch_cache(self, batch: int, max_len: int) -> RaggedKVCache:
        """A cache of ``batch`` rows of up to ``max_len`` tokens each (capped at the context window) for
        :meth:`forward_batch`; the model's own batch-1 cache is left as it is."""
        a, p = self.args, self.lm_head.weight
        return RaggedKVCache(a.num_hidden_layers, batch, a.num_key_value_heads,
                             min(max_len, a.max_position_embeddings), a.head_dim, p.dtype, p.device)

    @torch.inference_mode()
    def forward_batch(self, input_ids: torch.Tensor, cache: RaggedKVCache, n_new=None, rows=None,
                      position_ids: torch.Tensor | None = None, tree_mask: torch.Tensor | None = None,
                      logits_to_keep: int | str | None = "last") -> BaseOutput:
        """Run ``input_ids [R, T]`` for the rows ``rows`` of ``cache`` (None: all of them; an int or a slice), each
        after its own cached prefix and at its own positions.

        ``n_new`` (see :meth:`RaggedKVCache.begin`): the number of real tokens per row, the rest of the row being
        right padding that no real token attends to and that leaves the row's length alone (0: an idle row).
        ``position_ids`` (``[T]`` or ``[R, T]``) and ``tree_mask`` (``[T, T]`` or ``[R, T, T]``) as in
        :meth:`forward`. ``logits_to_keep``: ``"last"`` = ``[R, 1, V]`` at each row's last real token (default),
        None = every position, ``n`` = the last ``n`` positions, 0 = none.
        """
        r, t = input_ids.shape
        positions, mask = cache.begin(t, n_new, rows, position_ids, tree_mask)
        cos, sin = self.rotary(positions, self.dtype)  # [R, 1, T, d]: per-row positions
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i, 0)
        last = cache.last_new()
        cache.end()
        return self._output(x, logits_to_keep, last)

    # ---- cache operations ---------------------------------------------------------------------------------------
    def commit(self, start: int, keep: torch.Tensor) -> None:
        """After a forward appended positions from ``start``, keep the offsets ``keep`` (ascending) and drop the
        rest (the rejected tree nodes)."""
        self.cache.commit(start, keep)

    def truncate(self, length: int) -> None:
        self.cache.truncate(length)

    def reset(self) -> None:
        self.cache.reset()


def _read_safetensors(folder: Path, device: torch.device) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise CloverError(f"{folder} has no *.safetensors weights (convert .bin checkpoints with transformers' "
                          f"save_pretrained(safe_serialization=True))")
    state = {}
    for name in files:
        state.update(read_safetensors(folder / name, device, what="weights file"))
    return state
