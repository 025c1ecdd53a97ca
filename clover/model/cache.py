"""KV caches: the batch-1 cache of speculative decoding (append, commit the accepted tree path, roll back) and the
ragged cache of batched decoding (rows of different lengths), plus the attention mask of a forward pass."""
from __future__ import annotations

import numpy as np
import torch

from clover.errors import CloverError


class KVCache:
    """Preallocated keys/values ``[layers, B, kv_heads, capacity, head_dim]`` with a host-side length.

    ``forward`` passes append at ``length``; :meth:`commit` keeps a subset of the positions just appended (the
    accepted tree path) by gathering them to a contiguous run; :meth:`truncate` rolls back; :meth:`reset` empties it.
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (layers, batch, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def commit(self, start: int, keep: torch.Tensor) -> None:
        """Keep the appended positions ``start + keep`` (offsets, ascending) at ``start, start+1, ...``."""
        n = keep.numel()
        src = keep.to(self.k.device) + start
        self.k[:, :, :, start:start + n] = self.k.index_select(3, src)
        self.v[:, :, :, start:start + n] = self.v.index_select(3, src)
        self.length = start + n

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def reset(self) -> None:
        self.length = 0


class RaggedKVCache:
    """Keys/values of ``B`` independent sequences of different lengths, for batched decoding.

    ``k``, ``v``: ``[layers, B, kv_heads, capacity + 1, head_dim]``. Row ``b`` holds its ``lengths[b]`` tokens
    left-aligned, slot ``s`` holding the token written ``s``-th (at position ``s`` unless a pass gives positions), so
    the key mask of a pass is ``slot <= lengths[b] + i`` for its ``i``-th new token: slots past a row's length are
    never attended to and nothing ever needs clearing. The extra last slot is a sink for the keys/values of padding.
    ``lengths [B]`` (int64) lives on the cache's device; ``bounds`` (host numpy ``[B]``) are upper bounds of it that
    size the attention span of a pass (the longest row) without waiting for the device.

    A pass is :meth:`begin` (positions, key mask, write slots), one :meth:`write` per layer (called by
    :class:`Attention` exactly as :meth:`KVCache.write`) and :meth:`end` (the lengths move on).
    """

    def __init__(self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (layers, batch, kv_heads, capacity + 1, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.bounds = np.zeros(batch, dtype=np.int64)
        self._pass: dict | None = None

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def _rows(self, rows) -> slice:
        if rows is None:
            return slice(0, self.batch)
        if isinstance(rows, slice):
            return slice(*rows.indices(self.batch)[:2])
        if not 0 <= rows < self.batch:
            raise IndexError(f"row {rows} of a cache of {self.batch} rows")
        return slice(int(rows), int(rows) + 1)

    def begin(self, n_tokens: int, n_new=None, rows=None, position_ids: torch.Tensor | None = None,
              tree_mask: torch.Tensor | None = None,
              past_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepare a pass that appends ``T = n_tokens`` tokens to each of ``rows`` (None: all; an int or a slice).

        ``n_new``: how many of each row's ``T`` tokens are real, the rest being padding after them: None (all),
        host integers (a sequence or numpy array ``[R]``: the bounds stay exact) or a device tensor ``[R]`` (the
        bounds grow by ``T``). Returns ``positions [R, T]`` (``position_ids``, else ``lengths + arange(T)``) and the
        additive key mask ``[R, 1, T, S]`` (0 = attend, -inf = not) over the first ``S`` slots: a real token sees
        its row's cache and the real tokens before it or, with ``tree_mask`` (``[T, T]`` or ``[R, T, T]``, True =
        attend, which must not let real tokens see padding), the new tokens it allows. ``past_mask`` (``[R, T, P]``,
        with ``tree_mask`` only) narrows what the new tokens see of the last ``P`` cached slots of each row (the
        nodes of a tree drafted earlier; the slots before them are seen).
        """
        rs = self._rows(rows)
        r, t, dev = rs.stop - rs.start, n_tokens, self.lengths.device
        lo = self.lengths[rs]
        if n_new is None:
            host_new, dev_new = np.full(r, t, dtype=np.int64), None
        elif isinstance(n_new, torch.Tensor):
            host_new, dev_new = None, n_new.to(device=dev, dtype=torch.long)
        else:
            host_new = np.asarray(n_new, dtype=np.int64).reshape(r)
            dev_new = torch.from_numpy(host_new).to(dev) if (host_new != t).any() else None
        bounds = self.bounds[rs] + (t if host_new is None else host_new)
        if bounds.max(initial=0) > self.capacity:
            ends = lo + (t if dev_new is None else dev_new)
            if bool((ends > self.capacity).any()):  # the bounds can be loose: ask the device (only near the end)
                raise CloverError(f"a row of {int(ends.max())} tokens exceeds the cache capacity of "
                                  f"{self.capacity}")
            bounds = np.minimum(bounds, self.capacity)
        span = max(int(bounds.max(initial=0)), 1)
        offsets = torch.arange(t, device=dev)
        slots = lo[:, None] + offsets  # [R, T]
        if position_ids is None:
            positions = slots.clamp(max=self.capacity - 1)  # padding past the capacity reads a real table row
        else:
            positions = position_ids.to(dev).expand(r, t)
        if dev_new is not None:
            slots = torch.where(offsets < dev_new[:, None], slots, self.capacity)  # padding -> the sink slot
        keys = torch.arange(span, device=dev)
        if tree_mask is None:
            mask = keys <= (lo[:, None] + offsets)[:, :, None]  # [R, T, S]
        else:
            rel = keys - lo[:, None, None]  # [R, 1, S]: the key's index among the new tokens (< 0: cached)
            local = tree_mask.to(device=dev, dtype=torch.bool).expand(r, t, t)
            seen = local.gather(2, rel.clamp(0, t - 1).expand(r, t, span))
            cached = rel < 0
            if past_mask is not None:
                p = past_mask.shape[-1]
                old = past_mask.to(device=dev, dtype=torch.bool).expand(r, t, p)
                cached = (rel < -p) | (cached & old.gather(2, (rel + p).clamp(0, p - 1).expand(r, t, span)))
            mask = cached | (seen & (rel >= 0) & (rel < t))
        split = None
        if t == 1 and tree_mask is None and host_new is not None:
            split = _split_plan(bounds, span, dev)
        self._pass = {"rows": rs, "slots": slots, "span": span, "bounds": bounds, "new": dev_new, "t": t,
                      "index": torch.arange(r, device=dev)[:, None], "split": split}
        return positions, additive_mask(mask, self.k.dtype)[:, None]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a layer's new ``k``, ``v`` ``[R, kv, T, d]`` at the pass's slots (``start`` is unused); return the
        row's keys/values ``[R, kv, S, d]``."""
        p = self._pass
        kb, vb = self.k[layer, p["rows"]], self.v[layer, p["rows"]]
        kb[p["index"], :, p["slots"]] = k.transpose(1, 2)
        vb[p["index"], :, p["slots"]] = v.transpose(1, 2)
        return kb[:, :, :p["span"]], vb[:, :, :p["span"]]

    def decode_split(self) -> tuple[int, torch.Tensor] | None:
        """During a one-token pass: ``(short, long_rows)`` when the rows' lengths are so uneven that attention is
        cheaper in two parts, else None. Every row attends over the first ``short`` slots (enough for all rows but
        ``long_rows``), then the rows ``long_rows`` (a device index) alone over the whole span, and their results
        replace those of the first part. Without it every row reads keys/values up to the longest row's length."""
        return self._pass["split"]

    def end(self) -> None:
        """Finish the pass: each row's length grows by its real tokens."""
        p, self._pass = self._pass, None
        self.lengths[p["rows"]] += p["t"] if p["new"] is None else p["new"]
        self.bounds[p["rows"]] = p["bounds"]

    def last_new(self) -> torch.Tensor | None:
        """During a pass, each row's number of real tokens minus one (None when every row has all ``T``)."""
        return None if self._pass["new"] is None else (self._pass["new"] - 1).clamp(min=0)

    def commit_rows(self, starts: np.ndarray, keep: torch.Tensor, counts: np.ndarray, rows=None) -> None:
        """After a pass appended tokens to ``rows`` (None: all; an int or a slice) from their lengths ``starts``
        (host ``[R]``), keep in row ``r`` the first ``counts[r]`` offsets of ``keep [R, K]`` (ascending; the rest of
        the row is ignored) at slots ``starts[r], starts[r] + 1, ...`` and drop every other appended token (the
        rejected nodes of each row's tree). Every layer, every row, one gather and one scatter."""
        rs = self._rows(rows)
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        counts = np.asarray(counts, dtype=np.int64).reshape(-1)
        dev = self.lengths.device
        k = keep.shape[1]
        lo = torch.from_numpy(starts).to(dev)[:, None]
        used = torch.arange(k, device=dev) < torch.from_numpy(counts).to(dev)[:, None]
        src = torch.where(used, lo + keep.to(dev), self.capacity)  # unused entries read and write the sink slot
        dst = torch.where(used, lo + torch.arange(k, device=dev), self.capacity)
        index = torch.arange(rs.stop - rs.start, device=dev)[:, None]
        for cache in (self.k, self.v):
            block = cache[:, rs]  # a view: [L, R, kv, S, d]
            block[:, index, :, dst] = block[:, index, :, src]
        self.lengths[rs] = torch.from_numpy(starts + counts).to(dev)
        self.bounds[rs] = starts + counts

    def reset_rows(self, rows=None) -> None:
        self.truncate_rows(rows, 0)

    def truncate_rows(self, rows, length) -> None:
        """Set the length of ``rows`` (None, an int or a slice) to ``length`` (one for all, or host integers
        ``[R]``, one per row); at most their current length."""
        rs = self._rows(rows)
        length = np.asarray(length, dtype=np.int64)
        if (length < 0).any():
            raise ValueError(f"cannot truncate a row to {length.min()} tokens")
        self.lengths[rs] = torch.minimum(self.lengths[rs], torch.from_numpy(length).to(self.lengths.device))
        self.bounds[rs] = np.minimum(self.bounds[rs], length)

    def move_row(self, src: int, dst: int) -> None:
        """Row ``dst`` takes over row ``src``'s cached tokens and length; ``src`` is left empty."""
        n = int(self.bounds[src])
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst], self.bounds[dst] = self.lengths[src], n
        self.lengths[src], self.bounds[src] = 0, 0

    def select_rows(self, index) -> None:
        """Keep only the rows ``index`` (host integers, in that order): the batch shrinks to ``len(index)``."""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64), device=self.lengths.device)
        self.k, self.v = self.k.index_select(1, idx), self.v.index_select(1, idx)
        self.lengths = self.lengths.index_select(0, idx)
        self.bounds = self.bounds[np.asarray(index, dtype=np.int64)]


# attention of a one-token pass costs about (rows x slots read); splitting it copies the long rows' keys/values
# (read + write, then read again: 3 reads each) and costs a few more ops per layer, worth SPLIT_OVERHEAD slots
SPLIT_OVERHEAD = 512


def _split_plan(bounds: np.ndarray, span: int, device) -> tuple[int, torch.Tensor] | None:
    """The cheapest ``(short, long_rows)`` split of a one-token pass whose rows need at most ``bounds`` slots each
    (None: one part over ``span`` slots is cheapest)."""
    r = bounds.size
    if r < 2:
        return None
    need = np.sort(bounds)
    # cutting after the k shortest rows: every row reads need[k-1] slots, the r-k others copy and read the span
    k = np.arange(1, r)
    cost = r * np.maximum(need[k - 1], 1) + 3 * (r - k) * span + SPLIT_OVERHEAD
    best = int(np.argmin(cost))
    if cost[best] >= r * span:
        return None
    short = max(int(need[best]), 1)
    long_rows = np.flatnonzero(bounds > short)
    return short, torch.from_numpy(long_rows).to(device)


def attention_mask(past: int, tree_mask: torch.Tensor | None, n_new: int, device) -> torch.Tensor | str | None:
    """Boolean ``[T, past+T]`` mask (True = attend): the whole cache, then causal or tree attention among the new
    tokens. ``None`` means "attend to everything" (a single new token without a tree), ``"causal"`` a plain causal
    block on an empty cache (lets SDPA use its causal kernel)."""
    if tree_mask is None and n_new == 1:
        return None
    if tree_mask is None and past == 0:
        return "causal"
    local = tree_mask.to(device=device, dtype=torch.bool) if tree_mask is not None else torch.ones(
        n_new, n_new, dtype=torch.bool, device=device).tril_()
    if past == 0:
        return local
    return torch.cat([torch.ones(n_new, past, dtype=torch.bool, device=device), local], dim=1)


def additive_mask(mask, dtype: torch.dtype):
    """A boolean mask (True = attend) as the additive one SDPA uses (0 / -inf, in ``dtype``), made once per pass
    rather than converted by SDPA in every layer; ``None`` and ``"causal"`` pass through."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
