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


MAX_SEQUENCE_REPEAT = 100_000   # longest string/list a template may build with `*`
MAX_EXPONENT = 128
MAX_RANGE = 4096                  # chat templates loop over messages, not millions of numbers


def _raise_exception(message):
    raise TemplateError(message)


def _limited_range(*args):
    values = range(*args)
    if len(values) > MAX_RANGE:
        raise SecurityError(f"range of {len(values)} items is over the template limit of {MAX_RANGE}")
    return values


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox blocks Python internals; this also blocks resource bombs (`"x" * 10**10`)."""
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is over the template limit of {MAX_EXPONENT}")
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int) \
                        and len(seq) * count > MAX_SEQUENCE_REPEAT:
                    raise SecurityError("template tried to build a sequence over "
                                        f"{MAX_SEQUENCE_REPEAT} items")
        return super().call_binop(context, operator, left, right)


@lru_cache(maxsize=32)
def _compile(source: str):
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.globals["range"] = _limited_range
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
    except (OverflowError, MemoryError, RecursionError) as exc:
        raise BackendError(f"chat template refused: {type(exc).__name__}") from None


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
