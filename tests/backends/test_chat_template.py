"""Chat templates come from model files: the sandbox must stop them reaching Python objects."""
import pytest

from backends.base import BackendError
from backends.chat_template import content_to_text, render_chat


def test_renders_chatml_and_typed_parts():
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    assert render_chat(template, messages) == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert content_to_text(None) == ""


@pytest.mark.parametrize("evil", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% set x = messages.append(1) %}{{ x }}",
])
def test_template_injection_is_refused(evil):
    with pytest.raises(BackendError):
        out = render_chat(evil, [{"role": "user", "content": "x"}])
        # an undefined attribute renders empty instead of raising: it must not leak objects either
        assert "class" not in out and "function" not in out and "uid=" not in out
        raise BackendError("rendered harmlessly")


def test_raise_exception_in_template_is_a_clear_error():
    with pytest.raises(BackendError, match="only user"):
        render_chat("{{ raise_exception('only user roles') }}", [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("bomb", [
    "{{ 'x' * 10**10 }}",
    "{{ 'x' * 1000000 }}",
    "{{ [1] * 10000000 }}",
    "{{ 2 ** 100000 }}",
    "{% for i in range(100000000) %}{% endfor %}",
])
def test_resource_bombs_are_refused(bomb):
    with pytest.raises(BackendError, match="refused|limit"):
        render_chat(bomb, [{"role": "user", "content": "x"}])


def test_normal_arithmetic_still_works():
    assert render_chat("{{ '-' * 3 }}{{ 2 ** 3 }}{% for i in range(2) %}{{ i }}{% endfor %}",
                       [{"role": "user", "content": "x"}]) == "---801"
