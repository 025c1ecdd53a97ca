"""The command-line vocabulary every clover entry point shares: one name per idea, the old spellings as hidden aliases.

Each ``add_*`` function adds one group of flags to a parser (or an argument group) with the same names, value checks
and ``dest`` everywhere:

    p = CloverArgumentParser(prog="python -m clover.something", description=__doc__)
    add_base_model(p)                    # --base-model       -> args.base_model
    add_draft(p)                         # --draft (repeatable) -> args.draft (a list or None)
    add_tree(p)                          # --tree --tree-budget -> args.tree, args.tree_budget ('auto' or an int)
    add_max_new_tokens(p, 256)           # --max-new-tokens   -> args.max_new_tokens

Old spellings (``--basepath``, ``--model_path``, ``--total-token``, ``--max-new-token`` ...) are registered by
:func:`add_option` as separate arguments with the same ``dest`` and no help text, so old commands keep working and
``--help`` lists only the new names. An old name and its new name (or two old names of one flag) on the same command
line are an error: they sit in one mutually exclusive group. Repeating the very same spelling keeps the last value,
as argparse always does.

:class:`CloverArgumentParser` reports every usage error (an unknown flag, a bad or missing value, a missing required
flag) as one line ``error: ...`` on stderr that names the flag, and exits with status 2, as
:func:`clover.errors.run_cli` does for a :class:`~clover.errors.CloverError`.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import math
import re
import sys
import textwrap

from clover.model.base import DTYPES
from clover.model.checkpoint import shipped_drafts
from clover.model.loading import DEFAULT_MODEL

DTYPE_NAMES = ("auto", *DTYPES)  # what clover.model.base.parse_dtype accepts


_ROLE = re.compile(r":[a-z]+:`~?([^`<]*?)\s*(?:<[^>]*>)?`")  # :mod:`x`, :func:`~a.b`, :class:`text <target>`


def plain_text(doc: str | None) -> str | None:
    """A docstring as --help shows it: reST roles and literals (``x``, :func:`~a.b`) become plain words."""
    if doc is None:
        return None
    doc = _ROLE.sub(lambda m: m[1].rsplit(".", 1)[-1] if m[0].startswith((":func:`~", ":class:`~", ":meth:`~"))
                    else m[1], doc)
    return doc.replace("``", "")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; a flag's help ends with its default when it has a meaningful one (not
    None, False or an empty list, and not already stated)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or action.required or default in (None, False, argparse.SUPPRESS)
                or default == [] or not action.option_strings):
            return text
        return f"{text} (default %(default)s)"


_invoked_as: list[str] = []


@contextlib.contextmanager
def invoked_as(prog: str):
    """Within this block the next :class:`CloverArgumentParser` built is named ``prog`` in its usage and errors
    (``clover compare`` instead of ``python -m clover.evaluation.compare``)."""
    _invoked_as.append(prog)
    try:
        yield
    finally:
        if prog in _invoked_as:
            _invoked_as.remove(prog)


class CloverArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one ``error: ...`` line (exit status 2) instead of usage + message,
    whose --help is plain text (docstrings lose their reST markup) and states each meaningful default once."""

    def __init__(self, *args, **kwargs):
        if _invoked_as:
            kwargs["prog"] = _invoked_as.pop()
        kwargs.setdefault("formatter_class", HelpFormatter)
        for key in ("description", "epilog"):
            text = plain_text(kwargs.get(key))
            kwargs[key] = textwrap.fill(text, 100) if text and "\n" not in text else text  # one line: wrap it
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {self._explain(message)} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    def _explain(self, message: str) -> str:
        """argparse's message, reworded where it talks about the alias groups or could suggest a flag."""
        new = {s: getattr(a, "primary", s) for a in self._actions for s in a.option_strings}
        both = re.fullmatch(r"argument (\S+): not allowed with argument (\S+)", message)
        if both and new.get(both[1]) == new.get(both[2]):
            flag, names = new[both[1]], (both[2], both[1])
            if flag in names:
                old = names[1 - names.index(flag)]
                return f"{old} is an old name of {flag}: give only one of them"
            return f"{names[0]} and {names[1]} are both old names of {flag}: give it once"
        missing = re.fullmatch(r"one of the arguments (\S+) is required", message)
        if missing:
            return f"the following arguments are required: {missing[1]}"
        unknown = re.fullmatch(r"unrecognized arguments: (.*)", message)
        flag = next((w.split("=")[0] for w in unknown[1].split() if w.startswith("-")), None) if unknown else None
        if flag:
            close = difflib.get_close_matches(flag, list(new), n=1, cutoff=0.8)
            return f"unknown flag {flag}" + (f"; did you mean {new[close[0]]}?" if close else "")
        return message


# ---- value checks: each returns the converted value or raises ArgumentTypeError with what is expected ----------

def _number(text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}") \
            from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number > 0 (a count, a length, a cap)."""
    value = _number(text, int)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a whole number > 0, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (an index, or a count where 0 means off)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (a temperature, a rate)."""
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def probability(text: str) -> float:
    """A number in (0, 1] (a nucleus-sampling threshold)."""
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1] (a share)."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def duration(text: str) -> float:
    """Seconds of ``"90"``, ``"45s"``, ``"30m"``, ``"2h"`` or ``"1h30m"``."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if parts is None or not any(parts.groups()):
        raise argparse.ArgumentTypeError(f"expected a duration: seconds (90, 45s), minutes (30m) or hours (2h, "
                                         f"1h30m), got {text!r}")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def tree_budget(text: str) -> int | str:
    """'auto' (the budget measured from this device's verification cost) or a node count >= 0."""
    text = str(text)
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of tree nodes >= 0 or 'auto', got {text!r}")
    return value


def runtime_dtype(text: str) -> str:
    """A dtype name the runtime accepts (auto: fp32 on CPU, bf16 on CUDA)."""
    if text.lower() not in DTYPE_NAMES:
        raise argparse.ArgumentTypeError(f"must be auto, fp32, bf16 or fp16, got {text!r}")
    return text.lower()


# ---- the flags ----------------------------------------------------------------------------------------------------

def add_option(p: argparse.ArgumentParser, name: str, *old_names: str, **kwargs) -> argparse.Action:
    """Add flag ``name`` (shown in --help) and its ``old_names`` (hidden aliases with the same dest and checks) to
    ``p``, a parser or an argument group (as every ``add_*`` function below).

    ``kwargs`` are argparse's; ``dest`` defaults to ``name`` without dashes. Returns the visible action."""
    kwargs.setdefault("dest", name.lstrip("-").replace("-", "_"))
    if not old_names:
        return p.add_argument(name, **kwargs)
    group = p.add_mutually_exclusive_group(required=kwargs.pop("required", False))
    action = group.add_argument(name, **kwargs)
    for old in old_names:
        group.add_argument(old, **{**kwargs, "help": argparse.SUPPRESS}).primary = name
    return action


def add_base_model(p: argparse.ArgumentParser, required: bool = False, help: str | None = None) -> argparse.Action:
    """``--base-model`` (dest ``base_model``): a built-in name, a .gguf file or an HF folder; ``help`` adds what it
    is for in this command."""
    what = "base model: built-in name, .gguf file or HF folder" + (f"; {help}" if help else "")
    return add_option(p, "--base-model", "--basepath", "--model_path", "--model-path", "--base-model-path", "--model",
                      "--base", required=required, default=None if required else DEFAULT_MODEL, metavar="MODEL",
                      help=what if required else f"{what} (default %(default)s)")


def add_draft(p: argparse.ArgumentParser, required: bool = False, help: str | None = None) -> argparse.Action:
    """``--draft`` (dest ``draft``: a list, None when omitted), repeatable: a draft checkpoint folder or shipped draft
    name, or a training-free source (``lookup``, ``recycle``); several share one tree per step. Optional drafts mean
    plain decoding when omitted."""
    return add_option(p, "--draft", "--ea-model-path", "--draft-model-path", required=required, default=None,
                      action="append", metavar="FOLDER|NAME|lookup|recycle",
                      help=help or "a draft checkpoint folder (Clover-2 or EAGLE-1) or a shipped draft's name "
                                   f"({', '.join(shipped_drafts()) or 'none installed'}), or a candidate "
                                   "source that needs no training: lookup (prompt/suffix lookup), recycle (token "
                                   "recycling); repeat to combine one draft and the sources in one tree"
                                   + ("" if required else "; omit for plain decoding"))


def add_data_dir(p: argparse.ArgumentParser, required: bool = True, help: str | None = None,
                 also: tuple[str, ...] = ()) -> argparse.Action:
    """``--data-dir`` (dest ``data_dir``): the hidden-state data folder a command reads (``clover data`` writes it);
    ``also``: old names of this entry point besides ``--tmpdir``."""
    return add_option(p, "--data-dir", "--tmpdir", *also, required=required, default=None, metavar="FOLDER",
                      help=help or "training data folder (written by clover data)")


def add_outdir(p: argparse.ArgumentParser, what: str, required: bool = False, default: str | None = None,
               also: tuple[str, ...] = ()) -> argparse.Action:
    """``--outdir`` (dest ``outdir``): the folder this command writes, in every command that writes one; ``what``
    says what goes in it, ``also`` are the entry point's old names for it."""
    return add_option(p, "--outdir", *also, required=required, default=default, metavar="FOLDER",
                      help=f"output folder: {what}" + (f" (default {default})" if default else ""))


def add_questions(p: argparse.ArgumentParser, subset: bool = True, help: str | None = None) -> None:
    """``--question-file`` (Spec-Bench format JSONL, default: the shipped set) and, with ``subset``,
    ``--question-begin``, ``--question-end`` and ``--per-group`` (dests ``question_file``, ``question_begin``,
    ``question_end``, ``per_group``)."""
    add_option(p, "--question-file", "--question_file", default=None, metavar="FILE",
               help=help or "Spec-Bench format JSONL (default: the shipped set)")
    if subset:
        add_option(p, "--question-begin", "--question_begin", type=non_negative_int, default=None, metavar="I",
                   help="first question (line index) to answer")
        add_option(p, "--question-end", "--question_end", type=positive_int, default=None, metavar="I",
                   help="answer questions before this line index")
        add_option(p, "--per-group", "--per_group", type=positive_int, default=None, metavar="G",
                   help="stratified subset: this many questions per category group, evenly spaced")


def add_answer_file(p: argparse.ArgumentParser, required: bool = True, help: str | None = None,
                    also: tuple[str, ...] = ()) -> argparse.Action:
    """``--answer-file`` (dest ``answer_file``): an answer file, one JSON line per question; ``also``: old names of
    this entry point."""
    return add_option(p, "--answer-file", "--answer_file", *also, required=required, default=None, metavar="FILE",
                      help=help or "answer file (JSON lines)")


def add_seed(p: argparse.ArgumentParser, help: str) -> argparse.Action:
    """``--seed`` (an int, default 0 in every command): ``help`` says what it seeds."""
    return p.add_argument("--seed", type=int, default=0, help=f"{help} (default 0)")


def add_max_len(p: argparse.ArgumentParser, default: int, use: str) -> argparse.Action:
    """``--max-len`` (dest ``max_len``, > 0): the longest sequence in tokens, prompt + reply, everywhere; ``use`` says
    what this command does with it (a KV-cache capacity, a truncation length ...)."""
    return add_option(p, "--max-len", "--max_len", type=positive_int, default=default, metavar="N",
                      help=f"longest sequence in tokens, prompt + reply: {use} (default %(default)s)")


def add_dtype(p: argparse.ArgumentParser, use: str = "", names: tuple[str, ...] = ("fp32", "bf16", "fp16"),
              default: str = "auto") -> argparse.Action:
    """``--dtype``: the compute dtype, in every command (auto: fp32 on CPU, bf16 on CUDA); ``use`` adds what it
    means for this command, ``names`` narrows the dtypes it takes besides auto."""
    def dtype(text: str) -> str:
        value = runtime_dtype(text)
        if value != "auto" and DTYPES[value] not in {DTYPES[n] for n in names}:
            raise argparse.ArgumentTypeError(f"must be auto, {', '.join(names)}, got {text!r}")
        return value
    return p.add_argument("--dtype", type=dtype, default=default, metavar="DTYPE",
                          help=f"compute dtype: auto (fp32 on CPU, bf16 on CUDA), {', '.join(names)}{use} "
                               f"(default {default})")


def add_sampling(p: argparse.ArgumentParser, top: bool = True, seed_help: str | None = "sampling seed",
                 temperature: float = 0.0, top_p: float = 1.0) -> None:
    """``--temperature`` (>= 0, 0 = greedy) and, with ``top``, ``--top-p`` (in (0, 1]) and ``--top-k`` (>= 0,
    0 = off); with a ``seed_help``, ``--seed`` (default 0). ``temperature`` and ``top_p``: the defaults."""
    p.add_argument("--temperature", type=non_negative_float, default=temperature, metavar="T",
                   help="0 = greedy" + (" (default)" if temperature == 0 else f" (default {temperature:g})"))
    if top:
        add_option(p, "--top-p", "--top_p", type=probability, default=top_p, metavar="P",
                   help="nucleus sampling threshold, in (0, 1] (default "
                        + ("1: off)" if top_p == 1 else f"{top_p:g})"))
        add_option(p, "--top-k", "--top_k", type=non_negative_int, default=0, metavar="K",
                   help="sample from the k most likely tokens (default 0: off)")
    if seed_help:
        add_seed(p, seed_help)


def add_max_new_tokens(p: argparse.ArgumentParser, default: int,
                       help: str = "cap on new tokens per reply") -> argparse.Action:
    """``--max-new-tokens`` (dest ``max_new_tokens``, > 0)."""
    return add_option(p, "--max-new-tokens", "--max-new-token", "--max_new_tokens", type=positive_int,
                      default=default, metavar="N", help=f"{help} (default %(default)s)")


def add_tree(p: argparse.ArgumentParser, node_paths: bool = False) -> None:
    """``--tree`` (a fixed tree name or 'dynamic'; with ``node_paths`` also a Python list of node paths, which the
    entry point parses) and ``--tree-budget`` (dest ``tree_budget``: 'auto' or an int >= 0; the node budget of the
    dynamic tree)."""
    paths = ", or a Python list of node paths" if node_paths else ""
    p.add_argument("--tree", default="dynamic",
                   help=f"'dynamic' (the draft's likeliest paths, sized by --tree-budget) or a fixed tree name such as "
                        f"mc_sim_7b_63{paths} (default %(default)s)")
    add_option(p, "--tree-budget", "--total-token", "--budget", type=tree_budget, default="auto",
               metavar="N|auto", help="node budget of the dynamic tree: a number, or 'auto' (from this device's "
                                      "measured verification cost; default %(default)s)")


def add_runtime(p: argparse.ArgumentParser, max_len: int | None = 4096) -> None:
    """``--dtype`` (auto, fp32, bf16, fp16), ``--device`` (default cuda when available, else cpu), ``--compile``
    and, unless ``max_len`` is None, ``--max-len`` (dest ``max_len``, > 0: the KV-cache capacity)."""
    import torch

    add_dtype(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda[:i] (default %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="compile the decoding forwards (one token, a tree's verification) with torch.compile: "
                        "faster steps on a CPU after a few minutes of compiling at load; needs a C++ compiler")
    if max_len is not None:
        add_max_len(p, max_len, "the KV cache's capacity, the context window")
