"""Speculative decoding is lossless: greedy output == plain greedy output (random and trained-ish drafts, fixed and
dynamic trees, tiny Llama/Qwen2 and SmolLM2, fp32), sampled output follows the base distribution (chi-square test),
caches end consistent, stops and caps are exact, bad inputs are rejected."""
from __future__ import annotations

import math

import pytest
import torch

from clover.errors import CloverError
from clover.generate.sampling import SamplingParams, processed_probs
from clover.generate.speculative import CloverModel, EagleModel, SpeculativeModel
from clover.model.base import BaseModel
from clover.model.checkpoint import init_draft, save_draft
from tests.conftest import save_tiny

TREES = ["mc_sim_7b_63", "dynamic"]


def make(base, kind, tree, **kwargs):
    draft = init_draft(kind, base).eval()
    draft.allocate_cache(base.max_len)
    budget = kwargs.pop("tree_budget", 12 if tree == "dynamic" else None)
    return SpeculativeModel(base, draft, tree=tree, tree_budget=budget, **kwargs)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_base(request, tmp_path_factory):
    folder = save_tiny(tmp_path_factory.mktemp(request.param), request.param)
    return BaseModel.from_pretrained(folder, dtype="fp32", max_len=160)


@pytest.mark.parametrize("kind", ["clover2", "eagle"])
@pytest.mark.parametrize("tree", TREES)
def test_greedy_equals_plain_on_tiny_models(tiny_base, kind, tree):
    model = make(tiny_base, kind, tree)
    gen = torch.Generator().manual_seed(0)
    taus = []
    for _ in range(6):
        prompt = torch.randint(3, 97, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen).tolist()
        spec = model.generate(prompt, max_new_tokens=48, stop_token_ids=())
        plain = model.generate_plain(prompt, max_new_tokens=48, stop_token_ids=())
        assert spec.tokens == plain.tokens
        assert spec.new_tokens == 48 and sum(spec.accept_lengths) == 48
        taus.append(spec.tau)
    # tiny random models repeat themselves, so a Clover-2 draft initialised from the base gets some tokens accepted:
    # the accept path is exercised, not only the rejection path (EAGLE-1 starts from PyTorch's random init)
    if kind == "clover2":
        assert max(taus) > 1.0


@pytest.mark.parametrize("kind", ["clover2", "eagle"])
@pytest.mark.parametrize("tree", TREES)
def test_greedy_equals_plain_with_a_draft_vocabulary(tiny_base, kind, tree):
    """A draft that can only propose 40 of the 97 tokens is still lossless (verification reads the full vocabulary),
    and every drafted token comes from its vocabulary."""
    vocab = torch.randperm(97, generator=torch.Generator().manual_seed(3))[:40]
    draft = init_draft(kind, tiny_base, draft_vocab_size=40, draft_vocab=vocab).eval()
    draft.allocate_cache(tiny_base.max_len)
    model = SpeculativeModel(tiny_base, draft, tree=tree, tree_budget=12 if tree == "dynamic" else None)
    drafted = []
    propose = model.propose

    def spy(*args):
        tree, depth = propose(*args)
        drafted.append(tree)
        return tree, depth

    model.propose = spy
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        prompt = torch.randint(3, 97, (6,), generator=gen).tolist()
        spec = model.generate(prompt, max_new_tokens=40, stop_token_ids=())
        assert spec.tokens == model.generate_plain(prompt, max_new_tokens=40, stop_token_ids=()).tokens
    assert all(torch.isin(t.tokens[1:], vocab).all() for t in drafted) and sum(t.size - 1 for t in drafted) > 0


@pytest.mark.parametrize("kind", ["clover2", "eagle"])
def test_auto_budget_is_lossless_and_adapts_depth(tiny_base, kind):
    model = make(tiny_base, kind, "dynamic", tree_budget="auto")
    policy = model.depth_policy
    assert policy.start_cost > 0 and policy.level_cost > 0  # measured on this device
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 97, (8,), generator=gen).tolist() for _ in range(2)]
    # the measured costs depend on the machine's load (and the verification curve is cached across runs); pin them
    # so each case is deterministic: a flat verification cost, and drafting free or never paying
    model.cost = torch.full_like(model.cost, float(model.cost[1]))
    policy.verify = model.cost.tolist()
    for start_cost, drafting in ((0.0, True), (1e3, False)):  # free drafting / drafting never pays
        policy.start_cost = policy.level_cost = start_cost
        policy.tried = [0.0] * len(policy.tried)
        for prompt in prompts:
            spec = model.generate(prompt, max_new_tokens=32, stop_token_ids=())
            assert spec.tokens == model.generate_plain(prompt, max_new_tokens=32, stop_token_ids=()).tokens
            if not drafting:
                assert spec.steps == spec.new_tokens  # plain steps only
        assert (sum(policy.tried[1:]) > 0) == drafting


class Schedule:
    """A depth policy that follows a fixed pattern (0 = plain step) and records nothing."""

    def __init__(self, pattern):
        self.pattern, self.i = pattern, 0

    def depth(self):
        self.i += 1
        return self.pattern[(self.i - 1) % len(self.pattern)]

    def update(self, depth, accepted, tree_size):
        pass


@pytest.mark.parametrize("kind", ["clover2", "eagle"])
def test_plain_steps_between_drafted_steps_keep_the_draft_in_step(tiny_base, kind):
    """After plain steps (depth 0) the draft is fed the positions it missed in one call: its cache over the committed
    text equals that of a run that drafted at every step, and the output is still plain decoding's."""
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 97, (9,), generator=gen).tolist()
    # an untrained Clover-2 draft that gets tokens accepted on these tiny bases (trunk from the last layer, unscaled
    # token), so that the plain steps visibly cost steps
    config = {"init_from_layer": "last", "token_scale": 1.0} if kind == "clover2" else {}
    draft = init_draft(kind, tiny_base, **config).eval()
    draft.allocate_cache(tiny_base.max_len)
    plain = SpeculativeModel(tiny_base, draft, tree="dynamic", tree_budget=6).generate_plain(
        prompt, max_new_tokens=40, stop_token_ids=())
    caches = []
    for pattern in ([3], [0, 0, 3]):
        model = SpeculativeModel(tiny_base, draft, tree="dynamic", tree_budget=6)
        model.depth_policy = Schedule(pattern)
        out = model.generate(prompt, max_new_tokens=40, stop_token_ids=())
        assert out.tokens == plain.tokens
        committed = model.runner.committed if kind == "eagle" else draft.cache_length
        caches.append((out, committed, draft.cache.k.clone()))
    (every, n_every, k_every), (mixed, n_mixed, k_mixed) = caches
    assert mixed.steps >= every.steps
    if kind == "clover2":  # this draft gets tokens accepted, so the plain steps cost steps
        assert every.tau > 1.0 and mixed.steps > every.steps
    n = min(n_every, n_mixed)
    assert n >= len(prompt) + 20
    torch.testing.assert_close(k_mixed[..., :n, :], k_every[..., :n, :], atol=1e-5, rtol=1e-5)


def test_greedy_equals_plain_on_smollm2(smollm2_base, smollm2_tokenizer):
    """20 prompts: Clover-2 (fixed and dynamic trees) and EAGLE-1 drafts initialised from the base."""
    from clover.data.templates import get_template
    from clover.evaluation.answers import default_question_file, load_questions

    template = get_template(smollm2_tokenizer)
    prompts = [q["turns"][0] for q in load_questions(default_question_file())][:20]
    models = [make(smollm2_base, "clover2", "mc_sim_7b_63"), make(smollm2_base, "clover2", "dynamic", tree_budget=16),
              make(smollm2_base, "eagle", "mc_sim_7b_63")]
    for i, prompt in enumerate(prompts):
        ids = template.encode_prompt([{"role": "user", "content": prompt}])
        model = models[i % len(models)]
        spec = model.generate(ids, max_new_tokens=24, stop_token_ids=template.stop_token_ids)
        plain = model.generate_plain(ids, max_new_tokens=24, stop_token_ids=template.stop_token_ids)
        assert spec.tokens == plain.tokens, prompt


def test_caches_after_generation_equal_sequential_feeding(tiny_base):
    model = make(tiny_base, "clover2", "mc_sim_7b_63")
    prompt = [5, 9, 11, 3]
    base = model.base
    stream, lengths = model.stream(prompt, max_new_tokens=30, stop_token_ids=()), []
    while True:
        try:
            next(stream)
        except StopIteration as stop:
            result = stop.value
            break
        lengths.append((base.cache.length, model.draft.cache_length))
    # the draft holds one (state, next token) pair per committed position, the last one paired with the root: at
    # each step it has caught up with the base cache of the previous step
    assert len(lengths) > 3
    assert all(draft == prev_base for (prev_base, _), (_, draft) in zip(lengths, lengths[1:]))
    n = base.cache.length
    committed = prompt + result.tokens[:-1]  # the last token is the uncommitted root
    assert n == len(committed)
    k, v = base.cache.k[:, :, :, :n].clone(), base.cache.v[:, :, :, :n].clone()
    base.reset()
    base(torch.tensor([committed]))
    assert torch.allclose(k, base.cache.k[:, :, :, :n], atol=1e-5)
    assert torch.allclose(v, base.cache.v[:, :, :, :n], atol=1e-5)


def test_stop_tokens_and_caps_are_exact(tiny_base):
    model = make(tiny_base, "clover2", "mc_sim_7b_63")
    prompt = [7, 8, 9]
    free = model.generate_plain(prompt, max_new_tokens=40, stop_token_ids=())
    stop = free.tokens[17]  # a token that occurs in the output: both loops must end at its first occurrence
    spec = model.generate(prompt, max_new_tokens=40, stop_token_ids=[stop])
    plain = model.generate_plain(prompt, max_new_tokens=40, stop_token_ids=[stop])
    assert spec.tokens == plain.tokens and spec.tokens[-1] == stop and spec.finish_reason == "stop"
    seq = free.tokens[20:23]
    spec = model.generate(prompt, max_new_tokens=40, stop_token_ids=(), stop_sequences=[seq])
    plain = model.generate_plain(prompt, max_new_tokens=40, stop_token_ids=(), stop_sequences=[seq])
    assert spec.tokens == plain.tokens and spec.tokens[-3:] == seq
    for cap in (1, 2, 5, 13):
        spec = model.generate(prompt, max_new_tokens=cap, stop_token_ids=())
        assert spec.tokens == free.tokens[:cap] and spec.finish_reason == "length"
    # the context window is never overrun: generation ends when the next tree no longer fits
    long = model.generate(prompt, max_new_tokens=1000, stop_token_ids=())
    assert long.finish_reason == "context" and len(prompt) + long.new_tokens <= model.base.max_len


def chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper quantile of chi-square(df) by the Wilson–Hilferty approximation; z=3.719 -> false-alarm rate 1e-4."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("kind,runs", [("clover2", 20000), ("eagle", 5000)])
def test_sampling_matches_the_base_distribution(tmp_path, kind, runs):
    """The first two committed tokens of 20k sampled runs (T=0.7, top-p 0.9) follow the base model's distribution;
    the tree has 2-3 siblings per node, so acceptance and the bonus-token path are both exercised. Verification
    does not depend on the draft type, so EAGLE-1 gets a shorter run of the same test."""
    folder = save_tiny(tmp_path / "m", "llama", vocab_size=12, hidden_size=32, intermediate_size=64,
                       num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs would cost more than the arithmetic
    try:
        _check_sampling(folder, kind, runs)
    finally:
        torch.set_num_threads(threads)


def _check_sampling(folder, kind, runs):
    base = BaseModel.from_pretrained(folder, dtype="fp32", max_len=32)
    tree = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (1, 1), (0, 0, 0), (0, 0, 1)]
    model = make(base, kind, tree)
    params = SamplingParams(temperature=0.7, top_p=0.9)
    prompt = [3, 1, 4, 1, 5]
    # exact distribution of (x1, x2) from the base model itself
    with torch.no_grad():
        p1 = processed_probs(base(torch.tensor([prompt]), use_cache=False).logits[0, -1], params)
        seqs = torch.tensor([prompt + [x] for x in range(12)])
        p2 = torch.stack([processed_probs(base(s[None], use_cache=False).logits[0, -1], params) for s in seqs])
    exact = (p1[:, None] * p2).flatten()
    counts = torch.zeros(144)
    gen = torch.Generator().manual_seed(1234)
    accepted = 0
    for _ in range(runs):
        # 3 new tokens: the root from the prefill, then one verification step whose accept length shows whether
        # the second token was an accepted draft token (2) or a bonus token (1)
        r = model.generate(prompt, temperature=0.7, top_p=0.9, max_new_tokens=3, stop_token_ids=(), generator=gen)
        counts[r.tokens[0] * 12 + r.tokens[1]] += 1
        accepted += r.accept_lengths[1] > 1
    assert_distributed_as(counts, exact, runs)
    assert accepted > runs // 10  # draft tokens were accepted, not only bonus tokens drawn


def assert_distributed_as(counts: torch.Tensor, exact: torch.Tensor, runs: int) -> None:
    """``counts`` of ``runs`` draws follow ``exact``: nothing outside its support, a chi-square test (cells with an
    expectation below 5 pooled), and a total variation within twice what sampling noise alone gives
    (E|p̂ - p| ≈ sqrt(2 p (1 - p) / (π n)) per cell)."""
    expected = exact * runs
    assert counts[expected == 0].sum() == 0, "sampled a token outside the top-p nucleus"
    big = expected >= 5
    chi2 = (((counts[big] - expected[big]) ** 2) / expected[big]).sum()
    rest_obs, rest_exp = counts[~big & (expected > 0)].sum(), expected[~big & (expected > 0)].sum()
    if rest_exp > 0:
        chi2 += (rest_obs - rest_exp) ** 2 / rest_exp
    df = int(big.sum()) + (1 if rest_exp > 0 else 0) - 1
    assert chi2 < chi2_critical(df), (float(chi2), df)
    tv = 0.5 * (counts / runs - exact).abs().sum()
    noise = 0.5 * (2 * exact * (1 - exact) / (math.pi * runs)).sqrt().sum()
    assert tv < 2 * noise, (float(tv), float(noise))


def test_bad_inputs(tiny_base, tmp_path):
    model = make(tiny_base, "clover2", "mc_sim_7b_63")
    with pytest.raises(CloverError, match="empty prompt"):
        model.generate([], max_new_tokens=4)
    with pytest.raises(CloverError, match="temperature"):
        model.generate([1, 2], temperature=-0.5)
    for top_p in (0.0, 1.5):
        with pytest.raises(CloverError, match="top_p"):
            model.generate([1, 2], temperature=1.0, top_p=top_p)
    with pytest.raises(CloverError, match="exceeds"):
        make(tiny_base, "clover2", [(0,)] * 0 + [tuple([0] * d) for d in range(1, 7)])
    with pytest.raises(CloverError, match="duplicate"):
        make(tiny_base, "clover2", [(0,), (0,)])
    with pytest.raises(CloverError, match="no parent"):
        make(tiny_base, "clover2", [(0,), (2, 1)])
    # a draft trained for another base, and a draft of the wrong type
    other = BaseModel.from_pretrained(save_tiny(tmp_path / "other", "llama", hidden_size=32, intermediate_size=64),
                                      max_len=64)
    folder = save_draft(init_draft("clover2", other), tmp_path / "draft")
    with pytest.raises(CloverError, match="was trained for a base with"):
        CloverModel.from_pretrained(tiny_base.folder, folder)
    with pytest.raises(CloverError, match="'eagle' draft is needed"):
        EagleModel.from_pretrained(other.folder, folder)
