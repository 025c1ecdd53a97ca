"""Chat templates: rendering, loss masks decoded back to the assistant replies, serving prompts, template selection."""
import copy

import pytest

from clover.data.templates import TEMPLATE_NAMES, get_template
from clover.errors import CloverError
from clover.model.loading import load_tokenizer

TEMPLATES = ("vicuna", "llama3", "chatml", "tokenizer")

CONVERSATIONS = {
    "plain": [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome is the capital of Italy."},
    ],
    "system_unicode": [
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "Traduis « bonjour » en chinois 🙂"},
        {"role": "assistant", "content": "你好 (nǐ hǎo) — «bonjour» 👋"},
        {"role": "user", "content": "Merci, ça va ?"},
        {"role": "assistant", "content": "Ça va très bien, merci !"},
    ],
    "code_and_spaces": [
        {"role": "user", "content": "  Write a Python function that adds two numbers.  "},
        {"role": "assistant", "content": "```python\ndef add(a, b):\n    return a + b\n```\n\nUse it as `add(1, 2)`."},
        {"role": "user", "content": "Now with\ttabs\nand newlines."},
        {"role": "assistant", "content": "   Leading and trailing spaces   "},
        {"role": "user", "content": "ok"},
        {"role": "assistant", "content": "\tdone\n"},
    ],
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


def masked_runs(tokenizer, ids, mask):
    """Decoded text of each maximal run of masked-in tokens, and the decoded text of all masked-out tokens."""
    runs, current, outside = [], [], []
    for token, bit in zip(ids, mask):
        if bit:
            current.append(token)
            continue
        outside.append(token)
        if current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs, tokenizer.decode(outside)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_mask_covers_exactly_the_replies(tokenizer, name, conversation):
    template = get_template(tokenizer, name)
    messages = CONVERSATIONS[conversation]
    ids, mask = template.encode_with_mask(messages)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    runs, outside = masked_runs(tokenizer, ids, mask)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(replies)
    for i, (run, reply) in enumerate(zip(runs, replies)):
        expected = reply + template.end_of_turn
        if name == "llama3" and i < len(replies) - 1:
            # <|eot_id|> is plain text for SmolLM2, and its BPE merges "|><" across the end of the reply with the
            # "<" of the next <|start_header_id|>: that one token straddles the span and is masked in
            expected += "<"
        # the separator before a reply may merge with the reply's leading whitespace into one token
        assert run.lstrip() == expected.lstrip()
        if name in ("chatml", "tokenizer") and not reply[0].isspace():
            assert run == expected
    for message in messages:
        if message["role"] != "assistant":
            assert message["content"] in outside


def test_bos_and_end_of_turn_with_smollm2(tokenizer):
    # SmolLM2's BOS is <|im_start|> (id 1) and its EOS <|im_end|> (id 2); plain encoding adds neither
    vicuna = get_template(tokenizer, "vicuna")
    ids, mask = vicuna.encode_with_mask(CONVERSATIONS["plain"])
    assert ids[0] == tokenizer.bos_token_id and mask[0] == 0
    assert tokenizer.decode(ids[1:]) == vicuna.render(CONVERSATIONS["plain"], add_generation_prompt=False)
    chatml = get_template(tokenizer, "chatml")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in chatml.stop_token_ids and tokenizer.eos_token_id in chatml.stop_token_ids
    ids, _ = chatml.encode_with_mask(CONVERSATIONS["plain"])
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and ids.count(im_end) == 4  # no extra BOS
    llama3 = get_template(tokenizer, "llama3")
    assert tokenizer.decode(llama3.encode_prompt(CONVERSATIONS["plain"][:1])).startswith("<|begin_of_text|>")


def test_tokenizer_template_is_smollm2_jinja(tokenizer):
    template = get_template(tokenizer, "auto")
    assert template.name == "tokenizer" and template.end_of_turn == "<|im_end|>"
    text = template.render(CONVERSATIONS["plain"][:1], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    custom = get_template(tokenizer, "auto", system_prompt="Be terse.")
    assert custom.render([], add_generation_prompt=False) == "<|im_start|>system\nBe terse.<|im_end|>\n"


def test_auto_without_chat_template_is_vicuna(tokenizer):
    plain = copy.copy(tokenizer)
    plain.chat_template = None
    assert get_template(plain, "auto").name == "vicuna"
    with pytest.raises(CloverError, match="no chat template"):
        get_template(plain, "tokenizer")


def test_tokenizer_template_that_trims_replies(tokenizer):
    trimming = copy.copy(tokenizer)
    trimming.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | trim "
                              "+ '<|im_end|>\\n' }}{% endfor %}")
    template = get_template(trimming, "tokenizer")
    ids, mask = template.encode_with_mask(CONVERSATIONS["code_and_spaces"])
    runs, _ = masked_runs(tokenizer, ids, mask)
    assert runs == [m["content"].strip() + "<|im_end|>" for m in CONVERSATIONS["code_and_spaces"][1::2]]


def test_render_formats(tokenizer):
    messages = CONVERSATIONS["plain"][:2]
    vicuna = get_template(tokenizer, "vicuna").render(messages, add_generation_prompt=False)
    assert vicuna.endswith(" USER: What is the capital of France? ASSISTANT: Paris.</s>")
    assert vicuna.startswith("A chat between a curious user and an artificial intelligence assistant.")
    prompt = get_template(tokenizer, "vicuna", system_prompt="SYS").render(messages[:1], add_generation_prompt=True)
    assert prompt == "SYS USER: What is the capital of France? ASSISTANT:"
    assert get_template(tokenizer, "llama3").render(messages[:1], add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert get_template(tokenizer, "chatml").render(messages, add_generation_prompt=False) == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n")


@pytest.mark.parametrize("name", TEMPLATES)
def test_serving_prompt_is_prefix_of_training_sequence(tokenizer, name):
    template = get_template(tokenizer, name)
    for messages in (CONVERSATIONS["plain"], CONVERSATIONS["system_unicode"]):
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt_text = template.render(messages[:k], add_generation_prompt=True)
            assert template.render(messages[:k + 1], add_generation_prompt=False).startswith(prompt_text)
            prompt = template.encode_prompt(messages[:k])
            ids, mask = template.encode_with_mask(messages[:k + 1])
            if name == "llama3":
                # SmolLM2's pre-tokenizer keeps a final "\n\n" as one token but splits "\n\nParis" into "\n", "\n"
                assert ids[:len(prompt) - 1] == prompt[:-1] and tokenizer.decode(prompt[-1:]) == "\n\n"
                continue
            assert ids[:len(prompt)] == prompt
            runs, _ = masked_runs(tokenizer, ids[len(prompt):], mask[len(prompt):])
            expected = message["content"] + template.end_of_turn  # vicuna: the run starts with the separator " "
            assert mask[len(prompt) - 1] == 0 and [run.lstrip() for run in runs] == [expected]


def test_max_len_truncates_ids_and_mask(tokenizer):
    template = get_template(tokenizer, "chatml")
    full_ids, full_mask = template.encode_with_mask(CONVERSATIONS["plain"])
    ids, mask = template.encode_with_mask(CONVERSATIONS["plain"], max_len=10)
    assert (ids, mask) == (full_ids[:10], full_mask[:10])


def test_template_names(tokenizer):
    assert get_template(tokenizer, "ge_data_all_vicuna_nonnorm.py").name == "vicuna"
    assert get_template(tokenizer, "ge_data_all_llama3_nonnorm.py").name == "llama3"
    with pytest.raises(CloverError) as err:
        get_template(tokenizer, "alpaca")
    assert "alpaca" in str(err.value) and all(name in str(err.value) for name in TEMPLATE_NAMES)


def test_bad_messages(tokenizer):
    template = get_template(tokenizer, "chatml")
    with pytest.raises(CloverError, match="system message"):
        template.render([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], False)
    with pytest.raises(CloverError, match="role"):
        template.render([{"role": "bot", "content": "a"}], False)


class SlowTokenizer:
    """Just enough of a slow (offset-less) tokenizer for a template to be built."""

    is_fast = False
    bos_token_id = None

    def __call__(self, text, **kwargs):
        return {"input_ids": [ord(c) for c in text]}


def test_masks_need_a_fast_tokenizer():
    template = get_template(SlowTokenizer(), "chatml")
    assert template.encode_prompt(CONVERSATIONS["plain"][:1])  # serving works without offsets
    with pytest.raises(CloverError, match="fast tokenizer"):
        template.encode_with_mask(CONVERSATIONS["plain"])
