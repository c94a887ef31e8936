"""The llama2.c checkpoint format (Karpathy's llama2.c "legacy" export), read and run directly.

A whole Llama forward in one page, for two jobs: a float64 reference for the checkpoint (the
bundled stories260K, ``longattn.models.stories260k()``: a real Llama-architecture model trained on
TinyStories, 512-token context, GQA) and a source of real q/k/v for measuring attention methods on
real attention.

Format (little-endian): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size — negative
when the classifier is separate —, seq_len), then float32 arrays: token_embedding [vocab, dim];
rms_att [L, dim]; wq [L, dim, dim]; wk [L, kv_dim, dim]; wv [L, kv_dim, dim]; wo [L, dim, dim];
rms_ffn [L, dim]; w1 [L, hidden, dim]; w2 [L, dim, hidden]; w3 [L, hidden, dim]; rms_final [dim];
then the RoPE tables (recomputed here, so positions past ``seq_len`` work) and, if unshared, the
classifier. RoPE rotates *adjacent* channel pairs (2i, 2i+1) of each head, theta 10000.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import longattn


@dataclass(frozen=True)
class Llama2cConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class Llama2cModel:
    config: Llama2cConfig
    weights: dict[str, torch.Tensor]  # float64


def load_checkpoint(path: str | Path) -> Llama2cModel:
    """Read a llama2.c ``.bin`` checkpoint into float64 tensors."""
    raw = Path(path).read_bytes()
    if len(raw) < 28:
        raise ValueError(f"{path} is {len(raw)} bytes: too short for a llama2.c header (28 bytes)")
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("<7i", raw[:28])
    if min(dim, hidden, layers, heads, kv_heads, seq_len) <= 0 or dim % heads or heads % kv_heads:
        raise ValueError(f"{path}: implausible llama2.c header {dim, hidden, layers, heads, kv_heads, vocab, seq_len}")
    cfg = Llama2cConfig(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len, shared_classifier=vocab > 0)
    data = np.frombuffer(raw, dtype="<f4", offset=28)
    kv_dim = dim * kv_heads // heads
    hd = dim // heads
    shapes = [
        ("tok_embeddings", (cfg.vocab_size, dim)), ("rms_att", (layers, dim)), ("wq", (layers, dim, dim)),
        ("wk", (layers, kv_dim, dim)), ("wv", (layers, kv_dim, dim)), ("wo", (layers, dim, dim)),
        ("rms_ffn", (layers, dim)), ("w1", (layers, hidden, dim)), ("w2", (layers, dim, hidden)),
        ("w3", (layers, hidden, dim)), ("rms_final", (dim,)), ("freq_cis_real", (seq_len, hd // 2)),
        ("freq_cis_imag", (seq_len, hd // 2)),
    ]
    if not cfg.shared_classifier:
        shapes.append(("output", (cfg.vocab_size, dim)))
    weights, off = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape))
        if off + n > data.size:
            raise ValueError(f"{path} ends inside '{name}': the file is truncated or not a llama2.c checkpoint")
        weights[name] = torch.from_numpy(data[off : off + n].astype(np.float64).reshape(shape))
        off += n
    if off != data.size:
        raise ValueError(f"{path} has {data.size - off} float32 values after the last tensor: not the expected layout")
    weights.pop("freq_cis_real"), weights.pop("freq_cis_imag")
    return Llama2cModel(cfg, weights)


def rope_interleaved(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate adjacent channel pairs ``(2i, 2i+1)`` of ``x [B, H, T, hd]`` by ``pos · theta^(-2i/hd)``."""
    hd = x.shape[-1]
    inv = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64, device=x.device) / hd)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]  # [T, hd/2]
    cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def _rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _qkv(w, cfg: Llama2cConfig, layer: int, x: torch.Tensor, pos: torch.Tensor):
    """The layer's q, k, v (``[B, H, T, hd]``, after RoPE) from the residual stream ``x [B, T, dim]``."""
    b, t, _ = x.shape
    hd = cfg.head_dim
    h = _rmsnorm(x, w["rms_att"][layer], cfg.norm_eps)
    q = (h @ w["wq"][layer].T).view(b, t, cfg.n_heads, hd).transpose(1, 2)
    k = (h @ w["wk"][layer].T).view(b, t, cfg.n_kv_heads, hd).transpose(1, 2)
    v = (h @ w["wv"][layer].T).view(b, t, cfg.n_kv_heads, hd).transpose(1, 2)
    return rope_interleaved(q, pos, cfg.rope_theta), rope_interleaved(k, pos, cfg.rope_theta), v


def _qkv_unrotated(w, cfg: Llama2cConfig, layer: int, x: torch.Tensor):
    """The layer's q, k, v *before* RoPE with each head's channels reordered ``(0, 2, 4, …, 1, 3,
    5, …)``: llama2.c rotates adjacent pairs ``(2i, 2i+1)``; after this reordering pair ``i`` sits at
    ``(i, i + hd/2)``, the rotate-half layout of ``longattn.positions.RoPE``. The same reordering of
    q and k leaves every ``q·k`` unchanged, so ``attention(q, k, v, position=RoPE(hd, theta))``
    computes what the checkpoint computes — and methods that place positions themselves
    (``own_positions``) get q/k they can rotate."""
    b, t, _ = x.shape
    hd = cfg.head_dim
    h = _rmsnorm(x, w["rms_att"][layer], cfg.norm_eps)
    order = torch.cat([torch.arange(0, hd, 2, device=x.device), torch.arange(1, hd, 2, device=x.device)])
    q = (h @ w["wq"][layer].T).view(b, t, cfg.n_heads, hd)[..., order].transpose(1, 2)
    k = (h @ w["wk"][layer].T).view(b, t, cfg.n_kv_heads, hd)[..., order].transpose(1, 2)
    v = (h @ w["wv"][layer].T).view(b, t, cfg.n_kv_heads, hd).transpose(1, 2)
    return q, k, v


def _finish_layer(w, cfg: Llama2cConfig, layer: int, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Add the attention output ``o [B, H, T, hd]`` and the SwiGLU feed-forward to ``x``."""
    b, t, _ = x.shape
    x = x + o.transpose(1, 2).reshape(b, t, cfg.dim) @ w["wo"][layer].T
    h = _rmsnorm(x, w["rms_ffn"][layer], cfg.norm_eps)
    return x + (torch.nn.functional.silu(h @ w["w1"][layer].T) * (h @ w["w3"][layer].T)) @ w["w2"][layer].T


#: ``(layer, q, k, v) -> out``: the attention of one layer (q/k after RoPE); default exact causal
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def forward(
    model: Llama2cModel,
    tokens: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    attention: AttentionFn | None = None,
    capture: list | None = None,
    method=None,
) -> torch.Tensor:
    """Logits ``[B, T, vocab]`` for ``tokens [B, T]`` at positions ``0 … T-1``.

    Args:
        attention: replaces the exact causal attention (e.g. a longattn method).
        capture: if a list, each layer's ``(q, k, v)`` after RoPE (``[B, H, T, hd]``,
            ``[B, Hkv, T, hd]``) is appended to it.
        method: a longattn method (name or object) run as
            ``longattn.attention(q, k, v, causal=True, method=method, position=RoPE(...))`` with
            q/k unrotated, so methods that assign positions themselves (LongHeads) work too.
            Excludes ``attention`` and ``capture``.
    """
    if method is not None:
        if attention is not None or capture is not None:
            raise ValueError("forward: pass either method= or attention=/capture=, not both")
        return _forward_with_method(model, tokens, method, dtype)
    cfg, w = model.config, {k: v.to(dtype) for k, v in model.weights.items()}
    x = w["tok_embeddings"][tokens]
    pos = torch.arange(tokens.shape[1], device=x.device)
    for layer in range(cfg.n_layers):
        q, k, v = _qkv(w, cfg, layer, x, pos)
        if capture is not None:
            capture.append((q, k, v))
        if attention is None:
            o = longattn.reference_attention(q, k, v, causal=True)[0].to(dtype) if dtype == torch.float64 else \
                longattn.attention(q, k, v, causal=True)
        else:
            o = attention(layer, q, k, v)
        x = _finish_layer(w, cfg, layer, x, o)
    x = _rmsnorm(x, w["rms_final"], cfg.norm_eps)
    head = w["tok_embeddings"] if cfg.shared_classifier else w["output"]
    return x @ head.T


def _forward_with_method(model: Llama2cModel, tokens: torch.Tensor, method, dtype: torch.dtype) -> torch.Tensor:
    from longattn.core.positions import RoPE

    cfg, w = model.config, {k: v.to(dtype) for k, v in model.weights.items()}
    rope = RoPE(cfg.head_dim, cfg.rope_theta)
    x = w["tok_embeddings"][tokens]
    for layer in range(cfg.n_layers):
        q, k, v = _qkv_unrotated(w, cfg, layer, x)
        o = longattn.attention(q, k, v, causal=True, method=method, position=rope)
        x = _finish_layer(w, cfg, layer, x, o.to(dtype))
    x = _rmsnorm(x, w["rms_final"], cfg.norm_eps)
    head = w["tok_embeddings"] if cfg.shared_classifier else w["output"]
    return x @ head.T


def generate(model: Llama2cModel, n_tokens: int, *, seed: int = 0, temperature: float = 1.0,
             prompt: list[int] | None = None, bos: int = 1) -> list[int]:
    """Sample (``temperature > 0``) or greedily decode (``0``) ``n_tokens`` after ``prompt``
    (default: BOS) in float32 with a KV cache, each story within the trained context: when a
    story reaches ``seq_len`` tokens or the model emits BOS, the cache restarts at a fresh BOS."""
    cfg = model.config
    w = {k: v.to(torch.float32) for k, v in model.weights.items()}
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    story = list(prompt) if prompt else [bos]
    cache_k: list[torch.Tensor] = []
    cache_v: list[torch.Tensor] = []
    fed = 0  # tokens of `story` already in the cache

    def step(token: int, position: int) -> torch.Tensor:
        x = w["tok_embeddings"][token][None, None]
        pos = torch.tensor([position], device=x.device)
        for layer in range(cfg.n_layers):
            q, k, v = _qkv(w, cfg, layer, x, pos)
            if len(cache_k) <= layer:
                cache_k.append(k)
                cache_v.append(v)
            else:
                cache_k[layer] = torch.cat([cache_k[layer], k], 2)
                cache_v[layer] = torch.cat([cache_v[layer], v], 2)
            o = longattn.attention(q, cache_k[layer], cache_v[layer], causal=True)
            x = _finish_layer(w, cfg, layer, x, o)
        x = _rmsnorm(x, w["rms_final"], cfg.norm_eps)
        return (x @ w["tok_embeddings"].T)[0, 0]

    while len(out) < n_tokens:
        logits = None
        while fed < len(story):
            logits = step(story[fed], fed)
            fed += 1
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, -1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
        story.append(nxt)
        if nxt == bos or len(story) >= cfg.seq_len:
            story, fed = [bos], 0
            cache_k.clear()
            cache_v.clear()
            if nxt != bos:
                out.append(bos)
    return out[:n_tokens]


class Tokenizer:
    """The llama2.c tokenizer file (``tok512.bin``): int32 max piece length, then per token a
    float32 merge score, an int32 byte length and the bytes. Tokens ``<0xXX>`` are byte fallbacks.
    Encoding merges the adjacent pair whose concatenation is the best-scoring piece, repeatedly
    (SentencePiece-style BPE), after a leading space as llama2.c adds."""

    def __init__(self, path: str | Path):
        raw = Path(path).read_bytes()
        self.max_len = struct.unpack("<i", raw[:4])[0]
        off = 4
        self.pieces: list[bytes] = []
        self.scores: list[float] = []
        while off < len(raw):
            score, n = struct.unpack("<fi", raw[off : off + 8])
            off += 8
            self.pieces.append(raw[off : off + n])
            self.scores.append(score)
            off += n
        self.index = {p: i for i, p in enumerate(self.pieces)}
        self.bos, self.eos = 1, 2

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids: list[int] = []
        for ch in (" " + text) if text else "":
            piece = ch.encode()
            if piece in self.index:
                ids.append(self.index[piece])
            else:
                ids.extend(b + 3 for b in piece)  # byte fallback tokens <0x00>… start at 3
        while True:
            best, best_i = -math.inf, -1
            for i in range(len(ids) - 1):
                j = self.index.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]])
                if j is not None and self.scores[j] > best:
                    best, best_i = self.scores[j], i
            if best_i < 0:
                break
            ids[best_i : best_i + 2] = [self.index[self.pieces[ids[best_i]] + self.pieces[ids[best_i + 1]]]]
        return ([self.bos] if bos else []) + ids

    def decode(self, ids: list[int]) -> str:
        out = bytearray()
        prev = None
        for i in ids:
            piece = self.pieces[i]
            if i in (self.bos, self.eos):
                prev = i
                continue
            if prev == self.bos and piece.startswith(b" "):
                piece = piece[1:]
            if piece.startswith(b"<0x") and piece.endswith(b">") and len(piece) == 6:
                piece = bytes([int(piece[3:5], 16)])
            out += piece
            prev = i
        return out.decode("utf-8", errors="replace")
