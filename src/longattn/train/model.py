"""The project's one small language model: a Llama-style decoder whose sequence mixer is any
longattn softmax method or any recurrent layer.

Architecture (Touvron et al. 2023, "LLaMA"): token embedding, ``n_layers`` pre-norm blocks of
RMSNorm → sequence mixer → residual, RMSNorm → SwiGLU feed-forward (Shazeer 2020) → residual, a
final RMSNorm and the output head (tied to the embedding unless ``tie_embeddings=False``). No
biases.

The mixer of every block is one of:

* ``"attention"`` — causal self-attention with rotary positions (RoPE, Su et al. 2021, rotate-half
  channel pairing) and grouped-query heads (Ainslie et al. 2023). It always goes through
  ``longattn.attention(q, k, v, causal=True, method=..., position=RoPE(...))`` with q/k
  *unrotated*, so every registered softmax method runs inside the model unchanged (the method is
  chosen per call, not stored in the weights: train dense, evaluate sparse).
* a name of :data:`longattn.recurrent.layers.LAYERS` (``"linear"``, ``"lightning"``, ``"gla"``,
  ``"gated_deltanet"``, …) — that layer with ``mixer_options`` as its keyword arguments. Recurrent
  mixers carry their own notion of order and get no rotary positions.

Three things are built on this one class: the tiny retrieval model
(:mod:`longattn.models.retrieval`), the direct llama2.c forward (:mod:`longattn.models.llama2c`,
stories260K) and every model the training harness (:mod:`longattn.train.loop`) trains.

State: ``forward(..., state=..., return_state=True)`` continues a sequence. An attention block's
state is its cache of unrotated keys and values (``KVState``; the rotary encoding places the new
queries after them: longattn's bottom-right alignment), a recurrent block's state the layer's own.
Prefill in pieces and one-token decoding then equal one pass over the whole sequence.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

import longattn
from longattn.core.positions import RoPE, _apply_rotation
from longattn.methods.base import Method

Tensor = torch.Tensor

#: the softmax mixer's name in :attr:`ModelConfig.mixer`
ATTENTION = "attention"

MethodArg = None | str | Method | Sequence[None | str | Method]

#: ``(layer, q, k, v) -> out [B, Hq, T, hd]``: replaces the attention of an attention block, q/k
#: already rotated (``[B, Hq, T, hd]``, ``[B, Hkv, Tk, hd]``)
AttentionFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]


def _recurrent_layers() -> dict[str, type]:
    from longattn.recurrent.layers import LAYERS

    return LAYERS


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a :class:`LanguageModel` (all of it goes into a checkpoint's config.json).

    Args:
        vocab_size: token ids ``0 … vocab_size-1``.
        dim: residual width, ``n_heads × head_dim``.
        n_layers: decoder blocks.
        n_heads, n_kv_heads: query heads and key/value heads (grouped when fewer; recurrent mixers
            get them as ``heads`` / ``kv_heads``).
        hidden_dim: SwiGLU inner width.
        rope_theta: RoPE base (attention mixers).
        norm_eps: RMSNorm epsilon.
        max_train_length: the longest sequence the model is trained on (its "trained length").
        mixer: ``"attention"`` or a recurrent layer name (``longattn.recurrent.layers.LAYERS``).
        mixer_options: keyword arguments of the recurrent layer (``{"feature_map": "elu"}``,
            ``{"chunk": 64}``, …); empty for attention.
        tie_embeddings: the output head is the embedding matrix (else a separate ``head``).
        short_conv: kernel size of a depthwise causal convolution over each block's normalised
            input, before the mixer (0: none). Based, Gated DeltaNet and Titans place one there: a
            fixed-state mixer without positions cannot tell the previous token from the others,
            and an induction circuit (what associative recall needs) starts with exactly that.
            Initialised to the identity (last tap 1), so it starts as no convolution at all.
        learned_attention: learned parts of a sparse attention method held by every attention
            block: ``"nsa"`` (NSA's compression maps and gates, ``longattn.methods.nsa.NSAParams``)
            or ``"dsa_indexer"`` (DSA's lightning indexer, ``longattn.methods.dsa.DSAIndexer``);
            "" for none. Running the model with that method binds each block's own parameters.
        learned_options: keyword arguments of those parts (``{"compress_block": 32}``,
            ``{"index_heads": 4, "index_dim": 16}``).
    """

    vocab_size: int = 512
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_train_length: int = 512
    mixer: str = ATTENTION
    mixer_options: dict[str, Any] = field(default_factory=dict)
    tie_embeddings: bool = True
    short_conv: int = 0
    learned_attention: str = ""
    learned_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_train_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if isinstance(self.short_conv, bool) or not isinstance(self.short_conv, int) or self.short_conv < 0:
            raise ValueError(f"short_conv must be a non-negative int (a kernel size; 0: none), got {self.short_conv!r}")
        if not isinstance(self.mixer, str):
            raise TypeError(f"mixer must be a str, got {type(self.mixer).__name__}")
        if self.mixer == ATTENTION:
            if (self.dim // self.n_heads) % 2:
                raise ValueError(f"head_dim={self.dim // self.n_heads} must be even (RoPE rotates channel pairs)")
            if self.mixer_options:
                raise ValueError(f"mixer_options apply to recurrent mixers; the attention mixer takes none, "
                                 f"got {self.mixer_options!r}")
        elif self.mixer not in _recurrent_layers():
            raise ValueError(f"mixer must be {ATTENTION!r} or one of {sorted(_recurrent_layers())}, got {self.mixer!r}")
        if not isinstance(self.mixer_options, dict):
            raise TypeError(f"mixer_options must be a dict, got {type(self.mixer_options).__name__}")
        if self.learned_attention not in LEARNED:
            raise ValueError(f"learned_attention must be one of {sorted(LEARNED)}, got {self.learned_attention!r}")
        if self.learned_attention and self.mixer != ATTENTION:
            raise ValueError(f"learned_attention={self.learned_attention!r} needs the attention mixer, got "
                             f"mixer={self.mixer!r}")
        if not isinstance(self.learned_options, dict):
            raise TypeError(f"learned_options must be a dict, got {type(self.learned_options).__name__}")
        if self.learned_options and not self.learned_attention:
            raise ValueError("learned_options were given without learned_attention")
        if self.learned_attention:
            with torch.device("meta"):  # a bad option is named now
                _learned_parts(self)
        if self.mixer != ATTENTION:
            # build the layer once without memory (meta tensors), so a bad option is named here and not
            # at the first forward or deep inside a training run
            from longattn.recurrent.layers import make_layer

            with torch.device("meta"):
                make_layer(self.mixer, self.dim, self.n_heads, self.head_dim, kv_heads=self.n_kv_heads,
                           **self.mixer_options)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


#: the learned parts an attention block can hold (``ModelConfig.learned_attention``)
LEARNED = ("", "nsa", "dsa_indexer")


def _learned_parts(cfg: ModelConfig) -> nn.Module:
    if cfg.learned_attention == "nsa":
        from longattn.methods.nsa import NSAParams

        return NSAParams(cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, **cfg.learned_options)
    from longattn.methods.dsa import DSAIndexer

    return DSAIndexer(cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, **cfg.learned_options)


class RMSNorm(nn.Module):
    """``x / rms(x) · w`` (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class KVState(NamedTuple):
    """An attention block's state: the keys and values seen so far, unrotated,
    ``[B, Hkv, T, hd]`` each."""

    k: Tensor
    v: Tensor


class ConvState(NamedTuple):
    """A block's state when it has a short convolution: the last ``short_conv - 1`` normalised
    inputs ``[B, short_conv - 1, dim]`` and the mixer's own state."""

    tail: Tensor
    mixer: Any


class Block(nn.Module):
    """One pre-norm decoder block. Attention blocks hold ``wq wk wv wo`` themselves (the
    checkpoint names the retrieval model has always had); recurrent blocks hold ``mixer``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hd = cfg.head_dim
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if cfg.short_conv:
            # depthwise causal taps [dim, 1, kernel]; the identity to start with
            weight = torch.zeros(cfg.dim, 1, cfg.short_conv)
            weight[..., -1] = 1.0
            self.conv = nn.Parameter(weight)
        if cfg.mixer == ATTENTION:
            self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
            self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
            self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
            self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
            if cfg.learned_attention:
                self.learned = _learned_parts(cfg)
        else:
            from longattn.recurrent.layers import make_layer

            self.mixer = make_layer(cfg.mixer, cfg.dim, cfg.n_heads, hd, kv_heads=cfg.n_kv_heads,
                                    **cfg.mixer_options)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down

    def short_conv(self, h: Tensor, tail: Tensor | None) -> tuple[Tensor, Tensor]:
        """The causal depthwise convolution of ``h [B, T, dim]`` after ``tail`` (the previous
        inputs; None: zeros, a fresh sequence); returns the output and the new tail."""
        k = self.conv.shape[-1]
        if tail is None:
            tail = h.new_zeros(h.shape[0], k - 1, h.shape[2])
        x = torch.cat([tail.to(h.dtype), h], 1)
        y = torch.nn.functional.conv1d(x.transpose(1, 2), self.conv.to(h.dtype), groups=h.shape[2]).transpose(1, 2)
        return y, x[:, x.shape[1] - (k - 1):]

    def feed_forward(self, x: Tensor) -> Tensor:
        h = self.ffn_norm(x)
        return x + self.w2(torch.nn.functional.silu(self.w1(h)) * self.w3(h))


class LanguageModel(nn.Module):
    """A Llama-style decoder (see the module docstring); ``model(tokens)`` gives logits.

    Args:
        config: the architecture.
        seed: seeds the initial weights (:meth:`reset_parameters`); the same seed gives the same
            weights on every machine.
    """

    def __init__(self, config: ModelConfig, *, seed: int = 0):
        super().__init__()
        self.config = config
        # a recurrent layer initialises its gates itself (operating points), from torch's global
        # generator: fork it so building a model neither depends on nor disturbs the caller's
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(config.vocab_size, config.dim)
            self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
            self.norm = RMSNorm(config.dim, config.norm_eps)
            if not config.tie_embeddings:
                self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.reset_parameters(seed)

    # ---------------------------------------------------------------------------------------- init

    def reset_parameters(self, seed: int) -> None:
        """GPT-2-style init, seeded: every matrix N(0, 0.02), the ones that write into the residual
        stream (``wo``, ``w2``, a mixer's ``o_proj``) scaled by ``1/sqrt(2·n_layers)``; norms at 1.
        A recurrent mixer's other parameters (gate maps and biases, decays, learned queries) keep
        the layer's own initialisation, which sets the gates' operating points."""
        gen = torch.Generator().manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("norm.weight", ".conv")) or ".learned." in name:
                continue  # norms at 1, convolutions at the identity, learned attention parts as built
            if ".mixer." in name and not name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                        "o_proj.weight")):
                continue
            std = residual_std if name.endswith(("wo.weight", "w2.weight", "o_proj.weight")) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen, device=gen.device, dtype=torch.float32).to(p.dtype) * std)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_size(self, tokens: int = 0) -> int:
        """Bytes of sequence state per sequence after ``tokens`` tokens (Zoology's convention): an
        attention block keeps ``2 · n_kv_heads · head_dim`` numbers per token at the parameters'
        width (its cache grows with the context); a recurrent block its layer's state (fixed, but
        for RAT's one summary per chunk); a short convolution its last ``short_conv - 1`` inputs."""
        total = 0
        width = next(self.parameters()).element_size()
        for block in self.layers:
            if self.config.short_conv:
                total += (self.config.short_conv - 1) * self.config.dim * width
            if hasattr(block, "mixer"):
                total += block.mixer.state_size(tokens)
            else:
                total += 2 * self.config.n_kv_heads * self.config.head_dim * tokens * width
        return total

    # ------------------------------------------------------------------------------------- forward

    def _methods(self, method: MethodArg) -> list:
        n = self.config.n_layers
        if method is None or isinstance(method, (str, Method)):
            return [method or "dense"] * n
        if isinstance(method, Sequence) and len(method) == n:
            return [m or "dense" for m in method]
        raise TypeError(f"method must be None, a registered name, a longattn method or a list of {n} of those "
                        f"(one per layer), got {method!r}")

    def check_tokens(self, tokens: object) -> Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.int64:
            got = (f"{tokens.dtype} tensor of shape {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor)
                   else type(tokens).__name__)
            raise ValueError(f"tokens must be an int64 tensor [batch, length], got {got}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"tokens must be ids in [0, {self.config.vocab_size}), got range "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        return tokens

    def forward(self, tokens: Tensor, *, method: MethodArg = None, attention: AttentionFn | None = None,
                capture: list | None = None, logits_at: Tensor | None = None, state: list | None = None,
                return_state: bool = False) -> Tensor | tuple[Tensor, list]:
        """Logits for ``tokens [B, T]`` (int64), placed after the ``state`` (positions 0 … T-1
        without one).

        Args:
            method: attention blocks' method: None (= "dense"), a registered name, a method object
                or one per layer. Ignored by recurrent blocks.
            attention: instead of ``method``, a function ``(layer, q, k, v) -> out`` given rotated
                q/k (``AttentionFn``); also used when ``capture`` is given.
            capture: a list: each attention block appends its ``(q, k, v)`` after RoPE.
            logits_at: int64 ``[B, m]``: only the logits at these positions (the head is the
                largest tensor at long lengths).
            state: the list :meth:`forward` returned with ``return_state=True`` (one entry per
                block), to continue that sequence; or, for a model trained with landmark tokens,
                ``longattn.memory.landmark_memories(n_layers, ...)``: each attention block then runs
                ``landmark_trained`` over its memory, which keeps only retrieved blocks hot (the
                memories are updated in place and returned as the state).
            return_state: also return the state after the last token.

        Returns:
            ``[B, T, vocab]`` (or ``[B, m, vocab]``) in the parameters' dtype; with
            ``return_state``, ``(logits, state)``. Differentiable.
        """
        self.check_tokens(tokens)
        cfg = self.config
        methods = self._methods(method)
        if state is not None and (not isinstance(state, list) or len(state) != cfg.n_layers):
            raise ValueError(f"state must be the list of {cfg.n_layers} per-block states forward(..., "
                             f"return_state=True) returned, got {type(state).__name__}")
        if attention is not None and method is not None:
            raise ValueError("forward: pass either method= or attention=, not both")
        x = self.embed(tokens)
        new_state = []
        for i, (block, m) in enumerate(zip(self.layers, methods)):
            h = block.attn_norm(x)
            prev = None if state is None else state[i]
            conv_tail = None
            if cfg.short_conv:
                if prev is not None and not isinstance(prev, ConvState):
                    raise ValueError(f"state[{i}] must be a ConvState (the block has a short convolution), "
                                     f"got {type(prev).__name__}")
                h, conv_tail = block.short_conv(h, None if prev is None else prev.tail)
                prev = None if prev is None else prev.mixer
            if hasattr(block, "mixer"):
                y, s = block.mixer(h, prev)
            elif _is_landmark_memory(prev):
                _check_memory_method(i, prev, method if method is None or isinstance(method, (str, Method))
                                     else method[i], attention, capture)
                y, s = self._attend_memory(block, h, prev)
            else:
                y, s = self._attend(i, block, h, m, prev, attention, capture)
            new_state.append(s if conv_tail is None else ConvState(conv_tail, s))
            x = block.feed_forward(x + y)
        if logits_at is not None:
            x = x.gather(1, logits_at[..., None].expand(-1, -1, cfg.dim))
        x = self.norm(x)
        logits = x @ (self.embed.weight if cfg.tie_embeddings else self.head.weight).T
        return (logits, new_state) if return_state else logits

    def _project(self, block: Block, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Unrotated ``q [B, Hq, T, hd]``, ``k, v [B, Hkv, T, hd]`` of an attention block."""
        cfg = self.config
        b, t, _ = h.shape
        hd = cfg.head_dim
        return (block.wq(h).view(b, t, cfg.n_heads, hd).transpose(1, 2),
                block.wk(h).view(b, t, cfg.n_kv_heads, hd).transpose(1, 2),
                block.wv(h).view(b, t, cfg.n_kv_heads, hd).transpose(1, 2))

    def _output(self, block: Block, o: Tensor, h: Tensor) -> Tensor:
        """``o [B, Hq, T, hd]`` through the block's output projection, in ``h``'s dtype."""
        b, t, _ = h.shape
        return block.wo(o.to(h.dtype).transpose(1, 2).reshape(b, t, self.config.n_heads * self.config.head_dim))

    def _attend_memory(self, block: Block, h: Tensor, memory) -> tuple[Tensor, Any]:
        """One attention block over a ``LandmarkMemory`` (the memory appends the chunk)."""
        q, k, v = self._project(block, h)
        o = memory.attend(q, k, v, position=RoPE(self.config.head_dim, self.config.rope_theta))
        return self._output(block, o, h), memory

    def _attend(self, index: int, block: Block, h: Tensor, method, prev: KVState | None,
                attention: AttentionFn | None, capture: list | None) -> tuple[Tensor, KVState]:
        cfg = self.config
        t = h.shape[1]
        hd = cfg.head_dim
        q, k, v = self._project(block, h)
        if prev is not None:
            if not isinstance(prev, KVState):
                raise ValueError(f"state[{index}] must be a KVState (an attention block's cache), "
                                 f"got {type(prev).__name__}")
            k, v = torch.cat([prev.k, k], 2), torch.cat([prev.v, v], 2)
        rope = RoPE(hd, cfg.rope_theta)
        method = _bind_learned(block, method)
        if capture is not None or attention is not None:
            tk = k.shape[2]
            qr, kr = _rotate(rope, q, tk - t), _rotate(rope, k, 0)
            if capture is not None:
                capture.append((qr, kr, v))
        if attention is None:
            # q/k unrotated: attention rotates them (queries after the cached keys), or hands RoPE
            # to a method that places positions itself (own_positions) — also while capturing, so
            # that capture never changes what a method computes
            o = longattn.attention(q, k, v, causal=True, method=method, position=rope)
        else:
            o = attention(index, qr, kr, v)
        return self._output(block, o, h), KVState(k, v)


def _is_landmark_memory(state) -> bool:
    from longattn.memory.landmark import LandmarkMemory

    return isinstance(state, LandmarkMemory)


def _check_memory_method(index: int, memory, method, attention, capture) -> None:
    """A layer whose state is a ``LandmarkMemory`` runs the memory's ``landmark_trained``: a method
    given for it must be that method with the memory's settings (or None)."""
    if attention is not None or capture is not None:
        raise ValueError(f"state[{index}] is a LandmarkMemory: attention= and capture= need the whole k/v, "
                         "which the memory keeps off the fast tier")
    if method is None:
        return
    m = longattn.method(method) if isinstance(method, str) else method
    want = (memory.block, memory.top_k, memory.local)
    if getattr(m, "name", None) != "landmark_trained" or (m.block, m.top_k, m.local) != want:
        raise ValueError(f"state[{index}] is a LandmarkMemory (landmark_trained with block, top_k, local = {want}); "
                         f"method must be None or that method, got {method!r}")


def _bind_learned(block: Block, method):
    """``method`` with the block's learned attention parts when it takes them (a ``learned`` field
    left None): ``model(tokens, method="nsa")`` runs each layer with its own parameters."""
    parts = getattr(block, "learned", None)
    if parts is None:
        return method
    m = longattn.method(method) if isinstance(method, str) else method
    if isinstance(m, Method) and dataclasses.is_dataclass(m) and getattr(m, "learned", "absent") is None:
        return dataclasses.replace(m, learned=parts)
    return method


def _rotate(rope: RoPE, x: Tensor, first: int) -> Tensor:
    """``x [B, H, T, hd]`` rotated to positions ``first … first+T-1``, with the tables in x's dtype
    computed from float64 angles (``RoPE.rotate`` rounds its tables to float32; a float64 forward
    is the reference and keeps them exact)."""
    ang = rope.angles(torch.arange(first, first + x.shape[2], device=x.device))
    ang = torch.cat((ang, ang), dim=-1)
    return _apply_rotation(x, torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype))
