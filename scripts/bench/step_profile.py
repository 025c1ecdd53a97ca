"""Where a speculative step's time goes: base forward (the tree's verification pass), the draft's calls (split into
their matmuls and the rest), the training-free sources' proposals and their learning from the verification, tree
building (merging and sizing), verification, cache commit and everything else (bookkeeping between the calls), for
any :class:`clover.generate.speculative.SpeculativeModel`.

The split is wall-clock (CPU ops run synchronously, so a phase's wall time is its cost); the matmul time of each
phase comes from a second, profiled pass over the same prompts from the same depth-policy state (``torch.profiler``:
the self time of the matmul kernels under the phase, per step). Prefills are left out: a step starts after the
prompt. Host reads are counted as ``aten::_local_scalar_dense`` calls (``.item()``, ``int(tensor)``, indexing with a
0-dim tensor); ``.tolist()`` dispatches no op and is not counted.
Used by ``scripts/bench/speculative.py --breakdown``.
"""
from __future__ import annotations

import copy
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager

from torch.profiler import ProfilerActivity, profile, record_function

import clover.generate.speculative as speculative

MATMUL_OPS = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm", "aten::bmm", "aten::mv", "aten::matmul",
              "aten::linear")
SYNC_OPS = ("aten::_local_scalar_dense",)  # .item(), int(tensor), a 0-dim tensor as an index
PHASES = ("base forward", "draft start", "draft expand", "sources propose", "tree building", "verify", "commit",
          "sources observe")


@contextmanager
def _patched(obj, name, wrapper):
    original = getattr(obj, name)
    setattr(obj, name, wrapper(original))
    try:
        yield
    finally:
        if isinstance(obj, type) or obj is speculative:
            setattr(obj, name, original)
        else:
            delattr(obj, name)  # back to the class attribute


def _instrument(model, timers: dict, counts: dict, labels: bool):
    """Wrap the phases of ``model``'s steps with timers (and profiler ranges when ``labels``)."""
    stack = ExitStack()
    active: list[str] = []  # the phase being timed, innermost last (tree building contains draft expand)

    def timed(label):
        def wrapper(fn):
            def call(*args, **kwargs):
                if label == "base forward" and model.base.cache.length == 0:
                    label_now = "prefill"  # the prompt: not part of a step
                else:
                    label_now = label
                start = time.perf_counter()
                active.append(label_now)
                try:
                    if labels:
                        with record_function(label_now):
                            return fn(*args, **kwargs)
                    return fn(*args, **kwargs)
                finally:
                    active.pop()
                    seconds = time.perf_counter() - start
                    timers[label_now] += seconds
                    counts[label_now] += 1
                    if active:  # a nested phase: not counted twice in its parent
                        timers[active[-1]] -= seconds
            return call
        return wrapper

    stack.enter_context(_patched(model.base, "forward", timed("base forward")))
    stack.enter_context(_patched(model.base, "commit", timed("commit")))
    if model.runner is not None:
        stack.enter_context(_patched(model.runner, "start", timed("draft start")))
        stack.enter_context(_patched(model.runner, "expand", timed("draft expand")))
    for source in model.sources:  # training-free sources: proposing (inside tree building) and learning
        stack.enter_context(_patched(source, "propose", timed("sources propose")))
        stack.enter_context(_patched(source, "observe", timed("sources observe")))
    stack.enter_context(_patched(speculative, "drive", timed("tree building")))
    stack.enter_context(_patched(speculative, "verify_tree", timed("verify")))
    return stack


def _run(model, prompts, max_new_tokens) -> tuple[int, float]:
    tokens, seconds = 0, 0.0
    for ids in prompts:
        result = model.generate(ids, max_new_tokens=max_new_tokens)
        tokens += result.new_tokens
        seconds += result.wall_time
    return tokens, seconds


def _profiled(prof) -> tuple[dict, dict]:
    """Per phase: the self CPU time (µs) of its matmul kernels, and its host syncs, from profiler events."""
    matmul, syncs = defaultdict(float), defaultdict(int)
    for event in prof.events():
        phase, parent = "other", event.cpu_parent
        while parent is not None:
            if parent.name in PHASES or parent.name == "prefill":
                phase = parent.name
                break
            parent = parent.cpu_parent
        if event.name in MATMUL_OPS:
            matmul[phase] += event.self_cpu_time_total
        if event.name in SYNC_OPS:
            syncs[phase] += 1
    return matmul, syncs


def step_breakdown(model, prompts, max_new_tokens: int = 96) -> dict:
    """Run ``prompts`` (token id lists) twice: timed, then profiled. Returns milliseconds per step by phase (with
    ``other`` = the step's time outside every phase), the matmul milliseconds per step of each phase (profiled
    pass), host syncs per step and τ."""
    model.generate(prompts[0], max_new_tokens=8)  # warm-up (and the auto policy's measurements, if any)
    policy = copy.deepcopy(model.depth_policy)  # both passes start from the same acceptance statistics
    timers, counts = defaultdict(float), defaultdict(int)
    with _instrument(model, timers, counts, labels=False):
        tokens, seconds = _run(model, prompts, max_new_tokens)
    steps = counts["base forward"]
    step_seconds = seconds - timers["prefill"]
    per_step = {p: timers[p] / steps * 1000 for p in PHASES}
    per_step["other"] = step_seconds / steps * 1000 - sum(per_step.values())
    profiled_counts = defaultdict(int)
    model.depth_policy = copy.deepcopy(policy)
    with _instrument(model, defaultdict(float), profiled_counts, labels=True), \
            profile(activities=[ProfilerActivity.CPU]) as prof:
        _run(model, prompts, max_new_tokens)
    matmul, syncs = _profiled(prof)
    n = profiled_counts["base forward"]
    return {"steps": steps, "tokens": tokens, "tau": (tokens - len(prompts)) / steps,
            "step_ms": step_seconds / steps * 1000, "per_step_ms": per_step,
            "matmul_ms_per_step": {p: us / 1000 / n for p, us in matmul.items() if p != "prefill"},
            "host_syncs_per_step": {p: k / n for p, k in syncs.items() if p != "prefill"}}
