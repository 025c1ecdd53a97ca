"""The training-free candidate sources (prompt lookup, token recycling) and the merged tree: what each proposes, what it
learns from a verification, how candidates of several sources become one tree; lossless alone and with trained
drafts (greedy == plain on tiny Llama/Mistral/Qwen2 and SmolLM2, multi-turn; sampled output distributed as the base
model's)."""
from __future__ import annotations

import math
import random

import pytest
import torch

from clover.errors import CloverError
from clover.generate.lookup import PromptLookup
from clover.generate.recycle import TokenRecycling
from clover.generate.sampling import SamplingParams, processed_probs
from clover.generate.sources import split_drafts
from clover.generate.speculative import SpeculativeModel
from clover.generate.candidates import (Candidates, best_size, cap_siblings, merge_candidates, rank_candidates,
                                       select_tree)
from clover.generate.verify import verify_tree
from clover.model.base import BaseModel
from clover.model.checkpoint import init_draft
from tests.conftest import save_tiny
from tests.test_speculative import assert_distributed_as


class FakeVerdict:
    def __init__(self, committed, targets=None):
        self.committed, self.targets = committed, targets


# ---- prompt lookup --------------------------------------------------------------------------------------------------
def test_lookup_proposes_the_continuations_of_the_longest_matches_first():
    lookup = PromptLookup("cpu", branches=2, max_tokens=4)
    #          0  1  2  3  4  5  6  7  8  9  10 11
    prompt = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 4, 5, 6]
    lookup.begin(prompt[:-1], prompt[-1])  # the context ends ... 5, 6: "5 6" matched at 0-1, "6" also at 6
    chains = lookup.chains()
    assert chains[0] == (2, (7, 8, 9, 1))  # the longest match (2 tokens) first
    assert chains[1] == (1, (7, 2, 3, 4))  # a shorter, more recent one next
    found = lookup.propose(torch.tensor(6))
    assert found.tokens.tolist() == [7, 8, 9, 1, 2, 3, 4]  # both chains start with 7: one node for it
    assert found.parents.tolist() == [-1, 0, 1, 2, 0, 4, 5]
    assert found.depths.tolist() == [1, 2, 3, 4, 2, 3, 4]
    assert (found.scores[1:4] < found.scores[0:3]).all() and (found.scores[4:] < found.scores[[0, 4, 5]]).all()
    assert found.scores[1] > found.scores[4]  # a longer match is trusted more (prior e / (e + 2))
    first = PromptLookup("cpu", branches=1, max_tokens=4)
    first.begin(prompt[:-1], prompt[-1])
    assert found.scores[0] == first.propose(torch.tensor(6)).scores[0]  # the shared node: the better chain's score


def test_lookup_index_grows_with_committed_tokens_and_learns_its_hit_rate():
    lookup = PromptLookup("cpu", branches=1, max_tokens=3)
    lookup.begin([1, 2, 3, 4, 9], 1)
    assert lookup.chains() == [(1, (2, 3, 4))]
    before = [lookup.rate(e) for e in range(1, 4)]
    lookup.propose(torch.tensor(1))
    lookup.observe(None, FakeVerdict([2, 3, 7]))  # two right, the third wrong
    after = [lookup.rate(e) for e in range(1, 4)]
    assert after[0] > before[0] * 0.99 and after[1] > before[1] * 0.99 and after[2] < before[2]
    assert lookup.seq == [1, 2, 3, 4, 9, 1, 2, 3, 7]
    assert lookup.chains() == []  # 7 never came before
    lookup.observe(None, FakeVerdict([1]))
    assert lookup.chains() == [(1, (2, 3, 7))]  # "1" matched twice: the most recent occurrence first
    empty = PromptLookup("cpu")
    empty.begin([], 5)
    assert empty.propose(torch.tensor(5)).size == 0


# ---- token recycling ------------------------------------------------------------------------------------------------
def test_recycling_grows_candidates_from_its_table_and_refreshes_every_verified_node():
    rec = TokenRecycling(vocab_size=10, device="cpu", k=3, width=2, expand=2, depth=2)
    assert (rec.propose(torch.tensor(4)).scores == -torch.inf).all()  # empty table: nothing usable
    logits = torch.full((3, 10), -5.0)
    logits[0, [7, 8, 9]] = torch.tensor([3.0, 2.0, 1.0])  # after token 4: 7, 8, 9
    logits[1, [1, 2, 3]] = torch.tensor([3.0, 2.0, 1.0])  # after token 7: 1, 2, 3
    rec.refresh(torch.tensor([4, 7]), logits[:2])
    found = rec.propose(torch.tensor(4))
    usable = found.scores > -torch.inf
    assert found.tokens[usable].tolist() == [7, 8, 1, 2]  # row 4's top-2, then row 7's (row 8 is empty)
    assert found.parents[usable].tolist() == [-1, -1, 0, 0]
    # a verification: the tree 4 -> 7, the base model's tokens there were 8 (rank 1 of row 4) and 1 (rank 0 of row 7)
    tree = select_tree(torch.tensor(4), [Candidates(torch.tensor([7]), torch.tensor([-1]), torch.tensor([1]),
                                                    torch.tensor([-0.1]), 1)], budget=1)
    hits_before = rec.hits.clone()
    fresh = torch.full((2, 10), -5.0)
    fresh[0, [1, 2, 3]] = torch.tensor([3.0, 2.0, 1.0])
    fresh[1, [9, 8, 7]] = torch.tensor([3.0, 2.0, 1.0])
    rec.observe(tree, FakeVerdict([8], targets=torch.tensor([8, 1])), fresh)
    assert torch.allclose(rec.hits - hits_before * rec.decay, torch.tensor([1.0, 1.0, 0.0]))
    assert rec.table[4].tolist() == [1, 2, 3] and rec.table[7].tolist() == [9, 8, 7]  # every verified node's row



def test_recycling_candidates_follow_the_table_level_by_level():
    """Against a plain walk: each depth's nodes are the table rows of the previous depth's ``expand`` best nodes."""
    rec = TokenRecycling(vocab_size=50, device="cpu", k=4, width=3, expand=2, depth=4)
    g = torch.Generator().manual_seed(0)
    filled = torch.arange(0, 50, 2)  # odd tokens have no row
    rec.refresh(filled, torch.randn(filled.numel(), 50, generator=g))
    rec.hits = torch.tensor([3.0, 1.5, 0.5, 0.1])
    found = rec.propose(torch.tensor(4))
    rate = (rec.hits[:3] / rec.trials).log()
    front = [(-1, 4, 0.0)]  # (candidate id, token, score)
    want, seen = [], 0
    for d in range(1, 5):
        level = []
        for cid, tok, score in front:
            for r in range(3):
                s = score + rate[r].item() if tok % 2 == 0 else -math.inf
                level.append((seen + len(level), rec.table[tok, r].item(), s, cid))
        want += [(t, p, d, s) for _, t, s, p in level]
        seen += len(level)
        best = sorted(level, key=lambda x: -x[2])[:2]  # ties: both -inf or distinct sums here
        front = [(cid, tok, s) for cid, tok, s, _ in best]
    got = list(zip(found.tokens.tolist(), found.parents.tolist(), found.depths.tolist(), found.scores.tolist()))
    assert len(got) == len(want) and found.depth == 4
    for (t, p, d, s), (wt, wp, wd, ws) in zip(got, want):
        assert (t, d) == (wt, wd) and s == pytest.approx(ws)
        assert p == wp or s == -math.inf  # below an empty row, which node was expanded does not matter

# ---- merging -------------------------------------------------------------------------------------------------------
def test_merged_candidates_keep_one_node_per_path_with_the_best_score():
    a = Candidates.chains([[5, 6, 7]], [[-0.1, -0.2, -0.3]], "cpu")
    b = Candidates.chains([[5, 6, 9], [4]], [[-0.5, -0.6, -0.7], [-0.05]], "cpu")
    merged, origin = merge_candidates([a, b])
    usable = merged.scores > -torch.inf
    assert int(usable.sum()) == 5  # 5, 5-6, 5-6-7, 5-6-9, 4
    assert merged.scores[0].item() == pytest.approx(-0.1)  # the best of the duplicates
    assert origin[0].tolist() == [True, True] and origin[2].tolist() == [True, False]
    tree = select_tree(torch.tensor(1), [a, b], budget=10)
    assert tree.size == 6
    paths = {tuple(tree.tokens[p[p >= 0]].tolist()) for p in tree.paths}
    assert paths == {(1,), (1, 5), (1, 5, 6), (1, 5, 6, 7), (1, 5, 6, 9), (1, 4)}
    assert tree.origin.tolist()[0] == 0 and set(tree.origin.tolist()[1:]) <= {1, 2, 3}
    small = select_tree(torch.tensor(1), [a, b], budget=3)  # the best three, closed under parents
    assert {tuple(small.tokens[p[p >= 0]].tolist()) for p in small.paths} == {(1,), (1, 4), (1, 5), (1, 5, 6)}


def test_children_that_claim_more_than_certainty_are_scaled_with_their_subtrees():
    # the root's children: 0.8 and 0.8; the first has one child (0.5 given it), the second two (0.6 and 0.6 given it)
    p = [0.8, 0.8, 0.8 * 0.5, 0.8 * 0.6, 0.8 * 0.6]
    cands = Candidates(torch.tensor([1, 2, 3, 4, 5]), torch.tensor([-1, -1, 0, 1, 1]), torch.tensor([1, 1, 2, 2, 2]),
                       torch.tensor([math.log(x) for x in p]), 2)
    capped = cap_siblings(cands)
    assert capped.scores.exp().tolist() == pytest.approx([0.5, 0.5, 0.25, 0.25, 0.25])
    # a distribution already (a softmax's top tokens): unchanged; unusable nodes stay unusable
    fine = Candidates(torch.tensor([1, 2, 3]), torch.tensor([-1, -1, 0]), torch.tensor([1, 1, 2]),
                      torch.tensor([math.log(0.6), math.log(0.3), -torch.inf]), 2)
    assert torch.equal(cap_siblings(fine).scores, fine.scores)


def test_the_cost_curve_decides_the_size_and_a_plain_step_when_nothing_pays():
    chain = Candidates.chains([[5, 6, 7, 8]], [[math.log(p) for p in (0.9, 0.8, 0.7, 0.2)]], "cpu")
    flat = torch.ones(65)  # verification costs the same for any size: take every useful node
    assert select_tree(torch.tensor(1), [chain], budget=None, cost_per_size=flat).size == 5
    steep = torch.arange(65, dtype=torch.float32).clamp(min=1)  # cost grows with every token: nothing pays
    assert select_tree(torch.tensor(1), [chain], budget=None, cost_per_size=steep).size == 1


def test_a_batch_sizes_its_rows_trees_together_and_each_row_fills_the_width():
    # row A: a chain accepted with probabilities 0.9, 0.8, 0.7, 0.6; row B: nothing to propose
    chain = Candidates.chains([[5, 6, 7, 8]], [[math.log(p) for p in (0.9, 0.8, 0.7, 0.6)]], "cpu")
    a = rank_candidates(torch.tensor(1), [chain])
    assert a.gains(64).tolist() == pytest.approx([1, 1.9, 2.7, 3.4, 4.0])
    cost = torch.tensor([0.0, 1.0, 1.1, 1.6, 1.8, 2.0] + [3.0] * 59)  # seconds per row for s tokens per row
    # alone, A's best is all 4 nodes (4.0 / 2.0 tokens per second); beside a row that gains nothing from width,
    # the batch's best is one node each ((1.9 + 1) / 1.1 beats (4.0 + 1) / 2.0)
    assert best_size([a], cost) == 4 == select_tree(torch.tensor(1), [chain], budget=None, cost_per_size=cost).size - 1
    assert best_size([a, None], cost) == 1
    # a second row with its own candidates fills the same width, even where alone it would have taken fewer
    short = Candidates.chains([[3, 4]], [[math.log(0.05), math.log(0.01)]], "cpu")
    b = rank_candidates(torch.tensor(2), [short])
    assert best_size([b], cost) == 0  # alone: a plain step (1.05 / 1.1 < 1 / 1.0)
    width = best_size([a, b], cost)  # together: (1.9 + 1.05) / 1.1 is the best
    assert width == 1 and a.tree(width).size == 2 and b.tree(width).size == 2
    assert b.tree(4).size == 3  # never more than its usable nodes
    assert best_size([None, None], cost) == 0


def test_draft_values_split_into_one_checkpoint_and_sources():
    assert split_drafts(None) == (None, [])
    assert split_drafts("runs/x") == ("runs/x", [])
    assert split_drafts(["lookup", "runs/x", "recycle"]) == ("runs/x", ["lookup", "recycle"])
    with pytest.raises(CloverError, match="at most one draft checkpoint"):
        split_drafts(["runs/x", "runs/y"])
    with pytest.raises(CloverError, match="given twice"):
        split_drafts(["lookup", "lookup"])


# ---- lossless ------------------------------------------------------------------------------------------------------
def repetitive_prompt(gen, length):
    """Random tokens with a repeated stretch, so that lookup finds matches."""
    piece = torch.randint(3, 97, (max(length // 3, 2),), generator=gen).tolist()
    return (piece + torch.randint(3, 97, (3,), generator=gen).tolist() + piece)[:length]


@pytest.fixture(scope="module")
def tiny_base(tiny_dir):
    return BaseModel.from_pretrained(tiny_dir, dtype="fp32", max_len=200)


@pytest.mark.parametrize("sources,kind", [(["lookup"], None), (["recycle"], None), (["lookup", "recycle"], None),
                                          (["lookup", "recycle"], "clover2"), (["lookup", "recycle"], "eagle")])
def test_greedy_equals_plain_with_every_source(tiny_base, sources, kind):
    draft = None
    if kind:
        draft = init_draft(kind, tiny_base).eval()
        draft.allocate_cache(tiny_base.max_len)
    gen = torch.Generator().manual_seed(4)
    for budget in ("auto", 12):
        model = SpeculativeModel(tiny_base, draft, tree="dynamic", tree_budget=budget, sources=sources)
        taus = []
        for _ in range(3):  # requests one after another: the recycling table carries over
            prompt = repetitive_prompt(gen, int(torch.randint(2, 40, (1,), generator=gen)))
            spec = model.generate(prompt, max_new_tokens=40, stop_token_ids=())
            assert spec.tokens == model.generate_plain(prompt, max_new_tokens=40, stop_token_ids=()).tokens
            assert spec.new_tokens == 40 and len(spec.verified) == spec.steps - 1
            taus.append(spec.tau)
        assert max(taus) > 1.0  # tiny random models repeat themselves: candidates get accepted


def test_a_multi_turn_chat_with_sources_equals_plain_decoding_on_smollm2(smollm2_base, smollm2_tokenizer):
    from clover.data.templates import get_template

    template = get_template(smollm2_tokenizer)
    draft = init_draft("clover2", smollm2_base).eval()
    draft.allocate_cache(smollm2_base.max_len)
    model = SpeculativeModel(smollm2_base, draft, tree="dynamic", tree_budget="auto", sources=["lookup", "recycle"])
    messages, taus = [], []
    for turn in ("Repeat exactly: the quick brown fox jumps over the lazy dog.", "Say it again, twice."):
        messages.append({"role": "user", "content": turn})
        ids = template.encode_prompt(messages)
        spec = model.generate(ids, max_new_tokens=40, stop_token_ids=template.stop_token_ids)
        plain = model.generate_plain(ids, max_new_tokens=40, stop_token_ids=template.stop_token_ids)
        assert spec.tokens == plain.tokens
        taus.append(spec.tau)
        messages.append({"role": "assistant", "content": smollm2_tokenizer.decode(spec.tokens,
                                                                                  skip_special_tokens=True)})
    assert max(taus) > 1.5  # the answers repeat the prompt: lookup pays


def test_sampling_with_sources_matches_the_base_distribution(tmp_path):
    """Point-mass proposals from lookup and recycling (and their merged tree) keep sampled output distributed as the
    base model's: the first two committed tokens of 6,000 runs, chi-square and total variation."""
    folder = save_tiny(tmp_path / "m", "llama", vocab_size=12, hidden_size=32, intermediate_size=64,
                       num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = BaseModel.from_pretrained(folder, dtype="fp32", max_len=32)
        model = SpeculativeModel(base, None, tree="dynamic", tree_budget=6, sources=["lookup", "recycle"])
        params = SamplingParams(temperature=0.7, top_p=0.9)
        prompt = [3, 1, 4, 1, 5, 9, 2, 6]
        with torch.no_grad():
            p1 = processed_probs(base(torch.tensor([prompt]), use_cache=False).logits[0, -1], params)
            seqs = torch.tensor([prompt + [x] for x in range(12)])
            p2 = torch.stack([processed_probs(base(s[None], use_cache=False).logits[0, -1], params) for s in seqs])
        exact = (p1[:, None] * p2).flatten()
        runs, counts, accepted = 6000, torch.zeros(144), 0
        gen = torch.Generator().manual_seed(99)
        for _ in range(runs):
            r = model.generate(prompt, temperature=0.7, top_p=0.9, max_new_tokens=3, stop_token_ids=(),
                               generator=gen)
            counts[r.tokens[0] * 12 + r.tokens[1]] += 1
            accepted += r.accept_lengths[1] > 1
    finally:
        torch.set_num_threads(threads)
    assert_distributed_as(counts, exact, runs)
    assert accepted > runs // 10  # candidates were accepted, not only bonus tokens drawn


def test_verification_reports_which_source_proposed_the_accepted_tokens():
    a = Candidates.chains([[5, 6]], [[-0.1, -0.2]], "cpu")
    b = Candidates.chains([[5, 7]], [[-0.3, -0.4]], "cpu")
    tree = select_tree(torch.tensor(1), [a, b], budget=10)
    logits = torch.full((tree.size, 10), -1.0)
    want = {1: 5, 5: 7}  # the base model: after 1 comes 5, after 5 comes 7
    for i, tok in enumerate(tree.tokens.tolist()):
        logits[i, want.get(tok, 0)] = 1.0
    verdict = verify_tree(tree, logits, SamplingParams())
    assert verdict.committed[:2] == [5, 7] and verdict.origins == [3, 2]  # 5: both sources; 7: the second


def _random_candidates(rng: random.Random, size: int, max_depth: int) -> Candidates:
    """A random candidate tree over the tokens 1-3 (so that sources often propose the same paths), parents first,
    each score below its parent's."""
    tokens, parents, depths, scores = [], [], [], []
    for i in range(size):
        parent = rng.choice([-1] + [j for j in range(i) if depths[j] < max_depth])
        tokens.append(rng.randint(1, 3))
        parents.append(parent)
        depths.append(1 if parent < 0 else depths[parent] + 1)
        scores.append((0.0 if parent < 0 else scores[parent]) + math.log(rng.uniform(0.05, 0.99)))
    return Candidates(torch.tensor(tokens), torch.tensor(parents), torch.tensor(depths), torch.tensor(scores),
                      max(depths))


@pytest.mark.parametrize("seed", range(6))
def test_merging_and_capping_match_brute_force(seed):
    rng = random.Random(seed)
    sources = [_random_candidates(rng, rng.randint(1, 25), rng.randint(1, 9)) for _ in range(rng.randint(2, 3))]
    nodes = []  # (path of tokens, score, source) in merge order
    for s, c in enumerate(sources):
        path_of = []
        for tok, parent, score in zip(c.tokens.tolist(), c.parents.tolist(), c.scores.tolist()):
            path_of.append((path_of[parent] if parent >= 0 else ()) + (tok,))
            nodes.append((path_of[-1], score, s))
    merged, origin = merge_candidates(sources)
    first_of = {}
    for i, (path, _, _) in enumerate(nodes):
        first_of.setdefault(path, i)
    for i, (path, _, _) in enumerate(nodes):
        group = [j for j, node in enumerate(nodes) if node[0] == path]
        assert origin[i].tolist() == [any(nodes[j][2] == s for j in group) for s in range(len(sources))]
        if first_of[path] != i:
            assert merged.scores[i] == -torch.inf  # a duplicate: unusable
            continue
        assert merged.scores[i].item() == pytest.approx(max(nodes[j][1] for j in group))
        parent = merged.parents[i].item()
        assert parent == (first_of[path[:-1]] if len(path) > 1 else -1)
    # capping: every node's children share at most probability 1, their subtrees scaled with them
    capped = cap_siblings(merged)
    cond = {}  # node -> conditional probability given its parent, before capping
    for i in range(merged.size):
        if merged.scores[i] > -torch.inf:
            p = merged.parents[i].item()
            cond[i] = math.exp(merged.scores[i].item() - (merged.scores[p].item() if p >= 0 else 0.0))
    excess = {}
    for i, c in cond.items():
        excess[merged.parents[i].item()] = excess.get(merged.parents[i].item(), 0.0) + c
    for i in cond:
        want, j = merged.scores[i].item(), i
        while j >= 0:
            want -= math.log(max(excess[merged.parents[j].item()], 1.0))
            j = merged.parents[j].item()
        assert capped.scores[i].item() == pytest.approx(want, abs=1e-5)
