"""HF reading: a lazy Source over a local folder or a Hub repo id (through the local cache).

Only safetensors are read (never pickle). Sharded checkpoints are followed through
``model.safetensors.index.json``; GPTQ / AWQ / compressed-tensors checkpoints go through quantized_read.py.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from formats.container.safetensors_io import SafetensorsFile
from formats.errors import QConvertError
from formats.files import jsonio
from formats.hf import quantized_read as hf_quant
from formats.model.config import ModelConfig
from formats.model.names import canonical_names, canonical_shape
from formats.model.source import Source
from formats.model.tokenizer import TokenizerData


def resolve(path_or_id: str) -> Path:
    """A local folder as is; otherwise an ``org/name`` Hub id resolved through huggingface_hub's cache.

    Honours ``HF_HUB_OFFLINE=1`` / ``HF_HUB_CACHE``; only config, tokenizer and safetensors files are fetched.
    """
    p = Path(path_or_id)
    if p.is_dir():
        return p
    if p.exists():
        raise QConvertError(f"{p}: expected an HF model folder (with config.json and *.safetensors)")
    if path_or_id.count("/") != 1 or path_or_id.startswith((".", "/")):
        raise QConvertError(f"{path_or_id}: no such folder, and not an 'org/name' Hub repo id")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise QConvertError("huggingface_hub is not installed; pass a local folder instead") from None
    try:
        return Path(snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"]))
    except (LocalEntryNotFoundError, HFValidationError) as e:
        raise QConvertError(f"{path_or_id}: not found in the Hugging Face cache and the Hub is unreachable "
                            f"({type(e).__name__}); download it first or pass a local folder") from None
    except OSError as e:
        raise QConvertError(f"{path_or_id}: could not fetch from the Hub ({e})") from None


def _read_json(p: Path, kind: str = "config") -> dict[str, Any]:
    return jsonio.load(p, kind)


def shard_files(d: Path, index: Path) -> list[str]:
    """The shard names of ``model.safetensors.index.json``: plain file names inside ``d`` (no ``..``, no
    absolute paths, no folders, no symlink leading out of the folder), else QConvertError."""
    wm = _read_json(index, "index").get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise QConvertError(f"{index}: no weight_map; the index file is damaged")
    files = set()
    for name, fn in wm.items():
        if not isinstance(fn, str) or not fn or fn != os.path.basename(fn) or fn in (".", "..") or "\\" in fn \
                or "\0" in fn or not fn.endswith(".safetensors"):
            raise QConvertError(f"{index}: weight_map[{name!r}] is {fn!r}; shards must be plain *.safetensors file "
                                "names inside the model folder (no paths)")
        files.add(fn)
    root = d.resolve()
    for fn in files:
        real = (d / fn).resolve()
        if real.parent != root and (d / fn).exists():
            raise QConvertError(f"{index}: shard {fn} is a symlink to {real}, outside the model folder; copy the file "
                                "into the folder instead")
    return sorted(files)


def open_hf(path_or_id: str) -> Source:
    """Open an HF checkpoint folder (or Hub id) as a Source; reads headers only."""
    d = resolve(path_or_id)
    if not (d / "config.json").is_file():
        raise QConvertError(f"{d}: no config.json; point at a Hugging Face model folder")
    raw_cfg = _read_json(d / "config.json")
    cfg = ModelConfig.from_hf_dict(raw_cfg, str(d / "config.json"))
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = shard_files(d, index)
    else:
        root = d.resolve()
        files = sorted(p.name for p in d.glob("*.safetensors") if p.resolve().parent == root)
    if not files:
        pickles = [p.name for p in d.glob("*.bin")] + [p.name for p in d.glob("*.pt")]
        hint = " (pickle checkpoints are never loaded: re-save with safetensors)" if pickles else ""
        raise QConvertError(f"{d}: no *.safetensors files{hint}")
    src = Source(config=cfg, tokenizer=TokenizerData.from_hf_dir(d, raw_cfg), tensors={}, path=str(d), kind="hf")
    if (d / "generation_config.json").is_file():
        src.generation_config = _read_json(d / "generation_config.json")
    known = set(canonical_names(cfg))
    quant = None
    if hf_quant.is_quantised_config(raw_cfg):
        qc = raw_cfg["quantization_config"]
        quant = hf_quant.layout_and_schemes(qc, str(d / "config.json"))
        src.quantization = hf_quant.describe(qc)
    found: dict[str, dict[str, tuple[SafetensorsFile, str]]] = {}
    for fn in files:
        if not (d / fn).is_file():
            raise QConvertError(f"{d / fn}: listed in the index but missing; the download is incomplete")
        f = SafetensorsFile(d / fn)
        src.closers.append(f.close)
        for name in f.names():
            part = hf_quant.split_part(name, quant[0]) if quant else None
            if part and part[0] + ".weight" in known:
                found.setdefault(part[0], {})[part[1]] = (f, name)
                continue
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # tied: the embedding is the head
            if name in src.tensors:
                raise QConvertError(f"{d / fn}: tensor {name} is also in another shard; the checkpoint is damaged")
            if name not in known:
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                raise QConvertError(f"{d / fn}: unexpected tensor {name!r} for a {cfg.arch} model; "
                                    "is config.json from the same checkpoint?")
            t = f.tensor(name)
            want = canonical_shape(name, cfg)
            if t.shape != want:
                raise QConvertError(f"{d / fn}: tensor {name} has shape {list(t.shape)}, config implies {list(want)}")
            src.tensors[name] = t
    for module, parts in found.items():
        _add_quantised(src, module, parts, quant, cfg, str(d))
    src.check_complete()
    return src


def _add_quantised(src: Source, module: str, parts: dict, quant: tuple, cfg: ModelConfig, where: str) -> None:
    """Add one quantised Linear (formats/hf/quantized_read.py) as its canonical float tensor and stored codes."""
    name = module + ".weight"
    if name in src.tensors:
        raise QConvertError(f"{where}: {module} is stored both as a float weight and as quantised parts")
    layout, schemes = quant
    scheme = schemes(module)
    if scheme is None:
        raise QConvertError(f"{where}: {module} has quantised parts but quantization_config leaves it unquantised; "
                            "is config.json from this checkpoint?")
    rows, cols = canonical_shape(name, cfg)
    qm = hf_quant.quant_linear(module, rows, cols, scheme, layout, parts, where)
    src.tensors[name] = hf_quant.lazy_tensor(qm)
    src.stored[name] = qm
