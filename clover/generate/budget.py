"""The verification cost curve of a base model on this device: seconds for one forward of ``s`` tokens over a
cached prefix, measured once per (model, dtype, device) and cached on disk. The dynamic tree uses it to pick, each
step, the node budget that maximises expected tokens per second."""
from __future__ import annotations

import hashlib
import json
import os
import time

import torch

from clover.model.base import BaseModel
from clover.model.loading import cache_dir

SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


def measure_cost_curve(base: BaseModel, sizes=SIZES, prefix: int = 256, repeats: int = 5) -> dict[int, float]:
    """Median seconds of a tree-masked forward of each size after a ``prefix``-token cache (cache restored)."""
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
            if base.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            base(ids[:, prefix:prefix + s], tree_mask=mask)
            if base.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        curve[s] = sorted(times[1:])[repeats // 2]
    base.reset()
    return curve


def verification_cost(base: BaseModel, max_size: int = 64) -> torch.Tensor:
    """``cost[s]`` = seconds to verify ``s`` tokens, for s = 0..max_size (index 0 unused), linearly interpolated
    from the measured curve; the curve is cached under ``$CLOVER_CACHE/cost_curves``."""
    key = f"{getattr(base, 'folder', base.name_or_path)}|{base.dtype}|{base.device}|{torch.get_num_threads()}"
    path = cache_dir() / "cost_curves" / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")
    curve = None
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            curve = {int(k): v for k, v in stored["curve"].items()}
    if curve is None:
        curve = measure_cost_curve(base)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "curve": curve}))
        os.replace(tmp, path)
    xs = torch.tensor(sorted(curve), dtype=torch.float32)
    ys = torch.tensor([curve[int(x)] for x in xs], dtype=torch.float32)
    sizes = torch.arange(max_size + 1, dtype=torch.float32).clamp(min=1, max=float(xs[-1]))
    idx = torch.searchsorted(xs, sizes).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
    cost = y0 + (y1 - y0) * ((sizes - x0) / (x1 - x0)).clamp(0, 1)
    return torch.where(sizes <= xs[0], ys[0], cost)
