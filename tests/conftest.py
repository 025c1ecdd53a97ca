"""Shared fixtures: tiny random Llama-family checkpoints built with transformers, and the embedded SmolLM2."""
from __future__ import annotations

import os

import pytest
import torch

SMOLLM2 = "smollm2-135m-instruct"


def save_tiny(folder, arch: str, **overrides):
    """Save a tiny random HF checkpoint of ``arch`` (llama | mistral | qwen2) into ``folder``."""
    import transformers

    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    kwargs = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rope_theta=5e5, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(overrides)
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**kwargs)).eval()
    with torch.no_grad():  # random biases so that Qwen2's qkv bias matters
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=["llama", "mistral", "qwen2"])
def tiny_dir(request, tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def smollm2_base():
    from clover.model.base import BaseModel

    return BaseModel.from_pretrained(SMOLLM2, dtype="fp32", max_len=2048)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from clover.model.loading import load_tokenizer

    return load_tokenizer(SMOLLM2)


SINGLE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # for the tests' subprocesses


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module's tests (they start subprocesses that want the other core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

