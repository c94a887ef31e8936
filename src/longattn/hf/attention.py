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
from longattn.methods.base import Method

#: the name under which longattn registers in transformers' interfaces
ATTN_IMPLEMENTATION = "longattn"

#: attention module -> the method it runs (set by ``apply``, removed on exit)
_ACTIVE: "weakref.WeakKeyDictionary[torch.nn.Module, Method]" = weakref.WeakKeyDictionary()
_registered = False
#: methods that leave the choice of keys to a LongattnCache (they attend to all they are given)
_MEMORY_OK = ("dense", "dense_chunked")


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


def longattn_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                               **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The function transformers calls for every attention layer of a switched model.

    Args:
        module: the attention module (its ``is_causal`` and the method ``apply`` gave it).
        query: ``[B, Hq, Lq, D]``; key, value: ``[B, Hkv, Lk, D]`` (GQA heads not repeated, cache
            already updated, RoPE already applied).
        attention_mask: what ``longattn_mask`` returned (None, ``[B, Lk]`` or ``[B, 1|H, Lq, Lk]``),
            or a 4-D mask the caller passed directly (bool, or additive float).

    Returns:
        ``(out [B, Lq, Hq, D], None)``: longattn never materialises attention weights.
    """
    method = _ACTIVE.get(module)
    layer = pending_layer(key)
    if layer is not None:  # a LongattnCache layer: its memory decides what the queries see
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
    causal = bool(getattr(module, "is_causal", True))
    if attention_mask is not None and attention_mask.ndim == 4:
        return _dense_4d(query, key, value, attention_mask, scaling, method), None
    if attention_mask is not None and attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be None, [batch, kv_length] or 4-D, got shape {tuple(attention_mask.shape)}")
    out = longattn.attention(query, key, value, causal=causal, method=method, scale=scaling,
                             key_padding_mask=attention_mask)
    return out.transpose(1, 2), None


def _dense_4d(query, key, value, mask, scaling, method: Method) -> torch.Tensor:
    """Exact attention under a general 4-D mask (bool, or additive float); rows that see no key give 0.

    Only for methods that attend to every visible key (``dense``, ``dense_chunked``): any other
    method has its own pattern (a window, sinks, a selection), which this path would drop."""
    tq, tk = query.shape[2], key.shape[2]
    if not (method.capabilities.exact and isinstance(method.visible_mask(tq, tk, True), (Causal, type(None)))):
        raise NotImplementedError(
            f"method {method.name!r} attends with its own pattern and cannot also follow a general 4-D attention "
            "mask; this layer needs one (a sliding window shorter than the context, packed sequences, a static "
            "cache, or a 4-D mask passed by the caller): use 'dense' or 'dense_chunked' here"
        )
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    hq, hk = query.shape[1], key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query.float(), key.float(), value.float(), attn_mask=mask, scale=scaling, enable_gqa=hq != hk)
    seen = mask.any(-1, keepdim=True)  # [B, 1|H, Lq, 1]
    out = torch.where(seen, out, torch.zeros((), dtype=out.dtype))
    return out.to(query.dtype).transpose(1, 2)


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
        if m.name in ("dense", "dense_chunked"):
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
        ValueError: unknown parameters, or a model without dispatchable attention layers.
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
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    return Applied(model, m)
