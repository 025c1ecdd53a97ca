"""Candidate sources that need no checkpoint, by name: the one place that maps ``lookup`` and ``recycle`` to their
classes, and that tells a training-free source from a draft checkpoint folder in a list of ``--draft`` values.

A source has ``name``, ``label``, ``shared`` (whether every sequence a model decodes uses the one instance, or each
sequence a copy of its own) and three calls: ``begin(prompt, root, base, out)`` when a request
starts (after the prefill, whose output ``out`` it may read), ``propose(root) -> Candidates`` each step and
``observe(tree, verdict, logits)`` after the step's verification. A shared source may also have
``observe_nodes(tokens, targets, logits)``: the verified nodes of many sequences at once (the roots of a batched
plain step), which must teach it what ``observe`` on each of them would.
"""
from __future__ import annotations

from pathlib import Path

from clover.errors import CloverError
from clover.generate.lookup import PromptLookup
from clover.generate.recycle import TokenRecycling

SOURCE_NAMES = ("lookup", "recycle")


def make_source(name: str, base):
    """A fresh source ``name`` for the base model ``base``."""
    if name == "lookup":
        return PromptLookup(base.device)
    if name == "recycle":
        return TokenRecycling(base.args.vocab_size, base.device)
    raise CloverError(f"unknown candidate source {name!r}; known: {', '.join(SOURCE_NAMES)}")


def split_drafts(drafts) -> tuple[str | None, list[str]]:
    """``(checkpoint folder or None, source names)`` of ``--draft`` values (one value, a list, or None): a value
    that names a source is that source, anything else a draft checkpoint folder (at most one); repeats are
    errors."""
    if drafts is None:
        return None, []
    if isinstance(drafts, (str, Path)):
        drafts = [drafts]
    folders, names = [], []
    for value in drafts:
        value = str(value)
        if not value:
            continue
        if value in SOURCE_NAMES:
            if value in names:
                raise CloverError(f"--draft {value} given twice")
            names.append(value)
        else:
            folders.append(value)
    if len(folders) > 1:
        raise CloverError(f"at most one draft checkpoint per decoder, got {folders}; combine one checkpoint with "
                          f"the training-free sources ({', '.join(SOURCE_NAMES)})")
    return (folders[0] if folders else None), names
