"""Load run of ``python -m clover.serve`` on this machine (127.0.0.1 only; a script, not a test): the batched engine
against the one-at-a-time engine (``--sequential``), plain and speculative decoding, at several concurrencies.

One real server per engine and decoding (``--engines``, ``--decodings``) starts on a free localhost port and answers
one untimed warm-up request; then, for every concurrency ``c`` in ``--concurrency`` (default 1, 4, 16, 32), the
servers take turns: in each of ``--rounds`` rounds (more at a low concurrency, to give each server
``--min-requests``) every server in turn gets ``c`` streamed greedy chat requests at once (``c`` client threads, one
request each, on ten short prompts with ``--max-tokens`` new tokens), the turn order reversed every other round.
Because the turns interleave, a machine that speeds up or slows down over the run (these VMs drift by 20%) moves every
server's numbers alike. Every answer is checked against the greedy output of ``clover generate`` (plain decoding, in
this process). Reported per server and concurrency, over its turns: total tokens/s (its new tokens over the wall
time of its turns), time to the first token and inter-token latency (per request: time after the first token over
the tokens after it), p50 and p99, and τ (tokens per decoding step, from the usage).

Then, on the batched server with speculative decoding, ``--disconnects`` streams (default 64) at once, a random half
of which hang up after a random number of chunks: every surviving request must get its exact answer, none may hang
(each has ``--request-timeout`` seconds), nothing may run or wait afterwards, and the server's resident memory may
grow at most 10% over the run.

Prints a table with the CPU model and flags, writes ``--out`` (JSON) and ``--fig`` (tokens/s against concurrency);
exits 1 when an answer was wrong, a request hung or memory grew. ``--time-limit`` bounds the whole run: the rounds
left are skipped and the JSON says so.

    python scripts/bench/serve_load.py [--draft clover2-smollm2-135m-instruct --draft lookup --draft recycle] \\
        [--concurrency 1,4,16,32] [--max-tokens 128] [--rounds 3]
"""
from __future__ import annotations

import contextlib
import http.client
import io
import json
import math
import platform
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from clover import cli  # noqa: E402
from clover.args import (CloverArgumentParser, add_base_model, add_draft, add_dtype, add_tree,  # noqa: E402
                         positive_int)
from machine import cpu_flags, cpu_model  # noqa: E402  (scripts/bench/machine.py, beside this script)

PROMPTS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?", "Say hello in Spanish.",
           "Who wrote Hamlet?", "What is the boiling point of water?", "Give me a synonym for happy.",
           "What is the largest planet?", "Name a fruit that is yellow.", "How many days are in a week?"]
NAME = "load-test"
MAX_LEN = 1024


def parse_args(argv=None):
    p = CloverArgumentParser(prog="python scripts/bench/serve_load.py", description=__doc__)
    add_base_model(p)
    add_draft(p, help="the speculative runs' drafts, repeatable (default: the shipped Clover-2 draft for the "
                      "embedded model with lookup and recycle)")
    add_tree(p)
    add_dtype(p, ", of the servers and the reference", default="fp32")
    p.add_argument("--engines", default="batched,sequential", help="batched and/or sequential (default both)")
    p.add_argument("--decodings", default="plain,speculative", help="plain and/or speculative (default both)")
    p.add_argument("--concurrency", default="1,4,16,32", help="concurrent clients per run, comma-separated")
    p.add_argument("--rounds", type=positive_int, default=3,
                   help="turns of each server at each concurrency, c requests at once per turn (default 3)")
    p.add_argument("--min-requests", type=positive_int, default=12,
                   help="at a low concurrency, as many more turns as give each server this many requests (default "
                        "12)")
    p.add_argument("--max-tokens", type=positive_int, default=128, help="new tokens per request (default 128)")
    p.add_argument("--max-batch-size", type=positive_int, default=None,
                   help="rows of the batched server (default: the largest --concurrency)")
    p.add_argument("--disconnects", type=int, default=64,
                   help="streams of the disconnect run, half of them dropped (0 = skip; default 64)")
    p.add_argument("--request-timeout", type=float, default=600, help="seconds a request may take (default 600)")
    p.add_argument("--time-limit", type=float, default=3600, help="seconds for the whole run (default 3600)")
    p.add_argument("--out", default=str(ROOT / "figs" / "serve_load.json"), help="JSON results file")
    p.add_argument("--fig", default=str(ROOT / "figs" / "serve_load.png"), help="figure: tokens/s per concurrency")
    return p.parse_args(argv)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


def references(args) -> dict[str, str]:
    """Greedy answers of ``clover generate`` (plain decoding) for every prompt."""
    parsed = cli.build_parser().parse_args(["generate", "--prompt", "-", "--base-model", args.base_model, "--dtype",
                                            args.dtype, "--device", "cpu", "--max-len", str(MAX_LEN),
                                            "--max-new-tokens", str(args.max_tokens)])
    stream, tokenizer, template = cli.load_generator(parsed)
    answers = {}
    for prompt in PROMPTS:
        ids = template.encode_prompt([{"role": "user", "content": prompt}])
        with contextlib.redirect_stderr(io.StringIO()):  # respond() reports its speed there
            answers[prompt], _ = cli.respond(stream, tokenizer, ids, torch.Generator().manual_seed(0),
                                             out=io.StringIO())
    return answers


def start_server(args, flags: list[str], log_path: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "clover.serve", "--base-model", args.base_model, "--dtype", args.dtype,
           "--device", "cpu", "--max-len", str(MAX_LEN), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", NAME, "--log-level", "warning", "--max-waiting", "0", *flags]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.3)


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def health(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    return json.loads(conn.getresponse().read())


def ask(port: int, prompt: str, max_tokens: int, timeout: float, hang_up_after: int | None = None) -> dict:
    """One streamed greedy chat completion: text, latency, time to first token, usage; ``hang_up_after`` chunks:
    drop the connection there instead."""
    body = {"model": NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return {"prompt": prompt, "error": f"HTTP {response.status}: {response.read()[:300]!r}"}
        parts, first, usage, chunks = [], None, {}, 0
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            chunks += 1
            if hang_up_after is not None and chunks >= hang_up_after:
                conn.sock.shutdown(socket.SHUT_RDWR)
                return {"prompt": prompt, "dropped": True}
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                text = choice["delta"].get("content")
                if text:
                    parts.append(text)
                    first = first if first is not None else time.perf_counter() - start
    except OSError as err:  # a time-out: the request hung
        return {"prompt": prompt, "error": f"{type(err).__name__}: {err}"}
    finally:
        conn.close()
    latency = time.perf_counter() - start
    tokens = usage.get("completion_tokens", 0)
    return {"prompt": prompt, "text": "".join(parts), "latency": latency, "ttft": first, "tokens": tokens,
            "steps": usage.get("decoding_steps", 0),
            "itl": (latency - first) / (tokens - 1) if first is not None and tokens > 1 else None}


def summary(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if "latency" in r]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [r["itl"] for r in ok if r["itl"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": len(results), "errors": len(results) - len(ok),
            "wrong": sum(not r.get("correct") for r in results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall if wall else float("nan"),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "itl_p50_s": percentile(itl, 50), "itl_p99_s": percentile(itl, 99),
            "tau": tokens / max(sum(r["steps"] for r in ok), 1)}


def load_turn(port: int, clients: int, turn: int, args, expected: dict) -> tuple[list[dict], float]:
    """``clients`` requests at once (one client thread each); their results and the turn's wall time."""
    def client(i: int) -> dict:
        r = ask(port, PROMPTS[(turn * clients + i) % len(PROMPTS)], args.max_tokens, args.request_timeout)
        return r | {"correct": r.get("text") == expected[r["prompt"]]}

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    return results, time.perf_counter() - start


def disconnect_run(port: int, proc, args, expected: dict) -> dict:
    """``--disconnects`` streams at once, a random half dropped after 1-6 chunks (seeded)."""
    rng = random.Random(0)
    plan = [rng.randint(1, 6) if rng.random() < 0.5 else None for _ in range(args.disconnects)]
    before = rss_mib(proc.pid)
    start = time.perf_counter()
    with ThreadPoolExecutor(args.disconnects) as pool:
        results = list(pool.map(lambda i: ask(port, PROMPTS[i % len(PROMPTS)], args.max_tokens,
                                              args.request_timeout, plan[i]), range(args.disconnects)))
    wall = time.perf_counter() - start
    for _ in range(100):  # the dropped rows leave before the next step: give the worker a moment
        state = health(port)
        if not state["busy"] and not state["waiting"]:
            break
        time.sleep(0.1)
    survivors = [r for r in results if not r.get("dropped")]
    after = rss_mib(proc.pid)
    return {"streams": args.disconnects, "dropped": len(results) - len(survivors), "survivors": len(survivors),
            "errors": sum("error" in r for r in survivors),
            "wrong": sum(r.get("text") != expected[r["prompt"]] for r in survivors), "wall_s": wall,
            "idle_after": not state["busy"] and not state["waiting"], "rss_before_mib": before,
            "rss_after_mib": after, "rss_growth": after / before - 1, "health": state}


def main(argv=None) -> None:
    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    draft = args.draft or ["clover2-smollm2-135m-instruct", "lookup", "recycle"]
    rows = args.max_batch_size or max(levels)
    start = time.monotonic()
    deadline = start + args.time_limit
    machine = (f"{cpu_model()} ({platform.machine()}), flags {' '.join(cpu_flags())}; torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads, python {platform.python_version()}")
    print(machine)
    expected = references(args)
    speculative = [x for d in draft for x in ("--draft", str(d))] + ["--tree", args.tree, "--tree-budget",
                                                                      str(args.tree_budget)]
    runs, servers, disconnects = [], [], None  # servers[i]: (process, port) of runs[i]
    logs = Path(args.out).with_suffix(".logs")
    logs.mkdir(parents=True, exist_ok=True)
    try:
        for engine in args.engines.split(","):
            for decoding in args.decodings.split(","):
                flags = (["--sequential"] if engine == "sequential" else ["--max-batch-size", str(rows)]) + \
                        (speculative if decoding == "speculative" else [])
                run = {"engine": engine, "decoding": decoding, "flags": flags, "levels": {}}
                runs.append(run)
                t0 = time.perf_counter()
                servers.append(start_server(args, flags, logs / f"{engine}_{decoding}.log"))
                run["startup_s"] = time.perf_counter() - t0
                ask(servers[-1][1], PROMPTS[0], args.max_tokens, args.request_timeout)  # warm-up
        for c in levels:
            planned = max(args.rounds, math.ceil(args.min_requests / c))
            results, walls = [[] for _ in runs], [0.0] * len(runs)
            for turn in range(planned):
                if time.monotonic() > deadline:
                    break
                for i in (range(len(runs)) if turn % 2 == 0 else reversed(range(len(runs)))):
                    answered, wall = load_turn(servers[i][1], c, turn, args, expected)
                    results[i] += answered
                    walls[i] += wall
            for i, run in enumerate(runs):
                if not results[i]:
                    continue
                level = run["levels"][c] = summary(results[i], walls[i]) | {"rounds": len(results[i]) // c,
                                                                             "planned_rounds": planned}
                print(f"{run['engine']:<10} {run['decoding']:<11} c={c:<3} {level['tokens_per_s']:7.1f} "
                      f"tok/s  ttft p50 {level['ttft_p50_s']:.2f} s  itl p50 {1000 * level['itl_p50_s']:.0f} ms  "
                      f"τ {level['tau']:.2f}  wrong {level['wrong']}  errors {level['errors']}", flush=True)
        target = [i for i, r in enumerate(runs) if r["engine"] == "batched" and r["decoding"] == "speculative"]
        if target and args.disconnects and time.monotonic() < deadline:
            disconnects = disconnect_run(servers[target[0]][1], servers[target[0]][0], args, expected)
            print(f"disconnect run: {disconnects}", flush=True)
    finally:
        for proc, _ in servers:
            stop_server(proc)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine, "base_model": args.base_model,
              "draft": draft, "max_batch_size": rows, "args": vars(args), "total_s": time.monotonic() - start,
              "runs": runs, "disconnects": disconnects}
    finished = all(len(r["levels"]) == len(levels) and all(lv["rounds"] == lv["planned_rounds"]
                                                           for lv in r["levels"].values()) for r in runs)
    correct = all(lv["wrong"] == 0 and lv["errors"] == 0 for r in runs for lv in r["levels"].values())
    survived = disconnects is None or (disconnects["wrong"] == 0 and disconnects["errors"] == 0
                                       and disconnects["idle_after"] and disconnects["rss_growth"] <= 0.10)
    report |= {"finished": finished, "all_correct": correct, "disconnects_ok": survived}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_table(runs, levels)
    plot(report, levels, Path(args.fig))
    print(f"total {report['total_s']:.0f} s; finished: {finished}; all answers correct: {correct}; disconnect run "
          f"ok: {survived}; wrote {args.out} and {args.fig}")
    if not (correct and survived):
        raise SystemExit(1)


def print_table(runs: list[dict], levels: list[int]) -> None:
    print(f"{'engine':<10} {'decoding':<11} " + " ".join(f"{'c=' + str(c):>9}" for c in levels) + "   (tokens/s)")
    for r in runs:
        cells = [f"{r['levels'][c]['tokens_per_s']:9.1f}" if c in r["levels"] else f"{'-':>9}" for c in levels]
        print(f"{r['engine']:<10} {r['decoding']:<11} " + " ".join(cells))
    batched = {r["decoding"]: r for r in runs if r["engine"] == "batched"}
    sequential = {r["decoding"]: r for r in runs if r["engine"] == "sequential"}
    def ratios(top: dict, bottom: dict) -> str:
        shared = [c for c in levels if c in top["levels"] and c in bottom["levels"]]
        return ", ".join(f"c={c}: {top['levels'][c]['tokens_per_s'] / bottom['levels'][c]['tokens_per_s']:.2f}x"
                         for c in shared)

    for decoding in batched:
        if decoding in sequential:
            print(f"batched / sequential, {decoding}: {ratios(batched[decoding], sequential[decoding])}")
    if "plain" in batched and "speculative" in batched:
        print(f"batched speculative / batched plain: {ratios(batched['speculative'], batched['plain'])}")


def plot(report: dict, levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in report["runs"]:
        points = [(c, r["levels"][c]["tokens_per_s"]) for c in levels if c in r["levels"]]
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{r['engine']}, {r['decoding']}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("total tokens/s")
    ax.set_title(f"{report['base_model']}: {report['machine'].split(' (')[0]} ({report['date'][:10]})", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
