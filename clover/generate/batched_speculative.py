"""Speculative decoding for many sequences at once, with continuous batching.

A :class:`BatchedSpeculativeDecoder` keeps the rows of one :class:`~clover.model.cache.RaggedKVCache` busy with
requests that join and leave at any step. Each row has its own drafting state (a
:class:`~clover.generate.speculative.DraftState`: its row of the trained draft's batch runner, its own prompt lookup;
token recycling's table is shared), its own tree, sampling settings and random generator. A step drafts every busy
row's tree, the trained draft's calls made once for all rows (one forward over every row's newly committed pairs
in the draft's own ragged cache, then one call per tree level for the nodes of every row:
:mod:`clover.model.draft_rows`), verifies all the trees in one ragged forward (each row's tree padded to the largest,
at the row's own positions, under its own tree mask), then accepts, commits and feeds back per row. The busy rows
are kept at the front (a row that ends before the last one is filled by it), so that no forward spans an idle row.

With the ``auto`` tree each row's depth and the step's node count come from the measured cost of the whole batched
forward (:func:`clover.generate.budget.batched_verification_cost`: seconds per row for ``s`` tokens per row at this
batch size) and of the draft's batched calls (per row): at a large batch an extra node costs nearly what a whole
token does, so rows draft less, while a draft level costs each row a fraction of what it costs one sequence alone.
Every row's tree is padded to the widest in the forward, so the node count is chosen once for all the rows (the
width that maximises the batch's expected tokens per second, :func:`clover.generate.candidates.best_size`) and each
row takes up to that many of its best candidates. Whether a step drafts at all is measured too
(:class:`clover.generate.budget.StepModePolicy`): from two busy rows on, per size class of the batch, the decoder
keeps the tokens per second of drafting steps and of plain steps (one token per row, no draft or source calls) and
takes the faster, trying the other now and then. Greedy decoding gives, row for row, the tokens of batch-1 decoding
(tested).

    decoder = BatchedSpeculativeDecoder(model, batch_size=16, max_len=1024)
    for event in decoder.run([SpeculativeRequest(prompt_ids, max_new_tokens=128, tag=i) for i, prompt_ids in ...]):
        print(event.tag, event.tokens, event.finish_reason)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from clover.errors import CloverError
from clover.generate.budget import StepModePolicy, batched_verification_cost, draft_costs
from clover.generate.output import GenerationResult, OutputTracker
from clover.generate.sampling import SamplingParams, select_tokens
from clover.generate.speculative import DraftState, SpeculativeModel
from clover.generate.tree import DraftTree
from clover.generate.verify import verify_rows
from clover.model.base import BaseModel, BaseOutput
from clover.model.draft_rows import BatchRow


@dataclass
class SpeculativeRequest:
    prompt: Sequence[int]  # token ids (at least one)
    max_new_tokens: int = 256
    tag: Any = None  # returned with every event of the request
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None  # the request's own generator (None: unseeded)
    stop_token_ids: Sequence[int] | None = None  # None: the base model's end-of-sequence ids
    stop_sequences: Sequence[Sequence[int]] = ()


@dataclass
class RowEvent:
    tag: Any
    tokens: list[int]  # the tokens this step added to the request's output
    finish_reason: str | None = None  # set on the request's last event: "stop", "length" or "context"
    result: GenerationResult | None = None  # with the last event: the whole output, steps and accept lengths


@dataclass
class _Row:
    request: SpeculativeRequest
    state: DraftState | None
    tracker: OutputTracker
    generator: torch.Generator | None
    root: torch.Tensor  # the next token to feed (the last one committed)


class BatchedSpeculativeDecoder:
    """Decode requests ``batch_size`` at a time with ``model``'s draft, sources and tree policy (a
    :class:`SpeculativeModel`; a bare :class:`BaseModel` decodes plainly, one token per row and step), each row with a
    cache of ``max_len`` tokens (default: the base's); requests that join at once are prefilled together, up to
    ``prefill_tokens`` tokens per forward."""

    def __init__(self, model: SpeculativeModel | BaseModel, batch_size: int = 8, max_len: int | None = None,
                 prefill_tokens: int = 2048):
        if batch_size < 1:
            raise CloverError(f"batch size must be at least 1, got {batch_size}")
        if isinstance(model, BaseModel):
            self.model, self.base = None, model
        else:
            self.model, self.base = model, model.base
        if prefill_tokens < 1:
            raise CloverError(f"prefill_tokens must be at least 1, got {prefill_tokens}")
        self.prefill_tokens = prefill_tokens  # tokens (padding included) per forward over prompts joining at once
        self.cache = self.base.batch_cache(batch_size, max_len or self.base.max_len)
        self.capacity = self.cache.capacity
        # the trained draft's rows: one draft cache for the batch, each draft call made once for all drafting rows
        self.drafter = self.model.batch_runner(batch_size, self.capacity) if self.model is not None else None
        self.rows: list[_Row | None] = [None] * batch_size
        self.lengths = np.zeros(batch_size, dtype=np.int64)  # tokens each row's cache holds (host, exact)
        self.costs: dict[int, torch.Tensor] = {}  # per busy-row count: seconds per row to verify s tokens per row
        self.draft_costs: dict[int, tuple[float, float]] = {}  # per busy-row count: seconds per row of the draft
        self.stats = {"steps": 0, "drafting_steps": 0, "new_tokens": 0, "verified_tokens": 0, "row_steps": 0,
                      "completions": 0}
        # drafting or plain steps, by measured throughput per batch size class from 2 rows on (``auto`` tree only;
        # a fixed tree or budget always drafts, as asked)
        self.modes = StepModePolicy() if self.model is not None and self.model.cost is not None else None
        # the depth policy of the last request that ended: a new row starts from what it observed, as one sequence
        # decoded after another does (batch-1 decoding keeps its statistics from call to call)
        self.learned = None

    @property
    def batch_size(self) -> int:
        return self.cache.batch

    @property
    def busy(self) -> int:
        return sum(row is not None for row in self.rows)

    # ---- requests join ------------------------------------------------------------------------------------------
    def check(self, request: SpeculativeRequest) -> torch.Tensor:
        """The prompt of ``request`` as token ids ``[P]``; CloverError when it cannot be decoded here."""
        prompt = torch.as_tensor(np.asarray(request.prompt, dtype=np.int64).reshape(-1))
        n = prompt.numel()
        if n == 0:
            raise CloverError("empty prompt: give at least one token")
        if n >= self.capacity:
            raise CloverError(f"prompt of {n} tokens does not fit the rows of {self.capacity} tokens (shorten it "
                              f"or raise max_len)")
        return prompt

    def add(self, request: SpeculativeRequest) -> RowEvent:
        """Prefill ``request`` into a free row; returns its first event (the first token; the last event too when
        that token already ends it)."""
        return self.add_many([request])[0]

    def add_many(self, requests: Sequence[SpeculativeRequest]) -> list[RowEvent]:
        """Prefill ``requests`` into free rows, several prompts per forward (right-padded, each forward at most
        ``prefill_tokens`` tokens with its padding; a longer prompt goes alone); returns each request's first event,
        in order. Requests that join together cost one forward instead of one each (32 short chat prompts: ~1.7x
        less time on 2 cores), and each gets its first token when the forward ends."""
        requests = list(requests)
        prompts = [self.check(request) for request in requests]
        self._compact()  # the free rows are the last ones: each forward covers a slice of rows
        first = self.busy
        if first == self.batch_size and requests:
            raise CloverError(f"all {self.batch_size} rows are busy; wait for a request to finish")
        if len(requests) > self.batch_size - first:
            raise CloverError(f"{len(requests)} requests for {self.batch_size - first} free rows of "
                              f"{self.batch_size}; wait for a request to finish")
        events, start = [], 0
        for stop in self._prefill_groups([p.numel() for p in prompts]):
            events += self._prefill(requests[start:stop], prompts[start:stop], first + start)
            start = stop
        return events

    def _prefill_groups(self, lengths: list[int]) -> list[int]:
        """Where each prefill forward's group of consecutive prompts ends: as many as fit ``prefill_tokens`` padded
        tokens (rows x the longest prompt), at least one."""
        ends, longest, size = [], 0, 0
        for i, n in enumerate(lengths):
            if size and (size + 1) * max(longest, n) > self.prefill_tokens:
                ends.append(i)
                longest, size = 0, 0
            longest, size = max(longest, n), size + 1
        return ends + [len(lengths)] if lengths else []

    def _prefill(self, requests: list[SpeculativeRequest], prompts: list[torch.Tensor], r0: int) -> list[RowEvent]:
        """One forward of ``prompts`` into the free rows ``r0 ..``, then each row's first token and draft state."""
        device, k = self.base.device, len(prompts)
        lengths = np.array([p.numel() for p in prompts], dtype=np.int64)
        ids = torch.zeros(k, int(lengths.max()), dtype=torch.long)
        for j, prompt in enumerate(prompts):
            ids[j, :prompt.numel()] = prompt
        ids = ids.to(device)
        rows = slice(r0, r0 + k)
        self.cache.truncate_rows(rows, 0)
        out = self.base.forward_batch(ids, self.cache, n_new=lengths, rows=rows)
        self.lengths[rows] = lengths
        events = []
        for j, (request, n) in enumerate(zip(requests, lengths.tolist())):
            r = r0 + j
            stops = self.base.args.eos_token_id if request.stop_token_ids is None else request.stop_token_ids
            tracker = OutputTracker(request.max_new_tokens, stops, request.stop_sequences)
            generator = None
            if request.seed is not None:
                generator = torch.Generator(device=device).manual_seed(request.seed)
            root = select_tokens(out.logits[j, -1], request.params, generator)
            state = None
            if self.model is not None:
                state = self.model.new_state(self.capacity,
                                             runner=BatchRow(self.drafter, r) if self.drafter else None)
                if self.learned is not None and state.depth_policy is not None:
                    state.depth_policy.adopt(self.learned)
                own = BaseOutput(logits=out.logits[j:j + 1], hidden_prenorm=out.hidden_prenorm[j:j + 1, :n],
                                 hidden=out.hidden[j:j + 1, :n])  # the row's prompt alone, as a batch-1 prefill's
                self.model.begin(state, ids[j:j + 1, :n], root, own, getattr(own, self.model.hidden_attr))
            self.rows[r] = row = _Row(request, state, tracker, generator, root)
            events.append(self._event(r, row, tracker.add([int(root)])))
        return events

    def cancel(self, tag) -> bool:
        """Free the row of the request tagged ``tag`` (False: no such request is decoding)."""
        for r, row in enumerate(self.rows):
            if row is not None and row.request.tag == tag:
                self._free(r)
                return True
        return False

    def _free(self, r: int) -> None:
        """Row ``r`` is idle from now on; its cache is emptied, so that its old length widens no attention span."""
        self.rows[r] = None
        self.cache.truncate_rows(r, 0)
        self.lengths[r] = 0

    def _compact(self) -> None:
        """Move the last busy rows into the idle rows before them, so that the busy rows are ``0 .. busy-1`` and
        no forward spans an idle row (a forward costs what its rows do, busy or not). A move copies the row's
        cached keys and values (and its draft's), once per request that ends before the last row's."""
        busy = self.busy
        holes = [r for r in range(busy) if self.rows[r] is None]
        movers = [r for r in range(busy, self.batch_size) if self.rows[r] is not None]
        for dst, src in zip(holes, movers):
            row = self.rows[src]
            self.cache.move_row(src, dst)
            self.lengths[dst], self.lengths[src] = self.lengths[src], 0
            if self.drafter is not None:  # then every row's draft runner is a BatchRow of it
                self.drafter.move_row(src, dst)
                row.state.runner.row = dst
            self.rows[dst], self.rows[src] = row, None

    # ---- one step of every busy row -----------------------------------------------------------------------------
    def step(self) -> list[RowEvent]:
        """Draft every busy row's tree, verify them all in one forward, commit per row; one event per busy row."""
        self._compact()
        busy = [r for r, row in enumerate(self.rows) if row is not None]
        if not busy:
            return []
        start = time.perf_counter()
        # one busy row drafts as batch-1 decoding does (its own depth policy already weighs plain steps)
        measured = self.modes is not None and len(busy) > 1
        drafting = self.model is not None and (not measured or self.modes.choose(len(busy)))
        cost = self._cost(len(busy)) if drafting and self.model.cost is not None else None
        cost_list = cost.tolist() if cost is not None else None  # once per step, for every row's depth policy
        if drafting:
            if cost_list is not None:  # every row's depth policy weighs this batch size's costs
                start_cost, level_cost = self._draft_cost(len(busy))
                for r in busy:
                    policy = self.rows[r].state.depth_policy
                    if policy is not None:
                        policy.verify, policy.start_cost, policy.level_cost = cost_list, start_cost, level_cost
            proposals = self.model.propose_many([self.rows[r].state for r in busy],
                                                [self.rows[r].root for r in busy], cost)
        else:
            proposals = [(DraftTree.single(self.rows[r].root), 0) for r in busy]
        events, trees, depths = [], {}, {}
        for r, (tree, depth) in zip(busy, proposals):
            row = self.rows[r]
            if self.lengths[r] + tree.size > self.capacity:  # the row is full: end it as single decoding does
                row.tracker.result.finish_reason = "context"
                events.append(self._event(r, row, []))
                continue
            trees[r], depths[r] = tree, depth
        if not trees:
            return events
        # the forward covers rows 0..hi-1 only (the busy rows are at the front: _compact); a row that ends now
        # leaves a hole that the next step fills
        hi = max(trees) + 1
        out = self._verify_forward(trees, hi)
        width = max(tree.size for tree in trees.values())
        keep = torch.zeros(hi, width, dtype=torch.long, device=self.base.device)
        counts = np.zeros(hi, dtype=np.int64)
        verdicts = verify_rows(trees, out.logits, {r: self.rows[r].request.params for r in trees},
                               {r: self.rows[r].generator for r in trees})
        for r, verdict in verdicts.items():
            keep[r, :verdict.nodes.numel()] = verdict.nodes
            counts[r] = verdict.nodes.numel()
        starts = self.lengths[:hi].copy()
        if width > 1:  # rejected nodes to drop (a plain step's token is already where it belongs)
            self.cache.commit_rows(starts, keep, counts, rows=slice(0, hi))
        self.lengths[:hi] = starts + counts
        if self.model is not None:
            hidden = getattr(out, self.model.hidden_attr)
            if drafting:
                for r, tree in trees.items():
                    self.model.observe(self.rows[r].state, tree, verdicts[r], out.logits[r, :tree.size],
                                       hidden[r:r + 1, :tree.size], depths[r])
            else:  # every row's root alone: what the sources learn from all of them, in one call where they can
                index = torch.tensor(list(trees), device=out.logits.device)
                self.model.observe_plain([self.rows[r].state for r in trees], list(trees.values()),
                                         [verdicts[r] for r in trees], out.logits[index, 0], hidden[index, :1])
        for r, tree in trees.items():
            row, verdict = self.rows[r], verdicts[r]
            row.root = verdict.bonus
            row.tracker.result.verified.append(tree.size)
            events.append(self._event(r, row, row.tracker.add(verdict.committed)))
        if measured:
            self.modes.record(len(busy), drafting, sum(len(e.tokens) for e in events), time.perf_counter() - start)
        self.stats["steps"] += 1
        self.stats["drafting_steps"] += drafting
        self.stats["row_steps"] += len(trees)
        self.stats["verified_tokens"] += sum(tree.size for tree in trees.values())
        return events

    def _verify_forward(self, trees: dict, hi: int):
        """One forward of every row's tree over the rows ``0..hi-1`` (rows without one: idle), padded to the
        largest tree."""
        b, width = hi, max(tree.size for tree in trees.values())
        device = self.base.device
        sizes = np.zeros(b, dtype=np.int64)
        for r, tree in trees.items():
            sizes[r] = tree.size
        if width == 1:  # plain decoding's step for every row
            ids = torch.zeros(b, 1, dtype=torch.long, device=device)
            for r in trees:
                ids[r, 0] = self.rows[r].root
            return self.base.forward_batch(ids, self.cache, n_new=sizes, rows=slice(0, b), logits_to_keep=None)
        ids = torch.zeros(b, width, dtype=torch.long, device=device)
        positions = torch.from_numpy(self.lengths[:b]).to(device)[:, None].repeat(1, width)
        masks = torch.eye(width, dtype=torch.bool, device=device).repeat(b, 1, 1)
        for r, tree in trees.items():
            n = tree.size
            ids[r, :n] = tree.tokens
            positions[r, :n] += tree.depths
            masks[r, :n, :n] = tree.mask
        return self.base.forward_batch(ids, self.cache, n_new=sizes, rows=slice(0, b), position_ids=positions,
                                       tree_mask=masks, logits_to_keep=None)

    def measure_costs(self) -> None:
        """Measure now (or read from the disk cache) the batched verification cost of every batch size this decoder
        can run, and the draft's cost per row at each, so that no step waits for a measurement (``auto`` tree only;
        a few seconds per size, once)."""
        if self.model is not None and self.model.cost is not None:
            for busy in range(1, self.batch_size + 1):
                self._cost(busy)
                self._draft_cost(busy)

    def _cost(self, busy: int) -> torch.Tensor:
        """Seconds per row to verify ``s`` tokens per row with ``busy`` rows in the batch (measured once per size,
        cached on disk)."""
        if busy not in self.costs:
            self.costs[busy] = batched_verification_cost(self.base, busy)
        return self.costs[busy]

    def _draft_cost(self, busy: int) -> tuple[float | None, float | None]:
        """Seconds per row of the draft's start and of one tree level when ``busy`` rows draft together (measured
        once per size on a batch runner of its own, a few milliseconds); (None, None) without a costed draft."""
        if self.model.draft_costs is None:
            return None, None
        if busy not in self.draft_costs:
            self.draft_costs[busy] = draft_costs(self.model.batch_runner(busy, 0), self.base,
                                                 self.model.dynamic_expand, busy=busy)
        return self.draft_costs[busy]

    def _event(self, r: int, row: _Row, tokens: list[int]) -> RowEvent:
        self.stats["new_tokens"] += len(tokens)
        if not row.tracker.done:
            return RowEvent(row.request.tag, tokens)
        self._free(r)
        self.stats["completions"] += 1
        if row.state is not None and row.state.depth_policy is not None:
            self.learned = row.state.depth_policy
        result = row.tracker.result
        return RowEvent(row.request.tag, tokens, result.finish_reason, result)

    # ---- the loop -----------------------------------------------------------------------------------------------
    def run(self, requests: Iterable[SpeculativeRequest] | Callable[[], SpeculativeRequest | None]
            ) -> Iterator[RowEvent]:
        """Yield every request's events as steps produce them, taking the next request whenever a row is free.

        ``requests``: an iterable, or a function called whenever a row is free that returns the next request or
        None when there is none right now; the run ends when no row is busy and no request comes."""
        if callable(requests):
            source = requests
        else:
            pending = iter(requests)

            def source():
                return next(pending, None)
        while True:
            joining = []
            while self.busy + len(joining) < self.batch_size:
                request = source()
                if request is None:
                    break
                joining.append(request)
            if joining:
                yield from self.add_many(joining)
            if not self.busy:
                return
            yield from self.step()
