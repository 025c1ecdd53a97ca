"""Bounded load run of ``python -m clover.serve`` on this machine (127.0.0.1 only; a script, not a test).

For plain decoding and for the draft, one after the other: start the real server on a free localhost port, send
``--sequential`` requests one by one and then ``--concurrent`` requests from ``--clients`` threads, all greedy and
streamed (so that the time to the first token is measured), each on one of ten short prompts. Every answer is checked
against ``python -m clover.cli generate`` greedy output (its functions, in this process). The server's resident memory
is read after the first 10 requests and after the run; the run passes when every answer is right and the memory grew by
at most 10%. Prints p50/p95 latency, time to first token and tokens/s, and writes everything to ``--out`` (JSON).

Without ``--draft`` an untrained Clover-2 draft is made in a temporary folder: its output is still exact (lossless),
but it accepts almost nothing, so it shows the server's overhead rather than a speed-up. The whole run stops at
``--time-limit`` seconds (default 120), whatever is left; the JSON says which phases finished.

    python scripts/bench/serve_load.py [--draft runs/pipeline/full/ckpt/clover2/final] [--max-tokens 8]
"""
from __future__ import annotations

import contextlib
import http.client
import io
import json
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from clover import cli  # noqa: E402
from clover.args import (CloverArgumentParser, add_base_model, add_draft, add_dtype, add_tree,  # noqa: E402
                         positive_int)
from machine import cpu_model  # noqa: E402  (scripts/bench/machine.py, beside this script)

PROMPTS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?", "Say hello in Spanish.",
           "Who wrote Hamlet?", "What is the boiling point of water?", "Give me a synonym for happy.",
           "What is the largest planet?", "Name a fruit that is yellow.", "How many days are in a week?"]
NAME = "load-test"


def parse_args(argv=None):
    p = CloverArgumentParser(description=__doc__)
    add_base_model(p)
    add_draft(p, help="draft checkpoint folder or lookup/recycle, repeatable (default: an untrained Clover-2 draft)")
    add_tree(p)
    add_dtype(p, ", of both servers and the reference", default="fp32")
    p.add_argument("--max-tokens", type=positive_int, default=8, help="new tokens per request (default 8)")
    p.add_argument("--sequential", type=positive_int, default=50, help="requests sent one by one (default 50)")
    p.add_argument("--concurrent", type=positive_int, default=50,
                   help="requests sent from --clients threads (default 50)")
    p.add_argument("--clients", type=positive_int, default=8, help="client threads of the concurrent phase (default 8)")
    p.add_argument("--time-limit", type=float, default=120, help="seconds for the whole run (default 120)")
    p.add_argument("--out", default=str(ROOT / "figs" / "serve_load.json"), help="JSON results file")
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
    """Greedy answers of ``python -m clover.cli generate`` (plain decoding) for every prompt."""
    parsed = cli.build_parser().parse_args(["generate", "--prompt", "-", "--base-model", args.base_model, "--dtype",
                                            args.dtype, "--device", "cpu", "--max-len", "1024",
                                            "--max-new-tokens", str(args.max_tokens)])
    stream, tokenizer, template = cli.load_generator(parsed)
    answers = {}
    for prompt in PROMPTS:
        ids = template.encode_prompt([{"role": "user", "content": prompt}])
        with contextlib.redirect_stderr(io.StringIO()):  # respond() reports its speed there
            answers[prompt], _ = cli.respond(stream, tokenizer, ids, torch.Generator().manual_seed(0),
                                             out=io.StringIO())
    return answers


def start_server(args, draft, log_path: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "clover.serve", "--base-model", args.base_model, "--dtype", args.dtype,
           "--device", "cpu", "--max-len", "1024", "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", NAME, "--log-level", "warning"]
    if draft:
        cmd += [x for d in draft for x in ("--draft", str(d))] + ["--tree", args.tree, "--tree-budget",
                                                                   str(args.tree_budget)]
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


def ask(port: int, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy chat completion: text, latency, time to first token, usage."""
    body = {"model": NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        return {"prompt": prompt, "error": f"HTTP {response.status}: {response.read()[:300]!r}"}
    parts, first, usage = [], None, {}
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            text = choice["delta"].get("content")
            if text:
                parts.append(text)
                first = first if first is not None else time.perf_counter() - start
    conn.close()
    return {"prompt": prompt, "text": "".join(parts), "latency": time.perf_counter() - start, "ttft": first,
            "tokens": usage.get("completion_tokens", 0), "steps": usage.get("decoding_steps", 0)}


def summary(results: list[dict], wall: float) -> dict:
    ok = [r for r in results if "latency" in r]
    lat = [r["latency"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": len(results), "errors": len(results) - len(ok),
            "wrong": sum(not r.get("correct") for r in results),
            "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
            "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall else float("nan"),
            "tau": tokens / max(sum(r["steps"] for r in ok), 1)}


def run_config(args, label, draft, expected, deadline, workdir) -> dict:
    out = {"label": label, "draft": [str(d) for d in draft] if draft else None, "finished": []}
    if time.monotonic() > deadline:
        return out
    t0 = time.perf_counter()
    proc, port = start_server(args, draft, workdir / f"{label}.log")
    out["startup_s"] = time.perf_counter() - t0
    lock = threading.Lock()

    def one(i: int, bag: list):
        if time.monotonic() > deadline:
            return
        r = ask(port, PROMPTS[i % len(PROMPTS)], args.max_tokens)
        r["correct"] = r.get("text") == expected[r["prompt"]]
        with lock:
            bag.append(r)

    try:
        sequential, concurrent = [], []
        t0 = time.perf_counter()
        for i in range(args.sequential):
            one(i, sequential)
            if i == min(10, args.sequential) - 1:
                out["rss_after_10_mib"] = rss_mib(proc.pid)
        out["sequential"] = summary(sequential, time.perf_counter() - t0)
        if len(sequential) == args.sequential:
            out["finished"].append("sequential")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(lambda i: one(i, concurrent), range(args.concurrent)))
        out["concurrent"] = summary(concurrent, time.perf_counter() - t0)
        if len(concurrent) == args.concurrent:
            out["finished"].append("concurrent")
        out["rss_end_mib"] = rss_mib(proc.pid)
        if "rss_after_10_mib" in out:
            out["rss_growth"] = out["rss_end_mib"] / out["rss_after_10_mib"] - 1
        bad = [r for r in sequential + concurrent if not r["correct"]]
        out["wrong_examples"] = [{k: r.get(k) for k in ("prompt", "text", "error")} for r in bad[:3]]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.time_limit
    print(f"CPU: {cpu_model()} ({platform.machine()}), {torch.get_num_threads()} torch threads, torch "
          f"{torch.__version__}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        workdir = Path(tmp)
        draft = args.draft
        if draft is None:
            from clover.model.base import BaseModel
            from clover.model.checkpoint import init_draft, save_draft

            base = BaseModel.from_pretrained(args.base_model, dtype="fp32", max_len=64)
            torch.manual_seed(0)
            draft = [save_draft(init_draft("clover2", base), workdir / "clover2_untrained")]
            del base
            print("draft: an untrained Clover-2 draft (exact output, ~no acceptance)")
        expected = references(args)
        runs = [run_config(args, label, d, expected, deadline, workdir)
                for label, d in (("plain", None), ("draft", draft))]
    total = time.monotonic() - start
    complete = all(r["finished"] == ["sequential", "concurrent"] for r in runs)
    correct = all(r[phase]["wrong"] == 0 for r in runs for phase in ("sequential", "concurrent") if phase in r)
    memory_ok = all(abs(r.get("rss_growth", 1)) <= 0.10 for r in runs)
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu_model(), "machine": platform.machine(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "base_model": args.base_model,
              "args": vars(args), "total_s": total, "complete": complete, "all_correct": correct,
              "memory_within_10pct": memory_ok, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    print(f"{'run':<6} {'phase':<10} {'n':>3} {'wrong':>5} {'p50 s':>6} {'p95 s':>6} {'ttft50':>6} "
          f"{'tok/s':>6} {'tau':>5}")
    for r in runs:
        if "startup_s" not in r:
            print(f"{r['label']:<6} skipped: --time-limit reached")
            continue
        for phase in ("sequential", "concurrent"):
            s = r[phase]
            print(f"{r['label']:<6} {phase:<10} {s['requests']:>3} {s['wrong']:>5} {s['latency_p50_s']:>6.2f} "
                  f"{s['latency_p95_s']:>6.2f} {s['ttft_p50_s']:>6.2f} {s['tokens_per_s']:>6.1f} {s['tau']:>5.2f}")
        print(f"{r['label']:<6} startup {r['startup_s']:.1f} s, RSS after 10 requests "
              f"{r.get('rss_after_10_mib', 0):.0f} MiB, after the run {r['rss_end_mib']:.0f} MiB "
              f"({100 * r.get('rss_growth', float('nan')):+.1f}%)")
    print(f"total {total:.0f} s; complete: {complete}; all answers correct: {correct}; memory within 10%: "
          f"{memory_ok}; wrote {args.out}")
    if not (complete and correct and memory_ok):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
