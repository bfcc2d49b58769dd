"""Renders a model's jinja2 chat template, sandboxed, the way transformers and llama-cpp-python do."""

from __future__ import annotations

import datetime
import json

from engine.errors import PocketInferError

# Used only when a model ships no template: ChatML, which most small instruct models were tuned on.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TemplateError(PocketInferError, ValueError):
    """The chat template failed to render (a message list it rejects, or a broken template)."""


def _raise(message):
    raise TemplateError(f"chat template: {message}")


def render(template: str | None, messages: list[dict], *, add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", **extra) -> str:
    import jinja2  # lazily: only chat needs it
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TemplateError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda v, indent=None, **kw: json.dumps(v, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template or FALLBACK_TEMPLATE).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token, **extra)
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template failed to render: {e}") from None
