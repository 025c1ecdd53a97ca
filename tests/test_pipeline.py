"""The main job end to end: ``python -m clover pipeline --fast`` (the README's first command in its smoke size, a
few minutes on 2 CPU cores) on a clean checkout of this tree finishes, writes its table and figures under its own
folder, and leaves ``git status`` clean."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def git(*args, cwd) -> str:
    return subprocess.run(["git", "-c", "user.name=clover-test", "-c", "user.email=test@localhost", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A fresh repository holding exactly the files a checkout of this tree has (tracked, and new files git does
    not ignore), committed: what a newcomer's clone looks like, uncommitted work included."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and a git checkout of the project")
    files = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=ROOT).split("\0")
    dest = tmp_path_factory.mktemp("checkout")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    git("init", "-q", cwd=dest)
    git("add", "-A", cwd=dest)
    git("commit", "-q", "-m", "checkout", cwd=dest)
    return dest


def test_main_job_fast_leaves_the_checkout_clean(checkout):
    proc = subprocess.run([sys.executable, "-m", "clover", "pipeline", "--fast"], cwd=checkout, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = checkout / "runs" / "pipeline" / "fast"
    results = json.loads((run / "compare" / "results.json").read_text())
    assert results["methods"]["baseline"]["failed"] == 0
    for method, r in results["methods"].items():  # greedy: every answer of the project's methods is plain decoding's
        if method not in ("hf", "hf_pld"):
            assert r["identical_to_plain"] == r["compared_with_plain"] == r["answered"], method
    assert (run / "compare" / "table.md").is_file() and (run / "compare" / "tau_per_group.png").is_file()
    assert git("status", "--porcelain", cwd=checkout) == ""
