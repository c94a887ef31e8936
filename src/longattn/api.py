"""``longattn.attention``: validate, resolve the method, apply positions, run, restore dtype."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from longattn import varlen
from longattn.core import dtypes, masks, nonfinite, validate
from longattn.core.positions import PositionEncoding
from longattn.kernels.softcap import check_softcap, softcap_attention
from longattn.methods.base import Call, Method, Result, resolve, specs


@dataclass
class AttentionStats:
    """What ``attention(..., return_stats=True)`` reports.

    Attributes:
        method: registry name of the method that ran.
        path: the kernel that ran: "sdpa", "tiled", "flex", "sparse", ... ("softcap" with ``softcap``,
            "empty" for empty inputs).
        density: share of the dense pattern's (query, key) pairs that were visible (the causal
            triangle for causal attention), averaged over batch × heads; None for the recurrent
            methods, which visit no (query, key) pairs.
        computed_fraction: share of the dense pattern's pairs inside the blocks the kernel visited
            (None for the recurrent methods).
        lse: ``[B, Hq, Tq]`` float32 log-sum-exp, or None where the kernel does not give it
            (compiled FlexAttention on CPU) and always for methods that are not softmax attention
            (capability ``softmax`` False: the recurrent methods).
        time_s: wall time of the method call; ``extra`` holds its parts (layout_s, kernel_s, ...).
        compute_dtype: the dtype the kernels read q, k, v in ("float32", "bfloat16", "float16"; see
            ``longattn.core.dtypes``); softmax statistics, LSEs and merges are float32 in every case.
    """

    method: str
    path: str
    density: float | None
    computed_fraction: float | None
    lse: torch.Tensor | None
    time_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    compute_dtype: str = "float32"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    method: str | Method = "dense",
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    position: PositionEncoding | None = None,
    return_stats: bool = False,
    summaries: Any = None,
    softcap: float | None = None,
    seqlens_k: torch.Tensor | None = None,
    align: str = "bottom_right",
    compute_dtype: str | torch.dtype | None = None,
    initial_state: Any = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[Any, ...]:
    """Attention with any registered method.

    Args:
        q: ``[batch, heads_q, tokens_q, head_dim]``.
        k: ``[batch, heads_kv, tokens_k, head_dim]`` with ``heads_q % heads_kv == 0``.
        v: ``[batch, heads_kv, tokens_k, head_dim]``, like ``k``.
        causal: query ``i`` sees keys up to ``i + tokens_k - tokens_q`` (last query aligned with
            the last key, flash-attn's bottom-right convention); with ``tokens_q > tokens_k`` the
            first ``tokens_q - tokens_k`` queries see no key and get zeros.
        method: a registered name (``longattn.methods()``) or a method object
            (``longattn.method("window", window=512)``).
        scale: score scale, default ``1/sqrt(head_dim)``.
        key_padding_mask: bool ``[batch, tokens_k]``, True = real key, False = padding.
        position: a ``longattn.positions`` encoding (rotations on q/k or a score bias). Methods
            whose capability sheet has ``own_positions`` (LongHeads) get it untouched in
            ``Call.position`` with q/k unrotated, and place the positions themselves.
        return_stats: also return an ``AttentionStats``.
        summaries: a ``longattn.sparse.BlockSummaries`` of ``k`` kept current by the caller (a decode
            loop appends each new key), so block-retrieval methods need not rebuild it per step.
        softcap: logit soft-capping (Gemma 2; flash-attn's ``softcap``): scaled scores ``s`` become
            ``softcap·tanh(s/softcap)`` before the mask and the softmax. Exact methods only (the
            method's mask is followed exactly, in query tiles: ``kernels.softcap``); approximate
            methods, whose selection and kernels assume plain scores, refuse it, as does a score
            bias (ALiBi, T5). None: no capping.
        seqlens_k: int ``[batch]``: row ``b`` holds ``seqlens_k[b]`` real keys, right-padded after
            (flash-attn's ``seqused_k`` / ``cache_seqlens``); each row's last query is aligned with
            its last real key (``longattn.varlen``).
        align: ``"bottom_right"`` (default: query ``i`` at position ``i + tokens_k - tokens_q``, as
            in decoding and flash-attn) or ``"top_left"`` (query ``i`` at position ``i``:
            FlexAttention's convention for cross attention; see ``longattn.varlen.top_left`` for
            what every method supports).
        compute_dtype: the dtype the kernels read bfloat16/float16 inputs in: None
            (``$LONGATTN_COMPUTE_DTYPE``, default ``"auto"``: their own dtype where the hardware
            multiplies it fast — GPUs, CPUs with AVX512-BF16/AMX — else float32), ``"float32"``,
            ``"input"``, or a torch dtype (``longattn.core.dtypes``). float32/float64 inputs compute in
            float32. Softmax statistics, LSEs and merges are float32 in every case. Methods that read
            a fraction of a long cache (block retrieval decoding) convert only what they read.
        initial_state: for the recurrent methods (capability ``state``: ``linear``, ``lightning``,
            ``based``, ``rat``; ``longattn.methods.recurrent``), the state the previous call returned
            (None: a fresh sequence). q, k and v are then the *new* tokens only (``tokens_q ==
            tokens_k``): prefill in pieces with the state carried equals one call, and one token
            (``tokens == 1``) is a decoding step. A state of another method's type is a ValueError;
            any state given to a softmax method too.
        return_state: also return the state after these tokens (recurrent methods only; a
            ValueError for softmax methods, which keep no state: their decode loop passes the
            whole cache as ``k, v``).

    Returns:
        ``out`` ``[batch, heads_q, tokens_q, head_dim]`` in the dtype of ``q``; with
        ``return_state`` and/or ``return_stats`` a tuple in this order: ``(out, state)``,
        ``(out, stats)`` or ``(out, state, stats)``. Queries with no visible key get zeros.
        Non-finite values follow IEEE as the float64 reference does: a query whose own vector, or a
        key/value it may see (by causality, padding and the method's mask), holds NaN/Inf gets NaN;
        NaN/Inf in keys a query may not see never reach it (``longattn.core.nonfinite``).
        Recurrent methods (capability ``softmax`` False) return no LSE (``stats.lse`` is None) and
        follow their op's own arithmetic for NaN/Inf.
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    validate.check_qkv(q, k, v, causal=causal)
    validate.check_key_padding_mask(key_padding_mask, q, k)
    given_scale = scale
    scale = validate.check_scale(scale, q.shape[-1])
    dtypes.check_choice(compute_dtype)
    if not isinstance(return_state, bool):
        raise TypeError(f"return_state must be a bool, got {type(return_state).__name__}")
    m = resolve(method)
    _check_state_args(m, initial_state, return_state)
    _check_capabilities(m, q, k, v, causal, position)
    if align not in masks.ALIGNS:
        raise ValueError(f"align must be 'bottom_right' or 'top_left', got {align!r}")
    if not m.capabilities.softmax:
        return _run_mixer(m, q, k, v, scale=scale, given_scale=given_scale, key_padding_mask=key_padding_mask,
                          position=position, summaries=summaries, softcap=softcap, seqlens_k=seqlens_k,
                          initial_state=initial_state, return_state=return_state, return_stats=return_stats)
    softcap = check_softcap(softcap)
    if softcap is not None:
        _check_softcap(m, position)
    if position is not None:
        position.check(q, k)  # head counts / head_dim: score biases cannot check under FlexAttention
    tq, tk = q.shape[2], k.shape[2]
    if seqlens_k is not None or (align == "top_left" and tq != tk):
        if summaries is not None:
            raise ValueError("summaries describe all tokens_k keys of k; they cannot be used with seqlens_k or "
                             "align='top_left' (the call runs on fewer keys)")
        same = dict(method=m, scale=scale, position=position, return_stats=return_stats, softcap=softcap,
                    compute_dtype=compute_dtype)
        if seqlens_k is not None:
            lengths = varlen.check_lengths("seqlens_k", seqlens_k, q.shape[0], tk, q.device)
            return varlen.per_row_lengths(
                lambda q_, k_, v_, pad: attention(q_, k_, v_, causal=causal, key_padding_mask=pad, align=align, **same),
                q, k, v, key_padding_mask, lengths, return_stats)
        return varlen.top_left(
            lambda q_, k_, v_, pad, c: attention(q_, k_, v_, causal=c, key_padding_mask=pad, **same),
            m, q, k, v, key_padding_mask, causal, return_stats, position is not None)
    if q.numel() == 0 or tk == 0:
        # nothing to compute (and torch's fused CPU kernel divides by zero on empty inputs)
        return _empty(q, v, m, return_stats)
    # methods whose kernels keep scores in float32 may compute half inputs in their own dtype
    cdt = dtypes.compute_dtype(q.dtype, q.device, compute_dtype) if m.capabilities.half_compute else torch.float32
    if causal and tq > tk:
        # bottom-right alignment, as flash-attn: the first tq - tk queries sit before every key and
        # see nothing; the last tk form the causal square, which every method handles
        # (the square's density is the whole call's: the first rows add no pair to either count)
        head = tq - tk
        res = attention(q[:, :, head:], k, v, causal=True, method=m, scale=scale, key_padding_mask=key_padding_mask,
                        position=position, return_stats=return_stats, summaries=summaries, softcap=softcap,
                        compute_dtype=compute_dtype)
        return varlen.stack_rows([_empty(q[:, :, :head], v, m, return_stats), res], return_stats)
    in_dtype = q.dtype
    # q is read whole by every method; k and v too, except by methods that read a fraction of a
    # long cache (block retrieval decoding): those get them as stored and convert what they read,
    # so a decode step never converts the whole cache. A rotary encoding rewrites all of k anyway:
    # it rotates in float32 (no rounding of the rotated keys before the kernel's own)
    rotary = position is not None and position.kind == "rotary" and not m.capabilities.own_positions
    in_place = m.capabilities.reads_kv_in_place and k.dtype in dtypes.KERNEL_DTYPES and not rotary
    if rotary:
        qc, kc, vc = q.to(torch.float32), k.to(torch.float32), v.to(cdt)  # rotated to cdt in run()
    else:
        qc = q.to(cdt)
        kc, vc = (k, v) if in_place else (k.to(cdt), v.to(cdt))
    # keys and values are screened before the kernel only when that costs little next to it; a
    # few-query call (a decode step over a long cache) checks its result instead (nonfinite)
    eager_screen = nonfinite.screen_before(tq, m.capabilities.exact, summaries)
    keys_first = nonfinite.screen_keys_before(tq, m.capabilities.exact, summaries)
    # an exact few-query call screens only the keys its queries may see (a window, sinks, ...)
    cols = nonfinite.visible_key_columns(m.visible_mask(tq, tk, causal), q.shape[0], q.shape[1], tq, tk,
                                         q.device) if keys_first else None
    poison = nonfinite.find(qc, kc, vc, keys=eager_screen or keys_first, values=eager_screen, key_columns=cols)
    if poison is not None:
        qc, kc, vc = poison.cleaned(qc, kc, vc)
    own = position if (position is not None and m.capabilities.own_positions) else None

    def run(qc, kc, vc) -> Result:
        bias = row_bias = None
        if position is not None and own is None:
            q_pos = torch.arange(tq, device=q.device) + (tk - tq)
            k_pos = torch.arange(tk, device=q.device)
            if position.kind == "rotary":
                qc, kc = (t.to(cdt) for t in position.rotate(qc, kc, q_pos, k_pos))
            elif position.kind == "bias":
                bias = position.score_bias
            elif position.kind == "content":
                row_bias = _content_rows(position, qc, kc, k_pos, scale)
        if softcap is not None:
            out, lse = softcap_attention(qc, kc, vc, softcap=softcap, scale=scale,
                                         key_padding_mask=key_padding_mask, mask=m.visible_mask(tq, tk, causal))
            return Result(out, lse, "softcap")
        call = Call(causal=causal, scale=scale, key_padding_mask=key_padding_mask, bias=bias,
                    row_bias=row_bias, want_stats=return_stats, summaries=summaries, position=own)
        return m.run(qc, kc, vc, call)

    t0 = time.perf_counter()
    res = run(qc, kc, vc)
    if poison is None and not eager_screen and not nonfinite.result_finite(res.out, res.lse):
        # the kernel met NaN/Inf: find it, and answer as a screened call would
        poison = nonfinite.find(qc, kc, vc)
        if poison is not None:
            res = run(*poison.cleaned(qc, kc, vc))
    elapsed = time.perf_counter() - t0
    res_out, res_lse = res.out, res.lse
    if poison is not None:
        res_out, res_lse = poison.apply(res_out, res_lse, m.visible_mask(tq, tk, causal), key_padding_mask)
    out = res_out.to(in_dtype)
    if not return_stats:
        return out
    extra = dict(res.stats)
    stats = AttentionStats(
        method=m.name,
        path=res.path,
        density=extra.pop("density", None),
        computed_fraction=extra.pop("computed_fraction", None),
        lse=res_lse,
        time_s=elapsed,
        extra=extra,
        compute_dtype=str(cdt).removeprefix("torch."),
    )
    return out, stats


def _check_state_args(m: Method, initial_state: Any, return_state: bool) -> None:
    """``initial_state`` / ``return_state`` only for methods that carry a state."""
    if m.capabilities.state:
        return
    for name, given in (("initial_state", initial_state is not None), ("return_state", return_state)):
        if given:
            raise ValueError(
                f"{name} was given, but method {m.name!r} carries no recurrent state: it is softmax attention over "
                "the keys passed in (a decode loop passes the whole cache as k and v). The recurrent methods take "
                f"one: {', '.join(s.name for s in specs() if s.capabilities.state) or 'none registered'}")


def _run_mixer(m: Method, q, k, v, *, scale: float, given_scale, key_padding_mask, position, summaries, softcap,
               seqlens_k, initial_state, return_state: bool, return_stats: bool):
    """``attention`` for a method that is not softmax attention (``Capabilities.softmax`` False: the
    linear / recurrent mixers): the inputs go to ``run`` as given (the op owns its compute dtype and
    keeps its state in float32), with the state; no LSE comes back."""
    what = f"method {m.name!r} is a recurrent mixer, not softmax attention"
    if given_scale is not None and not m.capabilities.takes_scale:
        raise ValueError(f"scale: {what}, with no q·k softmax to scale; set the method's own parameters instead "
                         f"(longattn.method({m.name!r}, ...): {', '.join(m.params()) or 'none'})")
    refusals = (
        ("key_padding_mask", key_padding_mask, "its state has no notion of padding: pass only the real tokens "
                                               "(one call per row for rows of different lengths)"),
        ("position", position, "rotate q and k before the call if the model wants positions (only the caller "
                               "knows where a piece starts when the state is carried)"),
        ("softcap", softcap, "there are no softmax logits to cap"),
        ("seqlens_k", seqlens_k, "call it per row with that row's tokens (or use varlen_attention)"),
        ("summaries", summaries, "block summaries serve block-retrieval methods"),
    )
    for name, value, why in refusals:
        if value is not None:
            raise ValueError(f"{name} is not supported: {what}; {why}")
    b, h = q.shape[:2]
    t0 = time.perf_counter()
    if b == 0 or h == 0:  # nothing to compute; the state passes through
        res = Result(q.new_zeros(*q.shape[:3], v.shape[-1]), None, "empty", state=initial_state)
    else:
        res = m.run(q, k, v, Call(causal=True, scale=scale, want_stats=return_stats, state=initial_state))
    elapsed = time.perf_counter() - t0
    parts: list[Any] = [res.out.to(q.dtype)]
    if return_state:
        parts.append(res.state)
    if return_stats:
        parts.append(AttentionStats(
            method=m.name, path=res.path, density=None, computed_fraction=None, lse=None, time_s=elapsed,
            extra=dict(res.stats), compute_dtype="float64" if q.dtype == torch.float64 else "float32"))
    return parts[0] if len(parts) == 1 else tuple(parts)


def _empty(q: torch.Tensor, v: torch.Tensor, m: Method, return_stats: bool):
    """The answer for empty inputs: an empty output, or (no keys) zeros with LSE -inf."""
    b, h, t = q.shape[:3]
    out = torch.zeros(b, h, t, v.shape[-1], dtype=q.dtype, device=q.device)
    if not return_stats:
        return out
    lse = torch.full((b, h, t), -math.inf, dtype=torch.float32, device=q.device)
    return out, AttentionStats(method=m.name, path="empty", density=0.0, computed_fraction=0.0, lse=lse,
                               time_s=0.0)


def _content_rows(position: PositionEncoding, q, k, k_pos, scale):
    tq, tk = q.shape[2], k.shape[2]

    def rows(q0: int, q1: int) -> torch.Tensor:
        q_pos = torch.arange(q0, q1, device=q.device) + (tk - tq)
        return position.row_bias(q[:, :, q0:q1], k, q_pos, k_pos, scale)

    return rows


def _check_softcap(m: Method, position) -> None:
    if not m.capabilities.exact or m.capabilities.own_positions:
        exact = ", ".join(s.name for s in specs() if s.capabilities.exact and not s.capabilities.own_positions)
        raise ValueError(
            f"method {m.name!r} cannot apply logit soft-capping (softcap): its selection and kernels score keys "
            f"with plain q·k; the exact methods can ({exact})")
    if position is not None and position.kind in ("bias", "content"):
        raise ValueError(f"softcap with a score bias ({type(position).__name__}) is not supported: which of the two "
                         "applies first differs between implementations; use a rotary encoding or no softcap")


def _check_capabilities(m: Method, q, k, v, causal: bool, position) -> None:
    caps = m.capabilities
    if causal and not caps.causal:
        raise ValueError(f"method {m.name!r} does not support causal=True")
    if not causal and not caps.non_causal:
        raise ValueError(f"method {m.name!r} supports only causal=True, got causal=False")
    if not caps.differentiable and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError(
            f"method {m.name!r} is not differentiable (its capability sheet says so), but q, k or v requires grad; "
            "call it under torch.no_grad() or detach the inputs")
    if q.shape[2] != k.shape[2] and not caps.cross:
        hint = ("; a recurrent method takes q, k and v of the new tokens only, the earlier ones through "
                "initial_state" if caps.state else "")
        raise ValueError(
            f"method {m.name!r} does not support cross attention (tokens_q={q.shape[2]} != tokens_k={k.shape[2]})"
            + hint
        )
    if position is not None:
        if not isinstance(position, PositionEncoding):
            raise TypeError(f"position must be a longattn.positions encoding, got {type(position).__name__}")
        if position.kind in ("bias", "content") and not caps.score_bias:
            raise ValueError(f"method {m.name!r} cannot take a score bias ({type(position).__name__})")
