"""Batched speculative decoding: every row decodes exactly as batch 1 does (greedy and seeded sampling, each draft
kind and the training-free sources, rows of different lengths joining and leaving), per-row caches commit only their
own accepted nodes, cancelled rows free their place, and the batched cost curve is per row."""
from __future__ import annotations

import pytest
import torch

from clover.errors import CloverError
from clover.generate.batched_speculative import BatchedSpeculativeDecoder, SpeculativeRequest
from clover.generate.budget import batched_verification_cost, verification_cost
from clover.generate.sampling import SamplingParams, processed_probs
from clover.generate import speculative
from clover.generate.speculative import SpeculativeModel
from clover.model.base import BaseModel
from clover.model.checkpoint import init_draft
from tests.conftest import save_tiny
from tests.test_speculative import assert_distributed_as

VOCAB = 97
# an untrained Clover-2 draft that gets tokens accepted on the tiny bases (trunk from the last layer, unscaled token)
CLOVER2 = {"init_from_layer": "last", "token_scale": 1.0}


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return BaseModel.from_pretrained(save_tiny(tmp_path_factory.mktemp("llama"), "llama"), dtype="fp32", max_len=160)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLOVER_CACHE", str(tmp_path / "cache"))  # measured cost curves stay with the test


def make(base, kind: str, tree="dynamic", budget=6) -> SpeculativeModel:
    draft, sources = None, []
    if kind in ("clover2", "eagle"):
        draft = init_draft(kind, base, **(CLOVER2 if kind == "clover2" else {})).eval()
        draft.allocate_cache(base.max_len)
    else:
        sources = kind.split("+")
    return SpeculativeModel(base, draft, tree=tree, tree_budget=budget, sources=sources)


def requests(n: int, seed: int, params=SamplingParams()) -> list[SpeculativeRequest]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(1, 25, (1,), generator=gen))
        prompt = torch.randint(3, VOCAB, (length,), generator=gen).tolist()
        out.append(SpeculativeRequest(prompt, max_new_tokens=int(torch.randint(5, 40, (1,), generator=gen)), tag=i,
                                      params=params, seed=100 + i, stop_token_ids=(5,)))
    return out


def batch_one(model: SpeculativeModel, request: SpeculativeRequest) -> list[int]:
    generator = torch.Generator().manual_seed(request.seed)
    p = request.params
    return model.generate(request.prompt, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                          max_new_tokens=request.max_new_tokens, stop_token_ids=request.stop_token_ids,
                          generator=generator).tokens


def record_sizing(model, monkeypatch) -> tuple[list, list]:
    """Lists that fill as ``model`` drafts batched steps: ``(ranked candidates per row, width chosen)`` of every
    :func:`best_size` call, and what every ``propose_many`` call returned."""
    sized, proposed = [], []
    monkeypatch.setattr(speculative, "best_size", lambda ranked, *a, size=speculative.best_size: sized.append(
        (ranked, size(ranked, *a))) or sized[-1][1])
    model.propose_many = lambda *a, propose=model.propose_many: proposed.append(propose(*a)) or proposed[-1]
    return sized, proposed


def run_all(decoder, reqs) -> dict:
    tokens, results = {r.tag: [] for r in reqs}, {}
    for event in decoder.run(reqs):
        tokens[event.tag] += event.tokens
        if event.finish_reason:
            results[event.tag] = event.result
    assert set(results) == set(tokens)  # every request ended
    for tag, result in results.items():
        assert result.tokens == tokens[tag]
    return results


@pytest.mark.parametrize("kind", ["clover2", "eagle", "lookup+recycle"])
def test_greedy_rows_equal_batch_one(tiny_base, kind):
    """Seven requests through three rows: rows join and leave at different steps, every output is batch 1's."""
    model = make(tiny_base, kind)
    reqs = requests(7, seed=1)
    results = run_all(BatchedSpeculativeDecoder(model, batch_size=3, max_len=96), reqs)
    for r in reqs:
        assert results[r.tag].tokens == batch_one(make(tiny_base, kind), r), r.tag
    if kind == "clover2":  # drafted tokens were accepted, so the per-row commits were exercised
        assert max(res.tau for res in results.values()) > 1.0


@pytest.mark.parametrize("kind", ["clover2", "lookup+recycle"])
def test_requests_that_join_together_share_prefill_forwards_and_stay_exact(tiny_base, kind, monkeypatch):
    """Six requests of different lengths join at once: their prompts are prefilled right-padded, as many per
    forward as fit ``prefill_tokens`` (rows x the longest prompt), and every output is still batch 1's (the draft
    and the sources start from the row's own prompt)."""
    model = make(tiny_base, kind)
    reqs = requests(6, seed=8)
    lengths = [len(r.prompt) for r in reqs]
    decoder = BatchedSpeculativeDecoder(model, batch_size=6, max_len=96, prefill_tokens=48)
    prefills, forward = [], tiny_base.forward_batch

    def logged_forward(ids, cache, n_new=None, rows=None, **kw):
        if kw.get("tree_mask") is None and ids.shape[1] > 1:
            prefills.append((ids.shape, rows, list(n_new)))
        return forward(ids, cache, n_new=n_new, rows=rows, **kw)
    monkeypatch.setattr(tiny_base, "forward_batch", logged_forward)
    results = run_all(decoder, reqs)
    expected, start = [], 0
    for stop in decoder._prefill_groups(lengths):
        expected.append(((stop - start, max(lengths[start:stop])), slice(start, stop), lengths[start:stop]))
        start = stop
    assert [(tuple(shape), rows, n) for shape, rows, n in prefills] == expected
    assert 1 < len(prefills) < len(reqs)  # several prompts per forward, within the token bound
    assert all(shape[0] * shape[1] <= 48 or shape[0] == 1 for shape, _, _ in prefills)
    monkeypatch.undo()
    if kind == "lookup+recycle":  # the shared table learned each prompt as a prefill of it alone teaches it
        alone = make(tiny_base, kind)
        one_by_one = BatchedSpeculativeDecoder(alone, batch_size=6, max_len=96)
        for r in reqs:
            one_by_one.add(r)
        fresh = make(tiny_base, kind)
        BatchedSpeculativeDecoder(fresh, batch_size=6, max_len=96).add_many(reqs)
        assert torch.equal(fresh.sources[1].table, alone.sources[1].table)
    for r in reqs:
        assert results[r.tag].tokens == batch_one(make(tiny_base, kind), r), r.tag
        if kind == "clover2":  # the draft starts from the row's own prompt: the same steps as batch 1
            generator = torch.Generator().manual_seed(r.seed)
            expected = model.generate(r.prompt, max_new_tokens=r.max_new_tokens, stop_token_ids=r.stop_token_ids,
                                      generator=generator)
            assert results[r.tag].accept_lengths == expected.accept_lengths, r.tag


def test_too_many_requests_at_once_are_refused_before_any_prefill(tiny_base):
    decoder = BatchedSpeculativeDecoder(make(tiny_base, "lookup"), batch_size=3, max_len=96)
    decoder.add(SpeculativeRequest([4, 5, 6], tag="first"))
    with pytest.raises(CloverError, match="3 requests for 2 free rows of 3"):
        decoder.add_many([SpeculativeRequest([7, 8], tag=i) for i in range(3)])
    with pytest.raises(CloverError, match="empty prompt"):
        decoder.add_many([SpeculativeRequest([7, 8], tag="fine"), SpeculativeRequest([], tag="empty")])
    assert decoder.busy == 1  # nothing was prefilled
    with pytest.raises(CloverError, match="prefill_tokens must be at least 1"):
        BatchedSpeculativeDecoder(tiny_base, batch_size=2, prefill_tokens=0)


@pytest.mark.parametrize("kind", ["clover2", "eagle"])
def test_rows_that_end_first_are_filled_from_the_back_and_stay_exact(tiny_base, kind):
    """Four rows whose first requests end first and nothing waits: the last busy rows move into the holes (base
    cache, draft cache and draft state), so no forward spans an idle row, and every output is still batch 1's."""
    model = make(tiny_base, kind)
    reqs = requests(4, seed=6)
    for r, n in zip(reqs, (4, 9, 30, 38)):
        r.max_new_tokens, r.stop_token_ids = n, ()
    decoder = BatchedSpeculativeDecoder(model, batch_size=4, max_len=96)
    spans, moves, forward, move = [], [], decoder._verify_forward, decoder.cache.move_row

    def checked_forward(trees, hi):
        spans.append((hi, decoder.busy))
        return forward(trees, hi)

    def logged_move(src, dst):
        moves.append((src, dst))
        move(src, dst)
    decoder._verify_forward, decoder.cache.move_row = checked_forward, logged_move
    results = run_all(decoder, reqs)
    assert moves and all(src > dst for src, dst in moves)
    assert all(hi == busy for hi, busy in spans)  # every forward covers the busy rows only
    for r in reqs:  # the same draft alone: the same tokens in the same steps (a moved row drafts from its state)
        generator = torch.Generator().manual_seed(r.seed)
        expected = model.generate(r.prompt, max_new_tokens=r.max_new_tokens, stop_token_ids=(), generator=generator)
        assert results[r.tag].tokens == expected.tokens, r.tag
        assert results[r.tag].accept_lengths == expected.accept_lengths, r.tag
    assert max(res.tau for res in results.values()) > 1.0


def test_a_draft_far_behind_after_plain_steps_restarts_on_a_window(tiny_base):
    """Rows that decoded plainly for 40 steps: the next drafting step feeds each row's draft the last
    CATCH_UP_WINDOW pairs (its cache restarted on them), not all 40; the prompt itself is read whole; outputs stay
    batch 1's."""
    from clover.generate.budget import StepModePolicy

    model = make(tiny_base, "clover2")
    reqs = requests(2, seed=8)
    for r in reqs:
        r.max_new_tokens, r.stop_token_ids = 70, ()
    decoder = BatchedSpeculativeDecoder(model, batch_size=2, max_len=128)
    decoder.modes = StepModePolicy()
    plain_steps = iter([True] + [False] * 40)
    decoder.modes.choose = lambda busy: next(plain_steps, True)
    fed, start = [], decoder.drafter.start

    def logged_start(rows, hidden, next_ids):
        fed.append([h.shape[1] for h in hidden])
        return start(rows, hidden, next_ids)
    decoder.drafter.start = logged_start
    results = run_all(decoder, reqs)
    assert fed[0] == [len(r.prompt) for r in reqs]  # the prompts, whole
    assert fed[1] == [speculative.CATCH_UP_WINDOW] * 2  # 40+ pairs behind: the last window only
    assert all(n <= 6 for step in fed[2:] for n in step)  # then each step's accepted tokens
    for r in reqs:
        assert results[r.tag].tokens == batch_one(make(tiny_base, "clover2"), r)


def test_plain_rows_equal_batch_one(tiny_base):
    """A bare base model decodes plainly, row for row as batch 1 (one token per row and step)."""
    from clover.generate.plain import generate_plain

    reqs = requests(6, seed=4)
    decoder = BatchedSpeculativeDecoder(tiny_base, batch_size=4, max_len=96)
    results = run_all(decoder, reqs)
    for r in reqs:
        expected = generate_plain(tiny_base, r.prompt, max_new_tokens=r.max_new_tokens,
                                  stop_token_ids=r.stop_token_ids).tokens
        assert results[r.tag].tokens == expected
        assert results[r.tag].tau == 1.0
    assert decoder.stats["verified_tokens"] == decoder.stats["row_steps"]


def test_fixed_tree_rows_equal_batch_one(tiny_base):
    reqs = requests(5, seed=2)
    model = make(tiny_base, "clover2", tree="mc_sim_7b_63", budget=None)
    results = run_all(BatchedSpeculativeDecoder(model, batch_size=4, max_len=128), reqs)
    for r in reqs:
        assert results[r.tag].tokens == batch_one(make(tiny_base, "clover2", tree="mc_sim_7b_63", budget=None), r)


def test_the_draft_runs_once_per_step_and_tree_level_for_all_rows(tiny_base):
    """Three rows drafting the fixed tree: each step feeds every row's committed pairs to the draft in one call and
    expands each of the tree's four levels in one call for every row; no row allocates a draft cache of its own."""
    model = make(tiny_base, "clover2", tree="mc_sim_7b_63", budget=None)
    decoder = BatchedSpeculativeDecoder(model, batch_size=3, max_len=128)
    calls = []
    for name in ("start", "expand"):
        method = getattr(decoder.drafter, name)
        setattr(decoder.drafter, name,
                lambda rows, *args, _m=method, _n=name: calls.append((_n, rows)) or _m(rows, *args))
    reqs = [SpeculativeRequest(list(range(3 + i, 9 + 2 * i)), max_new_tokens=10, tag=i, stop_token_ids=())
            for i in range(3)]
    for event in decoder.run(reqs):
        if event.tag == 0 and not event.finish_reason:
            assert all(row is None or row.state.cache is None for row in decoder.rows)
    starts = [rows for name, rows in calls if name == "start"]
    assert len(starts) == decoder.stats["steps"] and starts[0] == [0, 1, 2]
    assert [name for name, _ in calls] == ["start", "expand", "expand", "expand", "expand"] * len(starts)
    assert [rows for name, rows in calls[1:5]] == [[0, 1, 2]] * 4


def test_sampled_rows_follow_the_base_distribution(tmp_path):
    """The first two tokens of 4,000 sampled requests (T=0.7, top-p 0.9, a seed each), decoded eight rows at a time,
    follow the base model's distribution, draft tokens accepted along the way."""
    folder = save_tiny(tmp_path / "m", "llama", vocab_size=12, hidden_size=32, intermediate_size=64,
                       num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1)
    base = BaseModel.from_pretrained(folder, dtype="fp32", max_len=32)
    tree = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (1, 1), (0, 0, 0), (0, 0, 1)]
    draft = init_draft("clover2", base).eval()
    draft.allocate_cache(base.max_len)
    model = SpeculativeModel(base, draft, tree=tree, tree_budget=None)
    params = SamplingParams(temperature=0.7, top_p=0.9)
    prompt = [3, 1, 4, 1, 5]
    with torch.no_grad():
        p1 = processed_probs(base(torch.tensor([prompt]), use_cache=False).logits[0, -1], params)
        p2 = torch.stack([processed_probs(base(torch.tensor([prompt + [x]]), use_cache=False).logits[0, -1], params)
                          for x in range(12)])
    runs = 4000
    reqs = [SpeculativeRequest(prompt, max_new_tokens=3, tag=i, params=params, seed=i, stop_token_ids=())
            for i in range(runs)]
    counts = torch.zeros(144)
    accepted = 0
    for result in run_all(BatchedSpeculativeDecoder(model, batch_size=8, max_len=32), reqs).values():
        counts[result.tokens[0] * 12 + result.tokens[1]] += 1
        accepted += result.accept_lengths[1] > 1
    assert_distributed_as(counts, (p1[:, None] * p2).flatten(), runs)
    assert accepted > runs // 10


def test_auto_budget_rows_stay_exact_and_use_the_batched_cost(tiny_base, monkeypatch):
    model = make(tiny_base, "clover2", budget="auto")
    decoder = BatchedSpeculativeDecoder(model, batch_size=4, max_len=96)
    reqs = requests(6, seed=3)
    used = set()  # the draft costs the rows' depth policies weighed
    decoder.step = lambda step=decoder.step: used.update(
        row.state.depth_policy.start_cost for row in decoder.rows if row is not None) or step()
    sized, proposed = record_sizing(model, monkeypatch)  # each drafting step sized together, each row filling it
    results = run_all(decoder, reqs)
    assert len(sized) == len(proposed) == decoder.stats["drafting_steps"] > 0
    for (ranked, width), trees in zip(sized, proposed):
        assert [tree.size for tree, _ in trees] == [1 if r is None else 1 + min(width, r.valid) for r in ranked]
    for r in reqs:
        assert results[r.tag].tokens == batch_one(make(tiny_base, "clover2", budget=6), r)
    assert set(decoder.costs) <= {1, 2, 3, 4} and 4 in decoder.costs
    # the draft's cost per row was measured on its batch runner for each batch size that drafted, and used
    assert set(decoder.draft_costs) <= set(decoder.costs) and 4 in decoder.draft_costs
    assert all(start > 0 and level > 0 for start, level in decoder.draft_costs.values())
    assert decoder.draft_costs[4][0] in used
    # a new request starts from what the last finished one observed, as the next call of batch-1 decoding does
    assert decoder.learned is not None and sum(decoder.learned.tried) > 0
    decoder.add(reqs[0])
    policy = next(row for row in decoder.rows if row is not None).state.depth_policy
    assert policy is not decoder.learned and policy.tried == decoder.learned.tried
    assert 0 < decoder.stats["drafting_steps"] < decoder.stats["steps"]  # both kinds of step were measured


def test_rows_fill_the_width_one_forward_pays_for(tiny_base, monkeypatch):
    # repetitive prompts give prompt lookup candidates; a flat verification cost makes every usable node pay
    model = make(tiny_base, "lookup", budget="auto")
    decoder = BatchedSpeculativeDecoder(model, batch_size=3, max_len=96)
    decoder.costs = {busy: torch.full((65,), 1e-3) for busy in (1, 2, 3)}
    decoder.modes = None  # every step drafts
    reqs = [SpeculativeRequest([7, 8, 9, 10] * (3 + i), max_new_tokens=24, tag=i, seed=i, stop_token_ids=(5,))
            for i in range(3)]
    sized, proposed = record_sizing(model, monkeypatch)
    results = run_all(decoder, reqs)
    for r in reqs:
        assert results[r.tag].tokens == batch_one(make(tiny_base, "lookup", budget=6), r)
    for (ranked, width), trees in zip(sized, proposed):
        usable = [0 if r is None else r.valid for r in ranked]
        assert width == min(max(usable), 63)  # flat cost: as wide as the row with the most candidates
        assert [tree.size for tree, _ in trees] == [1 + min(width, n) for n in usable]
    assert any(width > 0 for _, width in sized)


def test_step_mode_policy_takes_the_faster_kind_and_tries_the_other_now_and_then():
    from clover.generate.budget import StepModePolicy

    policy = StepModePolicy(explore_every=5)
    kinds = []
    for _ in range(45):
        draft = policy.choose(8)
        kinds.append(draft)
        # at 8 rows drafting commits 12 tokens in 0.3 s (40/s), a plain step 8 in 0.1 s (80/s)
        policy.record(8, draft, 12 if draft else 8, 0.3 if draft else 0.1)
    assert kinds[:4] == [True, True, False, False]  # each kind measured twice first
    # then plain; drafting, 2x behind, is tried again 5 x 2^2 = 20 steps after it last ran (step 1)
    assert kinds[4:] == [False] * 17 + [True] + [False] * 19 + [True] + [False] * 3
    assert policy.rate(8, True) == pytest.approx(40.0) and policy.rate(8, False) == pytest.approx(80.0)
    assert policy.rate(5, False) == policy.rate(8, False)  # 5 to 8 busy rows are one size class
    assert policy.choose(2) is True and policy.rate(2, True) is None  # another class starts afresh
    for _ in range(4):
        draft = policy.choose(2)
        policy.record(2, draft, 3 if draft else 1, 0.05)  # at 2 rows drafting pays: 60/s against 20/s
    assert policy.choose(2) is True


def test_a_full_row_ends_with_context_and_a_cancelled_row_frees_its_place(tiny_base):
    model = make(tiny_base, "eagle")
    decoder = BatchedSpeculativeDecoder(model, batch_size=2, max_len=24)
    long = SpeculativeRequest(list(range(3, 23)), max_new_tokens=50, tag="long", stop_token_ids=())
    other = SpeculativeRequest([7, 8, 9], max_new_tokens=6, tag="other", stop_token_ids=())
    decoder.add(long)
    decoder.add(other)
    with pytest.raises(CloverError, match="all 2 rows are busy"):
        decoder.add(SpeculativeRequest([3], tag="third"))
    assert decoder.cancel("other") and not decoder.cancel("other")
    assert decoder.busy == 1
    events = []
    while decoder.busy:
        events += decoder.step()
    assert events[-1].tag == "long" and events[-1].finish_reason == "context"
    assert len(events[-1].result.tokens) < 50
    with pytest.raises(CloverError, match="does not fit"):
        decoder.add(SpeculativeRequest(list(range(3, 40)), tag="too long"))


def test_batched_cost_is_measured_once_per_batch_size(tiny_base, monkeypatch):
    from clover.generate import budget

    one, four = verification_cost(tiny_base), batched_verification_cost(tiny_base, 4)
    assert four.shape == one.shape and bool((four > 0).all())
    assert torch.equal(batched_verification_cost(tiny_base, 1), one)
    monkeypatch.setattr(budget, "measure_batched_cost_curve", lambda *a, **k: pytest.fail("measured twice"))
    assert torch.equal(batched_verification_cost(tiny_base, 4), four)  # read back from the disk cache


def test_interpolation_extends_the_last_slope():
    from clover.generate.budget import _interpolate

    cost = _interpolate({1: 1.0, 2: 2.0, 4: 3.0, 8: 7.0}, 10)
    assert cost[1:].tolist() == [1.0, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
