"""The compiled decoding forwards (torch.compile): the same logits, keys/values and greedy tokens as the eager
forward, one graph for every cache length and tree size, every other forward left eager."""
from __future__ import annotations

import shutil

import pytest
import torch

from clover.generate.plain import generate_plain
from clover.model.base import BaseModel
from conftest import save_tiny

pytestmark = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                reason="torch.compile on the CPU needs a C++ compiler")


@pytest.mark.parametrize("arch,routed,one_row", [
    ("llama", True, "gemv"), ("qwen2", True, "gemv"),  # qwen2: q/k/v biases
    ("llama", True, "packed"),  # a one-token step on the prepacked weights (the machine's measured choice)
    ("llama", False, "packed")])  # the opaque Python op, where inductor can't be taught
def test_compiled_step_equals_eager(tmp_path, monkeypatch, arch, routed, one_row):
    from clover.model import compiled as compiled_module
    from clover.model import kernels
    from clover.model.kernels import PrepackedLinear

    monkeypatch.setattr(PrepackedLinear, "kernel_in_graph", PrepackedLinear.kernel_in_graph)  # restored after
    monkeypatch.setattr(kernels, "_one_row", one_row)
    if not routed:
        monkeypatch.setattr(compiled_module, "_kernels_routed", False)
    folder = save_tiny(tmp_path / arch, arch, num_hidden_layers=2)
    eager = BaseModel.from_pretrained(folder, dtype="fp32", max_len=64)
    compiled = BaseModel.from_pretrained(folder, dtype="fp32", max_len=64)
    compiled.compile_decode()  # compiles both graphs now, on a 2-token cache
    # on the torch this project tests with, the graphs call oneDNN's kernel from C++, no Python op per matmul
    assert PrepackedLinear.kernel_in_graph is routed
    prompt = torch.tensor([[1, 5, 9, 33, 7]])
    for model in (eager, compiled):
        model.reset()
        model(prompt)
    with torch._dynamo.config.patch(error_on_recompile=True):  # one graph each for every length and tree size
        _decode_and_compare(eager, compiled)


def _tree(n: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random tree of ``n`` nodes in topological order: (depths, ancestor-or-self mask)."""
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=generator)) for i in range(1, n)]
    mask = torch.eye(n, dtype=torch.bool)
    depths = torch.zeros(n, dtype=torch.long)
    for i in range(1, n):
        mask[i] |= mask[parents[i]]
        depths[i] = depths[parents[i]] + 1
    return depths, mask


def _decode_and_compare(eager, compiled):
    for step in range(20):  # cache lengths 5..24
        token = torch.tensor([[(7 * step + 3) % 97]])
        a, b = eager(token), compiled(token)
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.hidden_prenorm, a.hidden_prenorm, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled.cache.k[:, :, :, :6 + step], eager.cache.k[:, :, :, :6 + step])
        torch.testing.assert_close(compiled.cache.v[:, :, :, :6 + step], eager.cache.v[:, :, :, :6 + step])
    assert compiled.compiled_decode.calls == 2 + 20  # the warm-up's two graphs and every step above

    generator = torch.Generator().manual_seed(0)
    for n in (2, 5, 3, 8, 4):  # trees of several sizes after a growing cache, verified and committed
        depths, mask = _tree(n, generator)
        tokens = torch.randint(0, 97, (1, n), generator=generator)
        past = eager.cache.length
        a, b = (m(tokens, position_ids=past + depths, tree_mask=mask) for m in (eager, compiled))
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled.cache.k[:, :, :, :past + n], eager.cache.k[:, :, :, :past + n])
        torch.testing.assert_close(compiled.cache.v[:, :, :, :past + n], eager.cache.v[:, :, :, :past + n])
        keep = torch.tensor([0, n - 1])
        eager.commit(past, keep)
        compiled.commit(past, keep)
    assert compiled.compiled_decode.calls == 2 + 20 + 5

    ids = [1, 5, 9, 33, 7, 12]
    ref = generate_plain(eager, ids, max_new_tokens=24).tokens
    calls = compiled.compiled_decode.calls
    assert generate_plain(compiled, ids, max_new_tokens=24).tokens == ref
    assert compiled.compiled_decode.calls - calls == 23  # every token after the prompt's came from the graph
    compiled.reset()
    compiled(torch.tensor([[3, 4, 5]]))  # a prompt (an empty cache) stays eager
    compiled(torch.tensor([[3, 4]]))  # so do several tokens without a tree mask
    assert compiled.compiled_decode.calls - calls == 23


@pytest.mark.parametrize("tree", ["mc_sim_7b_63", "dynamic"])
def test_speculative_decoding_on_compiled_forwards_equals_plain(tiny_llama_dir, tree):
    from clover.generate.speculative import SpeculativeModel
    from clover.model.checkpoint import init_draft

    eager = BaseModel.from_pretrained(tiny_llama_dir, dtype="fp32", max_len=160)
    compiled = BaseModel.from_pretrained(tiny_llama_dir, dtype="fp32", max_len=160)
    compiled.compile_decode()
    draft = init_draft("clover2", compiled).eval()
    draft.allocate_cache(compiled.max_len)
    model = SpeculativeModel(compiled, draft, tree=tree, tree_budget=12 if tree == "dynamic" else None)
    generator = torch.Generator().manual_seed(0)
    calls, steps = compiled.compiled_decode.calls, 0
    for _ in range(4):
        prompt = torch.randint(3, 97, (int(torch.randint(2, 12, (1,), generator=generator)),),
                               generator=generator).tolist()
        spec = model.generate(prompt, max_new_tokens=40, stop_token_ids=())
        assert spec.tokens == generate_plain(eager, prompt, max_new_tokens=40, stop_token_ids=()).tokens
        steps += len(spec.accept_lengths)
    verified = compiled.compiled_decode.calls - calls  # the verifications that ran compiled
    if tree == "dynamic":
        assert verified > 0  # (a one-node tree, the root alone, runs eager)
    else:
        assert verified == steps - 4  # every step but the prompt's (eager) verifies the whole fixed tree


def test_two_compiled_models_keep_their_own_graphs(tmp_path):
    """The graphs skip the guards on a model's weights and structure, so no model may run another's graphs: two
    models with the same cache shapes but weights of other shapes (and biases in one), compiled in one process and
    called in turn, each equal their eager twins."""
    pairs = []
    for arch, inter in (("llama", 128), ("qwen2", 96)):
        folder = save_tiny(tmp_path / arch, arch, num_hidden_layers=2, intermediate_size=inter)
        eager, compiled = (BaseModel.from_pretrained(folder, dtype="fp32", max_len=64) for _ in range(2))
        compiled.compile_decode()
        pairs.append((eager, compiled))
    for _, compiled in pairs:  # both graphs check the call's own tensors, nothing of the model's
        for step, inputs in ((compiled.compiled_decode.token_step, 5), (compiled.compiled_decode.tree_step, 6)):
            tensor_guards = _tensor_guards(step)
            assert len(tensor_guards) == inputs + 2 * 2  # ids, cos, sin, (mask,) slots, span + each layer's k, v
            assert not any("['args'][0]" in guard for guard in tensor_guards)
    ids = [1, 5, 9, 33, 7, 12]
    for eager, compiled in pairs + pairs:
        calls = compiled.compiled_decode.calls
        assert generate_plain(compiled, ids, max_new_tokens=12).tokens == generate_plain(eager, ids,
                                                                                        max_new_tokens=12).tokens
        assert compiled.compiled_decode.calls - calls == 11
    for eager, compiled in pairs:  # and the logits themselves
        for model in (eager, compiled):
            model.reset()
            model(torch.tensor([ids]))
        torch.testing.assert_close(compiled(torch.tensor([[4]])).logits, eager(torch.tensor([[4]])).logits,
                                   rtol=1e-5, atol=1e-5)


def _tensor_guards(step) -> list[str]:
    """The tensor guards a compiled forward checks at every call (read through dynamo's debugging hook)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    (entry,) = _debug_get_cache_entry_list(step._torchdynamo_orig_callable.__code__)
    return [line for line in str(entry.guard_manager).splitlines() if "TENSOR_MATCH" in line]
