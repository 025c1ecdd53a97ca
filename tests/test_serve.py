"""``python -m clover.serve`` end to end: the real server in a subprocess on a free localhost port, SmolLM2 with an
(untrained) Clover-2 draft and a dynamic tree, called with the official ``openai`` client and with raw HTTP; every
test against both engines (batched, the default, and ``--sequential``).

Greedy answers must equal ``python -m clover.cli generate`` (its own functions, in this process, plain decoding):
speculative decoding is lossless, so an untrained draft changes only the speed.
"""
from __future__ import annotations

import http.client
import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch

from clover import cli
from tests.conftest import SMOLLM2

KEY = "test-key-123"
NAME = "smollm2-test"
MAX_TOKENS = 12
MAX_LEN = 512
PROMPTS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?", "Say hello in Spanish.",
           "Who wrote Hamlet?", "What is the boiling point of water?", "Give me a synonym for happy.",
           "What is the largest planet?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def draft_dir(smollm2_base, tmp_path_factory):
    from clover.model.checkpoint import init_draft, save_draft

    torch.manual_seed(0)
    return save_draft(init_draft("clover2", smollm2_base), tmp_path_factory.mktemp("serve") / "clover2")


def start_server(tmp_path_factory, *flags):
    """Start ``python -m clover.serve`` with ``flags`` on a free port; yields its URL, stops it afterwards."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve_log") / "server.log"
    cmd = [sys.executable, "-m", "clover.serve", "--base-model", SMOLLM2, "--dtype", "fp32", "--device", "cpu",
           "--max-len", str(MAX_LEN), "--port", str(port), "--api-key", KEY, "--served-model-name", NAME,
           "--log-level", "warning", *map(str, flags)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the server did not come up in 300 s:\n{log_path.read_text()}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module", params=["batched", "sequential"])
def server(request, draft_dir, tmp_path_factory):
    engine = ["--sequential"] if request.param == "sequential" else ["--max-batch-size", "4"]
    yield from start_server(tmp_path_factory, "--draft", draft_dir, "--tree", "dynamic", "--tree-budget", "6",
                            *engine)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def reference():
    """prompt -> (text, GenerationResult, prompt ids) of ``python -m clover.cli generate --prompt P`` greedy."""
    args = cli.build_parser().parse_args(["generate", "--prompt", "-", "--model", SMOLLM2, "--dtype", "fp32",
                                          "--device", "cpu", "--max-len", str(MAX_LEN),
                                          "--max-new-tokens", str(MAX_TOKENS)])
    stream, tokenizer, template = cli.load_generator(args)
    answers = {}

    def answer(prompt: str):
        if prompt not in answers:
            ids = template.encode_prompt([{"role": "user", "content": prompt}])
            text, result = cli.respond(stream, tokenizer, ids, torch.Generator().manual_seed(0), out=io.StringIO())
            answers[prompt] = text, result, ids
        return answers[prompt]

    answer.template = template
    return answer


def chat(client, prompt, **kwargs):
    kwargs = {"max_tokens": MAX_TOKENS, "temperature": 0, **kwargs}
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}], **kwargs)


def post(server, path, body, key=KEY):
    """(status, parsed JSON) of a raw POST; ``body`` bytes are sent as they are."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(server + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def finish_of(result) -> str:
    return "stop" if result.finish_reason == "stop" else "length"


def test_stop_string_helpers():
    from clover.serve.engine import find_stop, holdback

    assert holdback("Hello Wor", ["World", "Wx"]) == 3 and holdback("Hello", ["World"]) == 0
    assert holdback("caf\ufffd", []) == 1 and holdback("ab", ["b", "abc"]) == 2
    assert find_stop("one two three", ["three", " two"]) == 3 and find_stop("abc", ["x"]) is None


def test_models(client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME


def test_chat_greedy_equals_cli_plain_and_streaming(client, reference):
    text, result, ids = reference(PROMPTS[0])
    assert text  # a real answer
    reply = chat(client, PROMPTS[0])
    assert reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == finish_of(result)
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), result.new_tokens)
    assert usage.total_tokens == len(ids) + result.new_tokens
    extra = usage.model_extra
    assert 1 <= extra["decoding_steps"] <= result.new_tokens
    assert extra["tau"] == pytest.approx(result.new_tokens / extra["decoding_steps"], abs=1e-3)

    chunks = list(chat(client, PROMPTS[0], stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(bool(d) for d in deltas) > 1  # really streamed, not one blob
    assert "".join(deltas) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [finish_of(result)]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == result.new_tokens
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_raw_sse_ends_with_done(server, reference):
    text, _, _ = reference(PROMPTS[0])
    body = {"model": NAME, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": True}
    request = urllib.request.Request(server + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {KEY}"}, method="POST")
    with urllib.request.urlopen(request, timeout=300) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    pieces = [json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[:-1]]
    assert "".join(pieces) == text


def test_completions_raw_prompt_and_stop_strings(client, reference):
    text, result, _ = reference(PROMPTS[0])
    prompt = reference.template.render([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True)
    raw = client.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert raw.choices[0].text == text and raw.object == "text_completion"
    streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text

    words = text.split()
    assert len(words) >= 3
    stop = " " + words[2]  # cut before the third word
    want = text[:text.index(stop)]
    cut = chat(client, PROMPTS[0], stop=[stop, "never appears zq"])
    assert cut.choices[0].message.content == want and cut.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].delta.content or "" for c in chat(client, PROMPTS[0], stop=stop, stream=True) if c.choices]
    assert "".join(pieces) == want


def test_seeded_sampling_is_reproducible(client):
    kwargs = dict(temperature=0.9, top_p=0.95, seed=1234, max_tokens=8)
    a, b = chat(client, PROMPTS[1], **kwargs), chat(client, PROMPTS[1], **kwargs)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens >= 1


def test_eight_concurrent_clients_get_their_own_answers(client, reference):
    expected = {p: reference(p)[0] for p in PROMPTS}
    assert len(set(expected.values())) == len(PROMPTS)  # different prompts, different answers

    def ask(i):
        prompt = PROMPTS[i]
        if i % 2:
            return prompt, "".join(c.choices[0].delta.content or "" for c in chat(client, prompt, stream=True)
                                   if c.choices)
        return prompt, chat(client, prompt).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        got = dict(pool.map(ask, range(len(PROMPTS))))
    assert got == expected


def test_dropped_stream_frees_the_model(server, client, reference):
    def health():
        with urllib.request.urlopen(server + "/health", timeout=30) as response:
            return json.loads(response.read())

    before = health()["cancelled"]
    conn = http.client.HTTPConnection("127.0.0.1", int(server.rsplit(":", 1)[1]), timeout=300)
    body = {"model": NAME, "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": MAX_LEN - 64, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    seen = 0
    while seen < 3:
        line = response.fp.readline()
        assert line, "the stream ended early"
        seen += line.startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()

    text, _, _ = reference(PROMPTS[2])  # the next request is answered as if nothing had happened
    assert chat(client, PROMPTS[2]).choices[0].message.content == text
    state = health()
    assert state["cancelled"] == before + 1 and not state["busy"] and state["waiting"] == 0

    # a non-streaming client that gives up (time-out) frees the model too
    impatient = openai.OpenAI(base_url=server + "/v1", api_key=KEY, timeout=1.5, max_retries=0)
    with pytest.raises(openai.APITimeoutError):
        chat(impatient, "Write a long story about a dragon.", max_tokens=MAX_LEN - 64)
    assert chat(client, PROMPTS[3]).choices[0].message.content == reference(PROMPTS[3])[0]
    assert health()["cancelled"] == before + 2


BAD = [  # (body, status, param, code)
    (b"{not json", 400, None, None),
    (b"[1, 2]", 400, None, None),
    ({"model": NAME}, 400, "messages", None),
    ({"model": NAME, "messages": []}, 400, "messages", None),
    ({"model": NAME, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", None),
    ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, 400, "model", "model_not_found"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model", None),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens", None),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3}, 400, "max_tokens", None),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens", None),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 400, "max_tokens", None),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": -0.1}, 400, "temperature", None),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p", None),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400, "top_p", None),
    ({"model": NAME, "messages": [{"role": "user", "content": "word " * MAX_LEN}]}, 400, "messages",
     "context_length_exceeded"),
]


@pytest.mark.parametrize("body,status,param,code", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_rejected_and_the_server_goes_on(server, client, body, status, param, code):
    got, error = post(server, "/v1/chat/completions", body)
    assert got == status
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["param"] == param and error["error"]["code"] == code
    if param:
        assert param.split("[")[0] in error["error"]["message"]  # the message names the field
    assert chat(client, PROMPTS[0], max_tokens=1).choices[0].finish_reason in ("stop", "length")


def test_api_key_and_unknown_routes(server, client):
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    for key in (None, "wrong-key"):
        got, error = post(server, "/v1/chat/completions", body, key=key)
        assert got == 401 and error["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong-key", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError) as info:  # the official client reads the error body
        chat(client, PROMPTS[0], temperature=-1)
    assert info.value.status_code == 400 and info.value.param == "temperature"
    got, error = post(server, "/v1/completions", {"model": NAME, "max_tokens": 2})
    assert got == 400 and error["error"]["param"] == "prompt"
    got, error = post(server, "/v1/no-such-route", body)
    assert got == 404 and set(error["error"]) == {"message", "type", "param", "code"}
    assert post(server, "/v1/chat/completions", body)[0] == 200


def test_a_full_queue_is_answered_429_with_retry_after(draft_dir, tmp_path_factory, reference):
    """One row and one waiting place: of six requests sent at once, the extra ones get 429 with Retry-After before
    any response starts, the others their answers."""
    for url in start_server(tmp_path_factory, "--max-batch-size", "1", "--max-waiting", "1"):
        body = {"model": NAME, "messages": [{"role": "user", "content": PROMPTS[4]}], "max_tokens": 48,
                "temperature": 0}

        def ask(_):
            request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json",
                                                      "Authorization": f"Bearer {KEY}"}, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=300) as response:
                    return response.status, None, json.loads(response.read())
            except urllib.error.HTTPError as err:
                return err.code, err.headers.get("Retry-After"), json.loads(err.read())

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
        refused = [a for a in answers if a[0] == 429]
        served = [a for a in answers if a[0] == 200]
        assert refused and served and len(refused) + len(served) == 6
        assert all(int(retry) >= 1 and err["error"]["type"] == "rate_limit_exceeded" for _, retry, err in refused)
        texts = {a[2]["choices"][0]["message"]["content"] for a in served}
        assert len(texts) == 1  # greedy: every served request got the same answer


def test_disconnects_under_load_leave_the_other_streams_intact(server, reference):
    """Twelve concurrent streams, every other one dropped after its first chunk: the others get their full greedy
    answers, and afterwards nothing runs or waits."""
    port = int(server.rsplit(":", 1)[1])

    def stream(i):
        prompt = PROMPTS[i % len(PROMPTS)]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        body = {"model": NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
                "temperature": 0, "stream": True}
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        response = conn.getresponse()
        text = ""
        while True:
            line = response.fp.readline()
            if not line or line.strip() == b"data: [DONE]":
                break
            if line.startswith(b"data: "):
                chunk = json.loads(line[6:])
                text += "".join(c["delta"].get("content") or "" for c in chunk.get("choices", []))
                if i % 2:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                    conn.close()
                    return prompt, None
        conn.close()
        return prompt, text

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(stream, range(12)))
    for prompt, text in results:
        if text is not None:
            assert text == reference(prompt)[0]
    deadline = time.monotonic() + 60
    while True:
        with urllib.request.urlopen(server + "/health", timeout=30) as response:
            state = json.loads(response.read())
        if (not state["busy"] and state["waiting"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not state["busy"] and state["waiting"] == 0 and state["running"] == 0
