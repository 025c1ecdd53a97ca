"""scripts/new_trunk.py: a trained Clover-2 draft with a new trunk keeps every other tensor and loads strictly."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from clover.errors import CloverError
from clover.model.base import BaseModel
from clover.model.checkpoint import init_draft, load_draft, save_draft
from tests.conftest import save_tiny

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "new_trunk.py"


def new_trunk_main():
    spec = importlib.util.spec_from_file_location("new_trunk", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("llama"), "llama")


def trained(draft_type: str, base: BaseModel, folder: Path, **overrides) -> Path:
    """A draft moved away from its initialisation (as training would), saved to ``folder``."""
    torch.manual_seed(0)
    vocab = torch.arange(0, 97, 2)[:40] if overrides.get("draft_vocab_size") else None
    draft = init_draft(draft_type, base, draft_vocab=vocab, **overrides)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return save_draft(draft, folder)


def test_a_new_trunk_keeps_the_heads_and_the_draft_vocabulary(base_folder, tmp_path):
    base = BaseModel.from_pretrained(base_folder, dtype="fp32", max_len=64)
    source = trained("clover2", base, tmp_path / "source", draft_vocab_size=40)
    new_trunk_main()([str(source), "--outdir", str(tmp_path / "new")])
    old, new = load_draft(source, base), load_draft(tmp_path / "new", base)  # strict keys
    block = new.config["clover"]
    assert (block["trunk_input"], block["trunk_init"]) == ("normed", "random")
    assert all(block[k] == old.config["clover"][k] for k in ("draft_vocab_size", "num_heads", "num_layers"))
    assert new.token_scale != old.token_scale  # measured again, on the scale of normalised states
    old_state, new_state = old.state_dict(), new.state_dict()
    for name, value in new_state.items():
        if name.startswith("layers.") and name.endswith("proj.weight"):
            assert not torch.equal(value, old_state[name]), name
        elif name == "input_norm.weight":
            assert torch.equal(value, base.model.norm.weight)
        elif not name.startswith("layers."):
            assert torch.equal(value, old_state[name]), name
    assert torch.equal(new.draft_vocab, old.draft_vocab)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = base(ids, logits_to_keep=0, use_cache=False).hidden_prenorm
        assert torch.isfinite(new.forward_train(hidden, ids)).all()


def test_a_new_trunk_needs_a_clover2_source(base_folder, tmp_path):
    base = BaseModel.from_pretrained(base_folder, dtype="fp32", max_len=64)
    source = trained("eagle", base, tmp_path / "eagle")
    with pytest.raises(CloverError, match="clover2|Clover-2"):
        new_trunk_main()([str(source), "--outdir", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()
    assert json.loads((source / "config.json").read_text())["draft_type"] == "eagle"
