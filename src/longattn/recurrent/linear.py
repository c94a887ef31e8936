"""Kernelised causal linear attention: Katharopoulos et al. 2020, "Transformers are RNNs: Fast
Autoregressive Transformers with Linear Attention", with the positive random features of
Choromanski et al. 2021, "Rethinking Attention with Performers" (FAVOR+).

Softmax's ``exp(q·k)`` is replaced by a kernel ``φ(q)·φ(k)`` with a feature map ``φ: R^Dk -> R^F``,
so causal attention becomes a recurrence over a state of fixed size::

    S_t = S_{t-1} + φ(k_t) v_tᵀ          S [F, Dv]
    z_t = z_{t-1} + φ(k_t)               z [F]
    o_t = φ(q_t)ᵀ S_t / (φ(q_t)ᵀ z_t + eps)     (normalize=True, the paper's form)
    o_t = φ(q_t)ᵀ S_t                           (normalize=False)

Feature maps (``feature_map=``), applied to ``scale · x``:

* ``"elu"``: ``elu(x) + 1`` (the paper's choice; ``F = Dk``),
* ``"relu"``: ``max(x, 0)`` (``F = Dk``),
* ``"identity"``: ``x`` (``F = Dk``; with ``normalize=True`` the denominator can cross zero),
* ``"performer"``: ``φ(x) = exp(W x - |x|²/2) / sqrt(m)`` with ``W [m, Dk]`` passed as
  ``features`` (draw one with :func:`performer_features`); ``F = m``. With rows of ``W`` drawn
  from N(0, I), ``E[φ(x)·φ(y)] = exp(x·y)``, so the default scale ``Dk^(-1/4)`` on both q and k gives
  ``φ(q)·φ(k) ≈ exp(q·k / sqrt(Dk))``, softmax attention's kernel. No stabilising max is
  subtracted: φ must be a fixed function of one token, or prefill in pieces would not compose.

Within one key/value head the state does not depend on the query head, so with grouped heads
(``Hkv < H``) the state is kept per key/value head: ``LinearState(s [B, Hkv, F, Dv], z [B, Hkv, F])``
(``Hkv = H`` without GQA), and :func:`linear_state_size` should be given ``Hkv``.

Compute dtype: float32 for float32 / bfloat16 / float16 inputs (state and output accumulate in
float32, the output is cast back to the input dtype); float64 inputs compute and keep their state in
float64 (for gradient checks). :func:`linear_attention_naive` always computes in float64 and
returns float64 output and state.

Two implementations of the chunked form give the same result up to float32 rounding: on the CPU,
for float32 / bfloat16 / float16 inputs and no gradient wanted (inference, prefill, benchmarks),
the native kernel :mod:`longattn.kernels.native_linear` (each sequence-head walked once with its
state in cache; elu / relu / identity maps applied in the kernel, Performer features mapped here
first); otherwise (autograd, float64, CUDA, a chunk over its limit, no C compiler) the torch form
below, whose backward autograd derives.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from longattn.core.validate import (
    FLOAT_DTYPES,
    check_choice,
    check_positive_int,
    check_scale,
    check_seed,
)
from longattn.kernels import native_linear
from longattn.recurrent import common
from longattn.recurrent.common import check_flag, check_nonneg, check_qkv, compute_dtype, initial_state_tuple

__all__ = [
    "FEATURE_MAPS",
    "LinearState",
    "linear_attention",
    "linear_attention_naive",
    "linear_attention_step",
    "linear_state_size",
    "performer_features",
]

#: the accepted ``feature_map`` names
FEATURE_MAPS = ("elu", "relu", "identity", "performer")


class LinearState(NamedTuple):
    """The recurrent state of linear attention (float32; float64 for float64 inputs and in the naive
    form).

    * ``s [B, Hkv, F, Dv]``: ``Σ φ(k_t) v_tᵀ``, the key-value memory;
    * ``z [B, Hkv, F]``: ``Σ φ(k_t)``, the normaliser's running sum (kept also when
      ``normalize=False`` so that a state serves either form).
    """

    s: torch.Tensor
    z: torch.Tensor


# -- feature maps ---------------------------------------------------------------------------


def performer_features(
    m: int,
    dk: int,
    seed: int = 0,
    *,
    orthogonal: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw the Performer projection ``W [m, dk]`` for ``feature_map="performer"``.

    ``orthogonal=False``: i.i.d. N(0, 1) entries. ``orthogonal=True`` (Choromanski et al. 2021,
    "orthogonal random features"): blocks of ``dk`` rows that are exactly orthogonal (QR of a
    Gaussian matrix, signs fixed so the block is Haar-distributed), each row rescaled to the norm
    of an independent Gaussian vector so every row is still marginally N(0, I); this keeps the
    estimator unbiased and lowers its variance. Drawn on the CPU with a ``torch.Generator`` seeded
    by ``seed`` (the same numbers on every device), then moved to ``device``.
    """
    m = check_positive_int("m", m)
    dk = check_positive_int("dk", dk)
    seed = check_seed("seed", seed)
    check_flag("orthogonal", orthogonal)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    if not orthogonal:
        w = torch.randn(m, dk, generator=g, dtype=torch.float64)
    else:
        blocks = []
        for _ in range(-(-m // dk)):
            gauss = torch.randn(dk, dk, generator=g, dtype=torch.float64)
            qmat, r = torch.linalg.qr(gauss)
            qmat = qmat * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
            blocks.append(qmat.T)  # rows orthonormal
        w = torch.cat(blocks, 0)[:m]
        norms = torch.randn(m, dk, generator=g, dtype=torch.float64).norm(dim=1, keepdim=True)
        w = w * norms
    return w.to(device=device, dtype=dtype)


def _resolve_feature_map(
    feature_map: object, features: object, scale: object, dk: int, device: torch.device
) -> tuple[str, torch.Tensor | None, float]:
    """Check ``feature_map`` / ``features`` / ``scale``; return the name, W and the scale."""
    name = check_choice("feature_map", feature_map, FEATURE_MAPS)
    if name == "performer":
        if features is None:
            raise ValueError(
                "feature_map='performer' needs features: the projection W [m, Dk] "
                "(draw one with performer_features(m, dk, seed))"
            )
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor [m, Dk], got {type(features).__name__}")
        if features.dim() != 2 or features.shape[1] != dk or features.shape[0] == 0:
            raise ValueError(f"features has shape {tuple(features.shape)}, expected [m, Dk] = [m >= 1, {dk}]")
        if features.dtype not in FLOAT_DTYPES:
            raise TypeError(f"features has dtype {features.dtype}; expected a floating dtype")
        if features.device != device:
            raise ValueError(f"features is on {features.device} but q is on {device}: they must match")
        default = dk**-0.25
    else:
        if features is not None:
            raise ValueError(f"features is used only by feature_map='performer', got it with feature_map={name!r}")
        default = 1.0
    s = default if scale is None else check_scale(scale, dk)  # type: ignore[arg-type]
    return name, (features if name == "performer" else None), s  # type: ignore[return-value]


def _feature_dim(name: str, features: torch.Tensor | None, dk: int) -> int:
    return features.shape[0] if features is not None and name == "performer" else dk


def _phi(x: torch.Tensor, name: str, features: torch.Tensor | None, scale: float) -> torch.Tensor:
    """The feature map on ``x [..., Dk]`` in ``x``'s dtype: ``[..., F]``."""
    if scale != 1.0:
        x = x * scale
    if name == "elu":
        return F.elu(x) + 1.0
    if name == "relu":
        return F.relu(x)
    if name == "identity":
        return x
    assert features is not None
    w = features.to(x.dtype)
    # a batched product (one matrix per leading index) rather than one GEMM over every row: a row's
    # rounding then does not depend on how many other rows share the call (batch invariance)
    wt = w.T.expand(*x.shape[:-2], *w.T.shape)
    proj = x @ wt - 0.5 * (x * x).sum(-1, keepdim=True)
    return torch.exp(proj) / math.sqrt(w.shape[0])


def _prepare(q, k, v, feature_map, features, scale, normalize, eps, initial_state, compute, state_name="initial_state"):
    """Shared checks and feature maps: returns ``φ(q) [B, Hkv, G, T, F]``, ``φ(k) [B, Hkv, T, F]``,
    ``v``, ``s0``, ``z0`` in ``compute`` dtype."""
    name, w, s, s0, z0 = _checked(q, k, v, feature_map, features, scale, normalize, eps, initial_state, compute,
                                  state_name)
    qg, kc, vc = _widen(q, k, v, compute)
    return _phi(qg, name, w, s), _phi(kc, name, w, s), vc, s0, z0


def _checked(q, k, v, feature_map, features, scale, normalize, eps, initial_state, compute,
             state_name="initial_state"):
    """Every argument check: returns the feature map's name, ``W`` (or None) and scale, and
    ``s0``, ``z0`` in ``compute`` dtype."""
    b, h, hkv, t, dk, dv = check_qkv(q, k, v)
    name, w, s = _resolve_feature_map(feature_map, features, scale, dk, q.device)
    check_flag("normalize", normalize)
    check_nonneg("eps", eps)
    f = _feature_dim(name, w, dk)
    s0, z0 = initial_state_tuple(
        state_name, initial_state, LinearState, {"s": (b, hkv, f, dv), "z": (b, hkv, f)}, q.device, compute,
        layouts={"s": "[batch, heads_kv, F, head_dim_v]", "z": "[batch, heads_kv, F]"},
    )
    return name, w, s, s0, z0


def _widen(q, k, v, compute):
    """``q [B, Hkv, G, T, Dk]`` (query heads grouped by their key/value head), ``k``, ``v`` in
    ``compute`` dtype."""
    b, h, t, dk = q.shape
    hkv = k.shape[1]
    return q.to(compute).reshape(b, hkv, h // hkv, t, dk), k.to(compute), v.to(compute)


# -- the three forms ------------------------------------------------------------------------


def _chunks(fq, fk, v, s0, z0, length, normalize, eps):
    """``N`` whole chunks of ``length`` tokens at once (``T = N · length``): per chunk the masked
    product ``(φ(Q) φ(K)ᵀ ⊙ M) V`` within it plus ``φ(Q) S`` from the state before it; the states
    before each chunk are a prefix sum (``cumsum``) over the chunks' ``φ(K)ᵀ V``.

    Normalised, the denominator rides along as one more value column: ``[V, 1]`` makes the same
    products give ``[numerator, φ(q)·z]`` and the states ``[S, z]``, so there is one prefix sum and
    one pass of each product instead of two (measured on the EPYC VM at 32k tokens: about 10%
    of the op's time)."""
    b, hkv, g, t, f = fq.shape
    dv = v.shape[-1]
    n = t // length
    fq = fq.reshape(b, hkv, g, n, length, f)
    fk = fk.reshape(b, hkv, n, length, f)
    v = v.reshape(b, hkv, n, length, dv)
    if normalize:
        v = torch.cat([v, v.new_ones(b, hkv, n, length, 1)], -1)
        s0 = torch.cat([s0, z0[..., None]], -1)
    kv = fk.transpose(-1, -2) @ v  # [B, Hkv, N, F, Dv(+1)]
    # states before chunk 0..N-1 and after the last: s0, s0+kv0, (s0+kv0)+kv1, ... in token order
    states = torch.cat([s0[:, :, None], kv], 2).cumsum(2)
    scores = fq @ fk[:, :, None].transpose(-1, -2)  # [B, Hkv, G, N, L, L], a fresh tensor: masked in place
    scores.tril_()
    num = fq @ states[:, :, None, :-1] + scores @ v[:, :, None]  # [B, Hkv, G, N, L, Dv(+1)]
    if normalize:
        out = num[..., :dv] / (num[..., dv:] + eps)
        return out.reshape(b, hkv, g, t, dv), states[:, :, -1, :, :dv], states[:, :, -1, :, dv]
    return num.reshape(b, hkv, g, t, dv), states[:, :, -1], z0 + fk.sum((2, 3))


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "elu",
    features: torch.Tensor | None = None,
    scale: float | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    chunk: int = 64,
    initial_state: LinearState | None = None,
) -> tuple[torch.Tensor, LinearState]:
    """Causal linear attention, chunked parallel form (Katharopoulos et al. 2020).

    Args:
        q: ``[B, H, T, Dk]``; k: ``[B, Hkv, T, Dk]``; v: ``[B, Hkv, T, Dv]`` (``H % Hkv == 0``).
        feature_map: ``"elu"`` (default), ``"relu"``, ``"identity"`` or ``"performer"``.
        features: the Performer projection ``W [m, Dk]`` (only with ``feature_map="performer"``).
        scale: multiplies q and k before the feature map; None: ``Dk^(-1/4)`` for ``"performer"``
            (so ``φ(q)·φ(k) ≈ exp(q·k/sqrt(Dk))``), 1 for the others.
        normalize: divide by ``φ(q_t)·z_t + eps`` (the paper's form) or not.
        eps: added to the denominator.
        chunk: tokens per chunk; the last chunk may be shorter. Any positive value gives the same
            result up to rounding.
        initial_state: a :class:`LinearState` (None: zeros).

    Returns:
        ``out [B, H, T, Dv]`` in q's dtype and the final :class:`LinearState`
        (``s [B, Hkv, F, Dv]``, ``z [B, Hkv, F]``; float32, float64 for float64 inputs).
    """
    chunk = check_positive_int("chunk", chunk)
    compute = compute_dtype(q.dtype) if isinstance(q, torch.Tensor) else torch.float32
    name, w, fscale, s0, z0 = _checked(q, k, v, feature_map, features, scale, normalize, eps, initial_state, compute)
    if native_linear.linear_chunked_applies(q, k, v, chunk, s0, z0, w):
        # the native kernel (longattn.kernels.native_linear): no gradient wanted, CPU, float32/16
        fq, fk, fmap = q, k, name
        if name == "performer":  # a projection and an exp per token: mapped here, passed as identity
            fq, fk, fmap, fscale = _phi(q.to(compute), name, w, fscale), _phi(k.to(compute), name, w, fscale), \
                "identity", 1.0
        out, s, z = native_linear.linear_chunked(fq, fk, v, s0, z0, chunk=chunk, feature_map=fmap,
                                                 feature_scale=fscale, normalize=normalize, eps=eps)
        return out.to(q.dtype), LinearState(s, z)
    qg, kc, vc = _widen(q, k, v, compute)
    b, hkv, g, t, _ = qg.shape
    s, z = s0, z0

    # φ maps one group of tokens at a time, while it is in cache (mapping all of a 32k-token input
    # at once cost a pass over memory per elementwise op, 35-70 ms each)
    def phi(x):
        return _phi(x, name, w, fscale)

    outs = []
    whole = (t // chunk) * chunk
    # whole chunks go GROUP_TOKENS at a time, mapped by φ there, the state carried between groups
    # (common.GROUP_TOKENS)
    step = max(1, common.GROUP_TOKENS // chunk) * chunk
    for a in range(0, whole, step):
        e = min(a + step, whole)
        o, s, z = _chunks(phi(qg[..., a:e, :]), phi(kc[..., a:e, :]), vc[..., a:e, :], s, z, chunk, normalize, eps)
        outs.append(o)
    if t > whole:
        o, s, z = _chunks(phi(qg[..., whole:, :]), phi(kc[..., whole:, :]), vc[..., whole:, :], s, z, t - whole,
                          normalize, eps)
        outs.append(o)
    out = torch.cat(outs, 3) if outs else qg.new_zeros(b, hkv, g, 0, vc.shape[-1])
    return out.reshape(b, hkv * g, t, vc.shape[-1]).to(q.dtype), LinearState(s, z)


def linear_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: str = "elu",
    features: torch.Tensor | None = None,
    scale: float | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: LinearState | None = None,
) -> tuple[torch.Tensor, LinearState]:
    """The specification: the recurrence one token at a time, in float64.

    Same arguments as :func:`linear_attention` (no ``chunk``). Returns ``out [B, H, T, Dv]`` and the
    final :class:`LinearState`, both float64.
    """
    fq, fk, v64, s, z = _prepare(q, k, v, feature_map, features, scale, normalize, eps, initial_state, torch.float64)
    b, hkv, g, t, _ = fq.shape
    outs = []
    for i in range(t):
        s = s + fk[:, :, i, :, None] * v64[:, :, i, None, :]  # S_t = S_{t-1} + φ(k_t) v_tᵀ
        z = z + fk[:, :, i]  # z_t = z_{t-1} + φ(k_t)
        qi = fq[:, :, :, i]  # [B, Hkv, G, F]
        o = torch.einsum("bhgf,bhfd->bhgd", qi, s)
        if normalize:
            o = o / (torch.einsum("bhgf,bhf->bhg", qi, z)[..., None] + eps)
        outs.append(o)
    out = torch.stack(outs, 3) if outs else fq.new_zeros(b, hkv, g, 0, v64.shape[-1])
    return out.reshape(b, hkv * g, t, v64.shape[-1]), LinearState(s, z)


def linear_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: LinearState | None,
    *,
    feature_map: str = "elu",
    features: torch.Tensor | None = None,
    scale: float | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, LinearState]:
    """One decoding step: ``q [B, H, 1, Dk]``, ``k [B, Hkv, 1, Dk]``, ``v [B, Hkv, 1, Dv]`` and the
    state (None: zeros) in; ``out [B, H, 1, Dv]`` (q's dtype) and the next :class:`LinearState` out."""
    check_qkv(q, k, v, step=True)
    fq, fk, vc, s, z = _prepare(
        q, k, v, feature_map, features, scale, normalize, eps, state, compute_dtype(q.dtype), state_name="state"
    )
    b, hkv, g, _, _ = fq.shape
    s = s + fk[:, :, 0, :, None] * vc[:, :, 0, None, :]
    z = z + fk[:, :, 0]
    qi = fq[:, :, :, 0]  # [B, Hkv, G, F]
    o = qi @ s  # [B, Hkv, G, Dv]
    if normalize:
        o = o / ((qi * z[:, :, None]).sum(-1, keepdim=True) + eps)
    return o.reshape(b, hkv * g, 1, vc.shape[-1]).to(q.dtype), LinearState(s, z)


def linear_state_size(heads: int, feature_dim: int, dv: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of :class:`LinearState` per sequence: ``heads · (F · Dv + F)`` elements of ``dtype``.

    ``heads`` is the number of key/value heads (the state is kept per key/value head)."""
    heads = check_positive_int("heads", heads)
    feature_dim = check_positive_int("feature_dim", feature_dim)
    dv = check_positive_int("dv", dv)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    itemsize = torch.empty((), dtype=dtype).element_size()
    return heads * (feature_dim * dv + feature_dim) * itemsize
