"""clover.io on real files: atomic writes (no temporary file left, the target never half-written, also when the writer
fails midway), whole-folder replacement, one clear error for missing, truncated and corrupt safetensors files, and
the device-synchronised timer."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from clover import io
from clover.errors import CloverError


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_text_json_and_bytes_writes_leave_only_the_target(tmp_path):
    io.write_text(tmp_path / "a.txt", "hello\n")
    io.write_json(tmp_path / "b.json", {"x": [1, 2]})
    io.write_bytes(tmp_path / "c.bin", b"\x00\x01")
    io.write_text(tmp_path / "a.txt", "again\n")  # replacing an existing file
    assert (tmp_path / "a.txt").read_text() == "again\n"
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": [1, 2]}
    assert (tmp_path / "b.json").read_text().endswith("}\n")
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    assert listing(tmp_path) == ["a.txt", "b.json", "c.bin"] and not io.temp_files(tmp_path)


def test_written_files_get_the_usual_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    io.write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask


def test_a_writer_that_fails_midway_leaves_the_old_target(tmp_path):
    target = tmp_path / "answers.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="midway"):
        with io.atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half of the new ")
                f.flush()
                raise RuntimeError("killed midway")
    assert target.read_text() == "old\n" and listing(tmp_path) == ["answers.jsonl"]
    with pytest.raises(TypeError):
        io.write_json(tmp_path / "new.json", {"x": object()})  # fails while serialising: no file at all
    assert listing(tmp_path) == ["answers.jsonl"]


def test_safetensors_save_that_fails_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        io.save_safetensors(tmp_path / "shard.safetensors", {"a": torch.zeros(3)})
    assert listing(tmp_path) == []


def test_safetensors_round_trip(tmp_path):
    path = io.save_safetensors(tmp_path / "w.safetensors", {"a": torch.arange(6.0).reshape(2, 3),
                                                           "b": torch.ones(2, dtype=torch.int32)},
                               metadata={"format": "pt"})
    state = io.read_safetensors(path)
    assert set(state) == {"a", "b"} and torch.equal(state["a"], torch.arange(6.0).reshape(2, 3))
    assert set(io.read_safetensors(path, keys=["b"])) == {"b"}
    handle = io.open_safetensors(path)
    assert handle.metadata() == {"format": "pt"} and handle.get_slice("a").get_shape() == [2, 3]
    assert listing(tmp_path) == ["w.safetensors"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_truncated_or_corrupt_safetensors_gives_one_clear_error(tmp_path, damage):
    path = io.save_safetensors(tmp_path / "model.safetensors", {"a": torch.arange(100.0)})
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "garbage": b"\x00" * 100, "empty": b""}[damage])
    for read in (io.read_safetensors, io.open_safetensors):
        with pytest.raises(CloverError) as info:
            read(path, what="weights file", fix="save it again")
        message = str(info.value)
        assert message.startswith(f"corrupt weights file {path}: ") and "truncated or corrupt" in message
        assert message.endswith("; save it again") and "\n" not in message


def test_missing_safetensors_file_or_key(tmp_path):
    with pytest.raises(CloverError, match=r"^shard .*nope.safetensors does not exist$"):
        io.read_safetensors(tmp_path / "nope.safetensors", what="shard")
    path = io.save_safetensors(tmp_path / "w.safetensors", {"a": torch.zeros(1)})
    with pytest.raises(CloverError, match="corrupt safetensors file .*w.safetensors: .*truncated or corrupt"):
        io.read_safetensors(path, keys=["b"])


def test_replace_dir(tmp_path):
    final = tmp_path / "final"
    for content in ("first", "second"):
        tmp = tmp_path / f".{content}.tmp"
        tmp.mkdir()
        (tmp / "weights").write_text(content)
        io.replace_dir(tmp, final)
        assert (final / "weights").read_text() == content and listing(final) == ["weights"]
    assert listing(tmp_path) == ["final"]  # no temporary or old folder left
    with pytest.raises(OSError):
        io.replace_dir(tmp_path / "missing", final)  # the second rename fails: the old folder is put back
    assert (final / "weights").read_text() == "second" and listing(tmp_path) == ["final"]


def test_temp_files_finds_what_a_killed_write_leaves(tmp_path):
    (tmp_path / "shard_000000.safetensors").write_bytes(b"done")
    (tmp_path / ".shard_000001.safetensors.1a2b3c4d.tmp").write_bytes(b"half")
    (tmp_path / ".epoch_3.tmp").mkdir()  # a folder: not a file write
    assert [p.name for p in io.temp_files(tmp_path)] == [".shard_000001.safetensors.1a2b3c4d.tmp"]


def test_device_timer(tmp_path):
    with io.device_timer("cpu") as t:
        sum(range(10000))
    assert t.seconds > 0
    with io.device_timer(torch.device("cpu")) as t2:
        pass
    assert t2.seconds >= 0
    with pytest.raises(ValueError):
        with io.device_timer() as t3:
            raise ValueError
    assert t3.seconds is None
    io.synchronize(None)
    io.synchronize("cpu")


def test_io_imports_only_clover_errors_from_the_package():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(io.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {m for m in imported if m and m.startswith("clover")} == {"clover.errors"}
