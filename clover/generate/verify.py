"""Tree verification, lossless for greedy and sampled decoding.

Every tree node gets one target token from the base model's (processed) distribution at that node: the argmax when
greedy, an independent draw otherwise. A node is accepted when its token equals its parent's target and its parent
is accepted; the bonus token is the target of the deepest accepted node.

For sampling this is exactly the original's recursive rejection sampling over siblings for a draft that proposes its
children deterministically (point-mass proposals, as the tree builders do): accepting the first sibling ``x`` with
probability ``p(x)``, else moving on with the residual ``p`` without ``x`` renormalised, accepts sibling ``x`` with
overall probability ``p(x)`` and otherwise ends with a token drawn from ``p`` restricted to the non-siblings — the
same law as drawing ``y ~ p`` once and accepting the sibling equal to ``y``. Each committed token is therefore a
sample of the base distribution given its prefix, and the same processing (temperature, top-k, top-p) is applied
at every node, bonus token included.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from clover.generate.sampling import SamplingParams, select_tokens
from clover.generate.tree import DraftTree


@dataclass
class Verdict:
    nodes: torch.Tensor   # [a+1] tree node indices of the root and the accepted draft tokens, root first
    tokens: torch.Tensor  # [a+1] their token ids
    bonus: torch.Tensor   # () the next root, drawn from the base distribution after the last accepted node
    accepted: int         # a = number of accepted draft tokens
    committed: list[int]  # the step's new tokens on the host: the accepted draft tokens, then the bonus token
    targets: torch.Tensor  # [n+1] the base model's token at every tree node (what its children had to be)
    origins: list[int]    # [a] the tree's origin bits of the accepted draft tokens (empty without origins)


def verify_tree(tree: DraftTree, logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> Verdict:
    """``logits [n+1, V]``: the base model's logits at every tree node (from one tree-masked forward)."""
    return accept_path(tree, select_tokens(logits, params, generator))


def verify_rows(trees: dict[int, DraftTree], logits: torch.Tensor, params: dict[int, SamplingParams],
                generators: dict[int, torch.Generator | None]) -> dict[int, Verdict]:
    """The verdict of every row of a batched verification: ``trees`` and ``params`` / ``generators`` by row,
    ``logits [R, T, V]`` by row and node. A tree of several nodes is verified alone (:func:`verify_tree`); the rows
    of a plain step (the root alone) share one selection for all greedy rows and one host read for all of them."""
    verdicts = {r: verify_tree(tree, logits[r, :tree.size], params[r], generators[r])
                for r, tree in trees.items() if tree.size > 1}
    singles = [r for r, tree in trees.items() if tree.size == 1]
    if not singles:
        return verdicts
    targets = {}
    greedy = [r for r in singles if params[r].greedy]
    if greedy:
        picked = select_tokens(logits[torch.tensor(greedy, device=logits.device), 0], SamplingParams())
        targets = {r: picked[j:j + 1] for j, r in enumerate(greedy)}
    for r in singles:
        if r not in targets:
            targets[r] = select_tokens(logits[r, :1], params[r], generators[r])
    host = torch.cat([targets[r] for r in singles]).tolist()  # one read for every plain row
    zero = torch.zeros(1, dtype=torch.long, device=logits.device)
    for r, token in zip(singles, host):
        verdicts[r] = Verdict(nodes=zero, tokens=trees[r].tokens[:1], bonus=targets[r][0], accepted=0,
                              committed=[token], targets=targets[r], origins=[])
    return verdicts


def accept_path(tree: DraftTree, targets: torch.Tensor) -> Verdict:
    """The verdict on ``tree`` given the base model's token ``targets [n+1]`` at every node: the deepest node whose
    path from the root matches its parents' targets, and the bonus token after it."""
    matches = tree.tokens == targets[tree.parents]
    matches[0] = True
    on_path = torch.where(tree.paths >= 0, matches[tree.paths.clamp(min=0)], True).all(-1)
    best = torch.argmax(on_path * (tree.depths + 1)).view(1)  # index_select below: a tensor index would sync
    path = tree.paths.index_select(0, best)[0]  # [D+1] root first, -1 past the node's depth
    tokens = tree.tokens[path.clamp(min=0)]
    bonus = targets.index_select(0, best)
    # the one host sync of a step: how many tokens to commit, the tokens themselves and where they came from
    parts = [tree.depths.index_select(0, best), bonus, tokens]
    if tree.origin is not None:
        parts.append(tree.origin[path.clamp(min=0)])
    host = torch.cat(parts).tolist()
    a, d = host[0], path.numel()
    return Verdict(nodes=path[:a + 1], tokens=tokens[:a + 1], bonus=bonus[0], accepted=a,
                   committed=host[3:3 + a] + [host[1]], targets=targets,
                   origins=host[3 + d:3 + d + a] if tree.origin is not None else [])  # root at 2 + d
