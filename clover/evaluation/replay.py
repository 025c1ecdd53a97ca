"""τ of a trained draft under greedy decoding, by replaying the base model's greedy answers through the draft.

Greedy speculative decoding outputs exactly the base model's greedy answer, so how many tokens each step accepts
depends only on that answer and on the trees the draft proposes along it. The replay walks each answer as the
decoding loop would: the draft proposes the step's tree from the (hidden state, token) pairs of everything committed
so far (:meth:`SpeculativeModel.propose`), the step accepts the longest path of the tree that the answer continues
(the same :func:`~clover.generate.verify.accept_path` as verification), and the draft is fed the accepted positions
(:meth:`SpeculativeModel.observe`). The base model runs once per turn, over the whole prompt and answer, instead of
once per step over the tree: the replay of a Spec-Bench run takes a fraction of its decoding time, which is what
makes τ at many training snapshots affordable on a CPU.

What differs from decoding: the hidden states the draft reads come from that one forward, not from the steps' tree
forwards (fp32 rounding; a near-tie among the draft's top candidates can rarely flip), and the ``auto`` tree sizes
each step with the replay step's own time outside verification (decoding measures its step). The greedy answers are
computed once with plain decoding and kept in ``--reference-file``, keyed by prompt, for every later replay. Times in
the answer file are the replay's, not decoding times: the records' ``model_id`` ends in ``-replay``.

    python -m clover.evaluation.replay --method clover --draft clover2-smollm2-135m-instruct \\
        --tree mc_sim_7b_63 --question-file spec_bench_question.jsonl --per-group 10 --max-new-tokens 128 \\
        --answer-file curve/final_mc_sim.jsonl --reference-file curve/reference.jsonl
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from clover.args import (CloverArgumentParser, add_answer_file, add_base_model, add_draft, add_dtype, add_max_len,
                         add_max_new_tokens, add_questions, add_tree)
from clover.errors import CloverError, run_cli
from clover.io import append_jsonl, read_jsonl
from clover.evaluation.answers import default_question_file, done_question_ids, load_questions
from clover.evaluation.gen_answer import answer_questions, method_parts, method_type
from clover.generate.output import GenerationResult, OutputTracker
from clover.generate.plain import generate_plain
from clover.generate.sampling import SamplingParams
from clover.generate.speculative import SpeculativeModel
from clover.generate.verify import accept_path

MAX_TREE_DEPTH = 64  # deeper than any tree a step verifies


def replay_answer(model: SpeculativeModel, prompt: list[int], answer: list[int], max_new_tokens: int,
                  stop_token_ids) -> GenerationResult:
    """Greedy speculative decoding of ``prompt`` by ``model``, replayed along the base model's greedy ``answer`` (its
    output for this prompt, ``max_new_tokens`` and stop tokens): the result's tokens are ``answer``, its accept lengths
    and verified tree sizes those of the replayed steps."""
    if model.sources:
        raise CloverError("the replay measures a trained draft alone: the training-free sources learn from the "
                          "base model's logits at every tree node, which a replay does not compute")
    base, state = model.base, model.state
    seq = torch.tensor([prompt + answer], device=base.device)
    n_prompt = len(prompt)
    with torch.inference_mode():
        hidden = getattr(base(seq, logits_to_keep=0, use_cache=False), model.hidden_attr)
    # the token after position j: what a tree node at that position must be followed by (-1 past the answer)
    following = torch.cat([seq[0, 1:], torch.full((MAX_TREE_DEPTH + 1,), -1, device=base.device)])
    tracker = OutputTracker(max_new_tokens, stop_token_ids)
    model.reset()
    root = seq[0, n_prompt]
    tracker.add([int(root)])
    model.begin(state, seq[:, :n_prompt], root, None, hidden[:, :n_prompt])
    p = n_prompt  # the root's position
    with torch.inference_mode():
        while not tracker.done:
            step_start = time.perf_counter()
            tree, depth = model.propose(state, root)
            if p + tree.size > base.max_len:
                tracker.result.finish_reason = "context"
                break
            verdict = accept_path(tree, following[p + tree.depths])
            fed = hidden.new_zeros(1, tree.size, hidden.shape[-1])
            fed[0, verdict.nodes] = hidden[0, p:p + verdict.accepted + 1]
            model.observe(state, tree, verdict, None, fed, depth)
            if model.cost is not None:  # the step's work outside verification, as decoding measures it
                model.note_step_overhead(time.perf_counter() - step_start)
            tracker.result.verified.append(tree.size)
            committed = tracker.add(verdict.committed)
            if -1 in committed:
                raise CloverError("the replay ran past the end of the reference answer: it was made with another "
                                  "max_new_tokens or other stop tokens")
            p += verdict.accepted + 1
            root = verdict.bonus
    full = tracker.result.finish_reason != "context"  # a full window ends it where decoding would, the root committed
    if tracker.result.tokens != (answer if full else answer[:p - n_prompt + 1]):
        raise CloverError("the replay did not follow the reference answer: it was made with another "
                          "max_new_tokens or other stop tokens")
    return tracker.result


class ReferenceAnswers:
    """The base model's greedy answers, computed with plain decoding the first time a prompt is asked for and kept in
    a JSONL file (one line per prompt: a key of the model (``base_model``: its name, and dtype where it matters),
    prompt, cap and stop tokens, and the answer)."""

    def __init__(self, path: Path | None, base_model: str):
        self.path, self.base_model = path, str(base_model)
        self.answers: dict[str, list[int]] = {}
        for record in read_jsonl(path) if path is not None else []:
            self.answers[record["key"]] = record["answer"]

    def key(self, prompt: list[int], max_new_tokens: int, stop_token_ids) -> str:
        text = json.dumps([self.base_model, prompt, max_new_tokens, sorted(stop_token_ids)])
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, base, prompt: list[int], max_new_tokens: int, stop_token_ids) -> list[int]:
        key = self.key(prompt, max_new_tokens, stop_token_ids)
        if key not in self.answers:
            result = generate_plain(base, prompt, params=SamplingParams(), max_new_tokens=max_new_tokens,
                                    stop_token_ids=stop_token_ids)
            self.answers[key] = result.tokens
            if self.path is not None:
                append_jsonl(self.path, {"key": key, "answer": result.tokens})
        return self.answers[key]


class ReplayDecoder:
    """``decode(ids, seed)`` as :class:`clover.evaluation.gen_answer.Decoder`'s, by replay (greedy only)."""

    def __init__(self, model: SpeculativeModel, reference: ReferenceAnswers, max_new_tokens: int, stop_token_ids):
        self.model, self.reference = model, reference
        self.max_new_tokens, self.stop_ids = max_new_tokens, list(stop_token_ids)
        self.device = str(model.base.device)

    def decode(self, ids: list[int], seed: int) -> tuple[list[int], list[int], int]:
        answer = self.reference.get(self.model.base, list(ids), self.max_new_tokens, self.stop_ids)
        result = replay_answer(self.model, list(ids), answer, self.max_new_tokens, self.stop_ids)
        return result.tokens, result.accept_lengths, sum(result.verified)


def replay_answers(method: str, base_model: str, draft: str, answer_file, reference_file=None, question_file=None,
                   max_new_tokens: int = 256, tree="dynamic", tree_budget="auto", question_begin=None,
                   question_end=None, per_group: int | None = None, dtype="auto", device="cpu", max_len: int = 4096,
                   template_name: str = "auto", progress: bool = True) -> Path:
    """Answer files as ``gen_answer`` writes them (greedy), with accept lengths by replay."""
    from clover.data.templates import get_template
    from clover.generate.loader import load_decoding
    from clover.model.loading import load_tokenizer

    drafted, sources = method_parts(method) or (None, [])
    if drafted is None or sources:
        raise CloverError(f"--method {method}: the replay measures one trained draft alone (clover or eagle)")
    questions = load_questions(question_file or default_question_file(), question_begin, question_end, per_group)
    answer_file = Path(answer_file)
    done = done_question_ids(answer_file)
    todo = [q for q in questions if q["question_id"] not in done]
    if not todo:
        print(f"{answer_file}: all {len(questions)} questions already answered")
        return answer_file
    tokenizer = load_tokenizer(base_model)
    template = get_template(tokenizer, template_name)
    decoding = load_decoding(base_model, draft, draft_type=drafted.draft_type, tree=tree, tree_budget=tree_budget,
                             dtype=dtype, device=device, max_len=max_len)
    # keyed by model and dtype too: another dtype can give another greedy answer
    reference = ReferenceAnswers(Path(reference_file) if reference_file else None,
                                 f"{base_model}|{decoding.base.dtype}")
    decoder = ReplayDecoder(decoding.model, reference, max_new_tokens, template.stop_token_ids)
    header = dict(model_id=f"{Path(str(base_model)).name}-{method}-temperature-0.0-replay",
                  base_model=str(base_model), method=method)
    return answer_questions(decoder, questions, todo, answer_file, template, tokenizer, header, seed=0,
                            progress=progress)


def build_parser():
    p = CloverArgumentParser(prog="python -m clover.evaluation.replay", description=__doc__)
    p.add_argument("--method", required=True, type=method_type, metavar="METHOD",
                   help="the trained draft's method: clover or eagle")
    add_base_model(p)
    add_draft(p, help="draft checkpoint folder or shipped draft name, e.g. clover2-smollm2-135m-instruct")
    add_questions(p)
    add_answer_file(p, help="JSONL to append to (questions already in it are skipped)")
    p.add_argument("--reference-file", type=Path, default=None,
                   help="JSONL of the base model's greedy answers, read and extended (default: none kept; each run "
                        "decodes them again)")
    add_max_new_tokens(p, 256, help="cap per turn, as in the decoding run it stands for")
    add_tree(p)
    p.add_argument("--template", default="auto", help="chat template name (auto: from the model)")
    add_dtype(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default %(default)s)")
    add_max_len(p, 4096, "the base model's context window, as in the decoding run")
    return p


def main(argv=None) -> None:
    a = build_parser().parse_args(argv)
    if not a.draft:
        raise CloverError("--draft is required: the replay measures a trained draft")
    path = replay_answers(a.method, a.base_model, a.draft, a.answer_file, a.reference_file, a.question_file,
                          a.max_new_tokens, a.tree, a.tree_budget, a.question_begin, a.question_end, a.per_group,
                          a.dtype, a.device, a.max_len, a.template)
    print(f"wrote {path}")


if __name__ == "__main__":
    run_cli(main)
