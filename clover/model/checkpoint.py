"""Draft checkpoints: build a new draft from a base model, save it, load it back.

A draft checkpoint is a folder with ``config.json`` (the draft config: ``draft_type``, a ``base`` block identifying
the base model, the base's ``llama`` args and the draft's own block) and ``model.safetensors`` holding only the
trainable draft weights. :func:`init_draft` builds a draft from a base model for training from scratch (the only
place where weights are initialised from the base); :func:`load_draft` rebuilds one from a folder with strict key
checks and never runs that initialisation, so a loaded draft is exactly the one that was saved.

The drafts shipped with the library are such folders under ``clover/drafts/``, each with a training record
(``training.json``); wherever a checkpoint folder is taken, a shipped draft's name (its folder's name, e.g.
``clover2-smollm2-135m-instruct``) names it too (:func:`resolve_draft`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from clover.errors import CloverError
from clover.io import read_safetensors, save_safetensors, write_json
from clover.model.base import BaseModel, parse_dtype
from clover.model.draft import DraftModel, check_base
from clover.model.registry import draft_class, draft_names

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
RECORD_NAME = "training.json"  # a shipped draft's training record: data, commands, machine, curve, acceptance floor
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "drafts"


def shipped_drafts() -> dict[str, Path]:
    """``{name: folder}`` of the drafts shipped with the library."""
    if not SHIPPED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(SHIPPED_DIR.iterdir()) if (p / CONFIG_NAME).is_file()}


def resolve_draft(name_or_folder) -> Path:
    """The checkpoint folder of ``name_or_folder``: an existing folder as it is (a local folder wins over a shipped
    name), else the shipped draft of that name."""
    folder = Path(name_or_folder).expanduser()
    if folder.is_dir():
        return folder
    shipped = shipped_drafts()
    if str(name_or_folder) in shipped:
        return shipped[str(name_or_folder)]
    names = ", ".join(shipped) or "none installed"
    raise CloverError(f"draft {str(name_or_folder)!r} is neither a checkpoint folder nor a shipped draft ({names}); "
                      f"pass a folder written by training (config.json + {WEIGHTS_NAME}) or a shipped name")


# ---- construction, saving, loading ---------------------------------------------------------------------------------
def init_draft(draft_type: str, base: BaseModel, *, dtype: torch.dtype | str = torch.float32,
               draft_vocab: torch.Tensor | None = None, hidden_sample: torch.Tensor | None = None,
               **config_overrides) -> DraftModel:
    """A new draft for training from scratch: default config updated by ``config_overrides`` (keys of the draft's
    own block, e.g. ``num_heads=3``), trainable weights initialised from the base in fp32 on the base's device.
    With the default ``dtype`` (fp32) the frozen tensors stay the base's own (no copy, base dtype); another
    ``dtype`` casts the whole draft, frozen tensors included. ``draft_vocab`` (token ids, e.g. :func:`top_tokens` of
    the training data's reply-token counts) is required exactly when the config sets ``draft_vocab_size``.
    ``hidden_sample`` (pre-norm states of the training data) lets a draft measure scales it sets at initialisation
    (Clover-2's ``token_scale``)."""
    dtype = parse_dtype(dtype, base.device)
    cls = draft_class(draft_type, "init_draft")
    config = cls.default_config(base, **config_overrides)
    with torch.device(base.device):
        model = cls(config, base)
    if model.draft_vocab is not None:
        if draft_vocab is None:
            raise CloverError(f"draft_vocab_size={model.draft_vocab.numel()} needs the draft vocabulary: pass "
                              f"draft_vocab (e.g. top_tokens of the training data's reply-token counts)")
        model.set_draft_vocab(draft_vocab)
    elif draft_vocab is not None:
        raise CloverError("draft_vocab was given but the config has no draft_vocab_size")
    model.init_from_base(base, hidden_sample)
    return model if dtype == torch.float32 else model.to(dtype=dtype)


def top_tokens(counts: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` most frequent token ids of ``counts [V]`` (ties: lower id first), ascending: a draft vocabulary."""
    order = torch.sort(-counts.long(), stable=True).indices
    return order[:k].sort().values


def save_draft(model: DraftModel, folder) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (trainable weights only) into ``folder``, each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(folder / WEIGHTS_NAME, state, metadata={"format": "pt", "draft_type": model.draft_type})
    write_json(folder / CONFIG_NAME, model.config)
    return folder


def export_draft(folder, target, dtype: torch.dtype = torch.bfloat16, record: dict | None = None) -> Path:
    """Copy the checkpoint ``folder`` to ``target`` with its floating-point weights cast to ``dtype`` (a shipped
    draft: half the bytes; loading casts back to the base's dtype) and ``record`` as its training record."""
    folder, target = resolve_draft(folder), Path(target)
    config = read_draft_config(folder)
    state = {k: v.to(dtype) if v.is_floating_point() else v
             for k, v in _read_weights(folder / WEIGHTS_NAME, torch.device("cpu")).items()}
    target.mkdir(parents=True, exist_ok=True)
    save_safetensors(target / WEIGHTS_NAME, state, metadata={"format": "pt", "draft_type": config["draft_type"]})
    write_json(target / CONFIG_NAME, config)
    if record is not None:
        write_json(target / RECORD_NAME, record)
    return target


def read_draft_config(folder) -> dict:
    """The draft config of a checkpoint folder or shipped draft name."""
    folder = resolve_draft(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CloverError(f"{folder} has no {CONFIG_NAME}; it is not a draft checkpoint folder")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CloverError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or "draft_type" not in config:
        raise CloverError(f"{path} has no 'draft_type'; it is not a draft config (expected one of "
                          f"{', '.join(draft_names())})")
    return config


def load_draft(folder, base: BaseModel, device=None, dtype=None,
               expected_type: type[DraftModel] | str | None = None) -> DraftModel:
    """Rebuild a draft from a checkpoint folder (or shipped draft name) for ``base``; weights are loaded with strict
    key checks and cast to ``dtype`` (default: the base's) on ``device`` (default: the base's). ``expected_type`` (a
    draft class or type name) refuses a checkpoint of another type. The draft is returned in eval mode."""
    folder = resolve_draft(folder)
    config = read_draft_config(folder)
    cls = draft_class(config["draft_type"], str(folder / CONFIG_NAME))
    if expected_type is not None:
        expected = draft_class(expected_type) if isinstance(expected_type, str) else expected_type
        if not issubclass(cls, expected):
            raise CloverError(f"{folder} holds a {cls.draft_type!r} draft but a {expected.draft_type!r} draft is "
                              f"needed; pass a {expected.label} checkpoint or use the method for {cls.label}")
    check_base(config, base, where=f"draft {folder}")
    device = torch.device(device) if device is not None else base.device
    dtype = parse_dtype(dtype, device) if dtype is not None else base.dtype
    try:
        with torch.device("meta"):  # no initialisation: every parameter comes from the file
            model = cls(config, base)
    except CloverError as err:
        raise CloverError(f"{folder / CONFIG_NAME}: {err}") from None
    except (KeyError, TypeError) as err:
        raise CloverError(f"{folder / CONFIG_NAME} is not a complete {cls.draft_type} config ({type(err).__name__}: "
                          f"{err}); re-save the checkpoint with this version of clover") from None
    state = _read_weights(folder / WEIGHTS_NAME, device)
    keys = set(model.state_dict())
    missing, unexpected = sorted(keys - state.keys()), sorted(state.keys() - keys)
    if missing or unexpected:
        raise CloverError(f"{folder / WEIGHTS_NAME} does not match its config: missing keys {missing}, unexpected "
                          f"keys {unexpected}")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # shape mismatches
        raise CloverError(f"{folder / WEIGHTS_NAME} does not match its config: {err}") from None
    return model.to(device=device, dtype=dtype).eval()


def _read_weights(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CloverError(f"{path.parent} has no {WEIGHTS_NAME}; the checkpoint is incomplete")
    return read_safetensors(path, device, what="draft weights file", fix="save the draft again")
