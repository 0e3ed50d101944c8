"""Chat templates from model files: the real ChatML template renders as before; escapes are clean errors;
loops, memory and output bombs are stopped within 2 s without growing this process."""
from __future__ import annotations

import resource
import time

import pytest

from formats.errors import QConvertError
from qconvert.template import render_template

CTX = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
       "add_generation_prompt": True, "tools": None}

ESCAPES = ["{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ cycler.__init__.__globals__.os }}",
           "{{ self._TemplateReference__context }}", "{{ 'a'.format }}", "{{ '{0.__class__}'.format(1) }}",
           "{{ 'a'['format'] }}", "{{ lipsum.__globals__ }}", "{{ joiner.__init__.__globals__ }}",
           "{{ namespace.__init__.__globals__ }}", "{{ [].append(1) }}", "{{ messages.clear() }}",
           "{{ messages[0].update({'role': 'x'}) }}", "{% include 'x' %}", "{% import 'os' as os %}",
           "{{ loop.__class__ }}", "{{ raise_exception('no') }}", "{{ 1 / 0 }}", "{% set x = 1 %"]
BOMBS = ["{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
         "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "{{ 'a' * 10 ** 10 }}",
         "{{ 'x' | center(10 ** 10) }}", "{{ '%0999999999d' % 1 }}", "{{ range(10 ** 6) | list | join('x') * 1000 }}",
         "{% for m in messages * 100000 %}{{ m }}{% endfor %}", "{{ messages | tojson(indent=10 ** 9) }}",
         "{% set ns = namespace(x='a') %}{% for i in range(60) %}{% set ns.x = ns.x + ns.x %}{% endfor %}{{ ns.x }}",
         "{{ 'ab' | replace('a', 'a' * 100000) | replace('a', 'a' * 1000) }}", "{{ (range(99999) | list) * 99999 }}",
         "{% for a in range(99999) %}{% for b in range(99999) %}{{ 'xxxxxxxxxx' }}{% endfor %}{% endfor %}"]


def test_real_chatml_template_renders_exactly():
    from qconvert.testing.fuzz.seeds import micro_tokenizer
    tpl = micro_tokenizer()[1]["chat_template"]
    out = render_template(tpl, CTX)
    assert out == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("tpl", ESCAPES)
def test_escapes_are_clean_errors(tpl):
    with pytest.raises(QConvertError) as e:
        render_template(tpl, CTX)
    assert str(e.value).startswith("chat template") and "\n" not in str(e.value)


@pytest.mark.parametrize("tpl", BOMBS)
def test_bombs_are_stopped_within_2_s(tpl):
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    with pytest.raises(QConvertError) as e:
        render_template(tpl, CTX)
    took = time.monotonic() - t0
    assert str(e.value).startswith("chat template"), str(e.value)
    assert took < 2.5, f"{took:.2f} s"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 64 << 10  # KiB: the child pays, not us


def test_render_chat_cli_path(tiny, tmp_path):
    """generate --chat with a hostile template in tokenizer_config.json: one error line, exit 1."""
    import json
    import shutil

    from conftest import qconvert
    d = tmp_path / "m"
    shutil.copytree(tiny("tied"), d)
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["chat_template"] = "{{ cycler.__init__.__globals__.os.system('id') }}"
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    r = qconvert("generate", str(d), "--prompt", "hi", "--chat", "--max-new-tokens", "1", check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[-1].startswith("error: chat template") and "Traceback" not in r.stderr, r.stderr
