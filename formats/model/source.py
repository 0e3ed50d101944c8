"""What every format reader returns: one canonical model, tensors read lazily."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from formats.errors import QConvertError
from formats.model.config import ModelConfig
from formats.model.names import canonical_names
from formats.model.tensor import LazyTensor
from formats.model.tokenizer import TokenizerData


@dataclass
class Source:
    """A model opened for reading: config, tokenizer, and canonical-name -> LazyTensor (headers only read)."""

    config: ModelConfig
    tokenizer: TokenizerData
    tensors: dict[str, LazyTensor]
    path: str
    kind: str  # "hf" | "gguf" | "int4"
    generation_config: dict[str, Any] = field(default_factory=dict)
    parts: int = 1  # files of a split GGUF
    closers: list[Callable[[], None]] = field(default_factory=list)
    quantization: str | None = None  # a quantised HF checkpoint's scheme (GPTQ / AWQ / compressed-tensors)
    stored: dict[str, Any] = field(default_factory=dict)  # canonical name -> integer codes as stored (CodeMatrix)

    def check_complete(self) -> None:
        """Raise QConvertError if a tensor the config implies is missing."""
        missing = [n for n in canonical_names(self.config) if n not in self.tensors]
        if missing:
            more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
            raise QConvertError(f"{self.path}: missing tensors {', '.join(missing[:3])}{more}; "
                                "the checkpoint is incomplete or not a Qwen2 model")

    def close(self) -> None:
        """Release file handles."""
        for c in self.closers:
            c()
        self.closers.clear()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
