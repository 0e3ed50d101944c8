"""Bad inputs: one error line, exit status 1, no output file left behind."""
import json
import shutil

import pytest
from conftest import qconvert


def _expect_error(tmp_path, *args, match):
    before = set(p.name for p in tmp_path.iterdir())
    r = qconvert(*args, check=False)
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    after = set(p.name for p in tmp_path.iterdir())
    assert after - before == set(), f"left files behind: {after - before}"
    return lines[0]


@pytest.fixture(scope="module")
def good_gguf(tiny, tmp_path_factory):
    p = tmp_path_factory.mktemp("good") / "m.gguf"
    qconvert("hf-to-gguf", str(tiny("tied")), str(p), "--outtype", "f16")
    return p


def test_truncated_gguf(tmp_path, good_gguf):
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(good_gguf.read_bytes()[: good_gguf.stat().st_size // 2])
    _expect_error(tmp_path, "gguf-to-hf", str(bad), str(tmp_path / "out"), match="truncated")
    bad.write_bytes(good_gguf.read_bytes()[:5000])  # cut inside the metadata
    _expect_error(tmp_path, "inspect", str(bad), match="truncated")


def test_corrupted_gguf(tmp_path, good_gguf):
    data = bytearray(good_gguf.read_bytes())
    data[:4] = b"GGUX"
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(bytes(data))
    _expect_error(tmp_path, "gguf-to-hf", str(bad), str(tmp_path / "out"), match="not a GGUF file")
    data[:4] = b"GGUF"
    data[24:32] = (2**62).to_bytes(8, "little")  # first key length: absurd
    bad.write_bytes(bytes(data))
    _expect_error(tmp_path, "hf-to-gguf", str(bad), str(tmp_path / "x.gguf"), match=str(bad))


def test_broken_safetensors_header(tmp_path, tiny):
    d = tmp_path / "broken"
    shutil.copytree(tiny("tied"), d)
    st = d / "model.safetensors"
    data = bytearray(st.read_bytes())
    data[8:20] = b"{not json!!!"
    st.write_bytes(bytes(data))
    _expect_error(tmp_path, "hf-to-gguf", str(d), str(tmp_path / "m.gguf"), match="broken safetensors header")


def test_config_of_other_architecture(tmp_path, tiny):
    d = tmp_path / "llama"
    shutil.copytree(tiny("tied"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    _expect_error(tmp_path, "hf-to-gguf", str(d), str(tmp_path / "m.gguf"), match="model_type 'llama' is not supported")


def test_existing_output_needs_force(tmp_path, tiny, good_gguf):
    out = tmp_path / "exists.gguf"
    out.write_bytes(b"keep me")
    _expect_error(tmp_path, "hf-to-gguf", str(tiny("tied")), str(out), match="--force")
    assert out.read_bytes() == b"keep me"
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    (outdir / "keep").write_text("x")
    _expect_error(tmp_path, "gguf-to-hf", str(good_gguf), str(outdir), match="--force")
    assert (outdir / "keep").read_text() == "x"
    qconvert("hf-to-gguf", str(tiny("tied")), str(out), "--force")
    assert out.read_bytes()[:4] == b"GGUF"


def test_missing_input_and_pickle_only(tmp_path, tiny):
    _expect_error(tmp_path, "inspect", str(tmp_path / "nope.gguf"), match="no such folder")
    d = tmp_path / "pickle"
    d.mkdir()
    shutil.copy(tiny("tied") / "config.json", d)
    shutil.copy(tiny("tied") / "tokenizer.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
    _expect_error(tmp_path, "hf-to-gguf", str(d), str(tmp_path / "m.gguf"), match="pickle checkpoints are never loaded")
