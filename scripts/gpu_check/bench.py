"""Timings at Vicuna-7B's shape with random weights (bf16 on the GPU; a tiny shape in fp32 for the dry run):
plain decoding of the runtime vs transformers' ``generate`` on the very same weight tensors, one forward of 1..128
tokens over a 512-token cache, and the drafts' costs (Clover-2: trunk start = ``extend`` and one RNN tree level =
``head``; EAGLE-1: start = ``extend`` and one tree level = ``tree_step``), each with and without the LM-head product
over the vocabulary. Every timing synchronises the device around each call (``common.timed``).

Random weights decode random text, so tokens/s and latencies are meaningful while acceptance is not (no τ here).
CUDA graphs are not tried: the runtime's decode step changes shapes every step (the cache grows, trees change
size), so capturing it needs static-shape buffers that the runtime does not have.
"""
from __future__ import annotations

import time

import torch

from gpu_check.common import cast_parameters, timed

VICUNA_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 rope_theta=10000.0)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
            vocab_size=256, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0)
FORWARD_SIZES = (1, 4, 8, 16, 26, 32, 64, 128)
CACHE = 512  # tokens in the cache before a timed forward
START_SIZES = (1, 4)  # positions a draft start feeds: one plain step's worth, a typical accepted chunk
LEVEL_ROWS = (4, 8)  # tree nodes at one level (the dynamic tree expands 8 per level)


def build_models(shape: dict, dtype: torch.dtype, device: torch.device, max_len: int):
    """transformers' ``LlamaForCausalLM`` with random weights on ``device`` in ``dtype``, and the runtime's
    :class:`BaseModel` holding the same tensors (no copy): the two decode from identical weights."""
    import transformers

    from clover.model.base import BaseModel
    from clover.model.layers import LlamaArgs, Rotary

    config = transformers.LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0, attention_bias=False, mlp_bias=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created (and randomly initialised) in dtype, on the device
    try:
        with torch.device(device):
            hf = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    hf = cast_parameters(hf.to(device), dtype).eval().requires_grad_(False)  # RoPE buffers stay fp32
    hf.generation_config.eos_token_id = None  # decode exactly max_new_tokens, as the runtime does without stops
    hf.generation_config.pad_token_id = 0
    args = LlamaArgs.from_hf_config({**config.to_dict(), "architectures": ["LlamaForCausalLM"]})
    with torch.device("meta"):
        base = BaseModel(args)
    state = {k: v for k, v in hf.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    base.load_state_dict(state, strict=True, assign=True)
    base.rotary = Rotary(args).to(device)
    base = base.eval().requires_grad_(False)
    base.name_or_path = "random Llama " + "x".join(str(shape[k]) for k in ("hidden_size", "num_hidden_layers"))
    base.allocate_cache(max_len)
    assert base.lm_head.weight.data_ptr() == hf.lm_head.weight.data_ptr()  # shared, not copied
    return hf, base


def decode_speed(hf, base, prompt_len: int, new_tokens: int, runs: int, device) -> dict:
    """Greedy plain decoding of ``new_tokens`` after a random ``prompt_len``-token prompt: the runtime's
    ``generate_plain`` vs transformers' ``generate`` (its default dynamic cache, eager python loop), median of
    ``runs`` after one warm-up each; prefill included in both."""
    from clover.generate.plain import generate_plain

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, base.args.vocab_size, (prompt_len,), generator=gen)
    inp = prompt[None].to(device)
    out = {}

    def ours():
        out["ours"] = generate_plain(base, prompt.tolist(), max_new_tokens=new_tokens, stop_token_ids=()).tokens

    def theirs():
        with torch.no_grad():
            seq = hf.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=new_tokens, do_sample=False)
        out["theirs"] = seq[0, prompt_len:].tolist()

    t_ours = timed(ours, device, runs)
    t_theirs = timed(theirs, device, runs)
    assert len(out["ours"]) == len(out["theirs"]) == new_tokens, (len(out["ours"]), len(out["theirs"]))
    same = 0
    for a, b in zip(out["ours"], out["theirs"]):
        if a != b:
            break
        same += 1
    return {"prompt_tokens": prompt_len, "new_tokens": new_tokens, "runs": runs,
            "clover_tokens_per_s": new_tokens / t_ours["median_s"],
            "transformers_tokens_per_s": new_tokens / t_theirs["median_s"],
            "speedup": t_theirs["median_s"] / t_ours["median_s"],
            "clover_s": t_ours, "transformers_s": t_theirs,
            "identical_prefix_tokens": same}  # bf16 near-ties may flip between the two implementations


def forward_costs(base, sizes, reps: int, device) -> dict:
    """Seconds of one forward of ``s`` new tokens (causal tree mask, logits at every position: what verifying an
    ``s``-token tree costs) over a ``CACHE``-token cache, cache restored after each call."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, base.args.vocab_size, (1, CACHE + max(sizes)), generator=gen).to(device)
    base.reset()
    base(ids[:, :CACHE], logits_to_keep=0)
    out = {}
    for s in sizes:
        mask = torch.ones(s, s, dtype=torch.bool, device=device).tril()
        positions = torch.arange(CACHE, CACHE + s, device=device)

        def step():
            base.truncate(CACHE)
            base(ids[:, CACHE:CACHE + s], position_ids=positions, tree_mask=mask)
        out[str(s)] = timed(step, device, reps, warmup=2)
    base.reset()
    one = out["1"]["median_s"]
    return {"cache_tokens": CACHE, "seconds": out,
            "ms": {s: round(v["median_s"] * 1e3, 3) for s, v in out.items()},
            "relative_to_1": {s: round(v["median_s"] / one, 3) for s, v in out.items()}}


def draft_costs(base, reps: int, device, dtype) -> dict:
    """Clover-2 (default config: 2 trunk layers, 5 heads) and EAGLE-1 (1 decoder layer) at the base's shape, both
    with a ``CACHE``-position draft cache: a start on 1 and 4 new positions (``runner.start``: ``extend`` plus the
    root's children's logits) and one tree level on 4 and 8 rows (``runner.expand``: ``head`` or ``tree_step`` plus
    the logits), LM head over the whole vocabulary included, and each without its LM-head product (``extend``,
    ``head``, ``tree_step`` alone)."""
    from clover.model.checkpoint import init_draft

    h, v = base.args.hidden_size, base.args.vocab_size
    gen = torch.Generator().manual_seed(2)
    hidden = (torch.randn(1, CACHE + max(START_SIZES), h, generator=gen) * 0.5).to(device=device, dtype=dtype)
    ids = torch.randint(0, v, (1, CACHE + max(START_SIZES)), generator=gen).to(device)
    results = {}
    for kind in ("clover2", "eagle"):
        draft = init_draft(kind, base, dtype=dtype).eval()
        draft.allocate_cache(CACHE + 64)
        runner = draft.runner()
        runner.reset()
        draft.extend(hidden[:, :CACHE], ids[:, :CACHE])  # a committed context of CACHE positions
        r = {"trainable_params_M": float(f"{sum(p.numel() for p in draft.parameters()) / 1e6:.4g}")}

        def start(n):
            if kind == "clover2":
                draft.truncate(CACHE)
            else:
                runner.committed = CACHE  # EagleRunner.start truncates to it
            runner.start(hidden[:, CACHE:CACHE + n], ids[:, CACHE:CACHE + n])
        def extend_only(n):  # the trunk (Clover-2) or decoder layer (EAGLE-1) on n positions, no LM head
            draft.truncate(CACHE)
            draft.extend(hidden[:, CACHE:CACHE + n], ids[:, CACHE:CACHE + n])
        for n in START_SIZES:
            r[f"start_{n}"] = timed(lambda: start(n), device, reps, warmup=2)
            r[f"start_{n}_without_lm_head"] = timed(lambda: extend_only(n), device, reps, warmup=2)
        start(1)
        saved = {k: getattr(runner, k) for k in ("states", "feats", "ancestors", "committed") if hasattr(runner, k)}
        for rows in LEVEL_ROWS:
            parents = torch.zeros(rows, dtype=torch.long, device=device)
            tokens = ids[0, :rows].clone()

            def level():
                for k, val in saved.items():
                    setattr(runner, k, val)
                if kind == "eagle":
                    draft.truncate(saved["committed"])
                return runner.expand(parents, tokens, 1)

            def level_without_head():
                for k, val in saved.items():
                    setattr(runner, k, val)
                if kind == "clover2":
                    return draft.head(saved["states"][parents], tokens, 1)
                draft.truncate(saved["committed"])
                mask = torch.cat([torch.ones(rows, saved["committed"], dtype=torch.bool, device=device),
                                  torch.eye(rows, dtype=torch.bool, device=device)], 1)
                pos = torch.full((rows,), saved["committed"], dtype=torch.long, device=device)
                return draft.tree_step(saved["feats"][parents], tokens, pos, mask)

            r[f"level_{rows}"] = timed(level, device, reps, warmup=2)
            r[f"level_{rows}_without_lm_head"] = timed(level_without_head, device, reps, warmup=2)
        results[kind] = r
        del draft, runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    c, e = results["clover2"], results["eagle"]
    results["eagle_over_clover2_level_8"] = e["level_8"]["median_s"] / c["level_8"]["median_s"]
    results["eagle_over_clover2_level_8_without_lm_head"] = (e["level_8_without_lm_head"]["median_s"]
                                                             / c["level_8_without_lm_head"]["median_s"])
    return results


def run(device: torch.device, dry_run: bool) -> dict:
    shape = TINY if dry_run else VICUNA_7B
    dtype = torch.float32 if dry_run else torch.bfloat16
    reps = 3 if dry_run else 10
    t0 = time.perf_counter()
    hf, base = build_models(shape, dtype, device, max_len=CACHE + 256)
    build_s = time.perf_counter() - t0
    out = {"shape": shape, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
           "build_seconds": build_s, "cuda_graphs": "not tried (the decode step has no static shapes)"}
    if device.type == "cuda":
        out["weights_gib"] = round(sum(p.numel() * p.element_size() for p in hf.parameters()) / 2**30, 2)
    out["decode"] = decode_speed(hf, base, prompt_len=32 if dry_run else 128, new_tokens=16 if dry_run else 128,
                                 runs=2 if dry_run else 3, device=device)
    out["forward"] = forward_costs(base, FORWARD_SIZES, reps, device)
    del hf  # the drafts are timed on the runtime's (shared) tensors alone
    out["drafts"] = draft_costs(base, reps, device, dtype)
    if device.type == "cuda":
        out["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    out["seconds"] = time.perf_counter() - t0
    return out
