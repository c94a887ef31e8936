"""NaN and Inf in attention inputs: never let them reach a query that may not see them.

Kernels hide keys by *adding* ``-inf`` to their scores, and ``NaN + (-inf)`` is NaN, ``0 · NaN``
is NaN: a NaN key that is padding, or an Inf key in the causal future, poisons rows that should
never see it (15 of 20 methods did, dense included). torch's fused CPU kernel also maps a NaN
query to a finite row. ``longattn.attention`` therefore screens its inputs once (a sum per
tensor, ``O(tokens × head_dim)``, against the kernel's ``O(tokens_q × tokens_k × head_dim)``) and,
only when something is not finite:

1. replaces every non-finite query row and key/value row by zeros, so no kernel or selector
   meets a NaN (selection is not steered by a garbage key either);
2. runs the method;
3. sets NaN (output and LSE) on exactly the rows IEEE arithmetic makes NaN in the float64
   reference: a row whose query is non-finite and that sees at least one key, and a row that may
   see a non-finite key or value by the method's pattern (causality, window, ...) and padding.

A call with fewer than ``EAGER_MIN_QUERIES`` queries (a decode step, which may read a few blocks
of a long cache) by a block method with the caller's block summaries (the keys checked through
them) does not read every key up front (``screen_before``): q is screened, the kernel runs, and
only when its result holds NaN/Inf (or an LSE of NaN/+inf) are k and v screened and the call
answered as above. An exact method's few-query call screens q and k first and only its values
through the result (``screen_keys_before``): torch's fused CPU kernel does not pass a bad *score*
on — a row whose every visible key scores NaN or ±inf comes back 0 with LSE 0, and a key scoring
+inf among finite ones gives a finite, wrong row — while a bad value always reaches the output
(``p · inf`` and ``0 · inf`` are not finite). NaN/Inf a query may not see still never reach it; what
a block decode step does not see is a bad value in a block it did not read.

"May see" is the method's pattern, not its content-based selection: an approximate method that
happened to skip the bad key still answers NaN there, as its exact counterpart would. The rule is
IEEE's in every case but one: an infinite key whose score is exactly ``-inf`` next to finite keys
gets weight 0 in exact arithmetic; longattn answers NaN there too (the key is garbage either way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from longattn.core.masks import Mask

#: (query rows × bad keys) evaluated at once when locating the rows a bad key reaches
_PAIRS_PER_STEP = 1 << 24
#: calls with at least this many queries screen k and v before the kernel; fewer (decoding) check
#: the result instead. Screening reads every key once: next to a prefill kernel that is nothing,
#: next to a sparse decode step that reads 2k of 128k keys it was 4x the step (0.73 -> 4.2 ms).
EAGER_MIN_QUERIES = 16


def all_finite(*tensors: torch.Tensor) -> bool:
    """True when every element of every tensor is finite. One reduction per tensor and one
    answer for all (a single host sync on a GPU, where each ``bool()`` waits for the device): a
    NaN or ±Inf anywhere makes the total non-finite; a finite total that overflows (or two
    infinite sums that cancel to NaN) only sends the caller to the exact check."""
    sums = [t.sum(dtype=torch.float32) for t in tensors if t.numel()]
    return not sums or bool(torch.isfinite(torch.stack(sums).sum()))


@dataclass
class NonFinite:
    """Where the non-finite values of one call are.

    Attributes:
        bad_q: bool ``[B, Hq, Tq]``, query rows with a NaN/Inf element.
        bad_kv: bool ``[B, Hkv, Tk]``, key positions whose key or value has a NaN/Inf element.
    """

    bad_q: torch.Tensor
    bad_kv: torch.Tensor

    def cleaned(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """``q, k, v`` with the non-finite rows replaced by zeros (new tensors where changed)."""
        if bool(self.bad_q.any()):
            q = q.masked_fill(self.bad_q[..., None], 0.0)
        if bool(self.bad_kv.any()):
            k = k.masked_fill(self.bad_kv[..., None], 0.0)
            v = v.masked_fill(self.bad_kv[..., None], 0.0)
        return q, k, v

    def poisoned_rows(self, tokens_q: int, mask: Mask | None, key_padding_mask: torch.Tensor | None,
                      lse: torch.Tensor | None) -> torch.Tensor:
        """bool ``[B, Hq, Tq]``: the rows the float64 reference makes NaN.

        Args:
            mask: the method's pattern (``Method.visible_mask``), causality included; None = all keys.
            key_padding_mask: bool ``[B, Tk]`` (True = real key) or None.
            lse: the run's ``[B, Hq, Tq]`` LSE (``-inf`` = the row saw no key), or None.
        """
        b, hq, tq = self.bad_q.shape
        hk, tk = self.bad_kv.shape[1:]
        # a non-finite query poisons its row unless the row sees nothing at all
        rows = self.bad_q & (lse != -math.inf) if lse is not None else self.bad_q.clone()
        cols = self.bad_kv.any(1).any(0).nonzero().flatten()  # key positions bad in some row / head
        if cols.numel() == 0:
            return rows
        dev = self.bad_kv.device
        b_idx = torch.arange(b, device=dev).view(b, 1, 1, 1)
        h_idx = torch.arange(hq, device=dev).view(1, hq, 1, 1)
        q_pos = (torch.arange(tq, device=dev) + (tk - tq)).view(tq, 1)
        step = max(1, _PAIRS_PER_STEP // max(1, b * hq * tq))
        for c in range(0, cols.numel(), step):
            j = cols[c : c + step]
            # bad at (row b, query head h) reads key-value head h // group
            hit = self.bad_kv[:, :, j].repeat_interleave(hq // hk, dim=1)[:, :, None, :]  # [B, Hq, 1, n]
            if key_padding_mask is not None:
                hit = hit & key_padding_mask[:, j][:, None, None, :]
            if mask is not None:
                hit = hit & mask.mask_mod(b_idx, h_idx, q_pos, j.view(1, -1))
            rows |= hit.any(-1).expand(b, hq, tq)
        return rows

    def apply(self, out: torch.Tensor, lse: torch.Tensor | None, mask: Mask | None,
              key_padding_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``out [B, Hq, Tq, D]`` and ``lse`` with NaN on the poisoned rows (``poisoned_rows``)."""
        rows = self.poisoned_rows(out.shape[2], mask, key_padding_mask, lse)
        if not bool(rows.any()):
            return out, lse
        out = out.masked_fill(rows[..., None], math.nan)
        if lse is not None:
            lse = lse.masked_fill(rows, math.nan)
        return out, lse


def screen_before(tokens_q: int, exact: bool, summaries) -> bool:
    """Whether keys and values are screened before the kernel runs.

    Always for ``tokens_q >= EAGER_MIN_QUERIES``. Fewer queries check the result instead where
    that is safe: an exact method's kernel reads every key a query may see (a NaN/Inf there shows
    in its result), and a block method's decode step with the caller's ``BlockSummaries`` has
    every key checked through them (their per-block key sums are finite only if every key is),
    leaving only the values of blocks it does not read unseen. Any other few-query call (a
    selection computed from raw keys may drop a NaN key instead of propagating it) screens first.
    """
    if tokens_q >= EAGER_MIN_QUERIES:
        return True
    if exact:
        return False
    from longattn.sparse.summaries import BlockSummaries

    return not (isinstance(summaries, BlockSummaries) and summaries.keys_finite)


def screen_keys_before(tokens_q: int, exact: bool, summaries) -> bool:
    """Whether a call that does not screen everything first (``screen_before`` False) screens its
    keys first: an exact method's few-query call does (its kernel can turn a NaN/Inf score into a
    finite row, see the module docstring), a block decode step whose summaries vouch for every key
    does not."""
    return not screen_before(tokens_q, exact, summaries) and exact


def result_finite(out: torch.Tensor, lse: torch.Tensor | None) -> bool:
    """True when a kernel's result shows no NaN/Inf reached it: ``out`` finite and the LSE finite
    or ``-inf`` (a row that saw no key) — O(output), whatever the number of keys."""
    if lse is None or lse.numel() == 0:
        return all_finite(out)
    # one reduction for both: clamping maps the LSE's -inf (a row that saw nothing) to 0 and
    # keeps NaN and +inf, which a kernel gives only after meeting NaN/Inf
    return bool(torch.isfinite(out.sum() + lse.clamp_min(0).sum()))


def visible_key_columns(mask: Mask | None, batch: int, heads: int, tokens_q: int, tokens_k: int,
                        device=None) -> torch.Tensor | None:
    """The keys some query of a few-query call may see under ``mask``: bool ``[Tk]``, or None when
    that is every key (or there is no mask). ``O(batch · heads · tokens_q · tokens_k)`` booleans:
    for the few queries of a decode step, far less than reading the keys."""
    if mask is None:
        return None
    cols = mask.dense(batch, heads, tokens_q, tokens_k, device=device).any(dim=(0, 1, 2))
    return None if bool(cols.all()) else cols


def find(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, keys: bool = True,
         values: bool | None = None, key_columns: torch.Tensor | None = None) -> NonFinite | None:
    """None when ``q, k, v`` (``[B, H, T, D]``) are all finite, else where they are not. With
    ``keys=False`` only ``q`` is checked (a finite ``q`` gives None without reading k or v); with
    ``values=False`` (default: as ``keys``) q and k are (a finite pair gives None without reading v);
    ``key_columns`` (bool ``[Tk]``) limits that first check of k to those keys (the ones the call's
    queries may see: a streaming decode step reads its sinks and window, not the whole cache)."""
    k_checked = k if key_columns is None else k[:, :, key_columns]
    checked = [q] + ([k_checked] if keys else []) + ([v] if (keys if values is None else values) else [])
    if all_finite(*checked):
        return None
    bad_q = ~torch.isfinite(q).all(-1)
    bad_kv = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))
    if not (bool(bad_q.any()) or bool(bad_kv.any())):
        return None  # the sums overflowed, every element is finite
    return NonFinite(bad_q, bad_kv)
