"""``LongattnCache``: a transformers ``Cache`` whose layers are longattn memories.

A memory decides which keys a query sees (eviction policies, paged block retrieval), so it does
the attention itself: the layer's ``update`` stores the chunk's keys and values as pending and
returns them, and longattn's attention function (``longattn.hf.attention``) recognises them and
hands the chunk's queries to the layer's ``attend``. That only works with the model switched to
longattn (``longattn.hf.apply``); ``update`` refuses otherwise, since any other attention would
see just the chunk.

    >>> model, tok = longattn.hf.load_llama2c()          # the bundled stories260K
    >>> with longattn.hf.apply(model, "dense"):
    ...     cache = longattn.hf.LongattnCache(model, "streaming", sinks=4, window=252)
    ...     out = model.generate(ids, past_key_values=cache, max_new_tokens=64)
    >>> cache.stats()["tokens"]          # tokens kept per layer and key head

Policies (``policy=``): ``full``, ``streaming``, ``h2o``, ``tova``, ``snapkv`` (bounded, tokens
dropped), ``heads`` (DuoAttention / RazorAttention head map: retrieval heads keep everything,
streaming heads sinks + window), ``blocks`` (Quest/InfLLM block retrieval over a paged, tiered
memory), ``longheads`` (the same with LongHeads' mean-key chunk scores) and ``retrieval``
(RetrievalAttention: per-token top-``q·k`` keys from a faiss / hnswlib index over the same paged
memory).
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from longattn.memory import store
from longattn.memory.evicting import EvictingMemory
from longattn.memory.paged import PagedMemory
from longattn.memory.policies import FullKV, StreamingLLM, make_policy
from longattn.memory.retrieval import RetrievalMemory
from longattn.memory.rotation import KeyRotation

#: id(key tensor returned by update) -> (weak reference to it, the layer): the attention function's
#: way back to the layer that must attend (transformers passes it only the tensors)
_PENDING: dict[int, tuple[weakref.ref, "MemoryLayer"]] = {}

POLICY_NAMES = ("full", "streaming", "h2o", "tova", "snapkv", "heads", "duo", "razor", "blocks", "longheads",
                "retrieval")


def pending_layer(key: torch.Tensor) -> "MemoryLayer | None":
    """The memory layer that returned ``key`` from its ``update`` and still has to attend, if any."""
    entry = _PENDING.pop(id(key), None)
    if entry is None or entry[0]() is not key:
        return None
    return entry[1]


class MemoryLayer(CacheLayerMixin):
    """One decoder layer's slot in ``LongattnCache``, holding a longattn memory."""

    is_compileable = False
    is_sliding = False

    def __init__(self, memory, cache: "LongattnCache"):
        super().__init__()
        self.memory = memory
        self._cache = weakref.ref(cache)
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Keep the chunk's ``[B, H, L, D]`` keys/values pending for ``attend``; return them."""
        cache = self._cache()
        if cache is not None:
            cache.check_model()
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._pending = (key_states, value_states)
        _PENDING[id(key_states)] = (weakref.ref(key_states), self)
        return key_states, value_states

    def attend(self, query: torch.Tensor, scaling: float, key_padding: torch.Tensor | None) -> torch.Tensor:
        """``[B, Hq, L, D]``: the chunk's attention over the memory (see the memory's ``attend``).

        ``key_padding`` is the mask function's ``[B, seen + L]`` (True = real) or None."""
        if self._pending is None:
            raise RuntimeError("attend called without a pending chunk (update was not called for this layer)")
        k, v = self._pending
        self._pending = None
        lq = k.shape[2]
        new_ok = None if key_padding is None else key_padding[:, -lq:].to(torch.bool)
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        return self.memory.attend(query, k, v, new_ok, scaling)

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # transformers ≥ 5.3 passes the query length, 5.2 the queries' cache positions
        lq = int(query_length.shape[0]) if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.memory.seen + lq, 0

    def get_seq_length(self) -> int:
        return self.memory.seen

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers 5.2's name for get_max_length
        return -1

    def reset(self) -> None:
        raise NotImplementedError("LongattnCache cannot be reset in place: build a new one")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("LongattnCache does not support beam search (reorder_cache)")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("LongattnCache cannot be cropped (assisted decoding is not supported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("LongattnCache cannot repeat its batch (num_return_sequences > 1 / beams): "
                                  "repeat the prompts in the batch instead")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("LongattnCache cannot select batch rows")


def _head_map(head_map, n_layers: int, n_kv: int) -> list[list[bool | int]]:
    """``[layer][kv head]``: True = retrieval head (full cache), False = streaming head (sinks + the
    policy's window), an int = streaming with that head's own window (a MoA map from
    ``longattn.calibrate.heads.moa_windows``); from a dict / list or a JSON file written by
    ``longattn calibrate-heads`` or ``longattn analyze``."""
    if head_map is None:
        raise ValueError("policy 'heads' needs head_map= (a JSON file from `longattn calibrate-heads`, or "
                         "[[bool per key head] per layer])")
    if isinstance(head_map, (str, os.PathLike)):
        head_map = json.loads(Path(head_map).read_text())
    from longattn.calibrate.heads import check_head_map

    return check_head_map(head_map, n_layers, n_kv)


def fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """What a saved memory must match: the architecture and a hash of the first key projection."""
    cfg = model.config.get_text_config(decoder=True)
    first_k = next((m.k_proj.weight for m in model.modules() if hasattr(m, "k_proj")), None)
    digest = None
    if first_k is not None:
        digest = hashlib.sha256(first_k.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:32]
    return {"model_type": cfg.model_type, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
            "kv_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            "heads": cfg.num_attention_heads, "k_proj0": digest}


class LongattnCache(Cache):
    """A transformers ``Cache`` whose per-layer memories keep what a policy chooses (module docstring).

    Args:
        model: the transformers model it serves (switched with ``longattn.hf.apply``).
        policy: one of ``POLICY_NAMES``.
        budget: tokens kept per key head (``streaming``, ``h2o``, ``tova``, ``snapkv``); for
            ``blocks``/``longheads``/``retrieval`` the keys attended per step beside the chunk (sets
            ``topk`` pages, or ``retrieve`` tokens).
        positions: ``"cache"`` (keys take positions within the kept layout; default) or
            ``"original"``.
        **params: the policy's own parameters (``sinks``, ``window``, ``kernel``, ``head_map``,
            ``page``, ``topk``, ``host_tokens``, ``disk_dir``; for ``retrieval`` also ``retrieve``
            and the index's ``backend``, ``m``, ``ef_construction``, ``ef_search``, ``space``, ``seed``).
    """

    def __init__(self, model: torch.nn.Module, policy: str = "full", *, budget: int | None = None,
                 positions: str = "cache", **params: Any):
        if policy not in POLICY_NAMES:
            raise ValueError(f"policy must be one of {POLICY_NAMES}, got {policy!r}")
        cfg = model.config.get_text_config(decoder=True)
        n_layers = cfg.num_hidden_layers
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        rotation = KeyRotation.from_model(model) if positions == "cache" else None
        heads = list(range(n_kv))
        memories = []
        if policy in ("blocks", "longheads", "retrieval"):
            page = params.pop("page", 64)
            sinks, window = params.pop("sinks", page), params.pop("window", 256)
            # retrieved per step: `topk` pages (blocks, longheads) or `retrieve` tokens (retrieval),
            # given, or what the budget leaves after the sink pages and the window
            unit, per = ("retrieve", 1) if policy == "retrieval" else ("topk", page)
            count = params.pop(unit, None)
            if count is None:
                if budget is None:
                    raise ValueError(f"policy {policy!r} needs budget= (keys attended per step) or {unit}= "
                                     f"({'tokens' if per == 1 else 'pages'})")
                rest = budget - page * -(-sinks // page) - window
                if rest < 0:
                    raise ValueError(f"budget {budget} is smaller than sinks ({sinks}, whole pages) + window ({window})")
                count = rest // per
            geometry = dict(page=page, sinks=sinks, window=window, positions=positions)
            for _ in range(n_layers):
                if policy == "retrieval":
                    memories.append(RetrievalMemory(n_kv, rotation, retrieve=count, **geometry, **params))
                else:
                    memories.append(PagedMemory(n_kv, rotation, topk=count, score="quest" if policy == "blocks" else "mean",
                                                **geometry, **params))
            self.spec = {"policy": policy, "page": page, "sinks": sinks, "window": window, unit: count,
                         **getattr(memories[0], "index_options", {})}
        elif policy in ("heads", "duo", "razor"):
            rows = _head_map(params.pop("head_map", None), n_layers, n_kv)
            sinks, window = params.pop("sinks", 4), params.pop("window", None)
            if window is None:
                window = (budget - sinks) if budget is not None else 252
            if params:
                raise TypeError(f"policy {policy!r} got unknown parameters {sorted(params)}")
            for row in rows:
                widths = sorted({window if c is False else c for c in row if c is not True})
                groups = [([h for h in heads if row[h] is True], FullKV())]
                groups += [([h for h in heads if row[h] is not True and (window if row[h] is False else row[h]) == w],
                            StreamingLLM(sinks=sinks, window=w)) for w in widths]
                memories.append(EvictingMemory(groups, n_kv, rotation, positions))
            self.spec = {"policy": "heads", "sinks": sinks, "window": window, "head_map": rows}
        else:
            if policy == "streaming":
                sinks = params.pop("sinks", 4)
                window = params.pop("window", None)
                if window is None:
                    if budget is None:
                        raise ValueError("policy 'streaming' needs budget= or window=")
                    window = budget - sinks
                kw = {"sinks": sinks, "window": window, "budget": budget}
            elif policy == "full":
                if budget is not None:
                    raise ValueError(f"policy 'full' keeps everything: budget must be None, got {budget}")
                kw = {}
            else:
                kw = {"budget": budget}
            kw.update(params)
            for _ in range(n_layers):
                memories.append(EvictingMemory([(heads, make_policy(policy, **kw))], n_kv, rotation, positions))
            self.spec = {"policy": policy, **memories[0].groups[0].policy.describe()}
        self.spec["positions"] = positions
        super().__init__(layers=[MemoryLayer(m, self) for m in memories])
        self._model = weakref.ref(model)

    # ------------------------------------------------------------------ guards
    def check_model(self) -> None:
        """Refuse to run under any attention but longattn's (it would see only the new chunk)."""
        model = self._model()
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if model is not None and impl != "longattn":
            raise RuntimeError(f"LongattnCache needs the model's attention switched to longattn "
                               f"(longattn.hf.apply(model, 'dense')), but it runs {impl!r}")

    @property
    def memories(self) -> list:
        return [layer.memory for layer in self.layers]

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict[str, Any]:
        """What the cache holds now: ``tokens`` ``[layer][key head]`` (real tokens, batch row 0),
        bytes per tier summed over layers, the fast tier's peak and budget (paged policies), and the
        index's recall against exact ranking (``retrieval`` with ``measure_recall=True``)."""
        tiers = {"fast": 0, "host": 0, "disk": 0, "metadata": 0, "index": 0}
        tokens = []
        for mem in self.memories:
            for k, v in mem.nbytes().items():
                tiers[k] += v
            t = mem.tokens_per_head()
            tokens.append(t[0].tolist() if t.numel() else [0] * mem.n_kv_heads)
        out = {"policy": self.spec["policy"], "seen": self.memories[0].seen, "tokens": tokens,
               "kv_bytes": tiers["fast"] + tiers["host"] + tiers["disk"], **{f"{k}_bytes": v for k, v in tiers.items()}}
        paged = [m for m in self.memories if isinstance(m, PagedMemory)]
        if paged:
            out["fast_tokens_per_layer"] = [m.fast_tokens() for m in paged]
            out["peak_fast_tokens"] = max(m.peak_fast_tokens for m in paged)
            out["fast_budget_tokens"] = paged[0].fast_budget
        measured = [m for m in paged if isinstance(m, RetrievalMemory) and m.recall_total]
        if measured:  # RetrievalMemory with measure_recall: the index's recall over all layers
            out["recall"] = sum(m.recall_hits for m in measured) / sum(m.recall_total for m in measured)
        return out

    # ------------------------------------------------------------------ save / load
    def _fingerprint(self) -> dict[str, Any]:
        return {**fingerprint(self._model()), "cache": json.dumps(self.spec, sort_keys=True)}

    def save(self, path: str | os.PathLike) -> str:
        """Write the whole memory to ``path`` (safetensors + SHA-256); returns the digest."""
        return store.save(path, [m.state() for m in self.memories], self._fingerprint())

    def load(self, path: str | os.PathLike) -> "LongattnCache":
        """Replace this cache's contents with a file from ``save`` (same model, same policy), all
        or nothing: every layer is checked (``stage_state``) before any changes, so a refused file
        leaves the whole cache as it was.

        Raises:
            FileNotFoundError: no such file.
            ValueError: a corrupt or mismatched file (checksum, model, policy, layer count), or a
                layer field that is not what this cache would have saved, named with its layer.
        """
        layers = store.load(path, self._fingerprint())
        if len(layers) != len(self.layers):
            raise ValueError(f"saved memory has {len(layers)} layers, this cache {len(self.layers)}")
        model = self._model()
        device = next(model.parameters()).device if model is not None else "cpu"
        installs = []
        for i, (mem, (tensors, meta)) in enumerate(zip(self.memories, layers)):
            try:
                installs.append(mem.stage_state(tensors, meta, device))
            except ValueError as exc:
                raise ValueError(f"{os.fspath(path)!r}, layer {i}: {exc}") from None
        for install in installs:
            install()
        return self
