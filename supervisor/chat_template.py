"""Rendering a chat prompt with a model's chat template: the pure part, run in a renderer
process (supervisor/chat_render_main.py), never in the daemon.

A template comes from a model file, so it is untrusted: jinja2's sandbox stops it from reaching
Python objects, and the caps here and in the renderer process (supervisor/chat_renderer.py:
time, memory, template size) stop it from taking the daemon's time or memory.
"""

from __future__ import annotations

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The prompt of a chat on a model whose file has no chat template (never a silent ChatML):
# documented in README.md.
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}System: {{ m.content }}\n"
    "{% elif m.role == 'user' %}User: {{ m.content }}\n"
    "{% else %}Assistant: {{ m.content }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
PLAIN_TURN_END = "\nUser:"  # a stop string for chats in the plain template
MAX_TEMPLATE = 256 * 1024  # bytes of a template (real ones: a few KB)
MAX_PROMPT = 4 * 1024 * 1024  # characters of a rendered prompt (bodies are at most 1 MiB)

# What went wrong, as the renderer reports it: the template refused the messages
# (raise_exception), the template itself failed, or it went beyond a cap.
REFUSED, FAILED, LIMIT = "refused", "failed", "limit"


class TemplateRefused(Exception):
    """The template could not render the prompt; `kind` is REFUSED, FAILED or LIMIT and the
    message names the reason."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


_env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)


def _raise(message: str) -> None:
    raise TemplateRefused(REFUSED, f"the model's chat template refused the messages: {message}")


def check_template_size(template: str | None) -> None:
    size = len(template.encode("utf-8", errors="replace")) if template else 0
    if size > MAX_TEMPLATE:
        raise TemplateRefused(LIMIT, f"the model's chat template is {size} bytes, more than "
                              f"the {MAX_TEMPLATE} modeld renders")


def render(template: str | None, messages: list[dict[str, str]]) -> str:
    """The prompt for `messages`: the GGUF's chat template (sandboxed), else PLAIN_TEMPLATE.

    bos_token and eos_token render as nothing: the runtime's tokenizer adds the BOS token
    itself, and an EOS written as text would be read as plain characters, not the token.
    Raises TemplateRefused (also for a prompt over MAX_PROMPT, stopped as it grows).
    """
    check_template_size(template)
    try:
        compiled = _env.from_string(template or PLAIN_TEMPLATE)
        pieces, size = [], 0
        for piece in compiled.generate(messages=messages, add_generation_prompt=True,
                                       bos_token="", eos_token="", raise_exception=_raise):
            size += len(piece)
            if size > MAX_PROMPT:
                raise TemplateRefused(LIMIT, "the model's chat template renders a prompt of "
                                      f"more than {MAX_PROMPT} characters")
            pieces.append(piece)
        return "".join(pieces)
    except TemplateRefused:
        raise
    except jinja2.TemplateError as exc:
        raise TemplateRefused(FAILED, f"the model's chat template failed: {exc}") from None
    except RecursionError:
        raise TemplateRefused(LIMIT, "the model's chat template recurses too deeply") from None
    except MemoryError:
        raise TemplateRefused(LIMIT, "the model's chat template needs more memory than "
                              "modeld gives a render") from None
    except Exception as exc:  # whatever else a template provokes inside the sandbox
        raise TemplateRefused(FAILED, "the model's chat template failed: "
                              f"{type(exc).__name__}: {exc}") from None
