"""The shared command-line vocabulary (clover.args) on every entry point: old spellings parse like the new names,
--help shows only the new names, and bad values end with one ``error:`` line and exit status 2. No model is loaded:
each entry point's real parser runs and the work after it is cut off."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from clover import args as clover_args
from clover.args import CloverArgumentParser, duration, fraction

ROOT = Path(__file__).resolve().parents[1]

# the old spellings every entry point accepts for the new names it has
ALIASES = {
    "--base-model": ["--basepath", "--model_path", "--model-path", "--base-model-path", "--model", "--base"],
    "--draft": ["--ea-model-path", "--draft-model-path"],
    "--data-dir": ["--tmpdir"],
    "--tree-budget": ["--total-token", "--budget"],
    "--max-new-tokens": ["--max-new-token", "--max_new_tokens"],
    "--max-len": ["--max_len"],
    "--question-file": ["--question_file"],
    "--question-begin": ["--question_begin"],
    "--question-end": ["--question_end"],
    "--per-group": ["--per_group"],
    "--answer-file": ["--answer_file"],
    "--top-p": ["--top_p"],
    "--top-k": ["--top_k"],
}
# a valid value for each flag and what it parses to
VALUES = {"--base-model": "some-model", "--draft": ("some-draft", ["some-draft"]), "--data-dir": "data",
          "--outdir": "out", "--hidden-dtype": "fp32",
          "--tree-budget": ("7", 7), "--max-new-tokens": ("5", 5), "--max-len": ("64", 64),
          "--question-file": "q.jsonl", "--question-begin": ("1", 1), "--question-end": ("4", 4),
          "--per-group": ("2", 2), "--answer-file": "a.jsonl", "--baseline-file": "b.jsonl", "--top-p": ("0.5", 0.5),
          "--top-k": ("3", 3), "--shard-size": ("3", 3), "--batch-size": ("4", 4), "--gpus-per-worker": ("2", 2),
          "--python-name": "ge_data_all_vicuna_nonnorm.py", "--bf16-steps": ("4", 4),
          # the trainer's flags (a value of None: a switch)
          "--draft-vocab-size": ("8", 8), "--grad-accum": ("2", 2), "--weight-decay": ("0.1", 0.1),
          "--warmup-steps": ("3", 3), "--grad-clip": ("0.2", 0.2), "--grad-clip-value": (None, True),
          "--max-steps": ("9", 9), "--mask-alignment": "eagle", "--gradient-checkpointing": (None, True),
          "--keep-last": ("3", 3), "--test-fraction": ("0.2", 0.2), "--eval-every": ("5", 5),
          "--chain-eval-batches": ("2", 2), "--num-workers": ("0", 0), "--report-to": "tensorboard"}
# the trainer's dashed names, each with its underscore spelling as the old one
TRAIN_FLAGS = ["--draft-vocab-size", "--grad-accum", "--weight-decay", "--warmup-steps", "--grad-clip",
               "--grad-clip-value", "--max-steps", "--mask-alignment", "--gradient-checkpointing", "--keep-last",
               "--test-fraction", "--eval-every", "--chain-eval-batches", "--num-workers", "--report-to"]
TRAIN_REQUIRED = {"--data-dir": "data", "--outdir": "ckpt"}


class Parsed(Exception):
    """Raised in place of returning from parse_args: carries the parser and the namespace, and stops the command."""

    def __init__(self, parser, namespace):
        super().__init__()
        self.parser, self.namespace = parser, namespace


def bench(name: str):
    """Import scripts/bench/<name>.py as a module (its main() runs nothing until called), with its folder on the
    path as when it runs as a script."""
    folder = str(ROOT / "scripts" / "bench")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(folder) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def train_main(draft_type: str):
    return lambda argv: importlib.import_module("clover.train.trainer").main(draft_type, argv)


def module_main(name: str, *prefix: str):
    return lambda argv: importlib.import_module(name).main([*prefix, *argv])


def bench_main(name: str, takes_argv: bool):
    """Bench scripts whose main() reads sys.argv get it through sys.argv."""
    def run(argv):
        main = bench(name).main
        if takes_argv:
            return main(argv)
        saved = sys.argv
        sys.argv = [f"{name}.py", *argv]
        try:
            return main()
        finally:
            sys.argv = saved
    return run


# name -> (run(argv), required flags with values, new names with old spellings, entry-specific old spellings)
ENTRY_POINTS = {
    "clover.cli generate": (module_main("clover.cli", "generate"), {"--prompt": "hi"},
                            ["--base-model", "--draft", "--tree-budget", "--max-new-tokens", "--max-len", "--top-p",
                             "--top-k"], {}),
    "clover.cli chat": (module_main("clover.cli", "chat"), {},
                        ["--base-model", "--draft", "--tree-budget", "--max-new-tokens", "--max-len", "--top-p",
                         "--top-k"], {}),
    "clover.serve": (module_main("clover.serve.__main__"), {},
                     ["--base-model", "--draft", "--tree-budget", "--max-len"], {}),
    "clover.ge_data.allocation": (module_main("clover.ge_data.allocation"), {"--outdir": "data"},
                                  ["--base-model", "--outdir", "--max-len", "--question-file", "--max-new-tokens",
                                   "--shard-size", "--gpus-per-worker", "--python-name", "--hidden-dtype"],
                                  {"--outdir": ["--data-dir", "--tmpdir"], "--shard-size": ["--shard_size"],
                                   "--gpus-per-worker": ["--gpus_per_worker"], "--python-name": ["--python_name"],
                                   "--hidden-dtype": ["--hidden_dtype"]}),
    "clover.ge_data.regenerate": (module_main("clover.ge_data.regenerate"), {"--outdir": "regen"},
                                  ["--base-model", "--max-len", "--max-new-tokens", "--batch-size", "--shard-size",
                                   "--top-p", "--top-k"],
                                  {"--batch-size": ["--batch_size"], "--shard-size": ["--shard_size"]}),
    "clover.evaluation.gen_answer": (module_main("clover.evaluation.gen_answer"),
                                     {"--method": "baseline", "--answer-file": "a.jsonl"},
                                     ["--base-model", "--draft", "--question-file", "--question-begin",
                                      "--question-end", "--per-group", "--answer-file", "--max-new-tokens",
                                      "--tree-budget", "--top-p", "--top-k", "--max-len"], {}),
    "clover.evaluation.replay": (module_main("clover.evaluation.replay"),
                                 {"--method": "clover", "--answer-file": "a.jsonl"},
                                 ["--base-model", "--draft", "--question-file", "--question-begin", "--question-end",
                                  "--per-group", "--answer-file", "--max-new-tokens", "--tree-budget", "--max-len"],
                                 {}),
    "clover.evaluation.compare": (module_main("clover.evaluation.compare"), {},
                                  ["--base-model", "--question-file", "--question-begin", "--question-end",
                                   "--per-group", "--max-new-tokens", "--tree-budget"], {}),
    "clover.evaluation.speed_spe": (module_main("clover.evaluation.speed_spe"), {"--answer-file": "a.jsonl"},
                                    ["--answer-file", "--baseline-file"],
                                    {"--answer-file": ["--path"], "--baseline-file": ["--base_path"]}),
    "clover.evaluation.tau_spe": (module_main("clover.evaluation.tau_spe"), {"--answer-file": "a.jsonl"},
                                  ["--answer-file"], {"--answer-file": ["--path"]}),
    "clover.evaluation.answers": (module_main("clover.evaluation.answers"), {"--upgrade": "a.jsonl"}, [], {}),
    "clover.pipeline": (module_main("clover.pipeline"), {}, ["--base-model", "--question-file", "--tree-budget",
                                                             "--outdir"], {"--outdir": ["--workdir"]}),
    **{module: (train_main(draft_type), TRAIN_REQUIRED, ["--base-model", "--data-dir", "--outdir", "--max-len",
                                                          *TRAIN_FLAGS],
                {**{flag: ["--" + flag[2:].replace("-", "_")] for flag in TRAIN_FLAGS},
                 "--outdir": ["--ckpt-dir", "--cpdir"]})
       for module, draft_type in (("clover.train.main_clover2", "clover2"), ("clover.train.main", "eagle"))},
    "clover.train.joint": (lambda argv: importlib.import_module("clover.train.joint").main(["clover2", "eagle"], argv),
                           TRAIN_REQUIRED, ["--base-model", "--data-dir", "--outdir", "--max-len", *TRAIN_FLAGS],
                           {**{flag: ["--" + flag[2:].replace("-", "_")] for flag in TRAIN_FLAGS},
                            "--outdir": ["--ckpt-dir", "--cpdir"]}),
    "scripts/bench/ge_data.py": (bench_main("ge_data", False), {}, ["--base-model", "--max-len"], {}),
    "scripts/bench/speculative.py": (bench_main("speculative", False), {},
                                     ["--base-model", "--question-file", "--question-begin", "--question-end",
                                      "--per-group", "--max-new-tokens", "--tree-budget"], {}),
    "scripts/bench/vanilla.py": (bench_main("vanilla", False), {}, ["--base-model"], {}),
    "scripts/bench/train.py": (bench_main("train", False), {}, ["--base-model", "--data-dir", "--bf16-steps"],
                               {"--data-dir": ["--data"], "--bf16-steps": ["--bf16_steps"]}),
    "scripts/bench/serve_load.py": (bench_main("serve_load", True), {}, ["--base-model", "--draft", "--tree-budget"],
                                    {}),
    "scripts/bench/draft_quality.py": (bench_main("draft_quality", True), {"--data-dir": "data"},
                                       ["--base-model", "--data-dir", "--max-len"], {}),
    "scripts/bench/train_paths.py": (bench_main("train_paths", True), {"--conversations": "c.jsonl"},
                                     ["--base-model", "--max-len"], {}),
}


@pytest.fixture
def parse(monkeypatch):
    """parse(entry point, argv) -> (parser, namespace) from the entry point's own parser, without running it."""
    original = CloverArgumentParser.parse_args

    def intercept(self, args=None, namespace=None):
        raise Parsed(self, original(self, args, namespace))

    monkeypatch.setattr(CloverArgumentParser, "parse_args", intercept)

    def run(entry: str, argv: list[str], drop: str | None = None):
        main, required = ENTRY_POINTS[entry][:2]
        base = [x for flag, value in required.items() if flag != drop for x in (flag, value)]
        with pytest.raises(Parsed) as info:
            main(base + argv)
        return info.value.parser, info.value.namespace
    return run


def old_names(entry: str) -> dict[str, list[str]]:
    _, _, names, extra = ENTRY_POINTS[entry]
    return {name: ALIASES.get(name, []) + extra.get(name, []) for name in names}


def registered_aliases(parser: argparse.ArgumentParser, namespace) -> dict[str, list[str]]:
    """new name -> its old spellings, as registered in the parser (of the chosen subcommand, if any)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parser = action.choices[namespace.command]
    found: dict[str, list[str]] = {}
    for action in parser._actions:
        if getattr(action, "primary", None):
            found.setdefault(action.primary, []).extend(action.option_strings)
    return found


def value(flag: str):
    v = VALUES[flag]
    return v if isinstance(v, tuple) else (v, v)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_old_spellings_parse_like_the_new_names(entry, parse):
    parser, namespace = parse(entry, [])
    expected = {name: sorted(old) for name, old in old_names(entry).items() if old}
    assert {k: sorted(v) for k, v in registered_aliases(parser, namespace).items()} == expected
    for name, old in old_names(entry).items():
        text, parsed = value(name)
        given = [] if text is None else [text]
        _, new_ns = parse(entry, [name, *given], drop=name)
        dest = name.lstrip("-").replace("-", "_")
        assert getattr(new_ns, dest) == parsed, (entry, name)
        for alias in old:
            assert parse(entry, [alias, *given], drop=name)[1] == new_ns, (entry, name, alias)


def help_text(entry: str, capsys) -> str:
    main = ENTRY_POINTS[entry][0]
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def mentions(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_help_lists_only_the_new_names(entry, capsys):
    text = help_text(entry, capsys)
    for name, old in old_names(entry).items():
        assert mentions(text, name), (entry, name)
        for alias in old:
            assert not mentions(text, alias), (entry, alias)


def one_error_line(main, argv, capsys, *needles) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


BAD_VALUES = {
    "--tree-budget": ("-1", "must be a number of tree nodes >= 0 or 'auto'"),
    "--top-p": ("0", "must be a number in (0, 1]"),
    "--top-k": ("-2", "must be a whole number >= 0"),
    "--max-new-tokens": ("0", "must be a whole number > 0"),
    "--max-len": ("ten", "expected a whole number"),
}
# where a flag of the shared vocabulary takes other values: the fixed budget of the benchmark's budgeted tree
OTHER_MESSAGES = {("scripts/bench/speculative.py", "--tree-budget"): "must be a whole number > 0"}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_bad_values_are_one_error_line(entry, capsys):
    main, required, names, _ = ENTRY_POINTS[entry]
    base = [x for flag, v in required.items() for x in (flag, v)]
    for flag, (bad, message) in BAD_VALUES.items():
        if flag in names:
            message = OTHER_MESSAGES.get((entry, flag), message)
            one_error_line(main, base + [flag, bad], capsys, f"argument {flag}:", message, f"'{bad}'", "--help")
    one_error_line(main, base + ["--no-such-flag", "3"], capsys, "unknown flag --no-such-flag")
    for flag in required:
        rest = [x for f, v in required.items() if f != flag for x in (f, v)]
        if required is TRAIN_REQUIRED and flag == "--data-dir":  # the trainer takes --conversations instead
            one_error_line(main, rest, capsys, "either --data-dir", "--conversations", "not neither")
        else:
            one_error_line(main, rest, capsys, "the following arguments are required:", flag)


def test_errors_name_the_old_spelling_the_user_typed(capsys):
    main = ENTRY_POINTS["clover.evaluation.gen_answer"][0]
    base = ["--method", "baseline", "--answer-file", "a.jsonl"]
    one_error_line(main, base + ["--total-token", "x"], capsys, "argument --total-token:", "'x'")
    one_error_line(main, base + ["--max-new-token", "-3"], capsys, "argument --max-new-token:", "> 0")
    one_error_line(main, base + ["--tree-budgte", "3"], capsys,
                   "unknown flag --tree-budgte; did you mean --tree-budget?")


def test_old_and_new_name_together_is_an_error(parse, capsys):
    main = ENTRY_POINTS["clover.serve"][0]
    one_error_line(main, ["--basepath", "a", "--base-model", "b"], capsys,
                   "--basepath is an old name of --base-model: give only one of them")
    one_error_line(main, ["--tree-budget", "3", "--budget", "4"], capsys, "--budget is an old name of --tree-budget")
    one_error_line(main, ["--model", "a", "--basepath", "b"], capsys,
                   "--model and --basepath are both old names of --base-model: give it once")
    # the very same spelling twice keeps the last value, as argparse always does
    assert parse("clover.serve", ["--model", "a", "--model", "b"])[1].base_model == "b"
    assert parse("clover.serve", ["--base-model", "a", "--base-model", "b"])[1].base_model == "b"


def test_defaults():
    from clover.cli import build_parser

    ns = build_parser().parse_args(["generate", "--prompt", "hi"])
    assert (ns.base_model, ns.draft, ns.tree, ns.tree_budget, ns.max_new_tokens) == \
        ("smollm2-135m-instruct", None, "dynamic", "auto", 256)
    assert (ns.temperature, ns.top_p, ns.top_k, ns.seed, ns.dtype, ns.max_len) == (0.0, 1.0, 0, 0, "auto", 4096)
    assert build_parser().parse_args(["chat", "--tree-budget", "AUTO"]).tree_budget == "auto"


@pytest.mark.parametrize("check, good, bad", [
    (clover_args.positive_int, [("1", 1), ("4096", 4096)], ["0", "-1", "1.5", "x", ""]),
    (clover_args.non_negative_int, [("0", 0), ("7", 7)], ["-1", "2.0", "nope"]),
    (clover_args.non_negative_float, [("0", 0.0), ("0.7", 0.7), ("2", 2.0)], ["-0.1", "nan", "inf", "warm"]),
    (clover_args.probability, [("1", 1.0), ("0.9", 0.9), ("1e-3", 1e-3)], ["0", "-0.5", "1.01", "nan", "p"]),
    (clover_args.tree_budget, [("auto", "auto"), ("Auto", "auto"), ("0", 0), ("63", 63)], ["-1", "1.5", "many"]),
    (clover_args.runtime_dtype, [("auto", "auto"), ("BF16", "bf16"), ("float32", "float32")], ["fp8", "int4"]),
])
def test_value_checks(check, good, bad):
    for text, expected in good:
        assert check(text) == expected
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(repr(text))):
            check(text)


@pytest.mark.parametrize("source", ["regenerated", "sharegpt"])
def test_pipeline_stage_commands_parse_with_the_stages_parsers(parse, monkeypatch, tmp_path, source):
    """The command lines python -m clover.pipeline runs parse with the stages' own parsers, in the new names; with
    regenerated data (the default) the data dump reads the regeneration's merged file."""
    import clover.pipeline as pipeline

    commands = []
    monkeypatch.setattr(pipeline, "run", commands.append)
    pipeline.pipeline(tmp_path, "some-model", "fast", "q.jsonl", "dynamic", 5, source)
    modules = [cmd[2] for cmd in commands]
    first = ["clover.ge_data.regenerate"] if source == "regenerated" else []
    assert modules[:len(first) + 1] == first + ["clover.ge_data.allocation"]
    assert modules[-1] == "clover.evaluation.compare"
    assert {"clover.train.main_clover2", "clover.train.main"} == set(modules[len(first) + 1:-1])
    for cmd in commands:
        assert parse(cmd[2], cmd[3:])[1].base_model == "some-model"
        assert not any(a.startswith("--") and a[2:].replace("_", "-") != a[2:] for a in cmd), cmd  # no old names
        for old in ALIASES["--base-model"] + ALIASES["--data-dir"] + ALIASES["--tree-budget"] + \
                ["--ckpt-dir", "--cpdir", "--workdir"]:
            assert old not in cmd, cmd
    alloc = parse("clover.ge_data.allocation", commands[len(first)][3:])[1]
    if first:
        regen = parse("clover.ge_data.regenerate", commands[0][3:])[1]
        assert alloc.dataset == str(Path(regen.outdir) / "regenerated.jsonl") and alloc.end is None
        assert regen.max_len <= alloc.max_len  # a regenerated conversation fits a training sequence
    else:
        assert alloc.dataset is None and alloc.end == pipeline.SIZES["fast"]["sharegpt_conversations"]
    assert alloc.outdir == str(tmp_path / "data")
    for cmd in commands[len(first) + 1:-1]:
        ns = parse(cmd[2], cmd[3:])[1]
        assert ns.data_dir == str(tmp_path / "data")
        assert ns.outdir.startswith(str(tmp_path / "ckpt")) and ns.draft_vocab_size == pipeline.DRAFT_VOCAB_SIZE
    ns = parse("clover.evaluation.compare", commands[-1][3:])[1]
    assert (ns.tree, ns.tree_budget, ns.question_file, ns.question_end) == ("dynamic", 5, "q.jsonl", 6)


@pytest.mark.parametrize("argv, needles", [
    (["-m", "clover.evaluation.gen_answer", "--method", "baseline", "--answer-file", "a.jsonl", "--top-p", "0"],
     ["argument --top-p: must be a number in (0, 1], got '0'"]),
    (["-m", "clover.cli", "generate", "--prompt", "hi", "--budget", "-1"], ["argument --budget:", "'-1'"]),
])
def test_real_command_line_error(argv, needles):
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0]


# one meaning per flag: what every entry point's help for the flag starts with, and its default there
MEANINGS = {
    "--dtype": ("compute dtype: auto (fp32 on CPU, bf16 on CUDA)", None),
    "--max-len": ("longest sequence in tokens, prompt + reply", None),
    "--outdir": ("output folder: ", None),
    "--seed": (None, 0),
    "--tree": (None, "dynamic"),
    "--tree-budget": (None, "auto"),
    "--base-model": ("base model: built-in name, .gguf file or HF folder", None),
}
OTHER_DEFAULTS = {("scripts/bench/speculative.py", "--tree-budget")}  # the benchmark's fixed-budget tree


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_each_flag_means_one_thing_everywhere(entry, parse):
    parser, namespace = parse(entry, [])
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parser = action.choices[namespace.command]
    for action in parser._actions:
        for flag in set(action.option_strings) & set(MEANINGS):
            start, default = MEANINGS[flag]
            if start is not None:
                assert (action.help or "").startswith(start), (entry, flag, action.help)
            if default is not None and (entry, flag) not in OTHER_DEFAULTS:
                assert action.default == default, (entry, flag, action.default)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_help_is_plain_text(entry, capsys):
    """No reST markup from the docstrings, no "default: None" on a flag without a default."""
    text = help_text(entry, capsys)
    for markup in ("``", ":mod:", ":func:", ":class:", ":meth:", "default: None", "(default None)"):
        assert markup not in text, (entry, markup)


def test_plain_text_drops_rest_markup():
    doc = "Run ``clover data`` (see :mod:`clover.ge_data.allocation`, :func:`~clover.io.write_json`)."
    assert clover_args.plain_text(doc) == "Run clover data (see clover.ge_data.allocation, write_json)."


@pytest.mark.parametrize("text,seconds", [("90", 90), ("45s", 45), ("30m", 1800), ("2h", 7200), ("1h30m", 5400),
                                          ("0.5h", 1800), ("0", 0)])
def test_durations(text, seconds):
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "2d", "h", "-5m", "1m2h"])
def test_bad_durations_name_the_accepted_forms(text):
    with pytest.raises(argparse.ArgumentTypeError, match="expected a duration"):
        duration(text)


def test_fractions():
    assert fraction("0") == 0 and fraction("0.25") == 0.25 and fraction("1") == 1
    for text in ("-0.1", "1.5", "nan", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            fraction(text)
