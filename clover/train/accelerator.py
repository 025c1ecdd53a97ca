"""The accelerate :class:`~accelerate.Accelerator` of a training run: its processes (one, DDP over NCCL or gloo, or
an accelerate config), its autocast dtype and its trackers."""
from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (DistributedDataParallelKwargs, ProjectConfiguration, broadcast_object_list,
                              is_tensorboard_available, is_wandb_available)

from clover.errors import CloverError
from clover.model.base import parse_dtype
from clover.model.kernels import bf16_training_pays


def autocast_dtype(choice: str, device: torch.device, kept: str | None = None) -> str:
    """accelerate ``mixed_precision`` for ``--dtype``. auto: ``kept`` (a resumed run's own), else bf16 on CUDA (where
    supported) and, on a CPU, whichever trains faster here, measured (:func:`clover.model.kernels.bf16_training_pays`):
    fp32 on the Intel Xeon VMs that list native bf16 instructions, bf16 on a Zen 4 EPYC (2026-12-07)."""
    if choice == "auto":
        if kept is not None:
            return kept
        if device.type == "cpu":
            return "bf16" if bf16_training_pays() else "no"
        if not torch.cuda.is_bf16_supported():
            return "no"
    return "bf16" if parse_dtype(choice, device) == torch.bfloat16 else "no"


def make_accelerator(args, unused_parameters: bool, cpdir: Path, kept: str | None = None) -> Accelerator:
    """The run's accelerator. Its autocast dtype is chosen by the main process alone and sent to the others: timed
    in each process (``--dtype auto`` on a CPU), the choice could differ between them."""
    cuda = torch.cuda.is_available()
    trackers = [] if args.report_to == "none" else [args.report_to]
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    if trackers and not available[args.report_to]():
        raise CloverError(f"--report_to {args.report_to} needs the package {args.report_to!r}: "
                          f"pip install {args.report_to}")
    state = PartialState(cpu=not cuda)  # lets CPU processes started by torchrun / accelerate launch form a gloo group
    precision = [autocast_dtype(args.dtype, torch.device("cuda" if cuda else "cpu"), kept)
                 if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(precision)
    return Accelerator(cpu=not cuda, gradient_accumulation_steps=args.grad_accum, mixed_precision=precision[0],
                       log_with=trackers or None, step_scheduler_with_optimizer=False,
                       project_config=ProjectConfiguration(project_dir=str(cpdir), logging_dir=str(cpdir / "logs")),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=unused_parameters)])
