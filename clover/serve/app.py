"""The FastAPI application: OpenAI's ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions`` over one
:class:`clover.serve.engine.Engine`, plus ``/health``.

Each request is validated (:mod:`clover.serve.schema`), its prompt encoded, and a job submitted to the engine's queue;
events come back from the worker thread onto the event loop through an ``asyncio.Queue``, so the loop never blocks on
the model. A task listens for the client's disconnect while a request waits or streams and cancels its job, which frees
the model at the next decoding step. Errors of every kind are answered in OpenAI's error format.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from clover.serve.engine import Delta, Engine, Failed, Finished, Job
from clover.serve.schema import APIError, GenerationRequest, bad, parse_chat, parse_completion, parse_json


def error_response(err: APIError) -> JSONResponse:
    headers = {**({"WWW-Authenticate": "Bearer"} if err.status == 401 else {}), **err.headers}
    return JSONResponse(err.body(), status_code=err.status, headers=headers or None)


def usage(done: Finished) -> dict:
    """OpenAI's usage object, with the decoding steps and tau (tokens per step) as extra fields."""
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "decoding_steps": done.steps, "tau": round(done.tau, 4)}


def _submit(engine: Engine, job: Job):
    """Queue the job now, in the same event-loop turn as its admission check (so concurrent requests cannot all pass
    the check before any of them is counted as waiting), and return its events as an async iterator."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(event) -> None:  # called from the worker thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is gone (shutdown)
            job.cancel()

    job.emit = emit
    engine.submit(job)
    return _events(job, events)


async def _events(job: Job, events: asyncio.Queue):
    """The job's events, in order, on the event loop; the job is cancelled if the consumer stops early."""
    try:
        while True:
            event = await events.get()
            yield event
            if isinstance(event, (Finished, Failed)):
                return
    finally:
        job.cancel()  # no-op once finished


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _race(work, receive, job: Job):
    """Run ``work`` until it ends or the client disconnects (then cancel it and the job); True if it ended."""
    worker = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(receive))
    try:
        await asyncio.wait({worker, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if worker.done():
            worker.result()  # re-raise its exception, if any
            return True
        return False
    finally:
        job.cancel()
        for task in (worker, watcher):
            task.cancel()
        await asyncio.gather(worker, watcher, return_exceptions=True)


class EventStream(Response):
    """Server-sent events from an async iterator of strings; a disconnect cancels the job at once."""

    media_type = "text/event-stream"

    def __init__(self, chunks, job: Job):
        self.chunks, self.job = chunks, job
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        async def pump():
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await _race(pump(), receive, self.job)
        except OSError:  # the client went away while we were sending
            pass


def create_app(engine: Engine, served_model_name: str, api_key: str | None = None) -> FastAPI:
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="clover", description="OpenAI-compatible server for Clover-2 / EAGLE-1 speculative decoding",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        message = (f"Unknown route {request.method} {request.url.path}." if err.status_code in (404, 405)
                   else str(err.detail))
        return error_response(APIError(err.status_code, message, type=kind))

    @app.exception_handler(Exception)
    async def _server_error(request, err: Exception):
        return error_response(APIError(500, f"Internal server error: {type(err).__name__}: {err}",
                                       type="server_error"))

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(401, "You didn't provide an API key. Pass it in the Authorization header "
                                "('Authorization: Bearer KEY').", type="invalid_request_error", code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", type="invalid_request_error", code="invalid_api_key")

    def model_card() -> dict:
        return {"id": served_model_name, "object": "model", "created": created, "owned_by": "clover"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served_model_name, "busy": engine.busy, "running": engine.running,
                "waiting": engine.waiting, **engine.stats}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request):
        authorize(request)
        if model != served_model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{served_model_name}'.",
                           param="model", type="invalid_request_error", code="model_not_found")
        return model_card()

    async def read(request: Request, parse) -> GenerationRequest:
        authorize(request)
        req = parse(parse_json(await request.body()))
        if req.model != served_model_name:
            raise bad(f"The model '{req.model}' does not exist; this server serves '{served_model_name}'.", "model",
                      code="model_not_found")
        return req

    def start_job(req: GenerationRequest, ids: list[int], stop_token_ids):
        """Admit and queue a job (429 before any response starts when too many requests wait); the job and its
        events. Nothing awaits between the check and the queueing."""
        engine.admit()
        room = engine.room(ids)
        job = Job(ids=ids, max_tokens=min(req.max_tokens or room, room), temperature=req.temperature,
                  top_p=req.top_p, top_k=req.top_k, seed=req.seed, stop=req.stop, stop_token_ids=stop_token_ids)
        return job, _submit(engine, job)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read(request, parse_chat)
        job, events = start_job(req, engine.encode_chat(req.messages), engine.template.stop_token_ids)
        return await answer(request, req, job, events, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read(request, parse_completion)
        job, events = start_job(req, engine.encode_prompt(req.prompt), None)
        return await answer(request, req, job, events, chat=False)

    async def answer(request: Request, req: GenerationRequest, job: Job, events, chat: bool):
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": served_model_name}
        if req.stream:
            return EventStream(_sse(events, req, dict(head, object=head["object"] + ".chunk") if chat else head,
                                    chat), job)
        result = {}

        async def collect():
            parts = []
            async for event in events:
                if isinstance(event, Delta):
                    parts.append(event.text)
                elif isinstance(event, Failed):
                    raise event.error
                else:
                    result["text"], result["done"] = "".join(parts), event

        if not await _race(collect(), request.receive, job):
            return Response(status_code=204)  # nobody is listening any more
        done: Finished = result["done"]
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result["text"]}, "logprobs": None,
                      "finish_reason": done.finish_reason}
        else:
            choice = {"index": 0, "text": result["text"], "logprobs": None, "finish_reason": done.finish_reason}
        return {**head, "choices": [choice], "usage": usage(done)}

    return app


async def _sse(events, req: GenerationRequest, head: dict, chat: bool):
    """OpenAI's streaming chunks as server-sent events, ending with ``data: [DONE]``."""
    def data(obj: dict) -> str:
        return "data: " + json.dumps(obj, separators=(",", ":")) + "\n\n"

    def event(choice: dict | None, **extra) -> str:
        return data({**head, "choices": [choice] if choice else [], **extra})

    def choice(text: str | None, finish: str | None, first: bool = False) -> dict:
        if not chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    if chat:
        yield event(choice(None, None, first=True))
    async for ev in events:
        if isinstance(ev, Delta):
            yield event(choice(ev.text, None))
        elif isinstance(ev, Failed):  # headers are sent already: the error goes in the stream
            yield data(ev.error.body())
            break
        else:
            yield event(choice(None, ev.finish_reason))
            if req.include_usage:
                yield event(None, usage=usage(ev))
    yield "data: [DONE]\n\n"
