"""Head calibration for DuoAttention / RazorAttention head maps: which (layer, key head) pairs
must keep the whole KV cache ("retrieval heads") and which can live on attention sinks plus a
recent window ("streaming heads").

Both papers find the split offline, on synthetic data where the answer has to be fetched from far
back in the context:

* RazorAttention (Tang et al., 2024, "RazorAttention: Efficient KV Cache Compression Through
  Retrieval Heads") keeps the *echo* heads (a query attends to the earlier occurrence of its own
  token) and the *induction* heads (it attends to the token that followed that earlier
  occurrence), found by feeding a sequence of random tokens that repeats itself.
* DuoAttention (Xiao et al., 2024, "DuoAttention: Efficient Long-Context LLM Inference with
  Retrieval and Streaming Heads") learns one gate per head that mixes full attention with
  sinks + recent-window attention, minimising how far the model's hidden states on a synthetic
  passkey-retrieval task move from the full-attention ones (with an L1 push towards streaming).

``calibrate_heads`` runs the model on such synthetic data (random token ids with a ``span``-token
"passkey" planted at a random depth and repeated at the very end), scores every query head on the
queries of the repeat, averages the query heads of each key/value group (GQA) and marks the top
``retrieval_share`` of the (layer, key head) pairs as retrieval heads. The result is the JSON that
``LongattnCache(model, "heads", head_map=path)`` reads (see ``longattn.hf.cache._head_map``).

Nothing is downloaded: the data are random ids from the model's own vocabulary.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

METHODS = ("razor", "duo")

#: token ids 0, 1, 2 are <unk>/padding, BOS and EOS in llama-style vocabularies: never drawn
FIRST_ORDINARY_ID = 3


# ---------------------------------------------------------------------------- validation
def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def validate_args(*, n_samples: int, length: int, span: int, seed: int, retrieval_share: float, method: str,
                  sinks: int, window: int, vocab_size: int | None = None,
                  max_positions: int | None = None) -> None:
    """Raise ``ValueError`` naming the argument, its value and what was expected.

    The layout needs ``length >= sinks + 2 * span + window``: the passkey starts after the sinks
    and its first occurrence (and the token after it, which induction heads look at) ends before
    the recent window of the first repeated query, so a streaming head cannot see it.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _check_int("n_samples", n_samples, 1)
    _check_int("span", span, 1)
    _check_int("length", length, 4)
    _check_int("sinks", sinks, 0)
    _check_int("window", window, 1)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if isinstance(retrieval_share, bool) or not isinstance(retrieval_share, numbers.Real) \
            or not math.isfinite(retrieval_share) or not 0 < retrieval_share <= 1:
        raise ValueError(f"retrieval_share must be a number in (0, 1] (the fraction of (layer, key head) pairs "
                         f"kept as retrieval heads), got {retrieval_share!r}")
    if 3 * span >= length:
        raise ValueError(f"span must be < length/3 = {length / 3:g} (the passkey appears twice among random "
                         f"filler), got span={span} with length={length}")
    need = sinks + 2 * span + window
    if length < need:
        raise ValueError(f"length must be >= sinks + 2*span + window = {sinks} + 2*{span} + {window} = {need} "
                         f"(the first passkey must lie outside the recent window of its repeat), got {length}")
    if max_positions is not None and length > max_positions:
        raise ValueError(f"length must be <= the model's max_position_embeddings ({max_positions}), got {length}")
    if vocab_size is not None and vocab_size <= FIRST_ORDINARY_ID + 1:
        raise ValueError(f"the model's vocab_size must be > {FIRST_ORDINARY_ID + 1} (ids 0-2 are specials), "
                         f"got {vocab_size}")


# ---------------------------------------------------------------------------- data
def passkey_batch(n_samples: int, length: int, span: int, vocab_size: int, *, seed: int = 0, sinks: int = 4,
                  window: int = 64, bos: int | None = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic repeat / passkey sequences.

    Each row is ``length`` uniform random ids from ``[3, vocab_size)`` (position 0 is ``bos``
    unless it is None); a passkey of ``span`` ids starts at a random depth
    ``d ∈ [sinks, length - 2*span - window]`` and the last ``span`` positions repeat it, so
    ``ids[i, d + j] == ids[i, length - span + j]`` for ``j < span``.

    Returns:
        ``ids`` ``[n_samples, length]`` (int64) and ``depth`` ``[n_samples]`` (int64).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_ORDINARY_ID, vocab_size, (n_samples, length), generator=g, device=g.device)
    lo, hi = max(sinks, 1 if bos is not None else 0), length - 2 * span - window
    if hi < lo:
        raise ValueError(f"length={length} leaves no room for a passkey of span={span} after {sinks} sinks and "
                         f"before a {window}-token window")
    depth = torch.randint(lo, hi + 1, (n_samples,), generator=g, device=g.device)
    for i in range(n_samples):
        ids[i, length - span:] = ids[i, depth[i]:depth[i] + span]
    if bos is not None:
        ids[:, 0] = bos
    return ids, depth


# ---------------------------------------------------------------------------- scores
def razor_scores(attn: torch.Tensor, depth: torch.Tensor, span: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RazorAttention's echo and induction scores of each query head.

    Args:
        attn: ``[B, Hq, L, L]`` attention probabilities (eager, causal).
        depth: ``[B]`` where the first passkey occurrence starts (``passkey_batch``).
        span: passkey length; the queries scored are the repeat, ``L - span … L - 1``.

    Returns:
        ``(echo, induction)``, each ``[Hq]`` (float64): the attention mass a repeated query
        ``L - span + j`` puts on key ``depth + j`` (the same token, earlier) and on key
        ``depth + j + 1`` (the token that followed it), averaged over the ``B × span`` queries.
    """
    b, hq, length, _ = attn.shape
    rows = attn[:, :, length - span:, :].double()                       # [B, Hq, span, L]
    echo_key = depth.to(attn.device)[:, None] + torch.arange(span, device=attn.device)  # [B, span]
    idx = echo_key[:, None, :, None].expand(b, hq, span, 1)
    echo = rows.gather(-1, idx).squeeze(-1)                              # [B, Hq, span]
    induction = rows.gather(-1, idx + 1).squeeze(-1)
    return echo.mean(dim=(0, 2)), induction.mean(dim=(0, 2))


def duo_scores(attn: torch.Tensor, values: torch.Tensor, span: int, *, sinks: int = 4, window: int = 64,
               eps: float = 1e-12) -> torch.Tensor:
    """A per-head proxy of DuoAttention's objective: how much a head's output on the repeated
    passkey moves when the head is made a streaming head.

    For every query ``t`` of the repeat the full output is ``o = Σ_c P[t, c] v_c``; the streaming
    output renormalises the same probabilities over the kept keys ``c < sinks`` or
    ``t - window < c <= t``: ``o' = Σ_kept P[t, c] v_c / Σ_kept P[t, c]`` (this is exactly what
    softmax over the kept keys gives, since the dropped logits only enter the normaliser). The
    score is ``‖o - o'‖₂ / ‖o‖₂`` averaged over the ``B × span`` queries.

    Args:
        attn: ``[B, Hq, L, L]`` attention probabilities.
        values: ``[B, Hkv, L, D]`` value states (query head ``h`` reads key head ``h // (Hq/Hkv)``).
        span, sinks, window: the scored queries and the streaming layout.

    Returns:
        ``[Hq]`` (float64), 0 for a head that never looks outside sinks + window.
    """
    b, hq, length, _ = attn.shape
    n_kv = values.shape[1]
    if hq % n_kv:
        raise ValueError(f"{hq} query heads are not a multiple of {n_kv} key heads")
    v = values.double().repeat_interleave(hq // n_kv, dim=1)            # [B, Hq, L, D]
    p = attn[:, :, length - span:, :].double()                           # [B, Hq, span, L]
    t = torch.arange(length - span, length, device=attn.device)[:, None]  # [span, 1]
    c = torch.arange(length, device=attn.device)[None, :]                # [1, L]
    keep = (c < sinks) | ((c > t - window) & (c <= t))                   # [span, L]
    full = p @ v                                                         # [B, Hq, span, D]
    pk = p * keep
    stream = (pk @ v) / pk.sum(-1, keepdim=True).clamp_min(eps)
    rel = (full - stream).norm(dim=-1) / full.norm(dim=-1).clamp_min(eps)  # [B, Hq, span]
    return rel.mean(dim=(0, 2))


def group_mean(scores: torch.Tensor, n_kv: int) -> torch.Tensor:
    """``[..., Hq]`` → ``[..., Hkv]``: the mean over each key head's query heads (GQA: query head
    ``i`` belongs to key head ``i // (Hq / Hkv)``)."""
    hq = scores.shape[-1]
    if hq % n_kv:
        raise ValueError(f"{hq} query heads are not a multiple of {n_kv} key heads")
    return scores.reshape(*scores.shape[:-1], n_kv, hq // n_kv).mean(-1)


def select_retrieval(scores: torch.Tensor, share: float) -> torch.Tensor:
    """``[layers, Hkv]`` bool: the top ``ceil(share × layers × Hkv)`` scores (at least one; ties go
    to the earlier layer / head, so the choice is deterministic)."""
    flat = scores.reshape(-1)
    k = max(1, min(flat.numel(), math.ceil(share * flat.numel() - 1e-9)))
    order = torch.argsort(-flat, stable=True)[:k]
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[order] = True
    return mask.reshape(scores.shape)


# ---------------------------------------------------------------------------- calibration
def _value_projections(model: torch.nn.Module, n_layers: int) -> list[torch.nn.Module]:
    """The ``v_proj`` of every attention layer, in layer order."""
    attn = [m for m in model.modules() if hasattr(m, "v_proj") and hasattr(m, "layer_idx")]
    attn.sort(key=lambda m: m.layer_idx)
    if len(attn) != n_layers:
        raise ValueError(f"method='duo' needs one attention module with a v_proj per layer; found {len(attn)} "
                         f"for {n_layers} layers (use method='razor' for this model)")
    return [m.v_proj for m in attn]


def calibrate_heads(model: torch.nn.Module, *, n_samples: int = 8, length: int = 384, span: int = 16, seed: int = 0,
                    retrieval_share: float = 0.25, method: str = "razor", sinks: int = 4, window: int = 64,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Score every (layer, key head) of a transformers causal LM and choose the retrieval heads.

    The model runs once per sample on ``passkey_batch`` data with ``attn_implementation="eager"``
    and ``output_attentions=True`` (switched for the call and restored afterwards, as is its
    train/eval mode), giving ``[1, Hq, L, L]`` probabilities per layer.

    * ``method="razor"``: score = echo + induction mass on the repeat (``razor_scores``;
      RazorAttention, Tang et al. 2024).
    * ``method="duo"``: score = relative L2 change of the head's attention-weighted values when it
      is restricted to ``sinks`` + the last ``window`` keys (``duo_scores``), a local proxy of
      DuoAttention's gate objective (Xiao et al. 2024). The paper trains gates on the change of the
      whole model's hidden states; here each head is perturbed alone and measured at its own
      output, before ``o_proj`` and the later layers. That needs no gradients and no training and
      ranks heads by how much of what they read lies outside the streaming layout. The values
      ``[B, L, Hkv·D]`` are captured with a forward hook on each layer's ``v_proj`` (in Llama-style
      models they are the value states, no RoPE), and the probabilities are the eager ones,
      restricted and renormalised, which is exactly softmax over the kept keys.

    Query-head scores are averaged over each key head's group (GQA), then the top
    ``retrieval_share`` of the ``layers × Hkv`` pairs (at least one) become retrieval heads.

    Args:
        model: a transformers ``PreTrainedModel`` (``set_attn_implementation``, ``config``).
        n_samples: sequences scored (one forward each).
        length: tokens per sequence (<= ``max_position_embeddings``).
        span: passkey tokens; ``3 * span < length``.
        seed: seed of the synthetic data.
        retrieval_share: fraction in (0, 1] of (layer, key head) pairs marked retrieval.
        method: ``"razor"`` or ``"duo"``.
        sinks, window: the streaming layout the passkey must fall outside of (and ``duo``'s
            restriction).
        progress: called as ``progress(done, n_samples)`` after each sample.

    Returns:
        ``{"method", "retrieval": [[bool] * Hkv] * layers, "scores": [[float] * Hkv] * layers,
        "n_samples", "length", "span", "seed", "retrieval_share", "sinks", "window", "model"}``;
        for ``razor`` also ``"echo"`` and ``"induction"`` (``[[float]]``, their sum is ``scores``).
    """
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    n_layers = cfg.num_hidden_layers
    hq = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or hq
    validate_args(n_samples=n_samples, length=length, span=span, seed=seed, retrieval_share=retrieval_share,
                  method=method, sinks=sinks, window=window, vocab_size=cfg.vocab_size,
                  max_positions=getattr(cfg, "max_position_embeddings", None))
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    bos = getattr(cfg, "bos_token_id", None)
    ids, depth = passkey_batch(n_samples, length, span, cfg.vocab_size, seed=seed, sinks=sinks, window=window,
                               bos=bos if isinstance(bos, int) else None)
    device = next(model.parameters()).device
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq

    captured: dict[int, torch.Tensor] = {}
    hooks = []
    if method == "duo":
        for i, proj in enumerate(_value_projections(model, n_layers)):
            def hook(_mod, _inp, out, i=i):
                captured[i] = out.detach()
            hooks.append(proj.register_forward_hook(hook))

    sums = {name: torch.zeros(n_layers, hq, dtype=torch.float64, device="cpu") for name in  # host sums
            (("echo", "induction") if method == "razor" else ("duo",))}
    previous = getattr(model.config, "_attn_implementation", None)
    was_training = model.training
    try:
        if previous != "eager":
            model.set_attn_implementation("eager")
        model.eval()
        with torch.no_grad():
            for s in range(n_samples):
                x = ids[s:s + 1].to(device)
                out = model(input_ids=x, output_attentions=True, use_cache=False)
                attns = out.attentions
                if attns is None or len(attns) != n_layers or any(a is None for a in attns):
                    raise RuntimeError(f"{type(model).__name__} returned no attention probabilities for every layer "
                                       "under attn_implementation='eager'")
                for li, a in enumerate(attns):
                    if method == "razor":
                        echo, ind = razor_scores(a, depth[s:s + 1], span)
                        sums["echo"][li] += echo.cpu()
                        sums["induction"][li] += ind.cpu()
                    else:
                        v = captured.pop(li)                                   # [1, L, Hkv·D]
                        v = v.view(1, length, -1, head_dim).transpose(1, 2)    # [1, Hkv, L, D]
                        sums["duo"][li] += duo_scores(a, v, span, sinks=sinks, window=window).cpu()
                del out, attns
                if progress is not None:
                    progress(s + 1, n_samples)
    finally:
        for h in hooks:
            h.remove()
        if previous != "eager":
            model.set_attn_implementation(previous or "sdpa")
        model.train(was_training)

    per_kv = {name: group_mean(total / n_samples, n_kv) for name, total in sums.items()}   # [layers, Hkv]
    scores = per_kv["echo"] + per_kv["induction"] if method == "razor" else per_kv["duo"]
    if not torch.isfinite(scores).all():
        raise RuntimeError(f"non-finite head scores ({method}): {scores.tolist()}")
    retrieval = select_retrieval(scores, float(retrieval_share))
    result: dict[str, Any] = {
        "method": method,
        "retrieval": retrieval.tolist(),
        "scores": scores.tolist(),
        "n_samples": n_samples, "length": length, "span": span, "seed": seed,
        "retrieval_share": float(retrieval_share), "sinks": sinks, "window": window,
        "model": getattr(cfg, "model_type", type(model).__name__),
    }
    if method == "razor":
        result["echo"] = per_kv["echo"].tolist()
        result["induction"] = per_kv["induction"].tolist()
    return result


def save_head_map(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``result`` (from ``calibrate_heads``) as JSON (indent 2) for
    ``LongattnCache(model, "heads", head_map=path)``; returns the path."""
    rows = result.get("retrieval") if isinstance(result, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, list) and all(isinstance(x, bool) for x in r) for r in rows):
        raise ValueError("result must be a dict from calibrate_heads with 'retrieval': [[bool per key head] per layer]")
    from longattn.files import atomic_write_text

    return atomic_write_text(path, json.dumps(result, indent=2) + "\n")
