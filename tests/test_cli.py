"""The ``clover`` command: its subcommands, their --help, its errors; the original module command lines still run.
No model is loaded (only --help and bad input)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clover import cli

ROOT = Path(__file__).resolve().parents[1]


def run_clover(argv, capsys) -> tuple[int, str, str]:
    try:
        cli.main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_subcommand(capsys):
    code, out, _ = run_clover(["--help"], capsys)
    assert code == 0
    for name in ("generate", "chat", "serve", "data", "regenerate", "train", "gen-answer", "compare", "speed", "tau",
                 "pipeline"):
        assert f"\n  {name} " in out, name
    code, _, err = run_clover([], capsys)  # no command: the same list, as an error
    assert code == 2 and "commands:" in err


@pytest.mark.parametrize("argv", [[name] for name in cli.COMMANDS if name != "train"]
                         + [["train", "clover2"], ["train", "eagle"]])
def test_each_subcommand_help_works_under_its_name(argv, capsys):
    code, out, _ = run_clover([*argv, "--help"], capsys)
    assert code == 0
    assert out.startswith(f"usage: clover {' '.join(argv)} "), out[:80]


def test_bad_commands_are_one_error_line(capsys):
    for argv, needle in ((["generat"], "did you mean 'generate'?"), (["train"], "clover train clover2|eagle"),
                         (["train", "medusa"], "'medusa'"), (["compare", "--no-such-flag"], "unknown flag")):
        code, _, err = run_clover(argv, capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    code, _, err = run_clover(["compare", "--tree-budget", "-2"], capsys)
    assert code == 2 and "see clover compare --help" in err  # errors name the command as the user typed it


def test_train_names_the_draft_type(capsys):
    code, out, _ = run_clover(["train", "--help"], capsys)
    assert code == 0 and "clover train clover2|eagle" in out


@pytest.mark.parametrize("argv", [
    ["-m", "clover", "--version"],
    ["-m", "clover.cli", "generate", "--help"],
    ["-m", "clover.serve", "--help"],
    ["-m", "clover.ge_data.allocation", "--help"],
    ["-m", "clover.ge_data.regenerate", "--help"],
    ["-m", "clover.train.main_clover2", "--help"],
    ["-m", "clover.train.main", "--help"],
    ["-m", "clover.evaluation.compare", "--help"],
    ["-m", "clover.evaluation.speed_spe", "--help"],
    ["-m", "clover.evaluation.tau_spe", "--help"],
    ["-m", "clover.pipeline", "--help"],
])
def test_module_command_lines_still_run(argv):
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ") or proc.stdout.startswith("clover "), proc.stdout[:200]


def test_console_script_is_installed():
    """``pip install -e .`` (scripts/install_cpu.sh) puts ``clover`` on the PATH."""
    exe = shutil.which("clover") or str(Path(sys.executable).with_name("clover"))
    assert Path(exe).exists(), "no clover command: pip install -e . (scripts/install_cpu.sh) installs it"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "pipeline" in proc.stdout, proc.stderr
