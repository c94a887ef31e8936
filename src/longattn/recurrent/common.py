"""Shared plumbing of the recurrent ops: argument checks, the compute dtype, initial-state handling,
gate segment sums.

Every op of :mod:`longattn.recurrent` checks its arguments, picks its compute dtype, builds or checks
its initial state and (for the gated ops) sums log gates over stretches of tokens the same way; those
pieces live here, once. The ops' math stays in their own modules.

Errors follow the package's convention: ``TypeError`` / ``ValueError`` naming the argument, what it
got and what was expected. Scalar checks that are not specific to these ops (``check_scale``,
``check_positive_int``, ...) come from :mod:`longattn.core.validate`.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from longattn.core.validate import FLOAT_DTYPES

__all__ = [
    "check_flag",
    "check_float_tensor",
    "check_heads",
    "check_kv",
    "check_nonneg",
    "check_one_token",
    "check_per_token",
    "check_qkv",
    "check_same_dtype_device",
    "check_tensor_arg",
    "compute_dtype",
    "initial_state_tuple",
    "initial_state_tensor",
    "pad_tokens",
    "segment_sums",
    "sums_after",
]


#: tokens of whole chunks a chunked form computes per step, carrying the state between steps: the
#: per-chunk states, scores and feature maps of a step stay in cache. Measured on the 2-core AMD
#: EPYC VM (32k tokens, 8 heads, head_dim 64, float32, chunk 64): linear attention 0.66 s with every
#: chunk at once (67 MB of per-chunk states, their prefix sum a quarter of the time), 0.26-0.30 s
#: in steps of 512 tokens, 0.29-0.35 s of 1,024; lightning 0.49 s at once, 0.24-0.41 s in steps.
GROUP_TOKENS = 512


# -- the compute dtype ------------------------------------------------------------------------


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype states and sums are computed in: float64 for float64 inputs (gradient checks,
    references), float32 for every other input dtype (float32, bfloat16, float16)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# -- scalar arguments ---------------------------------------------------------------------------


def check_flag(name: str, value: object) -> bool:
    """A ``bool`` (not an int standing in for one); returns it."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_nonneg(name: str, value: object) -> float:
    """A finite real ``>= 0`` (an epsilon); returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


# -- q, k, v ----------------------------------------------------------------------------------


def check_float_tensor(name: str, value: object, *layouts: str) -> torch.Tensor:
    """A ``torch.Tensor`` of a floating dtype (float16, bfloat16, float32 or float64) whose rank is
    that of one of ``layouts`` (e.g. ``"[batch, heads, tokens, head_dim_k]"``: rank 4)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    ranks = [layout.count(",") + 1 for layout in layouts]
    if value.dim() not in ranks:
        expected = " or ".join(f"rank {r} {layout}" for r, layout in zip(ranks, layouts))
        raise ValueError(f"{name} must have {expected}, got rank {value.dim()} with shape {tuple(value.shape)}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {value.dtype}; expected a floating dtype (float16, bfloat16, float32 or float64)"
        )
    return value


def check_same_dtype_device(*named: tuple[str, torch.Tensor]) -> None:
    """``(name, tensor)`` pairs that must share one dtype and one device."""
    names = [n for n, _ in named]
    listed = f"{', '.join(names[:-1])} and {names[-1]}"
    if len({t.dtype for _, t in named}) != 1:
        got = ", ".join(f"{n} {t.dtype}" for n, t in named)
        raise TypeError(f"{listed} must share one dtype, got {got}")
    if len({t.device for _, t in named}) != 1:
        got = ", ".join(f"{n} on {t.device}" for n, t in named)
        raise ValueError(f"{listed} must be on one device, got {got}")


def check_heads(h: int, hkv: int) -> None:
    """Grouped heads: ``h`` query heads, a positive multiple of the ``hkv`` key/value heads."""
    if h == 0 or hkv == 0 or h % hkv != 0:
        raise ValueError(f"k has {hkv} heads but q has {h}: heads_q must be a positive multiple of heads_kv (GQA)")


def check_one_token(tokens: int, names: str = "q, k and v") -> None:
    """A step form takes one token: ``tokens`` (the inputs' token count) must be 1."""
    if tokens != 1:
        raise ValueError(f"a step takes one token: {names} must have tokens == 1, got {tokens}")


def check_kv(k: torch.Tensor, v: torch.Tensor) -> None:
    """``v [B, Hkv, T, Dv]`` agrees with ``k [B, Hkv, T, Dk]`` in batch, heads and tokens, and
    neither head dim is 0."""
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(
            f"v has shape {tuple(v.shape)} but k has {tuple(k.shape)}: their [batch, heads_kv, tokens] must match"
        )
    if k.shape[3] == 0 or v.shape[3] == 0:
        raise ValueError(f"head dims must be at least 1, got k of shape {tuple(k.shape)} and v {tuple(v.shape)}")


def check_qkv(q: object, k: object, v: object, *, step: bool = False) -> tuple[int, int, int, int, int, int]:
    """Check ``q [B, H, T, Dk]``, ``k [B, Hkv, T, Dk]``, ``v [B, Hkv, T, Dv]``; return
    ``(B, H, Hkv, T, Dk, Dv)``.

    Floating tensors of one dtype on one device; ``H`` a positive multiple of ``Hkv`` (grouped
    heads); ``Dk, Dv >= 1``; ``T`` may be 0. ``step=True``: ``T`` must be 1 (a decoding step).

    ``v``'s head dim may differ from ``k``'s, so :func:`longattn.core.validate.check_qkv` (which
    asks ``k.shape == v.shape``, as softmax attention does) does not fit these ops.
    """
    check_float_tensor("q", q, "[batch, heads, tokens, head_dim_k]")
    check_float_tensor("k", k, "[batch, heads_kv, tokens, head_dim_k]")
    check_float_tensor("v", v, "[batch, heads_kv, tokens, head_dim_v]")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    check_same_dtype_device(("q", q), ("k", k), ("v", v))
    b, h, t, dk = q.shape
    hkv = k.shape[1]
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, t, dk):
        raise ValueError(
            f"k has shape {tuple(k.shape)} but q has {tuple(q.shape)}: their batch, tokens and head_dim_k "
            "must match (q [batch, heads, tokens, head_dim_k], k [batch, heads_kv, tokens, head_dim_k])"
        )
    check_kv(k, v)
    check_heads(h, hkv)
    if step:
        check_one_token(t)
    return b, h, hkv, t, dk, v.shape[3]


# -- other tensor arguments ---------------------------------------------------------------------


def check_tensor_arg(
    name: str, value: object, shape: tuple[int, ...], device: torch.device, *, layout: str = "", note: str = ""
) -> torch.Tensor:
    """A floating ``torch.Tensor`` of exactly ``shape`` on ``device`` (q's); returns it.

    ``layout`` names the dims in the shape error (``"[batch, heads_kv, tokens]"``), ``note`` adds a
    hint after it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {value.dtype}; expected a floating dtype")
    if tuple(value.shape) != tuple(shape):
        expected = f"{layout} = {list(shape)}" if layout else f"{list(shape)}"
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {expected}{note}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but q is on {device}: they must match")
    return value


def check_per_token(
    name: str,
    value: object,
    shape: tuple[int, ...],
    device: torch.device,
    *,
    low: float,
    high: float,
    what: str,
    layout: str = "",
    note: str = "",
) -> torch.Tensor:
    """A per-token input (a gate ``[B, Hkv, T]`` or ``[B, Hkv, T, Dk]``, a write strength): as
    :func:`check_tensor_arg`, and every value finite and in ``[low, high]``; ``what`` completes
    "``name`` must be ..." in the error (e.g. ``"finite and <= 0 (the log of a forget gate)"``)."""
    x = check_tensor_arg(name, value, shape, device, layout=layout, note=note)
    with torch.no_grad():
        bad = ~(torch.isfinite(x) & (x >= low) & (x <= high))
        if bool(bad.any()):
            raise ValueError(
                f"{name} must be {what}, got {x[bad][0].item()!r} at index {tuple(bad.nonzero()[0].tolist())}"
            )
    return x


# -- initial states -----------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def initial_state_tuple(
    name: str,
    state: object,
    cls: type[NamedTuple],
    shapes: dict[str, tuple[int, ...]],
    device: torch.device,
    dtype: torch.dtype,
    *,
    layouts: dict[str, str] | None = None,
    note: str = "",
    empty: dict[str, float] | None = None,
) -> NamedTuple:
    """The state an op starts from, as ``cls`` (a ``typing.NamedTuple`` of tensors) in ``dtype``.

    Args:
        name: the argument's name in errors (``"initial_state"`` or ``"state"``).
        state: ``None`` (the empty state: every field filled with ``empty.get(field, 0)``, e.g.
            ``-inf`` for a running max) or a ``cls``.
        shapes: each field's expected shape, in ``cls``'s field order (``s [B, Hkv, Dk, Dv]`` ...).
        device: the inputs' device (fields must be on it).
        dtype: the compute dtype (fields are cast to it).
        layouts, note: the dims of each field and a hint, for the shape error.
    """
    if state is None:
        fill = empty or {}
        return cls(*(torch.full(shapes[f], fill.get(f, 0.0), dtype=dtype, device=device) for f in cls._fields))
    if not isinstance(state, cls):
        raise TypeError(
            f"{name} must be {_article(cls.__name__)} {cls.__name__} or None, got {type(state).__name__}"
        )
    layouts = layouts or {}
    return cls(*(
        check_tensor_arg(f"{name}.{f}", value, shapes[f], device, layout=layouts.get(f, ""), note=note).to(dtype)
        for f, value in zip(cls._fields, state)
    ))


def initial_state_tensor(
    name: str,
    state: object,
    cls: type[NamedTuple],
    shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
    *,
    layout: str = "",
) -> torch.Tensor:
    """For a state of one field ``s`` (``GLAState``, ``DeltaState``, ``LightningState``): ``s`` of
    ``shape`` in ``dtype`` (zeros for ``None``), checked as in :func:`initial_state_tuple`."""
    (field,) = cls._fields
    return initial_state_tuple(name, state, cls, {field: shape}, device, dtype, layouts={field: layout})[0]


# -- chunking ---------------------------------------------------------------------------------


def pad_tokens(x: torch.Tensor, pad: int, dtype: torch.dtype) -> torch.Tensor:
    """``x [B, H, T, D] -> [B, H, T + pad, D]`` in ``dtype``: ``pad`` zero tokens appended, so that a
    chunked form sees whole chunks (with zero keys, values and log gates they leave the state as it is).
    """
    x = x.to(dtype)
    return torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x


# -- gate sums that keep every exponent <= 0 ------------------------------------------------


def sums_after(g: torch.Tensor) -> torch.Tensor:
    """``g [..., L, D] -> [..., L, D]``: ``Σ_{s>j} g_s`` along ``L`` (0 at the last position), summed
    from the end so that short sums stay exact. A scalar gate ``[..., L]`` goes in as ``g[..., None]``.
    """
    rev = g.flip(-2).cumsum(-2).flip(-2)  # Σ_{s≥j}
    return torch.cat([rev[..., 1:, :], torch.zeros_like(rev[..., :1, :])], dim=-2)


def segment_sums(g: torch.Tensor) -> torch.Tensor:
    """``g [..., L, D] -> [..., L(i), L(j), D]``: ``Σ_{j<s≤i} g_s`` for ``i ≥ j`` (0 on the diagonal),
    ``-inf`` above it, so ``exp`` of it is the causal decay matrix ``Γ`` (0 where ``j > i``). A scalar
    gate ``[..., L]`` goes in as ``g[..., None]``.

    Each pair is summed over its own stretch only, from ``j + 1`` up (a cumulative sum over a tensor
    that is 0 up to ``j``), so its rounding error scales with the entry itself, not with a long prefix
    sum: near pairs keep exact weights even under hard gates."""
    length = g.shape[-2]
    idx = torch.arange(length, device=g.device)
    later = (idx[:, None] > idx[None, :])[:, :, None]  # [s, j, 1]: s > j
    seg = torch.where(later, g[..., :, None, :], g.new_zeros(())).cumsum(-3)  # [..., L(i), L(j), D]
    causal = (idx[:, None] >= idx[None, :])[:, :, None]
    return torch.where(causal, seg, seg.new_full((), -math.inf))
