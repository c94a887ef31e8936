"""Native chunked linear attention (with an optional per-head decay): the forward pass of
``longattn.recurrent.linear_attention`` and ``lightning_attention`` when no gradient is wanted.

Why: the torch chunked form runs each chunk's four small products (``Q Sᵀ``, ``Q Kᵀ``, ``P V``,
``Kᵀ V``) as batched GEMMs over a group of chunks, with the masks, decays, feature maps and the
prefix of states as separate passes over tensors of tens of MB at 32k tokens. ``linear_chunked``
(``csrc/linear_chunked.c``) walks each (batch, state head)'s sequence once, chunk by chunk, with
the state, the chunk's operands and its scores in per-thread scratch that stays in cache, and
computes only the causal half of ``Q Kᵀ`` and ``P V``. Measured on the 2-core AMD EPYC VM
(32k tokens, 8 heads, head_dim 64, float32): see ``docs/results.md`` (recurrent suite, prefill).

Semantics are the ops' own (see ``csrc/linear_chunked.c`` for the recurrence); the results equal
the torch chunked form up to float32 rounding (tested against it and against the float64 naive
recurrence). Inputs are read as stored (float32, bfloat16 or float16, any batch/head/token
strides, last dimension contiguous); compute, state and output are float32.

Build: compiled on first use by ``longattn.kernels.native`` (same cache folder, compiler discovery
and ``cc -O3 -march=native -fopenmp`` flags, its own ``linear_chunked-<key>.so``);
``LONGATTN_NATIVE=0`` or a missing compiler leaves ``unavailable_reason()`` set and the ops on
their torch form.
"""

from __future__ import annotations

import ctypes

import torch

from longattn.kernels import native

ABI_VERSION = 1
#: largest chunk taken: per-thread scratch holds about 3·chunk² + 4·chunk·dim floats
MAX_CHUNK = 256
#: largest feature / value dimension taken
MAX_DIM = 1024
#: the feature maps the kernel applies itself, and their code in the C ABI
FEATURE_MAP_CODES = {"identity": 0, "elu": 1, "relu": 2}
DTYPE_CODES = native.DTYPE_CODES


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Check the ABI of a built ``linear_chunked`` library and declare its signature."""
    if lib.linear_chunked_abi_version() != ABI_VERSION:
        raise RuntimeError("the built linear attention kernel has an unexpected ABI version")
    fn = lib.linear_chunked
    p, i, c_int, c_float = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    fn.argtypes = ([p] * 10 + [i] * 17 + [c_int] * 4 + [c_float, c_int, c_float, c_int, c_float, c_int])
    fn.restype = c_int  # 0, or 1 when a thread's scratch could not be allocated
    return lib


KERNEL = native.LazyKernel("linear_chunked.c", "linear_chunked", "linear attention", _bind)


def unavailable_reason() -> str | None:
    """None when the kernel is built and loaded (building it on the first call), else why not."""
    return KERNEL.unavailable_reason()


def _wants_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def linear_chunked_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int,
                           *others: torch.Tensor | None) -> bool:
    """Whether :func:`linear_chunked` takes these inputs (cheap checks, no pass over data): CPU
    tensors, q, k and v float32, bfloat16 or float16, at least one token, ``chunk`` and the feature
    and value dims within the kernel's limits, no autograd history wanted of q, k, v or ``others``
    (initial state, decays, norm weight), and the kernel built."""
    tensors = (q, k, v, *(t for t in others if t is not None))
    if not all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors):
        return False
    if not all(t.dtype in DTYPE_CODES for t in (q, k, v)) or q.dim() != 4:
        return False
    if q.shape[2] == 0 or q.shape[0] == 0 or q.shape[1] == 0 or not 0 < chunk <= MAX_CHUNK:
        return False
    if not (0 < q.shape[-1] <= MAX_DIM and 0 < v.shape[-1] <= MAX_DIM):
        return False
    if _wants_grad(*tensors):
        return False
    return unavailable_reason() is None


def _float32(name: str, t: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    if t is None:
        return None
    if tuple(t.shape) != shape:
        raise ValueError(f"linear_chunked: {name} must have shape {shape}, got {tuple(t.shape)}")
    return t.detach().to(torch.float32).contiguous()


def linear_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s0: torch.Tensor, z0: torch.Tensor | None,
                   *, chunk: int, feature_map: str = "identity", feature_scale: float = 1.0,
                   normalize: bool = False, eps: float = 1e-6, log_decay: torch.Tensor | None = None,
                   rms_norm: bool = False, norm_weight: torch.Tensor | None = None,
                   norm_eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Chunked causal linear attention, forward, in one native call.

    Args:
        q: ``[B, H, T, F]``; k: ``[B, Hkv, T, F]``; v: ``[B, Hkv, T, Dv]``: float32, bfloat16 or
            float16 each, read as stored (the feature map is applied by the kernel).
        s0: the initial state ``[B, Hs, F, Dv]``: ``Hs`` state heads (``H % Hs == 0``, ``Hs % Hkv
            == 0``): linear attention keeps one per key/value head, Lightning one per query head.
        z0: the normaliser's initial sum ``[B, Hs, F]``, or None (no normaliser tracked).
        chunk: tokens per chunk (``1 .. MAX_CHUNK``).
        feature_map: ``"identity"``, ``"elu"`` (``elu(x) + 1``) or ``"relu"``, applied to
            ``feature_scale · x`` of q and k.
        normalize: divide by ``φ(q)·z + eps`` (needs ``z0``).
        log_decay: ``log λ [Hs]`` (``<= 0``), or None (no decay).
        rms_norm, norm_weight, norm_eps: RMSNorm of each output row over ``Dv`` with gain
            ``[Dv]`` (None: 1), after the normaliser.

    Returns:
        ``out [B, H, T, Dv]``, the final ``s [B, Hs, F, Dv]`` and ``z [B, Hs, F]`` (None without
        ``z0``), float32 and contiguous.

    Raises:
        ValueError: shapes or options that do not fit, naming the argument.
        RuntimeError: the kernel is unavailable (see ``unavailable_reason``).
        MemoryError: a thread's scratch could not be allocated.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.device.type != "cpu" or t.dtype not in DTYPE_CODES:
            raise ValueError(f"linear_chunked: {name} must be a 4-d CPU tensor of float32, bfloat16 or float16, got "
                             f"{getattr(t, 'shape', type(t).__name__)} {getattr(t, 'dtype', '')}")
    b, h, t, f = q.shape
    bk, hkv, tk, fk = k.shape
    dv = v.shape[-1]
    if (bk, tk, fk) != (b, t, f) or tuple(v.shape[:3]) != (b, hkv, t):
        raise ValueError(f"linear_chunked: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} do not fit "
                         "([B, H, T, F], [B, Hkv, T, F], [B, Hkv, T, Dv])")
    if not isinstance(s0, torch.Tensor) or s0.dim() != 4:
        raise ValueError(f"linear_chunked: s0 must be a tensor [B, Hs, F, Dv], got {type(s0).__name__}")
    hs = s0.shape[1]
    if hkv == 0 or hs == 0 or h % hs or hs % hkv:
        raise ValueError(f"linear_chunked: heads must nest: H={h} a multiple of Hs={hs}, Hs a multiple of Hkv={hkv}")
    if not isinstance(chunk, int) or not 0 < chunk <= MAX_CHUNK:
        raise ValueError(f"linear_chunked: chunk must be an int in 1..{MAX_CHUNK}, got {chunk!r}")
    if not (0 < f <= MAX_DIM and 0 < dv <= MAX_DIM):
        raise ValueError(f"linear_chunked: feature and value dims must be in 1..{MAX_DIM}, got {f} and {dv}")
    if feature_map not in FEATURE_MAP_CODES:
        raise ValueError(f"linear_chunked: feature_map must be one of {sorted(FEATURE_MAP_CODES)}, got {feature_map!r}")
    if normalize and z0 is None:
        raise ValueError("linear_chunked: normalize=True needs z0, the normaliser's initial sum")
    if _wants_grad(q, k, v, s0, z0, log_decay, norm_weight):
        raise ValueError("linear_chunked: an input requires grad, but this kernel has no backward; use the torch "
                         "form (run under torch.no_grad() to take this one)")
    s0 = _float32("s0", s0, (b, hs, f, dv))
    z0 = _float32("z0", z0, (b, hs, f))
    log_decay = _float32("log_decay", log_decay, (hs,))
    norm_weight = _float32("norm_weight", norm_weight, (dv,))
    q, k, v = (x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous() for x in (q, k, v))
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the native linear attention kernel is unavailable: {reason}")
    out = torch.empty(b, h, t, dv, dtype=torch.float32)
    s = torch.empty(b, hs, f, dv, dtype=torch.float32)
    z = torch.empty(b, hs, f, dtype=torch.float32) if z0 is not None else None
    if t == 0 or b == 0 or h == 0:
        s.copy_(s0)
        if z is not None:
            z.copy_(z0)
        return out, s, z

    def ptr(x: torch.Tensor | None) -> int | None:
        return None if x is None else x.data_ptr()

    threads = max(1, min(torch.get_num_threads(), b * hs))
    assert KERNEL.lib is not None
    failed = KERNEL.lib.linear_chunked(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), s0.data_ptr(), ptr(z0), ptr(log_decay), ptr(norm_weight),
        out.data_ptr(), s.data_ptr(), ptr(z), b, h, hs, hkv, t, f, dv, chunk,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), DTYPE_CODES[q.dtype], DTYPE_CODES[k.dtype], DTYPE_CODES[v.dtype],
        FEATURE_MAP_CODES[feature_map], float(feature_scale), int(bool(normalize)), float(eps), int(bool(rms_norm)),
        float(norm_eps), threads)
    if failed:
        c = min(chunk, t)
        raise MemoryError(f"the native linear attention kernel could not allocate its per-thread scratch (about "
                          f"{(3 * c * c + 4 * c * max(f, dv + 1)) * 4} bytes)")
    return out, s, z
