"""The runtime's CPU matmul kernels: :class:`PrepackedLinear` (oneDNN on a weight packed once) and the choice of
kernel for a one-row product and for products of a few rows (a tree's verification), each measured on the machine
(:func:`one_row_kernel`, :func:`few_rows_kernel`).

Decoding streams every weight once per forward, so its speed is set by how fast a kernel reads weights from memory.
For several rows (tree verification, prefill) oneDNN on a prepacked weight wins everywhere: the default BLAS path
repacks the whole weight on every call. For one row (a token of plain decoding) it depends on the machine: BLAS's
matrix-vector product was the faster on a 2-core Intel Xeon (SmolLM2's chain of matmuls: 29 vs 34 ms), while on a
2-core AMD EPYC (Zen 4) the same product ran at half the memory bandwidth (MKL: 49 ms vs 28 ms for oneDNN). On the
Xeon, BLAS was the faster for 2 rows as well (a 96 MB chain of weights: 4.2-4.6 ms against 4.8-5.0 ms), oneDNN's
packed weight for 8 (9.3 against 13.2-13.7 ms), so products of a few rows are measured too.
"""
from __future__ import annotations

import os
import statistics
import time

import torch
import torch.nn.functional as F

from clover.errors import CloverError

ONE_ROW_ENV = "CLOVER_ONE_ROW_KERNEL"
ONE_ROW_KERNELS = ("gemv", "packed")
_one_row: str | None = None  # resolved once per process by one_row_kernel()
one_row_measured: dict | None = None  # what measure_one_row() found when it made that choice (None: set by the env)
FEW_ROWS_ENV = "CLOVER_FEW_ROWS_KERNEL"
FEW_ROWS_KERNELS = ("blas", "packed")
FEW_ROWS = (2, 32)  # products of this many rows take few_rows_kernel(); more (a prompt) always the packed weight
FEW_ROWS_PROBES = (2, 8)  # rows measured: the first for products of 2-3 rows, the second for 4-32
_few_rows: dict[int, str] | None = None  # probe rows -> kernel, resolved once per process by few_rows_kernel()
few_rows_measured: dict | None = None  # probe rows -> what measure_few_rows() found (None: set by the env)
_bf16_training: bool | None = None  # resolved once per process by bf16_training_pays()
training_measured: dict | None = None  # what measure_training_dtypes() found (None: not measured)


def _env_choice(variable: str, kernels: tuple[str, ...]) -> str:
    """The kernel ``$variable`` names (``auto`` when unset), checked."""
    choice = os.environ.get(variable, "auto").strip().lower() or "auto"
    if choice not in (*kernels, "auto"):
        raise CloverError(f"${variable}={choice!r}: use {', '.join(kernels)} or auto")
    return choice


def one_row_kernel() -> str:
    """The kernel of a one-row fp32 product on this CPU: ``"gemv"`` (BLAS, plain ``F.linear``) or ``"packed"``
    (oneDNN on the prepacked weight). ``$CLOVER_ONE_ROW_KERNEL`` (``gemv``, ``packed`` or ``auto``, the default)
    decides; ``auto`` measures both once per process (~0.4 s) and keeps oneDNN only where it is clearly faster."""
    global _one_row, one_row_measured
    if _one_row is None:
        choice = _env_choice(ONE_ROW_ENV, ONE_ROW_KERNELS)
        if choice == "auto":
            one_row_measured = measure_one_row()
            choice = "packed" if one_row_measured["packed_over_gemv"] < 0.95 else "gemv"
        _one_row = choice
    return _one_row


def few_rows_kernel(rows: int = 8) -> str:
    """The kernel of an fp32 product of ``rows`` rows (2-32) on this CPU: ``"blas"`` (plain ``F.linear``) or
    ``"packed"`` (oneDNN on the prepacked weight). ``$CLOVER_FEW_ROWS_KERNEL`` (``blas``, ``packed`` or ``auto``, the
    default) decides; ``auto`` times both once per process on 2 rows (for 2-3) and on 8 (for 4-32), ~1 s in all, and
    keeps BLAS only where it is clearly faster (on a 2-core Xeon: BLAS for 2 rows, the packed weight for 8)."""
    global _few_rows, few_rows_measured
    if _few_rows is None:
        choice = _env_choice(FEW_ROWS_ENV, FEW_ROWS_KERNELS)
        if choice == "auto":
            few_rows_measured = {n: measure_few_rows(rows=n) for n in FEW_ROWS_PROBES}
            _few_rows = {n: "blas" if m["packed_over_blas"] > 1.05 else "packed" for n, m in few_rows_measured.items()}
        else:
            _few_rows = dict.fromkeys(FEW_ROWS_PROBES, choice)
    return _few_rows[FEW_ROWS_PROBES[0] if rows < 4 else FEW_ROWS_PROBES[1]]


def few_rows_choice() -> str:
    """The few-rows kernels as one string, e.g. ``"2:blas,8:packed"`` (for cache keys and reports)."""
    few_rows_kernel()
    return ",".join(f"{n}:{k}" for n, k in _few_rows.items())


def bf16_training_pays() -> bool:
    """Whether bf16 autocast trains a draft faster than fp32 on this CPU (``--dtype auto`` of the trainer): measured
    once per process (:func:`measure_training_dtypes`, ~1 s) where the CPU computes bf16 natively, and chosen only
    where it is clearly faster (1.2x). On a 2-core Xeon with avx512_bf16 (no AMX in use) fp32 was the faster, 44 vs
    75 ms for a draft-shaped layer's forward and backward; on a 2-core Zen 4 EPYC bf16 was, 0.65x fp32's time."""
    global _bf16_training, training_measured
    if _bf16_training is None:
        _bf16_training = False
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            training_measured = measure_training_dtypes()
            _bf16_training = training_measured["bf16_over_fp32"] < 1 / 1.2
    return _bf16_training


def measure_training_dtypes(rows: int = 2048, hidden: int = 576, rounds: int = 3) -> dict:
    """Forward + backward of a linear layer ``hidden -> 4 * hidden`` on ``rows`` rows (a draft's MLP on a batch of
    conversations), in fp32 and under bf16 autocast, in turn; the medians (ms) and the median per-round ratio."""
    layer = torch.nn.Linear(hidden, 4 * hidden)
    x = torch.randn(rows, hidden)
    times = {"fp32": [], "bf16": []}
    for r in range(rounds + 1):  # the first round warms up both
        for name in times:
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                layer(x).float().square().mean().backward()
            if r:
                times[name].append(time.perf_counter() - start)
    ratio = statistics.median(b / f for b, f in zip(times["bf16"], times["fp32"]))
    return {"fp32_ms": statistics.median(times["fp32"]) * 1e3, "bf16_ms": statistics.median(times["bf16"]) * 1e3,
            "bf16_over_fp32": ratio}


def measure_one_row(megabytes: int = 96, rounds: int = 5) -> dict:
    """Time one row through a chain of fp32 weights larger than the CPU's caches (``megabytes`` in all, streamed as
    a forward streams a model's), with BLAS's matrix-vector product and with oneDNN on the prepacked weights, in
    turn. Returns the medians (ms) and the median of the per-round ratios packed / gemv."""
    blas, packed, ratio = _time_chain(1, megabytes, rounds)
    return {"gemv_ms": blas, "packed_ms": packed, "packed_over_gemv": ratio}


def measure_few_rows(rows: int = 8, megabytes: int = 96, rounds: int = 5) -> dict:
    """:func:`measure_one_row` for ``rows`` rows: BLAS's product (``F.linear``) against oneDNN's on the prepacked
    weights. Returns the medians (ms) and the median of the per-round ratios packed / blas."""
    blas, packed, ratio = _time_chain(rows, megabytes, rounds)
    return {"rows": rows, "blas_ms": blas, "packed_ms": packed, "packed_over_blas": ratio}


@torch.inference_mode()
def _time_chain(n: int, megabytes: int, rounds: int):
    """(BLAS ms, packed ms, median per-round ratio packed / BLAS) for ``n`` rows through the chain of weights."""
    if not torch.backends.mkldnn.is_available():
        return None, None, float("inf")
    rows, cols = 1536, 1024  # 6 MiB a weight, 16 of them by default: far more than a few cores' share of cache
    weights = [torch.rand(rows, cols) - 0.5 for _ in range(max(1, megabytes * 2**20 // (rows * cols * 4)))]
    packed = [_pack(w) for w in weights]
    x = torch.rand(n, cols)
    gemv_s, packed_s = [], []
    for r in range(rounds + 1):  # the first round warms up both
        t0 = time.perf_counter()
        for w in weights:
            F.linear(x, w)
        t1 = time.perf_counter()
        for p in packed:
            packed_matmul(x, p)
        t2 = time.perf_counter()
        if r:
            gemv_s.append(t1 - t0)
            packed_s.append(t2 - t1)
    return (statistics.median(gemv_s) * 1e3, statistics.median(packed_s) * 1e3,
            statistics.median(p / g for p, g in zip(packed_s, gemv_s)))


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8)


def packed_matmul(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` with oneDNN's kernel, ``W`` prepacked by :class:`PrepackedLinear`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class PrepackedLinear:
    """``F.linear(x, weight, bias)`` at inference, with the weight prepacked for the CPU.

    On a CPU in fp32 the weight is reordered once into oneDNN's blocked layout (again only when it changes), so
    verifying a tree of 8 tokens costs ~1.3x one token instead of ~1.7x with the default BLAS path on a Zen 4 EPYC,
    which repacks the whole weight on every call. A single row (one token of batch-1 decoding) takes the kernel
    :func:`one_row_kernel` measured on this machine, 2-32 rows (a tree) the kernel :func:`few_rows_kernel`
    measured (eager forwards; compiled graphs keep the packed weight). Elsewhere (CUDA, half precision, or when
    autograd needs the product) it is plain ``F.linear``. The packed copy costs one more copy of the weight in memory.
    """

    # Inside a compiled graph: call oneDNN's kernel as a graph op (True; clover.model.compiled sets it once it has
    # taught inductor to call that op on a packed weight straight from C++) or through the opaque Python op below
    kernel_in_graph = False

    def __init__(self):
        self._key, self._packed = None, None

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        one_row = x.numel() == x.shape[-1]
        if torch.compiler.is_compiling() and self._packed is not None and (not one_row or _one_row == "packed"):
            # inside a compiled graph (clover.model.compiled): the weight packed by an earlier eager call, which
            # the graph assumes unchanged (the version check below cannot be traced)
            kernel = packed_matmul if PrepackedLinear.kernel_in_graph else torch.ops.clover.packed_linear
            out = kernel(x, self._packed)
        elif (weight.device.type != "cpu" or weight.dtype != torch.float32 or x.dtype != torch.float32
                or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
                or (one_row and one_row_kernel() == "gemv")
                or not torch.backends.mkldnn.is_available()):  # last: a compiled graph cannot trace it
            return F.linear(x, weight, bias)
        else:
            key = (weight.data_ptr(), 0 if weight.is_inference() else weight._version, tuple(weight.shape))
            if key != self._key:  # packed even when BLAS serves this call: compiled graphs use the packed weight
                self._key, self._packed = key, _pack(weight)
            rows = x.numel() // x.shape[-1]
            if FEW_ROWS[0] <= rows <= FEW_ROWS[1] and few_rows_kernel(rows) == "blas":
                return F.linear(x, weight, bias)
            out = packed_matmul(x, self._packed)
        return out if bias is None else out + bias


@torch.library.custom_op("clover::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """:func:`packed_matmul` as an opaque op to a compiled graph (each call goes back to Python: the fallback when
    inductor cannot be taught to call the kernel itself)."""
    return packed_matmul(x, packed)


@packed_linear.register_fake
def _(x, packed):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))
