"""Batched decoding: every row of a batch decodes exactly as batch 1 does (prompts of different lengths, rows that
finish at different times, refills, prefix reuse, idle rows dropped), and padding never changes a result."""
from __future__ import annotations

import pytest
import torch

from clover.errors import CloverError
from clover.model import cache as cache_module
from clover.generate.batched import BatchedDecoder, Request, generate_batched
from clover.generate.plain import generate_plain
from clover.generate.sampling import SamplingParams
from clover.model.base import BaseModel
from tests.test_base import random_tree

VOCAB = 97


@pytest.fixture(scope="module")
def tiny_bases(tmp_path_factory):
    from tests.conftest import save_tiny

    return {arch: BaseModel.from_pretrained(save_tiny(tmp_path_factory.mktemp(arch), arch), dtype="fp32", max_len=160)
            for arch in ("llama", "mistral", "qwen2")}


def random_prompts(n: int, seed: int, longest: int = 30) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (n,), generator=gen)
    return [torch.randint(3, VOCAB, (int(k),), generator=gen).tolist() for k in lengths]


def plain_reply(base, prompt, max_new_tokens, stops):
    """Batch-1 greedy decoding, as a completion's (tokens without the stop token, finish reason)."""
    result = generate_plain(base, prompt, max_new_tokens=max_new_tokens, stop_token_ids=stops)
    if result.finish_reason == "stop":
        return result.tokens[:-1], "eos"
    return result.tokens, "length"


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_greedy_rows_equal_batch_one(tiny_bases, arch):
    base = tiny_bases[arch]
    prompts = random_prompts(10, seed=1)
    # stop tokens that end some replies early: tokens that batch-1 decoding emits a few steps in
    free_run = [generate_plain(base, p, max_new_tokens=20).tokens for p in prompts[:3]]
    stops = sorted({free_run[0][3], free_run[1][7], free_run[2][12]})
    caps = [20, 5, 20, 13, 20, 1, 20, 9, 20, 20]  # rows also finish by length at different times
    expected = [plain_reply(base, p, cap, stops) for p, cap in zip(prompts, caps)]
    assert {reason for _, reason in expected} == {"eos", "length"}
    decoder = BatchedDecoder(base, batch_size=3, max_len=60, max_new_tokens=20, stop_token_ids=stops)
    got = {}
    for done in decoder.run(Request(p, cap, tag=i) for i, (p, cap) in enumerate(zip(prompts, caps))):
        got[done.tag] = (done.tokens, done.finish_reason)
        assert done.prompt_tokens == len(prompts[done.tag])
    assert [got[i] for i in range(len(prompts))] == expected
    assert decoder.stats["completions"] == 10
    assert decoder.stats["new_tokens"] == sum(len(t) + (r == "eos") for t, r in expected)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_uneven_rows_split_attention_and_still_equal_batch_one(tiny_bases, arch, monkeypatch):
    """Rows of very different lengths: decoding attention runs in two parts (every row over the short rows' slots,
    the long rows alone over the whole span), and every row still decodes as batch 1 does."""
    monkeypatch.setattr(cache_module, "SPLIT_OVERHEAD", 0)  # split even at these tiny sizes
    base = tiny_bases[arch]
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, VOCAB, (k,), generator=gen).tolist() for k in (2, 120, 4, 3, 5, 1, 90, 6, 2, 3)]
    expected = [plain_reply(base, p, 16, []) for p in prompts]
    splits = []
    real_plan = cache_module._split_plan
    monkeypatch.setattr(cache_module, "_split_plan", lambda *a: splits.append(real_plan(*a)) or splits[-1])
    results, _ = generate_batched(base, prompts, batch_size=10, max_new_tokens=16)
    assert [(c.tokens, c.finish_reason) for c in results] == expected
    used = [s for s in splits if s is not None]
    assert used and all(sorted(rows.tolist()) == [1, 6] and short < 90 for short, rows in used)


def test_generate_batched_batch_sizes_agree(tiny_bases):
    base = tiny_bases["llama"]
    prompts = random_prompts(7, seed=2)
    expected = [plain_reply(base, p, 12, [5, 6]) for p in prompts]
    for batch in (1, 2, 4, 16):
        results, stats = generate_batched(base, prompts, batch_size=batch, max_new_tokens=12, stop_token_ids=[5, 6])
        assert [(c.tokens, c.finish_reason) for c in results] == expected, batch
        assert stats["steps"] > 0 and stats["prefill_tokens"] + stats["reused_tokens"] == sum(map(len, prompts))


def test_idle_rows_are_dropped(tiny_bases):
    base = tiny_bases["qwen2"]
    prompts = random_prompts(3, seed=3)
    expected = [plain_reply(base, p, cap, ()) for p, cap in zip(prompts, (4, 10, 16))]
    decoder = BatchedDecoder(base, batch_size=8, max_len=64, max_new_tokens=16)
    sizes, got = [], {}
    for done in decoder.run(Request(p, cap, tag=i) for i, (p, cap) in enumerate(zip(prompts, (4, 10, 16)))):
        got[done.tag] = (done.tokens, done.finish_reason)
        sizes.append(decoder.batch_size)
    assert [got[i] for i in range(3)] == expected
    assert sizes[0] == 3 and sizes[-1] == 1  # 8 rows -> the 3 busy ones -> the last one
    assert decoder.cache.k.shape[1] == 1


def test_row_capacity_ends_with_length(tiny_bases):
    base = tiny_bases["mistral"]
    prompts = [p for p in random_prompts(6, seed=4) if len(p) > 4]
    small = BaseModel.from_pretrained(base.folder, dtype="fp32", max_len=32)
    results, _ = generate_batched(base, prompts, batch_size=2, max_new_tokens=40, max_len=32)
    for prompt, done in zip(prompts, results):
        plain = generate_plain(small, prompt, max_new_tokens=40)
        assert plain.finish_reason == "context"
        assert done.finish_reason == "length" and done.tokens == plain.tokens
        assert len(done.tokens) == 32 - len(prompt) + 1


def test_follow_up_turns_reuse_the_row(tiny_bases):
    """A request that extends a finished row's prompt + reply keeps those keys/values and decodes as batch 1."""
    base = tiny_bases["llama"]
    firsts = random_prompts(4, seed=5)
    gen = torch.Generator().manual_seed(6)
    queue = [Request(p, tag=(i, 0)) for i, p in enumerate(firsts)]
    sent = {(i, 0): p for i, p in enumerate(firsts)}
    got = {}

    def source():
        return queue.pop(0) if queue else None

    decoder = BatchedDecoder(base, batch_size=2, max_len=120, max_new_tokens=10)
    for done in decoder.run(source):
        got[done.tag] = done
        conv, turn = done.tag
        if turn < 2:  # the next turn: this prompt, the reply, then a new user message
            extra = torch.randint(3, VOCAB, (5,), generator=gen).tolist()
            prompt = sent[done.tag] + done.tokens + extra
            sent[(conv, turn + 1)] = prompt
            queue.insert(0, Request(prompt, tag=(conv, turn + 1)))  # before the other conversations
    assert len(got) == 12
    for tag, done in got.items():
        assert (done.tokens, done.finish_reason) == plain_reply(base, sent[tag], 10, ()), tag
    later = [done for tag, done in got.items() if tag[1] > 0]
    assert all(done.reused_tokens >= len(sent[(t[0], t[1] - 1)]) for t, done in got.items() if t[1] > 0)
    assert decoder.stats["reused_tokens"] >= sum(d.reused_tokens for d in later) > 0


def test_padding_never_changes_results(tiny_bases):
    base = tiny_bases["qwen2"]
    prompts = random_prompts(4, seed=7, longest=12)
    longest = max(map(len, prompts))
    runs = []
    for pad in (0, 50):
        cache = base.batch_cache(4, 48)
        ids = torch.full((4, longest), pad, dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, :len(p)] = torch.tensor(p)
        out = base.forward_batch(ids, cache, n_new=[len(p) for p in prompts], logits_to_keep=None)
        runs.append((out.logits, cache))
    (logits_a, cache_a), (logits_b, cache_b) = runs
    for row, p in enumerate(prompts):
        assert torch.equal(logits_a[row, :len(p)], logits_b[row, :len(p)])
        base.reset()
        assert torch.allclose(logits_a[row, :len(p)], base(torch.tensor([p])).logits[0], atol=1e-5)
    assert cache_a.lengths.tolist() == [len(p) for p in prompts]
    # garbage in every slot past each row's length (the padding's keys, stale keys) is never attended to
    step = torch.randint(3, VOCAB, (4, 1))
    clean = base.forward_batch(step, cache_a).logits
    for row, p in enumerate(prompts):
        cache_b.k[:, row, :, len(p):] = 1e4 * torch.randn_like(cache_b.k[:, row, :, len(p):])
        cache_b.v[:, row, :, len(p):] = 1e4 * torch.randn_like(cache_b.v[:, row, :, len(p):])  # finite: 0 * nan
        # is nan in any attention kernel, and stale keys/values are always a model's finite outputs
    assert torch.equal(base.forward_batch(step, cache_b).logits, clean)
    for row, p in enumerate(prompts):
        base.reset()
        expected = base(torch.tensor([p + step[row].tolist()])).logits[0, -1]
        assert torch.allclose(clean[row, 0], expected, atol=1e-5)
    # an idle row (n_new = 0) keeps its length and its cache
    before = cache_a.k[:, 1, :, :len(prompts[1])].clone()
    base.forward_batch(step, cache_a, n_new=[1, 0, 1, 1])
    assert cache_a.lengths.tolist() == [len(p) + 2 - (row == 1) for row, p in enumerate(prompts)]
    assert torch.equal(cache_a.k[:, 1, :, :len(prompts[1])], before)


def test_tree_rows_match_batch_one(tiny_bases):
    """Per-row trees after per-row prefixes (the shape of batch > 1 verification) == batch-1 tree passes."""
    base = tiny_bases["llama"]
    gen = torch.Generator().manual_seed(8)
    prompts = random_prompts(3, seed=9, longest=20)
    cache = base.batch_cache(3, 64)
    for row, p in enumerate(prompts):
        base.forward_batch(torch.tensor([p]), cache, rows=row, logits_to_keep=0)
    trees = [random_tree(7, gen) for _ in prompts]
    tokens = torch.randint(3, VOCAB, (3, 7), generator=gen)
    masks = torch.stack([mask for _, _, mask in trees])
    positions = torch.stack([len(p) + depths for p, (_, depths, _) in zip(prompts, trees)])
    out = base.forward_batch(tokens, cache, position_ids=positions, tree_mask=masks, logits_to_keep=None)
    for row, p in enumerate(prompts):
        base.reset()
        base(torch.tensor([p]))
        _, depths, mask = trees[row]
        expected = base(tokens[row:row + 1], position_ids=len(p) + depths, tree_mask=mask).logits[0]
        assert torch.allclose(out.logits[row], expected, atol=1e-5)


def test_rows_commit_their_own_accepted_nodes(tiny_bases):
    """Trees of different sizes per row (padded), each row keeping its own accepted path: the next forward of every
    row equals batch 1 after the same tree and commit."""
    base = tiny_bases["llama"]
    gen = torch.Generator().manual_seed(18)
    prompts = random_prompts(4, seed=19, longest=20)
    sizes = [7, 1, 4, 6]
    cache = base.batch_cache(4, 64)
    for row, p in enumerate(prompts):
        base.forward_batch(torch.tensor([p]), cache, rows=row, logits_to_keep=0)
    trees = [random_tree(n, gen) for n in sizes]
    t = max(sizes)
    tokens = torch.randint(3, VOCAB, (4, t), generator=gen)
    masks = torch.eye(t, dtype=torch.bool).repeat(4, 1, 1)
    positions = torch.tensor([len(p) for p in prompts])[:, None].repeat(1, t)
    paths = []
    for row, (parents, depths, mask) in enumerate(trees):
        n = sizes[row]
        masks[row, :n, :n] = mask
        positions[row, :n] += depths
        deepest = int(torch.argmax(depths))  # keep the path from the root to the deepest node
        path = [deepest]
        while path[-1] != 0:
            path.append(parents[path[-1]])
        paths.append(path[::-1])
    starts = cache.lengths.numpy().copy()
    base.forward_batch(tokens, cache, n_new=sizes, position_ids=positions, tree_mask=masks, logits_to_keep=0)
    keep = torch.zeros(4, t, dtype=torch.long)
    for row, path in enumerate(paths):
        keep[row, :len(path)] = torch.tensor(path)
    cache.commit_rows(starts, keep, [len(path) for path in paths])
    assert cache.lengths.tolist() == [len(p) + len(path) for p, path in zip(prompts, paths)]
    nxt = torch.randint(3, VOCAB, (4, 1), generator=gen)
    out = base.forward_batch(nxt, cache).logits[:, 0]
    for row, p in enumerate(prompts):
        base.reset()
        base(torch.tensor([p]))
        _, depths, mask = trees[row]
        n = sizes[row]
        base(tokens[row:row + 1, :n], position_ids=len(p) + depths, tree_mask=mask)
        base.commit(len(p), torch.tensor(paths[row]))
        expected = base(nxt[row:row + 1]).logits[0, -1]
        assert torch.allclose(out[row], expected, atol=1e-5), row


def test_sampling_is_reproducible(tiny_bases):
    base = tiny_bases["llama"]
    prompts = random_prompts(5, seed=10)
    params = SamplingParams(temperature=0.8, top_p=0.9)
    runs = [generate_batched(base, prompts, batch_size=2, max_new_tokens=8, params=params,
                             generator=torch.Generator().manual_seed(0))[0] for _ in range(2)]
    assert [c.tokens for c in runs[0]] == [c.tokens for c in runs[1]]
    assert all(0 <= t < VOCAB for c in runs[0] for t in c.tokens)


def test_bad_requests(tiny_bases):
    base = tiny_bases["llama"]
    with pytest.raises(CloverError, match="batch size"):
        BatchedDecoder(base, batch_size=0)
    with pytest.raises(CloverError, match="max_new_tokens"):
        BatchedDecoder(base, batch_size=2, max_new_tokens=0)
    decoder = BatchedDecoder(base, batch_size=2, max_len=16, max_new_tokens=4)
    with pytest.raises(CloverError, match="does not fit"):
        list(decoder.run([Request(list(range(3, 19)))]))
    with pytest.raises(CloverError, match="empty prompt"):
        list(BatchedDecoder(base, batch_size=2, max_len=16).run([Request([])]))
    with pytest.raises(CloverError, match="max_new_tokens must be in"):
        list(BatchedDecoder(base, batch_size=2, max_len=16, max_new_tokens=4).run([Request([5], 9)]))
