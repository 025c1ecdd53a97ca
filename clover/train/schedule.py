"""When the trainer does what: the learning-rate schedule, each epoch's data order, and the wall-clock budget.

The schedule is a function of the optimizer step alone, so that a resumed run follows the same rates. Besides linear
and cosine decay to 0 at the run's last step there is ``constant`` and ``wsd`` (warmup-stable-decay: constant until
the last ``--decay-fraction`` of the steps, then linear to 0). A wsd run saves ``OUTDIR/stable/`` as it leaves the
stable phase; resuming that checkpoint with more ``--epochs`` extends the run as if it had been planned longer, since
every rate before the decay is the same whatever the length.
"""
from __future__ import annotations

import math
import time

import torch


def decay_start(warmup: int, total: int, decay_fraction: float) -> int:
    """The first optimizer step of a wsd schedule's decay."""
    return max(warmup, total - round(decay_fraction * total))


def lr_factor(step: int, warmup: int, total: int, schedule: str, decay_fraction: float = 0.2) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warm-up, then constant, linear or cosine decay that
    reaches 0 at ``total``, or constant until :func:`decay_start` and linear to 0 at ``total`` (``wsd``)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        start = decay_start(warmup, total, decay_fraction)
        return 1.0 if step < start else max(0.0, (total - step) / max(1, total - start))
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


class Clock:
    """The run's wall-clock budget: ``--max-time`` (stop; None = none) and ``--save-every`` (checkpoint; 0 = never),
    measured from the start of training in this process and agreed on by all processes (one small all-reduce per
    optimizer step). Drafts trained together share one clock, which decides once per optimizer step, so that they
    stop and checkpoint at the same step."""

    def __init__(self, accelerator, max_time: float | None, save_every: float | None):
        self.accelerator, self.max_time, self.save_every = accelerator, max_time, save_every
        self.start = self.saved = time.perf_counter()
        self._decided: tuple[int, tuple[bool, bool]] | None = None  # (optimizer step, its decision)

    def check(self, step: int) -> tuple[bool, bool]:
        """``(stop, save)`` at optimizer step ``step``: decided at the first call for that step."""
        if self._decided is None or self._decided[0] != step:
            self._decided = step, self._decide()
        return self._decided[1]

    def _decide(self) -> tuple[bool, bool]:
        if self.max_time is None and not self.save_every:
            return False, False
        now = time.perf_counter()
        flags = torch.tensor([self.max_time is not None and now - self.start >= self.max_time,
                              bool(self.save_every) and now - self.saved >= self.save_every], dtype=torch.int32)
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags.to(self.accelerator.device), "sum").cpu()
        return bool(flags[0]), bool(flags[1])

    def saved_now(self) -> None:
        self.saved = time.perf_counter()
