"""render_template / render_chat against hostile chat templates: exact errors, time and memory bounds, the
no-fork fallback, and unchanged output for real templates (complements tests/test_chat_template.py)."""
from __future__ import annotations

import os
import resource
import time

import pytest

from formats.errors import QConvertError
from formats.model.tokenizer import TokenizerData
from qconvert.template import render_template
from qconvert.text import render_chat

CTX = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
       "add_generation_prompt": True, "tools": None}
FAIL = "chat template failed to render: "
SEC = FAIL + "SecurityError: "
FORMAT = SEC + ("str.format is not allowed in chat templates (the format-string route to attributes); "
                "use the |format filter")
TOO_BIG = "chat template output exceeds 1048576 characters"
MEMORY = "chat template uses too much memory"
STOPPED = "chat template stopped after 2 s"


def chatml() -> str:
    from qconvert.testing.fuzz.seeds import micro_tokenizer
    return micro_tokenizer()[1]["chat_template"]


def tok(template: str | None, **kw) -> TokenizerData:
    return TokenizerData(tokens=["a", "<s>", "</s>"], token_types=[1, 3, 3], merges=[], chat_template=template, **kw)


def error_of(template: str, **kw) -> str:
    with pytest.raises(QConvertError) as e:
        render_template(template, CTX, **kw)
    return str(e.value)


def children() -> int:
    """Live or zombie child processes of this process."""
    me, n = str(os.getpid()), 0
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    n += f.read().rsplit(")", 1)[1].split()[1] == me
            except OSError:
                pass
    return n


def test_render_chat_chatml_exact():
    msgs = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi there"}]
    assert render_chat(tok(chatml()), msgs) == ("<|im_start|>system\nYou are helpful.<|im_end|>\n"
                                                "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(tok(chatml()), msgs[1:], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n")


def test_render_chat_bos_eos_and_tojson():
    t = tok("{{ bos_token }}{% for m in messages %}{{ m.role }}:{{ m.content }}{{ eos_token }}{% endfor %}"
            "{{ messages | tojson }}", bos_id=1, eos_id=2, add_bos=True)
    assert render_chat(t, [{"role": "user", "content": "é"}]) == '<s>user:é</s>[{"role": "user", "content": "é"}]'


def test_render_chat_without_template():
    with pytest.raises(QConvertError) as e:
        render_chat(tok(None), [{"role": "user", "content": "x"}])
    assert str(e.value) == "the model has no chat template; drop --chat and pass the raw prompt"


@pytest.mark.parametrize("template,expected", [
    ("{% set x = namespace() %}{% set x.y = 1 %}{{ x.y }}", "1"),
    ("[{{ request }}]", "[]"),                      # undefined names render empty, as in transformers
    ("{{ 10 ** 10 ** 10 }}", "1" + "0" * 100),      # Jinja's ** is left-associative: (10**10)**10
    ("{{ 'ab' * 3 }}|{{ '%05d' % 42 }}|{{ 'x' | center(5) }}", "ababab|00042|  x  "),
    ("{{ (range(100000) | list | join('') | length) }}", "488890"),
])
def test_harmless_constructs_render(template, expected):
    assert render_template(template, CTX) == expected


@pytest.mark.parametrize("template,message", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", SEC + "access to attribute '__class__' of a str is not allowed"),
    ("{{ cycler.__init__.__globals__ }}", SEC + "access to attribute '__init__' of a type is not allowed"),
    ("{{ self._TemplateReference__context }}",
     SEC + "access to attribute '_TemplateReference__context' of a TemplateReference is not allowed"),
    ("{{ 'a'.format }}", FORMAT),
    ('{{ "{0.__class__}".format(1) }}', FORMAT),
    ("{{ lipsum.__globals__ }}", SEC + "access to attribute '__globals__' of a function is not allowed"),
    ("{{ [].append(1) }}", SEC + "access to attribute 'append' of a list is not allowed"),
    ("{{ messages.append(1) }}", SEC + "access to attribute 'append' of a list is not allowed"),
    ("{{ raise_exception('x') }}", FAIL + "TemplateError: x"),
    ("{{ request.args }}", FAIL + "UndefinedError: 'request' is undefined"),
    ("{{ 1 / 0 }}", FAIL + "ZeroDivisionError: division by zero"),
    ("{% for %}", FAIL + "TemplateSyntaxError: Expected an expression, got 'end of statement block'"),
])
def test_escapes_and_errors_exact(template, message):
    assert error_of(template) == message


@pytest.mark.parametrize("template,message", [
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", STOPPED),
    ("{% set ns = namespace(x=10 ** 200) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}", STOPPED),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", FAIL + "RecursionError: maximum recursion depth exceeded"),
    ("{{ 'a' * 10 ** 10 }}", SEC + "a repetition would exceed the output limit"),
    ("{{ range(100000) | list | join('x') * 1000 }}", SEC + "a repetition would exceed the output limit"),
    ("{{ 'x' | center(10 ** 10) }}", SEC + "a filter argument would exceed the output limit"),
    ("{{ '%0999999999d' % 1 }}", SEC + "a format width would exceed the output limit"),
    ("{{ 10 ** (10 ** 10) }}", SEC + "exponent too large"),
    ("{{ range(10 ** 6) | list }}",
     FAIL + "OverflowError: Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000)."),
    ("{% for i in range(100000) %}{{ 'xxxxxxxxxxxx' }}{% endfor %}", TOO_BIG),
    ("{{ 'a'.ljust(10 ** 9) }}", MEMORY),
    ("{{ '%*d' % (10 ** 9, 1) }}", MEMORY),
    ("{% set ns = namespace(x='a') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}", MEMORY),
])
def test_bombs_stopped_in_time_and_memory(template, message):
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    assert error_of(template) == message
    assert time.monotonic() - t0 < 2.5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 300 << 10  # KiB
    assert children() == 0  # the renderer was reaped


def test_time_limit_keyword():
    t0 = time.monotonic()
    assert error_of("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
                    time_limit=0.3) == "chat template stopped after 0.3 s"
    assert time.monotonic() - t0 < 1.0


def test_max_output_keyword():
    assert render_template("{% for i in range(10) %}x{% endfor %}", CTX, max_output=10) == "x" * 10
    assert error_of("{% for i in range(11) %}x{% endfor %}", max_output=10) == "chat template output exceeds 10 characters"
    assert error_of("{{ 'x' * 11 }}", max_output=10) == SEC + "a repetition would exceed the output limit"


def test_fallback_without_fork(monkeypatch):
    monkeypatch.delattr(os, "fork")
    assert render_template(chatml(), CTX) == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
                                              "<|im_start|>assistant\n")
    assert error_of("{{ cycler.__init__.__globals__ }}") == SEC + "access to attribute '__init__' of a type is not allowed"
    assert error_of("{{ 'a' * 10 ** 10 }}") == SEC + "a repetition would exceed the output limit"
    assert error_of("{% for i in range(100000) %}{{ 'xxxxxxxxxxxx' }}{% endfor %}") == TOO_BIG
    t0 = time.monotonic()
    assert error_of("{% for a in range(100000) %}{% for b in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
                    time_limit=0.2) == "chat template stopped after 0.2 s"
    assert time.monotonic() - t0 < 0.5


def test_fallback_loop_without_output_is_stopped(monkeypatch):
    monkeypatch.delattr(os, "fork")
    assert error_of("{% for a in range(100000) %}{% for b in range(30) %}{% endfor %}{% endfor %}",
                    time_limit=0.05) == "chat template stopped after 0.05 s"


def test_timer_inside_jinja_frame_is_clean():
    t0 = time.monotonic()
    assert error_of("{% set l = range(99999) | list %}{% for i in range(99999) %}{% if i in l %}{% endif %}"
                    "{% endfor %}").startswith("chat template ")
    assert time.monotonic() - t0 < 2.5


def test_timer_inside_jinja_frame_says_stopped():
    assert error_of("{% set l = range(99999) | list %}{% for i in range(99999) %}{% if i in l %}{% endif %}"
                    "{% endfor %}") == STOPPED
