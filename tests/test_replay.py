"""τ by replay: replaying the greedy answer through a draft gives the accept lengths of greedy speculative decoding,
step for step; the reference answers are decoded once and kept; a replay that leaves its reference is an error."""
from __future__ import annotations

import pytest
import torch

from clover.errors import CloverError
from clover.evaluation.replay import ReferenceAnswers, replay_answer
from clover.generate.plain import generate_plain
from tests.test_batched_speculative import VOCAB, make, private_cache, tiny_base  # noqa: F401 (fixtures)

STOP = (5,)


def prompts(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("kind,tree,budget", [("clover2", "mc_sim_7b_63", None), ("clover2", "dynamic", 6),
                                              ("eagle", "mc_sim_7b_63", None), ("eagle", "dynamic", 10)])
def test_replay_equals_decoding(tiny_base, kind, tree, budget):
    model = make(tiny_base, kind, tree=tree, budget=budget)
    accepted = 0
    for prompt in prompts(6, seed=3):
        decoded = model.generate(prompt, max_new_tokens=40, stop_token_ids=STOP)
        replayed = replay_answer(model, prompt, decoded.tokens, 40, STOP)
        assert replayed.tokens == decoded.tokens
        assert replayed.accept_lengths == decoded.accept_lengths
        assert replayed.verified == decoded.verified
        accepted += decoded.new_tokens - decoded.steps
    assert accepted > 0  # the drafts get tokens accepted, so the comparison means something


def test_replay_refuses_a_foreign_answer(tiny_base):
    model = make(tiny_base, "clover2", tree="mc_sim_7b_63")
    prompt = prompts(1, seed=4)[0]
    answer = generate_plain(tiny_base, prompt, max_new_tokens=20, stop_token_ids=STOP).tokens
    with pytest.raises(CloverError, match="max_new_tokens"):
        replay_answer(model, prompt, answer, 40, STOP)  # a longer cap than the answer was made with
    with pytest.raises(CloverError, match="trained draft alone"):
        replay_answer(make(tiny_base, "lookup"), prompt, answer, 20, STOP)


def test_reference_answers_are_decoded_once(tiny_base, tmp_path):
    path = tmp_path / "reference.jsonl"
    prompt = prompts(1, seed=5)[0]
    first = ReferenceAnswers(path, "tiny").get(tiny_base, prompt, 16, STOP)
    assert first == generate_plain(tiny_base, prompt, max_new_tokens=16, stop_token_ids=STOP).tokens
    kept = ReferenceAnswers(path, "tiny")
    assert kept.answers == {kept.key(prompt, 16, STOP): first}  # read back from the file
    assert kept.get(None, prompt, 16, STOP) == first  # no model needed: nothing is decoded again
    assert kept.key(prompt, 17, STOP) != kept.key(prompt, 16, STOP)
