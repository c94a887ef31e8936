"""flash-attn's layouts for sequences of different lengths, on top of ``longattn.attention``.

* **Per-row key lengths** (``attention(..., seqlens_k=...)``, flash-attn's ``seqused_k`` /
  ``cache_seqlens``): a right-padded batch or cache where row ``b`` holds ``seqlens_k[b]`` real
  keys. Each row's last query is aligned with its last *real* key, so with ``causal=True`` query
  ``i`` of row ``b`` sees keys ``j <= i + seqlens_k[b] - tokens_q``; keys at or past the length are
  never seen. (A key padding mask hides padding too, but keeps the alignment with the last slot.)
* **Top-left alignment** (``attention(..., align="top_left")``, FlexAttention's and attention-gym's
  convention): query ``i`` sits at position ``i`` rather than ``i + tokens_k - tokens_q``.
* **Packed variable-length sequences** (``varlen_attention``, flash-attn's
  ``flash_attn_varlen_func``): sequences concatenated along the token axis (``[total, heads,
  head_dim]``) with cumulative lengths ``cu_seqlens``, the layout of packed training; each
  sequence attends only within itself, positions restarting at 0.

Every method runs unchanged: rows (or sequences) are grouped by length and each group is one
ordinary call, so exactness, budgets and capability checks are the method's own.
"""

from __future__ import annotations

import math

import torch

from longattn.core.masks import Causal


def check_lengths(name: str, lengths: object, batch: int, limit: int, device) -> torch.Tensor:
    """``lengths`` as int64 ``[batch]`` in ``[0, limit]``, or a clear error naming ``name``."""
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor of shape [batch], got {type(lengths).__name__}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {lengths.dtype}")
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"{name} has shape {tuple(lengths.shape)}, expected [batch] = [{batch}]")
    lengths = lengths.to(device=device, dtype=torch.int64)
    if batch and (int(lengths.min()) < 0 or int(lengths.max()) > limit):
        raise ValueError(f"{name} must lie in [0, tokens_k={limit}], got values from {int(lengths.min())} "
                         f"to {int(lengths.max())}")
    return lengths


def per_row_lengths(run, q, k, v, key_padding_mask, lengths: torch.Tensor, return_stats: bool):
    """``run(q, k, v, key_padding_mask)`` (an ``attention`` call with everything else bound) on
    rows grouped by their key length, each group over its first ``length`` keys; results are put
    back in row order. Rows with no key get zeros (LSE ``-inf``)."""
    b, hq, tq = q.shape[:3]
    out = q.new_zeros(b, hq, tq, v.shape[-1])
    lse = torch.full((b, hq, tq), -math.inf, dtype=torch.float32, device=q.device) if return_stats else None
    first_stats = None
    for n in torch.unique(lengths).tolist():
        rows = (lengths == n).nonzero().flatten()
        if n == 0:
            continue
        pad = None if key_padding_mask is None else key_padding_mask[rows, :n]
        res = run(q[rows], k[rows, :, :n], v[rows, :, :n], pad)
        got = res[0] if return_stats else res
        out = out.index_copy(0, rows, got)  # out of place: keeps autograd through every group
        if return_stats:
            first_stats = first_stats or res[1]
            if res[1].lse is not None:
                lse[rows] = res[1].lse
    if not return_stats:
        return out
    return out, _joint_stats(first_stats, lse)


def _joint_stats(stats, lse):
    from longattn.api import AttentionStats

    if stats is None:  # every row was empty
        return AttentionStats(method="", path="empty", density=0.0, computed_fraction=0.0, lse=lse, time_s=0.0)
    # per-group densities and timings do not add up to one figure: only the path and the LSE carry over
    return AttentionStats(method=stats.method, path=stats.path, density=None, computed_fraction=None, lse=lse,
                          time_s=stats.time_s, extra={"per_row_lengths": True})


def stack_rows(parts: list, return_stats: bool):
    """Results of calls over consecutive query rows (each ``out [B, H, m_i, D]``, or
    ``(out, stats)`` with ``return_stats``) as one result: outputs and LSEs concatenated along the
    query axis (the LSE is None when a part has none); the other statistics are the last part's."""
    if not return_stats:
        return torch.cat(parts, 2)
    stats = parts[-1][1]
    lses = [s.lse for _, s in parts]
    stats.lse = None if any(lse is None for lse in lses) else torch.cat(lses, 2)
    return torch.cat([o for o, _ in parts], 2), stats


def top_left(run, method, q, k, v, key_padding_mask, causal: bool, return_stats: bool, has_position: bool):
    """``run`` with FlexAttention's top-left alignment (query ``i`` at position ``i``), by slicing:

    * ``tokens_q <= tokens_k`` and causal: keys past ``tokens_q - 1`` are in every query's future,
      so the call over the first ``tokens_q`` keys, bottom-right aligned, is the same attention —
      for every method;
    * ``tokens_q > tokens_k`` and causal, for methods whose only pattern is causality: the first
      ``tokens_k`` queries form the causal square, the rest see every key;
    * non-causal, for methods with no positional pattern: alignment changes nothing.

    Anything else (a window or sinks with cross lengths, or a position encoding when the queries
    are split) would need positions shifted inside the method: refused, pointing at
    ``masks.from_mask_mod``, which takes the alignment."""
    tq, tk = q.shape[2], k.shape[2]
    if tq == tk:
        return run(q, k, v, key_padding_mask, causal)
    pattern = method.visible_mask(tq, tk, causal)
    if causal and tq < tk:
        pad = None if key_padding_mask is None else key_padding_mask[:, :tq]
        return run(q, k[:, :, :tq], v[:, :, :tq], pad, True)
    if not causal and pattern is None:
        return run(q, k, v, key_padding_mask, False)
    if causal and isinstance(pattern, Causal) and method.capabilities.non_causal and not has_position:
        res = stack_rows([run(q[:, :, :tk], k, v, key_padding_mask, True),
                          run(q[:, :, tk:], k, v, key_padding_mask, False)], return_stats)
        if return_stats:  # the two parts' densities are against different dense patterns
            res[1].density = res[1].computed_fraction = None
        return res
    raise ValueError(
        f"align='top_left' with method {method.name!r}, causal={causal}, tokens_q={tq} and tokens_k={tk} is not "
        "supported: the method's own pattern would have to move with the queries. Express the pattern with "
        "longattn.masks.from_mask_mod(mask_mod) (FlexAttention's top-left convention) and method 'pattern'")


def _check_cu_seqlens(name: str, cu: object, total: int, device) -> torch.Tensor:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor [n_sequences + 1], got {type(cu).__name__}")
    if cu.dtype.is_floating_point or cu.dtype.is_complex or cu.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must have shape [n_sequences + 1], got {tuple(cu.shape)}")
    cu = cu.to(device=device, dtype=torch.int64)
    if int(cu[0]) != 0 or int(cu[-1]) != total:
        raise ValueError(f"{name} must start at 0 and end at the total token count {total}, got {int(cu[0])} … "
                         f"{int(cu[-1])}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing (cumulative sequence lengths), got {cu.tolist()}")
    return cu


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    causal: bool = False,
    method="dense",
    scale: float | None = None,
    position=None,
    softcap: float | None = None,
    return_lse: bool = False,
):
    """Attention over packed sequences, flash-attn's ``flash_attn_varlen_func`` layout.

    Args:
        q: ``[total_q, heads_q, head_dim]``: every sequence's queries, concatenated.
        k, v: ``[total_k, heads_kv, head_dim]`` (``heads_q % heads_kv == 0``).
        cu_seqlens_q, cu_seqlens_k: int ``[n + 1]``: sequence ``s`` holds queries
            ``cu_seqlens_q[s] … cu_seqlens_q[s+1]-1`` and keys likewise (0 first, the total last).
        causal: bottom-right within each sequence (its last query aligned with its last key).
        method, scale, position, softcap: as for ``longattn.attention``; positions restart at 0 in
            every sequence (and a recurrent method starts each sequence from a fresh state).
        return_lse: also return the LSE ``[heads_q, total_q]`` float32 (flash-attn's layout).

    Returns:
        ``out [total_q, heads_q, head_dim]`` (and the LSE). A sequence with no key gives zeros.
    """
    from longattn.api import attention

    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"varlen_attention takes {name} of shape [total_tokens, heads, head_dim], got {got}")
    cq = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    ck = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cq.numel() != ck.numel():
        raise ValueError(f"cu_seqlens_q describes {cq.numel() - 1} sequences but cu_seqlens_k {ck.numel() - 1}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k has {k.shape[0]} tokens but v has {v.shape[0]}")
    if return_lse:
        from longattn.methods.base import resolve

        m = resolve(method)
        if not m.capabilities.softmax:
            raise ValueError(f"return_lse: method {m.name!r} is not softmax attention (a recurrent mixer) and gives "
                             "no log-sum-exp")
    hq = q.shape[1]
    pieces = []  # the sequences' outputs in order: together they cover every query exactly once
    lse = torch.full((hq, q.shape[0]), -math.inf, dtype=torch.float32, device=q.device) if return_lse else None
    bounds = torch.stack([cq[:-1], cq[1:], ck[:-1], ck[1:]], 1).tolist()
    for q0, q1, k0, k1 in bounds:
        if q1 == q0:
            continue
        # [L, H, D] -> [1, H, L, D]: one ordinary call per sequence
        res = attention(q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None],
                        v[k0:k1].transpose(0, 1)[None], causal=causal, method=method, scale=scale,
                        position=position, softcap=softcap, return_stats=return_lse)
        o = res[0] if return_lse else res
        pieces.append(o[0].transpose(0, 1))
        if return_lse and res[1].lse is not None:
            lse[:, q0:q1] = res[1].lse[0]
    out = torch.cat(pieces, 0) if pieces else q.new_zeros(0, hq, v.shape[-1])
    return (out, lse) if return_lse else out
