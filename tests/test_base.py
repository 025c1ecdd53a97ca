"""The base runtime against transformers' own models: logits (prefill, incremental, tree), cache commit, loading
errors."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from clover.errors import CloverError
from clover.model.base import BaseModel
from clover.model.loading import resolve_model_path
from tests.conftest import SMOLLM2, save_tiny

ATOL, RTOL = 2e-4, 1e-5  # fp32 logits vs transformers: oneDNN kernels here, MKL there (30 layers of rounding)


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return bool(((actual - expected).abs() <= ATOL + RTOL * expected.abs()).all())


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids).reshape(1, -1)).logits[0]


def random_tree(n_nodes: int, gen: torch.Generator):
    """Random parent pointers (each node's parent is an earlier node) -> parents, depths, ancestor mask."""
    parents = [0] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n_nodes)]
    depths = [0] * n_nodes
    for i in range(1, n_nodes):
        depths[i] = depths[parents[i]] + 1
    mask = torch.zeros(n_nodes, n_nodes, dtype=torch.bool)
    for i in range(n_nodes):
        j = i
        while True:
            mask[i, j] = True
            if j == 0:
                break
            j = parents[j]
    return parents, torch.tensor(depths), mask


def check_runtime_against_hf(base: BaseModel, ref, vocab: int, prompt_len: int = 20):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (prompt_len + 4,), generator=gen)
    expected = hf_logits(ref, ids)
    base.reset()
    # plain prefill
    out = base(ids[None, :prompt_len])
    assert close(out.logits[0], expected[:prompt_len])
    # pre/post-norm states are consistent with the logits
    post = base.model.norm(out.hidden_prenorm)
    assert torch.allclose(base.logits_head(post, base.lm_head.weight), out.logits, atol=1e-5)
    assert close(out.logits, post @ base.lm_head.weight.T)  # the packed CPU head is a plain matmul
    # incremental decoding, one token at a time
    for t in range(prompt_len, prompt_len + 4):
        step = base(ids[None, t:t + 1])
        assert close(step.logits[0, -1], expected[t])
    # tree forward over the prefix: each node's logits == its root-to-node path fed sequentially
    base.truncate(prompt_len)
    parents, depths, mask = random_tree(9, gen)
    tokens = torch.randint(0, vocab, (9,), generator=gen)
    tree_out = base(tokens[None], position_ids=prompt_len + depths, tree_mask=mask)
    for node in range(9):
        path = [j for j in range(9) if mask[node, j]]  # ancestors in index order == root-to-node order
        seq = torch.cat([ids[:prompt_len], tokens[path]])
        assert close(tree_out.logits[0, node], hf_logits(ref, seq)[-1])
    return tokens, parents, depths, mask


def test_tiny_models_match_transformers(tiny_dir):
    base = BaseModel.from_pretrained(tiny_dir, dtype="fp32", max_len=128)
    check_runtime_against_hf(base, hf_model(tiny_dir), base.args.vocab_size)


def test_llama3_rope_scaling_and_tied_embeddings(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    folder = save_tiny(tmp_path / "m", "llama", rope_scaling=scaling, tie_word_embeddings=True,
                       max_position_embeddings=256)
    base = BaseModel.from_pretrained(folder, dtype="fp32")
    assert base.lm_head.weight is base.model.embed_tokens.weight
    check_runtime_against_hf(base, hf_model(folder), base.args.vocab_size, prompt_len=60)


def test_smollm2_matches_transformers(smollm2_base):
    check_runtime_against_hf(smollm2_base, hf_model(resolve_model_path(SMOLLM2)), smollm2_base.args.vocab_size)


def test_commit_equals_sequential_feeding(tiny_llama_dir):
    base = BaseModel.from_pretrained(tiny_llama_dir, dtype="fp32", max_len=64)
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 97, (1, 10), generator=gen)
    parents, depths, mask = random_tree(12, gen)
    tokens = torch.randint(0, 97, (12,), generator=gen)
    leaf = int(depths.argmax())
    path = torch.tensor([j for j in range(12) if mask[leaf, j]])
    base.reset()
    base(prompt)
    base(tokens[None], position_ids=10 + depths, tree_mask=mask)
    base.commit(10, path)
    assert base.cache.length == 10 + len(path)
    length = base.cache.length
    k_tree, v_tree = base.cache.k[:, :, :, :length].clone(), base.cache.v[:, :, :, :length].clone()
    base.reset()
    base(torch.cat([prompt[0], tokens[path]])[None])
    n = base.cache.length
    assert torch.allclose(k_tree, base.cache.k[:, :, :, :n], atol=1e-6)
    assert torch.allclose(v_tree, base.cache.v[:, :, :, :n], atol=1e-6)
    # and decoding continues identically after truncating a further step away
    nxt = torch.tensor([[5]])
    a = base(nxt).logits
    base.truncate(n)
    assert torch.equal(base(nxt).logits, a)


def test_greedy_matches_transformers_generate(smollm2_base, smollm2_tokenizer):
    """Token-identical greedy decoding vs transformers' generate on 10 Spec-Bench-style prompts x 128 tokens."""
    from clover.data.templates import get_template
    from clover.evaluation.answers import default_question_file, load_questions
    from clover.generate.plain import generate_plain

    ref = hf_model(resolve_model_path(SMOLLM2))
    template = get_template(smollm2_tokenizer)
    questions = load_questions(default_question_file())
    prompts = [q["turns"][0] for q in questions[::2]][:10]
    assert len(prompts) == 10
    for prompt in prompts:
        ids = template.encode_prompt([{"role": "user", "content": prompt}])
        ours = generate_plain(smollm2_base, ids, max_new_tokens=128, stop_token_ids=template.stop_token_ids)
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([ids]), max_new_tokens=128, do_sample=False,
                                  eos_token_id=template.stop_token_ids, pad_token_id=template.stop_token_ids[0])
        assert ours.tokens == theirs[0, len(ids):].tolist(), prompt


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "clover.cli", *args], capture_output=True, text=True, timeout=300)


def assert_one_error_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_bad_inputs_give_one_clear_error(tmp_path, tiny_llama_dir):
    assert_one_error_line(run_cli("generate", "--model", "no-such-model", "--prompt", "hi"), "unknown model")
    (tmp_path / "empty").mkdir()
    assert_one_error_line(run_cli("generate", "--model", str(tmp_path / "empty"), "--prompt", "hi"),
                          "no config.json")
    # a truncated safetensors file
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_llama_dir.iterdir():
        data = f.read_bytes()
        (broken / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    with pytest.raises(CloverError, match="truncated or corrupt"):
        BaseModel.from_pretrained(broken)
    # a corrupt GGUF file
    gguf = tmp_path / "bad.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    assert_one_error_line(run_cli("generate", "--model", str(gguf), "--prompt", "hi"), "GGUF")
    # unsupported architecture
    import json

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert_one_error_line(run_cli("generate", "--model", str(odd), "--prompt", "hi"), "GPT2LMHeadModel",
                          "LlamaForCausalLM")


def test_prompt_and_length_errors(smollm2_base):
    from clover.generate.plain import generate_plain

    with pytest.raises(CloverError, match="context window"):
        generate_plain(smollm2_base, list(range(3000)), max_new_tokens=4)
    with pytest.raises(CloverError, match="empty prompt"):
        generate_plain(smollm2_base, [], max_new_tokens=4)
    with pytest.raises(CloverError, match="max_new_tokens"):
        generate_plain(smollm2_base, [1, 2, 3], max_new_tokens=0)
    assert_one_error_line(run_cli("generate", "--prompt", "hi", "--max-new-tokens", "0"), "--max-new-tokens")
