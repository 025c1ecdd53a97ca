"""Candidate nodes for a step's tree, scored, from one or several sources, and the tree chosen from them.

* :func:`dynamic_candidates` — a trained draft's candidates grown by joint draft probability (Clover-1's strategy,
  rewritten); :func:`build_dynamic_tree` — the tree of the draft alone from them, within a node budget.
* :class:`Candidates` — scored nodes of one source (a trained draft, prompt lookup, token recycling);
  :func:`select_tree` — the tree of one step from the candidates of several sources, duplicates merged
  (:func:`merge_candidates`), sibling probabilities capped (:func:`cap_siblings`), ranked
  (:func:`rank_candidates`) and sized by the verification cost (:func:`best_size`, which sizes the trees of a
  batch's rows together: they share one padded width).

Everything loops over depths only; everything per node is a tensor operation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from clover.generate.tree import DraftExpander, DraftTree, Expansions, ancestor_rounds, as_tokens, drive
from clover.model.reduce import topk


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


def dynamic_candidates(root_logits: torch.Tensor, draft: DraftExpander, *, max_depth: int, width: int = 8,
                       expand: int = 8, top_p: float = 0.95, min_ratio: float = 0.25) -> "Candidates":
    """Grow candidate nodes by joint draft probability (the original's dynamic mode, written anew: it was unreachable
    there).

    Per depth, every frontier node proposes its top-``width`` children by full-softmax draft probability, truncated
    to the top-``top_p`` nucleus (rank 0 always kept) and to children with at least ``min_ratio`` × the top-1
    probability; a child's score is its log joint probability (sum along the path). The ``expand`` best children
    of the depth become the next frontier (the per-depth budget), up to ``max_depth`` (the number of heads)."""
    return drive(dynamic_candidate_steps(root_logits, draft.vocab, max_depth=max_depth, width=width, expand=expand,
                                         top_p=top_p, min_ratio=min_ratio), draft)


def dynamic_candidate_steps(root_logits: torch.Tensor, vocab: torch.Tensor | None, *, max_depth: int, width: int = 8,
                            expand: int = 8, top_p: float = 0.95,
                            min_ratio: float = 0.25) -> Expansions["Candidates"]:
    """:func:`dynamic_candidates` as a tree builder (see :data:`clover.generate.tree.Expansions`)."""
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
        tok = as_tokens(tok, vocab)
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
        logits = yield best // w, tok.reshape(-1)[best], d
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
    for has, at in ancestor_rounds(parents, max_depth):
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
    for has, at in ancestor_rounds(parents, cands.depth):    # plus every ancestor's
        shift = shift + torch.where(has, shift[at], 0.0)
    return Candidates(cands.tokens, parents, cands.depths, scores - shift, cands.depth)


@dataclass
class RankedCandidates:
    """A step's candidates from every source, merged and capped (:func:`rank_candidates`), in the order a tree takes
    them: ``order[:j]`` is the best tree of ``j`` nodes (closed under parents)."""

    root: torch.Tensor
    cands: Candidates
    origin: torch.Tensor  # [N, sources] bool: which sources proposed each node
    order: torch.Tensor   # [N] node indices, best first, a parent before a child of equal score
    valid: int            # usable nodes (score above -inf), on the host

    def gains(self, limit: int) -> torch.Tensor:
        """``[k + 1]`` for ``k = min(valid, limit)``: the expected tokens of a step whose tree takes the best ``j``
        nodes, ``1 + Σ accept`` (the bonus token and each node's estimated acceptance probability)."""
        k = min(self.valid, limit)
        accept = self.cands.scores[self.order[:k]].exp()
        return torch.cat([torch.zeros(1, device=accept.device, dtype=accept.dtype), accept.cumsum(0)]) + 1

    def tree(self, nodes: int) -> DraftTree:
        """The tree of the root and the best ``nodes`` candidates (fewer when fewer are usable)."""
        cands, device = self.cands, self.root.device
        tok, parent, depth = cands.tokens, cands.parents, cands.depths
        chosen = self.order[:min(nodes, self.valid)]
        chosen = chosen[depth[chosen].argsort(stable=True)]                      # parents before children
        n = chosen.numel() + 1
        position = torch.full((tok.numel() + 1,), -1, dtype=torch.long, device=device)
        position[0] = 0
        position[chosen + 1] = torch.arange(1, n, device=device)                 # candidate index + 1; the root: 0
        zero = torch.zeros(1, dtype=torch.long, device=device)
        tokens = torch.cat([self.root.reshape(1), tok[chosen]])
        parents = torch.cat([zero, position[parent[chosen] + 1]])
        depths = torch.cat([zero, depth[chosen]])
        bits = (self.origin[chosen].long() << torch.arange(self.origin.shape[1], device=device)).sum(-1)
        tree = DraftTree.from_parents(tokens, parents, depths, min(cands.depth, n - 1))  # n - 1 nodes: no deeper
        tree.origin = torch.cat([zero, bits])
        return tree


def rank_candidates(root: torch.Tensor, sources: Sequence[Candidates]) -> RankedCandidates:
    """The candidates of every source for the step after ``root``, duplicates merged (:func:`merge_candidates`), the
    children of each node capped at a total probability of 1 (:func:`cap_siblings`), ranked by score. A child's
    score is below its parent's, so any top-scored set is closed under parents."""
    if len(sources) == 1:
        cands = sources[0]
        origin = torch.ones(cands.size, 1, dtype=torch.bool, device=root.device)
    else:
        cands, origin = merge_candidates(sources)
    cands = cap_siblings(cands)
    order = (cands.scores - 1e-6 * cands.depths).argsort(descending=True)  # a parent before a child of equal score
    valid = int((cands.scores > -torch.inf).sum())  # host sync: the number of usable nodes
    return RankedCandidates(root, cands, origin, order, valid)


def best_size(ranked: Sequence[RankedCandidates | None], cost_per_size: torch.Tensor) -> int:
    """The number of tree nodes per row that maximises the expected tokens per second of one verification forward
    of all the rows, ``Σ_rows (1 + Σ accept) / cost(nodes + 1)``: in a batch every row's tree is padded to the
    widest, so one width serves them all (each row then takes up to that many of its best nodes). ``None`` rows have
    no candidates (a gain of 1 whatever the width); ``cost_per_size[s]`` = seconds (per row) to verify ``s`` tokens.
    For one row this is the size :func:`select_tree` chooses; 0 = a plain step."""
    gains = [r.gains(cost_per_size.numel() - 2) for r in ranked if r is not None]
    if not gains:
        return 0
    width = max(g.numel() for g in gains)
    total = sum(torch.cat([g, g[-1:].expand(width - g.numel())]) for g in gains) + (len(ranked) - len(gains))
    return int((total / cost_per_size[1:width + 1].to(total.device)).argmax())  # host sync: the size


def select_tree(root: torch.Tensor, sources: Sequence[Candidates], *, budget: int | None,
                cost_per_size: torch.Tensor | None = None) -> DraftTree:
    """The tree of one step: the root and the best candidates of every source by score (:func:`rank_candidates`).

    ``budget`` caps the number of nodes; with ``budget=None`` and ``cost_per_size`` (seconds of a verification
    forward of 1..K tokens) the size maximising the expected tokens per second ``(1 + Σ accept) / cost(size)`` is
    chosen (:func:`best_size`), where ``accept`` is each node's estimated acceptance probability: 0 nodes (a plain
    decoding step) when no candidate pays for its verification. The tree's ``origin`` says which sources (bit ``s``
    for ``sources[s]``) proposed each node."""
    ranked = rank_candidates(root, sources)
    return ranked.tree(best_size([ranked], cost_per_size) if budget is None else budget)

