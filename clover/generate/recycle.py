"""Token recycling: a table of the base model's own most likely next tokens, no checkpoint needed.

Every verification computes the base model's distribution at every tree node, and most of it is thrown away. Token
recycling (Luo et al., 2024) keeps, for each token ``t``, the ``k`` most likely tokens the base model predicted after
the last context that ended with ``t`` (at the prefill, every prompt position; after each verification, every
verified node, accepted or not). A step's candidates grow from the root through the table: the root's row gives its
children, their rows the grandchildren, and so on, keeping the best few nodes per depth. The table (``V × k`` token
ids, 1.5 MB for SmolLM2 at ``k = 4``) belongs to the loaded model and outlives requests, so it warms up over a
session.

A node's score is the product along its path of per-rank rates: how often the base model's token after ``t`` turned
out to be the table's rank-``r`` entry for ``t``, counted at every verified node before its row is refreshed.
Everything per step is a handful of tensor operations; nothing leaves the device.
"""
from __future__ import annotations

import torch

from clover.generate.candidates import Candidates
from clover.model.reduce import topk


class TokenRecycling:
    """The ``recycle`` source: :meth:`begin` per request, :meth:`propose` per step, :meth:`observe` after it."""

    name = "recycle"
    label = "token recycling"
    shared = True  # one table for every sequence a model decodes, batched rows included (it holds no request state)

    def __init__(self, vocab_size: int, device, k: int = 4, width: int = 4, expand: int = 4, depth: int = 6,
                 prompt_rows: int = 1024, prior_weight: float = 4.0, decay: float = 0.995):
        device = torch.device(device)
        self.k, self.width, self.expand, self.depth = k, min(width, k), expand, depth
        self.prompt_rows, self.decay = prompt_rows, decay
        self.table = torch.zeros(vocab_size, k, dtype=torch.long, device=device)
        self.row_log = torch.full((vocab_size, 1), -torch.inf, device=device)  # 0 where the row is filled, else -inf
        # what every proposal shares (its sizes do not depend on the data): each node's depth and, for the nodes a
        # depth expands, the id of that depth's first node (a child's parent is that id plus the expanded node's rank)
        sizes, rows = [], 1
        for _ in range(depth):
            sizes.append(rows * self.width)
            rows = min(expand, sizes[-1])
        starts = [sum(sizes[:d]) for d in range(depth)]
        self.node_depths = torch.repeat_interleave(torch.arange(1, depth + 1), torch.tensor(sizes)).to(device)
        self.expanded_offset = torch.repeat_interleave(torch.tensor(starts[:-1]),
                                                       torch.tensor(sizes[1:]) // self.width).to(device)
        rank = torch.arange(k, dtype=torch.float32, device=device)
        self.trials = torch.full((), prior_weight, device=device)
        self.hits = prior_weight * 0.3 / (rank + 1)  # prior: rank r right 0.3 / (r + 1) of the time

    @torch.inference_mode()
    def refresh(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """Rows ``tokens [n]`` of the table become the top-``k`` of ``logits [n, V]`` (the base model after them)."""
        self.table[tokens] = topk(logits, self.k)[1]
        self.row_log[tokens] = 0.0

    @torch.inference_mode()
    def begin(self, prompt: list[int], root: int, base, out) -> None:
        """A new request: fill the rows of the prompt's last ``prompt_rows`` tokens from the prefill's hidden
        states (the LM head on them, a chunk at a time)."""
        hidden = out.hidden[0, -self.prompt_rows:]
        ids = torch.tensor(prompt[-hidden.shape[0]:], dtype=torch.long, device=hidden.device)
        for h, t in zip(hidden.split(256), ids.split(256)):
            self.refresh(t, base.logits_head(h, base.lm_head.weight))

    @torch.inference_mode()
    def propose(self, root: torch.Tensor) -> Candidates:
        """Grow the candidates from the root through the table: ``width`` children per node, the ``expand`` best
        nodes of a depth expanded in turn."""
        log_rate = (self.hits[:self.width] / self.trials).clamp(max=1 - 1e-6).log()
        front_tok, front_score = root.reshape(1), torch.zeros(1, 1, device=root.device)
        toks, scores, expanded = [], [], []
        for d in range(1, self.depth + 1):
            tok = self.table[front_tok, :self.width]                                   # [R, W]
            score = front_score + self.row_log[front_tok] + log_rate                   # -inf below an empty row
            toks.append(tok.reshape(-1))
            scores.append(score.reshape(-1))
            if d < self.depth:
                best_score, best = scores[-1].topk(min(self.expand, scores[-1].numel()))
                expanded.append(best)
                front_tok, front_score = toks[-1][best], best_score[:, None]
        parents = torch.full((self.width,), -1, dtype=torch.long, device=root.device)    # the root's children
        if expanded:
            below = (torch.cat(expanded) + self.expanded_offset).repeat_interleave(self.width)
            parents = torch.cat([parents, below])
        return Candidates(torch.cat(toks), parents, self.node_depths, torch.cat(scores), self.depth)

    def observe(self, tree, verdict, logits: torch.Tensor) -> None:
        """Learn from every node of a verified tree (accepted and rejected alike)."""
        self.observe_nodes(tree.tokens, verdict.targets, logits)

    @torch.inference_mode()
    def observe_nodes(self, tokens: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor) -> None:
        """Verified nodes ``tokens [n]`` (of one tree, or the roots of many sequences' plain steps), the base model's
        token ``targets [n]`` after each and its ``logits [n, V]`` there: count which rank of each node's row held
        the target, then refresh the rows from the logits."""
        known = self.row_log[tokens, 0] == 0
        hit = (self.table[tokens] == targets[:, None]) & known[:, None]
        self.hits.mul_(self.decay).add_(hit.sum(0))
        self.trials.mul_(self.decay).add_(known.sum())
        self.refresh(tokens, logits)
