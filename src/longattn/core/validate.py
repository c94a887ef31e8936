"""Argument checks with messages that name the argument, what it got and what was expected."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> None:
    """Check the ``[batch, heads, tokens, head_dim]`` layout, GQA head ratio, dtypes and devices."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must have rank 4 [batch, heads, tokens, head_dim], got rank {t.dim()} "
                f"with shape {tuple(t.shape)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{name} has dtype {t.dtype}; expected a floating dtype "
                "(float16, bfloat16, float32 or float64)"
            )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on one device, got q on {q.device}, k on {k.device}, v on {v.device}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}: they must match")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q has batch {q.shape[0]} but k has batch {k.shape[0]}: they must match")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q has head_dim {q.shape[3]} but k has head_dim {k.shape[3]}: they must match")
    hq, hk = q.shape[1], k.shape[1]
    if (hk == 0 and hq != 0) or (hk != 0 and hq % hk != 0):
        raise ValueError(
            f"k has {hk} heads but q has {hq}: heads_q must be a multiple of heads_kv (GQA/MQA)"
        )
    if q.shape[3] == 0:
        raise ValueError(f"head_dim must be at least 1, got q of shape {tuple(q.shape)}")
    # causal with tokens_q > tokens_k is bottom-right aligned (flash-attn): the first
    # tokens_q - tokens_k queries see no key; `causal` stays in the signature for callers
    del causal


def check_scale(scale: float | None, head_dim: int) -> float:
    """Return the score scale, ``1/sqrt(head_dim)`` when ``scale`` is None."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite real number or None, got {scale!r}")
    if scale <= 0:
        # a softmax temperature; torch's fused causal kernel also returns NaN for scale <= 0
        raise ValueError(f"scale must be > 0 (it multiplies q·k before the softmax), got {scale!r}")
    return float(scale)


def check_positive_int(name: str, value: object, *, allow_zero: bool = False) -> int:
    """Check a size parameter such as ``window``, ``sinks`` or ``budget``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    lowest = 0 if allow_zero else 1
    if value < lowest:
        expected = "a non-negative int" if allow_zero else "a positive int"
        raise ValueError(f"{name} must be {expected}, got {value}")
    return int(value)


#: ``torch.Generator.manual_seed`` takes seeds below this (and folds negative ones into range)
SEED_LIMIT = 2**64


def check_fraction(name: str, value: object) -> float:
    """A share in ``(0, 1]`` (a threshold, a cumulative mass)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1], got {type(value).__name__} {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (a method's named option)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value  # type: ignore[return-value]


def check_seed(name: str, value: object) -> int:
    """Check a random seed: an int in ``[0, 2**64)``, the range ``torch.Generator.manual_seed``
    accepts, so a bad seed is refused when the method is built rather than on its first call."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{name} must be an int in [0, 2**64) (torch.Generator.manual_seed's range), got {value}")
    return int(value)


def check_key_padding_mask(mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> None:
    """``key_padding_mask`` is bool ``[batch, tokens_k]``: True marks a real key, False padding."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    expected = (k.shape[0], k.shape[2])
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"key_padding_mask has shape {tuple(mask.shape)}, expected [batch, tokens_k] = {list(expected)}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must have dtype torch.bool (True = real key), got {mask.dtype}")
    if mask.device != k.device:
        raise ValueError(f"key_padding_mask is on {mask.device} but k is on {k.device}: they must match")
