"""Small file and timing helpers shared by the whole package: atomic writes, checked safetensors reads, and wall time
with the device synchronised.

Atomic writes. Every writer here writes to a fresh temporary file in the target's own folder (named
``.{name}.{random}.tmp``, so it is on the same file system and hidden), flushes it to disk, then renames it onto the
target with :func:`os.replace`. A reader therefore sees either the old file or the complete new one, never a partial
file; when the writing fails or is interrupted by an exception the temporary file is removed and the target is left as
it was. A process that is killed can leave a temporary file behind: :func:`temp_files` finds them.

    write_json(folder / "manifest.json", manifest)
    save_safetensors(folder / "model.safetensors", tensors, metadata={"format": "pt"})
    with atomic_path(path) as tmp:           # any other writer that takes a file name
        writer.save(tmp)
    replace_dir(tmp_folder, final_folder)    # a whole folder

Logs that grow a line at a time (:func:`append_jsonl`, read back with :func:`read_jsonl`) are appended to in place,
each line flushed to disk.

Reading safetensors. :func:`open_safetensors` and :func:`read_safetensors` turn a missing, truncated or corrupt file
into one :class:`~clover.errors.CloverError` that names the file and, when the caller gives one, how to fix it.

Timing. ``with device_timer(device) as t: ...`` measures the block's wall time in ``t.seconds``; on a CUDA device the
device is synchronised before and after, so that asynchronous kernels are counted in the block that launched them.

From the package it imports only :mod:`clover.errors`, so any module can use it without an import cycle; torch and
safetensors are imported by the functions that need them.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from clover.errors import CloverError

TEMP_SUFFIX = ".tmp"


# ---- atomic writes ------------------------------------------------------------------------------------------------
def _new_temp_file(path: Path) -> Path:
    """Create an empty, not yet used temporary file beside ``path`` (normal permissions, unlike mkstemp's 0600)."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file name beside ``path`` for the caller to write; when the block ends normally the file is
    flushed to disk and renamed to ``path``, when it raises the temporary file is removed and ``path`` is untouched.
    The folder of ``path`` must exist."""
    path = Path(path)
    tmp = _new_temp_file(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def write_json(path: str | os.PathLike, data, indent: int | None = 2, **dumps_kwargs) -> Path:
    """Write ``json.dumps(data, indent=indent, **dumps_kwargs)`` and a newline to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=indent, **dumps_kwargs) + "\n")


def append_jsonl(path: str | os.PathLike, record) -> None:
    """Append ``record`` as one JSON line to ``path`` (creating the file and its folder) and flush it to disk: a log
    that grows a line at a time, where an interrupted run loses at most the line being written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list:
    """The records of a JSON-lines file, blank lines skipped; ``[]`` when there is no such file."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Save ``tensors`` (contiguous torch tensors) with string ``metadata`` as a safetensors file, atomically."""
    import safetensors.torch  # looked up at call time, so that tests can replace save_file

    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move the finished folder ``tmp`` to ``final``, replacing the folder there if any.

    A folder cannot be renamed onto a non-empty one, so an existing ``final`` is first renamed aside, then ``tmp`` is
    renamed to ``final`` and the old folder is deleted. ``final`` is thus always either the complete old folder or
    the complete new one, except for the moment between the two renames when it is absent; if the second rename
    fails, the old folder is put back. ``tmp`` should be on the same file system (e.g. a sibling of ``final``)."""
    tmp, final = Path(tmp), Path(final)
    if not final.exists():
        os.replace(tmp, final)
        return final
    old = final.parent / f".{final.name}.old.{secrets.token_hex(4)}"
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def temp_files(folder: str | os.PathLike) -> list[Path]:
    """Temporary files that atomic writes into ``folder`` left behind when their process was killed."""
    return sorted(p for p in Path(folder).glob(f".*{TEMP_SUFFIX}") if p.is_file())


# ---- reading safetensors ------------------------------------------------------------------------------------------
def _missing(path: Path, what: str, fix: str | None) -> CloverError:
    return CloverError(f"{what} {path} does not exist" + (f"; {fix}" if fix else ""))


def _corrupt(path: Path, what: str, fix: str | None, err: Exception) -> CloverError:
    reason = (str(err).strip() or type(err).__name__).splitlines()[0]
    return CloverError(f"corrupt {what} {path}: {reason} (the file is truncated or corrupt)"
                       + (f"; {fix}" if fix else ""))


def open_safetensors(path: str | os.PathLike, device="cpu", what: str = "safetensors file", fix: str | None = None):
    """A ``safe_open`` handle on ``path`` (tensors are read lazily from it, e.g. with ``get_slice``).

    A missing file raises ``CloverError("{what} {path} does not exist; {fix}")``, a truncated or corrupt one
    ``CloverError("corrupt {what} {path}: <reason> (the file is truncated or corrupt); {fix}")``; ``what`` names the
    kind of file for the user (``"weights file"``, ``"shard"``) and ``fix`` (optional) says what to do about it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise _missing(path, what, fix)
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except Exception as err:  # SafetensorError for a bad header or size, OSError for an unreadable file
        raise _corrupt(path, what, fix, err) from None


def read_safetensors(path: str | os.PathLike, device="cpu", keys=None, what: str = "safetensors file",
                     fix: str | None = None) -> dict:
    """All tensors of a safetensors file (or only ``keys``) as ``{name: tensor}`` on ``device``; errors as in
    :func:`open_safetensors` (a key that is not in the file counts as a corrupt file)."""
    path = Path(path)
    try:
        with open_safetensors(path, device, what, fix) as f:
            return {key: f.get_tensor(key) for key in (f.keys() if keys is None else keys)}
    except CloverError:
        raise
    except Exception as err:
        raise _corrupt(path, what, fix, err) from None


# ---- timing -------------------------------------------------------------------------------------------------------
def synchronize(device) -> None:
    """Wait for the work queued on ``device`` (a ``torch.device``, a string such as ``"cuda:0"``, or None) when it is a
    CUDA device; nothing to wait for on the CPU."""
    if device is None:
        return
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """What :func:`device_timer` yields: ``seconds`` is set when the timed block ends."""

    seconds: float | None = None


@contextmanager
def device_timer(device=None) -> Iterator[Stopwatch]:
    """Time the block (``time.perf_counter``), the device synchronised before and after it. A block that raises is not
    timed (``seconds`` stays None)."""
    watch = Stopwatch()
    synchronize(device)
    start = time.perf_counter()
    yield watch
    synchronize(device)
    watch.seconds = time.perf_counter() - start
