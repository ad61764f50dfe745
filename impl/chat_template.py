"""Rendering a conversation with the model's own chat template (topic 1.6).

The template is Jinja2 source from the GGUF metadata (tokenizer.chat_template)
or from an HF folder (tokenizer_config.json or chat_template.jinja).
"""

from __future__ import annotations

import json
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from impl.errors import TinyLLMError


def _raise_exception(message: str):
    raise TemplateError(message)


class ChatTemplate:
    """A compiled chat template; `render` turns messages into the prompt text."""

    def __init__(self, source: str, tokenizer=None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise_exception
        self.source = source
        self.template = env.from_string(source)
        self.special = {}
        if tokenizer is not None:
            for name in ("bos_token", "eos_token"):
                token_id = getattr(tokenizer, f"{name}_id", None)
                if token_id is not None:
                    self.special[name] = tokenizer.token_bytes(token_id).decode("utf-8", "replace")

    @classmethod
    def from_hf_folder(cls, path: Path, tokenizer=None) -> ChatTemplate | None:
        """The template of an HF folder, or None when it has none."""
        jinja = path / "chat_template.jinja"
        if jinja.is_file():
            return cls(jinja.read_text(), tokenizer)
        config = path / "tokenizer_config.json"
        source = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
        return cls(source, tokenizer) if isinstance(source, str) else None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """[{'role': 'user', 'content': '...'}, ...] -> prompt text ending with the assistant header."""
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special)
        except TemplateError as e:
            raise TinyLLMError(f"chat template: {e}") from None
