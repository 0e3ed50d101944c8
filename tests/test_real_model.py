"""The real Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF from PyPI) against transformers and llama.cpp."""
import pytest
from conftest import SAMPLE, qconvert

from qconvert.testing.peers import hf_logits, kl_stats, llama_logits, llama_tokenize

pytestmark = pytest.mark.real

EXTRA_TEXTS = [
    "混合文本：def 函数(参数): return 参数 * 2  # 注释\n\tTabs\tand  double  spaces   end ",
    "Numbers 1234567890 and 3.14159, emoji 🙂🚀, accents café naïve, Ünïcödé.",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n<tool_call>x</tool_call><|im_end|>",
    "   leading spaces\n\n\nnewlines\r\nwindows line\n",
]


@pytest.fixture(scope="module")
def tokens(real_hf):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(real_hf))(SAMPLE)["input_ids"][:256]


def test_tokenizer_matches_gguf_tokenizer(real_gguf, real_hf):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(real_hf))
    for text in [SAMPLE, *EXTRA_TEXTS]:
        ours = tok(text)["input_ids"]
        assert ours == llama_tokenize(real_gguf, text), text[:40]
        assert tok.decode(ours) == text
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.heavy
def test_gguf_to_hf_equals_transformers_gguf_loader(real_gguf, real_hf, tokens):
    ours = hf_logits(real_hf, tokens)
    theirs = hf_logits(real_gguf.parent, tokens, gguf_file=real_gguf.name)
    s = kl_stats(theirs, ours)
    print(f"real gguf-to-hf vs transformers GGUF loader: {s}")
    assert s["mean_kl"] <= 1e-4, s
    assert s["top1"] >= 0.99, s


@pytest.mark.heavy
def test_f16_gguf_runs_in_llama_cpp(real_hf, tokens, tmp_path):
    out = tmp_path / "real-f16.gguf"
    qconvert("hf-to-gguf", str(real_hf), str(out), "--outtype", "f16")
    s = kl_stats(hf_logits(real_hf, tokens), llama_logits(out, tokens))
    print(f"real f16 GGUF in llama.cpp vs transformers: {s}")
    assert s["mean_kl"] <= 2e-5, s
    assert s["top1"] >= 0.98, s
