"""Clover-2 and EAGLE-1 drafts on tiny random bases: causality/shift, train/infer equivalence,
initialisation near the identity, checkpoints (strict, trainable weights only, base checks), gradients, ablations."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from clover.errors import CloverError
from clover.model.base import BaseModel
from clover.model.checkpoint import init_draft, load_draft, save_draft
from clover.model.clover2 import Clover2Draft, measure_token_scale
from clover.model.eagle import EagleDraft
from clover.model.layers import Rotary, rms_norm
from clover.model.losses import clover_loss, eagle_loss
from tests.conftest import save_tiny

ATOL = 1e-5
V, H = 97, 64


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def base(request, tmp_path_factory):
    folder = save_tiny(tmp_path_factory.mktemp(request.param), request.param)
    return BaseModel.from_pretrained(folder, dtype="fp32", max_len=128)


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    return BaseModel.from_pretrained(save_tiny(tmp_path_factory.mktemp("llama"), "llama"), dtype="fp32", max_len=128)


def perturbed(draft_type: str, base: BaseModel, seed: int = 0, **overrides):
    """A draft whose weights are moved away from the near-identity init, so every path carries signal."""
    torch.manual_seed(seed)
    model = init_draft(draft_type, base, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def inputs(b: int, length: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, length, H, generator=gen), torch.randint(0, V, (b, length), generator=gen)


def chunked(length: int, seed: int = 2) -> list[tuple[int, int]]:
    gen = torch.Generator().manual_seed(seed)
    bounds, start = [], 0
    while start < length:
        end = min(length, start + int(torch.randint(1, 7, (1,), generator=gen)))
        bounds.append((start, end))
        start = end
    return bounds


# ---- Clover-2 -------------------------------------------------------------------------------------------------------
def test_clover2_causality_and_shift(base):
    model = perturbed("clover2", base)
    hidden, ids = inputs(1, 12)
    length, n = 12, model.num_heads
    with torch.no_grad():
        ref = model.forward_train(hidden, ids)
        for i in range(n):  # head i is only defined for t < L - i
            assert torch.all(ref[i, :, length - i:] == 0)
        for c in (0, 5, 11):
            ids2 = ids.clone()
            ids2[:, c] = (ids[:, c] + 1) % V
            out = model.forward_train(hidden, ids2)
            for i in range(n):  # ids[c] = x_{c+1} is first read by head i at t = c - i
                t = c - i
                if t > 0:
                    torch.testing.assert_close(out[i, :, :t], ref[i, :, :t], rtol=0, atol=0)
                if 0 <= t < length - i:
                    assert (out[i, :, t] - ref[i, :, t]).abs().max() > 1e-4
            hidden2 = hidden.clone()
            hidden2[:, c] += 1.0
            out = model.forward_train(hidden2, ids)
            for i in range(n):  # h~_c is first read at t = c, by every head
                torch.testing.assert_close(out[i, :, :c], ref[i, :, :c], rtol=0, atol=0)
                if c < length - i:
                    assert (out[i, :, c] - ref[i, :, c]).abs().max() > 1e-4


def test_clover2_incremental_matches_training(base):
    model = perturbed("clover2", base)
    hidden, ids = inputs(2, 17)
    with torch.no_grad():
        full_trunk = model.trunk(hidden, ids)[:1]
        preds = model.forward_train(hidden, ids)[:, :1]
    model.allocate_cache(64)
    for _ in range(2):  # a second pass after reset reuses the cache
        model.reset()
        trunk = torch.cat([model.extend(hidden[:1, a:b], ids[:1, a:b]) for a, b in chunked(17)], dim=1)
        assert model.cache_length == 17
        torch.testing.assert_close(trunk, full_trunk, rtol=0, atol=ATOL)
    state, out = model.head(trunk[0], None, 0)
    torch.testing.assert_close(model.lm_logits(out), model.lm_logits(preds[0, 0]), rtol=0, atol=ATOL)
    for i in range(1, model.num_heads):  # teacher-forced RNN steps reproduce the vectorised heads
        state, out = model.head(state[:17 - i], ids[0, i:], i)
        torch.testing.assert_close(out, preds[i, 0, :17 - i], rtol=0, atol=ATOL)
    model.truncate(10)
    again = model.extend(hidden[:1, 10:], ids[:1, 10:])
    torch.testing.assert_close(again, full_trunk[:, 10:], rtol=0, atol=ATOL)


def test_clover2_init(base):
    torch.manual_seed(0)
    model = init_draft("clover2", base)
    first = base.model.layers[0].state_dict()
    assert model.config["clover"]["init_from_layer"] == 0
    for layer in model.layers:  # every trunk layer is an exact copy of the base's first layer (the default)
        for key, value in layer.state_dict().items():
            assert torch.equal(value, first[key]), key
    last = init_draft("clover2", base, init_from_layer="last")
    assert last.config["clover"]["init_from_layer"] == base.args.num_hidden_layers - 1
    assert torch.equal(last.layers[1].mlp.down_proj.weight, base.model.layers[-1].mlp.down_proj.weight)
    for norm in (model.trunk_norm, model.head_norm):
        assert torch.equal(norm.weight, base.model.norm.weight)
    assert model.args.rope_theta == base.args.rope_theta == 5e5  # the base RoPE, not a default 10000
    pos = torch.arange(50)
    for mine, theirs in zip(Rotary.lookup(model.frozen["rope_cos"], model.frozen["rope_sin"], pos, torch.float32),
                           base.rotary(pos, torch.float32)):
        assert torch.equal(mine, theirs)
    x, y = torch.randn(8, H), torch.randn(8, H)
    with torch.no_grad():
        for ad in (model.token_fuse, model.rnn_fuse):  # AD(x, y) ~ x
            assert ((ad(x, y) - x).norm() / x.norm()) < 0.05
        passed = model.rnn_fc(torch.cat([x, y], -1))  # FC1 passes the state, ignores the embedding
        assert ((passed - x).norm() / x.norm()) < 0.1
        assert ((model.head0_fc(x) - x).norm() / x.norm()) < 0.1
    noise = model.token_fuse.v.weight
    assert noise.min() < 0 < noise.max() and noise.abs().max() <= 0.01  # symmetric U(-0.01, 0.01)

    one = init_draft("clover2", base, init_from_layer=1, init_noise="one_sided", num_layers=1)
    assert one.config["clover"]["init_from_layer"] == 1
    assert torch.equal(one.layers[0].state_dict()["self_attn.q_proj.weight"],
                       base.model.layers[1].state_dict()["self_attn.q_proj.weight"])
    assert one.token_fuse.v.weight.min() >= 0
    with pytest.raises(CloverError, match="init_from_layer"):
        init_draft("clover2", base, init_from_layer=7)
    with pytest.raises(CloverError, match="unknown clover2 config option"):
        init_draft("clover2", base, num_head=3)
    with pytest.raises(CloverError, match="fuse"):
        init_draft("clover2", base, fuse="mlp")


@pytest.mark.parametrize("overrides", [{"embedding": "input"}, {"fuse": "fc"}])
def test_clover2_ablations(llama_base, overrides):
    model = perturbed("clover2", llama_base, **overrides)
    if overrides.get("embedding") == "input":
        assert model.embed_weight is not model.lm_head_weight
        assert torch.equal(model.embed_weight, llama_base.model.embed_tokens.weight)
    else:
        assert "fuse_fc.weight" in model.state_dict() and not hasattr(model, "token_fuse")
    hidden, ids = inputs(1, 9)
    with torch.no_grad():
        preds = model.forward_train(hidden, ids)
    model.allocate_cache(32)
    state, _ = model.head(model.extend(hidden, ids)[0], None, 0)
    state, out = model.head(state[:8], ids[0, 1:], 1)
    torch.testing.assert_close(out, preds[1, 0, :8], rtol=0, atol=ATOL)


def test_clover2_embedding_aliases_lm_head(llama_base):
    model = init_draft("clover2", llama_base)
    assert model.embed_weight is model.lm_head_weight
    assert model.lm_head_weight.data_ptr() == llama_base.lm_head.weight.data_ptr()  # shared, not copied
    assert not any(b.numel() >= V * H for b in model.buffers())  # nothing vocabulary-sized for DDP to broadcast
    half = model.to(torch.bfloat16)
    assert half.lm_head_weight.dtype == half.dtype == torch.bfloat16 and half.embed_weight is half.lm_head_weight
    assert llama_base.lm_head.weight.dtype == torch.float32  # the base is untouched


def checkpoint_keys(model) -> set[str]:
    """The state-dict keys ``model``'s parameters should give: readable module names mapped to the original ones,
    the fused q/k/v and gate/up projections split into their Hugging Face names."""
    unfused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    keys = set()
    for name, _ in model.named_parameters():
        head, _, rest = name.partition(".")
        name = f"{model.checkpoint_names.get(head, head)}.{rest}"
        fused = next((f for f in unfused if f".{f}." in name), None)
        keys |= {name.replace(fused, part) for part in unfused[fused]} if fused else {name}
    return keys


# ---- EAGLE-1 --------------------------------------------------------------------------------------------------------
def test_eagle_structure(llama_base):
    model = init_draft("eagle", llama_base)
    assert isinstance(model.layers[0].input_layernorm, torch.nn.Identity)
    state = model.state_dict()  # the trainable weights only, under the checkpoints' (unfused) names
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in model.parameters())
    assert set(state) == checkpoint_keys(model)
    assert model.embed_weight.data_ptr() == llama_base.model.embed_tokens.weight.data_ptr()
    assert model.args.rope_theta == llama_base.args.rope_theta


def test_eagle_incremental_and_tree_match_training(base):
    model = perturbed("eagle", base)
    hidden, ids = inputs(1, 11)
    with torch.no_grad():
        full = model.forward_train(hidden, ids)
    model.allocate_cache(64)
    feats = torch.cat([model.extend(hidden[:, a:b], ids[:, a:b]) for a, b in chunked(11)], dim=1)
    torch.testing.assert_close(feats, full, rtol=0, atol=ATOL)
    committed = model.cache_length
    # a tree: two depth-1 siblings from the root feature, one child under each (positions committed + depth - 1)
    level1_tokens, level2_tokens = torch.tensor([5, 9]), torch.tensor([33, 70])
    ones, eye = torch.ones(2, committed, dtype=torch.bool), torch.eye(2, dtype=torch.bool)
    f1 = model.tree_step(feats[0, -1:].expand(2, H), level1_tokens, torch.full((2,), committed),
                         torch.cat([ones, eye], 1))
    f2 = model.tree_step(f1, level2_tokens, torch.full((2,), committed + 1), torch.cat([ones, eye, eye], 1))
    assert model.cache_length == committed + 4
    for row in range(2):  # each branch == the training forward on the sequence extended by that path
        seq_hidden = torch.cat([hidden[0], feats[0, -1:], f1[row:row + 1]])[None]
        seq_ids = torch.cat([ids[0], level1_tokens[row:row + 1], level2_tokens[row:row + 1]])[None]
        with torch.no_grad():
            ref = model.forward_train(seq_hidden, seq_ids)[0]
        torch.testing.assert_close(f1[row], ref[-2], rtol=0, atol=ATOL)
        torch.testing.assert_close(f2[row], ref[-1], rtol=0, atol=ATOL)
    model.truncate(committed)
    assert model.cache_length == committed


# ---- gradients --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("draft_type", ["clover2", "eagle"])
def test_gradient_reaches_only_trainable_weights(llama_base, draft_type):
    model = perturbed(draft_type, llama_base).train()
    hidden, ids = inputs(2, 10)
    target, mask = torch.randn(2, 10, H), torch.ones(2, 10)
    lm = model.lm_head_weight
    loss_fn = clover_loss if draft_type == "clover2" else eagle_loss
    loss, _ = loss_fn(model(hidden, ids), target, lm, mask, model.cfg)
    torch.testing.assert_close(model.loss(model(hidden, ids), target, mask)[0], loss)
    loss.backward()
    assert set(model.state_dict()) == checkpoint_keys(model)  # every weight, under its checkpoint name
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(not t.requires_grad for t in model.frozen.values())
    assert all(p.grad is None for p in llama_base.parameters())


def test_gradient_checkpointing_gives_same_gradients(llama_base):
    hidden, ids = inputs(2, 8)
    grads = []
    for flag in (False, True):
        model = perturbed("clover2", llama_base).train()
        model.gradient_checkpointing = flag
        model(hidden, ids).square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6)


# ---- checkpoints ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("draft_type", ["clover2", "eagle"])
def test_checkpoint_round_trip(llama_base, tmp_path, monkeypatch, draft_type):
    model = perturbed(draft_type, llama_base)
    save_draft(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config == model.config and config["base"]["vocab_size"] == V
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert set(shapes) == set(model.state_dict())
    assert not any(V in shape for shape in shapes.values())  # no LM head / embedding copy in the file

    # loading never runs the from-base initialisation
    monkeypatch.setattr(type(model), "init_from_base", lambda self, base: pytest.fail("init on load"))
    loaded = load_draft(tmp_path / "ckpt", llama_base, expected_type=draft_type)
    assert type(loaded) is type(model) and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    hidden, ids = inputs(1, 6)
    with torch.no_grad():
        assert torch.equal(loaded.forward_train(hidden, ids), model.forward_train(hidden, ids))

    half = load_draft(tmp_path / "ckpt", llama_base, dtype="bf16")
    assert half.dtype == torch.bfloat16 and half.lm_head_weight.dtype == torch.bfloat16
    half.allocate_cache(16)
    assert half.extend(hidden, ids).dtype == torch.bfloat16


def test_checkpoint_strict_keys(llama_base, tmp_path):
    model = init_draft("eagle", llama_base)
    folder = save_draft(model, tmp_path / "ckpt")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file({**state, "extra.weight": torch.zeros(2)}, str(folder / "model.safetensors"))
    with pytest.raises(CloverError, match=r"unexpected keys \['extra.weight'\]"):
        load_draft(folder, llama_base)
    del state["fc.bias"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CloverError, match=r"missing keys \['fc.bias'\]"):
        load_draft(folder, llama_base)
    state["fc.bias"] = torch.zeros(3)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CloverError, match="size mismatch"):
        load_draft(folder, llama_base)


def test_checkpoint_errors(llama_base, tmp_path):
    folder = save_draft(init_draft("clover2", llama_base, num_heads=2, num_layers=1), tmp_path / "ckpt")
    with pytest.raises(CloverError, match="'clover2' draft but a 'eagle' draft is needed"):
        load_draft(folder, llama_base, expected_type="eagle")
    other = BaseModel.from_pretrained(save_tiny(tmp_path / "small", "llama", hidden_size=32, intermediate_size=64),
                                      dtype="fp32", max_len=64)
    with pytest.raises(CloverError, match="hidden_size=64.*hidden_size=32"):
        load_draft(folder, other)
    with pytest.raises(CloverError, match="neither a checkpoint folder nor a shipped draft"):
        load_draft(tmp_path / "nowhere", llama_base)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "draft_type": "medusa"}))
    with pytest.raises(CloverError, match="unknown draft_type 'medusa'"):
        load_draft(folder, llama_base)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "clover"}))
    with pytest.raises(CloverError, match="not a complete clover2 config"):
        load_draft(folder, llama_base)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CloverError, match="not valid JSON"):
        load_draft(folder, llama_base)
    (folder / "config.json").write_text(json.dumps(config))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CloverError, match="truncated or corrupt"):
        load_draft(folder, llama_base)
    weights.unlink()
    with pytest.raises(CloverError, match="no model.safetensors"):
        load_draft(folder, llama_base)
    (folder / "config.json").unlink()
    with pytest.raises(CloverError, match="no config.json"):
        load_draft(folder, llama_base)
    with pytest.raises(CloverError, match="unknown draft_type"):
        init_draft("medusa", llama_base)


@pytest.mark.parametrize("draft_type", ["clover2", "eagle"])
def test_speculative_greedy_is_lossless(llama_base, draft_type):
    """The drafts satisfy the speculative decoder's contract: greedy output == plain greedy decoding."""
    from clover.generate.speculative import CloverModel, EagleModel

    draft = perturbed(draft_type, llama_base)
    draft.allocate_cache(llama_base.max_len)
    model = {"clover2": CloverModel, "eagle": EagleModel}[draft_type](llama_base, draft)
    prompt = torch.randint(3, V, (1, 9), generator=torch.Generator().manual_seed(3))
    assert model.generate(prompt, max_new_tokens=16).tokens == model.generate_plain(prompt, max_new_tokens=16).tokens


def test_draft_classes_build_from_config(llama_base):
    for cls in (Clover2Draft, EagleDraft):
        model = cls(cls.default_config(llama_base), llama_base)
        assert model.config["draft_type"] == cls.draft_type
        json.dumps(model.config)


@pytest.mark.parametrize("draft_type", ["clover2", "eagle"])
def test_draft_vocabulary(llama_base, draft_type, tmp_path):
    """Logits exist for the draft vocabulary only (the full head's values there, -inf elsewhere); the vocabulary is
    part of the checkpoint and loads strictly; it must be given exactly when the config asks for one."""
    from clover.model.checkpoint import top_tokens

    counts = torch.randint(0, 50, (V,), generator=torch.Generator().manual_seed(0))
    vocab = top_tokens(counts, 20)
    assert vocab.tolist() == sorted(vocab.tolist()) and len(set(vocab.tolist())) == 20
    assert counts[vocab].min() >= counts[~torch.isin(torch.arange(V), vocab)].max()
    model = init_draft(draft_type, llama_base, draft_vocab_size=20, draft_vocab=vocab.flip(0)).eval()
    assert torch.equal(model.draft_vocab, vocab)
    hidden = torch.randn(3, H)
    logits = model.lm_logits(hidden)
    full = hidden @ llama_base.lm_head.weight.T
    torch.testing.assert_close(logits[:, vocab], full[:, vocab])
    outside = ~torch.isin(torch.arange(V), vocab)
    assert torch.all(logits[:, outside] == -torch.inf)
    loaded = load_draft(save_draft(model, tmp_path / "d"), llama_base)
    assert torch.equal(loaded.draft_vocab, vocab)
    torch.testing.assert_close(loaded.lm_logits(hidden), logits)
    with pytest.raises(CloverError, match="needs the draft vocabulary"):
        init_draft(draft_type, llama_base, draft_vocab_size=20)
    with pytest.raises(CloverError, match="expected 20 distinct"):
        init_draft(draft_type, llama_base, draft_vocab_size=20, draft_vocab=vocab[:5])
    with pytest.raises(CloverError, match="no draft_vocab_size"):
        init_draft(draft_type, llama_base, draft_vocab=vocab)
    with pytest.raises(CloverError, match="draft_vocab_size must be"):
        init_draft(draft_type, llama_base, draft_vocab_size=V + 1, draft_vocab=vocab)


# ---- the token scale of AD0 -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loud_base(tmp_path_factory):
    """A tiny Llama whose last layer writes two huge channels into the residual stream, as real Llama-family models
    do (pre-norm states of norm ~40x the embedding rows'; SmolLM2's are ~250x)."""
    base = BaseModel.from_pretrained(save_tiny(tmp_path_factory.mktemp("loud"), "llama"), dtype="fp32", max_len=128)
    with torch.no_grad():
        base.model.layers[-1].mlp.down_proj.weight[:2] *= 3000.0
    return base


def head0_sensitivity(model, hidden, ids) -> float:
    """Relative change of head 0's output when every ``x_{t+1}`` is replaced by another token."""
    with torch.no_grad():
        a = model.forward_train(hidden, ids)[0]
        b = model.forward_train(hidden, (ids + 1 + ids.flip(-1)) % V)[0]
    return float((a - b).norm() / a.norm())


def test_token_scale_makes_head0_see_the_token(loud_base):
    ids = torch.randint(3, V, (1, 24), generator=torch.Generator().manual_seed(3))
    hidden = loud_base(ids, use_cache=False, logits_to_keep=0).hidden_prenorm.clone()
    ratio = float(hidden[0].norm(dim=-1).median() / loud_base.lm_head.weight.norm(dim=-1).median())
    assert ratio > 30  # the premise: pre-norm states dwarf the embedding rows
    torch.manual_seed(0)
    measured = init_draft("clover2", loud_base, hidden_sample=hidden[0]).eval()
    scale = measured.config["clover"]["token_scale"]
    assert isinstance(scale, float) and scale == measured.token_scale and 0.5 * ratio < scale < 2 * ratio
    assert head0_sensitivity(measured, hidden, ids) >= 1e-2
    torch.manual_seed(0)
    probed = init_draft("clover2", loud_base).eval()  # no data: measured on the base's states for a fixed probe
    assert 0.2 * scale < probed.token_scale < 5 * scale
    assert head0_sensitivity(probed, hidden, ids) >= 1e-2
    torch.manual_seed(0)
    original = init_draft("clover2", loud_base, token_scale=1.0).eval()  # the unscaled original, for ablations
    assert original.token_scale == 1.0 and head0_sensitivity(original, hidden, ids) < 5e-3
    fc = init_draft("clover2", loud_base, fuse="fc", hidden_sample=hidden[0]).eval()  # the fc ablation is scaled too
    assert fc.token_scale == scale and head0_sensitivity(fc, hidden, ids) >= 1e-2
    for bad in (0, -2.0, "big", True):
        with pytest.raises(CloverError, match="token_scale"):
            init_draft("clover2", loud_base, token_scale=bad)


def test_token_scale_round_trip(loud_base, tmp_path):
    model = perturbed("clover2", loud_base)
    folder = save_draft(model, tmp_path / "ckpt")
    assert json.loads((folder / "config.json").read_text())["clover"]["token_scale"] == model.token_scale > 1
    loaded = load_draft(folder, loud_base)
    assert loaded.token_scale == model.token_scale
    hidden, ids = inputs(1, 7)
    with torch.no_grad():
        assert torch.equal(loaded.forward_train(hidden, ids), model.forward_train(hidden, ids))


def test_a_normed_trunk_input_reads_the_state_at_the_scale_of_a_normalised_one(loud_base, tmp_path):
    """``trunk_input="normed"``: AD0 reads the pre-norm state through a learned RMSNorm (initialised to the base's
    final norm), so the trunk no longer sees the residual stream's scale, the token scale is measured against the
    normalised states, head 0 still sees the token, and the norm's weight is saved and loaded with strict keys."""
    from clover.generate.speculative import CloverModel

    ids = torch.randint(3, V, (1, 24), generator=torch.Generator().manual_seed(3))
    hidden = loud_base(ids, use_cache=False, logits_to_keep=0).hidden_prenorm.clone()
    torch.manual_seed(0)
    normed = init_draft("clover2", loud_base, trunk_input="normed", hidden_sample=hidden[0]).eval()
    prenorm = init_draft("clover2", loud_base, hidden_sample=hidden[0]).eval()
    assert torch.equal(normed.input_norm.weight, loud_base.model.norm.weight)
    states = rms_norm(hidden[0], loud_base.model.norm.weight, loud_base.args.rms_norm_eps)
    ratio = float(states.norm(dim=-1).median() / hidden[0].norm(dim=-1).median())  # the copies write at this scale
    source = loud_base.model.layers[0]
    for layer in normed.layers:
        torch.testing.assert_close(layer.self_attn.o_proj.weight, source.self_attn.o_proj.weight * ratio)
        torch.testing.assert_close(layer.mlp.down_proj.weight, source.mlp.down_proj.weight * ratio)
        assert torch.equal(layer.self_attn.qkv_proj.weight, source.self_attn.qkv_proj.weight)
    assert normed.token_scale == measure_token_scale(states, normed.embed_weight) != prenorm.token_scale
    assert head0_sensitivity(normed, hidden, ids) >= 1e-2
    with torch.no_grad():  # invariant to the state's scale, unlike the pre-norm trunk
        torch.testing.assert_close(normed.forward_train(3 * hidden, ids), normed.forward_train(hidden, ids),
                                   rtol=1e-4, atol=1e-4)
        assert not torch.allclose(prenorm.forward_train(3 * hidden, ids), prenorm.forward_train(hidden, ids),
                                  rtol=1e-2, atol=1e-2)
    model = perturbed("clover2", loud_base, trunk_input="normed")
    folder = save_draft(model, tmp_path / "ckpt")
    assert json.loads((folder / "config.json").read_text())["clover"]["trunk_input"] == "normed"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "input_norm.weight" in f.keys()
    loaded = load_draft(folder, loud_base)
    with torch.no_grad():
        assert torch.equal(loaded.forward_train(hidden, ids), model.forward_train(hidden, ids))
    loaded.allocate_cache(loud_base.max_len)  # generation goes through the same input norm: still exact
    spec = CloverModel(loud_base, loaded, tree="dynamic", tree_budget=6)
    prompt = ids[0, :10].tolist()
    assert spec.generate(prompt, max_new_tokens=20).tokens == spec.generate_plain(prompt, max_new_tokens=20).tokens
    with pytest.raises(CloverError, match="trunk_input"):
        init_draft("clover2", loud_base, trunk_input="postnorm")


def test_random_trunk_layers_keep_the_default_initialisation_and_the_rest_starts_as_before(loud_base):
    torch.manual_seed(0)
    copied = init_draft("clover2", loud_base, trunk_input="normed")
    torch.manual_seed(0)
    fresh = init_draft("clover2", loud_base, trunk_input="normed", trunk_init="random")
    assert fresh.config["clover"]["trunk_init"] == "random"
    source = loud_base.model.layers[0].state_dict()
    for layer in fresh.layers:
        assert not any(torch.equal(value, source[name]) for name, value in layer.state_dict().items()
                       if name.endswith("proj.weight"))
        bound = 1 / layer.mlp.down_proj.in_features ** 0.5  # nn.Linear's default: U(-1/sqrt(fan_in), ...)
        assert 0.5 * bound < layer.mlp.down_proj.weight.abs().max() <= bound
    skip = ("layers.",)
    for (name, a), (_, b) in zip(copied.state_dict().items(), fresh.state_dict().items()):
        if not name.startswith(skip):
            assert torch.equal(a, b), name
    with pytest.raises(CloverError, match="trunk_init"):
        init_draft("clover2", loud_base, trunk_init="zeros")


GOLDEN = Path(__file__).parent / "data" / "golden_v0"


@pytest.mark.parametrize("draft_type", ["clover2", "eagle"])
def test_checkpoint_written_before_token_scale(draft_type):
    """Checkpoints written by an earlier version (``tests/data/golden_v0/make.py``; no ``token_scale`` key) load
    with strict keys and give that version's outputs and greedy tokens."""
    from clover.generate.speculative import CloverModel, EagleModel

    assert "token_scale" not in json.loads((GOLDEN / "clover2" / "config.json").read_text())["clover"]
    base = BaseModel.from_pretrained(GOLDEN / "base", dtype="fp32", max_len=128)
    draft = load_draft(GOLDEN / draft_type, base, expected_type=draft_type)
    expected = load_file(str(GOLDEN / "expected.safetensors"))
    if draft_type == "clover2":
        assert draft.token_scale == 1.0
    with torch.no_grad():
        torch.testing.assert_close(draft.forward_train(expected["hidden"], expected["ids"]),
                                   expected[f"{draft_type}_train"], rtol=1e-5, atol=1e-5)
    draft.allocate_cache(base.max_len)
    model = {"clover2": CloverModel, "eagle": EagleModel}[draft_type](base, draft, tree="dynamic", tree_budget=6)
    assert model.generate(expected["prompt"], max_new_tokens=24).tokens == expected[f"{draft_type}_tokens"].tolist()
    assert model.generate_plain(expected["prompt"], max_new_tokens=24).tokens == expected["plain_tokens"].tolist()
