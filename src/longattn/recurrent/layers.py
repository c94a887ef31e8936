"""Trainable layers around the recurrent ops: projections + op + output projection.

Each layer is a :class:`torch.nn.Module` that maps ``x [B, T, d_model]`` to ``y [B, T, d_model]``
and carries the op's state::

    y, state = layer(x)                 # prefill (state None: a fresh sequence)
    y2, state = layer(x2, state)        # continue: equals one pass over cat(x, x2)
    y3, state = layer(x3[:, :1], state) # decode one token

The sequence mixing is the op's (see :mod:`longattn.recurrent`); the layer only adds what a model
needs around it:

* ``q_proj`` ``[d_model -> heads · Dk]``, ``k_proj`` ``[d_model -> kv_heads · Dk]``, ``v_proj``
  ``[d_model -> kv_heads · Dv]`` and ``o_proj`` ``[heads · Dv -> d_model]`` (``Dk = Dv = head_dim``
  unless the layer says otherwise), all ``nn.Linear`` with ``bias=bias``;
* the per-token gates the op needs, produced from ``x`` by small linear maps (always with a bias:
  it sets the gates' initial operating point) and squashed into the op's valid range — each
  layer's docstring says which.

Forms: with ``T == 1`` and a ``state`` given, ``forward`` uses the op's step form ``<op>_step``
(decoding); otherwise the chunked form ``<op>`` (prefill and training). The two agree to rounding
(the ops' own tests check it; ``tests/test_recurrent_layers.py`` checks it through the layers).

Grouped heads: every layer takes ``kv_heads`` (default ``heads``); ``heads`` must be a multiple of
it, each key/value head (and its gates and state) serving ``heads / kv_heads`` query heads.

Dtypes: the layer computes in its parameters' dtype; ``x`` must have that dtype (cast the module
with ``.to(dtype)``). States are the ops' float32 NamedTuples whatever the dtype.

* the output stage between the op and ``o_proj``, where the paper has one:
  ``output_norm`` — an RMSNorm over each head's ``Dv`` channels with a learned gain
  ``out_norm_weight [Dv]`` (GLA's per-head LayerNorm, DeltaNet's and Gated DeltaNet's RMSNorm,
  Titans' normalisation), computed in float32; ``output_gate`` — ``⊙ SiLU(g_proj x)``
  (``g_proj [d_model -> heads · Dv]``; GLA's Swish gate, Gated DeltaNet's and Titans' output gate).
  Each layer's defaults follow its paper; both are keyword arguments of every layer (the per-head
  norm is also what lets a layer learn at all at small widths: without it the op's output is a
  product of three small projections, and Gated DeltaNet, GLA, Lightning and Titans models stayed
  at the uniform guess on MQAR here, where with it they learn within a few hundred steps).

What is left out, on purpose: the rest of the papers' extra pieces around the mixer (short
convolutions — :class:`longattn.train.ModelConfig` has one before the mixer —, feature-map MLPs,
positional encodings, Titans' memory as a layer). These layers are the op with the minimum of
parameters that make it trainable. The exceptions are
Titans' two combinations with attention, :class:`TitansMAGLayer` (memory as a gate) and
:class:`TitansMACLayer` (memory as a context), which are architectures by definition: persistent
tokens, attention, the memory and a gate (:mod:`longattn.recurrent.titans_combined`).

``LAYERS`` maps op names to classes; :func:`make_layer` builds one by name.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from longattn.core import validate
from longattn.recurrent.aaren import aaren_attention, aaren_attention_step, aaren_state_size
from longattn.recurrent.based import based_attention, based_attention_step, based_state_size
from longattn.recurrent.delta import (
    delta_state_size,
    deltanet_attention,
    deltanet_attention_step,
    gated_deltanet_attention,
    gated_deltanet_attention_step,
)
from longattn.recurrent.gated import gla_attention, gla_attention_step, gla_state_size
from longattn.recurrent.lightning import (
    lightning_attention,
    lightning_attention_step,
    lightning_state_size,
    transnormer_decays,
)
from longattn.recurrent.linear import (
    FEATURE_MAPS,
    linear_attention,
    linear_attention_step,
    linear_state_size,
    performer_features,
)
from longattn.recurrent.rat import rat_attention, rat_attention_step, rat_state_size
from longattn.recurrent.common import check_tensor_arg, compute_dtype
from longattn.recurrent.titans import (
    MEMORIES,
    TitansMLPState,
    TitansState,
    titans_memory,
    titans_memory_read,
    titans_memory_step,
    titans_state_size,
)
from longattn.recurrent.titans_combined import (
    TitansMACState,
    TitansMAGState,
    TitansMALState,
    persistent_window_attention,
    segment_attention,
    titans_gate,
    titans_norm,
    titans_mac_state_size,
    titans_mag_state_size,
    titans_mal_state_size,
)

__all__ = [
    "LAYERS",
    "AarenLayer",
    "BasedLayer",
    "DeltaNetLayer",
    "GLALayer",
    "GatedDeltaNetLayer",
    "LightningLayer",
    "LinearAttentionLayer",
    "RATLayer",
    "TitansLayer",
    "TitansMACLayer",
    "TitansMAGLayer",
    "TitansMALLayer",
    "make_layer",
]

#: GLA's gate temperature τ: ``log α = logsigmoid(W x) / τ`` (Yang et al. 2024, §4.4, τ = 16), which
#: keeps the gates close to 1 (slow forgetting) at initialisation.
GLA_TAU = 16.0

#: the rank of GLA's low-rank gate map ``d_model -> 16 -> heads_kv · Dk`` (the paper's choice)
GLA_GATE_RANK = 16


class _RecurrentLayer(nn.Module):
    """Shared plumbing: argument checks, the q/k/v/o projections and the head split.

    Subclasses set ``self.dk`` / ``self.dv`` (per-head sizes of keys and values) before calling
    :meth:`_build_projections`, and implement :meth:`_mix` (``q, k, v`` as ``[B, H, T, D]``,
    gates computed from ``x`` there, returns ``(out [B, H, T, Dv], state)``)."""

    op_name = ""
    #: the paper's output stage, when the caller does not choose: RMSNorm per head, SiLU gate
    default_output_norm = False
    default_output_gate = False

    def __init__(self, d_model: int, heads: int, head_dim: int, kv_heads: int | None = None, bias: bool = False,
                 output_norm: bool | None = None, output_gate: bool | None = None):
        super().__init__()
        self.d_model = validate.check_positive_int("d_model", d_model)
        self.heads = validate.check_positive_int("heads", heads)
        self.head_dim = validate.check_positive_int("head_dim", head_dim)
        kv_heads = self.heads if kv_heads is None else validate.check_positive_int("kv_heads", kv_heads)
        if self.heads % kv_heads != 0:
            raise ValueError(f"kv_heads must divide heads = {self.heads}, got kv_heads = {kv_heads}")
        self.kv_heads = kv_heads
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        self.bias = bias
        self.output_norm = self.default_output_norm if output_norm is None else output_norm
        self.output_gate = self.default_output_gate if output_gate is None else output_gate
        for name in ("output_norm", "output_gate"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool (or None: the layer's default), got "
                                f"{type(getattr(self, name)).__name__}")
        self.dk = self.dv = self.head_dim

    def _build_projections(self, *, query: bool = True, d_in: int | None = None) -> None:
        """q/k/v projections from ``d_in`` features (default ``d_model``), ``o_proj`` back to
        ``d_model``, and the output stage's parameters."""
        d, b = self.d_model, self.bias
        d_in = d if d_in is None else d_in
        if query:
            self.q_proj = nn.Linear(d_in, self.heads * self.dk, bias=b)
        self.k_proj = nn.Linear(d_in, self.kv_heads * self.dk, bias=b)
        self.v_proj = nn.Linear(d_in, self.kv_heads * self.dv, bias=b)
        self.o_proj = nn.Linear(self.heads * self.dv, d, bias=b)
        if self.output_norm:
            self.out_norm_weight = nn.Parameter(torch.ones(self.dv))
        if self.output_gate:
            self.g_proj = nn.Linear(d, self.heads * self.dv, bias=b)

    @staticmethod
    def _heads(y: torch.Tensor, n: int) -> torch.Tensor:
        """``[B, T, n · D] -> [B, n, T, D]``."""
        b, t, _ = y.shape
        return y.view(b, t, n, -1).transpose(1, 2)

    def _check_x(self, x: object) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor [batch, tokens, d_model], got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"x must have shape [batch, tokens, d_model = {self.d_model}], got {tuple(x.shape)}"
            )
        w = self.o_proj.weight
        if x.dtype != w.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the layer's parameters are {w.dtype}; "
                            "cast one to the other (layer.to(dtype))")
        return x

    def forward(self, x: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """``x [B, T, d_model]`` and the op's state (None: a fresh sequence) in; ``y [B, T, d_model]``
        (x's dtype) and the state after the last token out. ``T == 1`` with a state: the step form."""
        x = self._check_x(x)
        b, t, _ = x.shape
        out, state = self._mix(x, state, step=(t == 1 and state is not None))
        y = self._output(x, out.transpose(1, 2).reshape(b, t, self.heads * self.dv))
        return y, state

    def _output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The output stage: ``y [B, T, heads · Dv]`` (the op's output, heads side by side) ->
        per-head RMSNorm (``output_norm``), ``⊙ SiLU(g_proj x)`` (``output_gate``), ``o_proj``."""
        if self.output_norm:
            b, t, _ = y.shape
            # float32 statistics whatever the dtype; eps as the ops' NormAttention
            z = F.rms_norm(y.view(b, t, self.heads, self.dv).float(), (self.dv,), self.out_norm_weight.float(),
                           eps=1e-6)
            y = z.reshape(b, t, self.heads * self.dv).to(x.dtype)
        else:
            y = y.to(x.dtype)
        if self.output_gate:
            y = y * F.silu(self.g_proj(x))
        return self.o_proj(y)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self._heads(self.q_proj(x), self.heads), self._heads(self.k_proj(x), self.kv_heads),
                self._heads(self.v_proj(x), self.kv_heads))

    def _mix(self, x: torch.Tensor, state: Any, step: bool) -> tuple[torch.Tensor, Any]:  # pragma: no cover
        raise NotImplementedError

    def state_size(self, tokens: int = 0) -> int:  # pragma: no cover
        """Bytes of state per sequence after ``tokens`` tokens (Zoology's convention); fixed for
        every layer but RAT, which keeps one summary per chunk."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"output_norm={self.output_norm}, output_gate={self.output_gate}")


class LinearAttentionLayer(_RecurrentLayer):
    """Causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"; Performer
    features: Choromanski et al. 2021) as a layer.

    ``q, k, v`` are projections of ``x``; no gates. ``feature_map`` is the op's (``"elu"`` default,
    ``"relu"``, ``"identity"``, ``"performer"``); for ``"performer"`` the random projection
    ``W [num_features, head_dim]`` is a fixed buffer drawn with ``feature_seed`` (not learned, as in
    the paper). State: :class:`~longattn.recurrent.linear.LinearState`, per key/value head.
    """

    op_name = "linear"

    def __init__(self, d_model: int, heads: int, head_dim: int, *, kv_heads: int | None = None,
                 feature_map: str = "elu", num_features: int | None = None, feature_seed: int = 0,
                 normalize: bool = True, chunk: int = 64, bias: bool = False,
                 output_norm: bool | None = None, output_gate: bool | None = None):
        super().__init__(d_model, heads, head_dim, kv_heads, bias, output_norm, output_gate)
        self.feature_map = validate.check_choice("feature_map", feature_map, FEATURE_MAPS)
        self.normalize = bool(normalize)
        self.chunk = validate.check_positive_int("chunk", chunk)
        if self.feature_map == "performer":
            self.num_features = validate.check_positive_int(
                "num_features", head_dim if num_features is None else num_features)
            self.register_buffer("features", performer_features(self.num_features, head_dim, seed=feature_seed))
        else:
            if num_features is not None:
                raise ValueError(f"num_features is only for feature_map='performer', got feature_map="
                                 f"{self.feature_map!r} and num_features={num_features!r}")
            self.num_features = head_dim
            self.features = None
        self._build_projections()

    def _kw(self, x: torch.Tensor) -> dict:
        feats = None if self.features is None else self.features.to(x.dtype)
        return dict(feature_map=self.feature_map, features=feats, normalize=self.normalize)

    def _mix(self, x, state, step):
        q, k, v = self._qkv(x)
        if step:
            return linear_attention_step(q, k, v, state, **self._kw(x))
        return linear_attention(q, k, v, chunk=self.chunk, initial_state=state, **self._kw(x))

    def state_size(self, tokens: int = 0) -> int:
        """Bytes of state per sequence: :func:`~longattn.recurrent.linear.linear_state_size`."""
        return linear_state_size(self.kv_heads, self.num_features, self.dv)


class LightningLayer(_RecurrentLayer):
    """TransNormer's decayed linear attention with NormAttention (Qin et al. 2022), computed as
    Lightning Attention-2 (Qin et al. 2024), as a layer.

    Gates: none learned — each query head decays its state by the fixed ``λ_h`` of
    :func:`~longattn.recurrent.lightning.transnormer_decays` ``(heads, layer=layer, layers=layers)``
    (the paper's schedule depends on the layer's depth; ``layer.decay()`` returns them). The NormAttention RMSNorm gain
    ``norm_weight [head_dim]`` is learned (init 1). State: ``LightningState(s [B, heads, Dk, Dv])``
    (per query head, since each head has its own decay).
    """

    op_name = "lightning"

    def __init__(self, d_model: int, heads: int, head_dim: int, *, kv_heads: int | None = None,
                 layer: int = 0, layers: int = 1, chunk: int = 64, bias: bool = False,
                 output_norm: bool | None = None, output_gate: bool | None = None):
        super().__init__(d_model, heads, head_dim, kv_heads, bias, output_norm, output_gate)
        self.chunk = validate.check_positive_int("chunk", chunk)
        # checked here (transnormer_decays names layer / layers in its errors), recomputed per call:
        # a float buffer would be cast by layer.to(bfloat16), and λ close to 1 needs float32
        transnormer_decays(self.heads, layer=layer, layers=layers)
        self.layer, self.layers = layer, layers
        self.norm_weight = nn.Parameter(torch.ones(self.dv))
        self._build_projections()

    def _mix(self, x, state, step):
        q, k, v = self._qkv(x)
        kw = dict(decay=self.decay(x.device), norm=True, norm_weight=self.norm_weight)
        if step:
            return lightning_attention_step(q, k, v, state, **kw)
        return lightning_attention(q, k, v, chunk=self.chunk, initial_state=state, **kw)

    def decay(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The fixed per-head decays ``λ [heads]`` (float32)."""
        return transnormer_decays(self.heads, layer=self.layer, layers=self.layers, device=device)

    def state_size(self, tokens: int = 0) -> int:
        """Bytes of state per sequence: :func:`~longattn.recurrent.lightning.lightning_state_size`."""
        return lightning_state_size(self.heads, self.dk, self.dv)


class GLALayer(_RecurrentLayer):
    """Gated Linear Attention (Yang et al. 2024, "Gated Linear Attention Transformers with
    Hardware-Efficient Training") as a layer.

    Gate: ``log_gate = logsigmoid(W2 W1 x + b) / τ`` ``[B, kv_heads, T, Dk]``, one forget gate per key
    channel, with the paper's low-rank map (``W1 [16, d_model]``, ``W2 [kv_heads · Dk, 16]``, bias
    ``b``) and temperature ``τ = 16``, so ``α = σ(·)^(1/16)`` starts close to 1 (slow forgetting).
    State: ``GLAState(s [B, kv_heads, Dk, Dv])``.
    """

    op_name = "gla"
    default_output_norm = True
    default_output_gate = True

    def __init__(self, d_model: int, heads: int, head_dim: int, *, kv_heads: int | None = None,
                 gate_rank: int = GLA_GATE_RANK, tau: float = GLA_TAU, chunk: int = 64, bias: bool = False,
                 output_norm: bool | None = None, output_gate: bool | None = None):
        super().__init__(d_model, heads, head_dim, kv_heads, bias, output_norm, output_gate)
        self.chunk = validate.check_positive_int("chunk", chunk)
        gate_rank = validate.check_positive_int("gate_rank", gate_rank)
        if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not tau > 0:
            raise ValueError(f"tau must be a positive number, got {tau!r}")
        self.tau = float(tau)
        self.gate_down = nn.Linear(d_model, gate_rank, bias=False)
        self.gate_up = nn.Linear(gate_rank, self.kv_heads * self.dk, bias=True)
        self._build_projections()

    def _mix(self, x, state, step):
        q, k, v = self._qkv(x)
        log_gate = self._heads(F.logsigmoid(self.gate_up(self.gate_down(x))) / self.tau, self.kv_heads)
        if step:
            return gla_attention_step(q, k, v, log_gate, state)
        return gla_attention(q, k, v, log_gate, chunk=self.chunk, initial_state=state)

    def state_size(self, tokens: int = 0) -> int:
        """Bytes of state per sequence: :func:`~longattn.recurrent.gated.gla_state_size`."""
        return gla_state_size(self.kv_heads, self.dk, self.dv)


class DeltaNetLayer(_RecurrentLayer):
    """DeltaNet (Schlag et al. 2021; chunked as Yang et al. 2024, "Parallelizing Linear Transformers
    with the Delta Rule over Sequence Length") as a layer.

    Gate: the write strength ``beta = sigmoid(W_β x + b)`` ``[B, kv_heads, T]`` in ``(0, 1)`` (the
    paper's range, so each write is a contraction). ``q`` and ``k`` are L2-normalised inside the op.
    State: ``DeltaState(s [B, kv_heads, Dv, Dk])``.
    """

    op_name = "deltanet"
    default_output_norm = True
    default_output_gate = False

    def __init__(self, d_model: int, heads: int, head_dim: int, *, kv_heads: int | None = None,
                 chunk: int = 64, bias: bool = False,
                 output_norm: bool | None = None, output_gate: bool | None = None):
        super().__init__(d_model, heads, head_dim, kv_heads, bias, output_norm, output_gate)
        self.chunk = validate.check_positive_int("chunk", chunk)
        self.beta_proj = nn.Linear(d_model, self.kv_heads, bias=True)
        self._build_projections()

    def _beta(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.beta_proj(x)).transpose(1, 2)  # [B, Hkv, T]

    def _mix(self, x, state, step):
        q, k, v = self._qkv(x)
        beta = self._beta(x)
        if step:
            return deltanet_attention_step(q, k, v, beta, state)
        return deltanet_attention(q, k, v, beta, chunk=self.chunk, initial_state=state)

    def state_size(self, tokens: int = 0) -> int:
        """Bytes of state per sequence: :func:`~longattn.recurrent.delta.delta_state_size`."""
        return delta_state_size(self.kv_heads, self.dk, self.dv)


class GatedDeltaNetLayer(DeltaNetLayer):
    """Gated DeltaNet (Yang, Kautz, Hatamizadeh 2025, "Gated Delta Networks") as a layer.

    Gates: ``beta = sigmoid(W_β x + b)`` as :class:`DeltaNetLayer`, and a scalar forget gate per
    key/value head and token, ``log_gate = logsigmoid(W_α x + b_α)`` ``[B, kv_heads, T]`` (``α ∈
    (0, 1)``). ``b_α`` starts at ``gate_bias_init`` (default 3: ``α ≈ 0.95``, slow forgetting at
    initialisation, as the paper's Mamba2-style gate starts near 1). State: as DeltaNet.
    """

    op_name = "gated_deltanet"
    default_output_norm = True
    default_output_gate = True

    def __init__(self, d_model: int, heads: int, head_dim: int, *, kv_heads: int | None = None,
                 gate_bias_init: float = 3.0, chunk: int = 64, bias: bool = False,
                 output_norm: bool | None = None, output_gate: bool | None = None):
        super().__init__(d_model, heads, head_dim, kv_heads=kv_heads, chunk=chunk, bias=bias,
                         output_norm=output_norm, output_gate=output_gate)
        self.gate_proj = nn.Linear(d_model, self.kv_heads, bias=True)
        with torch.no_grad():
            self.gate_proj.bias.fill_(float(gate_bias_init))

    def _mix(self, x, state, step):
        q, k, v = self._qkv(x)
        beta = self._beta(x)
        log_gate = F.logsigmoid(self.gate_proj(x)).transpose(1, 2)  # [B, Hkv, T]
        if step:
            return gated_deltanet_attention_step(q, k, v, beta, log_gate, state)
        return gated_deltanet_attention(q, k, v, beta, log_gate, chunk=self.chunk, initial_state=state)


class AarenLayer(_RecurrentLayer):
    """Aaren (Feng et al. 2024, "Attention as an RNN") as a layer: the softmax attention of a
    learned query over every prefix.

    No query projection: the query is the parameter ``query [heads, head_dim]`` (init
    ``N(0, 1)``), shared by every token and batch row. No gates. State: ``AarenState(m [B, heads],
    u [B, heads], w [B, heads, Dv])``.
    """

    op_name = "aaren"

    def __init__(self, d_model: int, heads: int, head_dim: int, *, kv_heads: int | None = None,
                 chunk: int = 256, bias: bool = False,
                 output_norm: bool | None = None, output_gate: bool | None = None):
        super().__init__(d_model, heads, head_dim, kv_heads, bias, output_norm, output_gate)
        self.chunk = validate.check_positive_int("chunk", chunk)
        self.query = nn.Parameter(torch.randn(self.heads, self.dk))
        self._build_projections(query=False)

    def _mix(self, x, state, step):
        k, v = self._heads(self.k_proj(x), self.kv_heads), self._heads(self.v_proj(x), self.kv_heads)
        if step:
            return aaren_attention_step(self.query, k, v, state)
        return aaren_attention(self.query, k, v, chunk=self.chunk, initial_state=state)

    def state_size(self, tokens: int = 0) -> int:
        """Bytes of state per sequence: :func:`~longattn.recurrent.aaren.aaren_state_size`."""
        return aaren_state_size(self.heads, self.dv)


class BasedLayer(_RecurrentLayer):
    """Based (Arora et al. 2024, "Simple linear attention language models balance the
    recall-throughput tradeoff") as a layer: Taylor linear attention plus sliding-window softmax
    attention, summed (see :mod:`longattn.recurrent.based`).

    Projections: ``q_proj, k_proj`` to the small feature dimension ``feature_dim`` (the state dial,
    16 in the paper's models), ``v_proj`` to ``head_dim``, and the window attention's own
    ``qw_proj, kw_proj`` to ``head_dim`` (``window=0``: no window part and no window projections).
    No gates. State: ``BasedState`` (``s [B, kv_heads, F, Dv]``, ``z``, and the window's KV cache of
    ``window − 1`` tokens), ``F = 1 + feature_dim + feature_dim²``.
    """

    op_name = "based"

    def __init__(self, d_model: int, heads: int, head_dim: int, *, kv_heads: int | None = None,
                 feature_dim: int = 16, window: int = 64, chunk: int = 64, bias: bool = False,
                 output_norm: bool | None = None, output_gate: bool | None = None):
        super().__init__(d_model, heads, head_dim, kv_heads, bias, output_norm, output_gate)
        self.feature_dim = validate.check_positive_int("feature_dim", feature_dim)
        self.window = validate.check_positive_int("window", window, allow_zero=True)
        self.chunk = validate.check_positive_int("chunk", chunk)
        self.dk = self.feature_dim
        self._build_projections()
        if self.window:
            self.qw_proj = nn.Linear(d_model, self.heads * self.head_dim, bias=bias)
            self.kw_proj = nn.Linear(d_model, self.kv_heads * self.head_dim, bias=bias)

    def _mix(self, x, state, step):
        q, k, v = self._qkv(x)
        kw = dict(window=self.window)
        if self.window:
            kw.update(q_window=self._heads(self.qw_proj(x), self.heads),
                      k_window=self._heads(self.kw_proj(x), self.kv_heads))
        if step:
            return based_attention_step(q, k, v, state, **kw)
        return based_attention(q, k, v, chunk=self.chunk, initial_state=state, **kw)

    def state_size(self, tokens: int = 0) -> int:
        """Bytes of state per sequence: :func:`~longattn.recurrent.based.based_state_size`."""
        return based_state_size(self.kv_heads, self.feature_dim, self.dv, self.window, window_dim=self.head_dim)


class RATLayer(_RecurrentLayer):
    """RAT (Wei et al. 2025, "RAT: Bridging RNN Efficiency and Attention Accuracy in Language
    Modeling") as a layer: a gated recurrence inside chunks of ``chunk_size`` tokens, softmax
    attention over the chunk summaries.

    Gates: ``log_key_gate = logsigmoid(W_a x + b_a)`` ``[B, kv_heads, T, Dk]`` and
    ``log_value_gate = logsigmoid(W_f x + b_f)`` ``[B, kv_heads, T, Dv]``, one forget gate per
    channel. ``chunk_size`` is part of the model (the output depends on it). The paper's output gate
    and positional encoding of the summaries are not included. State: ``RATState``, which grows by
    one summary per chunk.
    """

    op_name = "rat"

    def __init__(self, d_model: int, heads: int, head_dim: int, *, kv_heads: int | None = None,
                 chunk_size: int = 64, bias: bool = False,
                 output_norm: bool | None = None, output_gate: bool | None = None):
        super().__init__(d_model, heads, head_dim, kv_heads, bias, output_norm, output_gate)
        self.chunk_size = validate.check_positive_int("chunk_size", chunk_size)
        self.key_gate_proj = nn.Linear(d_model, self.kv_heads * self.dk, bias=True)
        self.value_gate_proj = nn.Linear(d_model, self.kv_heads * self.dv, bias=True)
        self._build_projections()

    def _mix(self, x, state, step):
        q, k, v = self._qkv(x)
        ga = self._heads(F.logsigmoid(self.key_gate_proj(x)), self.kv_heads)
        gf = self._heads(F.logsigmoid(self.value_gate_proj(x)), self.kv_heads)
        if step:
            return rat_attention_step(q, k, v, ga, gf, state, chunk_size=self.chunk_size)
        return rat_attention(q, k, v, ga, gf, chunk_size=self.chunk_size, initial_state=state)

    def state_size(self, tokens: int = 0) -> int:
        """Bytes of state per sequence after ``tokens`` tokens (it grows as ``tokens / chunk_size``):
        :func:`~longattn.recurrent.rat.rat_state_size`."""
        return rat_state_size(self.kv_heads, self.dk, self.dv, tokens, self.chunk_size)


class TitansLayer(_RecurrentLayer):
    """Titans' neural long-term memory (Behrouz, Zhong, Mirrokni 2025, "Titans: Learning to Memorize
    at Test Time"), linear memory, as a layer (the memory alone; memory as a gate and as a context are
    :class:`TitansMAGLayer` and :class:`TitansMACLayer`).

    Gates, per key/value head and token (``[B, kv_heads, T]``):

    * ``eta = sigmoid(W_η x + b_η)`` — momentum decay in ``(0, 1)``;
    * ``alpha = sigmoid(W_α x + b_α)`` — forgetting in ``(0, 1)``; ``b_α`` starts at ``-4``
      (``α ≈ 0.02``) so the memory is not wiped every few tokens at initialisation;
    * ``theta = theta_scale · softplus(W_θ x + b_θ)`` — learning rate ``≥ 0``. ``theta_scale``
      (default 0.1) keeps the inner gradient steps small: with unit keys ``‖∇‖`` is about
      ``2 ‖W k − v‖``, and steps of order 1 would overshoot.

    ``chunk_size`` (default 16) is the inner mini-batch size, part of the model. State:
    ``TitansState`` (``w, s, w_chunk [B, kv_heads, Dv, Dk]``, ``position [B]``).
    """

    op_name = "titans"
    default_output_norm = True
    default_output_gate = True

    def __init__(self, d_model: int, heads: int, head_dim: int, *, kv_heads: int | None = None,
                 chunk_size: int = 16, theta_scale: float = 0.1, bias: bool = False,
                 output_norm: bool | None = None, output_gate: bool | None = None):
        super().__init__(d_model, heads, head_dim, kv_heads, bias, output_norm, output_gate)
        self.chunk_size = validate.check_positive_int("chunk_size", chunk_size)
        if not isinstance(theta_scale, (int, float)) or isinstance(theta_scale, bool) or not theta_scale > 0:
            raise ValueError(f"theta_scale must be a positive number, got {theta_scale!r}")
        self.theta_scale = float(theta_scale)
        # one map for the three gates: [eta, theta, alpha] per key/value head
        self.gate_proj = nn.Linear(d_model, 3 * self.kv_heads, bias=True)
        with torch.no_grad():
            self.gate_proj.bias[2 * self.kv_heads:].fill_(-4.0)
        self._build_projections()

    def _gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = self.gate_proj(x).transpose(1, 2)  # [B, 3 Hkv, T]
        e, th, a = g.split(self.kv_heads, dim=1)
        return torch.sigmoid(e), self.theta_scale * F.softplus(th), torch.sigmoid(a)

    def _mix(self, x, state, step):
        q, k, v = self._qkv(x)
        eta, theta, alpha = self._gates(x)
        if step:
            return titans_memory_step(q, k, v, eta, theta, alpha, state, chunk_size=self.chunk_size)
        return titans_memory(q, k, v, eta, theta, alpha, chunk_size=self.chunk_size, initial_state=state)

    def state_size(self, tokens: int = 0) -> int:
        """Bytes of state per sequence: :func:`~longattn.recurrent.titans.titans_state_size`."""
        return titans_state_size(self.kv_heads, self.dk, self.dv)


class _XDtypeError(TypeError, ValueError):
    """``x`` of another dtype than the layer's parameters: a ``TypeError`` as the other layers raise,
    and a ``ValueError`` (a bad value of the argument ``x``)."""


class _TitansCombined(_RecurrentLayer):
    """What MAG and MAC share: the attention projections ``q_proj, k_proj, v_proj`` and ``o_proj``
    (``heads · head_dim -> d_model``, after the gate), the persistent tokens, the neural memory's
    projections and gates (read from ``memory_in`` features), its initial weights (MLP memory) and
    the gate's norms. See :mod:`longattn.recurrent.titans_combined` for the definitions."""

    def __init__(self, d_model: int, heads: int, head_dim: int, *, memory_in: int | None, kv_heads: int | None,
                 persistent_tokens: int, memory: str, memory_hidden: int | None, chunk_size: int,
                 theta_scale: float, bias: bool):
        super().__init__(d_model, heads, head_dim, kv_heads, bias)
        self.persistent_tokens = validate.check_positive_int("persistent_tokens", persistent_tokens, allow_zero=True)
        if not isinstance(memory, str):
            raise TypeError(f"memory must be a str, one of {MEMORIES}, got {type(memory).__name__} {memory!r}")
        self.memory = validate.check_choice("memory", memory, MEMORIES)
        if self.memory == "linear" and memory_hidden is not None:
            raise ValueError(f"memory_hidden is only for memory='mlp', got memory='linear' and "
                             f"memory_hidden={memory_hidden!r}")
        self.memory_hidden = (head_dim if memory_hidden is None
                              else validate.check_positive_int("memory_hidden", memory_hidden))
        self.chunk_size = validate.check_positive_int("chunk_size", chunk_size)
        if not isinstance(theta_scale, (int, float)) or isinstance(theta_scale, bool) or not theta_scale > 0:
            raise ValueError(f"theta_scale must be a positive number, got {theta_scale!r}")
        self.theta_scale = float(theta_scale)
        self._build_projections()
        hd, kd = self.heads * self.head_dim, self.kv_heads * self.head_dim
        d_in = d_model if memory_in is None else memory_in
        self.mem_q_proj = nn.Linear(d_in, hd, bias=bias)
        self.mem_k_proj = nn.Linear(d_in, kd, bias=bias)
        self.mem_v_proj = nn.Linear(d_in, kd, bias=bias)
        # [eta, theta, alpha] per key/value head, as TitansLayer: alpha's bias starts at -4 (α ≈ 0.02)
        self.gate_proj = nn.Linear(d_in, 3 * self.kv_heads, bias=True)
        with torch.no_grad():
            self.gate_proj.bias[2 * self.kv_heads:].fill_(-4.0)
        if self.persistent_tokens:
            shape = (self.kv_heads, self.persistent_tokens, self.head_dim)
            self.persistent_k = nn.Parameter(torch.randn(shape))
            self.persistent_v = nn.Parameter(torch.randn(shape))
        else:
            self.persistent_k = self.persistent_v = None
        if self.memory == "mlp":
            # W1 k̂ of a unit key has entries of variance 1/Dh, so |silu(W1 k̂)|² ≈ 1/4: the curvature
            # of the inner loss in W2 (2 |silu(W1 k̂)|²) stays well under what a step of θ with
            # momentum tolerates. With unit-variance entries it is about 0.7 · Dh (22 at Dh = 32),
            # and the memory's weights ran away to 1e20 within 64 tokens at some initialisations
            # (non-finite outputs, found by the model tests). W2 keeps the read-out of order 1.
            dh = self.memory_hidden
            self.memory_w1 = nn.Parameter(torch.randn(self.kv_heads, dh, self.head_dim) / math.sqrt(dh))
            self.memory_w2 = nn.Parameter(torch.randn(self.kv_heads, self.head_dim, dh) / math.sqrt(dh))
        self.attn_norm_weight = nn.Parameter(torch.ones(hd))
        self.memory_norm_weight = nn.Parameter(torch.ones(hd))

    def _check_x(self, x: object) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor [batch, tokens, d_model], got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape [batch, tokens, d_model = {self.d_model}], got {tuple(x.shape)}")
        if x.dtype != self.o_proj.weight.dtype:
            raise _XDtypeError(f"x has dtype {x.dtype} but the layer's parameters are {self.o_proj.weight.dtype}; "
                               "cast one to the other (layer.to(dtype))")
        return x

    # -- the memory ---------------------------------------------------------------------------

    def _memory_initial(self, b: int, device, cdt) -> TitansState | TitansMLPState:
        """A fresh sequence's memory: zeros (linear) or the learned initial weights (MLP)."""
        zero = torch.zeros(b, dtype=torch.int64, device=device)
        if self.memory == "linear":
            w = torch.zeros(b, self.kv_heads, self.head_dim, self.head_dim, dtype=cdt, device=device)
            return TitansState(w, torch.zeros_like(w), torch.zeros_like(w), zero)
        w1 = self.memory_w1.to(cdt).unsqueeze(0).expand(b, -1, -1, -1)
        w2 = self.memory_w2.to(cdt).unsqueeze(0).expand(b, -1, -1, -1)
        return TitansMLPState(w1, w2, torch.zeros_like(w1), torch.zeros_like(w2), w1, w2, zero)

    @staticmethod
    def _weights(state: TitansState | TitansMLPState) -> tuple[torch.Tensor, ...]:
        return (state.w,) if isinstance(state, TitansState) else (state.w1, state.w2)

    def _check_memory_state(self, memory: object, name: str) -> None:
        kind = TitansMLPState if self.memory == "mlp" else TitansState
        if not isinstance(memory, kind):
            raise TypeError(f"{name}.memory must be a {kind.__name__} for memory={self.memory!r}, "
                            f"got {type(memory).__name__}")

    def _write_read(self, z: torch.Tensor, memory, step: bool):
        """Write the memory with the tokens ``z [B, L, memory_in]`` and read it after each:
        ``(m [B, H, L, D]`` float32 (float64 for float64 ``z``), ``memory)``."""
        mq, mk, mv = (self._heads(self.mem_q_proj(z), self.heads), self._heads(self.mem_k_proj(z), self.kv_heads),
                      self._heads(self.mem_v_proj(z), self.kv_heads))
        e, th, a = self.gate_proj(z).transpose(1, 2).split(self.kv_heads, dim=1)
        eta, theta, alpha = torch.sigmoid(e), self.theta_scale * F.softplus(th), torch.sigmoid(a)
        # the memory computes in float32 whatever its inputs: given them in float32, its read-out
        # comes back unrounded (bf16 layers)
        cdt = compute_dtype(z.dtype)
        mq, mk, mv, eta, theta, alpha = (t.to(cdt) for t in (mq, mk, mv, eta, theta, alpha))
        if step:
            return titans_memory_step(mq, mk, mv, eta, theta, alpha, memory, chunk_size=self.chunk_size,
                                      memory=self.memory)
        return titans_memory(mq, mk, mv, eta, theta, alpha, chunk_size=self.chunk_size, memory=self.memory,
                             initial_state=memory)

    def _cache(self, name: str, value: object, b: int, most: int, device, cdt, what: str) -> torch.Tensor:
        n = value.shape[2] if isinstance(value, torch.Tensor) and value.dim() == 4 else -1
        value = check_tensor_arg(name, value, (b, self.kv_heads, max(n, 0), self.head_dim), device,
                                 layout="[batch, kv_heads, cached, head_dim]")
        if n > most:
            raise ValueError(f"{name} holds {n} tokens but {what} keeps at most {most}")
        return value.to(cdt)

    def _gate(self, y: torch.Tensor, m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return titans_gate(y, m, self.attn_norm_weight, self.memory_norm_weight, dtype)

    def _memory_state_size(self) -> dict:
        return dict(hidden=self.memory_hidden if self.memory == "mlp" else None)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, persistent_tokens={self.persistent_tokens}, memory={self.memory!r}, "
                f"chunk_size={self.chunk_size}")


class TitansMAGLayer(_TitansCombined):
    """Titans' memory as a gate (MAG; Behrouz, Zhong, Mirrokni 2025, §4.2): sliding-window softmax
    attention with persistent memory tokens, and in parallel the neural memory over the same input,
    combined by ``o_proj(norm(y) ⊙ σ(norm(m)))`` (:mod:`longattn.recurrent.titans_combined`).

    Args:
        window: each query attends to its last ``window`` tokens, itself included (default 64).
        persistent_tokens: learned key/value tokens every query sees (default 4; 0: none).
        memory: ``"mlp"`` (default, the paper's deep memory ``W2 silu(W1 x)``, hidden size
            ``memory_hidden``, default ``head_dim``, with learned initial weights) or ``"linear"``.
        chunk_size: the memory's mini-batch (part of the model, as :class:`TitansLayer`); theta_scale:
            its learning-rate scale; kv_heads, bias: as the other layers.

    The memory has its own projections ``mem_q_proj, mem_k_proj, mem_v_proj`` and gates
    ``gate_proj`` (as :class:`TitansLayer`). State: :class:`TitansMAGState` (the memory's state and
    the attention's last ``window − 1`` keys and values).
    """

    op_name = "titans_mag"
    _state_type = TitansMAGState

    def __init__(self, d_model: int, heads: int, head_dim: int, *, window: int = 64, persistent_tokens: int = 4,
                 memory: str = "mlp", memory_hidden: int | None = None, chunk_size: int = 16,
                 theta_scale: float = 0.1, kv_heads: int | None = None, bias: bool = False):
        super().__init__(d_model, heads, head_dim, memory_in=None, kv_heads=kv_heads,
                         persistent_tokens=persistent_tokens, memory=memory, memory_hidden=memory_hidden,
                         chunk_size=chunk_size, theta_scale=theta_scale, bias=bias)
        self.window = validate.check_positive_int("window", window)

    def _state(self, state: object, b: int, device, cdt):
        if state is None:
            empty = torch.zeros(b, self.kv_heads, 0, self.head_dim, dtype=cdt, device=device)
            return self._memory_initial(b, device, cdt), empty, empty
        if not isinstance(state, self._state_type):
            raise TypeError(f"state must be a {self._state_type.__name__} or None, got {type(state).__name__}")
        self._check_memory_state(state.memory, "state")
        most = self.window - 1
        ck = self._cache("state.k_window", state.k_window, b, most, device, cdt, f"window={self.window}")
        cv = self._cache("state.v_window", state.v_window, b, most, device, cdt, f"window={self.window}")
        if ck.shape != cv.shape:
            raise ValueError(f"state.k_window has shape {tuple(ck.shape)} and state.v_window "
                             f"{tuple(cv.shape)}: they must match")
        return state.memory, ck, cv

    def _mix(self, x, state, step):
        memory, ck, cv = self._state(state, x.shape[0], x.device, compute_dtype(x.dtype))
        q, k, v = self._qkv(x)
        y, ck, cv = persistent_window_attention(q, k, v, self.persistent_k, self.persistent_v, ck, cv, self.window)
        m, memory = self._write_read(x, memory, step)
        return self._gate(y, m, x.dtype), TitansMAGState(memory, ck, cv)

    def state_size(self, tokens: int = 0) -> int:
        """Bytes of state per sequence: :func:`~longattn.recurrent.titans_combined.titans_mag_state_size`
        (the memory's state and the window's cache)."""
        return titans_mag_state_size(self.kv_heads, self.head_dim, self.window, **self._memory_state_size())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}"


class TitansMALLayer(TitansMAGLayer):
    """Titans' memory as a layer (MAL; Behrouz, Zhong, Mirrokni 2025, §4.3): the neural memory over
    ``x``, then sliding-window softmax attention with persistent tokens over the memory's read-out
    (normalised per head), then ``o_proj`` of the normalised attention output; no gate
    (:mod:`longattn.recurrent.titans_combined`; float64 reference ``titans_mal_naive``).

    Args: as :class:`TitansMAGLayer`. ``q_proj, k_proj, v_proj`` read the memory's read-out
    (``heads · head_dim`` features), not ``x``. State: :class:`TitansMALState` (the memory's state
    and the window's last keys and values).
    """

    op_name = "titans_mal"
    _state_type = TitansMALState

    def __init__(self, d_model: int, heads: int, head_dim: int, *, window: int = 64, persistent_tokens: int = 4,
                 memory: str = "mlp", memory_hidden: int | None = None, chunk_size: int = 16,
                 theta_scale: float = 0.1, kv_heads: int | None = None, bias: bool = False):
        super().__init__(d_model, heads, head_dim, window=window, persistent_tokens=persistent_tokens,
                         memory=memory, memory_hidden=memory_hidden, chunk_size=chunk_size,
                         theta_scale=theta_scale, kv_heads=kv_heads, bias=bias)

    def _build_projections(self, *, query: bool = True, d_in: int | None = None) -> None:
        # the attention reads the memory's read-out (heads · head_dim features), not x
        super()._build_projections(query=query, d_in=self.heads * self.head_dim)

    def _mix(self, x, state, step):
        b, t, _ = x.shape
        memory, ck, cv = self._state(state, b, x.device, compute_dtype(x.dtype))
        m, memory = self._write_read(x, memory, step)  # [B, H, T, D] float32 (float64 for float64 x)
        h, d = self.heads, self.head_dim
        u = titans_norm(m, self.memory_norm_weight).transpose(1, 2).reshape(b, t, h * d).to(x.dtype)
        q, k, v = self._qkv(u)
        y, ck, cv = persistent_window_attention(q, k, v, self.persistent_k, self.persistent_v, ck, cv, self.window)
        return titans_norm(y, self.attn_norm_weight).to(x.dtype), TitansMALState(memory, ck, cv)

    def state_size(self, tokens: int = 0) -> int:
        """Bytes of state per sequence: :func:`~longattn.recurrent.titans_combined.titans_mal_state_size`."""
        return titans_mal_state_size(self.kv_heads, self.head_dim, self.window, **self._memory_state_size())


class TitansMACLayer(_TitansCombined):
    """Titans' memory as a context (MAC; Behrouz, Zhong, Mirrokni 2025, §4.1): segments of ``segment``
    tokens; each token retrieves from the memory as it was before its segment, attends (causally
    within the segment) over the persistent tokens, the segment's retrieved tokens and the
    segment's tokens; the attention output writes the memory, which is read back and gates it
    (:mod:`longattn.recurrent.titans_combined`).

    Args:
        segment: tokens per segment, on a grid from the sequence's first token (default 64).
        persistent_tokens, memory, memory_hidden, chunk_size, theta_scale, kv_heads, bias: as
            :class:`TitansMAGLayer`.

    Projections: ``q_proj, k_proj, v_proj`` (the attention; keys and values of the retrieved tokens
    too), ``retrieve_q_proj`` (``d_model -> heads · head_dim``: the retrieval's queries),
    ``retrieve_proj`` (``heads · head_dim -> d_model``: a retrieved read-out as a token), and the
    memory's ``mem_q_proj, mem_k_proj, mem_v_proj, gate_proj`` reading the attention output
    (``heads · head_dim`` features). State: :class:`TitansMACState`; a sequence may be split
    anywhere (mid-segment too) and continued exactly.
    """

    op_name = "titans_mac"

    def __init__(self, d_model: int, heads: int, head_dim: int, *, segment: int = 64, persistent_tokens: int = 4,
                 memory: str = "mlp", memory_hidden: int | None = None, chunk_size: int = 16,
                 theta_scale: float = 0.1, kv_heads: int | None = None, bias: bool = False):
        validate.check_positive_int("heads", heads)
        validate.check_positive_int("head_dim", head_dim)
        super().__init__(d_model, heads, head_dim, memory_in=heads * head_dim, kv_heads=kv_heads,
                         persistent_tokens=persistent_tokens, memory=memory, memory_hidden=memory_hidden,
                         chunk_size=chunk_size, theta_scale=theta_scale, bias=bias)
        self.segment = validate.check_positive_int("segment", segment)
        self.retrieve_q_proj = nn.Linear(d_model, self.heads * self.head_dim, bias=bias)
        self.retrieve_proj = nn.Linear(self.heads * self.head_dim, d_model, bias=bias)

    def _state(self, state: object, b: int, device, cdt):
        if state is None:
            memory = self._memory_initial(b, device, cdt)
            empty = torch.zeros(b, self.kv_heads, 0, self.head_dim, dtype=cdt, device=device)
            return memory, self._weights(memory), empty, empty, empty, empty
        if not isinstance(state, TitansMACState):
            raise TypeError(f"state must be a TitansMACState or None, got {type(state).__name__}")
        self._check_memory_state(state.memory, "state")
        d, dh = self.head_dim, self.memory_hidden
        shapes = [(b, self.kv_heads, d, d)] if self.memory == "linear" else [(b, self.kv_heads, dh, d),
                                                                            (b, self.kv_heads, d, dh)]
        held = state.segment_memory
        if not isinstance(held, tuple) or len(held) != len(shapes):
            raise TypeError(f"state.segment_memory must be a tuple of {len(shapes)} tensor(s) for memory="
                            f"{self.memory!r} ((w,) or (w1, w2)), got {type(held).__name__}")
        held = tuple(check_tensor_arg(f"state.segment_memory[{i}]", w, shape, device).to(cdt)
                     for i, (w, shape) in enumerate(zip(held, shapes)))
        most, what = self.segment - 1, f"segment={self.segment} (the current segment's tokens before the last)"
        caches = [self._cache(f"state.{f}", getattr(state, f), b, most, device, cdt, what)
                  for f in ("k_tokens", "v_tokens", "k_retrieved", "v_retrieved")]
        if len({tuple(c.shape) for c in caches}) != 1:
            raise ValueError("state.k_tokens, v_tokens, k_retrieved and v_retrieved must have one shape, got "
                             f"{[tuple(c.shape) for c in caches]}")
        return (state.memory, held, *caches)

    def _mix(self, x, state, step):
        b, t, _ = x.shape
        cdt = compute_dtype(x.dtype)
        memory, held, kx_c, vx_c, kh_c, vh_c = self._state(state, b, x.device, cdt)
        q, kx, vx = self._qkv(x)
        qr = self._heads(self.retrieve_q_proj(x), self.heads)
        hd = self.heads * self.head_dim
        outs = []
        a = 0
        while a < t:  # the rest of the current segment, then whole segments, then a part of one
            e = min(t, a + self.segment - kx_c.shape[2])
            length = e - a
            h = titans_memory_read(qr[:, :, a:e], held)  # M*_{s-1}(W_r x): the memory before the segment
            token = self.retrieve_proj(h.transpose(1, 2).reshape(b, length, hd))  # [B, L, d_model]
            kh, vh = self._heads(self.k_proj(token), self.kv_heads), self._heads(self.v_proj(token), self.kv_heads)
            kx_c, vx_c = torch.cat([kx_c, kx[:, :, a:e].to(cdt)], 2), torch.cat([vx_c, vx[:, :, a:e].to(cdt)], 2)
            kh_c, vh_c = torch.cat([kh_c, kh.to(cdt)], 2), torch.cat([vh_c, vh.to(cdt)], 2)
            y = segment_attention(q[:, :, a:e], kx_c, vx_c, kh_c, vh_c, self.persistent_k, self.persistent_v)
            ym = y.transpose(1, 2).reshape(b, length, hd).to(x.dtype)  # float32 -> the projections' dtype
            m, memory = self._write_read(ym, memory, step=length == 1)
            outs.append(self._gate(y, m, x.dtype))
            if kx_c.shape[2] == self.segment:  # the segment is complete: the next one retrieves from here
                held = self._weights(memory)
                kx_c, vx_c, kh_c, vh_c = (c[:, :, :0] for c in (kx_c, vx_c, kh_c, vh_c))
            a = e
        out = torch.cat(outs, dim=2) if outs else q.new_zeros(b, self.heads, 0, self.head_dim)
        return out, TitansMACState(memory, held, kx_c, vx_c, kh_c, vh_c)

    def state_size(self, tokens: int = 0) -> int:
        """Bytes of state per sequence at its largest:
        :func:`~longattn.recurrent.titans_combined.titans_mac_state_size` (the memory's state, its
        segment-start weights and the current segment's keys and values)."""
        return titans_mac_state_size(self.kv_heads, self.head_dim, self.segment, **self._memory_state_size())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, segment={self.segment}"


#: op name -> layer class
LAYERS: dict[str, type[_RecurrentLayer]] = {
    cls.op_name: cls
    for cls in (LinearAttentionLayer, LightningLayer, GLALayer, DeltaNetLayer, GatedDeltaNetLayer, AarenLayer,
                BasedLayer, RATLayer, TitansLayer, TitansMAGLayer, TitansMACLayer, TitansMALLayer)
}


def make_layer(name: str, d_model: int, heads: int, head_dim: int, **kw: Any) -> _RecurrentLayer:
    """Build the layer registered as ``name`` in :data:`LAYERS` (``"linear"``, ``"lightning"``,
    ``"gla"``, ``"deltanet"``, ``"gated_deltanet"``, ``"aaren"``, ``"based"``, ``"rat"``,
    ``"titans"``, ``"titans_mag"``, ``"titans_mac"``, ``"titans_mal"``); ``kw`` are the class's keyword arguments
    (``kv_heads``, ``chunk``, …)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, one of {sorted(LAYERS)}, got {type(name).__name__}")
    if name not in LAYERS:
        raise ValueError(f"name must be one of {sorted(LAYERS)}, got {name!r}")
    cls = LAYERS[name]
    try:
        return cls(d_model, heads, head_dim, **kw)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            raise TypeError(f"make_layer({name!r}): {exc} (layer {cls.__name__})") from exc
        raise
