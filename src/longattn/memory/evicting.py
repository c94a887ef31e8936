"""A bounded memory for one attention layer: heads grouped under eviction policies.

Each group of key heads keeps its own tensors ``k, v [B, Hg, n, D]`` with, per slot, the cache
index it was written at (``idx``), whether it is a real token (``ok``) and the policy's score.
Uniform policies use one group of every head; DuoAttention / RazorAttention use two (retrieval
heads under ``FullKV``, streaming heads under ``StreamingLLM``), so the heads really hold
different numbers of tokens.

One step (``attend``) for a chunk of ``L`` tokens: lay out ``[kept …, chunk]``, move the kept
keys to the positions of that layout when ``positions='cache'`` (see ``rotation``), attend
exactly, update the scores, then evict down to the budget. Between steps a group never holds
more than its budget; during a step it briefly holds budget + L. So after ``seen`` tokens a group
holds exactly ``min(seen, budget)`` slots, their positions increasing: what ``load_state`` checks
a saved state against (with every other field) before it changes anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from longattn.memory.kernel import attend_layout
from longattn.memory.policies import EvictionPolicy, check_finite_chunk
from longattn.memory.rotation import KeyRotation
from longattn.memory.store import SavedLayer

_FIELDS = ("k", "v", "idx", "ok", "score")


@dataclass
class HeadGroup:
    heads: list[int]
    policy: EvictionPolicy
    k: torch.Tensor | None = None  # [B, Hg, n, D]
    v: torch.Tensor | None = None
    idx: torch.Tensor | None = None  # [B, Hg, n] int64: cache index the key was written at
    ok: torch.Tensor | None = None  # [B, Hg, n] bool
    score: torch.Tensor | None = None  # [B, Hg, n] float32 or None


class EvictingMemory:
    """One layer's memory under per-head-group eviction policies.

    Args:
        groups: ``[(kv head ids, policy), …]`` covering every key head exactly once.
        n_kv_heads: key heads of the layer.
        rotation: the model's ``KeyRotation`` (None: no RoPE to move).
        positions: ``"cache"`` — keys take the positions of their slot in the kept layout;
            ``"original"`` — keys keep the positions they were written at.
    """

    kind = "evicting"

    def __init__(self, groups: list[tuple[list[int], EvictionPolicy]], n_kv_heads: int,
                 rotation: KeyRotation | None, positions: str = "cache"):
        covered = sorted(h for heads, _ in groups for h in heads)
        if covered != list(range(n_kv_heads)):
            raise ValueError(f"head groups must cover key heads 0..{n_kv_heads - 1} once each, got {covered}")
        if positions not in ("cache", "original"):
            raise ValueError(f"positions must be 'cache' or 'original', got {positions!r}")
        self.groups = [HeadGroup(list(h), p) for h, p in groups if h]
        self.n_kv_heads = n_kv_heads
        self.rotation = rotation if positions == "cache" else None
        self.positions = positions
        self.seen = 0

    # ------------------------------------------------------------------ one step
    def attend(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, new_ok: torch.Tensor | None,
               scale: float) -> torch.Tensor:
        """Attention of the chunk ``q [B, Hq, L, D]`` over what is kept plus the chunk's own keys
        ``k_new, v_new [B, H, L, D]`` (``new_ok [B, L]``: real tokens); stores the chunk, evicts.
        Returns ``[B, Hq, L, D]``. A chunk with a non-finite key or value is refused before anything
        changes (ValueError)."""
        check_finite_chunk(k_new, v_new, self.seen)
        b, hq, lq, d = q.shape
        h = k_new.shape[1]
        g = hq // h
        if new_ok is None:
            new_ok = torch.ones(b, lq, dtype=torch.bool, device=q.device)
        out = torch.empty_like(q)
        new_idx = torch.arange(self.seen, self.seen + lq, device=q.device)
        for grp in self.groups:
            heads = torch.tensor(grp.heads, device=q.device)
            qheads = (heads[:, None] * g + torch.arange(g, device=q.device)).reshape(-1)
            kn, vn = k_new.index_select(1, heads), v_new.index_select(1, heads)
            okn = new_ok[:, None, :].expand(b, len(grp.heads), lq)
            idxn = new_idx.expand(b, len(grp.heads), lq)
            if grp.k is None:
                k_all, v_all, ok_all, idx_all, k_att = kn, vn, okn, idxn, kn
            else:
                n = grp.k.shape[2]
                k_att = grp.k
                if self.rotation is not None:
                    slot = torch.arange(n, device=q.device)
                    k_att = self.rotation.rotate(grp.k, self.seen - n + slot - grp.idx)
                k_all = torch.cat([grp.k, kn], 2)
                k_att = torch.cat([k_att, kn], 2)
                v_all = torch.cat([grp.v, vn], 2)
                ok_all = torch.cat([grp.ok, okn], 2)
                idx_all = torch.cat([grp.idx, idxn], 2)
            o, probs = attend_layout(q.index_select(1, qheads), k_att, v_all, ok_all, scale,
                                     want_probs=grp.policy.needs_probs)
            out[:, qheads] = o
            scores = grp.policy.update_scores(grp.score, probs, lq) if grp.policy.needs_probs else None
            budget = grp.policy.budget
            if budget is not None and k_all.shape[2] > budget:
                keep = grp.policy.keep(scores, ok_all, budget)  # [B, Hg, budget]
                k_all = k_all.gather(2, keep[..., None].expand(-1, -1, -1, d))
                v_all = v_all.gather(2, keep[..., None].expand(-1, -1, -1, v_all.shape[-1]))
                ok_all, idx_all = ok_all.gather(2, keep), idx_all.gather(2, keep)
                scores = None if scores is None else scores.gather(2, keep)
            grp.k, grp.v, grp.ok, grp.idx, grp.score = k_all, v_all, ok_all.contiguous(), idx_all.contiguous(), scores
        self.seen += lq
        return out

    # ------------------------------------------------------------------ reporting
    def tokens_per_head(self) -> torch.Tensor:
        """``[B, H]`` int64: real tokens each key head holds now."""
        b = next((grp.ok.shape[0] for grp in self.groups if grp.ok is not None), 0)
        out = torch.zeros(b, self.n_kv_heads, dtype=torch.int64, device="cpu")  # a host-side report
        for grp in self.groups:
            if grp.ok is not None:
                out[:, grp.heads] = grp.ok.sum(-1).cpu()
        return out

    def slots_per_head(self) -> list[int]:
        """Slots (tensor rows, padding included) each key head holds now."""
        out = [0] * self.n_kv_heads
        for grp in self.groups:
            for h in grp.heads:
                out[h] = 0 if grp.k is None else grp.k.shape[2]
        return out

    def nbytes(self) -> dict[str, int]:
        kv = sum(t.numel() * t.element_size() for grp in self.groups for t in (grp.k, grp.v) if t is not None)
        meta = sum(t.numel() * t.element_size() for grp in self.groups for t in (grp.idx, grp.ok, grp.score)
                   if t is not None)
        return {"fast": kv, "host": 0, "disk": 0, "metadata": meta}

    # ------------------------------------------------------------------ save / load
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = {}, {"kind": self.kind, "seen": self.seen, "positions": self.positions,
                             "groups": [{"heads": grp.heads, **grp.policy.describe()} for grp in self.groups]}
        for i, grp in enumerate(self.groups):
            for name in ("k", "v", "idx", "ok", "score"):
                t = getattr(grp, name)
                if t is not None:
                    tensors[f"g{i}.{name}"] = t
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict, device) -> None:
        """Replace the contents with a saved ``state()`` (on ``device``); a ValueError naming the
        first bad field leaves the memory as it was (``stage_state``)."""
        self.stage_state(tensors, meta, device)()

    def stage_state(self, tensors: dict[str, torch.Tensor], meta: dict, device) -> Callable[[], None]:
        """Check a saved ``state()`` against this memory and prepare it on ``device`` without
        changing anything; returns the step that installs it.

        Per group ``g{i}``: ``k, v [B, Hg, n, D]`` finite, ``idx [B, Hg, n]`` int64 strictly
        increasing in ``[0, seen)``, ``ok [B, Hg, n]`` bool and, for a scoring policy, ``score
        [B, Hg, n]`` float32 finite, where ``n = min(seen, budget)`` (module docstring).

        Raises:
            ValueError: another configuration, or a field that is not what this memory would have
                saved, naming it.
        """
        mine = [{"heads": grp.heads, **grp.policy.describe()} for grp in self.groups]
        if meta.get("kind") != self.kind or meta.get("groups") != mine or meta.get("positions") != self.positions:
            raise ValueError(f"saved memory was made with {meta.get('groups')} (positions {meta.get('positions')}), "
                             f"this cache uses {mine} (positions {self.positions})")
        saved = SavedLayer(tensors, meta)
        seen = saved.count("seen")
        if self.rotation is not None:
            saved.dims["D"] = self.rotation.head_dim
        staged = [self._read_group(saved, i, grp, seen, device) for i, grp in enumerate(self.groups)]
        saved.finish()

        def install() -> None:
            self.seen = seen
            for grp, parts in zip(self.groups, staged):
                for name, t in parts.items():
                    setattr(grp, name, t)
        return install

    def _read_group(self, saved: SavedLayer, i: int, grp: HeadGroup, seen: int, device) -> dict:
        """Group ``i``'s checked fields (``stage_state``) on ``device``, None where it holds nothing."""
        parts = dict.fromkeys(_FIELDS)
        if seen == 0:
            return parts
        budget = grp.policy.budget
        n, hg = seen if budget is None else min(seen, budget), len(grp.heads)
        saved.context = f" (seen={seen}, budget {budget}, {hg} key heads)"
        parts["k"] = saved.tensor(f"g{i}.k", ("B", hg, n, "D"), "kv", finite=True)
        parts["v"] = saved.tensor(f"g{i}.v", ("B", hg, n, "D"), "kv", finite=True)
        idx = parts["idx"] = saved.tensor(f"g{i}.idx", ("B", hg, n), torch.int64)
        increasing = bool((idx.diff(dim=-1) > 0).all())
        if not increasing or int(idx.min()) < 0 or int(idx.max()) >= seen:
            raise ValueError(f"g{i}.idx holds positions {int(idx.min())}..{int(idx.max())}"
                             f"{'' if increasing else ', not strictly increasing'}; expected strictly increasing "
                             f"positions in [0, {seen}) (seen={seen})")
        parts["ok"] = saved.tensor(f"g{i}.ok", ("B", hg, n), torch.bool)
        if grp.policy.needs_probs:
            parts["score"] = saved.tensor(f"g{i}.score", ("B", hg, n), torch.float32, finite=True)
        return {name: None if t is None else t.to(device) for name, t in parts.items()}
