"""What a method is, the capability sheet it declares, and the registry of methods by name.

A method is a frozen dataclass: its fields are its hyper-parameters, its docstring names its
paper, and ``run`` turns ``q, k, v`` in the compute dtype (``longattn.core.dtypes``: float32, or bfloat16/
float16 where the hardware is fast for them) into ``(out, lse, stats)``: ``out`` in any float dtype
(``attention`` casts it to the input's), ``lse`` float32. ``longattn.attention``
validates inputs, applies positions and dtype handling around it.

Methods whose sheet says ``softmax=False`` (the linear / recurrent mixers of
``longattn.methods.recurrent``) get q, k, v as the caller passed them, return ``lse=None`` and, with
``state=True``, take ``Call.state`` and return the next state in ``Result.state``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from longattn.core.masks import Causal, Mask
from longattn.kernels.tiled import ScoreBias


@dataclass(frozen=True)
class Capabilities:
    """The capability sheet ``longattn methods`` prints."""

    exact: bool
    causal: bool = True
    non_causal: bool = True
    cross: bool = True
    prefill: bool = True
    decode: bool = True
    score_bias: bool = True  # takes ALiBi / T5 / CoPE-style score biases
    needs_calibration: bool = False
    #: applies the position encoding itself (``Call.position``, q/k not rotated by ``attention``),
    #: e.g. LongHeads, which assigns positions inside the keys it selected
    own_positions: bool = False
    #: gradients flow to q, k, v (through the keys a query attends; a content-based selection is
    #: piecewise constant and contributes none). False: the method refuses inputs that require grad
    differentiable: bool = True
    #: takes k and v in their stored dtype (float32, bfloat16 or float16) and converts only the keys
    #: it reads to q's dtype (the compute dtype): block retrieval decoding reads a few blocks of a
    #: long cache, and converting all of it first would cost more than the step. False: ``attention``
    #: converts k and v to the compute dtype before ``run``
    reads_kv_in_place: bool = False
    #: computes bfloat16/float16 inputs in their own dtype where the hardware is fast for it
    #: (``longattn.core.dtypes``): its kernels are fused flash kernels that keep scores and softmax
    #: statistics in float32. False: half inputs are computed in float32 (eager score paths would
    #: round scores and probabilities to the half dtype)
    half_compute: bool = False
    #: the output is softmax attention over the visible keys, with a log-sum-exp (``Result.lse``)
    #: and the float64 softmax oracle (``longattn.reference_attention``) as its reference. False for
    #: linear / recurrent mixers (``longattn.methods.recurrent``): their output is no softmax, they
    #: give no LSE (so no LSE merge, attention sinks or softmax correctness gate applies) and they
    #: run the calls ``longattn.attention`` hands them unchanged (no positions, padding masks,
    #: softcap, varlen rows or NaN screening: the op's own arithmetic)
    softmax: bool = True
    #: carries a recurrent state from call to call: ``attention(..., initial_state=...,
    #: return_state=True)``; q, k and v are then the new tokens only (``tokens_q == tokens_k``)
    state: bool = False
    #: reads the score scale (``attention(scale=...)``). False: the method has no ``q·k`` softmax to
    #: scale (linear attention's feature map, Lightning's decayed sums) and an explicit scale is refused
    takes_scale: bool = True
    paper: str = ""
    cost: str = ""


@dataclass
class Call:
    """Everything a method needs besides q, k, v (validated, in the compute dtype: q's dtype)."""

    causal: bool
    scale: float
    key_padding_mask: torch.Tensor | None = None
    bias: ScoreBias | None = None
    #: ``(q0, q1) -> [B, Hq, q1-q0, Tk]`` content-dependent bias rows (CoPE); eager kernel only
    row_bias: Callable[[int, int], torch.Tensor] | None = None
    want_stats: bool = False
    #: up-to-date block summaries of these keys (a decode cache keeps them; else methods build them)
    summaries: Any = None
    #: the caller's position encoding, handed over untouched to methods with
    #: ``Capabilities.own_positions`` (q/k then arrive *un*rotated); None for every other method
    position: Any = None
    #: the recurrent state before these tokens (``attention(initial_state=...)``), for methods with
    #: ``Capabilities.state``; None: a fresh sequence
    state: Any = None


@dataclass
class Result:
    out: torch.Tensor
    #: float32 ``[B, Hq, Tq]``; None where the kernel gives none, and always for methods that are not
    #: softmax attention (``Capabilities.softmax`` False)
    lse: torch.Tensor | None
    path: str
    stats: dict[str, Any] = field(default_factory=dict)
    #: the recurrent state after these tokens (methods with ``Capabilities.state``), else None
    state: Any = None


class Method:
    """Base class of every registered method (subclasses are frozen dataclasses)."""

    name: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities]

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: Call) -> Result:
        raise NotImplementedError

    def visible_mask(self, tokens_q: int, tokens_k: int, causal: bool) -> Mask | None:
        """The token mask an exact method attends with, causality included (None: all keys).
        Tests and the benchmark's correctness gate compare against the reference on it."""
        return Causal() if causal else None

    @classmethod
    def params(cls) -> dict[str, Any]:
        """Hyper-parameters and their defaults (``dataclasses.MISSING`` when required)."""
        out = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
            else:
                out[f.name] = dataclasses.MISSING
        return out


_REGISTRY: dict[str, type[Method]] = {}


def rotary_position(call: Call, name: str, why: str):
    """The call's rotary encoding (None without one) for a method that places rotary positions
    itself (``own_positions``): a score bias or another kind of position is refused, ``why`` saying
    what the method does with positions."""
    if call.bias is not None or call.row_bias is not None:
        raise ValueError(f"method {name!r} does not take a score bias ({why})")
    position = call.position
    if position is None or position.kind == "none":
        return None
    if position.kind != "rotary":
        raise ValueError(f"method {name!r} {why}: rotary positions only, got position {position!r} of kind "
                         f"{position.kind!r}")
    return position


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name' to be registered")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[Method]]:
    return dict(_REGISTRY)


def _unknown_name(name: object) -> ValueError:
    known = ", ".join(sorted(_REGISTRY))
    return ValueError(f"method {name!r} is not registered; known methods: {known}")


def build(name: str, **params: Any) -> Method:
    """``longattn.method(name, **params)``: a method object from a registered name."""
    if not isinstance(name, str):
        raise TypeError(f"method name must be a str, got {type(name).__name__}")
    cls = _REGISTRY.get(name)
    if cls is None:
        raise _unknown_name(name)
    accepted = cls.params()
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        listing = ", ".join(f"{k}={v!r}" if v is not dataclasses.MISSING else f"{k} (required)" for k, v in accepted.items())
        raise TypeError(
            f"method {name!r} got unknown parameter(s) {', '.join(unknown)}; it accepts: {listing or 'no parameters'}"
        )
    missing = [k for k, v in accepted.items() if v is dataclasses.MISSING and k not in params]
    if missing:
        raise TypeError(f"method {name!r} needs parameter(s) {', '.join(missing)}")
    return cls(**params)


def resolve(method: str | Method) -> Method:
    """A method object from a name (default parameters) or the object itself."""
    if isinstance(method, Method):
        return method
    if isinstance(method, str):
        return build(method)
    raise TypeError(f"method must be a registered name (str) or a method object, got {type(method).__name__}")


@dataclass(frozen=True)
class MethodSpec:
    """One row of ``longattn.methods()``."""

    name: str
    cls: type[Method]
    capabilities: Capabilities
    params: dict[str, Any]

    @property
    def summary(self) -> str:
        doc = (self.cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


def specs() -> list[MethodSpec]:
    return [MethodSpec(n, c, c.capabilities, c.params()) for n, c in sorted(_REGISTRY.items())]
