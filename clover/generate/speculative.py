"""Speculative decoding: prefill, draft a tree, verify it in one base forward, commit the accepted path, repeat.

``SpeculativeModel`` (any draft; ``CloverModel`` / ``EagleModel`` accept only their own) bundles a base runtime, a
trained draft and/or training-free candidate sources (``lookup``, ``recycle``: :mod:`clover.generate.sources`),
whose candidates are merged into one tree per step (:func:`clover.generate.tree.select_tree`), and a tree policy
(a fixed shape such as ``mc_sim_7b_63`` for a draft alone, or ``dynamic`` with a node budget that is a number or
``auto``). ``auto`` measures this device's verification cost curve and the draft's own costs once, then picks each
step's depth from the acceptance observed so far (:class:`clover.generate.budget.DepthPolicy`; the statistics carry
over between calls), depth 0 being a plain decoding step, and each step's node count from the cost curve.
"""
from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from clover.errors import CloverError
from clover.generate.output import GenerationResult, OutputTracker
from clover.generate.plain import _drain, check_prompt, stream_plain
from clover.generate.sampling import SamplingParams, select_tokens
from clover.generate.sources import SOURCE_NAMES, make_source
from clover.generate.candidates import best_size, dynamic_candidate_steps, rank_candidates, select_tree
from clover.generate.tree import DraftTree, Expansions, TreeSpec, drive, drive_together
from clover.generate.verify import verify_tree
from clover.model.base import BaseModel
from clover.model.clover2 import Clover2Draft
from clover.model.draft import DraftModel
from clover.model.eagle import EagleDraft

MAX_CANDIDATES = 64  # per source and step: more than a CPU's verification pays for
DRAFT_HEADROOM = 128  # draft cache positions past a sequence's capacity: the tree nodes one step drafts into it
CATCH_UP_WINDOW = 32  # batched rows: a draft further behind than this (after plain steps) restarts on the last ones


@dataclass
class DraftState:
    """What drafting carries from one step of a sequence to the next: the trained draft's runner and its own KV cache
    for this sequence, the committed (hidden state, next token) pairs the draft has not been fed yet (after plain
    steps, several steps' worth), the candidate sources (those with per-request state are the sequence's own;
    token recycling's table is shared by every sequence of a model) and the depth policy of the ``auto`` tree."""

    runner: object | None
    cache: object | None  # None: the draft's own cache (the model's single sequence)
    sources: list
    depth_policy: object | None = None
    pending: list = field(default_factory=list)
    fed: bool = False  # the draft has read the prompt


def take_pending(state: DraftState) -> tuple[torch.Tensor, torch.Tensor]:
    """The committed pairs the draft has not been fed yet, as one ``(hidden [1, n, H], next_ids [1, n])``; the state
    holds none after it."""
    hidden, next_ids = (torch.cat(x, dim=1) for x in zip(*state.pending))
    state.pending = []
    return hidden, next_ids


class SpeculativeModel:
    draft_class: type[DraftModel] = DraftModel  # subclasses accept only checkpoints of their own draft

    def __init__(self, base: BaseModel, draft: DraftModel | None = None, tree="dynamic",
                 tree_budget: int | str | None = "auto", tokenizer=None, dynamic_width: int = 8,
                 dynamic_expand: int = 8, max_depth: int = 5, sources=()):
        self.base, self.draft, self.tokenizer = base, draft, tokenizer
        self.sources = [make_source(s, base) if isinstance(s, str) else s for s in sources]
        if draft is None and not self.sources:
            raise CloverError("speculative decoding needs a draft checkpoint or a candidate source "
                              f"({', '.join(SOURCE_NAMES)})")
        self.hidden_attr = "hidden_prenorm" if draft is not None and draft.hidden_kind == "prenorm" else "hidden"
        heads = draft.max_depth if draft is not None else None  # the draft's own depth limit, if it has one
        self.num_heads = (heads if heads is not None else max_depth) if draft is not None else 0
        # with training-free sources every step's tree is chosen from scored candidates (a fixed shape has no scores)
        self.dynamic = tree == "dynamic" or bool(self.sources)
        self.dynamic_width, self.dynamic_expand = dynamic_width, dynamic_expand
        self.step_overhead = 0.0  # seconds a step spends outside the verification forward (running mean, ``auto``)
        self.cost, self.draft_costs = None, None
        # the sequence that generate/stream decode: the draft's own cache, statistics kept from call to call
        self.state = DraftState(draft.runner() if draft is not None else None, None, self.sources)
        if self.dynamic:
            if tree_budget in (None, "auto"):
                from clover.generate.budget import draft_costs, verification_cost

                self.budget, self.cost = None, verification_cost(base)
                if self.runner is not None:
                    self.draft_costs = draft_costs(self.runner, base, dynamic_expand)
                    self.state.depth_policy = self.new_depth_policy(self.cost)
            else:
                self.budget, self.cost = int(tree_budget), None
                if self.budget < 0:
                    raise CloverError(f"tree budget must be >= 0 or 'auto', got {tree_budget}")
        else:
            self.spec = TreeSpec(tree, num_heads=heads).to(base.device)

    @classmethod
    def from_pretrained(cls, base_model, draft=None, dtype="auto", device="cpu",
                        max_len: int | None = None, expected_type=None, compile: bool = False,
                        **kwargs) -> "SpeculativeModel":
        """Load the base model and the draft checkpoint folder ``draft`` (of this class's draft, or of
        ``expected_type``: a draft class or type name; None: no trained draft, ``sources`` only) and bundle them
        (``kwargs``: tree, tree_budget, sources ...). ``compile`` compiles the base's decoding forwards first
        (:meth:`BaseModel.compile_decode`), so that the ``auto`` budget is measured on the compiled forwards."""
        from clover.model.checkpoint import load_draft
        from clover.model.loading import load_tokenizer

        base = BaseModel.from_pretrained(base_model, dtype=dtype, device=device, max_len=max_len)
        if compile:
            base.compile_decode()
        model = None
        if draft:
            model = load_draft(draft, base, expected_type=expected_type or cls.draft_class)
            model.allocate_cache(base.max_len)
        return cls(base, model, tokenizer=load_tokenizer(base_model), **kwargs)

    @property
    def description(self) -> str:
        """What proposes the candidates, for people (e.g. ``"Clover-2 draft + prompt lookup"``)."""
        parts = [f"{self.draft.label} draft"] if self.draft is not None else []
        return " + ".join(parts + [s.label for s in self.sources])

    def reset(self) -> None:
        """Empty the caches of a request (the base's, the draft's); the sources keep what they learned."""
        self.base.reset()
        if self.runner is not None:
            self.runner.reset()

    @property
    def runner(self):
        """The trained draft's runner of :attr:`state` (None without a trained draft)."""
        return self.state.runner

    @property
    def depth_policy(self):
        return self.state.depth_policy

    @depth_policy.setter
    def depth_policy(self, policy) -> None:
        self.state.depth_policy = policy

    def new_depth_policy(self, cost: torch.Tensor):
        """A depth policy for verification costs ``cost[s]`` (seconds a step spends verifying ``s`` nodes)."""
        from clover.generate.budget import DepthPolicy

        return DepthPolicy(cost, *self.draft_costs, self.num_heads)

    def new_state(self, max_len: int, cost: torch.Tensor | None = None, runner=None) -> DraftState:
        """Drafting state for one more sequence (a row of a batch): a runner with its own draft cache for a
        sequence of ``max_len`` positions (and the nodes of a step's tree), or ``runner`` (a row of a batch runner,
        :meth:`batch_runner`), its own copies of the sources that keep per-request state (``shared`` False), and
        (``auto`` tree) a depth policy for the verification costs ``cost``."""
        cache = policy = None
        if self.draft is not None:
            if runner is None:
                own = self.draft.cache
                self.draft.allocate_cache(max_len + DRAFT_HEADROOM)
                cache, self.draft.cache = self.draft.cache, own
                runner = self.draft.runner()
            if self.draft_costs is not None:
                policy = self.new_depth_policy(cost if cost is not None else self.cost)
        sources = [s if getattr(s, "shared", False) else copy.deepcopy(s) for s in self.sources]
        return DraftState(runner, cache, sources, policy)

    def batch_runner(self, batch: int, max_len: int):
        """The trained draft's runner for ``batch`` rows of ``max_len`` positions each (None without a draft); its
        rows (:class:`clover.model.draft_rows.BatchRow`) are the runners of :meth:`new_state` for
        :meth:`propose_many`."""
        return None if self.draft is None else self.draft.batch_runner(batch, max_len + DRAFT_HEADROOM)

    # ---- one step of one sequence: propose a tree, learn from its verdict ---------------------------------------
    def begin(self, state: DraftState, prompt: torch.Tensor, root: torch.Tensor, out, hidden: torch.Tensor) -> None:
        """A request starts after its prefill of ``prompt [1, P]``: the sources see it (and the prefill's output
        ``out``), the draft will be fed its hidden states ``hidden [1, P, H]`` paired with the tokens that follow."""
        if state.runner is not None:
            with self._drafting(state):
                state.runner.reset()
            state.pending = [(hidden, torch.cat([prompt[:, 1:], root.reshape(1, 1)], dim=1))]
        if state.sources:
            ids, first = prompt[0].tolist(), int(root)
            for source in state.sources:
                source.begin(ids, first, self.base, out)

    def propose(self, state: DraftState, root: torch.Tensor,
                cost: torch.Tensor | None = None) -> tuple[DraftTree, int]:
        """The next step's tree after the token ``root`` and how deep the trained draft drafted it (0: not at all);
        ``cost`` (seconds to verify s nodes; default the model's own curve) sizes a dynamic tree."""
        depth = self._next_depth(state)
        with self._drafting(state):
            root_logits = None
            if depth > 0:
                root_logits = state.runner.start(*take_pending(state))
            return drive(self._tree_steps(state, root, root_logits, depth, cost), state.runner), depth

    def propose_many(self, states: list[DraftState], roots: list[torch.Tensor],
                     cost: torch.Tensor | None = None) -> list[tuple[DraftTree, int]]:
        """:meth:`propose` for the rows of a batch, whose runners are rows of one batch runner (:meth:`new_state`
        with ``runner``): one draft call feeds every drafting row its committed pairs, one per tree level expands
        every row's nodes. A dynamic tree sized by cost is sized for all the rows together (their trees are padded
        to the widest in the verification forward, so one row's large tree would make every row pay for it): the
        width that maximises the batch's expected tokens per second, each row taking up to that many of its best
        nodes."""
        depths = [self._next_depth(state) for state in states]
        drafting = [i for i, depth in enumerate(depths) if depth > 0]
        root_logits: list = [None] * len(states)
        batch = states[drafting[0]].runner.batch if drafting else None
        if drafting:
            pairs = [self._catch_up(states[i]) for i in drafting]
            found = batch.start([states[i].runner.row for i in drafting], *zip(*pairs))
            for i, logits in zip(drafting, found):
                root_logits[i] = logits

        def expand(which: list[int], requests: list[tuple]) -> list[torch.Tensor]:
            return batch.expand([states[i].runner.row for i in which], *map(list, zip(*requests)))

        together = self._sized_together(cost)
        builders = [self._tree_steps(state, root, logits, depth, cost, ranked=together)
                    for state, root, logits, depth in zip(states, roots, root_logits, depths)]
        found = drive_together(builders, expand)
        if together:  # the rows' trees share one padded forward: one width for all, each row filling it
            nodes = best_size(found, self._row_cost(cost))
            found = [DraftTree.single(root) if ranked is None else ranked.tree(nodes)
                     for ranked, root in zip(found, roots)]
        return list(zip(found, depths))

    @staticmethod
    def _catch_up(state: DraftState) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs a batched row's draft reads before it drafts: every pending one, except that a draft which has
        read its prompt and is more than :data:`CATCH_UP_WINDOW` pairs behind (the row decoded plainly for a while:
        at a large batch plain steps are the rule and drafting steps trials) restarts on the last of them. Reading
        every pair would make such a trial cost more than several plain steps (16 rows 60 tokens behind: ~1,000
        positions through the draft); attention under rotary positions depends only on the distance between
        tokens, so the restarted draft reads them as a window of the text, and the output stays the base model's."""
        hidden, next_ids = take_pending(state)
        if state.fed and next_ids.shape[1] > CATCH_UP_WINDOW:
            state.runner.reset()
            hidden, next_ids = hidden[:, -CATCH_UP_WINDOW:], next_ids[:, -CATCH_UP_WINDOW:]
        state.fed = True
        return hidden, next_ids

    def observe(self, state: DraftState, tree: DraftTree, verdict, logits: torch.Tensor, hidden: torch.Tensor,
                depth: int) -> None:
        """Learn from a verified step: ``logits [n, V]`` and pre-draft ``hidden [1, n, H]`` at the tree's nodes."""
        if state.depth_policy is not None:
            drafted = verdict.accepted
            if state.sources:  # the draft's own share: the accepted nodes it proposed, from the root on
                drafted = next((i for i, o in enumerate(verdict.origins) if not o & 1), len(verdict.origins))
            state.depth_policy.update(depth, drafted, tree.size)
        for source in state.sources:
            source.observe(tree, verdict, logits)
        if state.runner is not None:
            state.pending.append((hidden[:, verdict.nodes],
                                  torch.cat([verdict.tokens[1:], verdict.bonus.reshape(1)])[None]))

    def observe_plain(self, states: list[DraftState], trees: list[DraftTree], verdicts: list, logits: torch.Tensor,
                      hidden: torch.Tensor) -> None:
        """:meth:`observe` for a batch of plain steps (each sequence's root alone verified): ``logits [R, V]`` and
        ``hidden [R, 1, H]`` at the roots. A shared source that can (``observe_nodes``) learns from all the roots in
        one call."""
        batched = [s for s in self.sources if getattr(s, "shared", False) and hasattr(s, "observe_nodes")]
        if batched:
            roots = torch.cat([t.tokens for t in trees])
            targets = torch.cat([v.targets for v in verdicts])
            for source in batched:
                source.observe_nodes(roots, targets, logits)
        for i, (state, tree, verdict) in enumerate(zip(states, trees, verdicts)):
            if state.depth_policy is not None:
                state.depth_policy.update(0, 0, 1)
            for source in state.sources:
                if source not in batched:
                    source.observe(tree, verdict, logits[i:i + 1])
            if state.runner is not None:
                state.pending.append((hidden[i:i + 1], verdict.bonus.reshape(1, 1)))

    def note_step_overhead(self, seconds: float) -> None:
        """A step spent ``seconds`` outside its verification forward: the running mean that the ``auto`` tree adds
        to each size's verification cost."""
        self.step_overhead = 0.9 * self.step_overhead + 0.1 * max(seconds, 0.0)

    @contextlib.contextmanager
    def _drafting(self, state: DraftState):
        """The draft reads and writes ``state``'s cache inside the block (its own cache again after it)."""
        if state.cache is None:
            yield
            return
        own, self.draft.cache = self.draft.cache, state.cache
        try:
            yield
        finally:
            self.draft.cache = own

    def _next_depth(self, state: DraftState) -> int:
        """How deep the trained draft drafts the next step; 0 = no draft call at all (no draft, or ``auto`` chose
        a step without it)."""
        if state.runner is None:
            return 0
        if not self.dynamic:
            return self.spec.depth
        return state.depth_policy.depth() if state.depth_policy else self.num_heads

    def _sized_together(self, cost: torch.Tensor | None) -> bool:
        """Whether the rows' trees of a batched step are sized together (:func:`best_size`): a dynamic tree sized
        by cost."""
        return self.dynamic and self.budget is None and (cost is not None or self.cost is not None)

    def _row_cost(self, cost: torch.Tensor | None) -> torch.Tensor | None:
        """The verification cost that sizes a tree: ``cost`` (default the model's own curve) plus the step's
        measured overhead outside the forward."""
        cost = cost if cost is not None else self.cost
        return None if cost is None else cost + self.step_overhead

    def _tree_steps(self, state: DraftState, root, root_logits, depth: int, cost: torch.Tensor | None = None,
                    ranked: bool = False) -> Expansions:
        """The step's tree as a tree builder (:data:`clover.generate.tree.Expansions`): the trained draft's
        candidates (when it drafts) and every source's, merged. ``ranked``: return the ranked candidates instead
        (None without any), for a batch whose trees are sized together."""
        vocab = state.runner.vocab if state.runner is not None else None
        if not self.dynamic:
            return (yield from self.spec.build_steps(root, root_logits, vocab))
        candidates = []
        if depth > 0:
            found = yield from dynamic_candidate_steps(root_logits, vocab, max_depth=depth, width=self.dynamic_width,
                                                       expand=self.dynamic_expand)
            candidates.append(found.top(MAX_CANDIDATES))
        for source in state.sources:
            found = source.propose(root)
            if found.size:
                candidates.append(found.top(MAX_CANDIDATES))
        if ranked:
            return rank_candidates(root, candidates) if candidates else None
        if not candidates:
            return DraftTree.single(root)
        return select_tree(root, candidates, budget=self.budget, cost_per_size=self._row_cost(cost))

    def stream(self, input_ids, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
               max_new_tokens: int = 256, stop_token_ids=None, stop_sequences=(),
               generator: torch.Generator | None = None) -> Iterator[list[int]]:
        """Yield the tokens committed at each step; the generator returns a GenerationResult."""
        params = SamplingParams(temperature, top_p, top_k)
        if stop_token_ids is None:
            stop_token_ids = self.base.args.eos_token_id
        tracker = OutputTracker(max_new_tokens, stop_token_ids, stop_sequences)
        ids = check_prompt(self.base, input_ids)
        base = self.base
        start_time = time.perf_counter()
        self.reset()
        state = self.state
        out = base(ids, logits_to_keep=1)
        root = select_tokens(out.logits[0, -1], params, generator)
        yield tracker.add([int(root)])
        self.begin(state, ids, root, out, getattr(out, self.hidden_attr))
        while not tracker.done:
            step_start = time.perf_counter()
            tree, depth = self.propose(state, root)
            past = base.cache.length
            if past + tree.size > base.max_len:
                tracker.result.finish_reason = "context"
                break
            if tree.size == 1:  # a plain step: the one-token forward (compiled under --compile)
                out = base(root.reshape(1, 1))
            else:
                out = base(tree.tokens[None], position_ids=past + tree.depths, tree_mask=tree.mask)
            verdict = verify_tree(tree, out.logits[0], params, generator)
            base.commit(past, verdict.nodes)
            self.observe(state, tree, verdict, out.logits[0], getattr(out, self.hidden_attr), depth)
            if self.cost is not None:  # what the step cost beyond the verification forward's measured price
                self.note_step_overhead(time.perf_counter() - step_start
                                        - float(self.cost[min(tree.size, self.cost.numel() - 1)]))
            root = verdict.bonus
            tracker.result.verified.append(tree.size)
            yield tracker.add(verdict.committed)
        # keep exactly the output in the cache (all but its last token, which is never fed back): a stop or cap inside
        # the last accepted chunk leaves committed-but-discarded positions behind
        base.truncate(min(base.cache.length, ids.shape[1] + tracker.result.new_tokens - 1))
        tracker.result.wall_time = time.perf_counter() - start_time
        return tracker.result

    def generate(self, input_ids, **kwargs) -> GenerationResult:
        return _drain(self.stream(input_ids, **kwargs))

    def generate_plain(self, input_ids, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                       max_new_tokens: int = 256, stop_token_ids=None, stop_sequences=(), generator=None):
        """Plain decoding on the same runtime, for comparisons."""
        if stop_token_ids is None:
            stop_token_ids = self.base.args.eos_token_id
        return _drain(stream_plain(self.base, input_ids, SamplingParams(temperature, top_p, top_k), max_new_tokens,
                                   stop_token_ids, stop_sequences, generator))


class CloverModel(SpeculativeModel):
    draft_class = Clover2Draft


class EagleModel(SpeculativeModel):
    draft_class = EagleDraft
