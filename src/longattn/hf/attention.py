"""``longattn.hf.apply``: a longattn method in place of a transformers model's attention.

transformers (≥ 5) looks up a model's attention function in ``AttentionInterface`` and the
function that builds its mask in ``AttentionMaskInterface``, both by the name in
``config._attn_implementation``. We register one function in each under ``"longattn"`` (on the
first ``apply``, never at import) and switch the model to that name with its own
``set_attn_implementation``. Nothing in the model is patched; undoing is switching back.

The mask function matters: without one registered under the same name, transformers skips mask
building and hands the attention ``None`` — left padding would be silently ignored. Ours returns
what longattn needs instead of an N×N tensor: ``None`` when every key is real and the layer is
plainly causal (or bidirectional), else the 2-D key-padding mask ``[B, kv_length]`` (True = real
key). Only when the model asks for something else (a sliding window that actually cuts, packed
sequences, a static cache whose slots lie past the last query) does it return the dense 4-D bool
mask, which only exact methods can take.

Which method a layer runs is kept per attention module (``Applied``), so two models may use
different methods at once.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

import longattn
from longattn.core.masks import Causal
from longattn.hf.cache import pending_layer
from longattn.kernels.softcap import hidden_by, softcap_attention
from longattn.methods.base import Method

#: the name under which longattn registers in transformers' interfaces
ATTN_IMPLEMENTATION = "longattn"

#: attention module -> the method it runs (set by ``apply``, removed on exit)
_ACTIVE: "weakref.WeakKeyDictionary[torch.nn.Module, Method]" = weakref.WeakKeyDictionary()
_registered = False
#: methods that leave the choice of keys to a LongattnCache (they attend to all they are given)
_MEMORY_OK = ("dense", "dense_chunked")
#: attention module -> an interceptor that computes its attention instead of the method
#: (``intercept``: capture q/k for analysis, ablate or recalibrate heads)
_INTERCEPT: "weakref.WeakKeyDictionary[torch.nn.Module, Any]" = weakref.WeakKeyDictionary()


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, longattn_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, longattn_mask)
    _registered = True


# --------------------------------------------------------------------------------------------
# the mask function


def longattn_mask(batch_size: int, q_length: int | None = None, kv_length: int | None = None, q_offset: int = 0,
                  kv_offset: int = 0, mask_function=None, attention_mask: torch.Tensor | None = None,
                  cache_position: torch.Tensor | None = None, **kwargs: Any):
    """transformers' mask-interface call → ``None``, a key-padding mask ``[B, kv_length]`` or a
    dense bool mask ``[B, 1, q_length, kv_length]`` (see the module docstring).

    ``attention_mask`` is transformers' 2-D padding mask over every position seen so far
    (``[B, kv_offset + kv_length]`` or longer), True/1 = real token. The queries arrive as
    ``q_length`` + ``q_offset`` (transformers ≥ 5.3) or as ``cache_position``, their positions
    (5.2).
    """
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    if q_length is None:
        if cache_position is None:
            raise TypeError("the mask interface gave neither q_length nor cache_position")
        q_length, q_offset = int(cache_position.shape[0]), int(cache_position[0]) if len(cache_position) else 0
    if kv_length is None:
        raise TypeError("the mask interface gave no kv_length")
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    pad = None
    if attention_mask is not None:
        pad = attention_mask.to(torch.bool)[:, kv_offset:kv_offset + kv_length]
        if pad.shape[1] < kv_length:  # positions past the 2-D mask are real tokens
            pad = torch.nn.functional.pad(pad, (0, kv_length - pad.shape[1]), value=True)
        if bool(pad.all()):
            pad = None
    aligned = q_offset + q_length == kv_offset + kv_length  # last query ↔ last key: longattn's causal alignment
    plain = mask_function is None or mask_function is causal_mask_function or mask_function is bidirectional_mask_function
    if plain and aligned:
        if mask_function is bidirectional_mask_function:
            # [B, 1, kv_length], every key real or not: tells the attention this layer is bidirectional
            # (None or [B, kv_length] would read as causal, which is what the model's module flag says)
            if pad is None:
                device = kwargs.get("device", attention_mask.device if attention_mask is not None else "cpu")
                pad = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
            return pad[:, None, :]
        return pad
    device = kwargs.get("device", attention_mask.device if attention_mask is not None else "cpu")
    if cache_position is not None:  # transformers 5.2's signature
        where = dict(cache_position=cache_position)
    else:
        where = dict(q_length=q_length, q_offset=q_offset, device=device)
    dense = sdpa_mask(batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset,
                      mask_function=mask_function or causal_mask_function, attention_mask=attention_mask,
                      allow_is_causal_skip=False, **where)
    if aligned and mask_function is not bidirectional_mask_function:
        # a sliding window shorter than it could cut is just causal: keep the light form
        causal = torch.ones(q_length, kv_length, dtype=torch.bool, device=dense.device).tril(kv_length - q_length)
        expect = causal[None, None] if pad is None else causal[None, None] & pad[:, None, None, :]
        if dense.shape[-2:] == expect.shape[-2:] and bool((dense == expect).all()):
            return pad
    return dense


# --------------------------------------------------------------------------------------------
# the attention function

#: keyword arguments transformers passes that cannot change the output: position ids and packing
#: descriptors (the mask function already built the mask from them, as eager and SDPA use it),
#: output / logging switches, flash-only knobs
_NO_EFFECT = frozenset({
    "position_ids", "cache_position", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
    "seq_idx", "use_cache", "output_attentions", "output_hidden_states", "output_router_logits",
    "num_items_in_batch", "deterministic", "layer_idx",
})


def longattn_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                               is_causal: bool | None = None, softcap: float | None = None,
                               s_aux: torch.Tensor | None = None, sliding_window: int | None = None,
                               position_bias: torch.Tensor | None = None,
                               **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The function transformers calls for every attention layer of a switched model.

    Args:
        module: the attention module (its ``is_causal`` and the method ``apply`` gave it).
        query: ``[B, Hq, Lq, D]``; key, value: ``[B, Hkv, Lk, D]`` (GQA heads not repeated, cache
            already updated, RoPE already applied).
        attention_mask: what ``longattn_mask`` returned (None or ``[B, Lk]``: causal layer;
            ``[B, 1, Lk]``: bidirectional layer; ``[B, 1|H, Lq, Lk]``: a general mask), or a 4-D
            mask the caller passed directly (bool, or additive float).
        dropout: attention dropout; refused above 0 in training mode.
        scaling: the score scale (None: ``1/sqrt(D)``).
        is_causal: transformers' override of the module's flag (``model(..., is_causal=False)``);
            with a 4-D mask the mask decides, as in eager and SDPA.
        softcap: scores become ``softcap·tanh(scores/softcap)`` (Gemma 2); exact methods only (the
            others refuse it, see ``longattn.attention``).
        s_aux: a sink logit per query head ``[Hq]`` (GPT-OSS), folded in through the LSE.
        sliding_window: carried by the mask transformers builds for the layer; checked against it.
        position_bias: refused (a learned additive bias, T5-style).

    Any other keyword that is not None is refused unless it is known to leave the output alone
    (``_NO_EFFECT``).

    Returns:
        ``(out [B, Lq, Hq, D], None)``: longattn never materialises attention weights.
    """
    unknown = sorted(name for name, val in kwargs.items() if val is not None and name not in _NO_EFFECT)
    if unknown:
        raise TypeError(
            f"longattn attention got keyword argument(s) {', '.join(unknown)} from "
            f"{type(module).__name__}, which it does not implement and cannot tell are harmless; "
            "run this model with attn_implementation='eager' or 'sdpa'")
    if position_bias is not None:
        raise ValueError(f"{type(module).__name__} passes a position_bias (a learned additive score bias), "
                         "which longattn's Hugging Face path does not implement; use attn_implementation='eager'")
    method = _ACTIVE.get(module)
    layer = pending_layer(key)
    bidirectional = attention_mask is not None and attention_mask.ndim == 3
    if layer is not None:  # a LongattnCache layer: its memory decides what the queries see
        if softcap is not None or s_aux is not None or bidirectional or is_causal is False:
            what = ("softcap" if softcap is not None else "attention sinks (s_aux)" if s_aux is not None
                    else "non-causal attention")
            raise NotImplementedError(f"LongattnCache memories attend causally with a plain softmax and cannot apply "
                                      f"{what}, which this model asks for; use DynamicCache with apply(model, ...)")
        if attention_mask is not None and attention_mask.ndim != 2:
            raise NotImplementedError(
                "LongattnCache attends over its own kept keys and cannot follow a general 4-D attention mask "
                "(a sliding window shorter than the context, packed sequences, or a 4-D mask passed by the caller)")
        if method is not None and method.name not in _MEMORY_OK and getattr(layer, "source_method", None) is not method:
            raise ValueError(
                f"the model runs method {method.name!r} but the LongattnCache decides which keys each query sees "
                f"(policy {layer.memory.__class__.__name__}); apply 'dense' with a LongattnCache, or build the cache "
                "from the applied method with applied.new_cache()")
        return layer.attend(query, scaling, attention_mask).transpose(1, 2), None
    if method is None:
        raise RuntimeError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) asked for attention "
            f"{ATTN_IMPLEMENTATION!r} but no longattn method is set on it: use longattn.hf.apply(model, method)"
        )
    if dropout and module.training:
        raise ValueError(f"longattn attention has no dropout: got dropout={dropout} in training mode "
                         "(set the model's attention_dropout to 0 or call model.eval())")
    sinks = _sink_logits(s_aux, query)
    if attention_mask is not None and attention_mask.ndim == 4:
        if module in _INTERCEPT:
            raise NotImplementedError(
                f"{type(module).__name__} needs a 4-D attention mask (a sliding window shorter than the context, "
                "packed sequences, or a 4-D mask passed by the caller), which an intercepted layer "
                "(longattn.hf.intercept) cannot follow")
        if is_causal is False:
            _refuse_causal_4d(attention_mask, query.shape[2], key.shape[2])
        out = _dense_4d(query, key, value, attention_mask, scaling, method, softcap, sinks)
        return out.transpose(1, 2), None
    if attention_mask is not None and attention_mask.ndim not in (2, 3):
        raise ValueError(f"attention_mask must be None, [batch, kv_length], [batch, 1, kv_length] or 4-D, "
                         f"got shape {tuple(attention_mask.shape)}")
    pad = attention_mask
    if bidirectional:
        pad = None if bool(attention_mask.all()) else attention_mask[:, 0]
    if is_causal is not None:
        causal = bool(is_causal)
    else:
        causal = not bidirectional and bool(getattr(module, "is_causal", True))
    tk = key.shape[2]
    if sliding_window is not None and tk > sliding_window:
        raise RuntimeError(
            f"{type(module).__name__} has a sliding window of {sliding_window} tokens but its attention mask does "
            f"not carry it ({tk} keys under a plain mask): the window would be lost. Was the mask built by "
            "transformers for this layer?")
    if not causal and not method.capabilities.non_causal:
        raise ValueError(
            f"method {method.name!r} supports only causal attention, but {type(module).__name__} attends "
            "bidirectionally here (an encoder, is_causal=False, or a bidirectional config); use a method with "
            "non-causal support (longattn methods lists them)")
    fn = _INTERCEPT.get(module)
    if fn is not None:
        if softcap is not None or sinks is not None:
            raise NotImplementedError(f"{type(module).__name__} asks for a softcap or attention sinks, which an "
                                      "intercepted layer (longattn.hf.intercept) does not apply")
        layer_idx = int(getattr(module, "layer_idx", 0) or 0)
        out = fn(layer_idx, query, key, value, scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
                 causal=causal, key_padding_mask=pad)
        return out.to(query.dtype).transpose(1, 2), None
    if sinks is None:
        out = longattn.attention(query, key, value, causal=causal, method=method, scale=scaling, key_padding_mask=pad,
                                 softcap=softcap)
        return out.transpose(1, 2), None
    # the inputs go in as stored (a float32 copy of a long bf16 cache would cost more than the step);
    # the sinks fold into the output in float32 (one extra rounding of a bf16 output)
    out, stats = longattn.attention(query, key, value, causal=causal, method=method, scale=scaling,
                                    key_padding_mask=pad, return_stats=True, softcap=softcap)
    if stats.lse is None:
        raise ValueError(
            f"method {method.name!r} ran on path {stats.path!r}, which gives no log-sum-exp, so the attention "
            f"sinks (s_aux) of {type(module).__name__} cannot be folded in; use a method or backend that "
            "returns its LSE (dense, dense_chunked, the tiled backend)")
    return _fold_sinks(out, stats.lse, sinks).to(query.dtype).transpose(1, 2), None


def _sink_logits(s_aux: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
    """``s_aux`` as float32 ``[Hq]`` (one sink logit per query head), or None."""
    if s_aux is None:
        return None
    s = torch.as_tensor(s_aux, device=query.device)
    hq = query.shape[1]
    if s.numel() != hq:
        raise ValueError(f"s_aux must hold one sink logit per query head ({hq}), got shape {tuple(s.shape)}")
    return s.reshape(hq).to(torch.float32)


def _fold_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """A sink logit ``s`` with no value joins the softmax's denominator: ``out · e^lse / (e^lse + e^s)``,
    that is ``out · sigmoid(lse − s)`` (0 where the row sees no key, lse = −inf)."""
    out = out.to(torch.float32)
    if sinks is None:
        return out
    return out * torch.sigmoid(lse.to(torch.float32) - sinks[None, :, None])[..., None]


def _refuse_causal_4d(mask: torch.Tensor, tq: int, tk: int) -> None:
    """``is_causal=False`` came with a 4-D mask that hides every key after the bottom-right diagonal:
    the mask was built causal and following it would drop the request."""
    if tq <= 1:
        return  # one query aligned with the last key sees every key either way
    visible = ~hidden_by(mask)
    future = torch.ones(tq, tk, dtype=torch.bool, device=mask.device).triu(tk - tq + 1)
    # a bidirectional mask lets some real query see keys on both sides of its diagonal; a causal
    # one never does (transformers may open a later key to a left-padding query that sees nothing
    # else, so "sees a future key" alone is not evidence)
    both_sides = (visible & future).any(-1) & (visible & ~future).any(-1)
    if not bool(both_sides.any()):
        raise ValueError(
            "is_causal=False was passed, but the 4-D attention mask transformers built for this layer is causal "
            "(a sliding window, packed sequences or a static cache make it 4-D); set config.is_causal=False on "
            "the model so that transformers builds a bidirectional mask")


def _dense_4d(query, key, value, mask, scaling, method: Method, softcap=None, sinks=None) -> torch.Tensor:
    """Exact attention under a general 4-D mask (bool, or additive float) → ``[B, Hq, Lq, D]``;
    rows that see no key give 0.

    Only for methods that attend to every visible key (``dense``, ``dense_chunked``): any other
    method has its own pattern (a window, sinks, a selection), which this path would drop. With a
    softcap or attention sinks it runs ``softcap_attention`` (exact, query tiles, with its LSE)."""
    tq, tk = query.shape[2], key.shape[2]
    if not (method.capabilities.exact and isinstance(method.visible_mask(tq, tk, True), (Causal, type(None)))):
        raise NotImplementedError(
            f"method {method.name!r} attends with its own pattern and cannot also follow a general 4-D attention "
            "mask; this layer needs one (a sliding window shorter than the context, packed sequences, a static "
            "cache, or a 4-D mask passed by the caller): use 'dense' or 'dense_chunked' here"
        )
    if softcap is not None or sinks is not None:
        out, lse = softcap_attention(query, key, value, softcap=softcap, scale=scaling, mask=mask)
        return _fold_sinks(out, lse, sinks).to(query.dtype)
    hidden = hidden_by(mask)
    seen = (~hidden).any(-1, keepdim=True)  # [B, 1|H, Lq, 1]
    # additive: finite values are a bias the eager path adds too
    attn = mask if mask.dtype == torch.bool else mask.to(torch.float32).masked_fill(hidden, float("-inf"))
    hq, hk = query.shape[1], key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query.float(), key.float(), value.float(), attn_mask=attn, scale=scaling, enable_gqa=hq != hk)
    out = torch.where(seen, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.to(query.dtype)


# --------------------------------------------------------------------------------------------
# apply


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that call the attention interface: those with a ``layer_idx`` whose class is an
    attention (``…Attention``) and that project queries."""
    found = []
    for m in model.modules():
        name = type(m).__name__
        if hasattr(m, "layer_idx") and name.endswith("Attention") and hasattr(m, "config"):
            found.append(m)
    return found


class Applied:
    """A model switched to a longattn method. ``apply`` returns it already in effect; use it as a
    context manager to switch back on exit, or call ``remove()``; or keep it (permanent switch)."""

    def __init__(self, model: torch.nn.Module, method: Method):
        self.model = model
        self.method = method
        self.modules = _attention_modules(model)
        if not self.modules:
            raise ValueError(f"model ({type(model).__name__}) has no attention modules that transformers' "
                             "AttentionInterface dispatches to (none with a layer_idx)")
        self.previous = getattr(model.config, "_attn_implementation", None)
        #: set by ``apply_head_map``: the per-layer windows (``new_cache`` gives the heads policy)
        self.head_map: dict | None = None
        self._previous_methods = {m: _ACTIVE.get(m) for m in self.modules}
        _register()
        if self.previous != ATTN_IMPLEMENTATION:  # first, so that a refusal leaves nothing half-applied
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        for m in self.modules:
            _ACTIVE[m] = method
        self.active = True

    def remove(self) -> None:
        """Switch the model back to the attention it had (and the method, if nested)."""
        if not self.active:
            return
        for m, prev in self._previous_methods.items():
            if prev is None:
                _ACTIVE.pop(m, None)
            else:
                _ACTIVE[m] = prev
        if self.previous != ATTN_IMPLEMENTATION:
            self.model.set_attn_implementation(self.previous or "sdpa")
        self.active = False

    def new_cache(self, **params: Any):
        """A ``LongattnCache`` that runs this method with its tokens really dropped or paged out:
        ``dense`` → ``full``; ``streaming`` → ``streaming`` (sinks + window); ``quest``,
        ``landmark``, ``infllm`` → ``blocks`` (their block, sinks, window and budget);
        ``longheads`` → ``longheads`` (chunk pages, its local window, its key budget). Keys take
        positions within the kept layout unless ``positions='original'``. ``params`` override.
        Pass it to ``model(..., past_key_values=cache)`` or ``model.generate(...)``."""
        from longattn.hf.cache import LongattnCache

        m = self.method
        if getattr(self, "head_map", None) is not None:  # apply_head_map: the heads policy, same map
            hm = self.head_map
            spec = {"policy": "heads", "head_map": hm["rows"], "sinks": hm["sinks"], "window": hm["window"]}
        elif m.name in ("dense", "dense_chunked"):
            spec = {"policy": "full"}
        elif m.name == "streaming":
            spec = {"policy": "streaming", "sinks": m.sinks, "window": m.window}
        elif m.name in ("quest", "landmark", "infllm"):
            spec = {"policy": "blocks", "page": m.block, "sinks": m.sinks, "window": m.window, "budget": m.budget}
        elif m.name == "longheads":
            spec = {"policy": "longheads", "page": m.chunk, "sinks": m.chunk, "window": m.local, "budget": m.window}
        else:
            raise NotImplementedError(
                f"method {m.name!r} has no KV-memory form; LongattnCache policies: full, streaming, h2o, tova, "
                "snapkv, heads, blocks, longheads, retrieval (use longattn.hf.LongattnCache(model, policy, ...) "
                "with 'dense')")
        spec.update(params)
        cache = LongattnCache(self.model, spec.pop("policy"), **spec)
        for layer in cache.layers:
            layer.source_method = m
        return cache

    def __enter__(self) -> "Applied":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"Applied({type(self.model).__name__}, {self.method!r}, {len(self.modules)} layers, {state})"


class Intercepted:
    """A model whose attention layers call ``fn`` instead of a longattn method (``intercept``);
    a context manager that restores the model on exit."""

    def __init__(self, model: torch.nn.Module, fn):
        if not callable(fn):
            raise TypeError(f"fn must be callable (layer, q, k, v, *, scale, causal, key_padding_mask) -> out, "
                            f"got {type(fn).__name__}")
        self.applied = apply(model, "dense")
        self._previous = {m: _INTERCEPT.get(m) for m in self.applied.modules}
        for m in self.applied.modules:
            _INTERCEPT[m] = fn
        self.active = True

    def remove(self) -> None:
        if not self.active:
            return
        for m, prev in self._previous.items():
            if prev is None:
                _INTERCEPT.pop(m, None)
            else:
                _INTERCEPT[m] = prev
        self.applied.remove()
        self.active = False

    def __enter__(self) -> "Intercepted":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def intercept(model: torch.nn.Module, fn) -> Intercepted:
    """Route every attention layer of a transformers ``model`` through ``fn``.

    ``fn(layer, q, k, v, *, scale, causal, key_padding_mask) -> out`` gets the layer index, q
    ``[B, Hq, Lq, D]`` and k/v ``[B, Hkv, Lk, D]`` as the model computed them (after its RoPE), the
    score scale, whether the layer is causal and the key-padding mask (``[B, Lk]``, True = real
    key, or None), and returns ``[B, Hq, Lq, D]``. This is how ``longattn.analysis`` captures q/k
    one layer at a time and how head ablation and ACT change a model's attention without
    touching its weights. Layers that need a 4-D mask, a softcap or attention sinks are refused.
    Returns an ``Intercepted``: ``with intercept(model, fn): model(...)``."""
    return Intercepted(model, fn)


def apply_head_map(model: torch.nn.Module, head_map: Any, *, sinks: int = 4, window: int = 64) -> Applied:
    """Run each attention layer of a transformers ``model`` with its own per-head windows: layer
    ``i`` runs ``head_windows`` with the windows of row ``i`` of ``head_map``.

    ``head_map`` is ``[layer][key head]`` (or a dict / JSON file from ``longattn calibrate-heads``,
    ``longattn analyze`` or ``longattn.calibrate.heads.moa_windows``): True = the whole context,
    False = ``sinks`` + ``window`` recent keys, an int = ``sinks`` + that many recent keys. This is
    the prefill form of the ``heads`` KV policy; ``applied.new_cache()`` gives that policy with the
    same map for generation.

    Returns:
        ``Applied``, already in effect (a context manager that switches back on exit).
    """
    import json
    import os
    from pathlib import Path

    from longattn.calibrate.heads import check_head_map
    from longattn.methods.local import HeadWindows

    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    n_layers = cfg.num_hidden_layers
    n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if isinstance(head_map, (str, os.PathLike)):
        head_map = json.loads(Path(head_map).read_text())
    rows = check_head_map(head_map, n_layers, n_kv)
    methods = [HeadWindows(windows=tuple(0 if c is True else (window if c is False else c) for c in row), sinks=sinks)
               for row in rows]
    applied = apply(model, methods[0])
    for m in applied.modules:
        layer = getattr(m, "layer_idx", None)
        if not isinstance(layer, int) or not 0 <= layer < n_layers:
            applied.remove()
            raise ValueError(f"{type(m).__name__} has layer_idx {layer!r}, outside the head map's {n_layers} layers")
        _ACTIVE[m] = methods[layer]
    applied.head_map = {"rows": rows, "sinks": sinks, "window": window}
    return applied


def apply(model: torch.nn.Module, method: str | Method = "dense", **config: Any) -> Applied:
    """Switch every attention layer of a transformers ``model`` to a longattn ``method``.

    Works for models whose attention goes through ``AttentionInterface`` (Llama, Mistral, Qwen2
    and most current decoder families). ``model(...)`` and ``model.generate(...)`` then run the
    method, with the model's own RoPE, cache and padding.

    Args:
        model: a ``transformers.PreTrainedModel``.
        method: a registered name (``longattn.methods()``) or a method object.
        **config: the method's parameters when ``method`` is a name, e.g. ``budget=1024``.

    Returns:
        ``Applied``, already in effect: ``with apply(model, ...):`` switches back on exit.

    Raises:
        TypeError: ``config`` given together with a method object.
        ValueError: unknown parameters, a model without dispatchable attention layers, or a method that
            is not softmax attention (the recurrent methods: capability ``softmax`` False).
    """
    if isinstance(method, Method):
        if config:
            raise TypeError(f"config {sorted(config)} given together with a method object {method!r}: "
                            "pass the parameters to longattn.method(...) instead")
        m = method
    elif isinstance(method, str):
        m = longattn.method(method, **config)
    else:
        raise TypeError(f"method must be a registered name or a longattn method object, got {type(method).__name__}")
    if not m.capabilities.softmax:
        raise ValueError(
            f"method {m.name!r} is not softmax attention (a recurrent mixer that carries its own state): a "
            "transformers model decodes from its KV cache (one query over every cached key), and its sinks and "
            "LongattnCache memories merge softmax results by their log-sum-exp, which such a method has none of; "
            "build recurrent models from longattn.recurrent.layers instead")
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    return Applied(model, m)
