"""What a decoding loop returns, and the one place that applies stop tokens, stop sequences and max_new_tokens."""
from __future__ import annotations

from dataclasses import dataclass, field

from clover.errors import CloverError


@dataclass
class GenerationResult:
    tokens: list[int]                      # generated ids (stop token included when one ended the output)
    accept_lengths: list[int] = field(default_factory=list)  # tokens committed per step, bonus token included
    finish_reason: str = ""                # "stop", "length" (max_new_tokens) or "context" (window full)
    verified: list[int] = field(default_factory=list)  # tokens each speculative step verified (root included)
    wall_time: float = 0.0

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def steps(self) -> int:
        """Forward passes that produced tokens: the prefill (which yields the first token) plus every decoding or
        verification step."""
        return len(self.accept_lengths)

    @property
    def tau(self) -> float:
        return self.new_tokens / max(self.steps, 1)


class OutputTracker:
    """Collects committed chunks, cutting the output exactly at a stop token, the end of a stop sequence, or
    ``max_new_tokens``."""

    def __init__(self, max_new_tokens: int, stop_token_ids=(), stop_sequences=()):
        if max_new_tokens <= 0:
            raise CloverError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens
        self.stop_ids = set(stop_token_ids)
        self.stop_sequences = [list(s) for s in stop_sequences if len(s)]
        self.result = GenerationResult(tokens=[])

    def add(self, chunk: list[int]) -> list[int]:
        """Append a committed chunk; return the part that is output (possibly cut). Sets ``finish_reason``."""
        out = self.result.tokens
        emitted = []
        for tok in chunk:  # a chunk is at most tree-depth + 1 host ints
            out.append(tok)
            emitted.append(tok)
            if tok in self.stop_ids or any(out[-len(s):] == s for s in self.stop_sequences):
                self.result.finish_reason = "stop"
                break
            if len(out) >= self.max_new_tokens:
                self.result.finish_reason = "length"
                break
        self.result.accept_lengths.append(len(emitted))
        return emitted

    @property
    def done(self) -> bool:
        return bool(self.result.finish_reason)
