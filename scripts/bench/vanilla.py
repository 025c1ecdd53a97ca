"""Benchmark: the project's plain greedy decoding vs transformers' generate on SmolLM2 (same prompts, same run,
same dtype), and the verification cost curve (one forward of 1..64 tokens over a 300-token cache) next to a bare
chain of the model's matmuls (with the runtime's kernels, with torch's default kernels, and with the runtime's plus
each layer's attention over the cache), timed in turn round after round; the ratio is the median of the per-round
ratios forward / bare. With --compile (fp32) the same for the compiled decoding forwards
(BaseModel.compile_decode): their compile time, plain decoding with them, and the forwards next to the bare chain.
Prints the CPU and the one-row kernel the runtime chose, a table, and writes figs/bench_vanilla.json.

    python scripts/bench/vanilla.py [--base-model smollm2-135m-instruct] [--prompts 5] [--new-tokens 64] [--runs 3]
        [--compile] [--sizes 1,4,8,16,26,32,64] [--rounds N] [--curve-only]
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from clover.args import CloverArgumentParser, add_base_model
from clover.data.templates import get_template
from clover.evaluation.answers import default_question_file, load_questions
from clover.generate.plain import generate_plain
from clover.model.base import BaseModel
from clover.model.cache import additive_mask, attention_mask
from clover.model import kernels
from clover.model.kernels import PrepackedLinear, one_row_kernel
from clover.model.loading import load_tokenizer, resolve_model_path
from machine import cpu_flags, cpu_model  # noqa: E402  (scripts/bench/machine.py, beside this script)

SIZES = (1, 4, 8, 16, 26, 32, 64)


def median_time(fn, runs):
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode_speed(base, hf, prompts, new_tokens, runs, stop, compiled=None):
    """Median tokens/s over ``prompts``: the project's plain decoding (eager), with the ``compiled`` step (when
    given: a :class:`CompiledDecode` of ``base``; else None) and transformers' generate, prompt after prompt."""
    ours, ours_compiled, theirs = [], [], []
    for ids in prompts:
        base.compiled_decode = None
        result = generate_plain(base, ids, max_new_tokens=new_tokens, stop_token_ids=())
        n = result.new_tokens
        ours.append(n / median_time(lambda: generate_plain(base, ids, max_new_tokens=new_tokens,
                                                           stop_token_ids=()), runs))
        if compiled is not None:
            base.compiled_decode = compiled
            assert generate_plain(base, ids, max_new_tokens=new_tokens, stop_token_ids=()).tokens == result.tokens
            ours_compiled.append(n / median_time(lambda: generate_plain(base, ids, max_new_tokens=new_tokens,
                                                                        stop_token_ids=()), runs))
            base.compiled_decode = None
        inp = torch.tensor([ids])

        def hf_run():
            with torch.no_grad():
                out = hf.generate(inp, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=stop)
            assert out.shape[1] - inp.shape[1] == n
        theirs.append(n / median_time(hf_run, runs))
    return (statistics.median(ours), statistics.median(ours_compiled) if ours_compiled else None,
            statistics.median(theirs))


def forward_vs_bare(base, rounds, prefix=300, compiled=None, sizes=SIZES):
    """For 1..64 tokens over a ``prefix``-token cache: one tree-masked forward, and the same matmuls with nothing
    else (all layers + LM head, the fused projections as the runtime runs them) with the runtime's kernels
    (:class:`PrepackedLinear`; for one row the kernel measured as the faster) and with torch's default ``F.linear``
    everywhere, and the runtime's chain plus each layer's attention of the new tokens over the cache (SDPA on random
    queries/keys/values of the same shapes: arithmetic a forward has and the bare chain has not). All are timed in
    turn, round after round (the machine's drift hits them alike); returns the medians (ms) and the median of the
    per-round ratios forward / bare. With ``compiled`` (a :class:`CompiledDecode` of
    ``base``), its forwards (one token without a tree mask, more with one) are timed in the same rounds."""
    ids = torch.randint(0, base.args.vocab_size, (1, prefix + max(sizes)))
    base.reset()
    base(ids[:, :prefix], logits_to_keep=0)
    weights = [p for n, p in base.named_parameters() if p.dim() == 2 and "embed" not in n]
    if base.args.tie_word_embeddings:
        weights.append(base.lm_head.weight)
    runtime = [PrepackedLinear() for _ in weights]
    curves = {"forward_ms": {}, "bare_matmul_ms": {}, "bare_matmul_default_kernels_ms": {}, "ratio": {},
              "bare_matmul_attention_ms": {}}
    a = base.args
    if compiled is not None:
        curves.update(forward_compiled_ms={}, ratio_compiled={}, ratio_compiled_to_bare_attention={})
    for s in sizes:
        mask = torch.ones(s, s, dtype=torch.bool).tril()
        xs = {w.shape[1]: torch.randn(1, s, w.shape[1], dtype=base.dtype) for w in weights}

        def forward():
            base.truncate(prefix)
            base(ids[:, prefix:prefix + s], tree_mask=mask)  # with a tree mask: never the compiled step

        def forward_compiled():  # one token: plain decoding's step; more: a tree's verification
            base.compiled_decode = compiled
            base.truncate(prefix)
            base(ids[:, prefix:prefix + s], tree_mask=mask if s > 1 else None)
            base.compiled_decode = None

        @torch.inference_mode()
        def bare():
            for w, kernel in zip(weights, runtime):
                kernel(xs[w.shape[1]], w)

        q = torch.randn(1, a.num_attention_heads, s, a.head_dim, dtype=base.dtype)
        kv = torch.randn(2, 1, a.num_key_value_heads, prefix + s, a.head_dim, dtype=base.dtype)
        attn_mask = additive_mask(attention_mask(prefix, mask, s, q.device), base.dtype)  # the forward's own mask

        @torch.inference_mode()
        def bare_attention():  # the same matmuls plus each layer's attention over the cache (its own arithmetic)
            bare()
            for _ in range(a.num_hidden_layers):
                F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=attn_mask if s > 1 else None,
                                               enable_gqa=a.num_key_value_heads != a.num_attention_heads)

        @torch.inference_mode()
        def default():
            for w in weights:
                F.linear(xs[w.shape[1]], w)
        times = {forward: [], bare: [], default: [], bare_attention: []}
        if compiled is not None:
            times[forward_compiled] = []
        for fn in times:
            fn()  # warm-up (and the runtime's weight packing)
        for _ in range(rounds):
            for fn, ts in times.items():
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
        curves["forward_ms"][s] = statistics.median(times[forward]) * 1000
        curves["bare_matmul_ms"][s] = statistics.median(times[bare]) * 1000
        curves["bare_matmul_default_kernels_ms"][s] = statistics.median(times[default]) * 1000
        curves["bare_matmul_attention_ms"][s] = statistics.median(times[bare_attention]) * 1000
        curves["ratio"][s] = statistics.median(f / b for f, b in zip(times[forward], times[bare]))
        if forward_compiled in times:
            curves["forward_compiled_ms"][s] = statistics.median(times[forward_compiled]) * 1000
            curves["ratio_compiled"][s] = statistics.median(f / b for f, b in zip(times[forward_compiled],
                                                                                  times[bare]))
            curves["ratio_compiled_to_bare_attention"][s] = statistics.median(
                f / b for f, b in zip(times[forward_compiled], times[bare_attention]))
    return curves


def main():
    parser = CloverArgumentParser(description=__doc__)
    add_base_model(parser)
    parser.add_argument("--prompts", type=int, default=5, help="shipped questions to decode")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--runs", type=int, default=3, help="repetitions (median)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated dtypes")
    parser.add_argument("--compile", action="store_true",
                        help="also measure the compiled decoding forwards (fp32 only)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)),
                        help="comma-separated token counts of the forward-vs-bare curve")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the curve (default: 5 x --runs)")
    parser.add_argument("--curve-only", action="store_true", help="skip the decoding comparison")
    parser.add_argument("--out", default="figs/bench_vanilla.json", help="results JSON")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(args.base_model)
    template = get_template(tokenizer)
    questions = load_questions(default_question_file())
    prompts = [template.encode_prompt([{"role": "user", "content": q["turns"][0]}])
               for q in questions[:: max(1, len(questions) // args.prompts)][:args.prompts]]
    print(f"CPU: {cpu_model()} ({platform.machine()}), flags {' '.join(cpu_flags()) or '-'}; "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}", flush=True)
    one_row = one_row_kernel()  # the runtime's own choice, measured once (or set by $CLOVER_ONE_ROW_KERNEL)
    measured = kernels.one_row_measured
    print(f"one-row kernel: {one_row} " + (f"(a chain of one-row products: BLAS gemv {measured['gemv_ms']:.1f} ms, "
                                           f"oneDNN prepacked {measured['packed_ms']:.1f} ms)" if measured else
                                           f"(set by ${kernels.ONE_ROW_ENV})"), flush=True)
    results = {"model": args.base_model, "cpu": cpu_model(), "cpu_flags": cpu_flags(), "machine": platform.machine(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "one_row_kernel": one_row,
               "one_row_measurement": measured, "dtypes": {}}
    sizes = [int(x) for x in args.sizes.split(",")]
    for dtype_name in args.dtypes.split(","):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        base = BaseModel.from_pretrained(args.base_model, dtype=dtype_name, max_len=1024)
        compiled, compile_s = None, None
        if args.compile and dtype == torch.float32:
            t = time.perf_counter()
            base.compile_decode()
            compile_s, compiled, base.compiled_decode = time.perf_counter() - t, base.compiled_decode, None
        result = results["dtypes"][dtype_name] = {"compile_s": compile_s}
        if not args.curve_only:
            hf = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.base_model), dtype=dtype).eval()
            ours, ours_compiled, theirs = decode_speed(base, hf, prompts, args.new_tokens, args.runs,
                                                       template.stop_token_ids[0], compiled)
            result.update(clover_tokens_per_s=ours, transformers_tokens_per_s=theirs, speedup=ours / theirs)
            print(f"\n{dtype_name}: clover plain greedy {ours:.1f} tok/s, transformers generate {theirs:.1f} tok/s "
                  f"-> {ours / theirs:.2f}x (median over {len(prompts)} prompts x {args.runs} runs, "
                  f"{args.new_tokens} new tokens)")
            if compiled is not None:
                result.update(clover_compiled_tokens_per_s=ours_compiled, speedup_compiled=ours_compiled / theirs)
                print(f"compiled forwards (compiled in {compile_s:.0f} s): clover plain greedy "
                      f"{ours_compiled:.1f} tok/s -> {ours_compiled / theirs:.2f}x transformers generate")
        curves = forward_vs_bare(base, args.rounds or args.runs * 5, compiled=compiled, sizes=sizes)
        curve, bare, default = (curves[k] for k in ("forward_ms", "bare_matmul_ms", "bare_matmul_default_kernels_ms"))
        result.update(curves)
        print("tokens  forward over 300-token cache (ms)  bare matmuls, runtime kernels (ms)  ratio  "
              "bare, torch default kernels (ms)  bare + attention (ms)"
              + ("  compiled forward (ms)  ratio  ratio to bare + attention" if compiled else ""))
        for s in sizes:
            extra = (f"  {curves['forward_compiled_ms'][s]:21.1f}  {curves['ratio_compiled'][s]:5.2f}  "
                     f"{curves['ratio_compiled_to_bare_attention'][s]:25.2f}" if compiled else "")
            print(f"{s:6d}  {curve[s]:33.1f}  {bare[s]:34.1f}  {curves['ratio'][s]:5.2f}  {default[s]:32.1f}  "
                  f"{curves['bare_matmul_attention_ms'][s]:21.1f}" + extra)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))  # after each dtype: a partial run keeps its numbers
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
