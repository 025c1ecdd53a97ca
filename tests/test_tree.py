"""Draft trees: the published mc_sim_7b_63 buffers, random trees against brute-force parent pointers, validation,
the dynamic tree's rules, and greedy verification on hand-made logits."""
from __future__ import annotations

import random

import pytest
import torch

from clover.errors import CloverError
from clover.generate.sampling import SamplingParams
from clover.generate.candidates import build_dynamic_tree
from clover.generate.tree import MC_SIM_7B_63, DraftTree, TreeSpec
from clover.generate.verify import verify_tree

V = 50


class TinyRNN:
    """A small deterministic recurrent 'draft': state' = tanh(A state + E[token]), logits = W state."""

    vocab = None  # logits over the whole vocabulary

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(16, 16, generator=g) / 4
        self.E = torch.randn(V, 16, generator=g)
        self.W = torch.randn(16, V, generator=g) * 2
        self.root_state = torch.randn(1, 16, generator=g)
        self.states = self.root_state

    def step(self, state, tokens):
        return torch.tanh(state @ self.A + self.E[tokens])

    def expand(self, parent_rows, tokens, depth):
        self.states = self.step(self.states[parent_rows], tokens)
        return self.states @ self.W

    def root_logits(self):
        self.states = self.root_state
        return (self.root_state @ self.W)[0]


def random_paths(rng: random.Random, n: int, max_depth: int):
    nodes = set()
    while len(nodes) < n:
        parent = rng.choice([()] + [p for p in nodes if len(p) < max_depth])
        nodes.add(parent + (rng.randrange(4),))
    return list(nodes)


def test_mc_sim_7b_63_reproduces_spec_numbers():
    spec = TreeSpec("mc_sim_7b_63", num_heads=5)
    buf = spec.reference_buffers(topk=10)
    assert spec.size == 26 and spec.depth == 5
    assert buf["tree_indices"] == [0, 1, 2, 3, 4, 11, 12, 13, 21, 22, 31, 32, 41, 51, 52, 53, 61, 62, 71, 72, 81,
                                   91, 92, 93, 101, 102]
    assert buf["tree_position_ids"] == [0] + [1] * 4 + [2] * 8 + [3] * 8 + [4] * 3 + [5] * 2
    m = -1
    assert buf["retrieve_indices"] == [
        [0, 1, 5, 13, 21, 24], [0, 1, 5, 13, 21, 25], [0, 1, 5, 13, 22, m], [0, 1, 5, 13, 23, m],
        [0, 1, 5, 14, m, m], [0, 1, 5, 15, m, m], [0, 1, 6, 16, m, m], [0, 1, 6, 17, m, m], [0, 1, 7, 18, m, m],
        [0, 1, 7, 19, m, m], [0, 2, 8, 20, m, m], [0, 2, 9, m, m, m], [0, 3, 10, m, m, m], [0, 3, 11, m, m, m],
        [0, 4, 12, m, m, m]]
    assert buf["draft_tree_indices"] == [[0, 1, 2, 3], [0, 1, 2, 10], [0], [0]]
    assert buf["repeat_nums"] == [[4], [3, 1], [1], [1]]


@pytest.mark.parametrize("seed", range(8))
def test_random_trees_match_brute_force(seed):
    rng = random.Random(seed)
    paths = random_paths(rng, rng.randint(3, 30), max_depth=5)
    spec = TreeSpec(paths, num_heads=5)
    draft = TinyRNN(seed)
    root = torch.tensor(7)
    tree = spec.build(root, draft.root_logits(), draft)
    # brute force: walk every path from the root, choosing the rank-th token of the parent's logits
    index = {p: i + 1 for i, p in enumerate(spec.nodes)}
    for path in spec.nodes:
        state, logits, tok = draft.root_state, (draft.root_state @ draft.W)[0], None
        for depth in range(1, len(path) + 1):
            tok = logits.topk(path[depth - 1] + 1).indices[-1]
            if depth < len(path):
                state = draft.step(state, tok.reshape(1))
                logits = (state @ draft.W)[0]
        node = index[path]
        assert tree.tokens[node] == tok
        assert tree.depths[node] == len(path)
        parent = index.get(path[:-1], 0)
        assert tree.parents[node] == parent
        ancestors = {0} | {index[path[:k]] for k in range(1, len(path) + 1)}
        assert set(torch.nonzero(tree.mask[node]).flatten().tolist()) == ancestors
        assert [x for x in tree.paths[node].tolist() if x >= 0] == sorted(ancestors)
    assert tree.tokens[0] == root


def test_invalid_trees_are_rejected():
    with pytest.raises(CloverError, match="duplicate"):
        TreeSpec([(0,), (0,)])
    with pytest.raises(CloverError, match="no parent"):
        TreeSpec([(0,), (1, 0)])
    with pytest.raises(CloverError, match="exceeds"):
        TreeSpec(MC_SIM_7B_63, num_heads=4)
    with pytest.raises(CloverError, match="ranks >= 0"):
        TreeSpec([(-1,)])
    with pytest.raises(CloverError, match="unknown tree"):
        TreeSpec("no_such_tree")
    with pytest.raises(CloverError, match="at least one node"):
        TreeSpec([])


def test_dynamic_tree_rules():
    draft = TinyRNN(3)
    tree = build_dynamic_tree(torch.tensor(1), draft.root_logits(), draft, max_depth=4, budget=12, width=6,
                              expand=4, top_p=0.95, min_ratio=0.25)
    assert tree.size <= 13 and int(tree.depths.max()) <= 4
    # closed under parents, parents first, and every node's token is one of its parent's admissible children
    assert bool((tree.parents[1:] < torch.arange(1, tree.size)).all())
    replay = TinyRNN(3)
    logits_of = {0: replay.root_logits()}
    state_of = {0: replay.root_state}
    for node in range(1, tree.size):
        parent = int(tree.parents[node])
        probs = logits_of[parent].softmax(-1)
        p, tok = probs.topk(6)
        allowed = {int(tok[0])} | {int(t) for t, c, q in zip(tok, p.cumsum(0), p) if c <= 0.95 and q >= 0.25 * p[0]}
        assert int(tree.tokens[node]) in allowed
        state_of[node] = replay.step(state_of[parent], tree.tokens[node].reshape(1))
        logits_of[node] = (state_of[node] @ replay.W)[0]
    # siblings are distinct tokens
    pairs = set(zip(tree.parents[1:].tolist(), tree.tokens[1:].tolist()))
    assert len(pairs) == tree.size - 1


def test_dynamic_auto_budget_follows_the_cost_curve():
    flat = torch.full((65,), 1.0)
    steep = torch.arange(65, dtype=torch.float32) + 1.0
    big = build_dynamic_tree(torch.tensor(1), TinyRNN(5).root_logits(), TinyRNN(5), max_depth=5, budget=None,
                             cost_per_size=flat)
    small = build_dynamic_tree(torch.tensor(1), TinyRNN(5).root_logits(), TinyRNN(5), max_depth=5, budget=None,
                               cost_per_size=steep)
    assert big.size > small.size
    assert small.size <= 3


def test_depth_policy_drafts_deep_only_while_deep_tokens_are_accepted():
    from clover.generate.budget import DepthPolicy

    cost = torch.linspace(1.0, 2.0, 65)  # seconds to verify 0..64 tokens
    policy = DepthPolicy(cost, start_cost=0.3, level_cost=0.2, max_depth=5)
    assert policy.depth() >= 1  # optimistic prior: try drafting first
    for _ in range(60):  # every drafted token accepted: drafting deeper pays for its levels
        d = policy.depth()
        policy.update(d, accepted=d, tree_size=1 + 2 * d)
    assert policy.depth() == 5
    depths = []
    for _ in range(200):  # nothing accepted: plain steps, with a few exploratory drafting steps
        depths.append(policy.depth())
        policy.update(depths[-1], accepted=0, tree_size=3 if depths[-1] else 1)
    assert depths[-100:].count(0) >= 75
    rates = policy.rates()
    assert rates == sorted(rates, reverse=True)
    # free drafting is always worth it, and at full depth
    cheap = DepthPolicy(torch.ones(65), start_cost=0.0, level_cost=0.0, max_depth=5)
    assert cheap.depth() == 5
    for _ in range(50):
        cheap.update(5, accepted=0, tree_size=9)
    assert cheap.depth() >= 1


def test_greedy_verification_accepts_the_longest_matching_path():
    spec = TreeSpec([(0,), (1,), (0, 0), (1, 0), (1, 0, 0)])
    tokens = torch.tensor([5, 10, 11, 20, 21, 30])  # root, (0), (1), (0,0), (1,0), (1,0,0)
    tree = DraftTree(tokens, spec.template.parents, spec.template.depths, spec.template.mask, spec.template.paths)
    logits = torch.zeros(6, 40)
    # base argmax: after root -> 11 (node (1)), after (1) -> 21 (node (1,0)), after (1,0) -> 31 (mismatch)
    for node, target in [(0, 11), (1, 20), (2, 21), (3, 0), (4, 31), (5, 0)]:
        logits[node, target] = 1.0
    verdict = verify_tree(tree, logits, SamplingParams())
    assert verdict.accepted == 2
    assert verdict.nodes.tolist() == [0, 2, 4]
    assert verdict.tokens.tolist() == [5, 11, 21]
    assert int(verdict.bonus) == 31
    assert verdict.committed == [11, 21, 31]  # the accepted draft tokens, then the bonus, on the host


def test_verification_reads_the_device_once():
    """A step's verification hands its whole result to the host in one transfer: no .item()/int() reads, which
    would each be a device sync on a GPU (indexing with a 0-dim tensor is one)."""
    from torch.profiler import profile

    spec = TreeSpec([(0,), (1,), (0, 0), (1, 0), (1, 0, 0)])
    tokens = torch.tensor([5, 10, 11, 20, 21, 30])
    tree = DraftTree(tokens, spec.template.parents, spec.template.depths, spec.template.mask, spec.template.paths)
    logits = torch.zeros(6, 40)
    for node, target in [(0, 11), (1, 20), (2, 21), (3, 0), (4, 31), (5, 0)]:
        logits[node, target] = 1.0
    with profile() as prof:
        verdict = verify_tree(tree, logits, SamplingParams())
    assert verdict.committed == [11, 21, 31]
    assert not [e.name for e in prof.events() if e.name == "aten::_local_scalar_dense"]
