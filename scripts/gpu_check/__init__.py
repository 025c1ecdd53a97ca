"""The GPU check: the CUDA path of clover tested and measured in one run (``bash scripts/gpu_check.sh``).

Two parts, each run in its own process by ``scripts/gpu_check.sh`` so that a crash in one leaves the other's
results: ``checks`` (correctness on the device, :mod:`gpu_check.checks`) and ``bench`` (timings at Vicuna-7B's shape
with random weights, :mod:`gpu_check.bench`); ``report`` merges both into ``gpu_check.json`` and ``gpu_check.md``.
``--dry-run`` runs everything on the CPU with tiny shapes (what CI runs, tests/test_gpu_check.py).
"""
