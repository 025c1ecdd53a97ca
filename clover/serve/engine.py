"""One model, one worker thread, a FIFO queue of jobs.

The HTTP side validates a request, encodes its prompt (:meth:`Engine.encode_chat` / :meth:`Engine.encode_prompt`) and
submits a :class:`Job`; the worker runs jobs one at a time in arrival order through the project's own decoders
(``SpeculativeModel.stream`` with a draft, ``stream_plain`` without), and hands back text deltas and a final
:class:`Finished` through the job's ``emit`` callback. A job can be cancelled at any time (client gone): a queued one is
skipped, a running one stops at the next decoding step, so the model is free for the next job at once. Every decoder
call starts from empty KV caches, and the caches are emptied again after each job.

Stop strings are matched on the decoded text: the text is cut before the first match, and while streaming the tail that
could still become a stop string (or an unfinished multi-byte character) is held back.
"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from clover.errors import CloverError
from clover.serve.schema import APIError, bad

log = logging.getLogger("clover.serve")


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    finish_reason: str          # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    steps: int                  # decoding steps: the prefill that yields the first token + each verification step
    seconds: float
    first_token_seconds: float  # from the start of the job (not of the wait in the queue)

    @property
    def tau(self) -> float:
        return self.completion_tokens / max(self.steps, 1)


@dataclass
class Failed:
    error: APIError


@dataclass
class Job:
    ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None   # None: the base model's eos ids
    emit: Callable[[object], None] = lambda event: None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


def holdback(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` must wait: a possible start of a stop string or of a character."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    if text.endswith("\ufffd"):  # bytes of a multi-byte character still to come
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    return hold


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index where the first stop string found in ``text`` starts."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


class Engine:
    def __init__(self, stream_fn, tokenizer, template, max_len: int, device, reset_fn, description: str = ""):
        self._stream_fn, self._reset_fn = stream_fn, reset_fn
        self.tokenizer, self.template, self.max_len, self.device = tokenizer, template, max_len, torch.device(device)
        self.description = description
        # the event loop encodes prompts while the worker decodes outputs: one tokenizer call at a time, since a
        # Rust tokenizer refuses a call that changes its settings while another thread uses it
        self._tokenizer_lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._current: Job | None = None
        self.stats = {"served": 0, "cancelled": 0, "failed": 0}

    @classmethod
    def load(cls, base_model: str, draft: str | list[str] | None = None, tree: str = "dynamic",
             tree_budget: str = "auto", dtype: str = "auto", device: str = "cpu", max_len: int = 4096,
             template: str = "auto", system: str | None = None, compile: bool = False) -> "Engine":
        """Load the base model (and draft) the way ``python -m clover.cli`` does; one request at a time."""
        from clover.generate.sampling import SamplingParams

        decoding, tokenizer, chat, description = load_parts(base_model, draft, tree, tree_budget, dtype, device,
                                                            max_len, template, system, compile)
        base = decoding.base

        def stream(job: Job, generator):
            return decoding.stream(job.ids, SamplingParams(job.temperature, job.top_p, job.top_k), job.max_tokens,
                                   job.stop_token_ids, generator)

        return cls(stream, tokenizer, chat, base.max_len, base.device, decoding.reset,
                   f"{description}; {base.dtype}, {base.device}, context {base.max_len}")

    # ---- prompts ------------------------------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        try:
            with self._tokenizer_lock:
                ids = self.template.encode_prompt(messages)
        except CloverError as err:
            raise bad(str(err), "messages") from None
        self.check_length(ids, "messages")
        return ids

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            with self._tokenizer_lock:
                ids = self.tokenizer(prompt)["input_ids"]
        else:
            vocab = len(self.tokenizer)
            if any(not 0 <= t < vocab for t in prompt):
                raise bad(f"'prompt' has token ids outside the vocabulary [0, {vocab}).", "prompt")
            ids = list(prompt)
        if not ids:
            raise bad("'prompt' is empty: give at least one token.", "prompt")
        self.check_length(ids, "prompt")
        return ids

    def check_length(self, ids: list[int], param: str) -> None:
        if len(ids) >= self.max_len:
            raise bad(f"This model's maximum context length is {self.max_len} tokens, and the '{param}' alone take "
                      f"{len(ids)} tokens (room is needed for at least one new token): shorten '{param}'.", param,
                      code="context_length_exceeded")

    def _decode(self, tokens: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def room(self, ids: list[int]) -> int:
        """New tokens that fit after the prompt."""
        return self.max_len - len(ids)

    # ---- the worker ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="clover-serve-worker", daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._current is not None:
            self._current.cancel()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def admit(self) -> None:
        """Raise an :class:`APIError` when a new job cannot be taken now (this engine's queue is unbounded)."""

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    @property
    def busy(self) -> bool:
        return self._current is not None

    @property
    def running(self) -> int:
        """Jobs being decoded now."""
        return int(self._current is not None)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
                continue
            self._current = job
            try:
                last = self._run(job)
            except CloverError as err:
                self.stats["failed"] += 1
                last = Failed(bad(str(err)))
            except Exception as err:  # noqa: BLE001 - any failure becomes a 500 for this job, the server goes on
                self.stats["failed"] += 1
                log.exception("generation failed")
                last = Failed(APIError(500, f"The server failed while generating: {type(err).__name__}: {err}",
                                       type="server_error"))
            finally:
                try:
                    self._reset_fn()  # no request sees another's context
                except Exception:  # noqa: BLE001 - the next job resets the caches again before it starts
                    log.exception("resetting the caches failed")
                self._current = None
            if last is not None:  # only now: the model is free and clean when the client hears the end
                job.emit(last)

    def _run(self, job: Job) -> Finished | None:
        """Stream the job's text deltas; return its final event (None when it was cancelled)."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(job.seed if job.seed is not None else random.SystemRandom().getrandbits(63))
        output = JobOutput(self, job)
        stream = self._stream_fn(job, generator)
        try:
            while not job.cancelled.is_set():
                try:
                    chunk = next(stream)
                except StopIteration as stop:
                    return self._served(output.end(stop.value.finish_reason))
                if output.feed(chunk):
                    return self._served(output.end("stop"))
        finally:
            stream.close()
        self.stats["cancelled"] += 1
        log.info("cancelled after %d tokens (client gone)", len(output.tokens))
        return None

    def _served(self, done: Finished) -> Finished:
        self.stats["served"] += 1
        log.info("%d prompt + %d new tokens in %.2f s (%.1f tokens/s), %d steps, tau %.2f, %s", done.prompt_tokens,
                 done.completion_tokens, done.seconds, done.completion_tokens / max(done.seconds, 1e-9), done.steps,
                 done.tau, done.finish_reason)
        return done


class JobOutput:
    """A job's output as it is decoded: the committed tokens, and their text sent as deltas up to what a stop string
    (or an unfinished character) could still change."""

    def __init__(self, engine: Engine, job: Job):
        self.engine, self.job = engine, job
        self.tokens: list[int] = []
        self.sent, self.steps, self.first = 0, 0, None
        self.start = time.perf_counter()

    def feed(self, chunk: list[int]) -> bool:
        """Add a step's tokens and emit what is safe to send; True when a stop string ends the output here."""
        self.steps += 1
        self.tokens.extend(chunk)
        if self.first is None:
            self.first = time.perf_counter() - self.start
        text = self.engine._decode(self.tokens)
        cut = find_stop(text, self.job.stop)
        if cut is not None:
            if cut > self.sent:
                self.job.emit(Delta(text[self.sent:cut]))
            self.sent = len(text)  # nothing more is sent
            return True
        safe = len(text) - holdback(text, self.job.stop)
        if safe > self.sent:
            self.job.emit(Delta(text[self.sent:safe]))
            self.sent = safe
        return False

    def end(self, finish_reason: str) -> Finished:
        """The final event after the decoder ended the output (``finish_reason``: stop, length or context), the
        held-back text sent first."""
        finish = "stop" if finish_reason == "stop" else "length"  # "context" -> "length"
        text = self.engine._decode(self.tokens)
        if self.sent < len(text):
            cut = find_stop(text, self.job.stop)
            if cut is not None:
                text, finish = text[:cut], "stop"
            if len(text) > self.sent:
                self.job.emit(Delta(text[self.sent:]))
        return Finished(finish, len(self.job.ids), len(self.tokens), self.steps, time.perf_counter() - self.start,
                        self.first or 0.0)


def load_parts(base_model, draft, tree: str, tree_budget: str, dtype: str, device: str, max_len: int, template: str,
               system: str | None, compile: bool):
    """``(decoding, tokenizer, chat template, description)`` for an engine, loaded as ``clover generate`` loads
    them."""
    from clover.cli import _parse_tree
    from clover.data.templates import get_template
    from clover.generate.loader import load_decoding
    from clover.model.loading import load_tokenizer

    tokenizer = load_tokenizer(base_model)
    chat = get_template(tokenizer, template, system_prompt=system)
    tree_arg = _parse_tree(tree) if draft and tree.lstrip().startswith("[") else tree
    budget = tree_budget if not draft or tree_budget == "auto" else _budget(tree_budget)
    decoding = load_decoding(base_model, draft, tree=tree_arg, tree_budget=budget, dtype=dtype, device=device,
                             max_len=max_len, compile=compile)
    description = (f"speculative decoding with {decoding.model.description}, tree {tree}, budget {tree_budget}"
                   if decoding.speculative else "plain decoding (no draft)")
    return decoding, tokenizer, chat, description


def _budget(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise CloverError(f"--tree-budget must be a number of tree nodes or 'auto', got {text!r}") from None
