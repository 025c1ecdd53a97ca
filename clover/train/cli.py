"""The training command line (parsing and checking only; :func:`clover.train.trainer.main` runs it), shared by every
draft: ``python -m clover.train.main_clover2`` (Clover-2) and
``python -m clover.train.main`` (EAGLE-1) differ only in the draft class and its defaults (learning rate, warm-up).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from clover.errors import CloverError
from clover.model.registry import draft_class

EPILOG = ("Writes CKPT/epoch_{k}/ (config.json, model.safetensors, trainer_state/; the last --keep_last are kept), "
          "CKPT/final/ (what generation loads) and CKPT/metrics.jsonl. Several processes: accelerate launch "
          "--num_processes K (on a machine without GPUs: accelerate launch --multi_gpu --num_processes K, DDP over "
          "gloo).")


def build_parser(draft_type: str) -> argparse.ArgumentParser:
    cls = draft_class(draft_type)
    d = cls.train_defaults
    p = argparse.ArgumentParser(prog=f"accelerate launch -m {cls.train_module}",
                                description=f"Train a {cls.label} draft on the hidden states of a base model.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, epilog=EPILOG)
    p.add_argument("--basepath", dest="base_model", required=True,
                   help="base model: built-in name, .gguf file or HF folder")
    p.add_argument("--tmpdir", dest="data_dir", required=True,
                   help="training data folder (python -m clover.ge_data.allocation)")
    p.add_argument("--cpdir", dest="ckpt_dir", required=True,
                   help="checkpoint folder (epoch_{k}/, final/, metrics.jsonl)")
    p.add_argument("--evaldata", default=None, help="monitoring data folder (allocation --eval) for chain accuracy")
    p.add_argument("--configpath", default=None,
                   help=f"JSON of draft config overrides (keys of the '{cls.config_block}' block)")
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
