"""The training command line, shared by every draft: parsing only, every count and rate checked by the parser
(:func:`clover.train.trainer.main` runs it). ``python -m clover.train.main_clover2`` (Clover-2) and
``python -m clover.train.main`` (EAGLE-1) differ only in the draft class and its defaults (learning rate, warm-up).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from clover.args import (CloverArgumentParser, add_base_model, add_data_dir, add_dtype, add_max_len, add_option,
                         add_outdir, add_seed, duration, fraction, non_negative_float, non_negative_int,
                         positive_int)
from clover.data.templates import TEMPLATE_NAMES
from clover.errors import CloverError
from clover.model.checkpoint import read_draft_config
from clover.model.registry import draft_class

EPILOG = ("Writes OUTDIR/epoch_{k}/ (config.json, model.safetensors, trainer_state/; the last --keep-last are kept), "
          "OUTDIR/step_{n}/ (timed checkpoints and stops inside an epoch; the newest is kept), OUTDIR/stable/ (wsd), "
          "OUTDIR/final/ (what generation loads) and OUTDIR/metrics.jsonl. Checkpoints hold no pickle. "
          "Several processes: accelerate launch "
          "--num_processes K (on a machine without GPUs: accelerate launch --multi_gpu --num_processes K, DDP over "
          "gloo).")


def build_parser(draft_type: str) -> argparse.ArgumentParser:
    cls = draft_class(draft_type)
    d = cls.train_defaults
    p = CloverArgumentParser(prog=f"accelerate launch -m {cls.train_module}",
                             description=f"Train a {cls.label} draft on the hidden states of a base model.",
                             epilog=EPILOG)
    add_base_model(p)
    add_data_dir(p, required=False, help="training data folder written by clover data (or give --conversations)")
    p.add_argument("--conversations", default=None, metavar="FILE",
                   help="train online instead: ShareGPT JSON/JSONL conversations (e.g. the main job's "
                        "regenerated.jsonl), whose hidden states the base model computes in the training loop")
    p.add_argument("--template", default="auto", choices=TEMPLATE_NAMES,
                   help="chat template (default auto: the tokenizer's own, else vicuna) of --conversations")
    p.add_argument("--max-conversations", type=positive_int, default=None, metavar="N",
                   help="train on N of --conversations, drawn with --seed (default: all)")
    p.add_argument("--skip-conversations", type=non_negative_int, default=0, metavar="N",
                   help="leave out the first N of --conversations as --seed shuffles them (those an earlier run with "
                        "the same --seed trained on) and draw --max-conversations from the rest")
    add_outdir(p, "epoch_{k}/, final/ (the draft generation loads), metrics.jsonl", required=True,
               also=("--ckpt-dir", "--cpdir"))
    p.add_argument("--evaldata", default=None, help="monitoring data folder (clover data --eval) for chain accuracy")
    p.add_argument("--configpath", default=None,
                   help=f"JSON of draft config overrides (keys of the '{cls.config_block}' block)")
    p.add_argument("--init-draft", default=None, metavar="NAME|FOLDER",
                   help="start from this draft's weights and config instead of a new draft, with a fresh optimizer "
                        "and schedule: a shipped draft's name (e.g. clover2-smollm2-135m-instruct) or a checkpoint "
                        "folder (a run's final/); how a shipped draft is trained further (drafts trained together: "
                        "one per draft type, comma-separated in their order)")
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
    p.add_argument("--schedule", choices=("linear", "constant", "cosine", "wsd"), default="linear",
                   help="LR after warm-up; linear/cosine decay to 0 at the run's last optimizer step (--epochs); wsd "
                        "(warmup-stable-decay) stays constant until the last --decay-fraction of the steps, then "
                        "decays linearly, and saves OUTDIR/stable/ to extend the run from")
    p.add_argument("--decay-fraction", type=fraction, default=0.2, metavar="F",
                   help="share of the optimizer steps the wsd schedule spends decaying")
    add_option(p, "--grad-clip", "--grad_clip", type=non_negative_float, default=0.5, metavar="C",
               help="clip gradients by global norm (0 = off)")
    add_option(p, "--grad-clip-value", "--grad_clip_value", action="store_true",
               help="clip element-wise at +-grad_clip instead of by norm (the original recipe)")
    p.add_argument("--epochs", type=positive_int, default=21, help="epochs to run (the original ran 21)")
    add_option(p, "--max-steps", "--max_steps", type=positive_int, default=None, metavar="N",
               help="stop after this many optimizer steps (smoke runs; the schedule still spans --epochs)")
    add_max_len(p, 2048, "conversations are truncated to it")
    p.add_argument("--pack", action="store_true",
                   help="pack several conversations into each row of up to --max-len tokens (positions and "
                        "attention kept per conversation), so that batches hold no padding but the last row's")
    add_option(p, "--mask-alignment", "--mask_alignment", choices=("predicted", "eagle"), default="predicted",
               help="train a position when the predicted token is masked in (predicted) or, as the original, "
                    "the token two before it (eagle)")
    add_option(p, "--gradient-checkpointing", "--gradient_checkpointing", action="store_true",
               help="recompute activations in backward")
    add_dtype(p, "; autocast, the master weights stay fp32 (auto on a CPU: bf16 only where it measures clearly "
                 "faster: fp32 on the Xeons seen, bf16 on a Zen 4 EPYC)", names=("fp32", "bf16"))
    p.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --outdir with the most optimizer steps")
    p.add_argument("--resume-from", default=None, metavar="DIR",
                   help="continue from this checkpoint folder (epoch_k, step_n or stable/ of a run), e.g. a wsd "
                        "run's stable/ with more --epochs")
    p.add_argument("--max-time", type=duration, default=None, metavar="T",
                   help="stop after this much training (90m, 2h, 1h30m, seconds), with a checkpoint --resume "
                        "continues from")
    p.add_argument("--save-every", type=duration, default=duration("30m"), metavar="T",
                   help="also checkpoint every this much training time (OUTDIR/step_{n}/; 0 = only at epoch ends)")
    p.add_argument("--snapshot-every", type=non_negative_int, default=0, metavar="N",
                   help="save the draft alone every N optimizer steps to OUTDIR/snapshots/step_{n}/ (learning "
                        "curves; 0 = never)")
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


def check_data_source(args) -> None:
    """Exactly one of ``--data-dir`` and ``--conversations``."""
    if bool(args.data_dir) == bool(args.conversations):
        raise CloverError("give the training data as either --data-dir (a folder clover data wrote) or "
                          "--conversations (a conversations file, trained online), not "
                          f"{'both' if args.data_dir else 'neither'}")


def read_overrides(args, cls) -> dict:
    """Draft-block keys from the ``--configpath`` JSON (a flat object; unknown keys are rejected by ``init_draft``)
    and ``--draft-vocab-size``; with ``--init-draft``, that draft's own block of draft class ``cls`` (and neither
    of the two)."""
    if args.init_draft:
        given = [flag for flag, value in (("--configpath", args.configpath), ("--draft-vocab-size",
                                          args.draft_vocab_size), ("--resume-from", args.resume_from)) if value]
        if given:
            raise CloverError(f"--init-draft {args.init_draft} brings its own config and weights; drop "
                              f"{' and '.join(given)}")
        return dict(read_draft_config(args.init_draft).get(cls.config_block, {}))
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
