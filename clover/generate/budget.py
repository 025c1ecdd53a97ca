"""The verification cost curve of a base model on this device: seconds for one forward of ``s`` tokens over a
cached prefix, measured once per (model, dtype, device) and cached on disk. The dynamic tree uses it to pick, each
step, the node budget that maximises expected tokens per second."""
from __future__ import annotations

import hashlib
import json

import torch

from clover.io import device_timer, write_json
from clover.model.base import BaseModel
from clover.model.kernels import few_rows_choice, one_row_kernel
from clover.model.loading import cache_dir

SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
RUNTIME_VERSION = 6  # bump when the runtime's kernels change, so that cached curves are measured again


def measure_cost_curve(base: BaseModel, sizes=SIZES, prefix: int = 256, repeats: int = 5) -> dict[int, float]:
    """Median seconds of a tree-masked forward of each size after a ``prefix``-token cache (cache restored), and for
    one token the plain decoding step that speculative decoding runs then (no mask: the compiled token graph under
    ``--compile``); a short context window shortens the prefix and drops the sizes that do not fit."""
    prefix = min(prefix, base.max_len // 2)
    sizes = [s for s in sizes if prefix + s <= base.max_len]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.args.vocab_size, (1, prefix + max(sizes)), generator=gen).to(base.device)
    base.reset()
    base(ids[:, :prefix], logits_to_keep=0)
    curve = {}
    for s in sizes:
        mask = torch.ones(s, s, dtype=torch.bool, device=base.device).tril()
        times = []
        for _ in range(repeats + 1):
            base.truncate(prefix)
            with device_timer(base.device) as timer:
                base(ids[:, prefix:prefix + s], tree_mask=None if s == 1 else mask)
            times.append(timer.seconds)
        curve[s] = sorted(times[1:])[repeats // 2]
    base.reset()
    return curve


def measure_batched_cost_curve(base: BaseModel, batch: int, sizes=SIZES, prefix: int = 256, repeats: int = 3,
                               max_tokens: int = 512) -> dict[int, float]:
    """Median seconds per row of a batched forward of ``batch`` rows, ``s`` tree-masked tokens each, after a
    ``prefix``-token cache per row; sizes past ``max_tokens`` tokens in all are not measured (the cost grows
    linearly there: :func:`_interpolate` extends the last two points)."""
    prefix = min(prefix, base.max_len // 2)
    sizes = [s for s in sizes if prefix + s <= base.max_len and (s == sizes[0] or batch * s <= max_tokens)]
    cache = base.batch_cache(batch, prefix + max(sizes))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.args.vocab_size, (batch, prefix + max(sizes)), generator=gen).to(base.device)
    base.forward_batch(ids[:, :prefix], cache, logits_to_keep=0)
    curve = {}
    for s in sizes:
        mask = torch.ones(s, s, dtype=torch.bool, device=base.device).tril()
        positions = torch.arange(prefix, prefix + s, device=base.device)
        times = []
        for _ in range(repeats + 1):
            with device_timer(base.device) as timer:
                if s == 1:
                    base.forward_batch(ids[:, prefix:prefix + 1], cache, logits_to_keep=None)
                else:
                    base.forward_batch(ids[:, prefix:prefix + s], cache, position_ids=positions, tree_mask=mask,
                                       logits_to_keep=None)
            cache.truncate_rows(None, prefix)
            times.append(timer.seconds / batch)
        curve[s] = sorted(times[1:])[repeats // 2]
    return curve


def _curve_key(base: BaseModel) -> str:
    chosen = (f"|one-row {one_row_kernel()}|few-rows {few_rows_choice()}"  # the kernels measured for this machine
              if base.device.type == "cpu" and base.dtype == torch.float32 else "")  # (fp32 CPU products only)
    return (f"{getattr(base, 'folder', base.name_or_path)}|{base.dtype}|{base.device}|{torch.get_num_threads()}|"
            f"v{RUNTIME_VERSION}{'|compiled' if base.compiled_decode is not None else ''}{chosen}")


def _cached_curve(key: str, measure) -> dict[int, float]:
    """The curve stored under ``$CLOVER_CACHE/cost_curves`` for ``key``, else ``measure()`` stored there."""
    path = cache_dir() / "cost_curves" / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return {int(k): v for k, v in stored["curve"].items()}
    curve = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"key": key, "curve": curve}, indent=None)
    return curve


def verification_cost(base: BaseModel, max_size: int = 64) -> torch.Tensor:
    """``cost[s]`` = seconds to verify ``s`` tokens, for s = 0..max_size (index 0 unused), linearly interpolated
    from the measured curve; the curve is cached under ``$CLOVER_CACHE/cost_curves``."""
    return _interpolate(_cached_curve(_curve_key(base), lambda: measure_cost_curve(base)), max_size)


def batched_verification_cost(base: BaseModel, batch: int, max_size: int = 64) -> torch.Tensor:
    """``cost[s]`` = seconds per row of a batched forward of ``batch`` rows of ``s`` tokens each, s = 0..max_size
    (index 0 unused); batch 1 is :func:`verification_cost`. Measured once per batch size and cached."""
    if batch == 1:
        return verification_cost(base, max_size)
    curve = _cached_curve(f"{_curve_key(base)}|batch {batch}", lambda: measure_batched_cost_curve(base, batch))
    return _interpolate(curve, max_size)


def _interpolate(curve: dict[int, float], max_size: int) -> torch.Tensor:
    """``cost[s]`` for s = 0..max_size from measured points: linear between them, the last slope past the last."""
    xs = torch.tensor(sorted(curve), dtype=torch.float32)
    ys = torch.tensor([curve[int(x)] for x in xs], dtype=torch.float32)
    if len(xs) == 1:
        return torch.full((max_size + 1,), float(ys[0]))
    sizes = torch.arange(max_size + 1, dtype=torch.float32).clamp(min=1)
    idx = torch.searchsorted(xs, sizes).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
    cost = y0 + (y1 - y0) * ((sizes - x0) / (x1 - x0)).clamp(min=0)  # past the last point: its slope goes on
    return torch.where(sizes <= xs[0], ys[0], cost)


def draft_costs(runner, base: BaseModel, rows: int, repeats: int = 5, busy: int | None = None) -> tuple[float, float]:
    """Median seconds of the draft's two calls in a step, measured on a dummy context: ``start`` (feed two newly
    committed positions, propose the root's children) and one further tree level (``expand`` on ``rows`` nodes),
    LM head included. With ``busy``, ``runner`` is a batch runner (:mod:`clover.model.draft_rows`) whose rows
    ``0 .. busy-1`` all draft in each call, and the seconds are per row. The runner is reset afterwards."""
    hidden = torch.zeros(1, 2, base.args.hidden_size, dtype=base.dtype, device=base.device)
    ids = torch.zeros(1, 2, dtype=torch.long, device=base.device)
    parents = torch.zeros(rows, dtype=torch.long, device=base.device)
    level = ids[0, :1].expand(rows)
    if busy is None:
        def start():
            runner.start(hidden, ids)

        def expand():
            runner.expand(parents, level, 1)
        reset, share = runner.reset, 1
    else:
        every = list(range(busy))

        def start():
            runner.start(every, [hidden] * busy, [ids] * busy)

        def expand():
            runner.expand(every, [parents] * busy, [level] * busy, [1] * busy)

        def reset():
            for row in every:
                runner.reset(row)
        share = busy

    def timed(fn):
        with device_timer(base.device) as timer:
            fn()
        return timer.seconds / share

    starts, levels = [], []
    for _ in range(repeats + 1):
        reset()
        starts.append(timed(start))
        levels.append(timed(expand))
    reset()
    return sorted(starts[1:])[repeats // 2], sorted(levels[1:])[repeats // 2]


class DepthPolicy:
    """Chooses how deep to draft at each step of the ``auto`` dynamic tree.

    Draft joint probabilities say nothing about whether a draft is worth its own cost: a level of a draft tree
    costs a draft forward plus an LM-head product (on a small base model that is a third of a base step). The policy
    keeps, per depth ``d``, the observed rate ``p_d`` at which the accepted path reached depth ``d`` when the tree was
    drafted that deep, and picks the depth ``D`` that maximises the expected tokens per second

        D = 0:  1 / verify(1)                                                  (a plain decoding step)
        D ≥ 1:  (1 + Σ_{d ≤ D} p_d) / (verify(n_D) + start_cost + (D - 1) · level_cost)

    where ``n_D`` is the running mean size of trees drafted to depth ``D``. Counts decay every step, so the estimates
    follow the text, and a depth not drafted lately drifts back to its optimistic prior and gets tried again: a weak
    draft costs a few exploratory steps instead of every step. Everything here is host arithmetic on numbers the
    step already has.
    """

    def __init__(self, verify_cost: torch.Tensor, start_cost: float, level_cost: float, max_depth: int,
                 decay: float = 0.95, carry: float = 0.8, prior_weight: float = 2.0):
        self.verify = verify_cost.tolist()
        self.start_cost, self.level_cost, self.max_depth, self.decay = start_cost, level_cost, max_depth, decay
        self.carry, self.prior_weight = carry, prior_weight
        self.reached = [0.0] * (max_depth + 1)
        self.tried = [0.0] * (max_depth + 1)
        # running mean tree size per drafted depth, first guess: a root and two nodes per level
        self.size = [float(min(1 + 2 * d, len(self.verify) - 1)) for d in range(max_depth + 1)]

    def rates(self) -> list[float]:
        """``p_d`` for d = 1..max_depth, non-increasing in d. A depth with few recent observations leans on the prior
        ``carry · p_{d-1}`` (optimistic: a chain that usually reaches depth d-1 is worth trying one deeper)."""
        out, last = [], 1.0
        for d in range(1, self.max_depth + 1):
            w = self.prior_weight
            last = min(last, (self.reached[d] + w * self.carry * last) / (self.tried[d] + w))
            out.append(last)
        return out

    def depth(self) -> int:
        best, best_rate, gain = 0, 1.0 / self.verify[1], 1.0
        for d, p in enumerate(self.rates(), start=1):
            gain += p
            n = min(int(round(self.size[d])), len(self.verify) - 1)
            rate = gain / (self.verify[n] + self.start_cost + (d - 1) * self.level_cost)
            if rate > best_rate:
                best, best_rate = d, rate
        return best

    def adopt(self, other: "DepthPolicy") -> None:
        """Start from what ``other`` (a finished sequence's policy) observed: its acceptance counts and tree sizes."""
        self.reached, self.tried, self.size = list(other.reached), list(other.tried), list(other.size)

    def update(self, depth: int, accepted: int, tree_size: int) -> None:
        """Record a step drafted to ``depth`` (0: a plain step) whose accepted path had ``accepted`` draft tokens
        (bonus excluded)."""
        for d in range(1, self.max_depth + 1):
            self.reached[d] *= self.decay
            self.tried[d] *= self.decay
        for d in range(1, depth + 1):
            self.tried[d] += 1.0
            self.reached[d] += float(accepted >= d)
        if depth:
            self.size[depth] = 0.8 * self.size[depth] + 0.2 * tree_size


class StepModePolicy:
    """Whether a batched step drafts (every row its own tree) or decodes plainly (one token per row, no draft or
    source calls), chosen per size of batch by measured throughput.

    A drafting step pays for more than the verification forward that the cost curves measure: every row's draft
    calls, its sources, its tree selection and its own verdict run one row after another on the host, and the batch's
    forward is as wide as its largest tree. At a large batch that can outweigh everything drafting saves, and
    the per-row depth policies cannot see it. So the decoder measures both kinds of step as they run: per size class
    of the batch (busy rows rounded up to a power of two), a decaying mean of the tokens each kind of step committed
    and the seconds it took, and takes the kind with more tokens per second. Each kind is tried twice in a new class;
    the one not chosen is tried again after ``explore_every`` steps of the class, times the square of how far it is
    behind (at most ``max_spacing`` times), so that a clear loser costs little and a close call is rechecked often.
    """

    def __init__(self, explore_every: int = 16, weight: float = 0.2, max_spacing: int = 8):
        self.explore_every, self.weight, self.max_spacing = explore_every, weight, max_spacing
        self.stats: dict[int, dict] = {}

    def _at(self, busy: int) -> dict:
        size_class = 1 << max(busy - 1, 0).bit_length()  # 1, 2, 4, 8, ...: 5..8 rows share one class
        return self.stats.setdefault(size_class, {"steps": 0, True: [0.0, 0.0, 0, -1], False: [0.0, 0.0, 0, -1]})

    def rate(self, busy: int, draft: bool) -> float | None:
        """Measured tokens per second of drafting (``draft``) or plain steps at ``busy`` rows (None: not tried)."""
        tokens, seconds, count, _ = self._at(busy)[draft]
        return tokens / seconds if count and seconds > 0 else None

    def choose(self, busy: int) -> bool:
        """True: the next step at ``busy`` rows drafts; False: it decodes plainly."""
        at = self._at(busy)
        for draft in (True, False):
            if at[draft][2] < 2:
                return draft
        rates = {draft: self.rate(busy, draft) for draft in (True, False)}
        best = rates[True] >= rates[False]
        behind = rates[best] / max(rates[not best], 1e-9)
        spacing = self.explore_every * min(behind * behind, self.max_spacing)
        return (not best) if at["steps"] - at[not best][3] >= spacing else best

    def record(self, busy: int, draft: bool, tokens: int, seconds: float) -> None:
        """A step at ``busy`` rows, drafting or not, committed ``tokens`` in ``seconds``."""
        at = self._at(busy)
        entry = at[draft]
        w = 1.0 if entry[2] == 0 else self.weight
        entry[0] += w * (tokens - entry[0])
        entry[1] += w * (seconds - entry[1])
        entry[2] += 1
        entry[3] = at["steps"]
        at["steps"] += 1
