"""Dense attention through torch's fused scaled-dot-product kernels, with their log-sum-exp.

On CPU, ``aten._scaled_dot_product_flash_attention_for_cpu`` is the kernel behind
``F.scaled_dot_product_attention`` and also returns the LSE, which lets dense results merge with
other pieces at no extra cost. On CUDA the same job is done by torch's flash kernel
(``aten._scaled_dot_product_flash_attention``: bf16/fp16, no mask) and its memory-efficient
kernel (``aten._scaled_dot_product_efficient_attention``: float32 too, additive masks), both of
which return the LSE. Being private, these ops check little: ``fused_flash`` is the one door to
them and keeps their preconditions (unit-stride heads, aligned strides, non-empty inputs). Where
no op applies (other builds/devices, shapes an op refuses) the same ``(out, lse)`` comes from
torch ops in float32 (``_eager_flash``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from longattn.core.merge import merge_partials, row_logsumexp


def fused_cpu_available(q: torch.Tensor) -> bool:
    """True where torch's fused CPU flash kernel (with LSE output) can run on ``q``."""
    return q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


#: dtypes torch's CUDA memory-efficient kernel takes; its flash kernel takes the two half ones
_CUDA_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_cuda_available(q: torch.Tensor) -> bool:
    """True where torch's CUDA memory-efficient kernel (with LSE output) can run on ``q``."""
    return (q.device.type == "cuda" and q.dtype in _CUDA_FUSED_DTYPES
            and hasattr(torch.ops.aten, "_scaled_dot_product_efficient_attention"))


def fused_available(q: torch.Tensor) -> bool:
    """True where ``fused_flash`` runs one of torch's fused kernels on ``q`` (CPU or CUDA) rather
    than its eager float32 form: callers batch their work into few large fused calls there."""
    return fused_cpu_available(q) or fused_cuda_available(q)


def _unit_stride_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def fused_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, causal: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's fused flash kernel with its LSE — on CPU
    ``aten._scaled_dot_product_flash_attention_for_cpu``, on CUDA ``_cuda_fused`` — with the
    preconditions those private ops do not check kept here: every call in longattn goes through it.
    Elsewhere the same ``(out, lse)`` comes from torch ops in float32 (``_eager_flash``).

    * The last dimension of q, k, v and the mask must have stride 1: the op reads a head as
      contiguous memory, so a stride-0 (expanded) or strided (``[..., ::2]``) last dimension gives
      silently wrong output, or reads past the tensor (a segfault before a guard page). Such
      inputs are copied contiguous first; every other stride (views of a larger cache, expanded
      batch/head/token axes) is fine and is passed as it is.
    * A float32 mask with float64 inputs is read as float64 (garbage): it is converted first.
    * Empty inputs: ``tokens_q = 0`` or ``tokens_k = 0`` divide by zero inside (SIGFPE kills the
      interpreter). Any empty input is answered here: an empty output, or zeros with LSE ``-inf``
      for rows that see no key.

    Args:
        q: ``[B, H, M, D]``; k, v: ``[B, H|Hkv, N, D]`` (grouped heads: ``H`` a multiple of ``Hkv``);
        attn_mask: additive float mask broadcastable to ``[B, H, M, N]`` (``-inf`` = hidden).
        causal: top-left causal square (``M == N`` in every caller).

    Returns:
        ``(out [B, H, M, D], lse [B, H, M] float32)``.
    """
    b, h, m, d = q.shape
    if q.numel() == 0 or k.shape[2] == 0:
        out = torch.zeros(b, h, m, v.shape[-1], dtype=q.dtype, device=q.device)
        return out, torch.full((b, h, m), -math.inf, dtype=torch.float32, device=q.device)
    if fused_cuda_available(q) and k.dtype == q.dtype and v.dtype == q.dtype:
        # one head count before the autograd function: the repeat's backward sums each group
        k, v = heads_like(q, k), heads_like(q, v)
        if needs_grad(q, k, v):
            out, lse = _FusedFlashWithLse.apply(q, k, v, scale, causal, attn_mask)
            return out, lse.to(torch.float32)
        return _cuda_fused(q, k, v, scale, causal, attn_mask)
    if not fused_cpu_available(q):
        # not a CPU tensor (or a build without the op): the same result from plain torch ops
        return _eager_flash(q, k, v, scale, causal, attn_mask)
    q, k, v = _unit_stride_last(q), _unit_stride_last(k), _unit_stride_last(v)
    if attn_mask is not None:
        if q.dtype == torch.float64 and attn_mask.dtype != torch.float64:
            # the CPU op accepts a float32 mask with float64 inputs and reads it as float64: silently
            # wrong output (torch 2.13, e.g. 4 queries over 8 keys off by 0.45). Half and float32
            # inputs read a float32 mask correctly (their accumulation type)
            attn_mask = attn_mask.to(torch.float64)
        attn_mask = _unit_stride_last(attn_mask)
    if needs_grad(q, k, v):
        out, lse = _FusedFlashWithLse.apply(q, k, v, scale, causal, attn_mask)
        return out, lse.to(torch.float32)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=attn_mask, scale=scale)
    return out, lse.to(torch.float32)


#: the CUDA kernels read heads with vector loads: every stride but the last must be a multiple of
#: this many elements (torch's own SDPA pads masks to it before calling the memory-efficient op)
_CUDA_ALIGN = 8


def _cuda_aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a unit last stride and every other stride a multiple of ``_CUDA_ALIGN`` (stride 0,
    an expanded axis, counts as aligned): ``t`` itself when it already is, else a copy whose last
    axis is padded to the alignment and sliced back (a view of the padded copy)."""
    if t.stride(-1) == 1 and all(s % _CUDA_ALIGN == 0 for s in t.stride()[:-1]):
        return t
    n = t.shape[-1]
    padded = torch.nn.functional.pad(t, (0, (-n) % _CUDA_ALIGN)) if n % _CUDA_ALIGN else t.contiguous()
    return padded[..., :n]


def heads_like(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``t [B|1, Hkv, N, D]`` with q's batch and head counts ``[B, H, N, D]``: a broadcast batch
    expands as a view; fewer key-value heads (GQA, ``H`` a multiple of ``Hkv``) repeat, each
    serving its group of query heads. The CPU op takes grouped heads as they are; the CUDA
    kernels and the eager form take one head count."""
    b, h = q.shape[:2]
    t = t.expand(b, -1, -1, -1) if t.shape[0] == 1 and b > 1 else t
    hk = t.shape[1]
    if hk == h:
        return t
    if hk == 0 or h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    return t.expand(-1, h, -1, -1) if hk == 1 else t.repeat_interleave(h // hk, dim=1)


def _cuda_kernel(q, k, v, bias, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One call of torch's CUDA attention kernels on prepared inputs (one head count, aligned
    strides, ``bias`` in q's dtype and of full shape or None): the flash kernel for bf16/fp16
    without a bias, the memory-efficient one otherwise (float32 too, additive bias). Returns
    ``(out, lse)`` with the LSE as the kernel gives it (possibly padded past ``M`` rows, and
    unspecified on rows the bias hides entirely). Raises ``RuntimeError`` for what it refuses."""
    d = q.shape[-1]
    if bias is None and q.dtype != torch.float32 and d % 8 == 0 and d <= 256 \
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention"):
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return res[0], res[1]
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal, scale=scale)
    return res[0], res[1]


def _cuda_fused(q, k, v, scale: float, causal: bool, attn_mask):
    """``fused_flash`` on CUDA through ``_cuda_kernel``, with the preconditions those private ops
    do not check kept here:

    * the causal flag is the top-left square only when ``M == N`` (the flash kernel refuses it
      otherwise): other causal shapes take ``_eager_flash``;
    * one head count (``heads_like``: GQA heads repeated), strides aligned (``_cuda_aligned``),
      the mask in q's dtype and expanded to ``[B, H, M, N]`` as a view;
    * the LSE is cut to ``M`` rows (the memory-efficient kernel pads it to a multiple of 32);
    * rows that see no key — every key hidden by the mask, or by the mask and the causal square
      together — give 0 and LSE ``-inf``, found from the mask whatever the kernel returns there;
    * anything the kernels refuse (they check their arguments before launching) takes
      ``_eager_flash``, which gives the same result in float32.
    """
    b, h, m, d = q.shape
    n = k.shape[2]
    if causal and m != n:
        return _eager_flash(q, k, v, scale, causal, attn_mask)
    k, v = heads_like(q, k), heads_like(q, v)
    try:
        qa, ka, va = _cuda_aligned(q), _cuda_aligned(k), _cuda_aligned(v)
        bias = None
        if attn_mask is not None:
            # aligned before expanding: the broadcast axes stay views (stride 0)
            bias = _cuda_aligned(attn_mask.to(q.dtype)).expand(b, h, m, n)
        out, lse = _cuda_kernel(qa, ka, va, bias, causal, scale)
    except RuntimeError:
        return _eager_flash(q, k, v, scale, causal, attn_mask)
    lse = lse[..., :m].to(torch.float32)
    if attn_mask is not None:
        hidden = torch.isneginf(attn_mask)
        if causal:
            hidden = hidden | torch.ones(m, n, dtype=torch.bool, device=q.device).triu(1)
        dead = hidden.all(-1).expand(b, h, m)
        out = out.masked_fill(dead[..., None], 0.0)
        lse = lse.masked_fill(dead, -math.inf)
    return out, lse


def _eager_flash(q, k, v, scale: float, causal: bool, attn_mask):
    """``fused_flash`` where no fused op runs (other devices, shapes the CUDA kernels refuse):
    float32 scores in query tiles, their LSE and ``softmax @ v`` from torch ops, differentiable
    through out and LSE by autograd. Rows that see no key give 0 and LSE ``-inf``."""
    k, v = heads_like(q, k), heads_like(q, v)
    m, n = q.shape[2], k.shape[2]
    tile = max(1, BACKWARD_TILE_ELEMENTS // max(1, q.shape[0] * q.shape[1] * n))
    kt, vf = k.to(torch.float32).transpose(-1, -2), v.to(torch.float32)
    outs, lses = [], []
    for m0 in range(0, m, tile):
        m1 = min(m, m0 + tile)
        s = torch.matmul(q[:, :, m0:m1].to(torch.float32), kt) * scale  # [B, H, t, N]
        if attn_mask is not None:
            s = s + (attn_mask if attn_mask.shape[-2] == 1 else attn_mask[..., m0:m1, :]).to(torch.float32)
        if causal:  # top-left aligned, as the fused op
            rows = torch.arange(m0, m1, device=q.device)[:, None]
            s = s.masked_fill(torch.arange(n, device=q.device)[None, :] > rows, -math.inf)
        lse = row_logsumexp(s)
        p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
        outs.append(torch.matmul(p, vf))
        lses.append(lse)
    return torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2)


def needs_grad(*tensors: torch.Tensor) -> bool:
    """True when autograd will record an op on any of ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


#: scores recomputed at once by the backward (batch × heads × query tile × keys), 16 MiB of float32
BACKWARD_TILE_ELEMENTS = 1 << 22


class _FusedFlashWithLse(torch.autograd.Function):
    """The fused flash kernel (CPU or CUDA) with a backward that also differentiates its LSE output.

    torch's own backward of the op treats the LSE as a by-product (its gradient is dropped). Every
    longattn kernel that merges pieces by LSE (tiled, sparse, chunked) sends gradient through it,
    and without this the query and key gradients of a merged result were silently wrong (errors
    of 0.5-1.2 against the float64 reference on 24 tokens). The backward recomputes the
    probabilities in query tiles (never the whole score matrix) and uses, per row ``i``,

        dS = P ∘ (dO·Vᵀ − rowsum(dO ∘ O) + dLSE),  dQ = scale·dS·K,  dK = scale·dSᵀ·Q,  dV = Pᵀ·dO

    (the flash-attention backward with the LSE term: ∂lse_i/∂s_ij = P_ij).
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, attn_mask):
        if fused_cuda_available(q):  # the dispatch of fused_flash
            out, lse = _cuda_fused(q, k, v, scale, causal, attn_mask)
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, causal, attn_mask=attn_mask, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask)
        ctx.scale, ctx.causal = scale, causal
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        q_in, k_in, v_in, out, lse, attn_mask = ctx.saved_tensors
        scale, causal = ctx.scale, ctx.causal
        # scores and probabilities in float32 whatever the input dtype, as flash backwards keep them
        # (and a float32 mask meets float32 scores); gradients return in each input's dtype
        q, k, v, out = q_in.float(), k_in.float(), v_in.float(), out.float()
        if attn_mask is not None:
            attn_mask = attn_mask.float()
        b, h, m, _ = q.shape
        n = k.shape[2]
        dq = torch.zeros_like(q)
        dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
        d_out = torch.zeros_like(out) if d_out is None else d_out.float()
        tile = max(1, BACKWARD_TILE_ELEMENTS // max(1, b * h * n))
        for m0 in range(0, m, tile):
            m1 = min(m, m0 + tile)
            qt = q[:, :, m0:m1]
            s = torch.matmul(qt, k.transpose(-1, -2)) * scale  # [B, H, t, N]
            if attn_mask is not None:
                mt = attn_mask if attn_mask.shape[-2] == 1 else attn_mask[..., m0:m1, :]
                s = s + mt
            if causal:
                rows = torch.arange(m0, m1, device=q.device)[:, None]
                s = s.masked_fill(torch.arange(n, device=q.device)[None, :] > rows, -math.inf)
            l = lse[:, :, m0:m1, None].float()
            # rows that saw no key (lse = -inf) have no probabilities: exp(-inf - -inf) would be NaN
            p = torch.exp(s - l.masked_fill(torch.isneginf(l), 0.0)).masked_fill(torch.isneginf(l), 0.0)
            do = d_out[:, :, m0:m1]
            dv += torch.matmul(p.transpose(-1, -2), do)
            dp = torch.matmul(do, v.transpose(-1, -2))
            row = (do * out[:, :, m0:m1]).sum(-1, keepdim=True)
            if d_lse is not None:
                row = row - d_lse[:, :, m0:m1, None].to(row.dtype)
            ds = p * (dp - row)
            dq[:, :, m0:m1] = torch.matmul(ds, k) * scale
            dk += torch.matmul(ds.transpose(-1, -2), qt) * scale
        return dq.to(q_in.dtype), dk.to(k_in.dtype), dv.to(v_in.dtype), None, None, None


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (optionally causal, bottom-right aligned) attention → ``(out, lse)`` in float32.

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]`` (GQA handled here).
        key_padding_mask: bool ``[B, Tk]``, True = real key.
    """
    tq, tk = q.shape[2], k.shape[2]
    if causal and tq == 1:
        # one query aligned with the last key sees every key: no split, no merge (a decode step)
        causal = False
    if causal and tq != tk:
        # torch's is_causal aligns top-left; we align the last query with the last key. Split the
        # keys: the first tk - tq are visible to every query, the last tq form a causal square.
        off = tk - tq
        pad_a = None if key_padding_mask is None else key_padding_mask[:, :off]
        pad_b = None if key_padding_mask is None else key_padding_mask[:, off:]
        o1, l1 = _sdpa_piece(q, k[:, :, :off], v[:, :, :off], scale, False, pad_a)
        o2, l2 = _sdpa_piece(q, k[:, :, off:], v[:, :, off:], scale, True, pad_b)
        return merge_partials([o1, o2], [l1, l2])
    return _sdpa_piece(q, k, v, scale, causal, key_padding_mask)


def _sdpa_piece(q, k, v, scale, causal, key_padding_mask):
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    if tk == 0:
        return torch.zeros_like(q), torch.full((b, hq, tq), -math.inf, device=q.device)
    g = hq // hk
    causal_square = causal
    attn_mask = None
    if key_padding_mask is not None:
        attn_mask = key_padding_mask[:, None, None, :]
        if causal:
            attn_mask = attn_mask & torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril()
            causal = False
    if fused_available(q):
        # GQA without a causal square: the g query heads of a group see the same keys, so they
        # fold into one head's query axis ([B, Hkv, g·Tq, D], a view) and K/V are never copied —
        # a copy per query head cost a 64k-token decode step 8× SDPA's time. The causal square
        # needs each query's own row position, so there the K/V heads are repeated.
        fold = g > 1 and not causal and (attn_mask is None or attn_mask.shape[1:3] == (1, 1))
        qq = q.reshape(b, hk, g * tq, d) if fold else q
        if g > 1 and not fold:
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        if attn_mask is not None:
            # the fused kernel takes an additive float mask
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, -math.inf)
        out, lse = fused_flash(qq, k, v, scale=scale, causal=causal, attn_mask=attn_mask)
        if fold:
            out, lse = out.reshape(b, hq, tq, d), lse.reshape(b, hq, tq)
    else:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal, scale=scale, enable_gqa=g > 1
        )
        lse = _lse_tiled(q, k, scale, causal, attn_mask, g)
    # A row whose visible keys are all padding must give zeros and -inf (the fused kernel returns
    # a finite LSE there). Found from the padding mask, not from the kernel's output.
    if key_padding_mask is not None:
        if causal_square:
            dead = key_padding_mask.cumsum(-1)[:, None, :] == 0  # [B, 1, Tq]: no real key <= i
        else:
            dead = ~key_padding_mask.any(-1).view(b, 1, 1)
        dead = dead.expand(b, hq, tq)
        out = out.masked_fill(dead[..., None], 0.0)
        lse = lse.masked_fill(dead, -math.inf)
    return out, lse


def _lse_tiled(q, k, scale, causal, attn_mask, g, tile: int = 256):
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    kk = k.repeat_interleave(g, dim=1) if g > 1 else k
    lses = []
    for i in range(0, tq, tile):
        s = (q[:, :, i : i + tile] @ kk.transpose(-1, -2)) * scale
        if causal:
            rows = torch.arange(i, min(i + tile, tq), device=q.device)[:, None]
            s = s.masked_fill(torch.arange(tk, device=q.device)[None, :] > rows, -math.inf)
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, -math.inf)
        lses.append(row_logsumexp(s.float()))
    return torch.cat(lses, -1)
