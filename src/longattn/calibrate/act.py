"""ACT, the Attention Calibration Technique (Yu et al. 2024, "Unveiling and Harnessing Hidden
Attention Sinks: Enhancing Large Language Models without Training through Attention Calibration").

Attention sinks are not only the first token: some heads pour much of their attention onto later
tokens of little meaning (punctuation, delimiters), and the paper finds that this hurts accuracy in
some heads. ACT, per input and without training:

1. finds the sink tokens of each chosen head in this input: keys other than the first whose
   attention, averaged over the query rows, exceeds ``α / N`` (``N`` keys; the paper's rule,
   ``longattn.analysis.stats.sink_tokens``);
2. scales the attention every query gives those sinks by ``β`` (``factor``) and hands the removed
   mass to the row's other keys in proportion to their weights, so each row still sums to 1;
3. only in the heads a calibration set selects: heads where calibrating lowers the loss
   (:func:`select_heads`).

Heads that are not chosen are left bitwise unchanged (their output is the model's own), and
``factor=1`` changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from longattn.analysis.capture import check_heads
from longattn.analysis.stats import ACT_ALPHA, attention_tiles, sink_tokens
from longattn.analysis.subject import Attend, Site, Subject, dense_attend

Tensor = torch.Tensor
Head = tuple[int, int]

#: the share of a sink's attention kept (ACT's β)
ACT_FACTOR = 0.4


def _check_factor(factor: float) -> float:
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not 0.0 <= float(factor) <= 1.0:
        raise ValueError(f"factor must be a number in [0, 1] (the share of a sink's attention kept), got {factor!r}")
    return float(factor)


def calibrated_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool, heads: list[int],
                         factor: float = ACT_FACTOR, alpha: float = ACT_ALPHA,
                         key_padding_mask: Tensor | None = None, tile: int = 256) -> tuple[Tensor, Tensor]:
    """ACT on query heads ``heads`` of one layer: ``(out [B, len(heads), Tq, D], sinks [B, len(heads), Tk])``.

    q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]``. Float32 throughout; two passes over query
    tiles (the first finds each head's sinks for this input, the second re-weights and applies V).
    A row whose whole mass sits on sinks keeps its weights (there is nothing to hand the mass to).
    """
    factor = _check_factor(factor)
    hq, hk = q.shape[1], k.shape[1]
    idx = torch.as_tensor(heads, dtype=torch.long, device=q.device)
    qh = q.index_select(1, idx)
    kv_idx = idx // (hq // hk)
    kh, vh = k.index_select(1, kv_idx), v.index_select(1, kv_idx).float()
    b, n, tq, _ = qh.shape
    tk = k.shape[2]
    col = torch.zeros(b, n, tk, device=q.device)
    rows = torch.zeros(b, 1, 1, device=q.device)
    for _, p, seen in attention_tiles(qh, kh, scale=scale, causal=causal, key_padding_mask=key_padding_mask, tile=tile):
        col += p.sum(2)
        rows += seen.any(-1).float().sum(-1, keepdim=True)
    sinks = sink_tokens(col, rows, key_padding_mask, alpha)            # the first token stays a sink
    out = torch.empty(b, n, tq, vh.shape[-1], device=q.device)
    s_mask = sinks[:, :, None, :].float()
    for i0, p, _ in attention_tiles(qh, kh, scale=scale, causal=causal, key_padding_mask=key_padding_mask, tile=tile):
        on_sinks = (p * s_mask).sum(-1, keepdim=True)
        rest = p.sum(-1, keepdim=True) - on_sinks
        gain = torch.where(rest > 0, 1.0 + (1.0 - factor) * on_sinks / rest.clamp_min(1e-30), torch.ones_like(rest))
        keep = torch.where(rest > 0, torch.full_like(rest, factor), torch.ones_like(rest))
        p = p * (s_mask * keep + (1.0 - s_mask) * gain)
        out[:, :, i0:i0 + p.shape[2]] = p @ vh
    return out, sinks


@dataclass
class ACT:
    """An ``Attend`` that runs ACT on ``heads`` (``(layer, query head)`` pairs) and ``inner`` (the
    model's own attention) everywhere else.

    Attributes:
        heads: the calibrated heads.
        factor: ACT's β, the share of a sink's attention kept (1 = no change).
        alpha: ACT's α: a sink's attention averaged over the rows exceeds α / N.
        inner: the attention of every head not calibrated.
        last_sinks: after a forward, ``{(layer, head): [positions]}`` of the first sample.
    """

    heads: Iterable[Head]
    factor: float = ACT_FACTOR
    alpha: float = ACT_ALPHA
    inner: Attend = dense_attend
    last_sinks: dict = field(default_factory=dict)

    def __post_init__(self):
        self.factor = _check_factor(self.factor)
        self._by_layer: dict[int, list[int]] = {}
        for layer, head in self.heads:
            self._by_layer.setdefault(int(layer), []).append(int(head))

    def __call__(self, site: Site, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = self.inner(site, q, k, v)
        chosen = self._by_layer.get(site.layer)
        if not chosen or self.factor == 1.0:
            return out
        heads = sorted(set(chosen))
        cal, sinks = calibrated_attention(q, k, v, scale=site.scale, causal=site.causal, heads=heads,
                                          factor=self.factor, alpha=self.alpha,
                                          key_padding_mask=site.key_padding_mask)
        out = out.clone()
        out[:, heads] = cal.to(out.dtype)
        for i, h in enumerate(heads):
            self.last_sinks[(site.layer, h)] = sinks[0, i].nonzero()[:, 0].tolist()
        return out


def select_heads(subject: Subject, loss: Callable[[Attend], float], *, factor: float = ACT_FACTOR,
                 alpha: float = ACT_ALPHA, candidates: Iterable[Head] | None = None, min_gain: float = 0.0,
                 progress: Callable[[str], None] | None = None) -> tuple[list[Head], dict[Head, float]]:
    """ACT's head choice on a calibration set.

    1. Screen: calibrate each candidate head alone and measure the gain, ``loss(model) −
       loss(ACT on that head)`` (``loss(attend)`` is a float such as the mean NLL of calibration
       text or the answer loss of a task).
    2. Combine: add the heads with a gain above ``min_gain``, best first, keeping each only if the
       loss with every head kept so far falls by more than ``min_gain`` — gains measured one head
       at a time need not add up.

    Returns ``(heads, gains)``: the kept heads in the order added, and every candidate's gain alone.
    """
    say = progress or (lambda msg: None)
    factor = _check_factor(factor)
    pool = sorted(check_heads(subject, candidates, "candidates")) if candidates is not None else subject.heads()
    base = loss(dense_attend)
    gains: dict[Head, float] = {}
    for i, head in enumerate(pool):
        gains[head] = base - loss(ACT([head], factor=factor, alpha=alpha))
        say(f"ACT screen {head}: gain {gains[head]:+.5f} ({i + 1}/{len(pool)})")
    kept: list[Head] = []
    current = base
    for head in sorted((h for h, g in gains.items() if g > min_gain), key=lambda h: -gains[h]):
        trial = loss(ACT(kept + [head], factor=factor, alpha=alpha))
        if current - trial > min_gain:
            kept.append(head)
            current = trial
        say(f"ACT combine {head}: loss {trial:.5f} ({'kept' if kept and kept[-1] == head else 'dropped'})")
    return kept, gains
