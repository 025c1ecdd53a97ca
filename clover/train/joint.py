"""Several drafts trained together on one base pass: ``clover train clover2,eagle --conversations F --outdir D``.

Each draft is an ordinary run of :mod:`clover.train.trainer` in its own folder ``D/<draft type>/`` (checkpoints,
``final/``, metrics), with its own optimizer, schedule and defaults (a flag given applies to every draft, a flag left
out takes each draft's default, such as its learning rate). The runs share the frozen base model and the data splits,
read the same batches in the same order and take turns batch by batch; trained online, the base model computes each
batch's hidden states once for all of them (:class:`clover.train.data.OnlineCollate` keeps the last few batches'),
and the drafts see exactly the same tokens: the fairest comparison there is.

Every run keeps its own random number generators, swapped in for its turn and out after it, so each draft ends with
exactly the weights it would have had trained alone (tested), and a joint run resumes (``--resume``) as each of its
runs would. One clock decides ``--max-time`` and ``--save-every`` for all of them at each optimizer step, so they stop
and checkpoint at the same step.
"""
from __future__ import annotations

import sys
from pathlib import Path

from clover.errors import CloverError, run_cli
from clover.model.registry import draft_names
from clover.train.cli import build_parser
from clover.train.data import collate_for
from clover.train.state import capture_rng, restore_rng
from clover.train.trainer import finish, run_steps, setup


def parse(draft_types: list[str], argv) -> list:
    """One argument namespace per draft: ``argv`` parsed by that draft's parser (its defaults), ``--outdir`` made
    ``OUTDIR/<draft type>``, and ``--init-draft A,B`` handed out in order."""
    unknown = [t for t in draft_types if t not in draft_names()]
    if unknown or len(set(draft_types)) != len(draft_types) or len(draft_types) < 2:
        raise CloverError(f"clover train {','.join(draft_types)}: name two or more different draft types from "
                          f"{', '.join(draft_names())}, separated by commas (e.g. clover2,eagle)")
    parsed = [build_parser(t).parse_args(argv) for t in draft_types]
    first = parsed[0]
    if first.resume_from:
        raise CloverError("--resume-from names one draft's checkpoint; drafts trained together resume with --resume "
                          "(each from its own folder under --outdir)")
    inits = first.init_draft.split(",") if first.init_draft else [None] * len(draft_types)
    if len(inits) != len(draft_types):
        raise CloverError(f"--init-draft {first.init_draft}: give one draft per trained draft type, in the order "
                          f"{','.join(draft_types)} (e.g. --init-draft A,B)")
    root = Path(first.outdir)
    for draft_type, args, init in zip(draft_types, parsed, inits):
        args.outdir, args.init_draft = str(root / draft_type), init or None
    return parsed


def train_together(draft_types: list[str], argv) -> dict[str, list[dict]]:
    """Train ``draft_types`` side by side (see the module's docstring); returns each draft's per-epoch summaries."""
    runs, rngs, shared = [], [], None
    for draft_type, args in zip(draft_types, parse(draft_types, argv)):
        run = setup(args, draft_type, shared=shared, keep_shared=shared is None)
        shared = shared or run.shared
        if runs:
            run.clock = runs[0].clock
        runs.append(run)
        rngs.append(capture_rng())
    runs[0].shared = None
    steps = [run_steps(run) for run in runs]
    histories: dict[str, list[dict]] = {}
    while len(histories) < len(runs):
        for i, (draft_type, run) in enumerate(zip(draft_types, runs)):
            if draft_type in histories:
                continue
            restore_rng(rngs[i])
            try:
                next(steps[i])
            except StopIteration as end:
                histories[draft_type] = end.value
            rngs[i] = capture_rng()
    for run in runs:
        finish(run)
    collate = collate_for(runs[0].train_set)
    if getattr(collate, "batches", 0):
        runs[0].accelerator.print(f"hidden states: the base model computed {collate.base_batches} of the "
                                  f"{collate.batches} batches the {len(runs)} drafts read")
    return histories


def main(draft_types: list[str], argv=None) -> None:
    """CLI entry point (``clover train clover2,eagle [flags]``); bad input ends with one ``error:`` line."""
    run_cli(lambda: train_together(draft_types, argv))


if __name__ == "__main__":  # accelerate launch -m clover.train.joint clover2,eagle [flags]
    main(sys.argv[1].split(",") if len(sys.argv) > 1 else [], sys.argv[2:])
