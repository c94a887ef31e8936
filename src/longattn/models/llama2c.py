"""The llama2.c checkpoint format (Karpathy's llama2.c "legacy" export), read and run directly.

The checkpoint runs as an instance of the project's one small-model implementation,
:class:`longattn.train.model.LanguageModel` (``as_language_model``), for two jobs: a float64
reference for the checkpoint (the bundled stories260K, ``longattn.models.stories260k()``: a real
Llama-architecture model trained on TinyStories, 512-token context, GQA) and a source of real
q/k/v for measuring attention methods on real attention. ``longattn.hf.llama2c`` converts the same
file to a transformers model.

Format (little-endian): 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size — negative
when the classifier is separate —, seq_len), then float32 arrays: token_embedding [vocab, dim];
rms_att [L, dim]; wq [L, dim, dim]; wk [L, kv_dim, dim]; wv [L, kv_dim, dim]; wo [L, dim, dim];
rms_ffn [L, dim]; w1 [L, hidden, dim]; w2 [L, dim, hidden]; w3 [L, hidden, dim]; rms_final [dim];
then the RoPE tables (recomputed, so positions past ``seq_len`` work) and, if unshared, the
classifier. RoPE rotates *adjacent* channel pairs (2i, 2i+1) of each head, theta 10000; the shared
model rotates pairs ``(i, i + hd/2)`` (rotate-half), so ``as_language_model`` reorders the rows of
``wq`` and ``wk`` of every head to ``(0, 2, 4, …, 1, 3, 5, …)``. The same reordering of q and k
leaves every ``q·k`` unchanged; ``forward(..., capture=...)`` undoes it, so captured q/k are in
the checkpoint's own channel order.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import longattn
from longattn.train.model import LanguageModel, ModelConfig


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
    weights: dict[str, torch.Tensor]  # float64, the file's layout
    #: ``as_language_model``'s models by dtype
    _language_models: dict = field(default_factory=dict, repr=False, compare=False)


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


def _pair_order(head_dim: int, device=None) -> torch.Tensor:
    """``(0, 2, 4, …, 1, 3, 5, …)``: adjacent pair ``(2i, 2i+1)`` moves to ``(i, i + hd/2)``."""
    return torch.cat([torch.arange(0, head_dim, 2, device=device), torch.arange(1, head_dim, 2, device=device)])


def as_language_model(model: Llama2cModel, dtype: torch.dtype = torch.float64) -> LanguageModel:
    """The checkpoint as a :class:`LanguageModel` in ``dtype`` (built once per dtype, then cached
    on ``model``; in eval mode, no gradients)."""
    if dtype in model._language_models:
        return model._language_models[dtype]
    cfg, w = model.config, model.weights
    lm_cfg = ModelConfig(vocab_size=cfg.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                         n_kv_heads=cfg.n_kv_heads, hidden_dim=cfg.hidden_dim, rope_theta=cfg.rope_theta,
                         norm_eps=cfg.norm_eps, max_train_length=cfg.seq_len, tie_embeddings=cfg.shared_classifier)
    hd = cfg.head_dim
    order = _pair_order(hd)

    def pairs_to_halves(m: torch.Tensor, heads: int) -> torch.Tensor:
        return m.view(heads, hd, -1)[:, order].reshape(heads * hd, -1)

    state = {"embed.weight": w["tok_embeddings"], "norm.weight": w["rms_final"]}
    if not cfg.shared_classifier:
        state["head.weight"] = w["output"]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        state.update({
            p + "attn_norm.weight": w["rms_att"][i], p + "wq.weight": pairs_to_halves(w["wq"][i], cfg.n_heads),
            p + "wk.weight": pairs_to_halves(w["wk"][i], cfg.n_kv_heads), p + "wv.weight": w["wv"][i],
            p + "wo.weight": w["wo"][i], p + "ffn_norm.weight": w["rms_ffn"][i], p + "w1.weight": w["w1"][i],
            p + "w2.weight": w["w2"][i], p + "w3.weight": w["w3"][i],
        })
    lm = LanguageModel(lm_cfg).to(dtype)
    lm.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    lm.eval().requires_grad_(False)
    model._language_models[dtype] = lm
    return lm


#: ``(layer, q, k, v) -> out``: the attention of one layer (q/k after RoPE); default exact causal
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _oracle(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return longattn.reference_attention(q, k, v, causal=True)[0].to(q.dtype)


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
        dtype: the compute dtype; float64 (default) runs the float64 oracle
            ``longattn.reference_attention`` unless ``attention`` or ``method`` says otherwise.
        attention: replaces the exact causal attention (e.g. a longattn method), given q/k after
            RoPE in the checkpoint's channel order.
        capture: if a list, each layer's ``(q, k, v)`` after RoPE (``[B, H, T, hd]``,
            ``[B, Hkv, T, hd]``, the checkpoint's channel order) is appended to it.
        method: a longattn method (name or object) run as
            ``longattn.attention(q, k, v, causal=True, method=method, position=RoPE(...))`` with
            q/k unrotated, so methods that assign positions themselves (LongHeads) work too.
            Excludes ``attention`` and ``capture``.
    """
    if method is not None and (attention is not None or capture is not None):
        raise ValueError("forward: pass either method= or attention=/capture=, not both")
    lm = as_language_model(model, dtype)
    with torch.no_grad():
        if method is not None:
            return lm(tokens, method=method)
        if attention is None and capture is None:
            return lm(tokens, attention=_oracle) if dtype == torch.float64 else lm(tokens)
        undo = torch.argsort(_pair_order(model.config.head_dim, tokens.device))
        own_order: list = []
        fn = attention if attention is not None else (
            _oracle if dtype == torch.float64 else lambda i, q, k, v: longattn.attention(q, k, v, causal=True))

        def in_checkpoint_order(layer, q, k, v):
            q, k = q[..., undo], k[..., undo]
            if capture is not None:
                own_order.append((q, k, v))
            return fn(layer, q, k, v)

        logits = lm(tokens, attention=in_checkpoint_order)
        if capture is not None:
            capture.extend(own_order)
        return logits


def generate(model: Llama2cModel, n_tokens: int, *, seed: int = 0, temperature: float = 1.0,
             prompt: list[int] | None = None, bos: int = 1) -> list[int]:
    """Sample (``temperature > 0``) or greedily decode (``0``) ``n_tokens`` after ``prompt``
    (default: BOS) in float32 with a KV cache, each story within the trained context: when a
    story reaches ``seq_len`` tokens or the model emits BOS, the cache restarts at a fresh BOS."""
    cfg = model.config
    lm = as_language_model(model, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    story = list(prompt) if prompt else [bos]
    state = None
    fed = 0  # tokens of `story` already in the cache

    while len(out) < n_tokens:
        logits = None
        with torch.no_grad():
            while fed < len(story):
                step_logits, state = lm(torch.tensor([[story[fed]]]), state=state, return_state=True)
                logits = step_logits[0, 0]
                fed += 1
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, -1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        out.append(nxt)
        story.append(nxt)
        if nxt == bos or len(story) >= cfg.seq_len:
            story, fed, state = [bos], 0, None
            if nxt != bos:
                out.append(bos)
    return out[:n_tokens]


def sample_windows(model: Llama2cModel, n: int, *, length: int | None = None, seed: int = 0,
                   temperature: float = 1.0, batch: int = 64, bos: int = 1) -> torch.Tensor:
    """``[n, length]`` int64: ``n`` windows sampled at once, ``batch`` at a time, each from BOS with a
    KV cache and continuing through the BOS tokens the model emits between stories — the shape of
    the model's own training windows (default ``length``: its ``seq_len``). Many streams per step
    make this ~``batch``× faster than :func:`generate`, whose cost is per call, not per token."""
    cfg = model.config
    length = cfg.seq_len if length is None else length
    for name, value in (("n", n), ("length", length), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if length > cfg.seq_len:
        raise ValueError(f"length={length} exceeds the model's trained context ({cfg.seq_len})")
    lm = as_language_model(model, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for start in range(0, n, batch):
            rows = min(batch, n - start)
            seq = torch.full((rows, 1), bos, dtype=torch.int64)
            logits, state = lm(seq, state=None, return_state=True)
            for _ in range(length - 1):
                last = logits[:, -1].float()
                if temperature == 0:
                    nxt = last.argmax(-1, keepdim=True)
                else:
                    nxt = torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=gen)
                seq = torch.cat([seq, nxt], 1)
                logits, state = lm(nxt, state=state, return_state=True)
            out.append(seq)
    return torch.cat(out)


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
