"""Eviction policies: which keys a bounded memory keeps once it holds more than its budget.

Every policy keeps at most ``budget`` tokens per (row, key head) between steps, and drops the
rest for real (the tensors shrink). Forced keeps come first — the first ``sinks`` real tokens and
the last ``window`` slots — then the highest scores fill the budget. Padding is dropped first.

* ``FullKV`` — keeps everything (the dense reference; retrieval heads of DuoAttention).
* ``StreamingLLM`` (Xiao et al. 2024) — attention sinks + a recent window, nothing scored.
* ``H2O`` (Zhang et al. 2023) — heavy hitters: attention accumulated over every query so far,
  plus a recent window.
* ``TOVA`` (Oren et al. 2024) — the attention of the newest query alone decides.
* ``SnapKV`` (Li et al. 2024) — the attention of an observation window of the latest queries,
  max-pooled along the keys (so neighbours of a hit survive with it), plus that window.
  The paper compresses once after the prompt; here it re-applies whenever the budget is
  exceeded, so decoding stays within budget too.

Scores are per key head: the attention of the head's query group is averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch


def _positive_int(name: str, value, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} int, got {value!r}")
    return value


def check_finite_chunk(k_new: torch.Tensor, v_new: torch.Tensor, seen: int) -> None:
    """Refuse a chunk ``k_new, v_new [B, H, L, D]`` holding NaN/Inf before a memory stores it.

    A memory keeps its tokens for every later step and writes them to disk and to saved files:
    one garbage key would make every later step NaN, cannot enter an ANN index, and a saved file
    holding it is refused on load as corrupt. So every memory holds finite keys and values only.
    """
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if bool(torch.isfinite(t.sum())):  # one reduction; a NaN/Inf anywhere makes it non-finite
            continue
        bad = ~torch.isfinite(t)
        if not bool(bad.any()):
            continue  # the sum overflowed: every element is finite
        row, head, token, _ = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} holds {int(bad.sum())} non-finite values (NaN or inf), the first at row {row}, "
                         f"key head {head}, chunk token {token} (position {seen + token}); a KV memory keeps "
                         "finite keys and values only (they stay for every later step, on disk and in saved files)")


@dataclass
class EvictionPolicy:
    """Base class. ``budget`` None keeps everything."""

    budget: int | None = None
    sinks: int = 0
    window: int = 0
    name: ClassVar[str] = "policy"
    #: the policy scores keys from attention probabilities
    needs_probs: ClassVar[bool] = False
    #: the policy cannot run without a budget
    needs_budget: ClassVar[bool] = False

    def __post_init__(self):
        if self.needs_budget and self.budget is None:
            raise ValueError(f"{self.name} needs a budget (tokens kept per head)")
        if self.budget is not None:
            _positive_int("budget", self.budget)
        _positive_int("sinks", self.sinks, allow_zero=True)
        _positive_int("window", self.window, allow_zero=True)
        if self.budget is not None and self.sinks + self.window > self.budget:
            raise ValueError(f"{self.name}: sinks ({self.sinks}) + window ({self.window}) exceed budget ({self.budget})")

    def update_scores(self, old: torch.Tensor | None, probs: torch.Tensor | None, n_new: int) -> torch.Tensor | None:
        """New per-key scores ``[B, H, N]`` after a chunk whose attention was ``probs [B, H, G, L, N]``;
        ``old [B, H, N − n_new]`` are the kept keys' scores before it."""
        return None

    def keep(self, scores: torch.Tensor | None, ok: torch.Tensor, budget: int) -> torch.Tensor:
        """Indices ``[B, H, budget]`` (increasing) of the slots to keep out of ``ok [B, H, N]``."""
        n = ok.shape[-1]
        pri = torch.zeros(ok.shape, dtype=torch.float32, device=ok.device) if scores is None else scores.float().clone()
        if self.sinks:
            first = ok & (ok.long().cumsum(-1) <= self.sinks)
            pri = pri.masked_fill(first, math.inf)
        if self.window:
            pri[..., max(0, n - self.window):] = math.inf
        pri = pri.masked_fill(~ok, -math.inf)
        return pri.topk(budget, dim=-1).indices.sort(-1).values

    def describe(self) -> dict:
        return {"policy": self.name, "budget": self.budget, "sinks": self.sinks, "window": self.window}


@dataclass
class FullKV(EvictionPolicy):
    name: ClassVar[str] = "full"

    def __post_init__(self):
        if self.budget is not None:
            raise ValueError(f"full keeps every token: budget must be None, got {self.budget!r}")
        super().__post_init__()


@dataclass
class StreamingLLM(EvictionPolicy):
    """Keeps ``sinks`` + ``window`` tokens; give either ``window`` or ``budget`` (= their sum)."""

    sinks: int = 4
    window: int | None = None
    name: ClassVar[str] = "streaming"

    def __post_init__(self):
        if self.window is None:
            if self.budget is None:
                raise ValueError("streaming needs window= (recent tokens) or budget= (sinks + window)")
            self.window = self.budget - self.sinks
        if self.budget is None:
            self.budget = self.sinks + self.window
        super().__post_init__()
        if self.budget != self.sinks + self.window:
            raise ValueError(f"streaming keeps exactly sinks + window tokens: budget {self.budget} != "
                             f"{self.sinks} + {self.window}")


@dataclass
class H2O(EvictionPolicy):
    name: ClassVar[str] = "h2o"
    needs_probs: ClassVar[bool] = True
    needs_budget: ClassVar[bool] = True

    def __post_init__(self):
        if self.window == 0 and self.budget is not None:
            self.window = self.budget // 2  # the paper splits the budget between heavy hitters and recent tokens
        super().__post_init__()

    def update_scores(self, old, probs, n_new):
        got = probs.mean(2).sum(2)  # [B, H, N]: attention each key received from the chunk
        if old is not None and old.shape[-1]:
            got[..., :old.shape[-1]] += old
        return got


@dataclass
class TOVA(EvictionPolicy):
    name: ClassVar[str] = "tova"
    needs_probs: ClassVar[bool] = True
    needs_budget: ClassVar[bool] = True

    def update_scores(self, old, probs, n_new):
        return probs[:, :, :, -1].mean(2)  # the newest query's attention


@dataclass
class SnapKV(EvictionPolicy):
    window: int | None = None  # the observation window; default min(32, budget // 2)
    kernel: int = 5
    name: ClassVar[str] = "snapkv"
    needs_probs: ClassVar[bool] = True
    needs_budget: ClassVar[bool] = True

    def __post_init__(self):
        if self.window is None and self.budget is not None:
            self.window = min(32, self.budget // 2)
        _positive_int("kernel", self.kernel)
        if self.kernel % 2 == 0:
            raise ValueError(f"snapkv kernel must be odd (centred pooling), got {self.kernel}")
        super().__post_init__()

    def update_scores(self, old, probs, n_new):
        obs = max(1, min(self.window, probs.shape[3]))
        vote = probs[:, :, :, -obs:].mean((2, 3))  # [B, H, N]
        b, h, n = vote.shape
        pooled = torch.nn.functional.max_pool1d(vote.view(b * h, 1, n), self.kernel, stride=1, padding=self.kernel // 2)
        return pooled.view(b, h, n)

    def describe(self) -> dict:
        return {**super().describe(), "kernel": self.kernel}


POLICIES: dict[str, type[EvictionPolicy]] = {p.name: p for p in (FullKV, StreamingLLM, H2O, TOVA, SnapKV)}


def make_policy(name: str, **params) -> EvictionPolicy:
    """A policy by name (``full``, ``streaming``, ``h2o``, ``tova``, ``snapkv``)."""
    if name not in POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; expected one of {sorted(POLICIES)}")
    try:
        return POLICIES[name](**params)
    except TypeError as e:
        raise TypeError(f"policy {name!r}: {e}") from None
