"""The draft trainer behind ``clover train clover2`` / ``clover.train.main_clover2`` (Clover-2) and ``clover train
eagle`` / ``clover.train.main`` (EAGLE-1).

Reads the hidden-state shards written by ``clover data`` (or, online, conversations whose hidden states the base
computes as batches are assembled: :mod:`clover.train.data`) and trains a draft against the frozen base model with
Hugging Face accelerate: one process, DDP (NCCL on GPUs, gloo on CPUs), or DeepSpeed/FSDP through an accelerate
config as long as parameters are not sharded (the draft is exported from the unwrapped module).
The schedule (:mod:`clover.train.schedule`) is defined in optimizer steps and advances exactly once per optimizer
step, whatever the number of processes; weight decay applies to matrices only; the same loss function serves training
and evaluation; the train/test split is sorted and seeded; checkpoints (:mod:`clover.train.checkpoints`) hold the draft
and its whole training state without pickle, and a resumed run continues bit for bit where the checkpoint stood, inside
an epoch too.

Read top to bottom: :func:`setup` builds a :class:`Run` (data, draft, optimizer, accelerator), :func:`epoch_steps`
runs one epoch (a batch per step of a generator, so that :mod:`clover.train.joint` can interleave several drafts),
:func:`end_epoch` evaluates, logs and checkpoints it, :func:`run_steps` strings the epochs together. Per
epoch: train, evaluate the held-out split with the training loss (per-head top-1/2/3 summed exactly across
processes), measure the top-1 chain accuracy on the monitoring set (``--evaldata``), print one summary line, append it
to ``OUTDIR/metrics.jsonl``, and write ``OUTDIR/epoch_{k}/``; after the last epoch (or a ``--max-time`` /
``--max-steps`` stop) ``OUTDIR/final/`` holds the draft that generation loads.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import Dataset
from tqdm import tqdm

from clover.errors import run_cli
from clover.ge_data.dataset import HiddenStateDataset
from clover.io import append_jsonl
from clover.model.base import BaseModel
from clover.model.checkpoint import init_draft, load_draft, top_tokens
from clover.model.losses import Metrics
from clover.model.registry import draft_class
from clover.train.accelerator import make_accelerator
from clover.train.checkpoints import (STATE, check_resumable, data_order, kept_draft_vocab, kept_measurements,
                                      kept_precision, resume_point, save_checkpoint, save_final, save_snapshot)
from clover.train.cli import build_parser, check_data_source, read_overrides
from clover.train.data import collate_for, conversation_count, hidden_sample, load_data
from clover.train.evaluate import batch_loss, chain_counts, evaluate, format_summary, shard
from clover.train.schedule import Clock, EpochSampler, decay_start, lr_factor
from clover.train.state import load_rng, load_state


# ---- setup ----------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything one training run holds."""

    args: object
    accelerator: Accelerator
    draft: torch.nn.Module  # the bare draft
    model: torch.nn.Module  # the same, wrapped by accelerate (DDP ...)
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: object
    train_set: Dataset  # HiddenStateDataset (dumped shards) or, online, ConversationDataset
    test_set: Dataset
    monitor: HiddenStateDataset | None
    cpdir: Path
    steps_per_epoch: int
    clock: Clock
    start_epoch: int = 0
    global_step: int = 0
    skip_batches: int = 0                 # batches of the first epoch already trained (a resume inside an epoch)
    resume_state: Path | None = None      # restore its RNG states once the first epoch's data loader has started
    resume_extra: dict = field(default_factory=dict)  # the interrupted epoch's running metrics
    stop_reason: str | None = None        # why the run stopped before its last epoch ended (--max-time)
    tokens_seen: float = 0.0              # training tokens so far: every session, every process
    shared: tuple | None = None           # (base, (train, test, monitor)) for further drafts trained beside this one

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.args.epochs

    @property
    def stable_end(self) -> int | None:
        """The optimizer step at which a wsd schedule starts decaying (None: another schedule)."""
        if self.args.schedule != "wsd":
            return None
        return decay_start(self.args.warmup_steps, self.total_steps, self.args.decay_fraction)

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over processes (on the device: NCCL reduces CUDA tensors)."""
        return self.accelerator.reduce(t.to(self.accelerator.device), "sum").cpu()

    def total_metrics(self, m: Metrics) -> Metrics:
        return Metrics.from_vector(self.total(m.vector()), m.sums.shape[0])

    def held_out(self) -> Metrics:
        a = self.accelerator
        shards = shard(self.test_set, a.process_index, a.num_processes)
        return self.total_metrics(evaluate(self.draft, shards, self.args.bs, self.args.mask_alignment))

    @property
    def trackers(self) -> bool:
        return bool(self.accelerator.log_with)


def new_draft(args, draft_type: str, base, train_set, overrides: dict, accelerator,
              resume_from: Path | None = None):
    """The draft a run starts from: ``--init-draft``'s (fp32 master weights), else a new one initialised from the
    base (its draft vocabulary the training split's most frequent reply tokens). Resuming (``resume_from``), the
    checkpoint's weights replace it a moment later: its draft vocabulary and measured values (``overrides``, see
    :func:`kept_measurements`) are the checkpoint's, and the base does not run over training data to measure them."""
    if args.init_draft:
        accelerator.print(f"starting from the draft {args.init_draft}")
        return load_draft(args.init_draft, base, dtype=torch.float32, expected_type=draft_type).train()
    vocab_size, draft_vocab = overrides.get("draft_vocab_size", 0), None
    if vocab_size and resume_from is not None:
        draft_vocab = kept_draft_vocab(resume_from)  # another size: check_resumable refuses the checkpoint
        draft_vocab = draft_vocab if draft_vocab is not None and draft_vocab.numel() == vocab_size else None
    if vocab_size and draft_vocab is None:
        counts = train_set.token_counts(base.args.vocab_size)
        draft_vocab = top_tokens(counts, vocab_size)
        accelerator.print(f"draft vocabulary: the {vocab_size} most frequent reply tokens cover "
                          f"{counts[draft_vocab].sum() / counts.sum().clamp(min=1):.2%} of the training replies")
    sample = hidden_sample(train_set) if resume_from is None else None
    return init_draft(draft_type, base, draft_vocab=draft_vocab, hidden_sample=sample, **overrides)


def setup(args, draft_type: str, shared: tuple | None = None, keep_shared: bool = False) -> Run:
    """Data, draft (new, or restored from a checkpoint with ``--resume`` / ``--resume-from``), optimizer and
    schedule. ``shared``: the base model and data splits of a run this one trains beside (``keep_shared``: keep this
    run's in ``Run.shared`` for that)."""
    cls = draft_class(draft_type)
    check_data_source(args)
    overrides = read_overrides(args, cls)
    cpdir = Path(args.outdir)
    resume_from = resume_point(args, cpdir)
    if resume_from is not None:  # what the run measured when it started, it keeps
        overrides = kept_measurements(resume_from, cls, overrides)
    accelerator = make_accelerator(args, cls.ddp_unused_parameters(overrides), cpdir, kept_precision(resume_from))
    bf16 = accelerator.mixed_precision == "bf16"
    device = accelerator.device if accelerator.device.type == "cuda" else torch.device("cpu")  # not "cpu:<rank>"
    set_seed(args.seed)
    if shared is None:
        base = BaseModel.from_pretrained(args.base_model, dtype="bf16" if bf16 else "fp32", device=device, max_len=1)
        shared = base, load_data(args, base)
    base, (train_set, test_set, monitor) = shared
    draft = new_draft(args, draft_type, base, train_set, overrides, accelerator, resume_from)
    draft.gradient_checkpointing = args.gradient_checkpointing
    progress = check_resumable(resume_from, args, draft, base) if resume_from is not None else None
    if resume_from is None and args.resume:
        accelerator.print(f"--resume: no checkpoint in {cpdir}; starting from scratch")
    del base  # the draft keeps references to the frozen tensors it needs (online, the datasets keep the base)

    params = [p for p in draft.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.bs, sampler=EpochSampler(len(train_set), args.seed),
                                         collate_fn=collate_for(train_set),  # online: the base runs in this process
                                         num_workers=0 if args.conversations else args.num_workers,
                                         pin_memory=device.type == "cuda")
    world = accelerator.num_processes
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / (args.bs * world)) / args.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup=args.warmup_steps, total=steps_per_epoch * args.epochs, schedule=args.schedule,
        decay_fraction=args.decay_fraction))
    model, optimizer, loader, scheduler = accelerator.prepare(draft, optimizer, loader, scheduler)
    run = Run(args, accelerator, draft, model, optimizer, scheduler, loader, train_set, test_set, monitor, cpdir,
              steps_per_epoch, Clock(accelerator, args.max_time, args.save_every),
              shared=shared if keep_shared else None)

    if accelerator.is_main_process:
        cpdir.mkdir(parents=True, exist_ok=True)
    if progress is not None:  # weights, optimizer and schedule now; RNG states when the data flows again
        run.resume_extra = load_state(resume_from / STATE, accelerator, model, optimizer, scheduler)
        run.start_epoch, run.global_step = progress["epoch"], progress["global_step"]
        run.skip_batches, run.resume_state = progress.get("batches_done", 0), resume_from / STATE
        run.tokens_seen = progress.get("tokens_seen", 0.0)
        accelerator.print(f"resumed from {resume_from} (epoch {run.start_epoch + 1}, batch {run.skip_batches}, "
                          f"optimizer step {run.global_step})")
    elif accelerator.is_main_process:  # a fresh run starts fresh metrics logs
        (cpdir / "metrics.jsonl").unlink(missing_ok=True)
        (cpdir / "evals.jsonl").unlink(missing_ok=True)
    if run.trackers:
        accelerator.init_trackers(f"clover-{draft_type}", config={k: v for k, v in vars(args).items()
                                                                  if isinstance(v, (int, float, str, bool))})
    accelerator.print(
        f"training {cls.label} ({sum(p.numel() for p in params) / 1e6:.2f} M trainable parameters) on "
        f"{conversation_count(train_set)} ({len(test_set)} held out), {world} process(es) on {device}, "
        f"autocast {'bf16' if bf16 else 'off (fp32)'}, {steps_per_epoch} optimizer steps per epoch")
    return run


# ---- one epoch ------------------------------------------------------------------------------------------------------
def _stopped(run: Run) -> bool:
    return run.stop_reason is not None or (run.args.max_steps is not None and run.global_step >= run.args.max_steps)


def _seen(run: Run, fresh: torch.Tensor) -> float:
    """Training tokens of the whole run so far (earlier sessions included), ``fresh`` of them not yet counted
    (collective)."""
    return run.tokens_seen + run.total(fresh).item()


def _progress(run: Run, epoch: int, done: int, tokens_seen: float) -> dict:
    """Where the run stands after ``done`` batches of epoch ``epoch`` (0-based), as a checkpoint records it."""
    if done == len(run.loader):
        epoch, done = epoch + 1, 0
    return {"epoch": epoch, "batches_done": done, "global_step": run.global_step, "tokens_seen": tokens_seen,
            "mixed_precision": run.accelerator.mixed_precision, **data_order(run.args)}


def _checkpoint(run: Run, name: str, epoch: int, done: int, sums: Metrics, tokens: torch.Tensor,
                fresh: torch.Tensor) -> None:
    """A checkpoint inside an epoch, with the epoch's running metrics summed over processes (collective)."""
    extra = {"epoch_metrics": run.total(sums.vector()), "epoch_tokens": run.total(tokens).reshape(1)}
    save_checkpoint(run, name, _progress(run, epoch, done, _seen(run, fresh)), extra)
    run.clock.saved_now()


def _resumed_sums(run: Run) -> tuple[Metrics, torch.Tensor]:
    """The interrupted epoch's metrics so far (on the main process; the others start from zero)."""
    heads, device = run.draft.train_heads, run.draft.device
    extra = run.resume_extra
    if not extra or not run.accelerator.is_main_process:
        return Metrics.zeros(heads, device), torch.zeros(())
    return Metrics.from_vector(extra["epoch_metrics"].to(device), heads), extra["epoch_tokens"][0]


def epoch_steps(run: Run, epoch: int):
    """One pass over the training split (the rest of it after a resume inside the epoch; up to ``--max-steps`` or
    ``--max-time``), a generator that yields after each batch; returns the epoch's summed training metrics and
    tokens, the batches done, and the tokens of this call. Along the way: held-out evaluations (``--eval-every``),
    snapshots (``--snapshot-every``), timed checkpoints (``--save-every``) and, for a wsd schedule, ``stable/``."""
    args, accelerator, model, draft = run.args, run.accelerator, run.model, run.draft
    model.train()
    run.loader.set_epoch(epoch)
    skip, run.skip_batches = run.skip_batches, 0
    loader = accelerator.skip_first_batches(run.loader, skip) if skip else run.loader
    sums, tokens = _resumed_sums(run) if skip else (Metrics.zeros(draft.train_heads, draft.device), torch.zeros(()))
    done, fresh = skip, torch.zeros(())
    if run.resume_state is not None and not skip:  # saved before its epoch's loader started: restore before it does
        load_rng(run.resume_state, accelerator.process_index)
        run.resume_state = None
    noise = draft.training_noise
    bar = tqdm(loader, total=len(run.loader), initial=skip, desc=f"{draft.label} epoch {epoch + 1}/{args.epochs}",
               disable=not accelerator.is_local_main_process)
    for batch in bar:
        if run.resume_state is not None:  # saved inside the epoch, after its loader drew its seed: restore now
            load_rng(run.resume_state, accelerator.process_index)
            run.resume_state = None
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss, metrics = batch_loss(model, draft, batch, args.mask_alignment, noise)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.grad_clip > 0:
                if args.grad_clip_value:
                    accelerator.clip_grad_value_(model.parameters(), args.grad_clip)
                else:
                    accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
            run.optimizer.step()
            if accelerator.sync_gradients:
                run.scheduler.step()  # once per optimizer step, whatever the number of processes
            run.optimizer.zero_grad(set_to_none=True)
        sums = sums + metrics
        n = batch["attention_mask"].sum().item()
        tokens, fresh, done = tokens + n, fresh + n, done + 1
        if not accelerator.sync_gradients:
            yield
            continue
        run.global_step += 1
        lr = run.scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        if run.trackers:
            accelerator.log({"train/loss": loss.item(), "train/lr": lr}, step=run.global_step)
        if args.eval_every and run.global_step % args.eval_every == 0 and len(run.test_set):
            with accelerator.autocast():
                point = {"epoch": epoch + 1, "step": run.global_step, "tokens": _seen(run, fresh),
                         **run.held_out().summary("test_")}
            model.train()
            if accelerator.is_main_process:
                append_jsonl(run.cpdir / "evals.jsonl", point)
        if args.snapshot_every and run.global_step % args.snapshot_every == 0:
            save_snapshot(accelerator, model, run.cpdir, run.global_step)
        if run.global_step == run.stable_end and run.stable_end < run.total_steps:
            _checkpoint(run, "stable", epoch, done, sums, tokens, fresh)
            accelerator.print(f"\nstable phase over at optimizer step {run.global_step}: {run.cpdir / 'stable'} "
                              f"extends the run (--resume-from it with more --epochs)")
        stop, save = run.clock.check(run.global_step)
        if stop:
            run.stop_reason = f"--max-time {args.max_time:g} s"
        if _stopped(run):
            break
        if save and done < len(run.loader):
            _checkpoint(run, f"step_{run.global_step}", epoch, done, sums, tokens, fresh)
        yield
    bar.close()
    run.tokens_seen = _seen(run, fresh)
    return sums, tokens, done, fresh


# ---- end of an epoch ------------------------------------------------------------------------------------------------
def end_epoch(run: Run, epoch: int, sums: Metrics, tokens: torch.Tensor, fresh: torch.Tensor, seconds: float,
              done: int) -> dict:
    """Evaluate (held-out split, chain accuracy), log one summary line, and checkpoint: ``epoch_{k}/`` after a
    complete epoch, ``step_{n}/`` after a stop inside one."""
    args, accelerator, draft = run.args, run.accelerator, run.draft
    if done < len(run.loader):  # stopped inside the epoch: a checkpoint --resume continues from, taken before the
        # evaluation below draws from the random number generators (the uninterrupted run does not evaluate here)
        _checkpoint(run, f"step_{run.global_step}", epoch, done, sums, tokens, torch.zeros(()))
    summary = {"epoch": epoch + 1, "step": run.global_step, "tokens": run.tokens_seen,
               **run.total_metrics(sums).summary("train_"),
               "tokens_per_s": run.total(fresh).item() / seconds}
    with accelerator.autocast():
        if len(run.test_set):
            summary |= run.held_out().summary("test_")
        if run.monitor is not None and args.chain_eval_batches:
            subset = shard(run.monitor, accelerator.process_index, accelerator.num_processes,
                           limit=args.chain_eval_batches * args.bs)
            correct, counted = run.total(chain_counts(draft, subset, args.bs))
            summary["chain_acc"] = (correct / counted.clamp(min=1)).tolist()
    if accelerator.is_main_process:
        accelerator.print(f"{draft.label}: {format_summary(summary, args.epochs, draft.train_heads)}")
        append_jsonl(run.cpdir / "metrics.jsonl", summary)
    if run.trackers:
        accelerator.log({f"epoch/{k}": v for k, v in summary.items() if not isinstance(v, list)}, step=run.global_step)
    if done == len(run.loader):  # after the evaluation, as the uninterrupted run's next epoch starts after it
        save_checkpoint(run, f"epoch_{epoch + 1}", _progress(run, epoch, done, run.tokens_seen))
    return summary


# ---- the run --------------------------------------------------------------------------------------------------------
def main(draft_type: str, argv=None) -> None:
    """CLI entry point: parse ``argv`` and train; bad input ends with one ``error:`` line and exit status 2."""
    run_cli(lambda: train(build_parser(draft_type).parse_args(argv), draft_type))


def run_steps(run: Run):
    """The whole run, a generator that yields after each batch (:mod:`clover.train.joint` interleaves several runs
    batch by batch); returns the per-epoch summaries."""
    history = []
    for epoch in range(run.start_epoch, run.args.epochs):
        if _stopped(run):
            break
        start = time.perf_counter()
        sums, tokens, done, fresh = yield from epoch_steps(run, epoch)
        history.append(end_epoch(run, epoch, sums, tokens, fresh, time.perf_counter() - start, done))
    return history


def finish(run: Run) -> None:
    """``OUTDIR/final/`` and the closing lines."""
    save_final(run.accelerator, run.model, run.cpdir)
    if run.stop_reason:
        run.accelerator.print(f"stopped by {run.stop_reason} at optimizer step {run.global_step}; --resume continues")
    run.accelerator.print(f"final draft: {run.cpdir / 'final'}")
    run.accelerator.end_training()


def train(args, draft_type: str) -> list[dict]:
    """Train a ``draft_type`` draft as ``args`` (see :func:`clover.train.cli.build_parser`) say; returns the
    per-epoch summaries."""
    run = setup(args, draft_type)
    steps = run_steps(run)
    while True:
        try:
            next(steps)
        except StopIteration as end:
            history = end.value
            break
    finish(run)
    return history
