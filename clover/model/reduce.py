"""Argmax and top-k over the vocabulary, fast on a CPU.

On a CPU ``torch.argmax`` and ``torch.topk`` over rows of logits go element by element: for the 7 x 49,152 logits of
a small tree's verification ~0.4 and ~0.5 ms on a 2-core Xeon, while ``amax`` over the same rows, which vectorises,
takes ~0.03 ms. So both functions here cut each row into chunks, take every chunk's maximum with ``amax``, and search
only the chunks that can hold the answer: for :func:`argmax` the first chunk whose maximum is the row's maximum (the
result is exactly ``torch.argmax``'s, the first index of the maximum, a NaN counting as the maximum), for
:func:`topk` the ``k`` chunks with the largest maxima (each of the ``k`` largest values lies in one of them). They
run 3-7x faster there. Off the CPU, for short rows, and for a vocabulary size no chunk length divides, they are
``torch.argmax`` and ``torch.topk``.
"""
from __future__ import annotations

import torch

CHUNKS = (256, 128, 64)  # chunk lengths tried, longest first: long enough for amax to vectorise, short to search
MIN_CHUNKS = 32  # fewer chunks than this per row: torch's own kernel


def _chunk_length(x: torch.Tensor) -> int | None:
    if x.device.type != "cpu" or x.numel() == 0:
        return None
    vocab = x.shape[-1]
    return next((c for c in CHUNKS if vocab % c == 0 and vocab // c >= MIN_CHUNKS), None)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(x, dim=-1)``, exactly: the first index of each row's maximum."""
    length = _chunk_length(x)
    if length is None:
        return x.argmax(-1)
    chunks = x.reshape(-1, x.shape[-1] // length, length)                     # [N, C, L]
    best = chunks.amax(-1).argmax(-1)                                         # the first chunk holding the maximum
    inside = chunks[torch.arange(chunks.shape[0], device=x.device), best].argmax(-1)
    return (best * length + inside).view(x.shape[:-1])


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` of ``torch.topk(x, k, dim=-1)``, largest first; among equal values the indices chosen
    may differ from torch's."""
    length = _chunk_length(x)
    if length is None or k > x.shape[-1] // length:
        top = x.topk(k, dim=-1)
        return top.values, top.indices
    chunks = x.reshape(-1, x.shape[-1] // length, length)                     # [N, C, L]
    rows = torch.arange(chunks.shape[0], device=x.device)[:, None]
    best = chunks.amax(-1).topk(k, dim=-1).indices                            # [N, k]: the chunks that can hold them
    top = chunks[rows, best].reshape(rows.shape[0], -1).topk(k, dim=-1)       # within those k chunks
    index = best.gather(1, top.indices // length) * length + top.indices % length
    shape = (*x.shape[:-1], k)
    return top.values.view(shape), index.view(shape)
