"""The drafts shipped with the library (``clover/drafts/<name>/``): each loads by its name wherever ``--draft`` is
taken, fits the size limit, records how it was trained, and keeps the acceptance it was shipped with, so that a change
that silently breaks drafting or verification fails here (``scripts/ship_draft.py`` measures the floor)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from clover.errors import CloverError
from clover.evaluation.compare import draft_checkpoints, draft_method, label, run_comparison, split_tag
from clover.evaluation.tau_spe import measure_tau
from clover.model.checkpoint import RECORD_NAME, WEIGHTS_NAME, read_draft_config, resolve_draft, shipped_drafts

SHIPPED = shipped_drafts()
NAMES = {"clover2": "clover2-smollm2-135m-instruct", "eagle": "eagle-smollm2-135m-instruct"}
MAX_BYTES = 25 * 2**20


def test_a_clover2_and_an_eagle_draft_are_shipped_for_the_embedded_model():
    assert set(NAMES.values()) <= set(SHIPPED)
    for draft_type, name in NAMES.items():
        config = read_draft_config(name)
        assert config["draft_type"] == draft_type and config["base"]["name_or_path"] == "smollm2-135m-instruct"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_size_dtype_and_training_record(name):
    folder = SHIPPED[name]
    assert (folder / WEIGHTS_NAME).stat().st_size <= MAX_BYTES
    weights = load_file(str(folder / WEIGHTS_NAME))
    assert all(t.dtype == torch.bfloat16 for t in weights.values() if t.is_floating_point())
    record = json.loads((folder / RECORD_NAME).read_text())
    assert record["name"] == name and record["draft_type"] == read_draft_config(name)["draft_type"]
    training = record["training"]
    assert training["tokens"] > 0 and training["training_hours"] > 0 and training["command"]
    assert training["machine"]["cpu"] and len(training["held_out_curve"]) >= 2
    assert f"--init-draft {name}" in record["continue_training"]
    floor = record["acceptance_floor"]
    assert 1.0 < floor["floor"] <= floor["tau"]


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_acceptance_stays_above_the_shipped_floor(name, tmp_path):
    record = json.loads((SHIPPED[name] / RECORD_NAME).read_text())
    floor = record["acceptance_floor"]
    tau = measure_tau(floor["method"], name, tmp_path / "answers.jsonl", base_model=record["base_model"],
                      question_end=floor["question_end"], max_new_tokens=floor["max_new_tokens"], tree=floor["tree"])
    assert tau >= floor["floor"], f"{name}: τ {tau:.3f} fell below its floor {floor['floor']} (shipped at " \
                                  f"{floor['tau']})"


def test_a_local_folder_wins_over_a_shipped_name(tmp_path, monkeypatch):
    name = NAMES["clover2"]
    assert resolve_draft(name) == SHIPPED[name]
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).mkdir()
    assert resolve_draft(name).resolve() == (tmp_path / name).resolve()
    with pytest.raises(CloverError, match="neither a checkpoint folder nor a shipped draft.*clover2-smollm2"):
        resolve_draft("clover3-smollm2")


def test_compare_takes_a_second_draft_of_a_type_under_a_tagged_method(tmp_path):
    """The main job compares the drafts it trains with the shipped ones: the second Clover-2 draft is
    ``clover@<name>``, and its answers are its own."""
    keys = draft_checkpoints([SHIPPED[NAMES["eagle"]], NAMES["clover2"], NAMES["eagle"]])
    assert keys == {"eagle": str(SHIPPED[NAMES["eagle"]]), "clover": NAMES["clover2"],
                    f"eagle@{NAMES['eagle']}": NAMES["eagle"]}
    tagged = f"clover@{NAMES['clover2']}+lookup"
    assert split_tag(tagged) == ("clover+lookup", NAMES["clover2"])
    assert draft_method(tagged) == f"clover@{NAMES['clover2']}" and draft_method("lookup") is None
    assert label(tagged) == f"Clover-2 ({NAMES['clover2']}) + lookup"
    with pytest.raises(CloverError, match="at most one draft"):
        split_tag("clover@a+eagle@b")
    trained = SHIPPED[NAMES["clover2"]]  # stands in for a trained draft of the same type
    results = run_comparison(tmp_path / "cmp", drafts=[trained, NAMES["clover2"]], question_end=1, max_new_tokens=16,
                             methods=["baseline", "clover", f"clover@{NAMES['clover2']}"], tree="mc_sim_7b_63",
                             dtype="fp32", warmup=0, progress=False)
    rows = results["methods"]
    assert rows[f"clover@{NAMES['clover2']}"]["identical_to_plain"] == 1
    assert rows["clover"]["tau"]["overall"]["tau"] == rows[f"clover@{NAMES['clover2']}"]["tau"]["overall"]["tau"]
    assert (tmp_path / "cmp" / "answers" / f"clover@{NAMES['clover2']}.jsonl").is_file()


def test_the_command_line_and_the_server_load_a_shipped_draft_by_name():
    from clover.serve.engine import Engine

    out = subprocess.run([sys.executable, "-m", "clover", "generate", "--draft", NAMES["eagle"], "--max-new-tokens",
                          "8", "--max-len", "256", "--prompt", "Say hello."], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    engine = Engine.load("smollm2-135m-instruct", [NAMES["clover2"]], max_len=256)
    assert "Clover-2 draft" in engine.description
