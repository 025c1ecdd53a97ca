"""Answer generation and the peer comparison, end to end on SmolLM2 in CI size (two questions, a few tokens)."""
from __future__ import annotations

import json

import pytest

from clover.errors import CloverError
from clover.evaluation.answers import is_success, load_answers
from clover.evaluation.compare import run_comparison
from clover.evaluation.gen_answer import generate_answers
from clover.model.checkpoint import init_draft, save_draft
from tests.conftest import SMOLLM2


@pytest.fixture(scope="module")
def drafts(tmp_path_factory, smollm2_base):
    root = tmp_path_factory.mktemp("drafts")
    return {kind: save_draft(init_draft(kind, smollm2_base), root / kind) for kind in ("clover2", "eagle")}


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "questions.jsonl"
    rows = [{"question_id": 7, "category": "writing", "turns": ["Say hello.", "Now say goodbye."]},
            {"question_id": 9, "category": "qa", "turns": ["What is 2 + 2?"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_plain_answers_count_exactly_and_resume(tmp_path, questions):
    path = tmp_path / "baseline.jsonl"
    generate_answers("baseline", SMOLLM2, path, questions, max_new_tokens=6, warmup=0, progress=False)
    answers = load_answers(path)
    assert [a["question_id"] for a in answers] == [7, 9]
    first = answers[0]["choices"][0]
    assert len(first["turns"]) == 2  # the multi-turn question kept its conversation
    for choice in (a["choices"][0] for a in answers):
        for new, steps, accepts in zip(choice["new_tokens"], choice["idxs"], choice["accept_lengths_per_turn"]):
            assert 1 <= new <= 6 and steps == new and accepts == [1] * new  # plain decoding: τ = 1 exactly
        assert choice["decoding_steps"] == choice["idxs"]
        assert choice["accept_lengths"] == [1] * sum(choice["new_tokens"])  # flat over the turns (Spec-Bench)
    before = path.read_text()
    generate_answers("baseline", SMOLLM2, path, questions, max_new_tokens=6, warmup=0, progress=False)
    assert path.read_text() == before  # every question was done: nothing regenerated


def test_speculative_answers_need_a_draft(tmp_path, questions):
    for method in ("clover", "eagle+lookup"):
        with pytest.raises(CloverError, match="needs --draft"):
            generate_answers(method, SMOLLM2, tmp_path / "a.jsonl", questions, warmup=0, progress=False)


@pytest.mark.parametrize("method", ["clover+eagle", "lookup+lookup", "pld", "baseline+lookup"])
def test_unknown_methods_are_errors(tmp_path, questions, method):
    with pytest.raises(CloverError, match="unknown method"):
        generate_answers(method, SMOLLM2, tmp_path / "a.jsonl", questions, warmup=0, progress=False)


def test_comparison_runs_end_to_end(tmp_path, questions, drafts):
    """Every method on the same questions; one question is too long for the project's context window (4,096 tokens)
    but not for transformers' (8,192): the project's methods fail it, the table and JSON say so, and speeds and τ
    are computed over the two questions every method answered."""
    long_question = {"question_id": 11, "category": "summarization", "turns": ["word " * 5000]}
    question_file = tmp_path / "questions.jsonl"
    question_file.write_text(questions.read_text() + json.dumps(long_question) + "\n")
    results = run_comparison(tmp_path / "cmp", SMOLLM2, [drafts["clover2"], drafts["eagle"]], question_file,
                             max_new_tokens=5, tree="mc_sim_7b_63", warmup=0, progress=False)
    assert set(results["methods"]) == {"hf", "hf_pld", "baseline", "eagle", "clover", "lookup", "recycle",
                                       "lookup+recycle", "clover+lookup+recycle", "eagle+lookup+recycle"}
    assert results["questions"]["asked"] == 3 and results["questions"]["answered_by_every_method"] == 2
    for method, r in results["methods"].items():
        peer = method in ("hf", "hf_pld")
        assert (r["answered"], r["failed"]) == ((3, 0) if peer else (2, 1)), method
        assert (r["first_error"] is None) if peer else ("question 11" in r["first_error"] and
                                                         "does not fit the context window" in r["first_error"])
        assert r["compared_with_plain"] == 2 and r["speed"]["overall"]["questions"] == 2, method
        assert r["tau"]["overall"]["questions"] == 2, method
    assert results["methods"]["baseline"]["tau"]["overall"]["tau"] == 1.0
    assert results["methods"]["hf"]["tau"]["overall"]["tau"] == 1.0
    assert results["methods"]["baseline"]["identical_to_plain"] == 2
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert "Clover-2" in table and "transformers prompt lookup" in table and "Clover-2 + lookup + recycling" in table
    assert "| answered | failed |" in table and "over the 2 of 3 questions every method answered" in table
    assert "- clover plain failed 1 question(s); first error: question 11: CloverError: prompt of" in table
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert saved["methods"]["lookup"]["failed"] == 1 and saved["methods"]["hf"]["failed"] == 0
    # the plots go to the run's folder, nowhere else
    assert (tmp_path / "cmp" / "tau_per_group.png").stat().st_size > 0
    assert (tmp_path / "cmp" / "speedup_per_group.png").stat().st_size > 0
    # every method's file holds Spec-Bench's fields, consistent with ours
    for method in results["methods"]:
        lines = (tmp_path / "cmp" / "answers" / f"{method}.jsonl").read_text().splitlines()
        for choice in (c for line in lines for c in json.loads(line).get("choices", [])):
            assert sum(choice["accept_lengths"]) == sum(choice["new_tokens"])
            assert len(choice["accept_lengths"]) == sum(choice["decoding_steps"])
            assert choice["decoding_steps"] == choice["idxs"]
            assert choice["accept_lengths"] == [a for turn in choice["accept_lengths_per_turn"] for a in turn]
            if method != "hf_pld":  # the prefill commits exactly the first token of every turn
                assert all(turn[0] == 1 for turn in choice["accept_lengths_per_turn"])
    # greedy speculative answers are the plain answers
    plain = [a for a in load_answers(tmp_path / "cmp" / "answers" / "baseline.jsonl") if is_success(a)]
    for method in set(results["methods"]) - {"baseline", "hf_pld"}:
        other = [a for a in load_answers(tmp_path / "cmp" / "answers" / f"{method}.jsonl") if is_success(a)][:2]
        assert [a["choices"][0]["turns"] for a in other] == [a["choices"][0]["turns"] for a in plain]
