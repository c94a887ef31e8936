"""Native block-sparse prefill: every query block attends its selected key blocks read in place.

Why: ``longattn.sparse.kernel``'s batched path gathers each group's selected key blocks into
buffers and runs torch's CPU flash kernel over the copies, and computes each query block's
causal diagonal square whole. At 32k tokens and 10% density about 83% of its time was that
flash kernel over copies. ``sparse_prefill`` (``csrc/sparse_prefill.c``) walks the selected
blocks where they lie (any batch/head/token strides, last dimension contiguous), keeps the
online-softmax state in float32 per query tile, computes only the causal half of diagonal
chunks, and reads bfloat16 / float16 inputs as stored, each tensor in its own dtype (a float32
query over a half-precision cache reads the cache as it is; compute and results float32).

Semantics are those of ``sparse_attention`` (no key padding): query ``i`` sits at position
``i + Tk - Tq``; non-causal, a query block sees every key of its selected blocks; causal, it sees
the selected blocks that end before its *present start* ``ps = floor(max(first position, 0) /
block) · block`` and, per token, the present keys ``[ps, position]`` (which selectors force).

Build: the C source is compiled on first use by ``longattn.kernels.native._build`` (same cache
directory, compiler discovery and ``cc -O3 -march=native -fopenmp`` flags as the decode kernel,
its own ``sparse_prefill-<key>.so``); ``LONGATTN_NATIVE=0`` or a missing compiler leaves
``unavailable_reason()`` set and callers on their torch path.
"""

from __future__ import annotations

import ctypes
import math

import torch

from longattn.kernels import native

ABI_VERSION = 1
#: largest head_dim taken (per-thread scratch is about 2·TILE_Q·head_dim + 64·head_dim floats)
MAX_HEAD_DIM = 1024
#: queries per work item: a query block is cut into tiles of at most this many (the kernel's
#: column groups are 16 wide, so multiples of 16 waste nothing)
TILE_Q = 64
#: element type codes of the C ABI, shared with the decode kernel
DTYPE_CODES = native.DTYPE_CODES


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Check the ABI of a built ``sparse_prefill`` library and declare its signature."""
    if lib.sparse_prefill_abi_version() != ABI_VERSION:
        raise RuntimeError("the built sparse prefill kernel has an unexpected ABI version")
    fn = lib.sparse_prefill
    p, i = ctypes.c_void_p, ctypes.c_int64
    c_int = ctypes.c_int
    fn.argtypes = [p] * 6 + [i] * 19 + [ctypes.c_float, c_int, c_int, c_int, c_int, i, c_int]
    fn.restype = ctypes.c_int  # 0, or 1 when a thread's scratch could not be allocated
    lib.sparse_prefill_exp.argtypes = [p, p, i]  # the kernel's vectorised exp, for its accuracy test
    lib.sparse_prefill_exp.restype = None
    return lib


KERNEL = native.LazyKernel("sparse_prefill.c", "sparse_prefill", "sparse prefill", _bind)


def unavailable_reason() -> str | None:
    """None when the prefill kernel is built and loaded (building it on the first call), else why
    not."""
    return KERNEL.unavailable_reason()


def _last_dim_contiguous(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 or t.shape[-1] == 1


def sparse_prefill_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection, causal: bool,
                           key_padding_mask: torch.Tensor | None) -> bool:
    """Whether ``sparse_prefill`` takes these inputs (cheap checks only, no pass over data): CPU
    tensors, each float32, bfloat16 or float16 (they may differ), 4-d with matching shapes, last
    dimension contiguous, no autograd history wanted, no key padding, a selection laid out for
    ``Tq`` (``n_q_blocks = ceil(Tq / q_block)``) on the CPU, head_dim within ``MAX_HEAD_DIM``,
    non-empty, and the kernel built."""
    if key_padding_mask is not None:
        return False
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return False
    if not (q.device.type == k.device.type == v.device.type == "cpu" and q.dtype in DTYPE_CODES
            and k.dtype in DTYPE_CODES and v.dtype in DTYPE_CODES and q.dim() == k.dim() == v.dim() == 4):
        return False
    b, hq, tq, d = q.shape
    bk, hk, tk, dk = k.shape
    if (bk, dk) != (b, d) or tuple(v.shape) != tuple(k.shape) or hk == 0 or hq % hk or not 0 < d <= MAX_HEAD_DIM:
        return False
    if tq == 0 or b == 0 or hq == 0:
        return False
    if not all(_last_dim_contiguous(t) for t in (q, k, v)):
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    idx = getattr(selection, "indices", None)
    qbs, bs = getattr(selection, "q_block", 0), getattr(selection, "block", 0)
    if not isinstance(idx, torch.Tensor) or idx.device.type != "cpu" or idx.dim() != 4:
        return False
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        return False
    if not (isinstance(qbs, int) and isinstance(bs, int) and qbs > 0 and bs > 0):
        return False
    if tuple(idx.shape[:3]) != (b, hq, math.ceil(tq / qbs)):
        return False
    return unavailable_reason() is None


def sparse_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, selection, *, scale: float,
                   causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of each query block over its selected key blocks, read in place.

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]`` (``Hq % Hkv == 0``: query head ``h`` reads
            key-value head ``h // (Hq // Hkv)``); each float32, bfloat16 or float16, read as
            stored (dtypes may differ: a float32 query over a bfloat16 cache is the usual case);
            last dimension contiguous, any other strides (views into a larger cache are fine:
            only the selected rows are read).
        selection: a ``longattn.sparse.select.Selection``: ``indices [B, Hq, ceil(Tq / q_block),
            n_sel]`` integer key-block ids (block ``j`` holds keys ``[j·block, min((j+1)·block,
            Tk))``), ``-1`` for an unused slot; order is free, a repeated block counts twice.
        scale: score scale.
        causal: bottom-right aligned (query ``i`` at position ``i + Tk - Tq``); each query
            block then also attends its present keys (see the module docstring) and ignores
            selected blocks at or after its present start.

    Returns:
        ``out [B, Hq, Tq, D]`` and ``lse [B, Hq, Tq]``, float32 and contiguous. A row with no
        visible key gives 0 and ``-inf``; a NaN score or a non-finite value of a visible key
        makes the row NaN (as the float64 reference); hidden keys never reach a row.

    Raises:
        ValueError: naming the argument, what it got and what was expected.
        RuntimeError: the kernel is unavailable (see ``unavailable_reason``).
        MemoryError: a thread's scratch could not be allocated.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"sparse_prefill: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"sparse_prefill: {name} must be 4-d [B, H, T, D], got shape {tuple(t.shape)}")
        if t.device.type != "cpu":
            raise ValueError(f"sparse_prefill: {name} must be on the CPU, got device {t.device}")
        if t.dtype not in DTYPE_CODES:
            raise ValueError(f"sparse_prefill: {name} must be float32, bfloat16 or float16, got {t.dtype}")
        if not _last_dim_contiguous(t):
            raise ValueError(f"sparse_prefill: {name}'s last dimension must be contiguous (stride 1), got strides "
                             f"{t.stride()}")
    b, hq, tq, d = q.shape
    bk, hk, tk, dk = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"sparse_prefill: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if bk != b or dk != d:
        raise ValueError(f"sparse_prefill: k {tuple(k.shape)} does not fit q {tuple(q.shape)}: expected the same "
                         "batch and head_dim")
    if hk == 0 or hq % hk:
        raise ValueError(f"sparse_prefill: q's heads ({hq}) must be a multiple of k's heads ({hk})")
    if not 0 < d <= MAX_HEAD_DIM:
        raise ValueError(f"sparse_prefill: head_dim must be in 1..{MAX_HEAD_DIM}, got {d}")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise ValueError("sparse_prefill: q, k or v requires grad, but this kernel has no backward; run it under "
                         "torch.no_grad() or use the torch path (longattn.sparse.kernel.sparse_attention)")
    if isinstance(causal, bool) is False:
        raise ValueError(f"sparse_prefill: causal must be a bool, got {causal!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"sparse_prefill: scale must be a number (int or float), got {scale!r}")
    idx = getattr(selection, "indices", None)
    qbs, bs = getattr(selection, "q_block", None), getattr(selection, "block", None)
    if not isinstance(idx, torch.Tensor):
        raise ValueError(f"sparse_prefill: selection must be a Selection (indices, q_block, block), got "
                         f"{type(selection).__name__}")
    if not (isinstance(qbs, int) and qbs > 0 and isinstance(bs, int) and bs > 0):
        raise ValueError(f"sparse_prefill: selection.q_block and selection.block must be positive ints, got "
                         f"q_block={qbs!r}, block={bs!r}")
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"sparse_prefill: selection.indices must be an integer tensor, got {idx.dtype}")
    n_qb = math.ceil(tq / qbs)
    if idx.dim() != 4 or tuple(idx.shape[:3]) != (b, hq, n_qb):
        raise ValueError(f"sparse_prefill: selection.indices must be [B, Hq, ceil(Tq / q_block), n_sel] = "
                         f"[{b}, {hq}, {n_qb}, n_sel], got {tuple(idx.shape)}")
    if idx.device.type != "cpu":
        raise ValueError(f"sparse_prefill: selection.indices must be on the CPU, got device {idx.device}")
    n_blocks = math.ceil(tk / bs)
    sel = idx.to(torch.int64).contiguous()
    if sel.numel():
        lo, hi = int(sel.min()), int(sel.max())
        if lo < -1 or hi >= n_blocks:
            raise ValueError(f"sparse_prefill: selection.indices must lie in -1 (unused) .. {n_blocks - 1} "
                             f"(Tk={tk} keys in blocks of {bs}), got values in {lo} .. {hi}")
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the native sparse prefill kernel is unavailable: {reason}")
    out = torch.empty(b, hq, tq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, tq, dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    q_block = min(qbs, tq)  # one query block when q_block >= Tq: same layout, no empty tiles
    assert KERNEL.lib is not None
    failed = KERNEL.lib.sparse_prefill(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), sel.data_ptr(), out.data_ptr(), lse.data_ptr(),
        b, hq, hk, tq, tk, d, q_block, bs, n_qb, sel.shape[-1],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), float(scale), int(causal),
        DTYPE_CODES[q.dtype], DTYPE_CODES[k.dtype], DTYPE_CODES[v.dtype], min(TILE_Q, q_block),
        max(1, torch.get_num_threads()))
    if failed:
        raise MemoryError("the native sparse prefill kernel could not allocate its per-thread scratch "
                          f"(about {(2 * TILE_Q + 130) * d * 4} bytes)")
    return out, lse


def selection_visible_pairs(selection, tokens_q: int, tokens_k: int, causal: bool) -> float:
    """(query, key) pairs a selection attends, averaged over batch × query heads: what
    ``sparse_attention`` reports as ``SparseInfo.visible_pairs``, computed the batched path's way
    (the present keys' pairs summed once, the past blocks' keys × rows averaged over heads), so
    where that path applies the figure is identical to the bit; elsewhere it equals the
    per-query-block path's up to float rounding."""
    idx = selection.indices
    b, hq, n_qb, _ = idx.shape
    bs, qbs = selection.block, selection.q_block
    off = tokens_k - tokens_q
    dev = idx.device
    starts = torch.arange(n_qb, device=dev) * qbs
    rows = torch.clamp(tokens_q - starts, max=qbs).double()
    present = 0.0
    if causal:
        ps = torch.div(torch.clamp(starts + off, min=0), bs, rounding_mode="floor") * bs  # [n_qb]
        pos = torch.arange(tokens_q, device=dev) + off
        ps_row = ps[torch.div(torch.arange(tokens_q, device=dev), qbs, rounding_mode="floor")]
        present = float((pos - ps_row + 1).clamp(min=0).double().sum())
        keys = (((idx >= 0) & ((idx + 1) * bs <= ps.view(1, 1, n_qb, 1))).sum(-1) * bs).double()
    else:
        sizes = torch.clamp(tokens_k - idx.clamp_min(0) * bs, max=bs)
        keys = torch.where(idx >= 0, sizes, 0).sum(-1).double()
    return present + float((keys * rows).sum()) / (b * hq)
