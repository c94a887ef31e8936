"""Landmark Attention's grouped softmax (Mohtashami & Jaggi 2023, "Landmark Attention:
Random-Access Infinite Context Length for Transformers"), with retrieval of the top-k blocks.

The token stream is cut into blocks of ``block`` tokens whose last slot holds a *landmark* token
(``longattn.train.landmarks`` inserts them): block ``b`` spans positions ``b·L … b·L+L-1`` and its
landmark sits at ``b·L+L-1`` (``L = block``). A query ``i`` in block ``c`` attends

* *directly* to the tokens of its own block up to itself (its own landmark included) and to the
  landmark of every earlier block ``b < c``: one softmax over that set, normaliser ``D_i``;
* to the ordinary tokens ``j`` of an earlier block ``b`` *through its landmark*: weight
  ``exp(s_{i,l_b} − D_i) · exp(s_ij) / Σ_{j' ∈ b, ordinary} exp(s_ij')`` — the landmark's direct
  share, split over its block by a softmax inside the block;
* to an earlier block's landmark value not at all (its share went to its block).

The weights sum to one. With one block (``L`` at least the sequence) it is causal softmax attention.
Training runs this over every earlier block; at inference each query block (the ``L`` queries of one
block) keeps its ``local`` nearest earlier blocks and the highest-scoring others by landmark score,
``top_k`` in all, and the formula runs over those: a query reads ``(top_k + 1)·L`` keys at any
context length.

Positions (rotary): a landmark takes no position of its own — it shares the position of the token
after it — so ordinary tokens keep the positions they had in the text before landmarks were
inserted (an induction head's "previous token" stays one position back across a landmark; counting
landmarks, a passkey whose digits straddled one was copied in 25% of samples against 100% without
the straddle, in a model trained that way). The kept blocks are laid out contiguously in their
original order, right before the own block, and rotated there: kept slot ``s``'s token ``t`` sits
at ``s·(L-1) + t``, the own block's token (and query) ``t`` at ``n·(L-1) + t`` (``n`` = slots). With
every block kept this is the original layout shifted by a constant, which a rotary encoding does not
see; with ``top_k`` blocks kept a query never sees a distance of ``(top_k + 1)·L`` or more, however
long the context. Blocks are *scored* with every landmark at the distance of the nearest earlier
block's landmark (query ``t`` of a block against a landmark ``t`` positions back), a distance seen in
training.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

#: bound on score elements per step (batch × heads × query blocks × queries × keys)
MAX_ELEMENTS = 1 << 24


def _rotate(x: Tensor, position, pos: Tensor) -> Tensor:
    """``x [..., T, D]`` rotated to positions ``pos [T]`` (no-op without a rotary encoding)."""
    if position is None:
        return x
    cos, sin = position.cos_sin(pos)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def landmark_scores(q: Tensor, k: Tensor, *, block: int, scale: float, position=None) -> Tensor:
    """Retrieval scores of every earlier block for every query block.

    Args:
        q: ``[B, Hq, Tq, D]`` (unrotated when ``position`` is given), the last ``Tq`` of ``Tk``
            positions; k: ``[B, Hkv, Tk, D]``.

    Returns:
        float32 ``[B, Hq, n_qb, n_blocks]``: for query block ``c`` (absolute block index
        ``first_block + c``), the highest log-softmax share over its queries of each complete
        earlier block's landmark (``-inf`` for blocks that are not earlier).
    """
    tk = k.shape[2]
    lm_idx = torch.arange(tk // block, device=q.device) * block + (block - 1)
    return score_landmarks(q, k[:, :, lm_idx], tk=tk, block=block, scale=scale, position=position)


def score_landmarks(q: Tensor, landmarks: Tensor, *, tk: int, block: int, scale: float, position=None) -> Tensor:
    """:func:`landmark_scores` from the landmark keys alone (what a memory keeps hot).

    Args:
        q: ``[B, Hq, Tq, D]`` (unrotated when ``position`` is given), the last ``Tq`` of ``tk``
            positions; landmarks: ``[B, Hkv, tk // block, D]``, the key at position ``b·block+block-1``
            of every complete block ``b``, unrotated.
    """
    b, hq, tq, d = q.shape
    hk = landmarks.shape[1]
    L = block
    off = tk - tq
    first = off // L
    n_blocks = tk // L  # complete blocks (those with a landmark)
    if landmarks.shape[2] != n_blocks:
        raise ValueError(f"landmarks must hold the {n_blocks} complete blocks' keys of {tk} positions, "
                         f"got {landmarks.shape[2]}")
    n_qb = (tk - 1) // L - first + 1
    lm = landmarks.float()  # [B, Hkv, nb, D]
    q_off = torch.arange(off, tk, device=q.device) % L
    # the previous block's landmark sits at (L-1), the block's query t at (L-1) + t (module docstring)
    lm = _rotate(lm, position, torch.full((n_blocks,), L - 1, device=q.device))
    qr = _rotate(q.float(), position, q_off + (L - 1))
    g = hq // hk
    out = torch.full((b, hq, n_qb, n_blocks), -math.inf, device=q.device)
    if n_blocks == 0:
        return out
    # pad the queries to whole blocks (absolute alignment), then score in chunks of query blocks
    pad_front = off - first * L
    pad_back = n_qb * L - tq - pad_front
    qp = torch.nn.functional.pad(qr, (0, 0, pad_front, pad_back)).view(b, hk, g, n_qb, L, d)
    real = torch.ones(n_qb * L, dtype=torch.bool, device=q.device)
    real[:pad_front] = False
    if pad_back:
        real[-pad_back:] = False
    real = real.view(n_qb, L)
    per = max(1, MAX_ELEMENTS // max(1, b * hq * L * n_blocks))
    blocks = torch.arange(n_blocks, device=q.device)
    for c0 in range(0, n_qb, per):
        c1 = min(n_qb, c0 + per)
        s = torch.einsum("bhgcld,bhnd->bhgcln", qp[:, :, :, c0:c1], lm) * scale
        earlier = blocks[None, :] < (first + torch.arange(c0, c1, device=q.device))[:, None]  # [c, nb]
        s = s.masked_fill(~earlier[:, None, :], -math.inf)
        share = torch.log_softmax(s, dim=-1).nan_to_num(nan=-math.inf)  # rows with no earlier block: -inf
        share = share.masked_fill(~real[c0:c1, :, None], -math.inf)
        out[:, :, c0:c1] = share.amax(-2).reshape(b, hq, c1 - c0, n_blocks)
    return out


def select_landmark_blocks(scores: Tensor, *, first_block: int, top_k: int | None, local: int) -> Tensor:
    """The earlier blocks each query block keeps.

    Args:
        scores: ``[B, Hq, n_qb, n_blocks]`` from :func:`landmark_scores`.
        first_block: absolute index of query block 0.
        top_k: blocks kept per query block (None: every earlier block).
        local: the nearest earlier blocks always kept (within ``top_k``).

    Returns:
        int64 ``[B, Hq, n_qb, n]`` block indices in increasing order, ``-1`` (unused slots) first.
    """
    b, hq, n_qb, n_blocks = scores.shape
    dev = scores.device
    c_abs = first_block + torch.arange(n_qb, device=dev)  # [n_qb]
    blocks = torch.arange(n_blocks, device=dev)
    earlier = blocks[None, :] < c_abs[:, None]  # [n_qb, nb]
    n_earlier = int(earlier.sum(-1).max()) if n_blocks else 0
    n = n_earlier if top_k is None else min(top_k, n_earlier)
    if n == 0:
        return torch.empty(b, hq, n_qb, 0, dtype=torch.int64, device=dev)
    if top_k is None or top_k >= n_earlier:
        idx = torch.where(earlier, blocks[None, :], -1)[None, None].expand(b, hq, -1, -1)
    else:
        forced = earlier & (blocks[None, :] >= c_abs[:, None] - local)
        key = scores.masked_fill(~earlier[None, None], -math.inf)
        # forced blocks first (+inf), then by score; blocks with no score stay out (-inf)
        key = torch.where(forced[None, None], torch.full_like(key, math.inf), key)
        # ties (common: in a first layer every landmark key is the same token's) go to the later
        # block, by a stable sort over the blocks in reverse, so that the choice does not depend on
        # how many query blocks one call holds (topk's tie order does)
        values, order = key.flip(-1).sort(dim=-1, descending=True, stable=True)
        values, top = values[..., :n], n_blocks - 1 - order[..., :n]
        idx = torch.where(values > -math.inf, top, -1)
    idx = idx.sort(-1).values  # -1 first, then increasing
    return idx[..., idx.shape[-1] - n:].contiguous()


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, selection: Tensor, *, block: int, scale: float,
                      position=None, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The grouped softmax of each query over its own block and the kept earlier blocks.

    Args:
        q: ``[B, Hq, Tq, D]``, the last ``Tq`` of ``Tk`` positions (bottom-right aligned);
            k, v: ``[B, Hkv, Tk, D]``; q and k unrotated when ``position`` (a RoPE) is given.
        selection: int64 ``[B, Hq, n_qb, n]`` from :func:`select_landmark_blocks` (``-1`` first).
        key_padding_mask: bool ``[B, Tk]``, True = real key. A masked ordinary token leaves its
            block's softmax; a block whose landmark or every ordinary token is masked is not
            attended.

    Returns:
        ``out [B, Hq, Tq, D]`` (float32, or q's dtype if float64) and ``lse [B, Hq, Tq]``, the log of
        the direct softmax's normaliser ``D`` (the softmax LSE when there is one block); rows that
        see nothing: 0 and -inf. Differentiable in q, k, v.
    """
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    g = hq // hk
    L = block
    dev = q.device
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    off = tk - tq
    first = off // L
    n_qb = selection.shape[2]
    n = selection.shape[3]
    pad_front = off - first * L
    pad_back = n_qb * L - tq - pad_front
    qp = torch.nn.functional.pad(q.to(dt), (0, 0, pad_front, pad_back))
    outs, lses = [], []
    per = max(1, MAX_ELEMENTS // max(1, b * hq * L * (n + 1) * L))
    t_idx = torch.arange(L, device=dev)
    # a landmark shares the next token's position: slots are L-1 positions apart (module docstring)
    q_pos = n * (L - 1) + t_idx  # the own block after n slots
    own_k_pos = q_pos
    slot_pos = (torch.arange(n, device=dev)[:, None] * (L - 1) + t_idx).flatten()
    for c0 in range(0, n_qb, per):
        c1 = min(n_qb, c0 + per)
        G = c1 - c0
        c_abs = first + torch.arange(c0, c1, device=dev)  # [G]
        qc = qp[:, :, c0 * L:c1 * L].reshape(b, hq, G, L, d)
        # the own block's keys (positions past tk clamp to a real key and are hidden below)
        own_abs = c_abs[:, None] * L + t_idx  # [G, L]
        own_ok = own_abs < tk
        kv_idx = own_abs.clamp(max=tk - 1).flatten()
        k_own = k[:, :, kv_idx].to(dt).view(b, hk, 1, G, L, d)
        v_own = v[:, :, kv_idx].to(dt).view(b, hk, 1, G, L, d)
        q6 = _rotate(qc, position, q_pos).view(b, hk, g, G, L, d)
        k_own = _rotate(k_own, position, own_k_pos)
        s_own = torch.einsum("bhgcld,bhxcmd->bhgclm", q6, k_own) * scale  # [B, Hkv, g, G, L, L]
        vis_own = (t_idx[None, :] <= t_idx[:, None])[None] & own_ok[:, None, :]  # [G, L, L]
        vis_own = vis_own[None, None, None]
        if key_padding_mask is not None:
            vis_own = vis_own & key_padding_mask[:, kv_idx].view(b, 1, 1, G, 1, L)
        s_own = s_own.masked_fill(~vis_own, -math.inf)
        sel = selection[:, :, c0:c1]  # [B, Hq, G, n]
        if n:
            valid = sel >= 0
            pos = (sel.clamp_min(0)[..., None] * L + t_idx).flatten(-2)  # [B, Hq, G, n·L]
            rows = (torch.arange(b * hk, device=dev).view(b, hk).repeat_interleave(g, 1) * tk)[:, :, None, None] + pos
            ks = k.reshape(b * hk * tk, d)[rows.flatten()].to(dt).view(b, hq, G, n * L, d)
            vs = v.reshape(b * hk * tk, d)[rows.flatten()].to(dt).view(b, hq, G, n * L, d)
            ks = _rotate(ks, position, slot_pos)
            s = torch.einsum("bhcld,bhcmd->bhclm", q6.reshape(b, hq, G, L, d), ks) * scale
            s = s.view(b, hq, G, L, n, L)
            ok = valid[:, :, :, None, :, None].expand(-1, -1, -1, 1, -1, L)
            if key_padding_mask is not None:
                real = torch.gather(key_padding_mask[:, None, None, :].expand(b, hq, G, tk), 3, pos)
                ok = ok & real.view(b, hq, G, 1, n, L)
            s = s.masked_fill(~ok, -math.inf)
            ordinary, lm = s[..., :L - 1], s[..., L - 1]  # [.., L, n, L-1], [.., L, n]
            group_lse = torch.logsumexp(ordinary, dim=-1)  # [B, Hq, G, L, n]
            lm = lm.masked_fill(torch.isneginf(group_lse), -math.inf)  # an empty block takes no share
            s_own_h = s_own.reshape(b, hq, G, L, L)
            direct = torch.logsumexp(torch.cat([lm, s_own_h], dim=-1), dim=-1)  # [B, Hq, G, L]
            safe = direct.masked_fill(torch.isneginf(direct), 0.0)[..., None]
            gate = torch.exp(lm - safe)  # [.., L, n]
            inner = torch.exp(ordinary - group_lse.masked_fill(torch.isneginf(group_lse), 0.0)[..., None])
            w_sel = torch.nn.functional.pad(gate[..., None] * inner, (0, 1))  # landmark column 0
            w_own = torch.exp(s_own_h - safe)
            o = torch.einsum("bhclm,bhcmd->bhcld", w_sel.flatten(-2), vs)
            o = o + torch.einsum("bhclm,bhcmd->bhcld", w_own,
                                 v_own.expand(-1, -1, g, -1, -1, -1).reshape(b, hq, G, L, d))
        else:
            s_own_h = s_own.reshape(b, hq, G, L, L)
            direct = torch.logsumexp(s_own_h, dim=-1)
            safe = direct.masked_fill(torch.isneginf(direct), 0.0)[..., None]
            o = torch.einsum("bhclm,bhcmd->bhcld", torch.exp(s_own_h - safe),
                             v_own.expand(-1, -1, g, -1, -1, -1).reshape(b, hq, G, L, d))
        outs.append(o.reshape(b, hq, G * L, d))
        lses.append(direct.reshape(b, hq, G * L))
    out = torch.cat(outs, dim=2)[:, :, pad_front:pad_front + tq]
    lse = torch.cat(lses, dim=2)[:, :, pad_front:pad_front + tq]
    return out, lse.float()


def landmark_text_positions(index: Tensor, block: int) -> Tensor:
    """The rotary position of sequence index ``index`` in the landmark layout: its position in the
    text without landmarks, ``index - index // block`` (a landmark gets the next token's)."""
    return index - index // block


def grouped_reference(q: Tensor, k: Tensor, v: Tensor, *, block: int, scale: float,
                      blocks: Tensor | None = None) -> Tensor:
    """The paper's formula, one query at a time in float64 (tests; small inputs only).

    Args:
        q: ``[B, Hq, Tq, D]`` already rotated, the last ``Tq`` of ``Tk`` positions; k, v
            ``[B, Hkv, Tk, D]``.
        blocks: optional bool ``[B, Hq, Tq, n_blocks]``: the earlier blocks each query may use
            (default: every earlier block).

    Returns:
        float64 ``[B, Hq, Tq, D]``.
    """
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    g = hq // hk
    L = block
    off = tk - tq
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(b, hq, tq, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh, vh = k[bi, h // g], v[bi, h // g]
            for t in range(tq):
                i = off + t
                c = i // L
                s = (kh[: i + 1] @ q[bi, h, t]) * scale
                direct = list(range(c * L, i + 1))
                gated = [bb for bb in range(c) if blocks is None or bool(blocks[bi, h, t, bb])]
                direct_scores = torch.cat([s[direct], s[[bb * L + L - 1 for bb in gated]]])
                norm = torch.logsumexp(direct_scores, 0)
                o = torch.zeros(d, dtype=torch.float64)
                for j in direct:
                    o += torch.exp(s[j] - norm) * vh[j]
                for bb in gated:
                    members = list(range(bb * L, bb * L + L - 1))
                    inner = torch.softmax(s[members], 0)
                    o += torch.exp(s[bb * L + L - 1] - norm) * (inner @ vh[members])
                out[bi, h, t] = o
    return out
