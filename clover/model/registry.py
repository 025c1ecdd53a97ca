"""The draft registry: the one place that maps a draft type name to its class.

Adding a draft (say an EAGLE-3 or a Medusa head for comparison) = a :class:`clover.model.draft.DraftModel` subclass
in its own module, listed here; the trainer, the speculative decoder and the evaluation then handle it through the
class's attributes, without any change.
"""
from __future__ import annotations

from clover.errors import CloverError
from clover.model.clover2 import Clover2Draft
from clover.model.draft import DraftModel
from clover.model.eagle import EagleDraft

DRAFTS: tuple[type[DraftModel], ...] = (Clover2Draft, EagleDraft)


def draft_names() -> list[str]:
    """The type names of the registered drafts (as written in ``config.json``)."""
    return [cls.draft_type for cls in DRAFTS]


def draft_class(name: str, where: str = "draft type") -> type[DraftModel]:
    """The draft class named ``name`` (its type name or one of its aliases, case-insensitive)."""
    if isinstance(name, str):
        key = name.lower()
        for cls in DRAFTS:
            if key == cls.draft_type or key in cls.aliases:
                return cls
    raise CloverError(f"{where}: unknown draft_type {name!r}; known types: {', '.join(draft_names())}")


def draft_methods() -> list[str]:
    """The method names of the registered drafts in answer files and comparisons (e.g. ``clover``)."""
    return [cls.method for cls in DRAFTS]


def draft_for_method(method: str) -> type[DraftModel] | None:
    """The draft class whose method is ``method`` (None: not a draft method)."""
    return next((cls for cls in DRAFTS if cls.method == method), None)
