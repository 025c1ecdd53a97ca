"""Draft trees: one object shared by drafting and verification, with explicit parent pointers.

A :class:`DraftTree` is what the base model verifies in one forward pass: node 0 is the root (the token sampled at the
previous step, not yet in the cache), every other node has a parent, a depth and a token. From the parents follow
the tree attention mask (ancestor-or-self), the position offsets (depths) and, per node, its root-to-node path.

Trees come from two builders that share that object:

* :class:`TreeSpec` — a fixed shape given as node paths (tuples of child ranks, ``(0, 2)`` = third-ranked child of the
  top-ranked depth-1 node), e.g. ``mc_sim_7b_63``; drafting picks each node's token as the ``rank``-th most likely
  token of its parent's draft distribution.
* :func:`build_dynamic_tree` — a per-step tree grown by joint probability (Clover-1's strategy, rewritten) within a
  node budget.
* :func:`select_tree` — the tree of one step from the scored :class:`Candidates` of several sources (a trained
  draft, prompt lookup, token recycling), duplicates merged, sized by the verification cost.

Both only loop over depths (≤ number of draft heads); everything per node is a tensor operation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

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
        for has, at in _ancestor_rounds(torch.where(depths > 0, parents, -1), max_depth + 1):
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
        tokens = self.template.tokens.clone()
        tokens[0] = root
        logits = root_logits.reshape(1, -1)
        for d, lvl in enumerate(self.levels, start=1):
            top = as_tokens(topk(logits, lvl["k"])[1], draft.vocab)
            tokens[lvl["nodes"]] = top[lvl["parent_rows"], lvl["ranks"]]
            if d < self.depth and lvl["expanded"].numel():
                logits = draft.expand(lvl["expanded_parent_rows"], tokens[lvl["expanded"]], d)
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


def dynamic_candidates(root_logits: torch.Tensor, draft: DraftExpander, *, max_depth: int, width: int = 8,
                       expand: int = 8, top_p: float = 0.95, min_ratio: float = 0.25) -> "Candidates":
    """Grow candidate nodes by joint draft probability (the original's dynamic mode, written anew: it was unreachable
    there).

    Per depth, every frontier node proposes its top-``width`` children by full-softmax draft probability, truncated
    to the top-``top_p`` nucleus (rank 0 always kept) and to children with at least ``min_ratio`` × the top-1
    probability; a child's score is its log joint probability (sum along the path). The ``expand`` best children
    of the depth become the next frontier (the per-depth budget), up to ``max_depth`` (the number of heads)."""
    device = root_logits.device
    logits = root_logits.reshape(1, -1)
    frontier_score = torch.zeros(1, device=device)       # log joint probability of the frontier nodes
    frontier_id = torch.full((1,), -1, dtype=torch.long, device=device)  # -1: the root
    cand_tok, cand_parent, cand_score, cand_depth = [], [], [], []
    n_seen = 0  # candidate ids in order of creation
    for d in range(1, max_depth + 1):
        logits = logits.float()
        best, tok = topk(logits, width)                                          # [R, W]
        probs = (best - logits.logsumexp(-1, keepdim=True)).exp()               # their softmax probabilities
        tok = as_tokens(tok, draft.vocab)
        keep = (probs.cumsum(-1) <= top_p) & (probs >= min_ratio * probs[:, :1])
        keep[:, 0] = True
        score = torch.where(keep & (frontier_score[:, None] > -torch.inf),
                            frontier_score[:, None] + probs.log() - 1e-4, -torch.inf)  # -1e-4: child < parent
        r, w = score.shape
        cand_tok.append(tok.reshape(-1))
        cand_parent.append(frontier_id[:, None].expand(r, w).reshape(-1))
        cand_score.append(score.reshape(-1))
        cand_depth.append(torch.full((r * w,), d, device=device))
        if d == max_depth:
            break
        best_score, best = score.reshape(-1).topk(min(expand, r * w))
        frontier_score, frontier_id = best_score, n_seen + best
        logits = draft.expand(best // w, tok.reshape(-1)[best], d)
        n_seen += r * w
    return Candidates(*(torch.cat(x) for x in (cand_tok, cand_parent, cand_depth, cand_score)), max_depth)


def build_dynamic_tree(root: torch.Tensor, root_logits: torch.Tensor, draft: DraftExpander, *, max_depth: int,
                       budget: int | None, width: int = 8, expand: int = 8, top_p: float = 0.95,
                       min_ratio: float = 0.25, cost_per_size: torch.Tensor | None = None) -> DraftTree:
    """A per-step tree from the draft alone: :func:`dynamic_candidates`, then the ``budget`` best of them by joint
    probability (or, with ``budget=None``, the size that :func:`select_tree` finds best for ``cost_per_size``)."""
    candidates = dynamic_candidates(root_logits, draft, max_depth=max_depth, width=width, expand=expand,
                                    top_p=top_p, min_ratio=min_ratio)
    return select_tree(root, [candidates], budget=budget, cost_per_size=cost_per_size)


# ---- candidates from several sources, one tree ------------------------------------------------------------------
@dataclass
class Candidates:
    """Nodes proposed for the tree of one step by one source (a trained draft, prompt lookup, token recycling).

    ``parents`` index into the same set (-1: the root), a parent listed before its children; ``scores`` are the log
    of the source's estimate that the node is accepted (the path from the root matches the base model), each
    strictly below its parent's; -inf marks a node that must not be used. ``depth`` bounds ``depths`` on the host
    (the source knows how deep it proposed), so that merging and sizing loop only over depths that occur."""

    tokens: torch.Tensor   # [N] token ids
    parents: torch.Tensor  # [N] index of the parent in this set, -1 = the root
    depths: torch.Tensor   # [N] depth (1 = a child of the root)
    scores: torch.Tensor   # [N] log estimated acceptance probability
    depth: int             # no node is deeper than this

    @classmethod
    def chains(cls, chains: Sequence[Sequence[int]], log_probs: Sequence[Sequence[float]],
               device) -> "Candidates":
        """Candidates from host lists: each chain a list of tokens after the root, with the log acceptance
        probability of each of its nodes (the product along the path, already accumulated). Chains that share a
        prefix share its nodes (each with the best of their scores): one node per path."""
        tokens, parents, depths, scores = [], [], [], []
        node_of: dict[tuple[int, ...], int] = {}
        for chain, logp in zip(chains, log_probs):
            for d, (tok, lp) in enumerate(zip(chain, logp)):
                path = tuple(chain[:d + 1])
                if path in node_of:
                    scores[node_of[path]] = max(scores[node_of[path]], lp)
                    continue
                node_of[path] = len(tokens)
                parents.append(-1 if d == 0 else node_of[path[:-1]])
                tokens.append(tok)
                depths.append(d + 1)
                scores.append(lp)
        return cls(torch.tensor(tokens, dtype=torch.long, device=device),
                   torch.tensor(parents, dtype=torch.long, device=device),
                   torch.tensor(depths, dtype=torch.long, device=device),
                   torch.tensor(scores, dtype=torch.float32, device=device), max(depths, default=0))

    @property
    def size(self) -> int:
        return self.tokens.numel()

    def top(self, k: int) -> "Candidates":
        """The ``k`` best-scored nodes (a set closed under parents, as a child scores below its parent), parents
        re-indexed; the set itself when it has at most ``k`` nodes."""
        if self.size <= k:
            return self
        chosen = self.scores.topk(k).indices
        chosen = chosen[self.depths[chosen].argsort(stable=True)]
        position = torch.full((self.size + 1,), -1, dtype=torch.long, device=self.tokens.device)
        position[chosen + 1] = torch.arange(k, device=self.tokens.device)
        return Candidates(self.tokens[chosen], position[self.parents[chosen] + 1], self.depths[chosen],
                          self.scores[chosen], self.depth)


def _ancestor_rounds(parents: torch.Tensor, max_depth: int):
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


def merge_candidates(sources: Sequence[Candidates]) -> tuple[Candidates, torch.Tensor]:
    """One candidate set from several: nodes with the same path from the root (token by token) are one node, with the
    best of their scores. Returns the merged set (duplicates kept in place with score -inf, so that no size depends
    on the data) and ``origin [N, S]``: which sources proposed each node."""
    device = sources[0].tokens.device
    max_depth = max(c.depth for c in sources)
    starts = torch.tensor([sum(c.size for c in sources[:i]) for i in range(len(sources))], device=device)
    rows = torch.arange(sum(c.size for c in sources), device=device)
    source = (rows[:, None] >= starts[1:]).sum(-1)                             # which source proposed each node
    offsets = starts[source]
    tokens = torch.cat([c.tokens for c in sources])
    parents = torch.cat([c.parents for c in sources])
    parents = torch.where(parents >= 0, parents + offsets, -1)
    depths = torch.cat([c.depths for c in sources])  # each at most max_depth
    scores = torch.cat([c.scores.float() for c in sources])
    n = tokens.numel()
    # a number per node, equal for two nodes exactly when their token paths from the root are: (token, depth), then,
    # doubling the span each round, (own number, the number of the ancestor a span above), renumbered densely
    key = torch.unique(tokens * (max_depth + 1) + depths, return_inverse=True)[1]
    for has, at in _ancestor_rounds(parents, max_depth):
        key = torch.unique(key * (n + 1) + torch.where(has, key[at], -1) + 1, return_inverse=True)[1]
    first = torch.full((n,), n, device=device).scatter_reduce_(0, key, rows, "amin")[key]  # the group's first node
    best = torch.full((n,), -torch.inf, device=device).scatter_reduce_(0, key, scores, "amax")[key]
    origin = torch.zeros(n, len(sources), dtype=torch.bool, device=device).index_put_((key, source),
                                                                                      torch.tensor(True))[key]
    keep = first == rows
    merged = Candidates(tokens, torch.where(parents >= 0, first[parents.clamp(min=0)], -1), depths,
                        torch.where(keep, best, -torch.inf), max_depth)
    return merged, origin


def cap_siblings(cands: Candidates) -> Candidates:
    """The candidates with the children of every node made a distribution: a node's chance of being accepted given
    its parent is ``exp(score - parent's score)``, and at most one child of a node can match the base model, so where
    a node's children claim more than 1 in total (chains of one source that diverge, or two sources that disagree),
    they are scaled down to sum to 1, and so is everything below them. Children that sum to at most 1 (a softmax's
    top tokens, the ranks of a table row) are left as they are."""
    scores, parents = cands.scores, cands.parents
    usable = scores > -torch.inf
    parent_score = torch.where(parents >= 0, scores[parents.clamp(min=0)], torch.zeros_like(scores))
    cond = torch.where(usable, (scores - torch.where(usable, parent_score, 0)).exp(), torch.zeros_like(scores))
    total = torch.zeros(cands.size + 1, dtype=cond.dtype, device=cond.device).index_add_(0, parents + 1, cond)
    shift = total.clamp(min=1).log()[parents + 1]             # log excess of the node's own sibling group
    for has, at in _ancestor_rounds(parents, cands.depth):    # plus every ancestor's
        shift = shift + torch.where(has, shift[at], 0.0)
    return Candidates(cands.tokens, parents, cands.depths, scores - shift, cands.depth)


def select_tree(root: torch.Tensor, sources: Sequence[Candidates], *, budget: int | None,
                cost_per_size: torch.Tensor | None = None) -> DraftTree:
    """The tree of one step: the root and the best candidates of every source by score, duplicates merged, the
    children of each node capped at a total probability of 1 (:func:`cap_siblings`).

    ``budget`` caps the number of nodes; with ``budget=None`` and ``cost_per_size`` (seconds of a verification
    forward of 1..K tokens) the size maximising the expected tokens per second ``(1 + Σ accept) / cost(size)`` is
    chosen, where ``accept`` is each node's estimated acceptance probability: 0 nodes (a plain decoding step) when
    no candidate pays for its verification. A child's score is below its parent's, so any top-scored set is closed
    under parents. The tree's ``origin`` says which sources (bit ``s`` for ``sources[s]``) proposed each node."""
    device = root.device
    if len(sources) == 1:
        cands = sources[0]
        origin = torch.ones(cands.size, 1, dtype=torch.bool, device=device)
    else:
        cands, origin = merge_candidates(sources)
    cands = cap_siblings(cands)
    tok, parent, depth, score = cands.tokens, cands.parents, cands.depths, cands.scores
    order = (score - 1e-6 * depth).argsort(descending=True)  # a parent before a child of equal score
    valid = int((score > -torch.inf).sum())  # host sync: the number of usable nodes
    if budget is None:  # cost_per_size[s] = seconds to verify s tokens; a tree of j nodes has j + 1 tokens
        limit = min(valid, cost_per_size.numel() - 2)
        gain = torch.cat([torch.zeros(1, device=device), score[order[:limit]].exp().cumsum(0)]) + 1
        budget = int((gain / cost_per_size[1:limit + 2].to(device)).argmax())  # host sync: the size
    chosen = order[:min(budget, valid)]
    chosen = chosen[depth[chosen].argsort(stable=True)]                      # parents before children
    n = chosen.numel() + 1
    position = torch.full((tok.numel() + 1,), -1, dtype=torch.long, device=device)
    position[0] = 0
    position[chosen + 1] = torch.arange(1, n, device=device)                 # candidate index + 1; the root: 0
    zero = torch.zeros(1, dtype=torch.long, device=device)
    tokens = torch.cat([root.reshape(1), tok[chosen]])
    parents = torch.cat([zero, position[parent[chosen] + 1]])
    depths = torch.cat([zero, depth[chosen]])
    bits = (origin[chosen].long() << torch.arange(origin.shape[1], device=device)).sum(-1)
    tree = DraftTree.from_parents(tokens, parents, depths, min(cands.depth, n - 1))  # n - 1 nodes: no deeper
    tree.origin = torch.cat([zero, bits])
    return tree

