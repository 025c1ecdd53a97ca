"""The batched engine: concurrent requests decode together, plain or speculative, in one
:class:`~clover.generate.batched_speculative.BatchedSpeculativeDecoder` of ``--max-batch-size`` rows.

The worker thread admits waiting jobs into free rows (the jobs taken at once prefilled together), runs one step for
every busy row, and turns each row's new tokens into text deltas (:class:`~clover.serve.engine.JobOutput`: stop
strings, held-back tails).
A job that is cancelled (client gone) or ends on a stop string frees its row before the next step; a finished job's
final event carries its usage, τ included. At most ``max_waiting`` jobs wait for a row: :meth:`BatchedEngine.admit`
refuses more with 429 and a ``Retry-After`` estimate before any response starts.
"""
from __future__ import annotations

import logging
import math
import queue
import random

from clover.errors import CloverError
from clover.generate.batched_speculative import BatchedSpeculativeDecoder, SpeculativeRequest
from clover.generate.sampling import SamplingParams
from clover.serve.engine import Engine, Failed, Job, JobOutput, load_parts
from clover.serve.schema import APIError, bad

log = logging.getLogger("clover.serve")


class BatchedEngine(Engine):
    """:class:`Engine` whose worker decodes up to ``decoder.batch_size`` jobs at once; ``max_waiting`` bounds the
    queue (0: unbounded)."""

    def __init__(self, decoder: BatchedSpeculativeDecoder, tokenizer, template, max_len: int, device,
                 description: str = "", max_waiting: int = 64):
        super().__init__(None, tokenizer, template, max_len, device, lambda: None, description)
        self.decoder, self.max_waiting = decoder, max_waiting
        self._running: dict[int, tuple[Job, JobOutput]] = {}
        self._seconds_per_job = 5.0  # running mean of a job's time in a row, for Retry-After

    @classmethod
    def load(cls, base_model: str, draft: str | list[str] | None = None, tree: str = "dynamic",
             tree_budget: str = "auto", dtype: str = "auto", device: str = "cpu", max_len: int = 4096,
             template: str = "auto", system: str | None = None, compile: bool = False, max_batch_size: int = 8,
             max_waiting: int = 64) -> "BatchedEngine":
        """Load the base model (and draft) as :meth:`Engine.load` does, for ``max_batch_size`` rows of ``max_len``
        tokens; with the ``auto`` tree, the verification cost at every batch size is measured now (once per
        machine, then read from the cache)."""
        decoding, tokenizer, chat, description = load_parts(base_model, draft, tree, tree_budget, dtype, device,
                                                            max_len, template, system, compile)
        base = decoding.base
        decoder = BatchedSpeculativeDecoder(decoding.model or base, max_batch_size, max_len=base.max_len)
        for name, cache in (("KV cache", decoder.cache), ("draft cache", getattr(decoder.drafter, "cache", None))):
            if cache is not None:
                log.info("%s: %d rows of %d positions (%.0f MiB)", name, cache.batch, cache.capacity,
                         (cache.k.numel() + cache.v.numel()) * cache.k.element_size() / 2**20)
        if decoding.speculative and decoding.model.cost is not None:
            log.info("measuring the verification and draft costs at each batch size up to %d (the verification "
                     "cost once per machine) ...", max_batch_size)
            decoder.measure_costs()
        return cls(decoder, tokenizer, chat, base.max_len, base.device,
                   f"{description}; batched, {max_batch_size} rows; {base.dtype}, {base.device}, context "
                   f"{base.max_len}", max_waiting=max_waiting)

    @property
    def busy(self) -> bool:
        return bool(self._running)

    @property
    def running(self) -> int:
        return len(self._running)

    def admit(self) -> None:
        """Refuse a new job (429, with a Retry-After estimate) when ``max_waiting`` jobs already wait for a row."""
        if self.max_waiting and self.waiting >= self.max_waiting:
            rows = self.decoder.batch_size
            retry = max(1, math.ceil(self._seconds_per_job * (self.waiting / rows + 1)))
            raise APIError(429, f"The server is busy: {self.waiting} requests are waiting for one of its {rows} "
                                f"rows. Retry after {retry} s.", type="rate_limit_exceeded",
                           code="rate_limit_exceeded", headers={"Retry-After": str(retry)})

    def close(self) -> None:
        for job, _ in list(self._running.values()):
            job.cancel()
        super().close()

    # ---- the worker ---------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            if not self._admit_waiting():
                return
            self._drop_cancelled()
            if not self._running:
                continue
            try:
                events = self.decoder.step()
            except Exception as err:  # noqa: BLE001 - fail the jobs of this batch, keep serving
                self._fail_all(err)
                continue
            for event in events:
                self._handle(event)

    def _admit_waiting(self) -> bool:
        """Move waiting jobs into free rows (blocking while nothing runs), the jobs taken at once prefilled together;
        False on shutdown."""
        joining: list[tuple[Job, SpeculativeRequest]] = []
        running = bool(self._running)
        while self.decoder.busy + len(joining) < self.decoder.batch_size:
            try:
                job = self._queue.get(block=not (running or joining))
            except queue.Empty:
                break
            if job is None:  # shutting down: jobs not started stay unserved, as those still queued do
                return False
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
                continue
            seed = job.seed if job.seed is not None else random.SystemRandom().getrandbits(63)
            request = SpeculativeRequest(job.ids, max_new_tokens=job.max_tokens, tag=id(job),
                                         params=SamplingParams(job.temperature, job.top_p, job.top_k), seed=seed,
                                         stop_token_ids=job.stop_token_ids)
            try:
                self.decoder.check(request)
            except CloverError as err:
                self.stats["failed"] += 1
                job.emit(Failed(bad(str(err))))
                continue
            joining.append((job, request))
        self._start(joining)
        return True

    def _start(self, joining: list) -> None:
        """Prefill the jobs ``joining`` (``(job, request)`` pairs) together and hand out their first tokens."""
        if not joining:
            return
        for job, request in joining:
            self._running[request.tag] = (job, JobOutput(self, job))
        try:
            events = self.decoder.add_many([request for _, request in joining])
        except Exception as err:  # noqa: BLE001 - fail these jobs, keep serving the others
            log.exception("a prefill failed")
            for job, request in joining:
                del self._running[request.tag]
                self.decoder.cancel(request.tag)
                self.stats["failed"] += 1
                job.emit(Failed(APIError(500, f"The server failed while reading the prompt: "
                                              f"{type(err).__name__}: {err}", type="server_error")))
            return
        for event in events:
            self._handle(event)

    def _drop_cancelled(self) -> None:
        for tag, (job, output) in list(self._running.items()):
            if job.cancelled.is_set():
                self.decoder.cancel(tag)
                del self._running[tag]
                self.stats["cancelled"] += 1
                log.info("cancelled after %d tokens (client gone)", len(output.tokens))

    def _handle(self, event) -> None:
        job, output = self._running[event.tag]
        if job.cancelled.is_set():
            return  # dropped before the next step
        stopped = output.feed(event.tokens)
        if not stopped and event.finish_reason is None:
            return
        if stopped:
            self.decoder.cancel(event.tag)  # a stop string ended it: free the row now
        del self._running[event.tag]
        done = self._served(output.end("stop" if stopped else event.finish_reason))
        self._seconds_per_job = 0.9 * self._seconds_per_job + 0.1 * done.seconds
        job.emit(done)

    def _fail_all(self, err: Exception) -> None:
        log.exception("a batched step failed")
        for tag, (job, _) in list(self._running.items()):
            self.decoder.cancel(tag)
            self.stats["failed"] += 1
            job.emit(Failed(APIError(500, f"The server failed while generating: {type(err).__name__}: {err}",
                                     type="server_error")))
        self._running.clear()
