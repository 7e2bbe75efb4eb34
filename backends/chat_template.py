"""Chat templates come from model files, i.e. from strangers: render them in a sandboxed Jinja
environment so a template cannot reach Python objects (no attribute walks to __globals__ etc.)."""
from __future__ import annotations

from functools import lru_cache

from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from backends.base import BackendError

# ChatML is what most small instruct models use; only a fallback when the model ships no template.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise_exception(message):
    raise TemplateError(message)


@lru_cache(maxsize=32)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(source)


def render_chat(template: str | None, messages: list[dict], add_generation_prompt: bool = True,
                bos_token: str | None = None, eos_token: str | None = None) -> str:
    """Render `messages` with the model's template; any template error becomes a BackendError."""
    clean = [{"role": str(m["role"]), "content": content_to_text(m.get("content"))} for m in messages]
    try:
        return _compile(template or FALLBACK_TEMPLATE).render(
            messages=clean, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "", eos_token=eos_token or "")
    except SecurityError as exc:
        raise BackendError(f"chat template refused by the sandbox: {exc}") from None
    except TemplateError as exc:
        raise BackendError(f"chat template failed: {exc}") from None


def content_to_text(content) -> str:
    """Gradio 6 and the OpenAI API give content as a string or a list of typed parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", content.get("content", "")))
    if isinstance(content, (list, tuple)):
        return "".join(content_to_text(part) for part in content)
    return str(content)
