"""Draft trees: one object shared by drafting and verification, with explicit parent pointers.

A :class:`DraftTree` is what the base model verifies in one forward pass: node 0 is the root (the token sampled at the
previous step, not yet in the cache), every other node has a parent, a depth and a token. From the parents follow
the tree attention mask (ancestor-or-self), the position offsets (depths) and, per node, its root-to-node path.

A fixed shape is a :class:`TreeSpec`: node paths (tuples of child ranks, ``(0, 2)`` = third-ranked child of the
top-ranked depth-1 node), e.g. ``mc_sim_7b_63``; drafting picks each node's token as the ``rank``-th most likely token
of its parent's draft distribution. Per-step trees grown by joint probability and trees merged from several sources
are :mod:`clover.generate.candidates`.

Tree builders are generators of expansion requests (:data:`Expansions`): each depth they yield the nodes whose
children they need, receive the draft's logits for them, and finally return what they built. :func:`drive` runs one
builder against one draft; the batched decoder runs the builders of all its rows in step, one draft call per depth
for all of them. Builders loop over depths only (≤ number of draft heads); everything per node is a tensor
operation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Generator, Protocol, Sequence, TypeVar

import torch

from clover.errors import CloverError
from clover.model.reduce import topk

# The 25-node tree of Medusa/EAGLE-1/Clover-2 experiments (26 verified positions with the root, depth 5).
MC_SIM_7B_63 = (
    (0,), (1,), (2,), (3,),
    (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0),
    (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (1, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 0, 2),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1),
)
NAMED_TREES = {"mc_sim_7b_63": MC_SIM_7B_63, "chain5": tuple((0,) * d for d in range(1, 6))}


class DraftExpander(Protocol):
    """What a tree builder needs from a draft: logits for the children of a batch of nodes, over the draft's
    vocabulary (column ``j`` is token ``vocab[j]``; ``vocab`` None = the whole vocabulary)."""

    vocab: torch.Tensor | None

    def expand(self, parent_rows: torch.Tensor, tokens: torch.Tensor, depth: int) -> torch.Tensor:
        """Logits ``[R, V]`` for the children of R nodes at ``depth`` whose tokens are ``tokens`` and whose parents
        are rows ``parent_rows`` of the previous call (or of the root, for depth 1)."""


# A tree builder: yields ``(parent_rows, tokens, depth)`` (see :meth:`DraftExpander.expand`), is sent the logits
# ``[R, V]`` for those nodes' children, and returns its result.
Result = TypeVar("Result")
Expansions = Generator[tuple[torch.Tensor, torch.Tensor, int], torch.Tensor, Result]


def drive(builder: Expansions[Result], draft: DraftExpander) -> Result:
    """Run a tree builder against one draft: each of its expansion requests answered by ``draft.expand``."""
    try:
        request = next(builder)
        while True:
            request = builder.send(draft.expand(*request))
    except StopIteration as done:
        return done.value


def drive_together(builders: Sequence[Expansions], expand) -> list:
    """Run several tree builders in step: each round, the requests of every builder not yet done are answered by one
    call ``expand(which, requests)`` (``which``: the builders' indices; returns one answer per request). Returns the
    builders' results, in order."""
    results: list = [None] * len(builders)
    requests: dict[int, tuple] = {}

    def advance(i: int, answer) -> None:
        try:
            requests[i] = builders[i].send(answer)
        except StopIteration as done:
            results[i] = done.value

    for i in range(len(builders)):
        advance(i, None)
    while requests:
        asked, requests = requests, {}
        for i, answer in zip(asked, expand(list(asked), list(asked.values()))):
            advance(i, answer)
    return results


@dataclass
class DraftTree:
    tokens: torch.Tensor   # [n+1] token ids, root first
    parents: torch.Tensor  # [n+1] parent node index (the root points to itself)
    depths: torch.Tensor   # [n+1] depth (root 0) = position offset from the root
    mask: torch.Tensor     # [n+1, n+1] bool, True where column is an ancestor of (or is) the row
    paths: torch.Tensor    # [n+1, D+1] node indices root..node, -1 padded
    origin: torch.Tensor | None = None  # [n+1] bit s set: source s of the step proposed the node (root: 0)

    @property
    def size(self) -> int:
        return self.tokens.numel()

    @classmethod
    def single(cls, root: torch.Tensor) -> "DraftTree":
        """The tree of a plain decoding step: the root token alone."""
        zero = torch.zeros(1, dtype=torch.long, device=root.device)
        return cls.from_parents(root.reshape(1), zero, zero, 0)

    @classmethod
    def from_parents(cls, tokens: torch.Tensor, parents: torch.Tensor, depths: torch.Tensor,
                     max_depth: int) -> "DraftTree":
        """Derive mask and paths from parent pointers (nodes in any order; loops over depth only)."""
        n = tokens.numel()
        rows = torch.arange(n, device=tokens.device)
        paths = torch.full((n, max_depth + 1), -1, dtype=torch.long, device=tokens.device)
        paths[rows, depths] = rows
        # each round copies in the path entries of the ancestor a span above (the root's parent is itself: stop there)
        for has, at in ancestor_rounds(torch.where(depths > 0, parents, -1), max_depth + 1):
            paths = torch.where((paths < 0) & has[:, None], paths[at], paths)
        mask = torch.zeros(n, n + 1, dtype=torch.bool, device=tokens.device)
        mask.scatter_(1, torch.where(paths >= 0, paths, n), True)
        return cls(tokens, parents, depths, mask[:, :n], paths)


class TreeSpec:
    """A fixed tree shape from node paths; validated (unique nodes, parents present, depth ≤ ``num_heads``)."""

    def __init__(self, paths: Sequence[Sequence[int]] | str, num_heads: int | None = None):
        if isinstance(paths, str):
            if paths not in NAMED_TREES:
                raise CloverError(f"unknown tree {paths!r}; named trees: {', '.join(NAMED_TREES)} "
                                  f"(or pass a list of node paths)")
            paths = NAMED_TREES[paths]
        nodes = [tuple(int(r) for r in p) for p in paths]
        if not nodes:
            raise CloverError("a tree needs at least one node")
        seen = set()
        for p in nodes:
            if not p or min(p) < 0:
                raise CloverError(f"invalid tree node {p}: a node is a non-empty tuple of ranks >= 0")
            if p in seen:
                raise CloverError(f"duplicate tree node {p}")
            seen.add(p)
        for p in nodes:
            if len(p) > 1 and p[:-1] not in seen:
                raise CloverError(f"tree node {p} has no parent {p[:-1]} in the tree")
        self.depth = max(len(p) for p in nodes)
        if num_heads is not None and self.depth > num_heads:
            raise CloverError(f"tree depth {self.depth} exceeds the draft's {num_heads} heads")
        self.nodes = sorted(nodes, key=lambda p: (len(p), p))
        index = {p: i + 1 for i, p in enumerate(self.nodes)}
        index[()] = 0
        n = len(self.nodes) + 1
        parents = [0] + [index[p[:-1]] for p in self.nodes]
        depths = [0] + [len(p) for p in self.nodes]
        self.ranks = torch.tensor([0] + [p[-1] for p in self.nodes])
        self.template = DraftTree.from_parents(torch.zeros(n, dtype=torch.long), torch.tensor(parents),
                                               torch.tensor(depths), self.depth)
        # Per depth d (1..D): the nodes at depth d, the row of their parent among the expanded nodes of depth d-1,
        # and which nodes of depth d are expanded (have children) in turn.
        has_children = set(parents[1:])
        self.levels = []
        prev_rows = {0: 0}
        for d in range(1, self.depth + 1):
            at_d = [i for i in range(1, n) if depths[i] == d]
            expanded = [i for i in at_d if i in has_children]
            self.levels.append({
                "nodes": torch.tensor(at_d),
                "parent_rows": torch.tensor([prev_rows[parents[i]] for i in at_d]),
                "ranks": self.ranks[at_d],
                "k": max(int(self.ranks[i]) for i in at_d) + 1,
                "expanded": torch.tensor(expanded, dtype=torch.long),
                "expanded_parent_rows": torch.tensor([prev_rows[parents[i]] for i in expanded], dtype=torch.long),
            })
            prev_rows = {node: row for row, node in enumerate(expanded)}

    @property
    def size(self) -> int:
        return len(self.nodes) + 1

    def to(self, device) -> "TreeSpec":
        t = self.template
        self.template = DraftTree(*(x.to(device) for x in (t.tokens, t.parents, t.depths, t.mask, t.paths)))
        self.levels = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in lvl.items()}
                       for lvl in self.levels]
        return self

    def build(self, root: torch.Tensor, root_logits: torch.Tensor, draft: DraftExpander) -> DraftTree:
        """Fill the shape with tokens: each node takes the ``rank``-th best token of its parent's draft logits."""
        return drive(self.build_steps(root, root_logits, draft.vocab), draft)

    def build_steps(self, root: torch.Tensor, root_logits: torch.Tensor,
                    vocab: torch.Tensor | None) -> Expansions[DraftTree]:
        """:meth:`build` as a tree builder (see :data:`Expansions`)."""
        tokens = self.template.tokens.clone()
        tokens[0] = root
        logits = root_logits.reshape(1, -1)
        for d, lvl in enumerate(self.levels, start=1):
            top = as_tokens(topk(logits, lvl["k"])[1], vocab)
            tokens[lvl["nodes"]] = top[lvl["parent_rows"], lvl["ranks"]]
            if d < self.depth and lvl["expanded"].numel():
                logits = yield lvl["expanded_parent_rows"], tokens[lvl["expanded"]], d
        t = self.template
        return DraftTree(tokens, t.parents, t.depths, t.mask, t.paths)

    def reference_buffers(self, topk: int = 10) -> dict:
        """The original code's index buffers (tree and retrieve indices, position ids, the draft side's indices and
        repeat counts), derived from explicit parent rows; used to check this implementation against the published
        numbers for ``mc_sim_7b_63``."""
        pool_row = {}  # node index -> its row in the candidate pool (expanded nodes in sorted order; root row 0)
        row = 0
        pool_row[0] = 0
        parents = self.template.parents.tolist()
        for lvl in self.levels:
            for node in lvl["expanded"].tolist():
                row += 1
                pool_row[node] = row
        tree_indices = [0] + [1 + topk * pool_row[parents[i]] + int(self.ranks[i]) for i in range(1, self.size)]
        leaves = [i for i in range(self.size) if i not in set(parents[1:])]
        paths = self.template.paths
        retrieve = sorted((paths[i].tolist() for i in leaves),
                          key=lambda r: [x if x >= 0 else float("inf") for x in r])
        draft_indices, repeat_nums = [], []
        for d, lvl in enumerate(self.levels[:-1], start=1):
            exp = lvl["expanded"].tolist()
            groups = [parents[i] for i in exp]
            order = list(dict.fromkeys(groups))
            draft_indices.append([int(self.ranks[i]) + topk * order.index(parents[i]) for i in exp])
            repeat_nums.append([groups.count(g) for g in order])
        return {"tree_indices": tree_indices, "tree_position_ids": self.template.depths.tolist(),
                "retrieve_indices": retrieve, "draft_tree_indices": draft_indices, "repeat_nums": repeat_nums}


def as_tokens(columns: torch.Tensor, vocab: torch.Tensor | None) -> torch.Tensor:
    """Token ids of draft-logit columns."""
    return columns if vocab is None else vocab[columns]


def ancestor_rounds(parents: torch.Tensor, max_depth: int):
    """Pointer doubling over parent pointers (-1: none): round ``r`` yields ``(has, at)``, where ``at[i]`` is node
    ``i``'s ancestor ``2**r`` levels up wherever ``has[i]``. A value folded in each round as ``value + value[at]``
    (where ``has``) ends as the sum over the node and all its ancestors, after ``ceil(log2(max_depth))`` rounds for
    paths of at most ``max_depth`` nodes."""
    up, span = parents, 1
    while span < max_depth:
        has = up >= 0
        at = up.clamp(min=0)
        yield has, at
        up = torch.where(has, up[at], -1)
        span *= 2


