"""The training state of a checkpoint without pickle: tensors in safetensors, everything else in JSON.

A checkpoint's ``trainer_state/`` folder holds

* ``draft.safetensors``: the draft's trainable weights in their training dtype (fp32 master weights);
* ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's per-parameter tensors (AdamW's moments and step
  counts, keys ``state.{param}.{name}``) and its parameter groups (learning rates, betas, weight decay ...);
* ``scheduler.json``: the LR scheduler's state (its counters and last rates; the schedule itself is code);
* ``rng_{rank}.safetensors`` + ``rng_{rank}.json``: each process's random number generators (torch CPU and CUDA,
  numpy, Python);
* ``trainer.json``: where the run stands (epoch, batches done in it, optimizer step, data order), written last.

Loading reads tensors with safetensors and values with ``json``, so a checkpoint folder from elsewhere cannot run code
(accelerate's ``save_state`` pickles the optimizer, scheduler and RNG states, and loading a pickle can run any code).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from clover.errors import CloverError
from clover.io import read_safetensors, save_safetensors, write_json

PROGRESS = "trainer.json"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CloverError(f"cannot read {path} ({err}); resume from another checkpoint or start afresh") from None


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path, what="training state file", fix="resume from another checkpoint or start afresh")


# ---- optimizer ------------------------------------------------------------------------------------------------------
def save_optimizer(folder: Path, optimizer) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"state.{param}.{name}"] = value
    save_safetensors(folder / "optimizer.safetensors", tensors)
    write_json(folder / "optimizer.json", {"param_groups": state["param_groups"], "scalars": scalars})


def load_optimizer(folder: Path, optimizer) -> None:
    meta = _read_json(folder / "optimizer.json")
    state: dict[int, dict] = {}
    for key, value in [*_tensors(folder / "optimizer.safetensors").items(), *meta["scalars"].items()]:
        _, param, name = key.split(".", 2)
        state.setdefault(int(param), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---- random number generators ---------------------------------------------------------------------------------------
def capture_rng() -> tuple:
    """This process's random number generators (torch CPU and CUDA, numpy, Python), to :func:`restore_rng` later:
    what a checkpoint saves, and how several drafts trained in one process each keep their own streams."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, np.random.get_state(), random.getstate()


def restore_rng(states: tuple) -> None:
    cpu, cuda, numpy_state, python_state = states
    torch.set_rng_state(cpu)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(numpy_state)
    random.setstate(python_state)


def save_rng(folder: Path, rank: int) -> None:
    cpu, cuda, (kind, keys, pos, has_gauss, cached), (version, python_state, gauss) = capture_rng()
    tensors = {"torch": cpu, "numpy": torch.from_numpy(keys.astype(np.int64))}
    tensors |= {f"cuda.{i}": s for i, s in enumerate(cuda or [])}
    save_safetensors(folder / f"rng_{rank}.safetensors", tensors)
    write_json(folder / f"rng_{rank}.json", {"numpy": [kind, pos, has_gauss, cached],
                                             "python": [version, list(python_state), gauss]}, indent=None)


def load_rng(folder: Path, rank: int) -> None:
    tensors = _tensors(folder / f"rng_{rank}.safetensors")
    meta = _read_json(folder / f"rng_{rank}.json")
    cuda = [v for _, v in sorted((int(k.split(".")[1]), v) for k, v in tensors.items() if k.startswith("cuda."))]
    kind, pos, has_gauss, cached = meta["numpy"]
    version, python_state, gauss = meta["python"]
    restore_rng((tensors["torch"], cuda, (kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached),
                 (version, tuple(python_state), gauss)))


# ---- the whole state ------------------------------------------------------------------------------------------------
def save_state(folder: Path, accelerator, model, optimizer, scheduler, progress: dict,
               extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``folder`` (every process its RNG files, the main process the rest; ``extra`` tensors, such as the
    epoch's running metrics, go into ``draft.safetensors`` under ``extra.``). ``trainer.json`` comes last: a folder
    without it is incomplete."""
    folder.mkdir(parents=True, exist_ok=True)
    save_rng(folder, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        draft = accelerator.unwrap_model(model)
        tensors = {k: v.detach().cpu().contiguous() for k, v in draft.state_dict().items()}
        tensors |= {f"extra.{k}": v.detach().cpu().contiguous() for k, v in (extra or {}).items()}
        save_safetensors(folder / "draft.safetensors", tensors)
        save_optimizer(folder, optimizer)
        write_json(folder / "scheduler.json", scheduler.state_dict())
        write_json(folder / PROGRESS, progress, indent=None)
    accelerator.wait_for_everyone()


def load_state(folder: Path, accelerator, model, optimizer, scheduler) -> dict[str, torch.Tensor]:
    """Restore what :func:`save_state` wrote into the draft, optimizer and scheduler (strict keys), and return the
    ``extra`` tensors. The RNG states are restored separately (:func:`load_rng`), at the point where the run that
    saved them stood."""
    tensors = _tensors(folder / "draft.safetensors")
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    weights = {k: v for k, v in tensors.items() if not k.startswith("extra.")}
    draft = accelerator.unwrap_model(model)
    try:
        draft.load_state_dict(weights, strict=True)
        load_optimizer(folder, optimizer)
        scheduler.load_state_dict(_read_json(folder / "scheduler.json"))
    except (KeyError, ValueError, RuntimeError) as err:
        raise CloverError(f"the training state in {folder} does not fit this run ({type(err).__name__}: "
                          f"{str(err).splitlines()[0]}); resume with the flags it was trained with") from None
    return extra


def read_progress(folder: Path) -> dict:
    return _read_json(folder / PROGRESS)
