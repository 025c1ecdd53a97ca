"""scripts/gpu_check.sh --dry-run: the GPU check's CPU version (tiny shapes) runs end to end, every check passes and
the JSON and markdown hold what the GPU run must report."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ([f"runtime_vs_transformers_{a}" for a in ("llama", "qwen2", "mistral")]
          + [f"greedy_{a}_{k}_{t}" for a in ("llama", "qwen2") for k in ("clover2", "eagle")
             for t in ("mc_sim_7b_63", "dynamic", "auto")]
          + ["ge_data", "train_bf16_clover2", "train_bf16_eagle", "sampling_clover2", "sampling_eagle"])


def test_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_CHECK_OUT")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "gpu_check on cpu" in proc.stdout and "torch" in proc.stdout  # the environment line comes first

    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["device"] == "cpu" and report["all_passed"] is True
    env_keys = {"date_utc", "device", "torch", "torch_cuda", "transformers", "accelerate", "gpu_name", "driver"}
    assert env_keys <= report["environment"].keys()
    names = [c["name"] for c in report["checks"]]
    assert names == CHECKS
    failed = [(c["name"], c["error"]) for c in report["checks"] if not c["passed"]]
    assert not failed
    assert report["checks_passed"] == report["checks_total"] == len(CHECKS)
    by_name = {c["name"]: c["details"] for c in report["checks"]}
    rt = by_name["runtime_vs_transformers_qwen2"]
    assert {f"{d}_{p}" for d in ("fp32", "bf16") for p in ("prefill", "steps", "tree")} == rt.keys()
    assert rt["bf16_tree"]["max_abs_err"] <= rt["bf16_tree"]["limit"]
    sampling = by_name["sampling_clover2"]
    assert sampling["runs"] >= 200 and sampling["chi2"] < sampling["critical"]
    assert by_name["train_bf16_clover2"]["step"] == 1 and by_name["ge_data"]["conversations"] == 12

    bench = report["bench"]
    assert report["bench_ok"] and bench["shape"]["hidden_size"] == 64 and bench["dtype"] == "float32"
    decode = bench["decode"]
    assert decode["clover_tokens_per_s"] > 0 and decode["transformers_tokens_per_s"] > 0
    assert list(bench["forward"]["ms"]) == ["1", "4", "8", "16", "26", "32", "64", "128"]
    for kind in ("clover2", "eagle"):
        costs = bench["drafts"][kind]
        for key in ("start_1", "start_4", "level_4", "level_8", "level_8_without_lm_head"):
            assert costs[key]["median_s"] > 0, (kind, key)
    assert "cuda_graphs" in bench

    md = (out / "gpu_check.md").read_text()
    assert "| ge_data | pass |" in md and "transformers `generate`" in md and "| 128 |" in md


def test_report_fails_checks_that_never_finished(tmp_path):
    """A checks part stopped by its time limit leaves checks.json with fewer results than planned: the report counts
    the missing ones as failed (and a missing bench.json as a failed benchmark)."""
    import sys

    planned = ["runtime_vs_transformers_llama", "ge_data"]
    done = [{"name": planned[0], "passed": True, "seconds": 1.0, "details": {}, "error": None}]
    (tmp_path / "checks.json").write_text(json.dumps({"part": "checks", "planned": planned, "checks": done}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "scripts")])}
    proc = subprocess.run([sys.executable, "-m", "gpu_check", "report", "--out", str(tmp_path), "--dry-run"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1, proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["all_passed"] is False and report["checks_passed"] == 1 and report["checks_total"] == 2
    assert report["checks"][1]["name"] == "ge_data" and "not run" in report["checks"][1]["error"]
    assert report["bench_ok"] is False and "bench.json missing" in report["bench_error"]
    proc = subprocess.run([sys.executable, "-m", "gpu_check", "report", "--out", str(tmp_path), "--dry-run",
                           "--parts", "bench"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1  # only the benchmark was asked for, and it is missing
