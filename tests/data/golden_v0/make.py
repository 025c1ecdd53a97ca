"""Write the golden pre-change checkpoints in this folder (run once, with the clover version named in README.md).

A tiny random Llama base (HF folder), a Clover-2 and an EAGLE-1 draft with perturbed weights, and ``expected``:
the drafts' teacher-forced outputs on fixed inputs and greedy plain / speculative tokens for a fixed prompt.
Tests load these with the current code and demand the same numbers, so a change that silently alters how an
existing checkpoint is read or run fails.

    python tests/data/golden_v0/make.py      # from the repository root
"""
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from clover.generate.speculative import CloverModel, EagleModel
from clover.model.base import BaseModel
from clover.model.checkpoint import init_draft, save_draft

HERE = Path(__file__).resolve().parent


def main() -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rope_theta=1e4, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(HERE / "base", safe_serialization=True)
    base = BaseModel.from_pretrained(HERE / "base", dtype="fp32", max_len=128)
    gen = torch.Generator().manual_seed(1)
    hidden, ids = torch.randn(1, 12, 32, generator=gen) * 20, torch.randint(0, 97, (1, 12), generator=gen)
    prompt = torch.randint(3, 97, (1, 9), generator=gen)
    expected = {"hidden": hidden, "ids": ids, "prompt": prompt}
    for kind, cls in (("clover2", CloverModel), ("eagle", EagleModel)):
        torch.manual_seed(2)
        draft = init_draft(kind, base, **({"num_layers": 1, "num_heads": 3} if kind == "clover2" else {}))
        with torch.no_grad():
            for p in draft.parameters():
                p.add_(0.05 * torch.randn_like(p))
        draft = draft.eval()
        save_draft(draft, HERE / kind)
        with torch.no_grad():
            expected[f"{kind}_train"] = draft.forward_train(hidden, ids).contiguous()
        draft.allocate_cache(base.max_len)
        model = cls(base, draft, tree="dynamic", tree_budget=6)
        expected[f"{kind}_tokens"] = torch.tensor(model.generate(prompt, max_new_tokens=24).tokens)
        expected["plain_tokens"] = torch.tensor(model.generate_plain(prompt, max_new_tokens=24).tokens)
    save_file(expected, str(HERE / "expected.safetensors"))


if __name__ == "__main__":
    main()
