"""The trainer's checkpoints and what a resume must match.

* ``OUTDIR/epoch_{k}/`` after every completed epoch (the last ``--keep-last`` are kept),
* ``OUTDIR/step_{n}/`` every ``--save-every`` of training time and when ``--max-time`` or ``--max-steps`` stops a run
  inside an epoch (only the newest is kept),
* ``OUTDIR/stable/`` when a warmup-stable-decay schedule leaves its stable phase: the point to extend a run from,
* ``OUTDIR/final/``: the draft generation loads.

Each checkpoint holds the draft (``config.json`` + ``model.safetensors``) and ``trainer_state/``
(:mod:`clover.train.state`: weights, optimizer, schedule, RNG and data position, no pickle). Folders are written under
a temporary name and renamed, so an interrupted run never leaves a half-written checkpoint; ``--resume`` continues
from the checkpoint with the most optimizer steps, ``--resume-from DIR`` from the one named.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from clover.errors import CloverError
from clover.io import open_safetensors, replace_dir
from clover.model.checkpoint import WEIGHTS_NAME, read_draft_config, save_draft
from clover.model.draft import check_base
from clover.train.state import PROGRESS, read_progress, save_state

STATE = "trainer_state"  # the training state's folder inside a checkpoint


def _complete(path: Path) -> bool:
    return (path / STATE / PROGRESS).is_file()


def epoch_dirs(cpdir: Path) -> list[tuple[int, Path]]:
    """Completed epoch checkpoints ``(k, OUTDIR/epoch_k)``, oldest first."""
    found = [(int(p.name[6:]), p) for p in cpdir.glob("epoch_*") if p.name[6:].isdigit() and _complete(p)]
    return sorted(found)


def step_dirs(cpdir: Path) -> list[tuple[int, Path]]:
    """Checkpoints taken inside an epoch ``(n, OUTDIR/step_n)``, oldest first."""
    found = [(int(p.name[5:]), p) for p in cpdir.glob("step_*") if p.name[5:].isdigit() and _complete(p)]
    return sorted(found)


def _fresh(tmp: Path) -> Path:
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def save_checkpoint(run, name: str, progress: dict, extra=None) -> Path:
    """``OUTDIR/{name}/``: the draft and its training state (``progress``: where the run stands; ``extra``: tensors to
    restore with it), written to a temporary folder and renamed. Then the retention rules: the newest
    ``--keep-last`` epoch folders, and only the newest step folder, none once an epoch folder is newer."""
    accelerator, cpdir = run.accelerator, run.cpdir
    tmp = cpdir / f".{name}.tmp"
    if accelerator.is_main_process:
        _fresh(tmp)
    accelerator.wait_for_everyone()
    save_state(tmp / STATE, accelerator, run.model, run.optimizer, run.scheduler, progress, extra)
    if accelerator.is_main_process:
        save_draft(accelerator.unwrap_model(run.model), tmp)
        replace_dir(tmp, cpdir / name)
        for _, old in epoch_dirs(cpdir)[:-run.args.keep_last]:
            shutil.rmtree(old)
        if name != "stable":  # a newer checkpoint than any step checkpoint there
            for _, old in step_dirs(cpdir):
                if old.name != name:
                    shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return cpdir / name


def save_final(accelerator, model, cpdir: Path) -> None:
    """``OUTDIR/final/``: the draft only, what generation loads."""
    if accelerator.is_main_process:
        tmp = _fresh(cpdir / ".final.tmp")
        save_draft(accelerator.unwrap_model(model), tmp)
        replace_dir(tmp, cpdir / "final")
    accelerator.wait_for_everyone()


def save_snapshot(accelerator, model, cpdir: Path, step: int) -> None:
    """``OUTDIR/snapshots/step_{n}/``: the draft alone at optimizer step ``n`` (points of a learning curve)."""
    if accelerator.is_main_process:
        final = cpdir / "snapshots" / f"step_{step}"
        tmp = _fresh(final.parent / f".step_{step}.tmp")
        save_draft(accelerator.unwrap_model(model), tmp)
        replace_dir(tmp, final)
    accelerator.wait_for_everyone()


def data_order(args) -> dict:
    """What fixes the train/test split and each epoch's order (the sampler seeds ``seed + epoch``) and the batches."""
    return {"seed": args.seed, "test_fraction": args.test_fraction, "bs": args.bs, "grad_accum": args.grad_accum,
            "skip_conversations": args.skip_conversations, "pack": args.pack}


def resume_point(args, cpdir: Path) -> Path | None:
    """The checkpoint to resume from (None: start fresh); refuses to start afresh over existing checkpoints."""
    if args.resume_from:
        folder = Path(args.resume_from)
        if not _complete(folder):
            raise CloverError(f"--resume-from {folder}: not a checkpoint folder (no {STATE}/{PROGRESS}); name an "
                              f"epoch_k, step_n or stable folder of a training run")
        return folder
    found = [(read_progress(p / STATE)["global_step"], kind, p)
             for kind, dirs in ((1, epoch_dirs(cpdir)), (0, step_dirs(cpdir))) for _, p in dirs]
    if found and not args.resume:
        raise CloverError(f"{cpdir} already holds checkpoints ({', '.join(sorted(p.name for *_, p in found))}); "
                          f"pass --resume to continue that run, or use another --outdir")
    return max(found)[2] if found else None


def check_resumable(ckpt: Path, args, draft, base) -> dict:
    """The checkpoint's progress; CloverError unless it was trained with the same draft type, base model, draft
    config, data split and batches."""
    saved = read_draft_config(ckpt)
    if saved["draft_type"] != draft.draft_type:
        raise CloverError(f"--resume: {ckpt} holds a {saved['draft_type']!r} draft, but this run trains "
                          f"{draft.draft_type!r}; use another --outdir or the trainer for {saved['draft_type']}")
    check_base(saved, base, where=f"--resume checkpoint {ckpt}")
    block, now = draft.config_block, draft.config[draft.config_block]
    if saved.get(block) != now:
        raise CloverError(f"--resume: {ckpt} was trained with {block} config {saved.get(block)}, this run asks for "
                          f"{now}; pass the same --configpath or use another --outdir")
    progress = read_progress(ckpt / STATE)
    changed = [f"--{k} {progress.get(k)} there, {v} now" for k, v in data_order(args).items()
               if k in progress and progress[k] != v]
    if changed:
        raise CloverError(f"--resume: {ckpt} was trained on other data or batches ({'; '.join(changed)}); resume "
                          f"with the same flags or use another --outdir")
    return progress


# ---- what a resumed run keeps ---------------------------------------------------------------------------------------
# Some choices are measured when a run starts: ``--dtype auto``'s autocast on a CPU (timed) and the draft's "auto"
# config values (Clover-2's token_scale, from the base model's states). Measured again in another process they can
# come out otherwise (a close timing; states computed in another dtype), so a resumed run takes them from its
# checkpoint: it trains on as it started, and its config still matches the checkpoint's.
def kept_precision(ckpt: Path | None) -> str | None:
    """The autocast (accelerate's ``mixed_precision``) ``ckpt`` was trained with; None: no checkpoint, or one
    written before checkpoints recorded it."""
    return None if ckpt is None else read_progress(ckpt / STATE).get("mixed_precision")


def kept_measurements(ckpt: Path, cls, overrides: dict) -> dict:
    """``overrides`` plus the values the draft in ``ckpt`` measured at initialisation, for the config keys this run
    leaves "auto" (a value given explicitly is kept, and checked against the checkpoint as any other)."""
    saved = read_draft_config(ckpt).get(cls.config_block) or {}
    defaults = {f.name: f.default for f in dataclasses.fields(cls.Config)}
    measured = {key: value for key, value in saved.items()
                if value != "auto" and overrides.get(key, defaults.get(key)) == "auto"}
    return {**overrides, **measured}


def kept_draft_vocab(ckpt: Path) -> torch.Tensor | None:
    """The draft vocabulary of the draft in ``ckpt`` (None: it drafts from the whole vocabulary), read alone from
    its weights file: a resumed draft needs it before the checkpoint's weights replace its own."""
    with open_safetensors(ckpt / WEIGHTS_NAME, what="draft weights file",
                          fix="resume from another checkpoint or start a new --outdir") as weights:
        return weights.get_tensor("draft_vocab") if "draft_vocab" in weights.keys() else None
