"""The training command line, shared by every draft: parsing only, every count and rate checked by the parser
(:func:`clover.train.trainer.main` runs it). ``python -m clover.train.main_clover2`` (Clover-2) and
``python -m clover.train.main`` (EAGLE-1) differ only in the draft class and its defaults (learning rate, warm-up).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from clover.args import (CloverArgumentParser, add_base_model, add_data_dir, add_dtype, add_max_len, add_option,
                         add_outdir, add_seed, non_negative_float, non_negative_int, positive_int)
from clover.errors import CloverError
from clover.model.registry import draft_class

EPILOG = ("Writes OUTDIR/epoch_{k}/ (config.json, model.safetensors, trainer_state/; the last --keep-last are kept), "
          "OUTDIR/final/ (what generation loads) and OUTDIR/metrics.jsonl. Several processes: accelerate launch "
          "--num_processes K (on a machine without GPUs: accelerate launch --multi_gpu --num_processes K, DDP over "
          "gloo).")


def build_parser(draft_type: str) -> argparse.ArgumentParser:
    cls = draft_class(draft_type)
    d = cls.train_defaults
    p = CloverArgumentParser(prog=f"accelerate launch -m {cls.train_module}",
                             description=f"Train a {cls.label} draft on the hidden states of a base model.",
                             epilog=EPILOG)
    add_base_model(p)
    add_data_dir(p)
    add_outdir(p, "epoch_{k}/, final/ (the draft generation loads), metrics.jsonl", required=True,
               also=("--ckpt-dir", "--cpdir"))
    p.add_argument("--evaldata", default=None, help="monitoring data folder (clover data --eval) for chain accuracy")
    p.add_argument("--configpath", default=None,
                   help=f"JSON of draft config overrides (keys of the '{cls.config_block}' block)")
    add_option(p, "--draft-vocab-size", "--draft_vocab_size", type=non_negative_int, default=None, metavar="K",
               help="draft vocabulary: the K most frequent reply tokens of the training split (0 = the whole "
                    "vocabulary, the default); several times cheaper heads for a base with a large vocabulary, "
                    "generation stays lossless")
    p.add_argument("--bs", type=positive_int, default=4, help="batch size per process")
    add_option(p, "--grad-accum", "--grad_accum", type=positive_int, default=1, metavar="N",
               help="micro-batches per optimizer step")
    p.add_argument("--lr", type=non_negative_float, default=d["lr"], help="peak learning rate (AdamW, betas 0.9/0.95)")
    add_option(p, "--weight-decay", "--weight_decay", type=non_negative_float, default=0.0, metavar="WD",
               help="AdamW weight decay, applied to weight matrices only (never to norms or biases)")
    add_option(p, "--warmup-steps", "--warmup_steps", type=non_negative_int, default=d["warmup_steps"], metavar="N",
               help="linear warm-up, in optimizer steps")
    p.add_argument("--schedule", choices=("linear", "constant", "cosine"), default="linear",
                   help="LR after warm-up; linear/cosine decay to 0 at the run's last optimizer step (--epochs)")
    add_option(p, "--grad-clip", "--grad_clip", type=non_negative_float, default=0.5, metavar="C",
               help="clip gradients by global norm (0 = off)")
    add_option(p, "--grad-clip-value", "--grad_clip_value", action="store_true",
               help="clip element-wise at +-grad_clip instead of by norm (the original recipe)")
    p.add_argument("--epochs", type=positive_int, default=21, help="epochs to run (the original ran 21)")
    add_option(p, "--max-steps", "--max_steps", type=positive_int, default=None, metavar="N",
               help="stop after this many optimizer steps (smoke runs; the schedule still spans --epochs)")
    add_max_len(p, 2048, "conversations are truncated to it")
    add_option(p, "--mask-alignment", "--mask_alignment", choices=("predicted", "eagle"), default="predicted",
               help="train a position when the predicted token is masked in (predicted) or, as the original, "
                    "the token two before it (eagle)")
    add_option(p, "--gradient-checkpointing", "--gradient_checkpointing", action="store_true",
               help="recompute activations in backward")
    add_dtype(p, "; autocast, the master weights stay fp32", names=("fp32", "bf16"))
    p.add_argument("--resume", action="store_true", help="continue after the last completed epoch in --outdir")
    add_option(p, "--keep-last", "--keep_last", type=positive_int, default=2, metavar="N",
               help="epoch checkpoints to keep")
    add_option(p, "--test-fraction", "--test_fraction", type=float, default=0.05, metavar="F",
               help="held-out share of the training data")
    add_option(p, "--eval-every", "--eval_every", type=non_negative_int, default=0, metavar="N",
               help="also evaluate the held-out split every this many optimizer steps and append the line to "
                    "OUTDIR/evals.jsonl (learning curves; 0 = only at the end of each epoch)")
    add_option(p, "--chain-eval-batches", "--chain_eval_batches", type=non_negative_int, default=8, metavar="N",
               help="monitoring batches for chain accuracy")
    add_seed(p, "seeds initialisation, train/test split and data order")
    add_option(p, "--num-workers", "--num_workers", type=non_negative_int, default=2, metavar="N",
               help="DataLoader workers per process")
    add_option(p, "--report-to", "--report_to", choices=("none", "tensorboard", "wandb"), default="none",
               help="accelerate tracker for per-step and per-epoch metrics")
    return p


def read_overrides(args) -> dict:
    """Draft-block keys from the ``--configpath`` JSON (a flat object; unknown keys are rejected by ``init_draft``)
    and ``--draft-vocab-size``."""
    overrides = _read_config_file(args.configpath)
    if args.draft_vocab_size is not None:
        if overrides.get("draft_vocab_size", args.draft_vocab_size) != args.draft_vocab_size:
            raise CloverError(f"--draft-vocab-size {args.draft_vocab_size} contradicts draft_vocab_size="
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
