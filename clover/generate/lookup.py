"""Prompt/suffix lookup: candidates copied from earlier in the context, no checkpoint needed.

Text often repeats what came before it (a summary quotes its document, code reuses its names, a translation keeps
the numbers). At every step the longest suffix of the context (prompt, everything generated, the root) that
occurred earlier is found through an n-gram index, and the tokens that followed each of its most recent occurrences
are proposed as chains, longest match first. The index grows with each committed token; nothing is rescanned.

Each chain node's score is the estimated probability that the base model produces it: a per-"match length" rate
observed on this model's own verifications (how often the token after a match of ``e`` tokens was right), multiplied
along the chain, where a node ``j`` deep into a chain after a match of ``m`` tokens counts as a match of ``m + j - 1``
(had its chain parents been right). The tree builder then weighs these against the other sources and the cost of
verifying them, so a chain grows with the match behind it.
"""
from __future__ import annotations

import math

import torch

from clover.generate.candidates import Candidates


class PromptLookup:
    """The ``lookup`` source: :meth:`begin` per request, :meth:`propose` per step, :meth:`observe` after it."""

    name = "lookup"
    label = "prompt lookup"
    shared = False  # per sequence: it indexes the request's own text (batched rows each get a copy)

    def __init__(self, device, ngram: int = 3, branches: int = 3, max_tokens: int = 10, scan: int = 8,
                 max_match: int = 32, max_rate_index: int = 16, prior_weight: float = 2.0, decay: float = 0.995):
        self.device = torch.device(device)
        self.ngram, self.branches, self.max_tokens, self.scan = ngram, branches, max_tokens, scan
        self.max_match, self.decay = max_match, decay
        # hits / trials per effective match length e = 1..max_rate_index (index 0 unused), with a prior e / (e + 2)
        e = torch.arange(max_rate_index + 1, dtype=torch.float64).clamp(min=1)
        self.hits = (prior_weight * e / (e + 2)).tolist()
        self.trials = [prior_weight] * (max_rate_index + 1)
        self.seq: list[int] = []
        self.index: dict[tuple[int, ...], list[int]] = {}
        self.proposed: list[tuple[int, tuple[int, ...]]] = []

    def begin(self, prompt: list[int], root: int, base=None, out=None) -> None:
        """A new request: the prompt's tokens and the first generated token (the root of the first tree)."""
        self.seq, self.index, self.proposed = [], {}, []
        self._extend(list(prompt) + [root])

    def _extend(self, tokens: list[int]) -> None:
        """Append committed tokens; index every n-gram that now has a successor (ends before the last token)."""
        seq, index = self.seq, self.index
        first = max(len(seq) - 1, 0)
        seq.extend(tokens)
        for end in range(first, len(seq) - 1):
            for n in range(1, min(self.ngram, end + 1) + 1):
                index.setdefault(tuple(seq[end - n + 1:end + 1]), []).append(end)

    def rate(self, e: int) -> float:
        e = min(e, len(self.hits) - 1)
        return self.hits[e] / self.trials[e]

    def chains(self) -> list[tuple[int, tuple[int, ...]]]:
        """``(match length, continuation)`` for up to ``branches`` distinct continuations of the context's longest
        earlier suffix matches, longest match first, then most recent."""
        seq, last = self.seq, len(self.seq) - 1
        found, seen = [], set()
        for n in range(min(self.ngram, last), 0, -1):
            for end in reversed(self.index.get(tuple(seq[last - n + 1:]), ())[-self.scan:]):
                if end in seen:
                    continue
                seen.add(end)
                m = n
                while m < self.max_match and end - m >= 0 and seq[end - m] == seq[last - m]:
                    m += 1
                found.append((m, end))
            if len(found) >= self.branches:
                break
        found.sort(key=lambda f: (-f[0], -f[1]))
        chains, conts = [], set()
        for m, end in found:
            cont = tuple(seq[end + 1:end + 1 + self.max_tokens])
            if cont and cont not in conts:
                conts.add(cont)
                chains.append((m, cont))
                if len(chains) == self.branches:
                    break
        return chains

    def propose(self, root: torch.Tensor) -> Candidates:
        """Chains after the root (the context's last token), scored by the observed rates."""
        self.proposed = self.chains()
        scores = []
        for m, cont in self.proposed:
            total, logp = 0.0, []
            for j in range(len(cont)):
                total += math.log(self.rate(m + j))
                logp.append(total)
            scores.append(logp)
        return Candidates.chains([c for _, c in self.proposed], scores, self.device)

    def observe(self, tree, verdict, logits=None) -> None:
        """Learn from the step's committed tokens how far each proposed chain was right, then index them."""
        committed = verdict.committed
        for d in range(len(self.hits)):
            self.hits[d] *= self.decay
            self.trials[d] *= self.decay
        for m, cont in self.proposed:
            for j, tok in enumerate(cont[:len(committed)]):
                e = min(m + j, len(self.hits) - 1)
                self.trials[e] += 1.0
                if tok != committed[j]:
                    break
                self.hits[e] += 1.0
        self.proposed = []  # counted once: a later step that proposes nothing (a plain step) has no chains
        self._extend(committed)
