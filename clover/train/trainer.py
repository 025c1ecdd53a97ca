"""The draft trainer behind ``clover.train.main_clover2`` (Clover-2) and ``clover.train.main`` (EAGLE-1).

Reads the hidden-state shards written by ``python -m clover.ge_data.allocation`` and trains a draft against the
frozen base model with Hugging Face accelerate: one process, DDP (NCCL on GPUs, gloo on CPUs), or DeepSpeed/FSDP
through an accelerate config as long as parameters are not sharded (the draft is exported from the unwrapped module).
The schedule is defined in optimizer steps and advances exactly once per optimizer step, whatever the number of
processes; weight decay applies to matrices only; the same loss function serves training and evaluation; the
train/test split is sorted and seeded; a run trains exactly ``--epochs`` epochs; a checkpoint holds weights and
config together, and a resume continues after the last completed epoch.

Read top to bottom: :func:`setup` builds a :class:`Run` (data, draft, optimizer, accelerator), :func:`train_epoch`
runs one epoch, :func:`end_epoch` evaluates, logs and checkpoints it, :func:`train` strings them together. Per
epoch: train, evaluate the held-out split with the training loss (per-head top-1/2/3 summed exactly across
processes), measure the top-1 chain accuracy on the monitoring set (``--evaldata``), print one summary line, append it
to ``OUTDIR/metrics.jsonl``, and write ``OUTDIR/epoch_{k}/``; after the last epoch ``OUTDIR/final/`` holds the draft
that generation loads.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (DistributedDataParallelKwargs, ProjectConfiguration, is_tensorboard_available,
                              is_wandb_available, set_seed)
from tqdm import tqdm

from clover.errors import CloverError, run_cli
from clover.ge_data.dataset import HiddenStateDataset, collate
from clover.model.base import BaseModel, parse_dtype
from clover.model.checkpoint import init_draft, top_tokens
from clover.model.losses import TOPK, Metrics
from clover.model.registry import draft_class
from clover.train.checkpoints import (check_resumable, data_order, read_progress, resume_point, save_checkpoint,
                                      save_final)
from clover.train.cli import build_parser, read_overrides
from clover.train.evaluate import batch_loss, chain_counts, evaluate, shard


# ---- pieces ---------------------------------------------------------------------------------------------------------
def autocast_dtype(choice: str, device: torch.device) -> str:
    """accelerate ``mixed_precision`` for ``--dtype``, whose auto means what it means everywhere: bf16 on CUDA (where
    supported), fp32 on CPU: even on CPUs that list native bf16 instructions, the draft's forward + backward measured
    slower in bf16 autocast than in fp32 (75 vs 44 ms a draft-shaped layer on an Intel Xeon with avx512_bf16)."""
    if choice == "auto" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "no"
    return "bf16" if parse_dtype(choice, device) == torch.bfloat16 else "no"


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warm-up, then constant, linear or cosine decay that
    reaches 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


class EpochSampler(torch.utils.data.Sampler):
    """A permutation of ``range(n)`` seeded by ``seed + epoch``: epoch ``e`` sees the same order whether the run was
    resumed or not. accelerate's prepared loader calls :meth:`set_epoch` and shards the batches over processes."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


def make_accelerator(args, unused_parameters: bool, cpdir: Path) -> Accelerator:
    cuda = torch.cuda.is_available()
    trackers = [] if args.report_to == "none" else [args.report_to]
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    if trackers and not available[args.report_to]():
        raise CloverError(f"--report_to {args.report_to} needs the package {args.report_to!r}: "
                          f"pip install {args.report_to}")
    return Accelerator(cpu=not cuda,  # lets CPU processes started by torchrun / accelerate launch form a gloo group
                       gradient_accumulation_steps=args.grad_accum,
                       mixed_precision=autocast_dtype(args.dtype, torch.device("cuda" if cuda else "cpu")),
                       log_with=trackers or None, step_scheduler_with_optimizer=False,
                       project_config=ProjectConfiguration(project_dir=str(cpdir), logging_dir=str(cpdir / "logs")),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused_parameters)])


def load_data(args, base) -> tuple[HiddenStateDataset, HiddenStateDataset, HiddenStateDataset | None]:
    """Train and held-out splits of the data folder and the monitoring set, checked against the base model."""
    max_len = min(args.max_len, base.args.max_position_embeddings)
    split = dict(max_len=max_len, test_fraction=args.test_fraction, seed=args.seed)
    train_set = HiddenStateDataset(args.data_dir, split="train", **split)
    train_set.check_compatible(base.args.hidden_size, base.args.vocab_size, args.base_model)
    if len(train_set) == 0:
        raise CloverError(f"{args.data_dir} has no training conversations left after holding out --test_fraction "
                          f"{args.test_fraction}; dump more data or lower --test_fraction")
    test_set = HiddenStateDataset(args.data_dir, split="test", **split)
    monitor = None
    if args.evaldata:  # an empty string means "none"
        monitor = HiddenStateDataset(args.evaldata, max_len=max_len, split="all")
        monitor.check_compatible(base.args.hidden_size, base.args.vocab_size, args.base_model)
    return train_set, test_set, monitor


def hidden_sample(dataset, conversations: int = 32) -> torch.Tensor:
    """Pre-norm states of the first conversations of ``dataset``: what a draft measures its initial scales on."""
    return torch.cat([dataset[i]["hidden_prenorm"] for i in range(min(conversations, len(dataset)))])


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
    train_set: HiddenStateDataset
    test_set: HiddenStateDataset
    monitor: HiddenStateDataset | None
    cpdir: Path
    steps_per_epoch: int
    start_epoch: int = 0
    global_step: int = 0

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


def setup(args, draft_type: str) -> Run:
    """Data, draft (new, or restored from the last completed epoch with ``--resume``), optimizer and schedule."""
    cls = draft_class(draft_type)
    overrides = read_overrides(args)
    cpdir = Path(args.outdir)
    resume_from = resume_point(args, cpdir)
    accelerator = make_accelerator(args, cls.ddp_unused_parameters(overrides), cpdir)
    bf16 = accelerator.mixed_precision == "bf16"
    device = accelerator.device if accelerator.device.type == "cuda" else torch.device("cpu")  # not "cpu:<rank>"
    set_seed(args.seed)
    base = BaseModel.from_pretrained(args.base_model, dtype="bf16" if bf16 else "fp32", device=device, max_len=1)
    train_set, test_set, monitor = load_data(args, base)
    vocab_size, draft_vocab = overrides.get("draft_vocab_size", 0), None
    if vocab_size:
        counts = train_set.token_counts(base.args.vocab_size)
        draft_vocab = top_tokens(counts, vocab_size)
        accelerator.print(f"draft vocabulary: the {vocab_size} most frequent reply tokens cover "
                          f"{counts[draft_vocab].sum() / counts.sum().clamp(min=1):.2%} of the training replies")
    draft = init_draft(draft_type, base, draft_vocab=draft_vocab, hidden_sample=hidden_sample(train_set),
                       **overrides)
    draft.gradient_checkpointing = args.gradient_checkpointing
    if resume_from is not None:
        check_resumable(resume_from, args, draft, base)
    elif args.resume:
        accelerator.print(f"--resume: no completed epoch in {cpdir}; starting from scratch")
    del base  # the draft keeps references to the frozen tensors it needs

    params = [p for p in draft.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.bs, sampler=EpochSampler(len(train_set), args.seed),
                                         collate_fn=collate, num_workers=args.num_workers,
                                         pin_memory=device.type == "cuda")
    world = accelerator.num_processes
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / (args.bs * world)) / args.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup=args.warmup_steps, total=steps_per_epoch * args.epochs, schedule=args.schedule))
    model, optimizer, loader, scheduler = accelerator.prepare(draft, optimizer, loader, scheduler)
    run = Run(args, accelerator, draft, model, optimizer, scheduler, loader, train_set, test_set, monitor, cpdir,
              steps_per_epoch)

    if resume_from is not None:
        try:  # model, optimizer, scheduler and RNG states
            accelerator.load_state(str(resume_from / "trainer_state"))
        except Exception as err:  # accelerate/torch raise many types for missing or damaged files
            raise CloverError(f"cannot restore the training state from {resume_from / 'trainer_state'}: "
                              f"{type(err).__name__}: {err}".splitlines()[0]) from None
        progress = read_progress(resume_from)
        run.start_epoch, run.global_step = progress["epoch"], progress["global_step"]
        accelerator.print(f"resumed from {resume_from} (epoch {run.start_epoch}, optimizer step {run.global_step})")
    elif accelerator.is_main_process:  # a fresh run starts fresh metrics logs
        cpdir.mkdir(parents=True, exist_ok=True)
        (cpdir / "metrics.jsonl").unlink(missing_ok=True)
        (cpdir / "evals.jsonl").unlink(missing_ok=True)
    if run.trackers:
        accelerator.init_trackers(f"clover-{draft_type}", config={k: v for k, v in vars(args).items()
                                                                  if isinstance(v, (int, float, str, bool))})
    accelerator.print(
        f"training a {cls.label} draft ({sum(p.numel() for p in params) / 1e6:.2f} M trainable parameters) on "
        f"{len(train_set)} conversations ({len(test_set)} held out), {world} process(es) on {device}, "
        f"autocast {'bf16' if bf16 else 'off (fp32)'}, {steps_per_epoch} optimizer steps per epoch")
    return run


# ---- one epoch ------------------------------------------------------------------------------------------------------
def _stopped(run: Run) -> bool:
    return run.args.max_steps is not None and run.global_step >= run.args.max_steps


def train_epoch(run: Run, epoch: int) -> tuple[Metrics, torch.Tensor, int]:
    """One pass over the training split (or up to ``--max_steps``); returns the summed training metrics, the tokens
    seen and the number of batches done. With ``--eval_every`` the held-out split is evaluated along the way."""
    args, accelerator, model, draft = run.args, run.accelerator, run.model, run.draft
    model.train()
    run.loader.set_epoch(epoch)
    sums, tokens, done = Metrics.zeros(draft.train_heads, draft.device), torch.zeros(()), 0
    noise = draft.training_noise
    bar = tqdm(run.loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not accelerator.is_local_main_process)
    for batch in bar:
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
        tokens += batch["attention_mask"].sum().item()
        done += 1
        if accelerator.sync_gradients:
            run.global_step += 1
            lr = run.scheduler.get_last_lr()[0]
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
            if run.trackers:
                accelerator.log({"train/loss": loss.item(), "train/lr": lr}, step=run.global_step)
            if args.eval_every and run.global_step % args.eval_every == 0 and len(run.test_set):
                with accelerator.autocast():
                    point = {"epoch": epoch + 1, "step": run.global_step, **run.held_out().summary("test_")}
                model.train()
                if accelerator.is_main_process:
                    with open(run.cpdir / "evals.jsonl", "a") as f:
                        f.write(json.dumps(point) + "\n")
            if _stopped(run):
                break
    bar.close()
    return sums, tokens, done


# ---- end of an epoch ------------------------------------------------------------------------------------------------
def end_epoch(run: Run, epoch: int, sums: Metrics, tokens: torch.Tensor, seconds: float, complete: bool) -> dict:
    """Evaluate (held-out split, chain accuracy), log one summary line and checkpoint a complete epoch."""
    args, accelerator, draft = run.args, run.accelerator, run.draft
    summary = {"epoch": epoch + 1, "step": run.global_step, **run.total_metrics(sums).summary("train_"),
               "tokens_per_s": run.total(tokens).item() / seconds}
    with accelerator.autocast():
        if len(run.test_set):
            summary |= run.held_out().summary("test_")
        if run.monitor is not None and args.chain_eval_batches:
            subset = shard(run.monitor, accelerator.process_index, accelerator.num_processes,
                           limit=args.chain_eval_batches * args.bs)
            correct, counted = run.total(chain_counts(draft, subset, args.bs))
            summary["chain_acc"] = (correct / counted.clamp(min=1)).tolist()
    if accelerator.is_main_process:
        accelerator.print(format_summary(summary, args.epochs, draft.train_heads))
        with open(run.cpdir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(summary) + "\n")
    if run.trackers:
        accelerator.log({f"epoch/{k}": v for k, v in summary.items() if not isinstance(v, list)}, step=run.global_step)
    if complete:  # a --max_steps stop inside an epoch is only saved as final/
        save_checkpoint(accelerator, run.model, run.cpdir, {"epoch": epoch + 1, "global_step": run.global_step,
                                                            **data_order(args)}, args.keep_last)
    return summary


def format_summary(s: dict, epochs: int, n_heads: int) -> str:
    """One console line per epoch: losses, held-out per-head top-1/2/3, chain accuracy per depth, throughput."""
    parts = [f"epoch {s['epoch']}/{epochs}", f"step {s['step']}", f"train loss {s['train_loss']:.4f}"]
    if "test_loss" in s:
        parts.append(f"test loss {s['test_loss']:.4f}")
        for k in TOPK:
            parts.append(f"top-{k} " + " ".join(f"{s[f'test_top{k}_{i}']:.3f}" for i in range(n_heads)))
    if "chain_acc" in s:
        parts.append("chain " + " ".join(f"{a:.3f}" for a in s["chain_acc"]))
    parts.append(f"{s['tokens_per_s']:.0f} tok/s")
    return " | ".join(parts)


# ---- the run --------------------------------------------------------------------------------------------------------
def main(draft_type: str, argv=None) -> None:
    """CLI entry point: parse ``argv`` and train; bad input ends with one ``error:`` line and exit status 2."""
    run_cli(lambda: train(build_parser(draft_type).parse_args(argv), draft_type))


def train(args, draft_type: str) -> list[dict]:
    """Train a ``draft_type`` draft as ``args`` (see :func:`clover.train.cli.build_parser`) say; returns the
    per-epoch summaries."""
    run = setup(args, draft_type)
    history = []
    for epoch in range(run.start_epoch, args.epochs):
        if _stopped(run):
            break
        start = time.perf_counter()
        sums, tokens, done = train_epoch(run, epoch)
        history.append(end_epoch(run, epoch, sums, tokens, time.perf_counter() - start, done == len(run.loader)))
    save_final(run.accelerator, run.model, run.cpdir)
    run.accelerator.print(f"final draft: {run.cpdir / 'final'}")
    run.accelerator.end_training()
    return history
