"""The trainer's checkpoints: ``OUTDIR/epoch_{k}/`` after every completed epoch (the draft and the training state),
``OUTDIR/final/`` (the draft generation loads), and what a ``--resume`` must match.

Folders are written under a temporary name and renamed, so an interrupted run never leaves a half-written
checkpoint; a resumed run continues after the last completed epoch.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from clover.errors import CloverError
from clover.io import replace_dir, write_json
from clover.model.checkpoint import read_draft_config, save_draft
from clover.model.draft import check_base

STATE = "trainer_state"  # accelerate's state folder inside an epoch checkpoint
PROGRESS = "trainer.json"  # epoch, optimizer step and data order, inside STATE


def epoch_dirs(cpdir: Path) -> list[tuple[int, Path]]:
    """Completed epoch checkpoints ``(k, OUTDIR/epoch_k)``, oldest first."""
    found = []
    for path in cpdir.glob("epoch_*"):
        if path.name[6:].isdigit() and (path / STATE / PROGRESS).is_file():
            found.append((int(path.name[6:]), path))
    return sorted(found)


def _fresh(tmp: Path) -> Path:
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def save_checkpoint(accelerator, model, cpdir: Path, progress: dict, keep_last: int) -> None:
    """``OUTDIR/epoch_{k}/``: the draft (config.json + model.safetensors) and ``trainer_state/`` (accelerate state:
    model, optimizer, scheduler, per-process RNG; plus trainer.json = ``progress``: epoch k, optimizer step and what
    fixes the data order and split), written to a temporary folder and renamed; then only the last ``keep_last``
    epoch folders are kept."""
    epoch = progress["epoch"]
    tmp = cpdir / f".epoch_{epoch}.tmp"
    if accelerator.is_main_process:
        _fresh(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / STATE))  # every process writes its RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_draft(accelerator.unwrap_model(model), tmp)
        write_json(tmp / STATE / PROGRESS, progress, indent=None)
        replace_dir(tmp, cpdir / f"epoch_{epoch}")
        for _, old in epoch_dirs(cpdir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def save_final(accelerator, model, cpdir: Path) -> None:
    """``OUTDIR/final/``: the draft only, what generation loads."""
    if accelerator.is_main_process:
        tmp = _fresh(cpdir / ".final.tmp")
        save_draft(accelerator.unwrap_model(model), tmp)
        replace_dir(tmp, cpdir / "final")
    accelerator.wait_for_everyone()


def read_progress(ckpt: Path) -> dict:
    return json.loads((ckpt / STATE / PROGRESS).read_text())


def data_order(args) -> dict:
    """What fixes the train/test split and each epoch's order (the sampler seeds ``seed + epoch``)."""
    return {"seed": args.seed, "test_fraction": args.test_fraction}


def resume_point(args, cpdir: Path) -> Path | None:
    """The checkpoint to resume from (None: start fresh); refuses to start afresh over completed epochs."""
    found = epoch_dirs(cpdir)
    if found and not args.resume:
        raise CloverError(f"{cpdir} already holds checkpoints up to epoch_{found[-1][0]}; pass --resume to continue "
                          f"that run, or use another --outdir")
    return found[-1][1] if found else None


def check_resumable(ckpt: Path, args, draft, base) -> None:
    """CloverError unless ``ckpt`` was trained with the same draft type, base model, draft config and data split."""
    saved = read_draft_config(ckpt)
    if saved["draft_type"] != draft.draft_type:
        raise CloverError(f"--resume: {ckpt} holds a {saved['draft_type']!r} draft, but this run trains "
                          f"{draft.draft_type!r}; use another --ckpt-dir or the trainer for {saved['draft_type']}")
    check_base(saved, base, where=f"--resume checkpoint {ckpt}")
    block, now = draft.config_block, draft.config[draft.config_block]
    if saved.get(block) != now:
        raise CloverError(f"--resume: {ckpt} was trained with {block} config {saved.get(block)}, this run asks for "
                          f"{now}; pass the same --configpath or use another --outdir")
    progress = read_progress(ckpt)
    changed = [f"--{k} {progress.get(k)} there, {v} now" for k, v in data_order(args).items() if progress.get(k) != v]
    if changed:
        raise CloverError(f"--resume: {ckpt} was trained on another train/test split ({'; '.join(changed)}); resume "
                          f"with the same flags or use another --outdir")
