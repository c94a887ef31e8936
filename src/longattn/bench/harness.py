"""The benchmark harness every suite builds on.

* ``time_call``: warm-up calls, then timed repeats; reports the median with its spread (min, max)
  and every sample. It measures, it never asserts a speed.
* ``PeakRSS`` / ``peak_memory``: peak extra memory of one call, from a background thread that
  reads this process's resident set size (``/proc/self/statm``) about every millisecond. It is
  RSS-based and therefore approximate: allocations shorter than the sampling interval can be
  missed, memory the allocator keeps cached from earlier calls is not seen again (``malloc_trim``
  before the call reduces this on glibc), and anything else the process does at the same time is
  counted.
* ``check_exact``: the correctness gate. It draws a seeded sample of query rows, computes the
  float64 reference for those rows only (the method's own visible mask evaluated at their
  positions, never an ``N × N`` tensor) and compares them with the method's output rows.
* ``attention_flops``: ``4 · visible pairs · head_dim · heads · batch`` from the exact masked area.
* ``efficiency_length``: the crossover with dense, from ratios measured at several lengths.
* ``run_attention_case``: one benchmark case (first call with stats, gate, timing, memory,
  FLOPs); every failure is recorded in the returned dict, never raised.
* ``machine_info``: what the numbers were measured on.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import longattn
from longattn.core import dtypes
from longattn.core.masks import Causal, Mask
from longattn.kernels.layout import dense_pairs
from longattn.methods.base import Method, resolve

#: default tolerances of the gate for float32 outputs
ATOL = 1e-4
RTOL = 1e-3
LSE_ATOL = 1e-3

#: the device the benchmark's inputs live on (``longattn bench --device``; ``use_device``)
DEVICE = torch.device("cpu")


def use_device(device: str | torch.device) -> torch.device:
    """Make ``device`` the benchmark's: inputs are drawn on the CPU (seeded generators) and moved
    there, timings synchronise it, peak memory is the device allocator's on CUDA (RSS growth on the
    CPU). A device torch cannot use is refused here, before any work."""
    global DEVICE
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available to this torch ({torch.__version__})")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda (optionally cuda:N), got {device!r}")
    DEVICE = dev
    return dev


def on_device(*tensors: torch.Tensor):
    """``tensors`` moved to the benchmark's device (a tuple; one tensor for one argument)."""
    moved = tuple(t.to(DEVICE) for t in tensors)
    return moved[0] if len(moved) == 1 else moved


#: dtypes the suites run (``--dtypes``); the names records carry
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtypes(names) -> tuple[str, ...]:
    """Validate a suite's ``dtypes`` option (names of ``DTYPES``)."""
    names = tuple(dict.fromkeys(names))
    bad = [n for n in names if n not in DTYPES]
    if not names or bad:
        raise ValueError(f"dtypes must be a non-empty list of {', '.join(DTYPES)}, got {list(names)}")
    return names


def half_atol(atol: float, ref: torch.Tensor, dtype: torch.dtype | str) -> float:
    """``atol`` for an output of ``dtype`` against the exact ``ref``: for bf16/fp16 at least twice
    the error of rounding the exact answer itself to ``dtype`` (half its spacing at the largest
    ``|ref|``), plus 1e-5 — no kernel can beat that rounding, and a method on another mask than
    SDPA's has outputs of another size, so SDPA's error alone is not its yardstick."""
    dt = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if dt not in (torch.bfloat16, torch.float16) or not ref.numel():
        return atol
    return max(atol, 2 * float(ref.abs().max()) * torch.finfo(dt).eps / 2 + 1e-5)


def half_gate_tolerance(baseline_gate: dict[str, Any] | None) -> tuple[float, float]:
    """``(atol, rtol)`` of the gate for a half-precision case: flash attention's own rule, at most
    twice torch SDPA's error in the same dtype (its gate record in the same run) plus 1e-5."""
    g = baseline_gate or {}
    if g.get("max_abs_err") is None or g.get("rel_err") is None:
        return 5e-2, 5e-2  # no baseline figure: bf16's own resolution is ~4e-3
    return 2 * g["max_abs_err"] + 1e-5, 2 * g["rel_err"] + 1e-5


# -- timing ----------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock samples of a call, in seconds."""

    median_s: float
    min_s: float
    max_s: float
    samples: list[float]
    warmup_s: list[float] = field(default_factory=list)
    #: peak RSS growth during the first timed sample (bytes), when ``time_call(track_memory=True)``
    peak_mem_bytes: int | None = None
    #: CPU seconds this process used over the timed samples (all threads); compare with
    #: ``sum(samples) × threads`` to spot a machine shared with other work
    cpu_s: float | None = None

    @property
    def spread_s(self) -> float:
        return self.max_s - self.min_s

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spread_s"] = self.spread_s
        return d


def time_call(
    fn: Callable[[], Any],
    warmup: int = 1,
    repeats: int = 3,
    max_seconds: float | None = None,
    *,
    track_memory: bool = False,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed-for-the-result calls, then up to ``repeats`` timed calls.

    Args:
        warmup: calls made first and reported in ``warmup_s`` but not in the statistics (they
            absorb compilation, caches and lazy initialisation).
        repeats: timed calls wanted; at least one is always made.
        max_seconds: a budget: once warm-up plus timed calls have taken this long, no further
            repeat is started (so a slow case gets fewer samples rather than a long stall).
        track_memory: sample RSS during the first timed call (after returning the allocator's
            free memory to the system, see ``PeakRSS``) and report its growth; the page faults
            this costs land in that one sample only.

    Returns:
        a ``Timing`` with the median, min, max and every sample. Never asserts anything about speed.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    user_fn = fn
    if DEVICE.type == "cuda":
        def fn():  # kernels run asynchronously on a GPU: a sample ends when they are done
            torch.cuda.synchronize(DEVICE)
            out = user_fn()
            torch.cuda.synchronize(DEVICE)
            return out
    spent = 0.0
    warm = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        warm.append(dt)
        spent += dt
    samples: list[float] = []
    peak: int | None = None
    cpu0 = time.process_time()
    for i in range(repeats):
        if samples and max_seconds is not None and spent >= max_seconds:
            break
        if track_memory and i == 0 and DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats(DEVICE)
            base = torch.cuda.memory_allocated(DEVICE)
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated(DEVICE) - base
        elif track_memory and i == 0:
            with PeakRSS(trim=True) as mem:
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
            peak = mem.peak_bytes
        else:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        samples.append(dt)
        spent += dt
    cpu = time.process_time() - cpu0
    return Timing(
        median_s=statistics.median(samples), min_s=min(samples), max_s=max(samples),
        samples=samples, warmup_s=warm, peak_mem_bytes=peak, cpu_s=cpu,
    )


# -- memory ----------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int | None:
    """Resident set size of this process in bytes (Linux ``/proc/self/statm``), or None."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class PeakRSS:
    """Context manager: ``peak_bytes`` = highest RSS seen inside the block minus RSS on entry.

    A daemon thread reads ``/proc/self/statm`` every ``interval`` seconds (default 1 ms). The
    figure is approximate (see the module docstring) and None where ``/proc`` is unavailable.
    With ``trim=True`` glibc's ``malloc_trim(0)`` first hands freed heap memory back to the
    system, so memory the call reuses from earlier calls is counted again (where glibc exists).
    """

    def __init__(self, interval: float = 0.001, trim: bool = False):
        self.interval = interval
        self.trim = trim
        self.peak_bytes: int | None = None
        self._base: int | None = None
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None

    def _read(self) -> int | None:
        if self._fd is None:
            return None
        try:
            return int(os.pread(self._fd, 128, 0).split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):
            return None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self._read()
            if rss is not None and rss > self._peak:
                self._peak = rss

    def __enter__(self) -> PeakRSS:
        if self.trim:
            _malloc_trim()
        try:
            self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._fd = None
        self._base = self._read()
        if self._base is not None:
            self._peak = self._base
            self._thread = threading.Thread(target=self._loop, name="longattn-peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        last = self._read()
        if last is not None:
            self._peak = max(self._peak, last)
        if self._base is not None:
            self.peak_bytes = max(self._peak - self._base, 0)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _malloc_trim() -> None:
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - probe
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def peak_memory(fn: Callable[[], Any], *, trim: bool = True) -> tuple[Any, int | None]:
    """``(fn(), peak RSS growth in bytes during the call)``; RSS-based and approximate."""
    with PeakRSS(trim=trim) as mem:
        result = fn()
    return result, mem.peak_bytes


# -- correctness gate ------------------------------------------------------------------------


@dataclass
class GateResult:
    """Outcome of the correctness gate on a sample of query rows."""

    passed: bool
    max_abs_err: float
    rel_err: float
    lse_max_err: float | None
    rows: int
    atol: float
    rtol: float
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_rows(tokens_q: int, n_rows: int, seed: int) -> torch.Tensor:
    """A sorted, seeded sample of ``min(n_rows, tokens_q)`` distinct query indices."""
    if tokens_q <= n_rows:
        return torch.arange(tokens_q)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(tokens_q, generator=g)[:n_rows].sort().values


def rows_mask(mask: Mask | None, batch: int, heads: int, rows: torch.Tensor, tokens_q: int,
              tokens_k: int, device=None) -> torch.Tensor | None:
    """The bool mask ``[batch|1, heads|1, len(rows), tokens_k]`` of the given query rows only."""
    if mask is None:
        return None
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, heads, 1, 1)
    q_pos = (rows.to(device) + (tokens_k - tokens_q)).view(-1, 1)
    k_pos = torch.arange(tokens_k, device=device).view(1, -1)
    allowed = mask.mask_mod(b, h, q_pos, k_pos).to(torch.bool)
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    return allowed


def check_rows(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: Mask | None,
    rows: torch.Tensor,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    atol: float = ATOL,
    rtol: float = RTOL,
    lse_atol: float = LSE_ATOL,
) -> GateResult:
    """Compare ``out[:, :, rows]`` (and ``lse[:, :, rows]`` when given) with the float64 reference
    over ``mask`` (a ``Mask`` with causality included, or None for every key).

    Passes when every compared value is finite, the max abs error is ``<= atol``, the relative
    error ``‖out - ref‖ / ‖ref‖`` is ``<= rtol`` and, with an LSE, its max abs error is
    ``<= lse_atol`` (rows with no visible key must give ``-inf`` there).
    """
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    rows = rows.to(torch.long)
    allowed = rows_mask(mask, b, hq, rows, tq, tk, q.device)
    ref, ref_lse = longattn.reference_attention(q[:, :, rows], k, v, causal=False, mask=allowed, scale=scale)
    atol = half_atol(atol, ref, out.dtype)
    got = out[:, :, rows].to(torch.float64)
    diff = got - ref
    finite = bool(torch.isfinite(got).all())
    max_abs = float(diff.abs().max()) if finite and diff.numel() else (0.0 if finite else math.inf)
    ref_norm = float(ref.norm())
    rel = float(diff.norm()) / ref_norm if ref_norm > 0 else (0.0 if max_abs == 0 else math.inf)
    if not finite:
        rel = math.inf
    lse_err = None
    if lse is not None:
        got_lse = lse[:, :, rows].to(torch.float64)
        ref_dead = torch.isinf(ref_lse)
        got_dead = torch.isinf(got_lse) & (got_lse < 0)
        if bool((ref_dead != got_dead).any()) or bool(torch.isnan(got_lse).any()):
            lse_err = math.inf
        else:
            live = ~ref_dead
            lse_err = float((got_lse[live] - ref_lse[live]).abs().max()) if bool(live.any()) else 0.0
    reasons = []
    if not finite:
        reasons.append("non-finite output")
    elif max_abs > atol:
        reasons.append(f"max abs error {max_abs:.3g} > {atol:g}")
    if finite and rel > rtol:
        reasons.append(f"relative error {rel:.3g} > {rtol:g}")
    if lse_err is not None and lse_err > lse_atol:
        reasons.append(f"LSE error {lse_err:.3g} > {lse_atol:g}")
    return GateResult(
        passed=not reasons, max_abs_err=max_abs, rel_err=rel, lse_max_err=lse_err,
        rows=int(rows.numel()), atol=atol, rtol=rtol, reason="; ".join(reasons),
    )


def check_exact(
    method: str | Method,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    n_rows: int = 64,
    seed: int = 0,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    scale: float | None = None,
    atol: float = ATOL,
    rtol: float = RTOL,
) -> GateResult:
    """The correctness gate of an exact method.

    Draws ``n_rows`` seeded query rows, builds the bool mask of those rows from
    ``method.visible_mask(tokens_q, tokens_k, causal).mask_mod`` and compares the method's output
    rows with ``longattn.reference_attention`` in float64 on those rows only. ``out`` (and
    ``lse``) may be passed when the method's output is already at hand; otherwise the method
    is run once here.
    """
    m = resolve(method)
    if not m.capabilities.softmax:
        raise ValueError(f"method {m.name!r} is not softmax attention (a recurrent mixer): the float64 softmax "
                         "reference does not apply to it, so it has no correctness gate here")
    if out is None:
        out, stats = longattn.attention(q, k, v, causal=causal, method=m, scale=scale, return_stats=True)
        lse = stats.lse
    tq, tk = q.shape[2], k.shape[2]
    rows = sample_rows(tq, n_rows, seed)
    return check_rows(out, q, k, v, mask=m.visible_mask(tq, tk, causal), rows=rows, scale=scale,
                      lse=lse, atol=atol, rtol=rtol)


# -- FLOPs -----------------------------------------------------------------------------------


def attention_flops(tokens_q: int, tokens_k: int, causal: bool, *, head_dim: int, heads: int,
                    batch: int, density: float = 1.0) -> float:
    """``4 · visible pairs · head_dim · heads · batch``: one multiply-add (2 FLOPs) per pair and
    dimension for ``Q Kᵀ`` and again for ``P V``; visible pairs = ``density ×`` the dense pairs
    (the causal triangle for causal attention)."""
    return 4.0 * density * dense_pairs(tokens_q, tokens_k, causal) * head_dim * heads * batch


def efficiency_length(points) -> int | None:
    """The efficiency length (crossover with dense) from ``(length, ratio_to_sdpa)`` pairs: the
    smallest length run from which the method is at least as fast as SDPA at that length and
    every larger one run (None: slower at the largest length, or no ratios). Lengths whose ratio
    is None (not timed, failed) are skipped."""
    pts = sorted((int(n), float(r)) for n, r in points if r is not None)
    best = None
    for n, r in reversed(pts):
        if r < 1.0:
            break
        best = n
    return best


# -- a few queries over a long cache: reference and comparison ------------------------------


def compare(out: torch.Tensor, lse: torch.Tensor | None, ref: torch.Tensor, ref_lse: torch.Tensor) -> dict[str, Any]:
    """Errors of ``out [B, H, n, D]`` (and its LSE) against a float64 reference of the same rows."""
    got = out.to(torch.float64)
    finite = bool(torch.isfinite(got).all())
    diff = got - ref
    ref_norm = float(ref.norm())
    rec: dict[str, Any] = {"finite": finite}
    rec["max_abs_err"] = float(diff.abs().max()) if finite else math.inf
    rec["rel_err"] = (float(diff.norm()) / ref_norm if ref_norm > 0 else 0.0) if finite else math.inf
    if lse is not None and finite:
        l64 = lse.to(torch.float64)
        rec["recall"] = float(torch.exp(l64 - ref_lse).clamp(max=1.0).mean())
        rec["lse_max_err"] = float((l64 - ref_lse).abs().max())
    else:
        rec["recall"] = None
        rec["lse_max_err"] = None
    return rec


def gate_of(err: dict[str, Any], rows: int, exact: bool, tol: Sequence[float] | None = None) -> GateResult:
    """The gate: exact methods must match within the harness tolerances (``tol = (atol, rtol)``
    for half-precision inputs, see ``half_gate_tolerance``), every method must give finite output."""
    atol, rtol = tol if tol is not None else (ATOL, RTOL)
    reasons = []
    if not err["finite"]:
        reasons.append("non-finite output")
    elif exact:
        if err["max_abs_err"] > atol:
            reasons.append(f"max abs error {err['max_abs_err']:.3g} > {atol:g}")
        if err["rel_err"] > rtol:
            reasons.append(f"relative error {err['rel_err']:.3g} > {rtol:g}")
        if err["lse_max_err"] is not None and err["lse_max_err"] > LSE_ATOL:
            reasons.append(f"LSE error {err['lse_max_err']:.3g} > {LSE_ATOL:g}")
    return GateResult(
        passed=not reasons, max_abs_err=err["max_abs_err"], rel_err=err["rel_err"], lse_max_err=err["lse_max_err"],
        rows=rows, atol=atol if exact else math.inf, rtol=rtol if exact else math.inf,
        reason="; ".join(reasons),
    )


def exact_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_pos: torch.Tensor | None = None,
                    key_mask: torch.Tensor | None = None, chunk: int = 16384):
    """Float64 attention of a few queries over a long cache: ``(out [B, Hq, n, D], lse [B, Hq, n])``.

    ``q [B, Hq, n, D]``, ``k, v [B, Hkv, T, D]``; ``q_pos`` ``[n]``: each query sees keys at or
    before its position (None: every key); ``key_mask`` bool ``[T]``: keys visible at all. Same
    result as ``longattn.reference_attention``, but the query heads of a GQA group are folded
    into the query axis and the cache is converted to float64 a chunk at a time, so no float64
    copy of the whole cache (repeated per query head) is made."""
    b, hq, n, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    g = hq // hk
    scale = 1.0 / math.sqrt(d)
    q64 = q.to(torch.float64).reshape(b, hk, g * n, d)
    rows_pos = None if q_pos is None else q_pos.repeat(g)  # row j·n + i is query i of group member j
    scores = []
    for c0 in range(0, tk, chunk):
        c1 = min(c0 + chunk, tk)
        s = torch.matmul(q64, k[:, :, c0:c1].to(torch.float64).transpose(-1, -2)).mul_(scale)
        allowed = None
        if rows_pos is not None:
            allowed = torch.arange(c0, c1)[None, :] <= rows_pos[:, None]
        if key_mask is not None:
            allowed = key_mask[c0:c1][None, :] if allowed is None else allowed & key_mask[c0:c1][None, :]
        if allowed is not None:
            s.masked_fill_(~allowed, -math.inf)
        scores.append(s)
    lse = torch.logsumexp(torch.cat(scores, -1), -1)  # [B, Hkv, g·n]
    out = torch.zeros(b, hk, g * n, d, dtype=torch.float64)
    for s, c0 in zip(scores, range(0, tk, chunk)):
        w = torch.exp(s - lse[..., None]).nan_to_num_(0.0)
        out += torch.matmul(w, v[:, :, c0:c0 + s.shape[-1]].to(torch.float64))
    return out.view(b, hq, n, d), lse.view(b, hq, n)


# -- crossover with SDPA ---------------------------------------------------------------------


def crossover_estimate(points: Iterable[tuple[int, float | None]]) -> float | None:
    """Where the speed ratio crosses 1, by linear interpolation of ``log ratio`` against
    ``log length`` between the last length run where the method is slower and the next one,
    from which it stays faster. None when it never gets ahead or is ahead from the smallest run."""
    pts = sorted((int(n), float(r)) for n, r in points if r is not None and r > 0)
    for (n0, r0), (n1, r1) in zip(pts, pts[1:]):
        if r0 < 1.0 <= r1 and all(r >= 1.0 for _, r in pts if _ >= n1):
            a, b = math.log(r0), math.log(r1)
            x = math.log(n0) + (0.0 - a) * (math.log(n1) - math.log(n0)) / (b - a)
            return math.exp(x)
    return None


def crossovers(records: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], Any] | None = None,
               length: str = "cache") -> list[dict[str, Any]]:
    """Per method (and ``key``: default the KV layout), its efficiency length over the lengths run."""
    key = key or (lambda r: r.get("kv_heads"))
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for r in records:
        if r["method"] == "sdpa":
            continue
        groups.setdefault((r["method"], key(r)), []).append(r)
    rows = []
    for (method, k), rs in groups.items():
        pts = [(r[length], r.get("ratio_to_sdpa")) for r in rs]
        timed = sorted(n for n, ratio in pts if ratio is not None)
        eff = efficiency_length(pts)
        rows.append({"method": method, "key": k, "efficiency_length": eff,
                     "ahead_from_smallest": eff is not None and bool(timed) and eff == timed[0],
                     "crossover_estimate": crossover_estimate(pts), "lengths_timed": timed})
    return rows


def available_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- failures --------------------------------------------------------------------------------


class Unsupported(Exception):
    """A case the method cannot run by its capability sheet (recorded as ``unsupported``)."""


def classify_exception(exc: BaseException) -> str:
    """Status string for a failed case: ``oom``, ``unsupported: ...`` or ``error: Type: msg``."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, MemoryError):
        return "oom"
    low = str(exc).lower()
    if isinstance(exc, RuntimeError) and ("out of memory" in low or "can't allocate memory" in low
                                          or "cannot allocate memory" in low):
        return "oom"
    if isinstance(exc, Unsupported):
        return f"unsupported: {text}"
    return f"error: {type(exc).__name__}: {text[:300]}"


def guarded(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(fn(), None)`` or ``(None, status)`` when it raised (KeyboardInterrupt still propagates)."""
    try:
        return fn(), None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a benchmark sweep records, never crashes
        return None, classify_exception(exc)


# -- one case --------------------------------------------------------------------------------


def capability_problem(method: Method, causal: bool, tokens_q: int, tokens_k: int) -> str | None:
    """Why the method cannot run this case by its capability sheet, or None."""
    caps = method.capabilities
    if causal and not caps.causal:
        return f"{method.name} has no causal mode"
    if not causal and not caps.non_causal:
        return f"{method.name} is causal only"
    if tokens_q != tokens_k and not caps.cross:
        return f"{method.name} has no cross attention"
    return None


def run_attention_case(
    method: str | Method,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    repeats: int = 3,
    max_seconds: float | None = None,
    n_rows: int = 64,
    seed: int = 0,
    atol: float = ATOL,
    rtol: float = RTOL,
) -> dict[str, Any]:
    """One benchmark case of a method; every outcome is a record, nothing is raised.

    1. first call with stats (it also serves as the warm-up: compilation, e.g. FlexAttention's,
       happens here and is reported as ``first_call_s``);
    2. the correctness gate on ``n_rows`` seeded rows of that output; a failed gate gives status
       ``"FAILED accuracy"`` and no speed figure (methods that are not softmax attention, capability
       ``softmax`` False, have no softmax reference: ``gate`` None, ``gate_note`` says so);
    3. ``repeats`` timed calls (without stats) with peak RSS growth sampled during them;
    4. FLOPs from the exact masked area and throughput.
    """
    rec: dict[str, Any] = {"status": "ok"}
    m, status = guarded(lambda: resolve(method))
    if status is not None:
        rec["status"] = status
        return rec
    tq, tk = q.shape[2], k.shape[2]
    problem = capability_problem(m, causal, tq, tk)
    if problem:
        rec["status"] = f"unsupported: {problem}"
        return rec

    def first():
        t0 = time.perf_counter()
        out, stats = longattn.attention(q, k, v, causal=causal, method=m, return_stats=True)
        return out, stats, time.perf_counter() - t0

    res, status = guarded(first)
    if status is not None:
        rec["status"] = status
        return rec
    out, stats, first_s = res
    rec.update(
        path=stats.path, density=stats.density, computed_fraction=stats.computed_fraction,
        first_call_s=first_s, compute_dtype=stats.compute_dtype, extra={k_: v_ for k_, v_ in stats.extra.items() if _jsonable(v_)},
    )
    if m.capabilities.softmax:
        rec["gate"] = _gate(lambda: check_exact(m, q, k, v, causal, n_rows, seed, out=out, lse=stats.lse,
                                                atol=atol, rtol=rtol), rec)
    else:  # a recurrent mixer: no softmax reference to gate against (its own tests check its op)
        rec["gate"] = None
        rec["gate_note"] = "not softmax attention: no float64 softmax reference applies"
    out = stats = None  # free the output before timing (the gate closure is done with it)
    if rec["status"] != "ok":
        return rec

    def call():
        return longattn.attention(q, k, v, causal=causal, method=m)

    return _time_into(rec, call, repeats, max_seconds, q, tk, causal, rec.get("density"))


def run_callable_case(
    fn: Callable[[], torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    mask: Mask | None = None,
    path: str = "",
    repeats: int = 3,
    max_seconds: float | None = None,
    n_rows: int = 64,
    seed: int = 0,
    atol: float = ATOL,
    rtol: float = RTOL,
) -> dict[str, Any]:
    """Like ``run_attention_case`` for a plain callable returning the output (a baseline such as
    torch SDPA): the gate uses ``mask`` (default: ``Causal()`` when causal, else every key)."""
    rec: dict[str, Any] = {"status": "ok", "path": path, "density": 1.0, "computed_fraction": 1.0}
    tq, tk = q.shape[2], k.shape[2]
    if mask is None and causal:
        mask = Causal()

    def first():
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    res, status = guarded(first)
    if status is not None:
        rec["status"] = status
        return rec
    out, rec["first_call_s"] = res
    rows = sample_rows(tq, n_rows, seed)
    rec["gate"] = _gate(lambda: check_rows(out, q, k, v, mask=mask, rows=rows, atol=atol, rtol=rtol), rec)
    out = None  # free the output before timing
    if rec["status"] != "ok":
        return rec
    return _time_into(rec, fn, repeats, max_seconds, q, tk, causal, 1.0)


def _time_into(rec, fn, repeats, max_seconds, q, tk, causal, density) -> dict[str, Any]:
    """Time ``fn`` (peak memory on the first sample) and add speed, FLOPs and throughput to ``rec``."""
    timing, status = guarded(lambda: time_call(fn, warmup=0, repeats=repeats, max_seconds=max_seconds,
                                               track_memory=True))
    if status is not None:
        rec["status"] = status
        return rec
    _fill_speed(rec, timing, q.shape[2], tk, causal, q, density)
    return rec


def _gate(check: Callable[[], GateResult], rec: dict[str, Any]) -> dict[str, Any] | None:
    gate, status = guarded(check)
    if status is not None:
        rec["status"] = f"gate {status}"
        return None
    if not gate.passed:
        rec["status"] = "FAILED accuracy"
    return gate.as_dict()


def _fill_speed(rec, timing: Timing, tq, tk, causal, q, density) -> None:
    b, h, _, d = q.shape
    rec.update(
        median_s=timing.median_s, min_s=timing.min_s, max_s=timing.max_s, spread_s=timing.spread_s,
        samples=timing.samples, peak_mem_bytes=timing.peak_mem_bytes, cpu_s=timing.cpu_s,
        load_1m=(load_average() or [None])[0],
    )
    if density is not None:
        flops = attention_flops(tq, tk, causal, head_dim=d, heads=h, batch=b, density=density)
        rec["flops"] = flops
        rec["tflops"] = flops / timing.median_s / 1e12 if timing.median_s > 0 else None


def _jsonable(x: Any) -> bool:
    return isinstance(x, (int, float, str, bool)) or x is None


# -- machine ---------------------------------------------------------------------------------


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip().lower()] = value.strip()
    except OSError:
        pass
    return info


def _cpu_model() -> str:
    """``"AMD EPYC (family 25, model 17)"``: the model name, with the family and model numbers
    that tell processor generations apart when the name does not."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine()
    if info.get("cpu family") and info.get("model"):
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


def cpu_capability() -> str:
    """torch's CPU capability ("AVX512", "AVX2", …) and the bf16/fp16 matrix extensions the
    processor reports (``/proc/cpuinfo`` flags), e.g. ``"AVX512 + avx512_bf16"``: what decides
    which dtypes are fast here."""
    try:
        cap = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - older torch, unusual builds
        cap = "unknown"
    wanted = ("avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    flags = set(_cpuinfo().get("flags", "").split())
    have = [w for w in wanted if w in flags]
    return " + ".join([cap] + have)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def native_unavailable() -> dict[str, str]:
    """The native C kernels that cannot run here, and why (``{}``: all of them can). Several ops
    take a C kernel when it builds and a torch path otherwise (decode over blocks, block-sparse
    prefill, linear / Lightning attention): the same results, other speeds, so a run says which."""
    from longattn.kernels import native, native_linear, native_prefill

    reasons = {"decode_blocks": native.unavailable_reason(), "sparse_prefill": native_prefill.unavailable_reason(),
               "linear_chunked": native_linear.unavailable_reason()}
    return {name: why for name, why in reasons.items() if why is not None}


def machine_info(seed: int | None = None) -> dict[str, Any]:
    """Platform, CPU, thread counts, versions, seed and the UTC date of the run."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    from longattn.kernels import flex

    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_capability": cpu_capability(),
        "isa": dtypes.cpu_isa(),
        "compute_dtype_rule": {name: str(dtypes.compute_dtype(dt, "cpu")).removeprefix("torch.")
                               for name, dt in (("bfloat16", torch.bfloat16), ("float16", torch.float16))},
        "device": str(DEVICE),
        "device_name": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "longattn": longattn.__version__,
        "flex_unavailable_reason": flex.flex_unavailable_reason(),
        "native_unavailable": native_unavailable(),
        "load_average_at_start": load_average(),
        "seed": seed,
    }
