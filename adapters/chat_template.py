"""The base model's chat template, rendered the way vLLM renders it for /v1/chat/completions.

vLLM renders a chat request with transformers' `apply_chat_template`: the Jinja template in a sandboxed
environment (trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps
non-ASCII), given `messages`, `add_generation_prompt` and the tokenizer's named special tokens. This module
renders the same way with jinja2 alone, so the gateway (which has no transformers) and the trainer render a
conversation identically; tests/test_token_count.py checks it against transformers.

Also here, because the wire model and the trainer both apply them: the rules a training conversation follows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
LEGACY_SPECIAL_TOKENS_FILE = "special_tokens_map.json"

# transformers' named special tokens: the variables a template sees besides `messages`.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

CHAT_ROLES = ("system", "user", "assistant")
ASSISTANT = "assistant"


class ChatTemplateError(ValueError):
    """The base model has no chat template, or its template does not render an assistant turn as the
    generation prompt followed by the turn (so the trained tokens could not be told apart)."""


class InvalidConversation(ValueError):
    """A training conversation breaks a rule of `check_conversation`; `index` is the offending message, if any."""

    def __init__(self, reason: str, index: int | None = None):
        super().__init__(reason)
        self.index = index


def check_conversation(messages: Sequence[dict]) -> None:
    """A training conversation: known roles; it opens with a system or user message (what an assistant turn
    answers) and ends with the assistant turn the adapter learns to give. Contents are checked where they are
    read (the wire model, the trainer)."""
    if not messages:
        raise InvalidConversation("must hold at least one message")
    for index, message in enumerate(messages):
        if message.get("role") not in CHAT_ROLES:
            raise InvalidConversation(f"role must be one of {', '.join(CHAT_ROLES)}", index)
    if messages[0]["role"] == ASSISTANT:
        raise InvalidConversation("the first message must be a system or user message", 0)
    if messages[-1]["role"] != ASSISTANT:
        raise InvalidConversation("the last message must be an assistant turn: it is what the adapter learns to"
                                  " answer", len(messages) - 1)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers) renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    special_tokens: tuple[tuple[str, str], ...]  # (name, text) of the named special tokens, sorted

    @property
    def eos_token(self) -> str | None:
        return dict(self.special_tokens).get("eos_token")

    def render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        try:
            return _compile(self.source).render(messages=list(messages), tools=None, documents=None,
                                                add_generation_prompt=add_generation_prompt,
                                                **dict(self.special_tokens))
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the base model's chat template failed: {exc}") from None

    @classmethod
    def of_tokenizer(cls, tokenizer) -> "ChatTemplate | None":
        """From a transformers tokenizer (the trainer's): its `chat_template` and `special_tokens_map`."""
        source = _default_template(getattr(tokenizer, "chat_template", None))
        if source is None:
            return None
        return cls(source, _sorted_tokens(getattr(tokenizer, "special_tokens_map", {}) or {}))

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "ChatTemplate | None":
        """From a model folder's files, as transformers reads them: chat_template.jinja, else tokenizer_config's
        `chat_template`; the special tokens from tokenizer_config.json (legacy special_tokens_map.json fills gaps)."""
        model_dir = Path(model_dir)
        config = _read_json(model_dir / TOKENIZER_CONFIG_FILE)
        template_file = model_dir / CHAT_TEMPLATE_FILE
        source = template_file.read_text() if template_file.is_file() else _default_template(
            config.get("chat_template"))
        if source is None:
            return None
        tokens = {**_read_json(model_dir / LEGACY_SPECIAL_TOKENS_FILE), **config}
        return cls(source, _sorted_tokens(tokens))


def _default_template(value: Any) -> str | None:
    """A template string, or the `default` one of named templates (a dict, or a list of {name, template})."""
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(value, dict):
        value = value.get("default")
    return value if isinstance(value, str) and value else None


def _sorted_tokens(values: dict) -> tuple[tuple[str, str], ...]:
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = values.get(name)
        if isinstance(value, dict):  # serialised AddedToken
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tuple(sorted(tokens.items()))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}
