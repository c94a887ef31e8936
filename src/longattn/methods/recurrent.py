"""The linear / recurrent mixers of ``longattn.recurrent`` as methods of ``longattn.attention``.

Registered here are the ops that are functions of ``q, k, v`` alone, their hyper-parameters fixed
method fields:

* ``linear``: kernelised linear attention (``recurrent.linear``; elu+1, relu, identity or
  Performer features, normalised or not);
* ``lightning``: TransNormer's decayed linear attention with NormAttention, computed as Lightning
  Attention-2 (``recurrent.lightning``; fixed per-head decays);
* ``based``: Based's Taylor linear attention plus an exact sliding window (``recurrent.based``);
  the Taylor features read the first ``feature_dim`` channels of q and k, the window all of them;
* ``rat``: RAT, a gated recurrence inside chunks and softmax over chunk summaries
  (``recurrent.rat``), with one constant forget gate for every token and channel.

Each carries a state: ``attention(q, k, v, causal=True, method="lightning", initial_state=state,
return_state=True)`` returns ``(out, state)``; q, k, v are the new tokens only, one token is a
decoding step (the op's step form), and prefill in pieces with the state carried equals one call.
They are causal only, take no cross attention (``tokens_q == tokens_k``), no padding mask, position
encoding, score bias or softcap, and return no LSE (capability ``softmax`` False): they are not
softmax attention, so no LSE merge and no softmax oracle applies to them.

Left out, because their parameters are per-token gates or learned tensors that a model computes
from its input, not functions of ``q, k, v``: GLA, DeltaNet and Gated DeltaNet (data-dependent
decays and writing strengths), Titans (a memory trained at test time with learned rates) and
Aaren (its query is a learned parameter with no token axis). Use them as the functions of
``longattn.recurrent`` or as the layers of ``longattn.recurrent.layers``, which make the gates.
(A constant gate would turn GLA into ``lightning``; RAT keeps a meaningful model with one, its
chunking, so it is registered with a constant ``gate`` field; its paper's gates are
data-dependent: ``longattn.recurrent.layers.RATLayer``.)

Compute: the ops take bfloat16/float16/float32 inputs as given and keep states and sums in
float32 (float64 for float64 inputs); the output has the input's dtype.
"""

from __future__ import annotations

import functools
import math
import numbers
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from longattn.core import validate
from longattn.methods.base import Call, Capabilities, Method, Result, register
from longattn.recurrent.based import BasedState, based_attention, based_attention_step
from longattn.recurrent.lightning import (
    LightningState,
    lightning_attention,
    lightning_attention_step,
    transnormer_decays,
)
from longattn.recurrent.linear import (
    FEATURE_MAPS,
    LinearState,
    linear_attention,
    linear_attention_step,
    performer_features,
)
from longattn.recurrent.rat import RATState, rat_attention, rat_attention_step

__all__ = ["Based", "Lightning", "Linear", "RAT", "RecurrentMethod"]


def _real(name: str, value: object, *, low: float, high: float = math.inf, low_open: bool = False,
          high_open: bool = False) -> float:
    """A finite real in the interval ``low .. high`` (ends open or closed); returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {type(value).__name__} {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return float(value)


def _flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def _capabilities(paper: str, cost: str, *, takes_scale: bool = False) -> Capabilities:
    return Capabilities(
        exact=False, softmax=False, state=True, takes_scale=takes_scale, non_causal=False, cross=False,
        score_bias=False, paper=paper, cost=cost,
    )


class RecurrentMethod(Method):
    """Base of the recurrent methods: checks the state's type, runs the op's chunked form (or its
    step form for one token) and returns the next state in ``Result.state`` (``lse`` None)."""

    #: the ``NamedTuple`` of the op's state
    state_type: ClassVar[type]

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: Call) -> Result:
        state = call.state
        if state is not None and not isinstance(state, self.state_type):
            raise ValueError(
                f"initial_state must be a {self.state_type.__name__} (the state method {self.name!r} returns with "
                f"return_state=True) or None, got {type(state).__name__}")
        t0 = time.perf_counter()
        if q.shape[2] == 1:
            out, nxt = self.step(q, k, v, state, call)
            path = "step"
        else:
            out, nxt = self.chunked(q, k, v, state, call)
            path = "chunked"
        return Result(out, None, path, {"kernel_s": time.perf_counter() - t0}, state=nxt)

    def chunked(self, q, k, v, state, call: Call) -> tuple[torch.Tensor, Any]:
        """The op's chunked form over ``q, k, v`` from ``state``: ``(out, next state)``."""
        raise NotImplementedError

    def step(self, q, k, v, state, call: Call) -> tuple[torch.Tensor, Any]:
        """The op's step form (one token); the chunked form gives the same."""
        raise NotImplementedError


@functools.lru_cache(maxsize=16)
def _performer_w(m: int, dk: int, seed: int, orthogonal: bool, dtype: torch.dtype, device: str) -> torch.Tensor:
    return performer_features(m, dk, seed, orthogonal=orthogonal, dtype=dtype, device=device)


@register
@dataclass(frozen=True)
class Linear(RecurrentMethod):
    """Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"; Performer's
    positive random features, Choromanski et al. 2021): ``longattn.recurrent.linear``.

    ``exp(q·k)`` becomes ``φ(q)·φ(k)``, so causal attention is a recurrence over ``S = Σ φ(k) vᵀ``
    and ``z = Σ φ(k)``; ``o = φ(q)ᵀS / (φ(q)ᵀz + eps)`` (``normalize=True``) or ``φ(q)ᵀS``.

    Args:
        feature_map: ``"elu"`` (``elu(x) + 1``, the paper's), ``"relu"``, ``"identity"`` or
            ``"performer"`` (``exp(Wx − |x|²/2)/sqrt(m)``, ``W`` drawn from ``seed``).
        normalize: divide by ``φ(q)ᵀz + eps``.
        feature_scale: multiplies q and k before the feature map; None: the op's default (1, or
            ``head_dim^(-1/4)`` for ``"performer"``, so that ``φ(q)·φ(k) ≈ exp(q·k/sqrt(head_dim))``).
            ``attention(scale=...)`` is refused: there is no softmax score to scale.
        random_features: Performer's ``m`` (None: ``head_dim``); ``"performer"`` only.
        seed: the seed of Performer's ``W`` (orthogonal blocks when ``orthogonal``); the same
            ``W`` on every call, so pieces and decoding steps compose.
        orthogonal: orthogonal random features (``performer_features``).
        eps: added to the denominator.
        chunk: tokens per chunk of the chunked form (the result does not depend on it beyond rounding).

    State: ``LinearState(s [B, Hkv, F, Dv], z [B, Hkv, F])`` per key/value head.
    """

    feature_map: str = "elu"
    normalize: bool = True
    feature_scale: float | None = None
    random_features: int | None = None
    seed: int = 0
    orthogonal: bool = True
    eps: float = 1e-6
    chunk: int = 64
    name = "linear"
    state_type = LinearState
    capabilities = _capabilities("Katharopoulos et al. 2020, Transformers are RNNs; Choromanski et al. 2021, "
                                 "Performers", "O(N·D·F) time, O(F·D) state per head (F: feature size)")

    def __post_init__(self):
        validate.check_choice("feature_map", self.feature_map, FEATURE_MAPS)
        _flag("normalize", self.normalize)
        _flag("orthogonal", self.orthogonal)
        if self.feature_scale is not None:
            _real("feature_scale", self.feature_scale, low=0.0, low_open=True)
        validate.check_seed("seed", self.seed)
        if self.random_features is not None:
            validate.check_positive_int("random_features", self.random_features)
            if self.feature_map != "performer":
                raise ValueError(f"random_features is Performer's feature count: it needs feature_map='performer', "
                                 f"got random_features={self.random_features} with feature_map={self.feature_map!r}")
        _real("eps", self.eps, low=0.0)
        validate.check_positive_int("chunk", self.chunk)

    def _kw(self, q: torch.Tensor) -> dict[str, Any]:
        w = None
        if self.feature_map == "performer":
            dk = q.shape[-1]
            dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            w = _performer_w(self.random_features or dk, dk, self.seed, self.orthogonal, dtype, str(q.device))
        return dict(feature_map=self.feature_map, features=w, scale=self.feature_scale, normalize=self.normalize,
                    eps=self.eps)

    def chunked(self, q, k, v, state, call):
        return linear_attention(q, k, v, chunk=self.chunk, initial_state=state, **self._kw(q))

    def step(self, q, k, v, state, call):
        return linear_attention_step(q, k, v, state, **self._kw(q))


@register
@dataclass(frozen=True)
class Lightning(RecurrentMethod):
    """TransNormer's decayed linear attention with NormAttention (Qin et al. 2022), chunked as
    Lightning Attention-2 (Qin et al. 2024): ``longattn.recurrent.lightning``.

    ``S_t = λ_h S_{t−1} + k_t v_tᵀ``, ``o_t = RMSNorm(q_tᵀ S_t)`` with a fixed decay ``λ_h`` per
    query head.

    Args:
        decay: ``λ`` in ``(0, 1]``: one float for every head, or a tuple of one per query head;
            None: TransNormerLLM's schedule (``transnormer_decays(heads, layer=layer, layers=layers)``).
        layer, layers: the layer's depth in that schedule (the first layer decays fastest); only
            with ``decay=None``.
        norm: RMSNorm over the head dim of the output (NormAttention; no learned gain).
        eps: the norm's epsilon.
        chunk: tokens per block of the chunked form.

    State: ``LightningState(s [B, H, Dk, Dv])`` per query head.
    """

    decay: float | tuple[float, ...] | None = None
    layer: int = 0
    layers: int = 1
    norm: bool = True
    eps: float = 1e-6
    chunk: int = 64
    name = "lightning"
    state_type = LightningState
    capabilities = _capabilities("Qin et al. 2022, The Devil in Linear Transformer (TransNormer); Qin et al. 2024, "
                                 "Lightning Attention-2", "O(N·D²) time, O(D²) state per head")

    def __post_init__(self):
        if isinstance(self.decay, (list, tuple)):
            if not self.decay:
                raise ValueError("decay must hold one value per query head, got an empty sequence")
            object.__setattr__(self, "decay", tuple(
                _real(f"decay[{i}]", d, low=0.0, high=1.0, low_open=True) for i, d in enumerate(self.decay)))
        elif self.decay is not None:
            object.__setattr__(self, "decay", _real("decay", self.decay, low=0.0, high=1.0, low_open=True))
        validate.check_positive_int("layer", self.layer, allow_zero=True)
        validate.check_positive_int("layers", self.layers)
        if self.layer >= self.layers:
            raise ValueError(f"layer must be in [0, layers) = [0, {self.layers}), got {self.layer}")
        if self.decay is not None and (self.layer, self.layers) != (0, 1):
            raise ValueError(f"layer and layers choose TransNormer's decay schedule; they cannot be combined with "
                             f"decay={self.decay!r}")
        _flag("norm", self.norm)
        _real("eps", self.eps, low=0.0)
        validate.check_positive_int("chunk", self.chunk)

    def _kw(self, q: torch.Tensor) -> dict[str, Any]:
        h = q.shape[1]
        if self.decay is None:
            if (self.layer, self.layers) == (0, 1):
                return dict(norm=self.norm, eps=self.eps)  # the op's default: transnormer_decays(H)
            lam = transnormer_decays(h, layer=self.layer, layers=self.layers, dtype=torch.float64, device=q.device)
        elif isinstance(self.decay, tuple):
            if len(self.decay) != h:
                raise ValueError(f"decay holds {len(self.decay)} values but q has {h} heads: it needs one per query "
                                 "head (or one float for all)")
            lam = torch.tensor(self.decay, dtype=torch.float64, device=q.device)
        else:
            lam = torch.full((h,), self.decay, dtype=torch.float64, device=q.device)
        return dict(log_decay=lam.log(), norm=self.norm, eps=self.eps)

    def chunked(self, q, k, v, state, call):
        return lightning_attention(q, k, v, chunk=self.chunk, initial_state=state, **self._kw(q))

    def step(self, q, k, v, state, call):
        return lightning_attention_step(q, k, v, state, **self._kw(q))


@register
@dataclass(frozen=True)
class Based(RecurrentMethod):
    """Based (Arora et al. 2024, "Simple linear attention language models balance the
    recall-throughput tradeoff"): 2nd-order Taylor linear attention plus an exact sliding-window
    softmax, summed: ``longattn.recurrent.based``.

    Args:
        feature_dim: the Taylor features read the first ``feature_dim`` channels of q and k (the
            paper projects to 16); the state holds ``(1 + f + f²)·(head_dim + 1)`` numbers per head,
            ``f = min(feature_dim, head_dim)`` (a larger value means all channels).
        window: the exact window's size (each query sees its last ``window`` tokens, itself
            included; it reads all channels of q and k, scale ``1/sqrt(head_dim)``); 0: the linear
            part alone.
        chunk: tokens per chunk of the linear part.

    State: ``BasedState`` (the linear part's sums per key/value head and the window's last
    ``window − 1`` keys and values).
    """

    feature_dim: int = 16
    window: int = 64
    chunk: int = 64
    name = "based"
    state_type = BasedState
    capabilities = _capabilities("Arora et al. 2024, Simple linear attention language models balance the "
                                 "recall-throughput tradeoff",
                                 "O(N·f²·D + N·window·D) time, O(f²·D + window·D) state per head")

    def __post_init__(self):
        validate.check_positive_int("feature_dim", self.feature_dim)
        validate.check_positive_int("window", self.window, allow_zero=True)
        validate.check_positive_int("chunk", self.chunk)

    def _features(self, q, k):
        f = min(self.feature_dim, q.shape[-1])
        return q[..., :f], k[..., :f]

    def chunked(self, q, k, v, state, call):
        qf, kf = self._features(q, k)
        return based_attention(qf, kf, v, window=self.window, q_window=q, k_window=k, chunk=self.chunk,
                               initial_state=state)

    def step(self, q, k, v, state, call):
        qf, kf = self._features(q, k)
        return based_attention_step(qf, kf, v, state, window=self.window, q_window=q, k_window=k)


@register
@dataclass(frozen=True)
class RAT(RecurrentMethod):
    """RAT (Wei et al. 2025, "RAT: Bridging RNN Efficiency and Attention Accuracy in Language
    Modeling"): a gated recurrence inside chunks of ``chunk_size`` tokens, softmax attention over
    the chunks' summaries: ``longattn.recurrent.rat``, with one constant gate.

    Inside a chunk ``k̃_t = a k̃_{t−1} + (1 − a) k_t`` and ``ṽ_t = a ṽ_{t−1} + (1 − a) v_t`` with the
    constant ``a = gate``; each query attends (``softmax(scale · q·k̃)``, ``attention(scale=...)``,
    default ``1/sqrt(head_dim)``) over the summaries of the completed chunks and its own chunk's
    running ``(k̃_t, ṽ_t)``.

    Args:
        chunk_size: ``L``, part of the model (a state continues only with the chunk size it was
            built with). A chunk longer than the tokens a call reaches is computed as a chunk of
            just those tokens (the same result, without padding to ``L``).
        gate: the forget gate ``a`` in ``(0, 1)`` of every token and channel (the paper's gates are
            data-dependent, ``sigmoid`` of a projection: ``longattn.recurrent.layers.RATLayer``).

    State: ``RATState`` (one summary per completed chunk: it grows as ``tokens / chunk_size``).
    """

    chunk_size: int = 64
    gate: float = 0.9
    name = "rat"
    state_type = RATState
    capabilities = _capabilities("Wei et al. 2025, RAT: Bridging RNN Efficiency and Attention Accuracy in Language "
                                 "Modeling", "O(N·(N/L + L)·D) time, O((N/L)·D) state per head", takes_scale=True)

    def __post_init__(self):
        validate.check_positive_int("chunk_size", self.chunk_size)
        _real("gate", self.gate, low=0.0, high=1.0, low_open=True, high_open=True)

    def _gates(self, k: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
        return torch.full((), math.log(self.gate), dtype=dtype, device=k.device).expand(k.shape)

    def _chunk_size(self, state, tokens: int) -> int:
        """``chunk_size``, or ``p + tokens + 1`` when that is smaller (``p``: the state's position in
        its chunk): no chunk ends within this call either way, so the result is the same, and the
        op does not pad the call to a whole chunk of ``chunk_size`` tokens."""
        p = 0
        if state is not None:
            try:
                p = int(float(state.position))
            except (TypeError, ValueError, RuntimeError):
                return self.chunk_size  # a malformed state: the op reports it
            if not 0 <= p < self.chunk_size:
                return self.chunk_size
        return min(self.chunk_size, p + tokens + 1)

    def chunked(self, q, k, v, state, call):
        g = self._gates(k)
        return rat_attention(q, k, v, g, g, chunk_size=self._chunk_size(state, q.shape[2]), scale=call.scale,
                             initial_state=state)

    def step(self, q, k, v, state, call):
        g = self._gates(k)
        return rat_attention_step(q, k, v, g, g, state, chunk_size=self.chunk_size, scale=call.scale)
