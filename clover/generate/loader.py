"""Plain or speculative decoding, built from a base model and an optional draft: the one place where the command line
(``python -m clover.cli``), the server (:mod:`clover.serve`) and the answer generator
(:mod:`clover.evaluation.gen_answer`) choose between the two.

    decoding = load_decoding("smollm2-135m-instruct", "runs/clover2/final", tree="dynamic", tree_budget="auto")
    result = decoding.generate(ids, SamplingParams(temperature=0.7), max_new_tokens=128)
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterator

import torch

from clover.generate.output import GenerationResult
from clover.generate.plain import _drain, stream_plain
from clover.generate.sampling import SamplingParams
from clover.model.base import BaseModel
from clover.model.registry import draft_class

@dataclass
class Decoding:
    """A loaded base model and, for speculative decoding, the :class:`~clover.generate.speculative.SpeculativeModel`
    around it (``model`` is None for plain decoding)."""

    base: BaseModel
    model: object | None = None

    @property
    def speculative(self) -> bool:
        return self.model is not None

    def stream(self, ids, params: SamplingParams, max_new_tokens: int, stop_token_ids=None,
               generator: torch.Generator | None = None) -> Iterator[list[int]]:
        """Yield the tokens committed at each step; the generator returns the GenerationResult. ``stop_token_ids``
        None means the base model's end-of-sequence ids."""
        stops = self.base.args.eos_token_id if stop_token_ids is None else stop_token_ids
        if self.model is None:
            return stream_plain(self.base, ids, params, max_new_tokens, stops, (), generator)
        return self.model.stream(ids, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                 max_new_tokens=max_new_tokens, stop_token_ids=stops, generator=generator)

    def generate(self, ids, params: SamplingParams, max_new_tokens: int, stop_token_ids=None,
                 generator: torch.Generator | None = None) -> GenerationResult:
        """:meth:`stream` run to the end."""
        return _drain(self.stream(ids, params, max_new_tokens, stop_token_ids, generator))

    def reset(self) -> None:
        """Empty the KV caches (the base's and the draft's)."""
        if self.model is not None:
            self.model.reset()
        else:
            self.base.reset()


def load_decoding(base_model, draft=None, *, draft_type: str | None = None, tree="dynamic",
                  tree_budget: int | str | None = "auto", dtype="auto", device="cpu",
                  max_len: int | None = None, compile: bool = False) -> Decoding:
    """Plain decoding of ``base_model`` (a built-in name, .gguf file or HF folder) when ``draft`` is empty, else
    speculative decoding with ``draft``: a draft checkpoint folder, a training-free source (``"lookup"``,
    ``"recycle"``), or a list of them (at most one checkpoint), whose candidates share one tree per step. ``tree`` is
    the trained draft's tree (a fixed tree name, ``"dynamic"`` or a list of node paths; with a source in the mix the
    tree is always chosen by score), with node budget ``tree_budget`` (a number or ``"auto"``: sized by this
    device's measured verification cost). ``draft_type`` (a registered draft type name, e.g. ``"clover2"``) makes a
    checkpoint of another type an error. ``compile`` compiles the base model's decoding forwards now
    (:meth:`BaseModel.compile_decode`: one token, and a tree's verification)."""
    from clover.generate.sources import split_drafts

    if draft_type is not None:
        draft_class(draft_type)  # an unknown name is an error even for plain decoding
    checkpoint, sources = split_drafts(draft)
    if compile:
        print("compiling the decoding forwards (torch.compile; a few minutes on 2 CPU cores) ...", file=sys.stderr,
              flush=True)
    if not checkpoint and not sources:
        base = BaseModel.from_pretrained(base_model, dtype=dtype, device=device, max_len=max_len)
        if compile:
            base.compile_decode()
        return Decoding(base)
    from clover.generate.speculative import SpeculativeModel

    model = SpeculativeModel.from_pretrained(base_model, checkpoint, dtype=dtype, device=device, max_len=max_len,
                                             tree=tree, tree_budget=tree_budget, expected_type=draft_type,
                                             compile=compile, sources=sources)
    return Decoding(model.base, model)
