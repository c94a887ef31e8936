"""Position encodings, applied either as rotations of q/k or as a bias on the scores.

Every encoding is a ``PositionEncoding`` with a ``kind``:

* ``"rotary"`` — ``rotate(q, k, q_pos, k_pos) -> (q, k)``: RoPE (+ linear / NTK / YaRN scaling), xPos.
* ``"bias"``   — ``score_bias(h, q_pos, k_pos) -> Tensor``: ALiBi, T5 relative bias. Pure tensor ops
  on broadcastable integer tensors, so the same function serves the eager kernels and
  FlexAttention's ``score_mod``.
* ``"content"``— ``row_bias(q_rows, k, q_pos, k_pos, scale) -> Tensor``: biases that depend on q and
  k (CoPE); only the eager tiled kernel can take them.
* ``"none"``   — NoPE.

``longattn.attention(..., position=enc)`` applies it with query positions
``tokens_k - tokens_q + i`` and key positions ``j``.

Rotations use the "rotate-half" layout (as Hugging Face transformers' Llama): channel ``i`` of the
first half and channel ``i + head_dim/2`` of the second half form the pair rotated by angle
``pos · ω_i``. Angles are computed in float64 (float32 on devices without float64) and the
resulting cos/sin are cast to the dtype of q, so long positions keep their phase accurately.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from longattn.core import validate

Tensor = torch.Tensor

__all__ = [
    "ALiBi",
    "CoPE",
    "LinearScaling",
    "NTKScaling",
    "NoPE",
    "PositionEncoding",
    "RoPE",
    "T5RelativeBias",
    "XPos",
    "YaRNScaling",
]


class PositionEncoding:
    """Base class; see the module docstring for the contract of each ``kind``."""

    kind: ClassVar[str] = "none"

    def rotate(self, q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor]:
        """q ``[B, Hq, Tq, D]``, k ``[B, Hkv, Tk, D]``, positions int64 ``[Tq]`` / ``[Tk]``."""
        return q, k

    def score_bias(self, h: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """``h``: query-head index, ``q_pos``, ``k_pos``: positions; all int64 and broadcastable
        (e.g. ``[1, H, 1, 1]``, ``[Tq, 1]``, ``[1, Tk]``). Returns float32 broadcastable to
        ``[*, H, Tq, Tk]``, added to the *scaled* scores.

        A bias that differs between batch rows (``ALiBi`` with ``[B, H]`` slopes) declares a
        keyword parameter ``b``: the kernels then pass the batch index in it (``[B, 1, 1, 1]``
        eagerly, 0-d under FlexAttention) and the result may be ``[B, H, Tq, Tk]``."""
        raise NotImplementedError

    def row_bias(self, q_rows: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float) -> Tensor:
        """q_rows ``[B, Hq, bq, D]``, k ``[B, Hkv, Tk, D]``, q_pos ``[bq]``, k_pos ``[Tk]`` →
        ``[B, Hq, bq, Tk]`` float32 bias over all keys for these query rows."""
        raise NotImplementedError

    def check(self, q: Tensor, k: Tensor) -> None:
        """Raise ``ValueError`` if this encoding cannot serve q ``[B, Hq, Tq, D]`` / k
        ``[B, Hkv, Tk, D]`` (wrong head_dim or head count). Default: accepts anything.

        ``score_bias`` cannot check shapes itself (under FlexAttention it sees scalars), so callers
        should call this once before running a kernel."""


# --------------------------------------------------------------------------------------------
# argument checks


def _check_real(name: str, value: object, *, low: float, inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    ok = math.isfinite(value) and (value >= low if inclusive else value > low)
    if not ok:
        bound = f">= {low:g}" if inclusive else f"> {low:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


def _check_head_dim(head_dim: object) -> int:
    if isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral):
        raise TypeError(f"head_dim must be an int, got {type(head_dim).__name__} {head_dim!r}")
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int (channels are rotated in pairs), got {head_dim}")
    return int(head_dim)


def _check_tensor(name: str, t: object, dims: tuple[int, ...]) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        want = " or ".join(str(d) for d in dims)
        raise ValueError(f"{name} must have rank {want}, got rank {t.dim()} with shape {tuple(t.shape)}")
    return t


def _check_qk(enc_name: str, head_dim: int, q: Tensor, k: Tensor) -> None:
    _check_tensor("q", q, (4,))
    _check_tensor("k", k, (4,))
    for name, t in (("q", q), ("k", k)):
        if t.shape[-1] != head_dim:
            raise ValueError(
                f"{name} has head_dim {t.shape[-1]} but this {enc_name} was built for head_dim={head_dim}"
            )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"k has {k.shape[1]} heads but q has {q.shape[1]}: heads_q must be a multiple of heads_kv")


def _check_positions(name: str, pos: object, x: Tensor) -> Tensor:
    """Positions for the token axis of ``x [B, H, T, D]``: ``[T]`` or ``[B, T]``."""
    _check_tensor(name, pos, (1, 2))
    if pos.dtype == torch.bool or pos.is_complex():
        raise TypeError(f"{name} must be an integer or real tensor of positions, got dtype {pos.dtype}")
    tokens = x.shape[2]
    ok = pos.shape[-1] == tokens and (pos.dim() == 1 or pos.shape[0] in (1, x.shape[0]))
    if not ok:
        raise ValueError(
            f"{name} has shape {tuple(pos.shape)}, expected [{tokens}] or [batch, {tokens}] to match "
            f"the {tokens} tokens of a tensor of shape {tuple(x.shape)}"
        )
    return pos


def _angle_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _on(t: Tensor, device: torch.device) -> Tensor:
    return t if t.device == device else t.to(device)


# --------------------------------------------------------------------------------------------
# RoPE and its context-extension scalings


@dataclass(frozen=True)
class LinearScaling:
    """Position interpolation (Chen et al. 2023, "Extending Context Window of Large Language
    Models via Positional Interpolation"): every position is divided by ``factor``, i.e. every
    frequency ``ω_i`` becomes ``ω_i / factor``, so ``factor × trained length`` positions fit the
    trained angle range.

    Args:
        factor: context extension ratio, a finite number ``>= 1`` (1 = plain RoPE).
    """

    factor: float

    def __post_init__(self):
        object.__setattr__(self, "factor", _check_real("factor", self.factor, low=1.0))

    def inv_freq(self, head_dim: int, theta: float) -> Tensor:
        return _base_inv_freq(head_dim, theta) / self.factor

    def attention_factor(self) -> float:
        return 1.0


@dataclass(frozen=True)
class NTKScaling:
    """"NTK-aware" scaling (bloc97, 2023; analysed in Peng et al. 2023, YaRN): instead of dividing
    positions, enlarge the base to ``theta' = theta · factor ** (d / (d - 2))``. High frequencies
    are almost untouched (extrapolation) while the lowest one, ``theta^-(d-2)/d``, is divided by
    exactly ``factor`` (interpolation).

    Args:
        factor: context extension ratio, a finite number ``>= 1`` (1 = plain RoPE).
    """

    factor: float

    def __post_init__(self):
        object.__setattr__(self, "factor", _check_real("factor", self.factor, low=1.0))

    def theta(self, head_dim: int, theta: float) -> float:
        return theta * self.factor ** (head_dim / (head_dim - 2))

    def inv_freq(self, head_dim: int, theta: float) -> Tensor:
        return _base_inv_freq(head_dim, self.theta(head_dim, theta))

    def attention_factor(self) -> float:
        return 1.0


@dataclass(frozen=True)
class YaRNScaling:
    """YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language
    Models"): "NTK-by-parts" frequency interpolation plus an attention temperature.

    Frequencies: for each rotated pair ``i`` let ``r_i = original_max_position · ω_i / (2π)`` be
    the number of full turns it makes over the trained context. Pairs that turn many times
    (``r_i >= beta_fast``) already saw every phase in training and keep ``ω_i`` (extrapolate);
    pairs that turn less than ``beta_slow`` times are interpolated (``ω_i / factor``); in between
    the two are blended linearly with ``γ_i = clamp((r_i - beta_slow) / (beta_fast - beta_slow), 0, 1)``:
    ``ω'_i = γ_i · ω_i + (1 - γ_i) · ω_i / factor``. (The ramp is used on the continuous ``r_i``;
    some implementations first round its end points to whole channel indices.)

    Temperature: the paper scales the logits by ``1/t`` with ``sqrt(1/t) = 0.1 · ln(factor) + 1``.
    Here the rotated q *and* k are both multiplied by ``sqrt(1/t)`` (folded into the cos/sin
    tables, see ``RoPE.cos_sin``), so every logit ``q·k`` is multiplied by ``1/t`` while the
    kernels' ``scale`` stays ``1/sqrt(head_dim)``.

    Args:
        factor: context extension ratio ``>= 1`` (1 = plain RoPE: no ramp effect, temperature 1).
        original_max_position: the context length the model was trained with (positive int).
        beta_fast: turn count bounding the ramp from above, ``beta_fast > beta_slow``.
        beta_slow: turn count bounding the ramp from below, ``beta_slow > 0``.
    """

    factor: float
    original_max_position: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "factor", _check_real("factor", self.factor, low=1.0))
        validate.check_positive_int("original_max_position", self.original_max_position)
        fast = _check_real("beta_fast", self.beta_fast, low=0.0, inclusive=False)
        slow = _check_real("beta_slow", self.beta_slow, low=0.0, inclusive=False)
        if fast <= slow:
            raise ValueError(f"beta_fast must be greater than beta_slow, got beta_fast={fast} and beta_slow={slow}")
        object.__setattr__(self, "beta_fast", fast)
        object.__setattr__(self, "beta_slow", slow)

    def ramp(self, head_dim: int, theta: float) -> Tensor:
        """``γ_i`` in ``[0, 1]`` per rotated pair, float64 ``[head_dim/2]`` (1 = keep ``ω_i``)."""
        turns = self.original_max_position * _base_inv_freq(head_dim, theta) / (2 * math.pi)
        return ((turns - self.beta_slow) / (self.beta_fast - self.beta_slow)).clamp(0.0, 1.0)

    def inv_freq(self, head_dim: int, theta: float) -> Tensor:
        base = _base_inv_freq(head_dim, theta)
        gamma = self.ramp(head_dim, theta)
        return gamma * base + (1.0 - gamma) * base / self.factor

    def attention_factor(self) -> float:
        """``sqrt(1/t) = 0.1 · ln(factor) + 1``, the multiplier applied to both q and k."""
        return 0.1 * math.log(self.factor) + 1.0


_SCALINGS = (LinearScaling, NTKScaling, YaRNScaling)


def _base_inv_freq(head_dim: int, theta: float) -> Tensor:
    """``ω_i = theta ** (-2i / d)`` for ``i = 0 … d/2 - 1``, float64 on the CPU."""
    return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotation(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x [B, H, T, D]`` with cos/sin ``[T, D]`` or ``[B, T, D]``."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin


class RoPE(PositionEncoding):
    """Rotary position embedding (Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary
    Position Embedding").

    Channel pair ``(i, i + d/2)`` of a query at position ``n`` is rotated by ``n · ω_i`` with
    ``ω_i = theta ** (-2i/d)`` (rotate-half layout), and likewise for keys at ``m``, so
    ``q_n · k_m`` depends on positions only through ``n - m``.

    Args:
        head_dim: ``D``, a positive even int.
        theta: frequency base (> 1), 10000 in the paper.
        scaling (LinearScaling | NTKScaling | YaRNScaling | None): context extension, or None.

    Shapes: ``rotate(q [B, Hq, Tq, D], k [B, Hkv, Tk, D], q_pos [Tq] or [B, Tq], k_pos [Tk] or
    [B, Tk]) -> (q', k')`` of the same shapes and dtypes.
    """

    kind = "rotary"

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling=None):
        self.head_dim = _check_head_dim(head_dim)
        self.theta = _check_real("theta", theta, low=1.0, inclusive=False)
        if scaling is not None and not isinstance(scaling, _SCALINGS):
            raise TypeError(
                "scaling must be None, LinearScaling, NTKScaling or YaRNScaling, "
                f"got {type(scaling).__name__}"
            )
        self.scaling = scaling
        freq = _base_inv_freq(self.head_dim, self.theta) if scaling is None else scaling.inv_freq(self.head_dim, self.theta)
        #: ``ω_i``, float64 ``[head_dim/2]`` (after scaling)
        self.inv_freq: Tensor = freq
        #: multiplier folded into cos/sin, applied to q and k alike (YaRN's ``sqrt(1/t)``; else 1)
        self.attention_factor: float = 1.0 if scaling is None else scaling.attention_factor()

    def __repr__(self) -> str:
        return f"RoPE(head_dim={self.head_dim}, theta={self.theta:g}, scaling={self.scaling!r})"

    def angles(self, positions: Tensor) -> Tensor:
        """``positions[..., None] · ω`` for the ``D/2`` pairs: float64 ``[..., D/2]`` (float32 on MPS)."""
        if not isinstance(positions, torch.Tensor):
            raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
        dt = _angle_dtype(positions.device)
        return positions.to(dt)[..., None] * _on(self.inv_freq, positions.device).to(dt)

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``(cos, sin)``, each float32 ``[..., head_dim]`` for ``positions [...]`` (int or float), in
        the rotate-half layout (the ``D/2`` angles repeated twice) and already multiplied by
        ``attention_factor`` (YaRN's temperature), so ``x · cos + rotate_half(x) · sin`` is the
        whole encoding of ``x``."""
        ang = self.angles(positions)
        ang = torch.cat((ang, ang), dim=-1)
        f = self.attention_factor
        return (torch.cos(ang) * f).to(torch.float32), (torch.sin(ang) * f).to(torch.float32)

    def rotate(self, q, k, q_pos, k_pos):
        _check_qk("RoPE", self.head_dim, q, k)
        _check_positions("q_pos", q_pos, q)
        _check_positions("k_pos", k_pos, k)
        cq, sq = self.cos_sin(q_pos)
        ck, sk = self.cos_sin(k_pos)
        return _apply_rotation(q, cq, sq), _apply_rotation(k, ck, sk)

    def check(self, q, k):
        _check_qk("RoPE", self.head_dim, q, k)


class XPos(PositionEncoding):
    """xPos (Sun et al. 2022, "A Length-Extrapolatable Transformer"): RoPE times an exponential
    decay per channel pair.

    With ``ζ_i = (2i/d + 0.4) / 1.4`` (in ``(0, 1)``), the rotated query at position ``n`` is
    multiplied by ``ζ_i ** (n / scale_base)`` and the rotated key at ``m`` by
    ``ζ_i ** (-m / scale_base)``, so their product carries ``ζ_i ** ((n - m) / scale_base)``: a
    decay with distance for ``n > m``.

    Centring: only ``n - m`` matters, so ``rotate`` measures positions from a reference ``c`` (the
    midpoint of the smallest and largest position of the call) and uses ``ζ ** ((n - c)/scale_base)``
    / ``ζ ** (-(m - c)/scale_base)``. The scores are unchanged, but the per-side factors stay within
    ``exp(±(span/2) · ln(3.5) / scale_base)`` instead of reaching ``exp(±pos · 1.25 / scale_base)``,
    which under- and overflows float32 after ~35k tokens (scale_base 512). Even centred, factors
    beyond ``exp(±80)`` cannot be represented in float32; ``rotate`` raises ``ValueError`` then
    (a position span above about ``2·80·scale_base/ln 3.5``, ~65k tokens for scale_base 512). The
    returned q', k' are therefore only meaningful together, as a pair from one call.

    The rotation uses the rotate-half layout of ``RoPE`` (the paper's code pairs adjacent channels;
    the two are the same encoding up to a fixed permutation of channels).

    Args:
        head_dim: ``D``, a positive even int.
        theta: RoPE frequency base (> 1).
        scale_base: decay length scale (> 0), 512 in the paper.

    Shapes: as ``RoPE.rotate``.
    """

    kind = "rotary"
    #: largest |exponent| allowed per side (float32 overflows past ~88)
    MAX_LOG_SCALE: ClassVar[float] = 80.0

    def __init__(self, head_dim: int, theta: float = 10000.0, scale_base: float = 512):
        self.head_dim = _check_head_dim(head_dim)
        self.theta = _check_real("theta", theta, low=1.0, inclusive=False)
        self.scale_base = _check_real("scale_base", scale_base, low=0.0, inclusive=False)
        self._rope = RoPE(self.head_dim, self.theta)
        #: ``ζ_i``, float64 ``[head_dim/2]``
        self.zeta: Tensor = (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim + 0.4) / 1.4

    def __repr__(self) -> str:
        return f"XPos(head_dim={self.head_dim}, theta={self.theta:g}, scale_base={self.scale_base:g})"

    def cos_sin(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """The plain RoPE tables, see ``RoPE.cos_sin``."""
        return self._rope.cos_sin(positions)

    def log_decay(self, positions: Tensor, centre: float | Tensor = 0.0) -> Tensor:
        """``ln ζ · (positions - centre) / scale_base`` in the rotate-half layout: float64
        ``[..., head_dim]``. Queries are multiplied by ``exp`` of it, keys by ``exp`` of minus it."""
        dt = _angle_dtype(positions.device)
        log_zeta = torch.log(_on(self.zeta, positions.device)).to(dt)
        log_zeta = torch.cat((log_zeta, log_zeta))
        rel = positions.to(dt) - (centre.to(dt) if isinstance(centre, torch.Tensor) else centre)
        return rel[..., None] * log_zeta / self.scale_base

    def rotate(self, q, k, q_pos, k_pos):
        _check_qk("XPos", self.head_dim, q, k)
        _check_positions("q_pos", q_pos, q)
        _check_positions("k_pos", k_pos, k)
        lo = torch.minimum(q_pos.min(), k_pos.min()).to(torch.float64)
        hi = torch.maximum(q_pos.max(), k_pos.max()).to(torch.float64)
        half_span = float((hi - lo) / 2)
        worst = half_span * math.log(1.4 / 0.4) / self.scale_base
        if worst > self.MAX_LOG_SCALE:
            limit = 2 * self.MAX_LOG_SCALE * self.scale_base / math.log(1.4 / 0.4)
            raise ValueError(
                f"XPos: positions span {2 * half_span:g} tokens, but with scale_base={self.scale_base:g} "
                f"the decay factors overflow float32 beyond a span of about {limit:.0f}; "
                "use a larger scale_base or shorter inputs"
            )
        centre = (lo + hi) / 2
        cq, sq = self._rope.cos_sin(q_pos)
        ck, sk = self._rope.cos_sin(k_pos)
        dq = torch.exp(self.log_decay(q_pos, centre)).to(torch.float32)
        dk = torch.exp(-self.log_decay(k_pos, centre)).to(torch.float32)
        return _apply_rotation(q, cq * dq, sq * dq), _apply_rotation(k, ck * dk, sk * dk)

    def check(self, q, k):
        _check_qk("XPos", self.head_dim, q, k)


# --------------------------------------------------------------------------------------------
# score biases


class ALiBi(PositionEncoding):
    """ALiBi (Press et al. 2022, "Train Short, Test Long: Attention with Linear Biases Enables
    Input Length Extrapolation").

    Head ``h`` adds ``-slope[h] · |q_pos - k_pos|`` to the scaled scores. For keys at or before
    the query (causal attention) this is the paper's ``-slope · (q_pos - k_pos)``; keys after the
    query (non-causal attention) are penalised by their distance in the same way (a symmetric
    bias), so no key gains from being in the future. With query positions ``i + tokens_k -
    tokens_q`` this is flash-attn's ``alibi_slopes`` bias ``-slope · |i + tokens_k - tokens_q - j|``.

    Default slopes: for a power-of-two head count ``H`` they are the geometric sequence
    ``2^(-8/H), 2^(-16/H), …, 2^(-8)`` (``2^-1 … 2^-8`` for 8 heads). Otherwise, with ``P`` the
    largest power of two below ``H``, the first ``P`` heads take the ``P``-head sequence and the
    remaining ``H - P`` heads take the sequence for ``2P`` heads at its 1st, 3rd, 5th … entries,
    i.e. the slopes that fall halfway (geometrically) between those already used — the
    construction of the paper's reference code.

    Args:
        heads: number of *query* heads ``Hq``.
        slopes: None (the default slopes above), or a real tensor of finite slopes as flash-attn's
            ``alibi_slopes``: ``[Hq]`` (one per head) or ``[B, Hq]`` (one per batch row and head;
            ``[1, Hq]`` is taken as ``[Hq]``). Stored as float32. ``[B, Hq]`` slopes serve only
            inputs of batch ``B``, so they cannot be used where rows run in groups (``seqlens_k``,
            ``varlen_attention``).

    Shapes: ``score_bias(h, q_pos, k_pos, b=None)`` on broadcastable integer tensors (e.g.
    ``[1, Hq, 1, 1]``, ``[Tq, 1]``, ``[1, Tk]``, and ``b`` ``[B, 1, 1, 1]``) → float32 of their
    broadcast shape; 0-d inputs give a 0-d result. ``b`` is needed (and used) only with ``[B, Hq]``
    slopes.
    """

    kind = "bias"

    def __init__(self, heads: int, slopes: Tensor | None = None):
        self.heads = validate.check_positive_int("heads", heads)
        self._pow2 = 1 << (self.heads.bit_length() - 1)  # largest power of two <= heads
        self._custom = slopes is not None
        #: float32 slopes: ``[heads]`` (the default sequence above, or given), or given ``[B, heads]``
        self.slopes: Tensor = self._slope_table() if slopes is None else self._check_slopes(slopes)

    def __repr__(self) -> str:
        if not self._custom:
            return f"ALiBi(heads={self.heads})"
        return f"ALiBi(heads={self.heads}, slopes=<tensor {list(self.slopes.shape)}>)"

    @property
    def per_batch(self) -> bool:
        """True when the slopes are ``[B, heads]``: the bias differs between batch rows."""
        return self.slopes.dim() == 2

    def _check_slopes(self, slopes: object) -> Tensor:
        _check_tensor("slopes", slopes, (1, 2))
        if slopes.dtype == torch.bool or slopes.is_complex():
            raise TypeError(f"slopes must be a real tensor, got dtype {slopes.dtype}")
        if slopes.dim() == 2 and slopes.shape[0] == 1:
            slopes = slopes[0]
        if slopes.shape[-1] != self.heads or (slopes.dim() == 2 and slopes.shape[0] == 0):
            raise ValueError(
                f"slopes has shape {tuple(slopes.shape)}, expected [heads] = [{self.heads}] or "
                f"[batch, heads] = [B, {self.heads}]")
        slopes = slopes.detach().to(torch.float32)
        bad = int((~torch.isfinite(slopes)).sum())
        if bad:
            raise ValueError(
                f"slopes must be finite, got {bad} NaN/Inf value(s) in slopes of shape {tuple(slopes.shape)}")
        return slopes

    def _slope_table(self) -> Tensor:
        p = self._pow2
        start = 2.0 ** (-8.0 / p)
        slopes = [start ** (i + 1) for i in range(p)]
        if p < self.heads:
            start2 = 2.0 ** (-8.0 / (2 * p))
            slopes += [start2 ** (i + 1) for i in range(0, 2 * p, 2)][: self.heads - p]
        return torch.tensor(slopes, dtype=torch.float32)

    def slope(self, h: Tensor, b: Tensor | None = None) -> Tensor:
        """Slope of head ``h`` (and batch row ``b`` with ``[B, H]`` slopes), any broadcastable int
        shapes. Default slopes use the closed form ``2^(-8(h+1)/P)`` for ``h < P`` and
        ``2^(-4(2(h-P)+1)/P)`` after — tensor ops only, no table lookup; given slopes are looked up."""
        if self._custom:
            table = _on(self.slopes, h.device)
            if not self.per_batch:
                return table[h.to(torch.int64)]
            if b is None:
                raise ValueError(
                    f"this ALiBi has per-batch slopes {list(self.slopes.shape)}: score_bias needs the batch index b")
            return table[b.to(torch.int64), h.to(torch.int64)]
        p = self._pow2
        hf = h.to(torch.float32)
        first = -8.0 * (hf + 1.0) / p
        rest = -4.0 * (2.0 * (hf - p) + 1.0) / p
        return torch.exp2(torch.where(h < p, first, rest))

    def score_bias(self, h, q_pos, k_pos, b=None):
        dist = (q_pos - k_pos).abs().to(torch.float32)
        return -self.slope(h, b) * dist

    def check(self, q, k):
        if q.shape[1] != self.heads:
            raise ValueError(f"q has {q.shape[1]} heads but this ALiBi was built for heads={self.heads}")
        if self.per_batch and q.shape[0] != self.slopes.shape[0]:
            raise ValueError(
                f"q has batch {q.shape[0]} but this ALiBi's slopes have shape {list(self.slopes.shape)}, one row per "
                f"batch row: expected batch {self.slopes.shape[0]} (calls that run rows in groups, seqlens_k or "
                "varlen_attention, cannot take per-batch slopes)")


class T5RelativeBias(PositionEncoding):
    """T5 relative position bias (Raffel et al. 2020, "Exploring the Limits of Transfer Learning
    with a Unified Text-to-Text Transformer").

    The relative position ``k_pos - q_pos`` falls in one of ``num_buckets`` buckets, and head ``h``
    adds the learned scalar ``table[bucket, h]`` to the scaled scores. Buckets: with
    ``bidirectional`` half of them are for keys after the query (offset by ``num_buckets/2``) and
    half for keys at or before it; without, keys after the query share bucket 0 with the query
    itself. Within a half of ``n`` buckets, distances ``0 … n/2 - 1`` each get their own bucket and
    larger distances are spread logarithmically over the other ``n/2`` buckets up to
    ``max_distance``; farther ones share the last bucket.

    Args:
        heads: number of query heads ``Hq``.
        num_buckets: buckets (>= 2, or >= 4 and even with ``bidirectional``).
        max_distance: distance at which the last bucket starts (> ``num_buckets/4`` bidirectional,
            > ``num_buckets/2`` otherwise).
        bidirectional: encoder-style (True) or decoder-style (False) buckets.
        table: learned biases ``[num_buckets, heads]``; default: drawn from ``N(0, 1)`` with a
            ``torch.Generator`` seeded by ``seed`` (stand-in values for experiments — load trained
            ones for real use).

    Shapes: ``score_bias`` as ``ALiBi.score_bias``. The bucket function uses only ``torch.where``,
    ``clamp`` and ``log``, so it runs under FlexAttention's vmap.
    """

    kind = "bias"

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True,
                 table: Tensor | None = None, *, seed: int = 0):
        self.heads = validate.check_positive_int("heads", heads)
        self.num_buckets = validate.check_positive_int("num_buckets", num_buckets)
        self.max_distance = validate.check_positive_int("max_distance", max_distance)
        if not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional must be a bool, got {type(bidirectional).__name__}")
        self.bidirectional = bidirectional
        if bidirectional and (num_buckets < 4 or num_buckets % 2):
            raise ValueError(
                f"num_buckets must be an even int >= 4 when bidirectional=True (half for each direction), got {num_buckets}"
            )
        if not bidirectional and num_buckets < 2:
            raise ValueError(f"num_buckets must be >= 2, got {num_buckets}")
        half = num_buckets // 2 if bidirectional else num_buckets
        self._half = half
        self._exact = half // 2
        if max_distance <= self._exact:
            raise ValueError(
                f"max_distance must exceed the {self._exact} exactly-bucketed distances "
                f"(num_buckets={num_buckets}, bidirectional={bidirectional}), got {max_distance}"
            )
        if table is None:
            gen = torch.Generator().manual_seed(int(seed))
            table = torch.randn(num_buckets, self.heads, generator=gen, dtype=torch.float32, device=gen.device)
        else:
            _check_tensor("table", table, (2,))
            if tuple(table.shape) != (num_buckets, self.heads):
                raise ValueError(
                    f"table has shape {tuple(table.shape)}, expected [num_buckets, heads] = [{num_buckets}, {self.heads}]"
                )
            if not table.is_floating_point():
                raise TypeError(f"table must be a floating tensor, got dtype {table.dtype}")
            table = table.to(torch.float32)
        #: ``[num_buckets, heads]`` float32
        self.table: Tensor = table

    def __repr__(self) -> str:
        return (f"T5RelativeBias(heads={self.heads}, num_buckets={self.num_buckets}, "
                f"max_distance={self.max_distance}, bidirectional={self.bidirectional})")

    def bucket(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        """Bucket index (int64, broadcast shape of the inputs) of relative position ``k_pos - q_pos``."""
        rel = (k_pos - q_pos).to(torch.int64)
        if self.bidirectional:
            offset = torch.where(rel > 0, self._half, 0)
            dist = rel.abs()
        else:
            offset = torch.zeros_like(rel)
            dist = (-rel).clamp(min=0)
        exact = self._exact
        # log-spaced buckets for dist >= exact; clamping first keeps log() finite at dist < exact.
        ratio = dist.clamp(min=exact).to(torch.float32) / exact
        far = exact + (torch.log(ratio) / math.log(self.max_distance / exact) * (self._half - exact)).to(torch.int64)
        far = far.clamp(max=self._half - 1)
        return offset + torch.where(dist < exact, dist, far)

    def score_bias(self, h, q_pos, k_pos):
        table = _on(self.table, q_pos.device)
        return table[self.bucket(q_pos, k_pos), h.to(torch.int64)]

    def check(self, q, k):
        if q.shape[1] != self.heads:
            raise ValueError(f"q has {q.shape[1]} heads but this T5RelativeBias was built for heads={self.heads}")


# --------------------------------------------------------------------------------------------
# content-dependent


class CoPE(PositionEncoding):
    """Contextual position encoding (Golovneva et al. 2024, "Contextual Position Encoding:
    Learning to Count What's Important").

    For a query at position ``n`` and a key at ``j <= n``: gate ``g_nt = sigmoid(q_n · k_t)``, position
    ``p_nj = Σ_{t=j..n} g_nt`` (counted over the whole causal prefix, whatever other mask the method
    applies), clamped to ``npos_max - 1``, and bias
    ``(1 - w) · q_n·e_h[floor p] + w · q_n·e_h[ceil p]`` with ``w = p - floor p`` and learned
    embeddings ``e [heads, npos_max, head_dim]``. Keys after the query (``j > n``) get bias 0.

    Gates use the raw ``q·k`` as in the paper's equation (``scaled_gates=False``, the default); with
    ``scaled_gates=True`` they use ``scale · q·k``, the scaled logits the authors' released code feeds
    the sigmoid. The bias itself is the unscaled ``q·e`` and is added to the scaled scores.

    Args:
        head_dim: ``D``.
        heads: number of query heads ``Hq`` (one embedding table per head).
        npos_max: number of integer positions with an embedding (>= 2).
        embeddings: ``[heads, npos_max, head_dim]``; default drawn from ``N(0, 1/head_dim)`` with a
            ``torch.Generator`` seeded by ``seed`` (stand-in values for experiments).
        scaled_gates: see above.

    Shapes: ``row_bias(q_rows [B, Hq, bq, D], k [B, Hkv, Tk, D], q_pos [bq], k_pos [Tk], scale) ->
    [B, Hq, bq, Tk]`` float32 with memory ``O(B·Hq·bq·Tk)``; keys must be in increasing position order
    (as ``longattn.attention`` passes them).
    """

    kind = "content"

    def __init__(self, head_dim: int, heads: int, npos_max: int = 64, embeddings: Tensor | None = None, *,
                 scaled_gates: bool = False, seed: int = 0):
        self.head_dim = validate.check_positive_int("head_dim", head_dim)
        self.heads = validate.check_positive_int("heads", heads)
        self.npos_max = validate.check_positive_int("npos_max", npos_max)
        if self.npos_max < 2:
            raise ValueError(f"npos_max must be >= 2, got {npos_max}")
        if not isinstance(scaled_gates, bool):
            raise TypeError(f"scaled_gates must be a bool, got {type(scaled_gates).__name__}")
        self.scaled_gates = scaled_gates
        expected = (self.heads, self.npos_max, self.head_dim)
        if embeddings is None:
            gen = torch.Generator().manual_seed(int(seed))
            embeddings = torch.randn(*expected, generator=gen, dtype=torch.float32,
                                     device=gen.device) / math.sqrt(self.head_dim)
        else:
            _check_tensor("embeddings", embeddings, (3,))
            if tuple(embeddings.shape) != expected:
                raise ValueError(
                    f"embeddings has shape {tuple(embeddings.shape)}, expected [heads, npos_max, head_dim] = {list(expected)}"
                )
            if not embeddings.is_floating_point():
                raise TypeError(f"embeddings must be a floating tensor, got dtype {embeddings.dtype}")
        #: ``[heads, npos_max, head_dim]``
        self.embeddings: Tensor = embeddings

    def __repr__(self) -> str:
        return (f"CoPE(head_dim={self.head_dim}, heads={self.heads}, npos_max={self.npos_max}, "
                f"scaled_gates={self.scaled_gates})")

    def check(self, q, k):
        _check_qk("CoPE", self.head_dim, q, k)
        if q.shape[1] != self.heads:
            raise ValueError(f"q has {q.shape[1]} heads but this CoPE was built for heads={self.heads}")

    def _check_rows(self, q_rows, k, q_pos, k_pos):
        self.check(q_rows, k)
        if q_rows.shape[0] != k.shape[0]:
            raise ValueError(f"q_rows has batch {q_rows.shape[0]} but k has batch {k.shape[0]}: they must match")
        for name, pos, n in (("q_pos", q_pos, q_rows.shape[2]), ("k_pos", k_pos, k.shape[2])):
            _check_tensor(name, pos, (1,))
            if pos.shape[0] != n:
                raise ValueError(f"{name} has {pos.shape[0]} positions, expected {n}")

    def positions(self, q_rows: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float | None = None) -> Tensor:
        """Contextual positions ``p`` ``[B, Hq, bq, Tk]`` float32, clamped to ``npos_max - 1``, 0 for
        keys after the query. ``scale`` (default ``1/sqrt(D)``) only matters with ``scaled_gates``."""
        self._check_rows(q_rows, k, q_pos, k_pos)
        p, _ = self._positions(q_rows, k, q_pos, k_pos, self._scale(scale))
        return p

    def _scale(self, scale: float | None) -> float:
        return validate.check_scale(scale, self.head_dim)

    def _positions(self, q_rows, k, q_pos, k_pos, scale):
        b, hq, bq, d = q_rows.shape
        hk, tk = k.shape[1], k.shape[2]
        qf = q_rows.to(torch.float32)
        kf = k.to(torch.float32)
        logits = torch.matmul(qf.reshape(b, hk, (hq // hk) * bq, d), kf.transpose(-1, -2)).view(b, hq, bq, tk)
        if self.scaled_gates:
            logits = logits * scale
        visible = k_pos.view(1, -1) <= q_pos.view(-1, 1)  # [bq, Tk]: the causal prefix of each row
        gates = torch.sigmoid(logits) * visible
        # p_j = sum of gates over keys t >= j (those after the query are 0): a suffix sum, taken from
        # the query's end so the small counts that survive the clamp are summed first.
        p = gates.flip(-1).cumsum(-1).flip(-1)
        return p.clamp(max=self.npos_max - 1), visible

    def row_bias(self, q_rows, k, q_pos, k_pos, scale):
        self._check_rows(q_rows, k, q_pos, k_pos)
        p, visible = self._positions(q_rows, k, q_pos, k_pos, self._scale(scale))
        emb = _on(self.embeddings, q_rows.device).to(torch.float32)
        # q·e for every integer position: [B, Hq, bq, npos_max]
        pos_logits = torch.matmul(q_rows.to(torch.float32), emb.transpose(-1, -2))
        lo = p.floor()
        w = p - lo
        lo_val = pos_logits.gather(-1, lo.to(torch.int64))
        hi_val = pos_logits.gather(-1, p.ceil().to(torch.int64))
        bias = lo_val * (1.0 - w) + hi_val * w
        return torch.where(visible, bias, 0.0)

    def dense_bias(self, q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
        """The bias for all queries at once, ``[B, Hq, Tq, Tk]`` in the dtype of q, with query
        positions ``Tk - Tq + i``. A separate, direct construction (prefix sums as a triangular
        matrix product, embeddings interpolated before the dot product) materialising
        ``Tq × Tk × D`` values: for tests on small inputs."""
        self.check(q, k)
        scale = self._scale(scale)
        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        dt = q.dtype
        kk = k.to(dt).repeat_interleave(hq // hk, dim=1)
        logits = q @ kk.transpose(-1, -2)
        if self.scaled_gates:
            logits = logits * scale
        q_pos = torch.arange(tq, device=q.device) + (tk - tq)
        k_pos = torch.arange(tk, device=q.device)
        visible = k_pos[None, :] <= q_pos[:, None]
        gates = torch.sigmoid(logits) * visible
        at_or_after = (k_pos[:, None] >= k_pos[None, :]).to(dt)  # [t, j] = 1 if t >= j
        p = (gates @ at_or_after).clamp(max=self.npos_max - 1)
        lo = p.floor().to(torch.int64)
        hi = p.ceil().to(torch.int64)
        w = (p - lo.to(dt))[..., None]
        emb = _on(self.embeddings, q.device).to(dt)
        heads = torch.arange(hq, device=q.device).view(1, hq, 1, 1)
        e = emb[heads, lo] * (1 - w) + emb[heads, hi] * w  # [B, Hq, Tq, Tk, D]
        bias = (q[:, :, :, None, :] * e).sum(-1)
        return torch.where(visible, bias, torch.zeros((), dtype=dt, device=q.device))


class NoPE(PositionEncoding):
    """No position encoding (Kazemnejad et al. 2023, "The Impact of Positional Encoding on Length
    Generalization in Transformers"): causal attention alone carries order. ``kind = "none"``."""

    kind = "none"

    def __repr__(self) -> str:
        return "NoPE()"
