"""The decoder in torch: float32 or bfloat16 weights, on CUDA when asked, else the CPU.

Same blocks as the numpy reference (see numpy_backend.py), with a static KV cache allocated once so
decoding on a GPU does no allocation per token. Norms, softmax and rotary tables run in float32
whatever the weight dtype (Qwen2 overflows in float16, which is therefore refused).
"""
from __future__ import annotations

import numpy as np

from formats import threads
from formats.errors import QConvertError
from formats.model.source import Source
from qconvert.decoder.dca import DualChunk
from qconvert.decoder.model import LayerNames, lm_head_name, load_f32
from qconvert.decoder.rope import inv_freq_and_scale

DTYPES = ("float32", "bfloat16")


class TorchKVCache:
    """Static cache: k/v [layers, kv_heads, max_len, head_dim] on the decoder's device."""

    def __init__(self, dec: "TorchDecoder", max_len: int):
        import torch
        c = dec.cfg
        shape = (c.num_hidden_layers, c.num_key_value_heads, max_len, c.head_dim)
        self.k = torch.zeros(shape, dtype=dec.dtype, device=dec.device)
        self.v = torch.zeros(shape, dtype=dec.dtype, device=dec.device)
        self.length = 0
        self.max_len = max_len


class TorchDecoder:
    """Qwen2 / Qwen2-MoE forward pass in torch."""

    def __init__(self, src: Source, device: str = "cpu", dtype: str = "float32", stream: bool = False):
        import torch
        if dtype not in DTYPES:
            raise QConvertError(f"dtype {dtype!r} is not supported; use float32 or bfloat16 (Qwen2 overflows in float16)")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise QConvertError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
        self.torch = torch
        threads.sync_libraries()
        self.cfg = cfg = src.config
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.src, self.stream = src, stream
        self.layers = [LayerNames(i) for i in range(cfg.num_hidden_layers)]
        # streaming: a layer's weights are loaded (one tensor at a time, converted on the way) before it
        # runs and dropped after; otherwise every weight is loaded once here
        self.layer_names = [[n for n in src.tensors if n.startswith(f"model.layers.{i}.")] for i in range(len(self.layers))]
        in_layers = {n for names in self.layer_names for n in names}
        self.w = {}
        for name in src.tensors:
            if not (stream and name in in_layers):
                self._load(name)
        self.head = self.w[lm_head_name(cfg)].to(self.dtype)
        inv, self.rope_scale = inv_freq_and_scale(cfg)
        self.inv_freq = torch.from_numpy(inv).to(self.device)
        self.dca = DualChunk.of(cfg)  # runs as plain attention while that is exact; beyond, refused (hidden)

    def _load(self, name: str) -> None:
        """One tensor onto the device: 1-D tensors and routers in float32, matrices in the decoder's dtype."""
        t = self.torch.from_numpy(load_f32(self.src, name))
        keep_f32 = t.ndim == 1 or name.endswith("mlp.gate.weight") or name.endswith("shared_expert_gate.weight")
        self.w[name] = t.to(self.device, self.torch.float32 if keep_f32 else self.dtype)

    def new_cache(self, max_len: int) -> TorchKVCache:
        """An empty static KV cache for up to ``max_len`` positions."""
        return TorchKVCache(self, max_len)

    def _norm(self, x, w):
        t = self.torch
        xf = x.float()
        xf = xf * t.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return (xf * w).to(self.dtype)

    def _lin(self, x, name, bias=None):
        return self.torch.nn.functional.linear(x, self.w[name], None if bias is None else self.w[bias].to(x.dtype))

    def _rotate(self, x, cos, sin):
        half = x.shape[-1] // 2
        rot = self.torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return (x.float() * cos + rot.float() * sin).to(self.dtype)

    def _attention(self, x, n, cache, layer, cos, sin):
        t, cfg = self.torch, self.cfg
        T, hd, nh, nkv = x.shape[0], cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        q = self._lin(x, n.q, n.q_b).view(T, nh, hd).transpose(0, 1)      # [nh, T, hd]
        k = self._lin(x, n.k, n.k_b).view(T, nkv, hd).transpose(0, 1)
        v = self._lin(x, n.v, n.v_b).view(T, nkv, hd).transpose(0, 1)
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        s, e = cache.length, cache.length + T
        cache.k[layer, :, s:e] = k
        cache.v[layer, :, s:e] = v
        K, V = cache.k[layer, :, :e], cache.v[layer, :, :e]
        g = cfg.n_kv_groups
        qg = q.reshape(nkv, g * T, hd).float()
        scores = (qg @ K.float().transpose(1, 2)) / float(np.sqrt(hd))         # [nkv, g*T, S]
        if T > 1:
            qpos = t.arange(s, e, device=x.device).repeat(g)
            mask = t.arange(e, device=x.device)[None, :] > qpos[:, None]
            scores = scores.masked_fill(mask[None], float("-inf"))
        out = (t.softmax(scores, dim=-1) @ V.float()).to(self.dtype)          # [nkv, g*T, hd]
        out = out.reshape(nh, T, hd).transpose(0, 1).reshape(T, nh * hd)
        return self._lin(out, n.o)

    def _mlp(self, x, gate, up, down):
        return self._lin(self.torch.nn.functional.silu(self._lin(x, gate)) * self._lin(x, up), down)

    def _moe(self, x, n):
        t, cfg = self.torch, self.cfg
        probs = t.softmax(t.nn.functional.linear(x.float(), self.w[n.router]), dim=-1)
        weights, top = t.topk(probs, cfg.num_experts_per_tok, dim=-1)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        out = t.zeros_like(x, dtype=t.float32)
        for e in t.unique(top).tolist():
            rows, slot = t.nonzero(top == e, as_tuple=True)
            ye = self._mlp(x[rows], n.expert(e, "gate_proj"), n.expert(e, "up_proj"), n.expert(e, "down_proj"))
            out.index_add_(0, rows, ye.float() * weights[rows, slot][:, None])
        shared = self._mlp(x, n.sh_gate, n.sh_up, n.sh_down).float()
        gate = t.sigmoid(t.nn.functional.linear(x.float(), self.w[n.sh_router]))
        return (out + gate * shared).to(self.dtype)

    def forward(self, tokens, cache: TorchKVCache, last_only: bool = False) -> np.ndarray:
        """Logits [T, vocab] (float32 numpy) of ``tokens`` after what the cache holds (only the last row
        with ``last_only``); the cache grows by T."""
        return self.forward_tensor(tokens, cache, last_only).float().cpu().numpy()

    def forward_tensor(self, tokens, cache: TorchKVCache, last_only: bool = False):
        """As ``forward`` but returns the logits as a tensor on the device."""
        with self.torch.inference_mode():
            return self.torch.nn.functional.linear(self.hidden(tokens, cache, last_only), self.head)

    def logit_chunks(self, tokens, chunk: int = 128):
        """Full-sequence logits from an empty cache as float32 numpy arrays of ``chunk`` positions each."""
        h = self.hidden(tokens, self.new_cache(len(tokens)))
        with self.torch.inference_mode():
            for t0 in range(0, h.shape[0], chunk):
                yield self.torch.nn.functional.linear(h[t0:t0 + chunk], self.head).float().cpu().numpy()

    def hidden(self, tokens, cache: TorchKVCache, last_only: bool = False):
        """Final normed hidden states (a device tensor) of ``tokens`` after what the cache holds."""
        t, cfg = self.torch, self.cfg
        with t.inference_mode():
            ids = t.as_tensor(np.asarray(tokens, dtype=np.int64).reshape(-1), device=self.device)
            T = ids.shape[0]
            if cache.length + T > cache.max_len:
                raise ValueError(f"KV cache holds {cache.max_len} positions; {cache.length + T} needed")
            dca, L = self.dca, cache.length + T
            if dca and (L > dca.chunk_size or dca.length_scale(L) != 1.0):  # else DCA equals plain attention
                raise QConvertError(f"{L} positions exceed what plain attention reproduces of this model's dual "
                                    f"chunk attention ({min(dca.chunk_size, dca.original or dca.chunk_size)}); "
                                    "dual chunk attention is implemented in the numpy backend; use --backend numpy")
            pos = t.arange(cache.length, cache.length + T, device=self.device, dtype=t.float32)
            freqs = pos[:, None] * self.inv_freq[None, :]
            emb = t.cat([freqs, freqs], dim=-1)
            cos, sin = emb.cos() * self.rope_scale, emb.sin() * self.rope_scale
            x = self.w["model.embed_tokens.weight"][ids].to(self.dtype)
            for i, n in enumerate(self.layers):
                if self.stream:
                    for name in self.layer_names[i]:
                        self._load(name)
                x = x + self._attention(self._norm(x, self.w[n.ln1]), n, cache, i, cos, sin)
                h = self._norm(x, self.w[n.ln2])
                x = x + (self._moe(h, n) if cfg.is_moe else self._mlp(h, n.gate, n.up, n.down))
                if self.stream:
                    for name in self.layer_names[i]:
                        del self.w[name]
            cache.length += T
            if last_only:
                x = x[-1:]
            return self._norm(x, self.w["model.norm.weight"])

    def logits(self, tokens) -> np.ndarray:
        """Full-sequence logits [T, vocab] from an empty cache."""
        return np.concatenate(list(self.logit_chunks(tokens)))
