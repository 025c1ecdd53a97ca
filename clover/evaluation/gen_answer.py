"""Answer files for a Spec-Bench-format question file, one JSON line per question (see
:mod:`clover.evaluation.answers`), for the project's plain decoding (``baseline``), Clover-2 (``clover``), EAGLE-1
(``eagle``), the training-free sources ``lookup`` (prompt/suffix lookup) and ``recycle`` (token recycling), any
combination of one trained draft and those sources in one tree, joined by ``+`` (``lookup+recycle``,
``clover+lookup+recycle``), and the transformers peers ``hf`` (plain ``generate``) and ``hf_pld`` (prompt-lookup
decoding).

Every method gets the same prompts (the base model's chat template; multi-turn questions keep the conversation with
the model's own earlier answers), the same ``--max-new-tokens`` cap and stop tokens, a warm-up before timing, and a
seed per (question, choice). Runs resume: questions already answered in the answer file are skipped; a failed
question is recorded as a failure, never with numbers.

    clover gen-answer --method clover --base-model smollm2-135m-instruct \\
        --draft runs/clover2 --answer-file answers/clover.jsonl

(``python -m clover.evaluation.gen_answer`` is the same command.)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from clover.args import (CloverArgumentParser, add_answer_file, add_base_model, add_draft, add_max_new_tokens,
                         add_questions, add_runtime, add_sampling, add_tree, non_negative_int, positive_int)
from clover.errors import CloverError, run_cli
from clover.evaluation.answers import (answer_record, append_answer, default_question_file, done_question_ids,
                                       error_record, load_questions, make_choice, sort_answer_file)
from clover.io import device_timer
from clover.generate.sources import SOURCE_NAMES, split_drafts
from clover.model.registry import draft_for_method, draft_methods

PEERS = ("hf", "hf_pld")  # transformers' own decoders
# the methods --help lists; any "+" combination of at most one draft method and the sources is a method too
METHODS = ("baseline", *draft_methods(), *SOURCE_NAMES, "+".join(SOURCE_NAMES),
           *("+".join((m, *SOURCE_NAMES)) for m in draft_methods()), *PEERS)


def method_parts(method: str):
    """``(draft class or None, source names)`` of the project's speculative method ``method`` (``clover``,
    ``lookup+recycle``, ``eagle+lookup`` ...); None for ``baseline`` and the peers. Unknown names are errors."""
    if method == "baseline" or method in PEERS:
        return None
    drafted, sources = None, []
    parts = method.split("+")
    for part in parts:
        cls = draft_for_method(part)
        if cls is not None and drafted is None:
            drafted = cls
        elif part in SOURCE_NAMES and part not in sources:
            sources.append(part)
        else:
            raise CloverError(f"unknown method {method!r}: a method is baseline, {', '.join(PEERS)}, or a '+' "
                              f"combination of at most one of {', '.join(draft_methods())} and the sources "
                              f"{', '.join(SOURCE_NAMES)}, each once (e.g. {METHODS[-3]})")
    return drafted, sources


def method_type(text: str) -> str:
    """argparse type of ``--method``."""
    try:
        method_parts(text)
    except CloverError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


class Decoder:
    """``decode(ids, seed) -> (tokens, accept_lengths)`` for one method, all methods on the same footing."""

    def __init__(self, method: str, base_model: str, draft: str | None, dtype: str, device: str, max_len: int,
                 tree, budget, temperature: float, top_p: float, top_k: int, max_new_tokens: int, stop_ids,
                 compile: bool = False):
        from clover.generate.sampling import SamplingParams

        self.method, self.device, self.max_new_tokens, self.stop_ids = method, device, max_new_tokens, list(stop_ids)
        self.params = SamplingParams(temperature, top_p, top_k)
        if method in PEERS:
            from transformers import AutoModelForCausalLM

            from clover.model.base import parse_dtype
            from clover.model.loading import resolve_model_path

            torch_dtype = parse_dtype(dtype, torch.device(device))
            self.hf = AutoModelForCausalLM.from_pretrained(resolve_model_path(base_model), dtype=torch_dtype)
            self.hf = self.hf.to(device).eval()
            return
        drafted, sources = method_parts(method) or (None, [])  # the project's own decoding, speculative or plain
        checkpoint, named = split_drafts(draft)
        if named:
            raise CloverError(f"--draft {named[0]}: name the training-free sources in --method (e.g. "
                              f"--method lookup+recycle); --draft is the checkpoint folder of a trained draft")
        if drafted is not None and not checkpoint:
            raise CloverError(f"--method {method} needs --draft (a {drafted.label} checkpoint folder or shipped name)")
        from clover.generate.loader import load_decoding

        self.decoding = load_decoding(base_model, [checkpoint] * (drafted is not None) + sources,
                                      draft_type=drafted and drafted.draft_type, tree=tree, tree_budget=budget,
                                      dtype=dtype, device=device, max_len=max_len, compile=compile)

    def decode(self, ids: list[int], seed: int) -> tuple[list[int], list[int], int | None]:
        """``(tokens, accept lengths, tokens verified after the prefill)``; the last is None unless the method is
        the project's speculative decoding."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        if self.method not in PEERS:
            r = self.decoding.generate(ids, self.params, self.max_new_tokens, self.stop_ids, generator)
            return r.tokens, r.accept_lengths, (sum(r.verified) if self.decoding.speculative else None)
        return (*self._decode_hf(ids, seed), None)

    def _decode_hf(self, ids, seed):
        chunks = _ChunkRecorder()
        torch.manual_seed(seed)
        p = self.params
        kwargs = dict(max_new_tokens=self.max_new_tokens, eos_token_id=self.stop_ids, pad_token_id=self.stop_ids[0],
                      streamer=chunks, do_sample=not p.greedy)
        if not p.greedy:
            kwargs.update(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k)
        if self.method == "hf_pld":
            kwargs["prompt_lookup_num_tokens"] = 10
        with torch.no_grad():
            out = self.hf.generate(torch.tensor([ids], device=self.device), **kwargs)[0, len(ids):].tolist()
        tokens, accepts = [], []
        for size in chunks.sizes:  # cut at the first stop token, like the project's own loops
            take = size
            for j in range(size):
                if out[len(tokens) + j] in self.stop_ids:
                    take = j + 1
                    break
            tokens.extend(out[len(tokens):len(tokens) + take])
            accepts.append(take)
            if take < size or (tokens and tokens[-1] in self.stop_ids):
                break
        return tokens, accepts


class _ChunkRecorder:
    """A transformers streamer that records how many tokens each generation step committed."""

    def __init__(self):
        self.sizes, self._prompt_seen = [], False

    def put(self, value):
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        self.sizes.append(int(value.numel()))

    def end(self):
        pass


def answer_question(decoder: Decoder, template, tokenizer, question: dict, choice: int, seed: int):
    """Generate every turn of one question; return (texts, accept lengths per turn, seconds per turn, tokens
    verified per turn or None)."""
    messages, texts, accepts, times, verified = [], [], [], [], []
    for turn in question["turns"]:
        messages.append({"role": "user", "content": turn})
        ids = template.encode_prompt(messages)
        with device_timer(decoder.device) as timer:
            tokens, accept_lengths, checked = decoder.decode(ids, seed + 1000 * choice)
        times.append(timer.seconds)
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": text})
        texts.append(text)
        accepts.append(accept_lengths)
        verified.append(checked)
    return texts, accepts, times, (None if None in verified else verified)


def generate_answers(method: str, base_model: str, answer_file, question_file=None, draft: str | None = None,
                     model_id: str | None = None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     max_new_tokens: int = 256, num_choices: int = 1, tree="dynamic", tree_budget="auto",
                     question_begin=None, question_end=None, dtype="auto", device="cpu", max_len: int = 4096,
                     template_name: str = "auto", seed: int = 0, warmup: int = 1, progress: bool = True,
                     per_group: int | None = None, compile: bool = False) -> Path:
    from clover.data.templates import get_template
    from clover.model.loading import load_tokenizer

    if num_choices < 1:
        raise CloverError(f"--num-choices must be >= 1, got {num_choices}")
    questions = load_questions(question_file or default_question_file(), question_begin, question_end, per_group)
    answer_file = Path(answer_file)
    done = done_question_ids(answer_file)
    todo = [q for q in questions if q["question_id"] not in done]
    tokenizer = load_tokenizer(base_model)
    template = get_template(tokenizer, template_name)
    model_id = model_id or f"{Path(str(base_model)).name}-{method}-temperature-{temperature}"
    if not todo:
        print(f"{answer_file}: all {len(questions)} questions already answered")
        return answer_file
    decoder = Decoder(method, base_model, draft, dtype, device, max_len, tree, tree_budget,
                      temperature, top_p, top_k, max_new_tokens, template.stop_token_ids, compile)
    header = dict(model_id=model_id, base_model=str(base_model), method=method)
    return answer_questions(decoder, questions, todo, answer_file, template, tokenizer, header, seed, num_choices,
                            warmup, progress)


def answer_questions(decoder, questions: list[dict], todo: list[dict], answer_file: Path, template, tokenizer,
                     header: dict, seed: int, num_choices: int = 1, warmup: int = 0, progress: bool = True) -> Path:
    """Answer the questions ``todo`` with ``decoder`` (anything with ``decode(ids, seed)`` and ``device``, as
    :class:`Decoder`), appending one record per question (``header``: model_id, base_model, method) to
    ``answer_file``, after ``warmup`` untimed runs of the first of ``questions``; sort the file at the end."""
    for _ in range(warmup):  # warm-up: first question, untimed, discarded
        answer_question(decoder, template, tokenizer, questions[0], 0, seed)
    for question in tqdm(todo, desc=f"{header['method']} answers", disable=not progress):
        qid, category = question["question_id"], question["category"]
        try:
            choices = [make_choice(c, *answer_question(decoder, template, tokenizer, question, c, seed + qid))
                       for c in range(num_choices)]
            record = answer_record(qid, category, choices=choices, **header)
        except (RuntimeError, ValueError, CloverError) as err:  # record the failure, never stale numbers
            record = error_record(qid, category, error=f"{type(err).__name__}: {err}", **header)
        append_answer(answer_file, record)
    sort_answer_file(answer_file)
    return answer_file


def build_parser() -> argparse.ArgumentParser:
    p = CloverArgumentParser(prog="python -m clover.evaluation.gen_answer", description=__doc__)
    p.add_argument("--method", required=True, type=method_type, metavar="METHOD",
                   help="one of " + ", ".join(METHODS) + ", or another '+' combination of one trained draft's method "
                        "and the sources")
    add_base_model(p)
    add_draft(p, help="draft checkpoint folder or shipped draft name, e.g. clover2-smollm2-135m-instruct (the methods "
                      "with clover or eagle in them)")
    add_questions(p)
    add_answer_file(p, help="JSONL to append to (questions already in it are skipped)")
    p.add_argument("--model-id", default=None,
                   help="model_id of every line (default: <model>-<method>-temperature-<T>)")
    add_sampling(p, seed_help="base seed; each question and choice derives its own")
    add_max_new_tokens(p, 256, help="cap per turn, the same for every method")
    p.add_argument("--num-choices", type=positive_int, default=1, metavar="K",
                   help="answers per question (different seeds)")
    add_tree(p)
    p.add_argument("--template", default="auto", help="chat template name (auto: from the model)")
    add_runtime(p)
    p.add_argument("--warmup", type=non_negative_int, default=1, metavar="N",
                   help="untimed warm-up runs of the first question")
    return p


def main(argv=None) -> None:
    a = build_parser().parse_args(argv)
    path = generate_answers(a.method, a.base_model, a.answer_file, a.question_file, a.draft,
                            a.model_id, a.temperature, a.top_p, a.top_k, a.max_new_tokens, a.num_choices, a.tree,
                            a.tree_budget, a.question_begin, a.question_end, a.dtype, a.device, a.max_len, a.template,
                            a.seed, a.warmup, per_group=a.per_group, compile=a.compile)
    print(f"wrote {path}")


if __name__ == "__main__":
    run_cli(main)
