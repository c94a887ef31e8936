"""Capture q/k from a model's own forward, and change chosen heads, through a ``Subject``.

``Recorder`` keeps the float32 q and k of the layers asked for (``[B, H, T, D]``: linear in the
length, never the ``T × T`` attention) while the model runs its exact attention; the statistics in
``longattn.analysis.stats`` are then computed from them one layer and one query tile at a time.
``ablate`` zeroes the output of chosen heads (the retrieval-heads experiment of Wu et al. 2024).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from longattn.analysis.subject import Attend, Site, Subject, dense_attend

Tensor = torch.Tensor
Head = tuple[int, int]


@dataclass
class Captured:
    """One layer's q ``[B, Hq, Tq, D]`` and k ``[B, Hkv, Tk, D]`` (float32, after RoPE), its
    ``site`` (scale, causal, key padding) and, when asked for, v ``[B, Hkv, Tk, Dv]``."""

    q: Tensor
    k: Tensor
    site: Site
    v: Tensor | None = None


class Recorder:
    """An ``Attend`` that records q/k of ``layers`` (default: all) and returns ``inner``'s output
    (default: exact attention), so the model runs unchanged."""

    def __init__(self, layers: Iterable[int] | None = None, inner: Attend = dense_attend, *, values: bool = False):
        self.layers = None if layers is None else set(int(x) for x in layers)
        self.inner, self.values = inner, values
        self.records: dict[int, Captured] = {}

    def __call__(self, site: Site, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.layers is None or site.layer in self.layers:
            self.records[site.layer] = Captured(q.detach().float(), k.detach().float(), site,
                                                v.detach().float() if self.values else None)
        return self.inner(site, q, k, v)


def capture(subject: Subject, tokens: Tensor, layers: Iterable[int] | None = None, *, values: bool = False,
            **run_kwargs) -> dict[int, Captured]:
    """``{layer: Captured}`` for ``tokens [B, T]`` from one forward of ``subject`` (with v when
    ``values``)."""
    rec = Recorder(layers, values=values)
    subject.run(tokens, rec, **run_kwargs)
    missing = set(range(subject.n_layers) if layers is None else layers) - set(rec.records)
    if missing:
        raise RuntimeError(f"{subject.name}: attention layers {sorted(missing)} were not called during the forward")
    return rec.records


def check_heads(subject: Subject, heads: Iterable[Head], name: str = "heads") -> set[Head]:
    """``heads`` as a set of valid ``(layer, head)`` pairs, or a ValueError naming the bad one."""
    out = set()
    for item in heads:
        if not (isinstance(item, tuple | list) and len(item) == 2 and all(isinstance(x, int) for x in item)):
            raise ValueError(f"{name} must hold (layer, head) pairs of ints, got {item!r}")
        layer, head = int(item[0]), int(item[1])
        if not (0 <= layer < subject.n_layers and 0 <= head < subject.n_heads):
            raise ValueError(f"{name} holds ({layer}, {head}), outside {subject.n_layers} layers × "
                             f"{subject.n_heads} heads")
        out.add((layer, head))
    return out


def ablate(heads: Iterable[Head], inner: Attend = dense_attend) -> Attend:
    """An ``Attend`` whose output is zero on ``heads`` (``(layer, query head)`` pairs) and
    ``inner``'s elsewhere: the head contributes nothing to the residual stream."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), []).append(int(head))

    def attend(site: Site, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = inner(site, q, k, v)
        drop = by_layer.get(site.layer)
        if drop:
            out = out.clone()
            out[:, drop] = 0
        return out

    return attend


class RowRecorder:
    """An ``Attend`` that keeps, per layer, the attention probabilities of chosen query rows,
    ``rows [B, m]`` (positions in the queries): ``self.probs[layer]`` is float32 ``[B, Hq, m, Tk]``.
    The model runs ``inner`` (default: exact attention) unchanged."""

    def __init__(self, rows: Tensor, inner: Attend = dense_attend):
        self.rows, self.inner = rows.to(torch.long), inner
        self.probs: dict[int, Tensor] = {}

    def __call__(self, site: Site, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        from longattn.analysis.stats import visible_keys

        b, hq, tq, d = q.shape
        hk, tk = k.shape[1], k.shape[2]
        qs = q.float().gather(2, self.rows[:, None, :, None].expand(b, hq, -1, d))
        s = torch.matmul(qs, k.float().repeat_interleave(hq // hk, dim=1).transpose(-1, -2)) * site.scale
        vis = visible_keys(tq, tk, site.causal, q.device)[self.rows]            # [B, m, Tk]
        if site.key_padding_mask is not None:
            vis = vis & site.key_padding_mask.to(torch.bool)[:, None, :]
        s = s.masked_fill(~vis[:, None], float("-inf"))
        self.probs[site.layer] = torch.softmax(s, -1).nan_to_num(0.0)
        return self.inner(site, q, k, v)


def attention_rows(subject: Subject, tokens: Tensor, rows: Tensor, **run_kwargs) -> dict[int, Tensor]:
    """``{layer: [B, Hq, m, Tk]}``: the attention of query rows ``rows [B, m]`` in every layer."""
    rec = RowRecorder(rows)
    subject.run(tokens, rec, **run_kwargs)
    return rec.probs
