"""Chat templates: the single place that turns messages into text and token ids, for serving and for training data.

Every template renders ``[{"role": "system" | "user" | "assistant", "content": str}, ...]`` into text in which special
tokens appear as text, then tokenizes it once with ``add_special_tokens=False`` (prepending the BOS id where the format
needs one). Training loss masks come from character offsets: an assistant reply's span is its content plus the
end-of-turn string after it, found by rendering the conversation prefix by prefix, and a token is masked in (1) when
its characters overlap such a span.
"""
from __future__ import annotations

from functools import cached_property

from clover.errors import CloverError

TEMPLATE_NAMES = ("auto", "tokenizer", "vicuna", "llama3", "chatml")
# the data-generation scripts of the original Clover/EAGLE code name their format through the script name
TEMPLATE_ALIASES = {"ge_data_all_vicuna_nonnorm.py": "vicuna", "ge_data_all_llama3_nonnorm.py": "llama3"}
ROLES = ("system", "user", "assistant")


class ChatTemplate:
    """Render and tokenize conversations in one chat format for one tokenizer."""

    name: str
    end_of_turn: str  # the text that closes an assistant reply (part of the reply's loss span)

    def __init__(self, tokenizer, system_prompt: str | None = None, add_bos: bool = False):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.add_bos = add_bos and tokenizer.bos_token_id is not None

    @cached_property
    def stop_token_ids(self) -> list[int]:
        """Ids that end an assistant turn: eos, and the end-of-turn string when it is a single token."""
        ids = [self.tokenizer.eos_token_id]
        eot_ids = self.tokenizer(self.end_of_turn, add_special_tokens=False)["input_ids"] if self.end_of_turn else []
        if len(eot_ids) == 1:
            ids.append(eot_ids[0])
        return list(dict.fromkeys(i for i in ids if i is not None))

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The conversation as text; with ``add_generation_prompt`` it ends where the assistant's reply starts."""
        for i, message in enumerate(messages):
            if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                raise CloverError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {message!r}")
            if message["role"] == "system" and i:
                raise CloverError(f"message {i}: a system message is only allowed first")
        if self.system_prompt is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return self._render(messages, add_generation_prompt)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        raise NotImplementedError

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of the conversation so far followed by the assistant generation prompt (for serving)."""
        text = self.render(messages, add_generation_prompt=True)
        return self._bos(text) + self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_with_mask(self, messages: list[dict], max_len: int | None = None) -> tuple[list[int], list[int]]:
        """Token ids of the whole conversation and a loss mask: 1 on tokens of assistant replies (+ end of turn)."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise CloverError(f"loss masks need a fast tokenizer (character offsets); {type(self.tokenizer).__name__} "
                              f"is a slow one: load the model's tokenizer.json or convert the tokenizer")
        text, spans = self._render_with_spans(messages)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        mask, span = [], 0
        for start, end in encoded["offset_mapping"]:
            end = max(end, start + 1)  # a token whose offsets were trimmed to nothing still sits at `start`
            while span < len(spans) and spans[span][1] <= start:
                span += 1
            mask.append(int(span < len(spans) and spans[span][0] < end))
        bos = self._bos(text)
        ids, mask = bos + encoded["input_ids"], [0] * len(bos) + mask
        return (ids[:max_len], mask[:max_len]) if max_len is not None else (ids, mask)

    def _bos(self, text: str) -> list[int]:
        if self.add_bos and not text.startswith(self.tokenizer.bos_token):
            return [self.tokenizer.bos_token_id]
        return []

    def _render_with_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant replies (content + end of turn)."""
        text = self.render(messages, add_generation_prompt=False)
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:k], add_generation_prompt=False)
            after = self.render(messages[:k + 1], add_generation_prompt=False)
            if not (after.startswith(before) and text.startswith(after)):
                raise CloverError(f"the {self.name!r} template renders conversation prefixes inconsistently (it "
                                  f"rewrites earlier turns), so replies cannot be located: choose another --template "
                                  f"from {TEMPLATE_NAMES}")
            segment = after[len(before):]
            for reply in (message["content"], message["content"].strip()):  # some templates trim replies
                found = segment.rfind(reply + self.end_of_turn)
                if found >= 0:
                    start = len(before) + found
                    spans.append((start, start + len(reply) + len(self.end_of_turn)))
                    break
            else:
                raise CloverError(f"the {self.name!r} template does not copy assistant message {k} verbatim, so its "
                                  f"loss mask cannot be built: choose another --template from {TEMPLATE_NAMES}")
        return text, spans


class VicunaTemplate(ChatTemplate):
    """FastChat's ``vicuna_v1.1``: ``{system} USER: {q} ASSISTANT: {a}</s>USER: ...``, BOS first."""

    name = "vicuna"
    end_of_turn = "</s>"

    def __init__(self, tokenizer, system_prompt: str | None = None):
        super().__init__(tokenizer, system_prompt, add_bos=True)

    def _render(self, messages, add_generation_prompt):
        try:
            from fastchat.conversation import get_conv_template
        except ImportError:
            raise CloverError("the vicuna template needs FastChat: pip install --no-deps fschat") from None
        conv = get_conv_template("vicuna_v1.1")
        if messages and messages[0]["role"] == "system":
            conv.set_system_message(messages[0]["content"])
            messages = messages[1:]
        for message in messages:
            conv.append_message(conv.roles[message["role"] == "assistant"], message["content"])
        if add_generation_prompt:
            conv.append_message(conv.roles[1], None)
        return conv.get_prompt()


class Llama3Template(ChatTemplate):
    """Llama-3 instruct: ``<|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``."""

    name = "llama3"
    end_of_turn = "<|eot_id|>"

    def _render(self, messages, add_generation_prompt):
        text = "<|begin_of_text|>" + "".join(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages)
        return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


class ChatMLTemplate(ChatTemplate):
    """ChatML (Qwen2, SmolLM2): ``<|im_start|>{role}\\n{content}<|im_end|>\\n``."""

    name = "chatml"
    end_of_turn = "<|im_end|>"

    def __init__(self, tokenizer, system_prompt: str | None = None):
        super().__init__(tokenizer, system_prompt, add_bos=_adds_bos(tokenizer))

    def _render(self, messages, add_generation_prompt):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class TokenizerTemplate(ChatTemplate):
    """The tokenizer's own jinja chat template; the end of turn is the special token found right after a reply."""

    name = "tokenizer"

    def __init__(self, tokenizer, system_prompt: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise CloverError(f"the tokenizer has no chat template: choose --template from {TEMPLATE_NAMES[2:]}")
        super().__init__(tokenizer, system_prompt, add_bos=_adds_bos(tokenizer))
        self.end_of_turn = self._detect_end_of_turn()

    def _render(self, messages, add_generation_prompt):
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except TemplateError as err:
            raise CloverError(f"the tokenizer's chat template rejected the conversation ({err}): choose another "
                              f"--template from {TEMPLATE_NAMES}") from None

    def _detect_end_of_turn(self) -> str:
        marker = "Clover reply marker 7f3a"
        sample = self._render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}], False)
        following = sample.partition(marker)[2]
        specials = [t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special]
        return max((t for t in specials if following.startswith(t)), key=len, default="")


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS in front of plain text when encoding with special tokens."""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def get_template(tokenizer, name: str = "auto", system_prompt: str | None = None) -> ChatTemplate:
    """The chat template ``name`` (one of TEMPLATE_NAMES or an original data script name) for ``tokenizer``."""
    key = TEMPLATE_ALIASES.get(name, name)
    if key == "auto":
        key = "tokenizer" if getattr(tokenizer, "chat_template", None) else "vicuna"
    templates = {"tokenizer": TokenizerTemplate, "vicuna": VicunaTemplate, "llama3": Llama3Template,
                 "chatml": ChatMLTemplate}
    if key not in templates:
        raise CloverError(f"unknown chat template {name!r}: choose one of {', '.join(TEMPLATE_NAMES)} "
                          f"(or {', '.join(TEMPLATE_ALIASES)})")
    return templates[key](tokenizer, system_prompt)
