"""Correctness on one device: the runtime against transformers (fp32 and bf16), greedy speculative decoding equal to
plain decoding (both drafts, fixed and dynamic trees), sampled output distributed as the base model's, the data dump
(``clover.ge_data.allocation``) and one accelerate training step in bf16 mixed precision.

Each ``check_*`` returns a dict of details and raises (AssertionError or anything else) when it fails. Tiny random
checkpoints come from the test suite's own ``save_tiny``; the checks differ from tests/ only in putting every tensor,
generator and model on the device under test.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from gpu_check.common import ROOT, hf_from_pretrained, save_char_tokenizer

ARCHS = ("llama", "qwen2", "mistral")
# bf16 logits: bf16 keeps 8 significant bits, and every matmul output, residual add and norm of the forward is rounded
# to it, so no bf16 forward matches fp32 to fp32's tolerance. What can be checked is that the runtime adds no error
# beyond bf16's own: transformers' bf16 forward of the same weights is the yardstick. Ours may be off the fp32
# reference by at most BF16_FACTOR x transformers' bf16 error plus one bf16 ulp of the largest reference logit (a
# different but equally valid order of rounded operations moves a result by about an ulp; CPU runs of the tiny models
# is ~1 ulp), and its argmax may disagree with fp32's on at most BF16_ARGMAX_SLACK
# more positions than transformers' bf16 does (near-ties flip either way). On the CPU the runtime's bf16 logits of the
# tiny models equal transformers' bit for bit (same operations in the same order).
BF16_FACTOR, BF16_ARGMAX_SLACK = 2.0, 0.1
SAMPLING_TREE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (1, 1), (0, 0, 0), (0, 0, 1)]  # 2-3 siblings per node


class Context:
    """Device, sizes (GPU or dry run), scratch folder, test helpers; caches the tiny checkpoints it saves."""

    def __init__(self, device: torch.device, dry_run: bool, tmp: Path, helpers, time_left):
        self.device, self.dry_run, self.tmp, self.h = device, dry_run, tmp, helpers
        self.time_left = time_left  # seconds left of this part's budget
        self._dirs = {}

    def tiny(self, arch: str, **overrides) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in self._dirs:
            self._dirs[key] = self.h.save_tiny(self.tmp / f"{arch}_{len(self._dirs)}", arch, **overrides)
        return self._dirs[key]


def bf16_ulp(x: float) -> float:
    """Spacing of bf16 numbers at magnitude ``x`` (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(max(x, 1e-30))) - 7)


# ---- the runtime against transformers -------------------------------------------------------------------------------
def _reference_logits(model, seqs: list[torch.Tensor], device) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(s[None].to(device)).logits[0].float().cpu() for s in seqs]


def _runtime_logits(base, ids, prompt_len, tree_tokens, depths, mask) -> dict[str, torch.Tensor]:
    """The runtime's logits (fp32, CPU) for a prefill, four incremental steps and a tree over the prefix."""
    dev = base.device
    base.reset()
    prefill = base(ids[None, :prompt_len].to(dev)).logits[0]
    steps = [base(ids[None, t:t + 1].to(dev)).logits[0, -1] for t in range(prompt_len, ids.numel())]
    base.truncate(prompt_len)
    tree = base(tree_tokens[None].to(dev), position_ids=(prompt_len + depths).to(dev), tree_mask=mask.to(dev)).logits[0]
    return {"prefill": prefill.float().cpu(), "steps": torch.stack(steps).float().cpu(), "tree": tree.float().cpu()}


def check_runtime(ctx: Context, arch: str) -> dict:
    """Prefill, incremental and tree-masked logits of the runtime on the device vs transformers' model on the same
    device: fp32 to the test suite's tolerance, bf16 against transformers' own bf16 error (see BF16_FACTOR)."""
    from clover.model.base import BaseModel

    folder = ctx.tiny(arch)
    dev = ctx.device
    prompt_len, n_nodes = 20, 9
    gen = torch.Generator().manual_seed(1)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (prompt_len + 4,), generator=gen)
    parents, depths, mask = ctx.h.random_tree(n_nodes, gen)
    tree_tokens = torch.randint(0, vocab, (n_nodes,), generator=gen)
    # reference: the full sequence (prefill rows and incremental rows) and every root-to-node path of the tree
    paths = [torch.cat([ids[:prompt_len], tree_tokens[[j for j in range(n_nodes) if mask[node, j]]]])
             for node in range(n_nodes)]

    def reference(dtype):
        model = hf_from_pretrained(folder, dtype, dev)
        full, *tree = _reference_logits(model, [ids] + paths, dev)
        del model
        return {"prefill": full[:prompt_len], "steps": full[prompt_len:], "tree": torch.stack([t[-1] for t in tree])}

    ref32, ref16 = reference(torch.float32), reference(torch.bfloat16)
    details = {}
    for dtype in ("fp32", "bf16"):
        base = BaseModel.from_pretrained(folder, dtype=dtype, device=dev, max_len=128)
        ours = _runtime_logits(base, ids, prompt_len, tree_tokens, depths, mask)
        assert base.device.type == dev.type and base.lm_head.weight.dtype == base.dtype
        for part, expected in ref32.items():
            err = (ours[part] - expected).abs()
            d = {"max_abs_err": float(err.max()), "max_abs_logit": float(expected.abs().max()),
                 "argmax_agree": float((ours[part].argmax(-1) == expected.argmax(-1)).float().mean())}
            if dtype == "fp32":
                bound = ctx.h.ATOL + ctx.h.RTOL * expected.abs()
                d["tolerance"] = f"{ctx.h.ATOL} + {ctx.h.RTOL} x |logit|"
                assert bool((err <= bound).all()), f"{arch} fp32 {part}: max error {d['max_abs_err']:.3g}"
            else:
                hf_err = float((ref16[part] - expected).abs().max())
                hf_agree = float((ref16[part].argmax(-1) == expected.argmax(-1)).float().mean())
                limit = BF16_FACTOR * hf_err + bf16_ulp(d["max_abs_logit"])
                d.update(transformers_bf16_err=hf_err, transformers_bf16_argmax_agree=hf_agree, limit=limit)
                assert d["max_abs_err"] <= limit, (f"{arch} bf16 {part}: error {d['max_abs_err']:.3g} > {limit:.3g} "
                                                   f"(transformers' bf16: {hf_err:.3g})")
                assert d["argmax_agree"] >= hf_agree - BF16_ARGMAX_SLACK, f"{arch} bf16 {part}: argmax {d}"
            details[f"{dtype}_{part}"] = d
        del base
    return details


# ---- lossless speculative decoding ----------------------------------------------------------------------------------
def check_greedy(ctx: Context, arch: str, kind: str, tree: str) -> dict:
    """Greedy speculative output == plain greedy output on the same runtime (fp32), random prompts, no stop tokens;
    ``tree``: a fixed shape, ``dynamic`` (budget 12) or ``auto`` (dynamic, budget and depth from this device's
    measured costs)."""
    from clover.model.base import BaseModel

    base = BaseModel.from_pretrained(ctx.tiny(arch), dtype="fp32", device=ctx.device, max_len=160)
    if tree == "auto":
        model = ctx.h.make(base, kind, "dynamic", tree_budget="auto")
    else:
        model = ctx.h.make(base, kind, tree)
    n_prompts, new_tokens = (3, 32) if ctx.dry_run else (6, 48)
    gen = torch.Generator().manual_seed(0)
    taus = []
    for _ in range(n_prompts):
        prompt = torch.randint(3, 97, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen).tolist()
        spec = model.generate(prompt, max_new_tokens=new_tokens, stop_token_ids=())
        plain = model.generate_plain(prompt, max_new_tokens=new_tokens, stop_token_ids=())
        if spec.tokens != plain.tokens:
            raise AssertionError(f"speculative != plain for prompt {prompt}: {divergence(base, prompt, spec, plain)}")
        assert spec.new_tokens == new_tokens and sum(spec.accept_lengths) == new_tokens
        taus.append(spec.tau)
    details = {"prompts": n_prompts, "new_tokens": new_tokens, "tau": [round(t, 3) for t in taus]}
    # a Clover-2 draft initialised from a tiny base gets tokens accepted (see tests/); auto may rightly decide, from
    # this device's measured costs, that drafting does not pay and take plain steps
    if kind == "clover2" and tree != "auto":
        assert max(taus) > 1.0, "no draft token was ever accepted: only the rejection path ran"
    if model.depth_policy is not None:
        policy = model.depth_policy
        details["auto_costs_s"] = {"start": policy.start_cost, "level": policy.level_cost}
        details["auto_decayed_tries_per_depth"] = [round(float(x), 2) for x in policy.tried[1:]]
    return details


def divergence(base, prompt, spec, plain) -> str:
    """Where two greedy outputs part, and the top-2 logit gap of a fresh fp32 forward there: a gap near fp32
    rounding (~1e-6) means a near-tie that kernels of different shapes may break differently, anything larger a
    bug."""
    k = next(i for i, (a, b) in enumerate(zip(spec.tokens + [-1], plain.tokens + [-1])) if a != b)
    ids = torch.tensor([prompt + plain.tokens[:k]], device=base.device)
    top = base(ids, use_cache=False, logits_to_keep=1).logits[0, -1].float().topk(2).values
    return (f"first difference at new token {k} (speculative {spec.tokens[k:k + 3]}, plain {plain.tokens[k:k + 3]}); "
            f"top-2 logit gap there {float(top[0] - top[1]):.3g}")


def chi_square(counts: torch.Tensor, exact: torch.Tensor, runs: int) -> tuple[float, int]:
    """Pearson's statistic over cells expected >= 5 times, the rest pooled into one cell; and its degrees of
    freedom."""
    expected = exact * runs
    big = expected >= 5
    chi2 = float((((counts[big] - expected[big]) ** 2) / expected[big]).sum())
    rest = ~big & (expected > 0)
    rest_obs, rest_exp = float(counts[rest].sum()), float(expected[rest].sum())
    if rest_exp > 0:
        chi2 += (rest_obs - rest_exp) ** 2 / rest_exp
    return chi2, int(big.sum()) + (1 if rest_exp > 0 else 0) - 1


def check_sampling(ctx: Context, kind: str, runs: int, seconds: float) -> dict:
    """The first two committed tokens of sampled runs (T=0.7, top-p 0.9, 12-token vocabulary, a tree of 2-3 siblings
    per node) follow the base model's exact distribution: the chi-square test of tests/test_speculative.py (false
    alarm 1e-4), a total-variation bound against sampling noise, no token outside the nucleus, and draft tokens
    accepted in more than a tenth of the runs. Runs stop at ``runs`` or after ``seconds``."""
    from clover.generate.sampling import SamplingParams, processed_probs
    from clover.model.base import BaseModel

    folder = ctx.tiny("llama", vocab_size=12, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=1, num_hidden_layers=1)
    dev = ctx.device
    base = BaseModel.from_pretrained(folder, dtype="fp32", device=dev, max_len=32)
    model = ctx.h.make(base, kind, SAMPLING_TREE)
    params = SamplingParams(temperature=0.7, top_p=0.9)
    prompt = [3, 1, 4, 1, 5]
    with torch.no_grad():
        p1 = processed_probs(base(torch.tensor([prompt], device=dev), use_cache=False).logits[0, -1], params)
        seqs = torch.tensor([prompt + [x] for x in range(12)], device=dev)
        p2 = torch.stack([processed_probs(base(s[None], use_cache=False).logits[0, -1], params) for s in seqs])
    exact = (p1[:, None] * p2).flatten().double().cpu()
    counts = torch.zeros(144, dtype=torch.float64)
    gen = torch.Generator(device=dev).manual_seed(1234)
    accepted, done, start = 0, 0, time.perf_counter()
    while done < runs and (done < 200 or time.perf_counter() - start < seconds):
        r = model.generate(prompt, temperature=0.7, top_p=0.9, max_new_tokens=3, stop_token_ids=(), generator=gen)
        counts[r.tokens[0] * 12 + r.tokens[1]] += 1
        accepted += r.accept_lengths[1] > 1
        done += 1
    elapsed = time.perf_counter() - start
    chi2, df = chi_square(counts, exact, done)
    critical = ctx.h.chi2_critical(df)
    tv = float(0.5 * (counts / done - exact).abs().sum())
    noise = float(0.5 * (2 * exact * (1 - exact) / (math.pi * done)).sqrt().sum())
    details = {"runs": done, "seconds": elapsed, "runs_per_s": done / elapsed, "chi2": chi2, "df": df,
               "critical": critical, "total_variation": tv, "noise_tv": noise, "accepted_runs": accepted,
               "outside_nucleus": float(counts[exact == 0].sum())}
    assert details["outside_nucleus"] == 0, "sampled a token outside the top-p nucleus"
    assert chi2 < critical, f"chi-square {chi2:.1f} >= {critical:.1f} (df {df})"
    assert tv < 2 * noise, f"total variation {tv:.4f} >= 2 x noise {noise:.4f}"
    assert accepted > done // 10, f"draft tokens accepted in only {accepted} of {done} runs"
    return details


# ---- data generation and training -----------------------------------------------------------------------------------
CONVERSATIONS = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Name a prime number.", "Seven is a prime number."),
    ("Say hello in Spanish.", "Hola!"),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What colour is the sky?", "It is usually blue during the day."),
    ("What is 12 times 3?", "12 times 3 is 36."),
]


def _chat_model(ctx: Context) -> Path:
    """A tiny random Llama with a character tokenizer (ChatML special tokens), saved once."""
    folder = ctx.tmp / "chat_llama"
    if not (folder / "config.json").is_file():
        ctx.h.save_tiny(folder, "llama", vocab_size=128, max_position_embeddings=512)
        save_char_tokenizer(folder)
    return folder


def _run(ctx: Context, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if ctx.dry_run:
        env["OMP_NUM_THREADS"] = "1"  # tiny models: one thread is fastest and leaves the cores to others
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(ROOT))
    assert proc.returncode == 0, f"{' '.join(args[:2])} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def check_ge_data(ctx: Context) -> dict:
    """``python -m clover.ge_data.allocation`` on the device (``--gpus 0``; ``--gpus cpu`` dry): ShareGPT-format
    conversations and a monitoring set (``--eval``: the base model answers the questions greedily on the device),
    bf16 storage; the stored pre-norm states equal a fresh forward of the runtime, rounded to bf16."""
    from clover.ge_data.dataset import shard_files
    from clover.io import read_safetensors
    from clover.model.base import BaseModel
    from clover.ge_data.worker import compute_dtype

    folder = _chat_model(ctx)
    data = ctx.tmp / "sharegpt.json"
    records = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"{q} ({i})"},
                                                 {"from": "gpt", "value": a}]}
               for i, (q, a) in enumerate(CONVERSATIONS * 2)]
    data.write_text(json.dumps(records))
    questions = ctx.tmp / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "category": "qa", "turns": [q]}) + "\n"
                                 for i, (q, _) in enumerate(CONVERSATIONS[:4])))
    gpus = "cpu" if ctx.dry_run else str(ctx.device.index or 0)
    out, out_eval = ctx.tmp / "ge_data", ctx.tmp / "ge_data_eval"
    common = ["--model_path", str(folder), "--template", "chatml", "--max_len", "96", "--shard_size", "4",
              "--gpus", gpus, "--dtype", "bf16"]
    start = time.perf_counter()
    proc = _run(ctx, ["-m", "clover.ge_data.allocation", "--outdir", str(out), "--dataset", str(data), *common], 240)
    _run(ctx, ["-m", "clover.ge_data.allocation", "--outdir", str(out_eval), "--eval", "--question-file",
               str(questions), "--max-new-tokens", "16", *common], 240)
    seconds = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    totals = manifest["totals"]
    assert totals["complete"] and totals["conversations"] == len(records), totals
    assert manifest["compute_dtype"] == compute_dtype("bf16", "cpu" if ctx.dry_run else "cuda"), manifest
    eval_totals = json.loads((out_eval / "manifest.json").read_text())["totals"]
    assert eval_totals["complete"] and eval_totals["conversations"] >= 1, eval_totals
    # the first conversation's stored states vs a fresh forward (the worker's compute dtype, on the device)
    t = read_safetensors(shard_files(out)[0], what="shard")
    a, b = int(t["offsets"][0]), int(t["offsets"][1])
    ids, stored = t["input_ids"][a:b].long(), t["hidden_prenorm"][a:b]
    assert stored.dtype == torch.bfloat16 and 0 < int(t["loss_mask"][a:b].sum()) < b - a
    base = BaseModel.from_pretrained(folder, dtype=manifest["compute_dtype"], device=ctx.device, max_len=1)
    fresh = base(ids[None].to(ctx.device), use_cache=False, logits_to_keep=0).hidden_prenorm[0]
    fresh = fresh.to(torch.bfloat16).float().cpu()
    diff = float((stored.float() - fresh).abs().max())
    ulp = bf16_ulp(float(fresh.abs().max()))
    assert diff <= ulp, f"stored states differ from a fresh forward by {diff:.3g} (> one bf16 ulp {ulp:.3g})"
    ctx.ge_data = (out, out_eval)
    return {"conversations": totals["conversations"], "tokens": totals["tokens"],
            "masked_tokens": totals["masked_tokens"], "bytes_per_token": totals["bytes_per_token"],
            "eval_conversations": eval_totals["conversations"], "compute_dtype": manifest["compute_dtype"],
            "stored_vs_fresh_max_abs": diff, "seconds": seconds, "log_tail": proc.stdout.strip().splitlines()[-1]}


def check_train(ctx: Context, kind: str) -> dict:
    """One optimizer step of ``accelerate`` training in bf16 mixed precision (``--dtype bf16``) on the data of
    :func:`check_ge_data`, evaluation and chain accuracy included; the saved draft loads strictly on the device and
    decodes losslessly."""
    from clover.generate.speculative import SpeculativeModel
    from clover.model.base import BaseModel
    from clover.model.checkpoint import load_draft

    data, data_eval = getattr(ctx, "ge_data", (None, None))
    assert data is not None, "needs the ge_data check's output (it failed or did not run)"
    folder = _chat_model(ctx)
    cpdir = ctx.tmp / f"ckpt_{kind}"
    module = {"clover2": "clover.train.main_clover2", "eagle": "clover.train.main"}[kind]
    proc = _run(ctx, ["-m", module, "--basepath", str(folder), "--tmpdir", str(data), "--cpdir", str(cpdir),
                      "--evaldata", str(data_eval), "--bs", "2", "--epochs", "1", "--max_steps", "1", "--dtype", "bf16",
                      "--num_workers", "0", "--test_fraction", "0.25", "--warmup_steps", "1", "--max_len", "96",
                      "--chain_eval_batches", "1"], 300)
    text = proc.stdout + proc.stderr
    where = "cpu" if ctx.dry_run else "cuda"
    assert "autocast bf16" in text, f"training did not run in bf16 mixed precision:\n{text[-2000:]}"
    assert f"on {where}" in text, f"training did not run on {where}:\n{text[-2000:]}"
    summary = json.loads((cpdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["step"] == 1, summary
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["test_loss"]), summary
    base = BaseModel.from_pretrained(folder, dtype="fp32", device=ctx.device, max_len=128)
    draft = load_draft(cpdir / "final", base, expected_type=kind)
    assert draft.device.type == ctx.device.type
    draft.allocate_cache(base.max_len)
    model = SpeculativeModel(base, draft, tree="mc_sim_7b_63")
    prompt = [10, 20, 30, 40]
    spec = model.generate(prompt, max_new_tokens=24, stop_token_ids=())
    assert spec.tokens == model.generate_plain(prompt, max_new_tokens=24, stop_token_ids=()).tokens
    keep = ("train_loss", "test_loss", "test_top1_0", "chain_acc", "tokens_per_s")
    return {"step": summary["step"], **{k: summary[k] for k in keep if k in summary}, "trained_draft_tau": spec.tau}


# ---- the list -------------------------------------------------------------------------------------------------------
def all_checks(ctx: Context) -> list[tuple[str, callable]]:
    """(name, thunk) in run order; the sampling checks get the time that is left after the rest is estimated."""
    checks = [(f"runtime_vs_transformers_{arch}", lambda a=arch: check_runtime(ctx, a)) for arch in ARCHS]
    for arch in ("llama", "qwen2"):
        for kind in ("clover2", "eagle"):
            for tree in ("mc_sim_7b_63", "dynamic", "auto"):
                checks.append((f"greedy_{arch}_{kind}_{tree}",
                               lambda a=arch, k=kind, t=tree: check_greedy(ctx, a, k, t)))
    checks.append(("ge_data", lambda: check_ge_data(ctx)))
    checks += [(f"train_bf16_{kind}", lambda k=kind: check_train(ctx, k)) for kind in ("clover2", "eagle")]
    # runs: at most the test suite's 20k/5k on the GPU (1k/500 dry); Clover-2 gets 60% of the part's time that is
    # left, EAGLE-1 the rest, at least 15 s each (10 s dry)
    floor = 10.0 if ctx.dry_run else 15.0
    for kind, runs, share in (("clover2", 20000, 0.6), ("eagle", 5000, 1.0)):
        runs = min(runs, 1000) if ctx.dry_run else runs
        checks.append((f"sampling_{kind}", lambda k=kind, n=runs, f=share: check_sampling(
            ctx, k, n, seconds=max(floor, f * (ctx.time_left() - 10)))))
    return checks
