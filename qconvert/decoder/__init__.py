"""Reference Qwen2 / Qwen2-MoE decoders: numpy (fp32, CPU) and torch (fp32/bf16, CPU or CUDA)."""
from __future__ import annotations

from formats.model.source import Source


def make_decoder(src: Source, backend: str = "numpy", device: str = "cpu", dtype: str = "float32",
                 stream: bool = False):
    """Build a decoder for ``src``: ``backend`` numpy|torch; torch takes ``device`` cpu|cuda and ``dtype``.

    ``stream``: weights are touched a layer at a time and released after use (memory stays at about one
    layer, whatever the model's size); otherwise they stay resident once touched."""
    from formats.errors import QConvertError

    if backend == "numpy":
        if device != "cpu":
            raise QConvertError("the numpy backend runs on the CPU only; use --backend torch for --device cuda")
        from qconvert.decoder.numpy_backend import NumpyDecoder
        return NumpyDecoder(src, stream=stream)
    if backend == "torch":
        from qconvert.decoder.torch_backend import TorchDecoder
        return TorchDecoder(src, device=device, dtype=dtype, stream=stream)
    raise QConvertError(f"unknown backend {backend!r}; choose numpy or torch")
