"""The project's own tiny retrieval model: a Llama-architecture decoder trained on passkey /
needle / MQAR at <= 512 tokens (``longattn.models.train_retrieval``), so that every longattn method
can be asked whether it extends retrieval far past the trained length.

Architecture (Touvron et al. 2023, "LLaMA"): token embedding (tied with the output head),
``n_layers`` pre-norm blocks of RMSNorm → causal self-attention with rotary positions (RoPE, Su et
al. 2021) and grouped-query heads (Ainslie et al. 2023) → residual, RMSNorm → SwiGLU feed-forward
(Shazeer 2020) → residual; a final RMSNorm. No biases.

Attention always goes through ``longattn.attention(q, k, v, causal=True, method=...,
position=RoPE(...))`` with q/k *unrotated*: ``attention`` rotates them for ordinary methods and
hands the encoding to methods that place positions themselves (``own_positions``: LongHeads), so
every registered method runs inside the model unchanged.

A checkpoint is a directory with ``model.safetensors`` (float32 weights) and ``config.json`` (the
architecture, the vocabulary it was trained on, the training settings and seed, and its measured
accuracies). The shipped one lives in ``weights/retrieval-tiny`` next to this file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import longattn
from longattn.core.positions import RoPE
from longattn.models.bundled import retrieval_tiny
from longattn.methods.base import Method
from longattn.tasks.synthetic import VOCAB, TaskBatch

Tensor = torch.Tensor
FORMAT = "longattn-retrieval"
#: the checkpoint bundled with the package (``longattn.models.retrieval_tiny()``)
SHIPPED = retrieval_tiny()

MethodArg = None | str | Method | Sequence[None | str | Method]


@dataclass(frozen=True)
class RetrievalConfig:
    """Architecture of the tiny retrieval model.

    Args:
        vocab_size: ids of ``longattn.tasks.VOCAB`` (176).
        dim: residual width, ``n_heads × head_dim``.
        n_layers: decoder blocks (2 suffice for an induction circuit: a previous-token head in
            block 0 feeding a copying head in block 1; Olsson et al. 2022).
        n_heads, n_kv_heads: query heads and key/value heads (GQA when fewer).
        hidden_dim: SwiGLU inner width.
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        max_train_length: longest training sequence (the "trained length").
    """

    vocab_size: int = VOCAB.size
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_train_length: int = 512

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_train_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim={self.dim // self.n_heads} must be even (RoPE rotates channel pairs)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    """``x / rms(x) · w`` (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    """One pre-norm decoder block's weights (the computation is in ``_block``)."""

    def __init__(self, cfg: RetrievalConfig):
        super().__init__()
        hd = cfg.head_dim
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down


class RetrievalModel(nn.Module):
    """Weights of the tiny Llama; run it with ``forward(model, tokens, method)``."""

    def __init__(self, config: RetrievalConfig, *, seed: int = 0):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        """GPT-2-style init, seeded: N(0, 0.02), residual outputs scaled by ``1/sqrt(2·n_layers)``."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                continue
            std = 0.02 / math.sqrt(2 * self.config.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen, device=gen.device) * std)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# --------------------------------------------------------------------------------------------
# forward


def _methods(model: RetrievalModel, method: MethodArg) -> list:
    n = model.config.n_layers
    if method is None or isinstance(method, (str, Method)):
        return [method or "dense"] * n
    if isinstance(method, Sequence) and len(method) == n:
        return [m or "dense" for m in method]
    raise TypeError(
        f"method must be None, a registered name, a longattn method or a list of {n} of those (one per layer), "
        f"got {method!r}"
    )


def _check_tokens(model: RetrievalModel, tokens: Tensor) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.int64:
        got = f"{tokens.dtype} tensor of shape {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be an int64 tensor [batch, length], got {got}")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= model.config.vocab_size):
        raise ValueError(f"tokens must be ids in [0, {model.config.vocab_size}), got range "
                         f"[{int(tokens.min())}, {int(tokens.max())}]")


def forward(model: RetrievalModel, tokens: Tensor, method: MethodArg = None, *,
            logits_at: Tensor | None = None) -> Tensor:
    """Logits of the model at positions ``0 … T-1``, every attention by ``method``.

    Args:
        tokens: int64 ``[B, T]``.
        method: None (= "dense"), a registered name (default hyper-parameters), a method object
            (``longattn.method("landmark", budget=512)``), or a list with one of those per layer.
        logits_at: optional int64 ``[B, m]``: return only the logits at these positions (the
            head is the largest tensor at long lengths).

    Returns:
        float32 ``[B, T, vocab]`` or ``[B, m, vocab]``. Differentiable (training uses "dense").
    """
    _check_tokens(model, tokens)
    cfg = model.config
    methods = _methods(model, method)
    rope = RoPE(cfg.head_dim, cfg.rope_theta)
    b, t = tokens.shape
    hd = cfg.head_dim
    x = model.embed(tokens)
    for layer, m in zip(model.layers, methods):
        h = layer.attn_norm(x)
        q = layer.wq(h).view(b, t, cfg.n_heads, hd).transpose(1, 2)
        k = layer.wk(h).view(b, t, cfg.n_kv_heads, hd).transpose(1, 2)
        v = layer.wv(h).view(b, t, cfg.n_kv_heads, hd).transpose(1, 2)
        # q/k unrotated: attention rotates them, or gives RoPE to an own_positions method
        o = longattn.attention(q, k, v, causal=True, method=m, position=rope)
        x = x + layer.wo(o.transpose(1, 2).reshape(b, t, cfg.n_heads * hd))
        h = layer.ffn_norm(x)
        x = x + layer.w2(torch.nn.functional.silu(layer.w1(h)) * layer.w3(h))
    if logits_at is not None:
        x = x.gather(1, logits_at[..., None].expand(-1, -1, cfg.dim))
    return model.norm(x) @ model.embed.weight.T


def _rotate_f64(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotate-half RoPE in float64, written out (independent of ``longattn.positions``)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cos(ang), torch.sin(ang)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def reference_forward(model: RetrievalModel, tokens: Tensor) -> Tensor:
    """The same model in float64 with the oracle ``longattn.reference_attention`` and its own
    RoPE: ``[B, T, vocab]`` float64. For tests (materialises ``T × T`` scores)."""
    _check_tokens(model, tokens)
    cfg = model.config
    w = {k: v.detach().to(torch.float64) for k, v in model.state_dict().items()}
    b, t = tokens.shape
    hd = cfg.head_dim
    pos = torch.arange(t, device=tokens.device)

    def norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * weight

    x = w["embed.weight"][tokens]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = norm(x, w[p + "attn_norm.weight"])
        q = (h @ w[p + "wq.weight"].T).view(b, t, cfg.n_heads, hd).transpose(1, 2)
        k = (h @ w[p + "wk.weight"].T).view(b, t, cfg.n_kv_heads, hd).transpose(1, 2)
        v = (h @ w[p + "wv.weight"].T).view(b, t, cfg.n_kv_heads, hd).transpose(1, 2)
        q, k = _rotate_f64(q, pos, cfg.rope_theta), _rotate_f64(k, pos, cfg.rope_theta)
        o = longattn.reference_attention(q, k, v, causal=True)[0]
        x = x + o.transpose(1, 2).reshape(b, t, -1) @ w[p + "wo.weight"].T
        h = norm(x, w[p + "ffn_norm.weight"])
        gate = torch.nn.functional.silu(h @ w[p + "w1.weight"].T)
        x = x + (gate * (h @ w[p + "w3.weight"].T)) @ w[p + "w2.weight"].T
    return norm(x, w["norm.weight"]) @ w["embed.weight"].T


# --------------------------------------------------------------------------------------------
# evaluation


@dataclass
class Accuracy:
    """Exact-match retrieval accuracy of one method on one ``TaskBatch``.

    Attributes:
        accuracy: share of samples whose every answer token is the argmax (= greedy decode right).
        token_accuracy: share of answer tokens right.
        correct: bool ``[n]`` per sample.
        n: samples.
    """

    accuracy: float
    token_accuracy: float
    correct: Tensor
    n: int


def answer_loss(model: RetrievalModel, batch: TaskBatch, method: MethodArg = None) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy over the answer tokens and the per-token hits ``[n, m]`` (bool)."""
    logits = forward(model, batch.tokens, method, logits_at=batch.answer_pos - 1)
    targets = batch.targets
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    mask = batch.answer_mask
    loss = (ce * mask).sum() / mask.sum()
    hits = (logits.argmax(-1) == targets) | ~mask
    return loss, hits


def evaluate(model: RetrievalModel, batch: TaskBatch, method: MethodArg = None, *,
             batch_size: int = 1) -> Accuracy:
    """Teacher-forced argmax on every answer token of ``batch`` with attention by ``method``; a
    sample counts as right only if all its answer tokens are. ``batch_size`` samples run at once
    (1 keeps memory low at 16k–32k tokens). No gradients, float32."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    correct, hits_all = [], 0
    with torch.no_grad():
        for i in range(0, batch.n, batch_size):
            part = batch.take(i, i + batch_size)
            _, hits = answer_loss(model, part, method)
            correct.append(hits.all(-1))
            hits_all += int((hits & part.answer_mask).sum())
    correct = torch.cat(correct)
    return Accuracy(float(correct.float().mean()), hits_all / max(1, int(batch.answer_mask.sum())), correct, batch.n)


# --------------------------------------------------------------------------------------------
# checkpoints


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("saving/loading the retrieval model needs the 'safetensors' package: "
                          "pip install safetensors") from e
    return safetensors.torch


def save(model: RetrievalModel, directory: str | Path, *, training: dict[str, Any] | None = None,
         evaluation: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` (float32) and ``config.json`` (architecture, vocabulary,
    ``training`` settings incl. the seed, ``evaluation`` results) into ``directory``."""
    from longattn.files import atomic_write, atomic_write_text

    directory = Path(directory)
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    st = _safetensors()
    atomic_write(directory / "model.safetensors", lambda tmp: st.save_file(tensors, str(tmp), metadata={"format": FORMAT}))
    meta = {
        "format": FORMAT,
        "model": dataclasses.asdict(model.config),
        "vocab": {**dataclasses.asdict(VOCAB), "size": VOCAB.size, "module": "longattn.tasks.synthetic"},
        "training": training or {},
        "evaluation": evaluation or {},
    }
    atomic_write_text(directory / "config.json", json.dumps(meta, indent=2) + "\n")
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory."""
    path = Path(directory) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a retrieval checkpoint is a directory with config.json and "
                                "model.safetensors")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load(directory: str | Path = SHIPPED) -> RetrievalModel:
    """Load a checkpoint directory (default: the shipped ``retrieval-tiny``), in eval mode."""
    directory = Path(directory)
    meta = read_config(directory)
    vocab = meta.get("vocab", {})
    if vocab.get("size") != VOCAB.size:
        raise ValueError(f"{directory} was trained on a vocabulary of {vocab.get('size')} ids, but "
                         f"longattn.tasks.VOCAB has {VOCAB.size}")
    model = RetrievalModel(RetrievalConfig(**meta["model"]))
    tensors = _safetensors().load_file(str(directory / "model.safetensors"))
    model.load_state_dict(tensors, strict=True)
    return model.eval()
