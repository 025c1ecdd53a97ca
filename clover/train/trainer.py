"""The draft trainer behind ``clover.train.main_clover2`` (Clover-2) and ``clover.train.main`` (EAGLE-1).

Reads the hidden-state shards written by ``python -m clover.ge_data.allocation`` and trains a draft against the
frozen base model with Hugging Face accelerate: one process, DDP (NCCL on GPUs, gloo on CPUs), or DeepSpeed/FSDP
through an accelerate config as long as parameters are not sharded (the draft is exported from the unwrapped module).
Spec §4 and §6.2, with the fixes of §9: the schedule is defined in optimizer steps and advances exactly once per
optimizer step (Q24); weight decay only on matrices (Q23); one loss function for train and eval (B13); sorted,
seeded train/test split (B20); exactly ``--epochs`` epochs (B11); checkpoints that hold weights and config together
(B8) and a resume that continues after the last completed epoch (B10).

Per epoch: train, evaluate the held-out split with the training loss (per-head top-1/2/3 gathered exactly across
processes), measure the top-1 chain accuracy on the monitoring set (``--evaldata``), print one summary line, append it
to ``CKPT/metrics.jsonl``, and write ``CKPT/epoch_{k}/`` (draft + accelerate ``trainer_state/``); after the last
epoch ``CKPT/final/`` holds the draft that generation loads.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (DistributedDataParallelKwargs, ProjectConfiguration, is_tensorboard_available,
                              is_wandb_available, set_seed)
from tqdm import tqdm

from clover.errors import CloverError, run_cli
from clover.ge_data.dataset import HiddenStateDataset, collate
from clover.model.base import BaseModel
from clover.model.checkpoint import check_base, init_draft, read_draft_config, save_draft, top_tokens
from clover.model.clover2 import DEFAULTS as CLOVER_DEFAULTS
from clover.model.layers import KVCache
from clover.train.losses import TOPK, clover_loss, eagle_loss, target_from_prenorm

BLOCK = {"clover2": "clover", "eagle": "eagle"}  # the draft's own block in its config
EAGLE_CHAIN_DEPTH = 5  # EAGLE's chain accuracy is measured to the depth of the verification tree
# per-draft defaults; the rest is shared. Warm-up: the original's scheduler steps / 4 processes (spec §4.6, §6.2).
DEFAULTS = {"clover2": dict(lr=1e-3, warmup_steps=2000), "eagle": dict(lr=3e-5, warmup_steps=500)}
EPILOG = ("Writes CKPT/epoch_{k}/ (config.json, model.safetensors, trainer_state/; the last --keep_last are kept), "
          "CKPT/final/ (what generation loads) and CKPT/metrics.jsonl. Several processes: accelerate launch "
          "--num_processes K (on a machine without GPUs: accelerate launch --multi_gpu --num_processes K, DDP over "
          "gloo).")


# ---- command line ---------------------------------------------------------------------------------------------------
def build_parser(draft_type: str) -> argparse.ArgumentParser:
    d = DEFAULTS[draft_type]
    module = {"clover2": "clover.train.main_clover2", "eagle": "clover.train.main"}[draft_type]
    p = argparse.ArgumentParser(prog=f"accelerate launch -m {module}", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, epilog=EPILOG)
    p.add_argument("--basepath", required=True, help="base model: built-in name, .gguf file or HF folder")
    p.add_argument("--tmpdir", required=True, help="training data folder (python -m clover.ge_data.allocation)")
    p.add_argument("--cpdir", required=True, help="checkpoint folder (epoch_{k}/, final/, metrics.jsonl)")
    p.add_argument("--evaldata", default=None, help="monitoring data folder (allocation --eval) for chain accuracy")
    p.add_argument("--configpath", default=None,
                   help=f"JSON of draft config overrides (keys of the '{BLOCK[draft_type]}' block)")
    p.add_argument("--draft_vocab_size", type=int, default=None,
                   help="draft vocabulary: the K most frequent reply tokens of the training split (0 = the whole "
                        "vocabulary, the default); several times cheaper heads for a base with a large vocabulary, "
                        "generation stays lossless")
    p.add_argument("--bs", type=int, default=4, help="batch size per process")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (AdamW, betas 0.9/0.95)")
    p.add_argument("--weight_decay", type=float, default=0.0,
                   help="AdamW weight decay, applied to weight matrices only (never to norms or biases)")
    p.add_argument("--warmup_steps", type=int, default=d["warmup_steps"], help="linear warm-up, in optimizer steps")
    p.add_argument("--schedule", choices=("linear", "constant", "cosine"), default="linear",
                   help="LR after warm-up; linear/cosine decay to 0 at the run's last optimizer step (--epochs)")
    p.add_argument("--grad_clip", type=float, default=0.5, help="clip gradients by global norm (0 = off)")
    p.add_argument("--grad_clip_value", action="store_true",
                   help="clip element-wise at +-grad_clip instead of by norm (the original recipe)")
    p.add_argument("--epochs", type=int, default=21, help="epochs to run (the original ran 21)")
    p.add_argument("--max_steps", type=int, default=None,
                   help="stop after this many optimizer steps (smoke runs; the schedule still spans --epochs)")
    p.add_argument("--max_len", type=int, default=2048,
                   help="truncate conversations to this many tokens (at most the base's context window)")
    p.add_argument("--mask_alignment", choices=("predicted", "eagle"), default="predicted",
                   help="train a position when the predicted token is masked in (predicted) or, as the original, "
                        "the token two before it (eagle)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="autocast precision (master weights stay fp32); auto = bf16 on GPU and on CPUs with native "
                        "bf16 matmuls, else fp32")
    p.add_argument("--resume", action="store_true", help="continue after the last completed epoch in --cpdir")
    p.add_argument("--keep_last", type=int, default=2, help="epoch checkpoints to keep")
    p.add_argument("--test_fraction", type=float, default=0.05, help="held-out share of the training data")
    p.add_argument("--eval_every", type=int, default=0,
                   help="also evaluate the held-out split every this many optimizer steps and append the line to "
                        "CKPT/evals.jsonl (learning curves; 0 = only at the end of each epoch)")
    p.add_argument("--chain_eval_batches", type=int, default=8, help="monitoring batches for chain accuracy")
    p.add_argument("--seed", type=int, default=0, help="seeds initialisation, train/test split and data order")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers per process")
    p.add_argument("--report_to", choices=("none", "tensorboard", "wandb"), default="none",
                   help="accelerate tracker for per-step and per-epoch metrics")
    return p


def main(draft_type: str, argv=None) -> None:
    """CLI entry point: parse ``argv`` and train; bad input ends with one ``error:`` line and exit status 2."""
    run_cli(lambda: train(build_parser(draft_type).parse_args(argv), draft_type))


def check_args(args) -> None:
    for name in ("bs", "grad_accum", "epochs", "max_len", "keep_last"):
        if getattr(args, name) < 1:
            raise CloverError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("lr", "weight_decay", "warmup_steps", "grad_clip", "eval_every", "chain_eval_batches",
                 "num_workers"):
        if getattr(args, name) < 0:
            raise CloverError(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise CloverError(f"--max_steps must be at least 1, got {args.max_steps}")


def read_overrides(args) -> dict:
    """Draft-block keys from the ``--configpath`` JSON (a flat object; unknown keys are rejected by ``init_draft``)
    and ``--draft_vocab_size``."""
    overrides = _read_config_file(args.configpath)
    if args.draft_vocab_size is not None:
        if overrides.get("draft_vocab_size", args.draft_vocab_size) != args.draft_vocab_size:
            raise CloverError(f"--draft_vocab_size {args.draft_vocab_size} contradicts draft_vocab_size="
                              f"{overrides['draft_vocab_size']} in --configpath {args.configpath}; give it once")
        overrides["draft_vocab_size"] = args.draft_vocab_size
    return overrides


def _read_config_file(path) -> dict:
    if path is None:
        return {}
    try:
        overrides = json.loads(Path(path).read_text())
    except OSError as err:
        raise CloverError(f"cannot read --configpath {path}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CloverError(f"--configpath {path} is not valid JSON ({err})") from None
    if not isinstance(overrides, dict):
        raise CloverError(f"--configpath {path} must hold a JSON object of draft config keys, e.g. "
                          f"{{\"num_heads\": 3}}")
    return overrides


def autocast_dtype(choice: str, device: torch.device) -> str:
    """accelerate ``mixed_precision`` for ``--dtype``: auto is bf16 only where bf16 matmuls are native (on CPUs
    without them, bf16 matmuls are several times slower than fp32; see scripts/bench/train.py)."""
    if choice == "auto":
        native = (torch.cuda.is_bf16_supported() if device.type == "cuda"
                  else device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        choice = "bf16" if native else "fp32"
    return "bf16" if choice == "bf16" else "no"


# ---- schedule -------------------------------------------------------------------------------------------------------
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


# ---- batches, loss, evaluation --------------------------------------------------------------------------------------
def ahead(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x[:, t + k]`` at index ``t`` (dim 1), zero past the end."""
    k = min(k, x.shape[1])
    return torch.cat([x[:, k:], x.new_zeros((x.shape[0], k) + x.shape[2:])], 1)


def model_inputs(draft, batch: dict, noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden input, next ids, post-norm states)`` of a collated batch: the draft reads pre-norm (Clover-2) or
    post-norm (EAGLE) ``h_t`` paired with ``x_{t+1}``. ``noise`` > 0 adds EAGLE's training input noise,
    ``U(-0.5, 0.5) * noise * 512 / length`` per conversation (spec §6.2, Q29)."""
    pre = batch["hidden_prenorm"]
    post = target_from_prenorm(pre, draft.final_norm_weight, draft.args.rms_norm_eps)
    hidden = pre if draft.draft_type == "clover2" else post
    if noise:
        length = batch["attention_mask"].sum(1).clamp(min=1)[:, None, None]
        hidden = hidden + (torch.rand_like(hidden, dtype=torch.float32) - 0.5) * (noise * 512 / length)
    return hidden, ahead(batch["input_ids"], 1), post


def batch_loss(model, draft, batch: dict, mask_alignment: str, noise: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The draft's loss on a batch (``model`` is the possibly wrapped module, ``draft`` the bare one)."""
    hidden, next_ids, post = model_inputs(draft, batch, noise)
    target = ahead(post, 1)  # h_{t+1} at t
    loss_mask = batch["loss_mask"]
    if mask_alignment == "eagle":  # the mask of x_t gates target h_{t+1}: drop each row's last position (no target)
        loss_mask = loss_mask * ahead(batch["attention_mask"], 1)
    preds = model(hidden, next_ids)
    if draft.draft_type == "clover2":
        return clover_loss(preds, target, draft.lm_head_weight, loss_mask, draft.config["clover"], mask_alignment,
                           draft_vocab=draft.draft_vocab)
    return eagle_loss(preds, target, draft.lm_head_weight, loss_mask, draft.config["eagle"],
                      mask_alignment=mask_alignment, draft_vocab=draft.draft_vocab)


def num_heads(draft) -> int:
    return draft.num_heads if draft.draft_type == "clover2" else 1


def metric_keys(n_heads: int) -> list[str]:
    """Summable metrics of :func:`batch_loss`, in a fixed order (so every process reduces the same vector)."""
    per_head = ["count", "vloss_sum", "ploss_sum"] + [f"top{k}_correct" for k in TOPK]
    return ["loss_sum", "batches"] + [f"{name}_{i}" for i in range(n_heads) for name in per_head]


def metric_vector(loss: torch.Tensor, metrics: dict, keys: list[str]) -> torch.Tensor:
    values = {**metrics, "loss_sum": loss.detach(), "batches": torch.ones(())}
    return torch.stack([values[k].float().cpu() for k in keys])


def summarize(sums: torch.Tensor, keys: list[str], prefix: str) -> dict:
    """Mean loss per batch and exact per-head top-k accuracies (correct / count) from reduced sums."""
    s = dict(zip(keys, sums.tolist()))
    out = {f"{prefix}loss": s["loss_sum"] / max(s["batches"], 1)}
    for key in keys:
        if "_correct_" in key:
            k, head = key.split("_correct_")
            out[f"{prefix}{k}_{head}"] = s[key] / max(s[f"count_{head}"], 1)
    return out


def shard(dataset, rank: int, world: int, limit: int | None = None) -> torch.utils.data.Subset:
    """Items ``rank, rank + world, ...`` of the first ``limit``: each item on exactly one process."""
    return torch.utils.data.Subset(dataset, range(rank, min(len(dataset), limit or len(dataset)), world))


def batches(dataset, batch_size: int, device):
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        yield {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(draft, dataset, batch_size: int, mask_alignment: str) -> torch.Tensor:
    """Summed metrics (:func:`metric_keys` order) of the training loss over ``dataset``."""
    draft.eval()
    keys = metric_keys(num_heads(draft))
    sums = torch.zeros(len(keys))
    for batch in batches(dataset, batch_size, draft.device):
        loss, metrics = batch_loss(draft, draft, batch, mask_alignment)
        sums += metric_vector(loss, metrics, keys)
    return sums


def greedy(draft, hidden: torch.Tensor, rows: int = 2048) -> torch.Tensor:
    """Argmax of the base LM head over ``hidden [..., H]``, in chunks of rows (no full ``[..., V]`` tensor)."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    return torch.cat([draft.lm_logits(c).argmax(-1) for c in flat.split(rows)]).view(hidden.shape[:-1])


def drafted_chain(draft, hidden: torch.Tensor, next_ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """``[D, B, L]``: at every position ``t``, the draft's greedy chain of ``D`` tokens after the root ``x_{t+1}``,
    each depth fed with the draft's own previous token (and, for EAGLE, its own predicted features)."""
    if draft.draft_type == "clover2":
        state = draft.trunk(hidden, next_ids)  # one causal pass gives the trunk state of every prefix
        tokens = []
        for depth in range(draft.num_heads):
            state, out = draft.head(state, tokens[-1] if tokens else None, depth)
            tokens.append(greedy(draft, out))
        return torch.stack(tokens)
    chains = torch.zeros(EAGLE_CHAIN_DEPTH, *next_ids.shape, dtype=torch.long, device=next_ids.device)
    for row, n in enumerate(lengths):  # the inference path (extend + tree_step), one conversation at a time
        a = draft.args
        draft.cache = KVCache(len(draft.layers), 1, a.num_key_value_heads, n * EAGLE_CHAIN_DEPTH, a.head_dim,
                              draft.dtype, draft.device)
        feats = draft.extend(hidden[row:row + 1, :n], next_ids[row:row + 1, :n])[0]
        chains[0, row, :n] = tokens = greedy(draft, feats)
        eye = torch.eye(n, dtype=torch.bool, device=feats.device)
        mask = torch.ones(n, n, dtype=torch.bool, device=feats.device).tril()  # node t sees the prefix 0..t
        for depth in range(1, EAGLE_CHAIN_DEPTH):
            mask = torch.cat([mask, eye], 1)  # ... its own chain so far, and itself
            positions = (torch.arange(n, device=feats.device) + depth).clamp(max=a.max_position_embeddings - 1)
            feats = draft.tree_step(feats, tokens, positions, mask)
            chains[depth, row, :n] = tokens = greedy(draft, feats)
        draft.cache = None
    return chains


@torch.no_grad()
def chain_counts(draft, dataset, batch_size: int) -> torch.Tensor:
    """``[2, D]`` (correct, total) of the top-1 chain accuracy: a position ``t`` counts at depth ``k`` when the base
    model's greedy continuation after ``x_{t+1}`` is known for ``k + 1`` tokens (the data follows the base's greedy
    tokens up to there, and they are reply tokens); it is correct when the first ``k + 1`` draft tokens all equal
    it."""
    draft.eval()
    depth = draft.num_heads if draft.draft_type == "clover2" else EAGLE_CHAIN_DEPTH
    counts = torch.zeros(2, depth)
    for batch in batches(dataset, batch_size, draft.device):
        hidden, next_ids, post = model_inputs(draft, batch)
        base = greedy(draft, post)  # base[t] = the base's greedy token after x_0..x_t
        chain = drafted_chain(draft, hidden, next_ids, batch["attention_mask"].sum(1).tolist())
        eligible = torch.ones_like(base, dtype=torch.bool)
        hit = torch.ones_like(eligible)
        for k in range(depth):
            eligible &= ahead(batch["loss_mask"], 2 + k).bool()
            if k:
                eligible &= ahead(batch["input_ids"], 1 + k) == ahead(base, k)
            hit &= chain[k] == ahead(base, 1 + k)
            counts[0, k] += (eligible & hit).sum().item()
            counts[1, k] += eligible.sum().item()
    return counts


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def epoch_dirs(cpdir: Path) -> list[tuple[int, Path]]:
    """Completed epoch checkpoints ``(k, CKPT/epoch_k)``, oldest first."""
    found = []
    for path in cpdir.glob("epoch_*"):
        if path.name[6:].isdigit() and (path / "trainer_state" / "trainer.json").is_file():
            found.append((int(path.name[6:]), path))
    return sorted(found)


def replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def save_checkpoint(accelerator, model, cpdir: Path, progress: dict, keep_last: int) -> None:
    """``CKPT/epoch_{k}/``: the draft (config.json + model.safetensors) and ``trainer_state/`` (accelerate state:
    model, optimizer, scheduler, per-process RNG; plus trainer.json = ``progress``: epoch k, optimizer step and what
    fixes the data order and split), written to a temporary folder and renamed; then only the last ``keep_last``
    epoch folders are kept."""
    epoch = progress["epoch"]
    tmp = cpdir / f".epoch_{epoch}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "trainer_state"))  # every process writes its RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_draft(accelerator.unwrap_model(model), tmp)
        (tmp / "trainer_state" / "trainer.json").write_text(json.dumps(progress))
        replace_dir(tmp, cpdir / f"epoch_{epoch}")
        for _, old in epoch_dirs(cpdir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def save_final(accelerator, model, cpdir: Path) -> None:
    """``CKPT/final/``: the draft only, what generation loads."""
    if accelerator.is_main_process:
        tmp = cpdir / ".final.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        save_draft(accelerator.unwrap_model(model), tmp)
        replace_dir(tmp, cpdir / "final")
    accelerator.wait_for_everyone()


def data_order(args) -> dict:
    """What fixes the train/test split and each epoch's order (the sampler seeds ``seed + epoch``)."""
    return {"seed": args.seed, "test_fraction": args.test_fraction}


def check_resumable(ckpt: Path, args, draft_type: str, draft, base) -> None:
    """CloverError unless ``ckpt`` was trained with the same draft type, base model, draft config and data split."""
    saved = read_draft_config(ckpt)
    if saved["draft_type"] != draft_type:
        raise CloverError(f"--resume: {ckpt} holds a {saved['draft_type']!r} draft, but this run trains "
                          f"{draft_type!r}; use another --cpdir or the trainer for {saved['draft_type']}")
    check_base(saved, base, where=f"--resume checkpoint {ckpt}")
    block = BLOCK[draft_type]
    if saved.get(block) != draft.config[block]:
        raise CloverError(f"--resume: {ckpt} was trained with {block} config {saved.get(block)}, this run asks for "
                          f"{draft.config[block]}; pass the same --configpath or use another --cpdir")
    progress = json.loads((ckpt / "trainer_state" / "trainer.json").read_text())
    changed = [f"--{k} {progress.get(k)} there, {v} now" for k, v in data_order(args).items() if progress.get(k) != v]
    if changed:
        raise CloverError(f"--resume: {ckpt} was trained on another train/test split ({'; '.join(changed)}); resume "
                          f"with the same flags or use another --cpdir")


# ---- the run --------------------------------------------------------------------------------------------------------
def load_data(args, base) -> tuple[HiddenStateDataset, HiddenStateDataset, HiddenStateDataset | None]:
    """Train and held-out splits of ``--tmpdir`` and the monitoring set, checked against the base model."""
    max_len = min(args.max_len, base.args.max_position_embeddings)
    split = dict(max_len=max_len, test_fraction=args.test_fraction, seed=args.seed)
    train_set = HiddenStateDataset(args.tmpdir, split="train", **split)
    train_set.check_compatible(base.args.hidden_size, base.args.vocab_size, args.basepath)
    if len(train_set) == 0:
        raise CloverError(f"{args.tmpdir} has no training conversations left after holding out --test_fraction "
                          f"{args.test_fraction}; dump more data or lower --test_fraction")
    test_set = HiddenStateDataset(args.tmpdir, split="test", **split)
    monitor = None
    if args.evaldata:  # an empty string means "none" (spec B20)
        monitor = HiddenStateDataset(args.evaldata, max_len=max_len, split="all")
        monitor.check_compatible(base.args.hidden_size, base.args.vocab_size, args.basepath)
    return train_set, test_set, monitor


def hidden_sample(dataset, conversations: int = 32) -> torch.Tensor:
    """Pre-norm states of the first conversations of ``dataset``: what a draft measures its initial scales on."""
    return torch.cat([dataset[i]["hidden_prenorm"] for i in range(min(conversations, len(dataset)))])


def resume_point(args, cpdir: Path) -> Path | None:
    """The checkpoint to resume from (None: start fresh); refuses to start afresh over completed epochs."""
    found = epoch_dirs(cpdir)
    if found and not args.resume:
        raise CloverError(f"{cpdir} already holds checkpoints up to epoch_{found[-1][0]}; pass --resume to continue "
                          f"that run, or use another --cpdir")
    return found[-1][1] if found else None


def make_accelerator(args, draft_type: str, overrides: dict, cpdir: Path):
    cuda = torch.cuda.is_available()
    trackers = [] if args.report_to == "none" else [args.report_to]
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    if trackers and not available[args.report_to]():
        raise CloverError(f"--report_to {args.report_to} needs the package {args.report_to!r}: "
                          f"pip install {args.report_to}")
    # a single Clover-2 head leaves the RNN head's weights unused, which DDP must be told about
    unused = draft_type == "clover2" and overrides.get("num_heads", CLOVER_DEFAULTS["num_heads"]) == 1
    return Accelerator(cpu=not cuda,  # lets CPU processes started by torchrun / accelerate launch form a gloo group
                       gradient_accumulation_steps=args.grad_accum,
                       mixed_precision=autocast_dtype(args.dtype, torch.device("cuda" if cuda else "cpu")),
                       log_with=trackers or None, step_scheduler_with_optimizer=False,
                       project_config=ProjectConfiguration(project_dir=str(cpdir), logging_dir=str(cpdir / "logs")),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused)])


def train(args, draft_type: str) -> list[dict]:
    """Train a ``draft_type`` draft as ``args`` (see :func:`build_parser`) say; returns the per-epoch summaries."""
    check_args(args)
    overrides = read_overrides(args)
    cpdir = Path(args.cpdir)
    resume_from = resume_point(args, cpdir)
    accelerator = make_accelerator(args, draft_type, overrides, cpdir)
    bf16 = accelerator.mixed_precision == "bf16"
    device = accelerator.device if accelerator.device.type == "cuda" else torch.device("cpu")  # not "cpu:<rank>"
    rank, world = accelerator.process_index, accelerator.num_processes

    def total(t: torch.Tensor) -> torch.Tensor:  # sum over processes (on the device: NCCL reduces CUDA tensors)
        return accelerator.reduce(t.to(accelerator.device), "sum").cpu()

    set_seed(args.seed)
    base = BaseModel.from_pretrained(args.basepath, dtype="bf16" if bf16 else "fp32", device=device, max_len=1)
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
        check_resumable(resume_from, args, draft_type, draft, base)
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
    steps_per_epoch = math.ceil(math.ceil(len(train_set) / (args.bs * world)) / args.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup=args.warmup_steps, total=steps_per_epoch * args.epochs, schedule=args.schedule))
    model, optimizer, loader, scheduler = accelerator.prepare(draft, optimizer, loader, scheduler)

    start_epoch, global_step = 0, 0
    if resume_from is not None:
        try:  # model, optimizer, scheduler and RNG states
            accelerator.load_state(str(resume_from / "trainer_state"))
        except Exception as err:  # accelerate/torch raise many types for missing or damaged files
            raise CloverError(f"cannot restore the training state from {resume_from / 'trainer_state'}: "
                              f"{type(err).__name__}: {err}".splitlines()[0]) from None
        progress = json.loads((resume_from / "trainer_state" / "trainer.json").read_text())
        start_epoch, global_step = progress["epoch"], progress["global_step"]
        accelerator.print(f"resumed from {resume_from} (epoch {start_epoch}, optimizer step {global_step})")
    elif accelerator.is_main_process:  # a fresh run starts fresh metrics logs
        cpdir.mkdir(parents=True, exist_ok=True)
        (cpdir / "metrics.jsonl").unlink(missing_ok=True)
        (cpdir / "evals.jsonl").unlink(missing_ok=True)
    trackers = bool(accelerator.log_with)
    if trackers:
        accelerator.init_trackers(f"clover-{draft_type}", config={k: v for k, v in vars(args).items()
                                                                  if isinstance(v, (int, float, str, bool))})
    keys = metric_keys(num_heads(draft))
    accelerator.print(
        f"training a {draft_type} draft ({sum(p.numel() for p in params) / 1e6:.2f} M trainable parameters) on "
        f"{len(train_set)} conversations ({len(test_set)} held out), {world} process(es) on {device}, "
        f"autocast {'bf16' if bf16 else 'off (fp32)'}, {steps_per_epoch} optimizer steps per epoch")

    history = []
    noise = draft.config["eagle"]["input_noise"] if draft_type == "eagle" else 0.0
    for epoch in range(start_epoch, args.epochs):
        if args.max_steps is not None and global_step >= args.max_steps:
            break
        model.train()
        loader.set_epoch(epoch)
        sums, tokens, done, start = torch.zeros(len(keys)), torch.zeros(()), 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not accelerator.is_local_main_process)
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
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()  # once per optimizer step, whatever the number of processes (spec Q24)
                optimizer.zero_grad(set_to_none=True)
            sums += metric_vector(loss, metrics, keys)
            tokens += batch["attention_mask"].sum().item()
            done += 1
            if accelerator.sync_gradients:
                global_step += 1
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
                if trackers:
                    accelerator.log({"train/loss": loss.item(), "train/lr": lr}, step=global_step)
                if args.eval_every and global_step % args.eval_every == 0 and len(test_set):
                    with accelerator.autocast():
                        point = {"epoch": epoch + 1, "step": global_step, **summarize(total(evaluate(
                            draft, shard(test_set, rank, world), args.bs, args.mask_alignment)), keys, "test_")}
                    model.train()
                    if accelerator.is_main_process:
                        with open(cpdir / "evals.jsonl", "a") as f:
                            f.write(json.dumps(point) + "\n")
                if args.max_steps is not None and global_step >= args.max_steps:
                    break
        bar.close()
        summary = {"epoch": epoch + 1, "step": global_step, **summarize(total(sums), keys, "train_"),
                   "tokens_per_s": total(tokens).item() / (time.perf_counter() - start)}
        with accelerator.autocast():
            if len(test_set):
                summary |= summarize(total(evaluate(draft, shard(test_set, rank, world), args.bs,
                                                    args.mask_alignment)), keys, "test_")
            if monitor is not None and args.chain_eval_batches:
                subset = shard(monitor, rank, world, limit=args.chain_eval_batches * args.bs)
                correct, counted = total(chain_counts(draft, subset, args.bs))
                summary["chain_acc"] = (correct / counted.clamp(min=1)).tolist()
        history.append(summary)
        if accelerator.is_main_process:
            accelerator.print(format_summary(summary, args.epochs, num_heads(draft)))
            with open(cpdir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(summary) + "\n")
        if trackers:
            accelerator.log({f"epoch/{k}": v for k, v in summary.items() if not isinstance(v, list)}, step=global_step)
        if done == len(loader):  # a complete epoch; a --max_steps stop inside an epoch is only saved as final/
            save_checkpoint(accelerator, model, cpdir, {"epoch": epoch + 1, "global_step": global_step,
                                                        **data_order(args)}, args.keep_last)
    save_final(accelerator, model, cpdir)
    accelerator.print(f"final draft: {cpdir / 'final'}")
    accelerator.end_training()
    return history


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
