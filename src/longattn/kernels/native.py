"""Small native CPU kernels, compiled on first use with the system C compiler and loaded with ctypes.

Why: one decoding step of block retrieval reads a few MB of selected keys and values. Through
torch ops that means gathering them into a buffer (reading and writing every byte) and then
attending over the copy (reading it again); on this class of machine the step costs about twice
the memory traffic it needs. ``decode_blocks`` reads the selected blocks in place, once
(``csrc/decode_blocks.c``). Measured on the 2-core development VM, 128k cached tokens, 8 heads,
head_dim 64, 2,048 keys per step: 0.5 ms per step (selection included) against 1.2–1.3 ms for
gather + torch's fused kernel, and 27–30 ms for dense SDPA.

The shared object is built once per machine into ``$LONGATTN_CACHE_DIR`` (default
``~/.cache/longattn``)/native, keyed by the source, the flags, the compiler and the CPU, with
``cc -O3 -march=native -fopenmp``; a build takes about a second. Without a working compiler, or
with ``LONGATTN_NATIVE=0``, ``unavailable_reason()`` says why and callers keep their torch path:
the result is the same, only slower (tested). The C source is plain C with no torch headers, so
the build needs no Python development files and no ninja.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import threading
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch

ABI_VERSION = 3
#: the element types the native kernels read as stored, and their code in the C ABI (decode and prefill)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
FLAGS: tuple[str, ...] = ("-O3", "-march=native", "-fopenmp", "-std=gnu11", "-shared", "-fPIC")
#: a compile that takes longer than this is abandoned (the torch path is used)
BUILD_TIMEOUT_S = 120
#: largest head_dim / block the kernel takes (its per-thread scratch, on the heap, is 2·head_dim + block floats)
MAX_HEAD_DIM = 1024
MAX_BLOCK = 16384


def cache_dir() -> Path:
    """Where built kernels are kept: ``$LONGATTN_CACHE_DIR/native``, else
    ``$XDG_CACHE_HOME/longattn/native``, else ``~/.cache/longattn/native``."""
    root = os.environ.get("LONGATTN_CACHE_DIR")
    if root:
        return Path(root) / "native"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "longattn" / "native"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_signature() -> str:
    """The CPU's identity for ``-march=native`` builds: model and flags from /proc/cpuinfo where
    there is one (a home directory shared by different machines must not reuse a build)."""
    sig = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("model name", "flags", "features") and line.strip():
                    sig.append(line.strip())
                if len(sig) >= 4:
                    break
    except OSError:
        pass
    return "\n".join(sig)


def _build(source: bytes, cc: str, name: str = "decode_blocks", what: str = "decode") -> Path:
    """Compile ``source`` into ``cache_dir()/<name>-<key>.so`` (kept across runs; the key covers
    the source, flags, compiler and CPU) and return its path; ``what`` names the kernel in errors.
    Shared by every native kernel (``native_prefill`` builds ``sparse_prefill`` with it)."""
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"C compiler {cc!r} did not run: {exc}") from exc
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), cc.encode(),
                                     version.encode(), _cpu_signature().encode()])).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    src = target.with_suffix(f".{os.getpid()}.c")
    tmp = target.with_suffix(f".{os.getpid()}.tmp.so")
    src.write_bytes(source)
    try:
        proc = subprocess.run([cc, *FLAGS, str(src), "-o", str(tmp), "-lm"], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{Path(cc).name} failed to build the {what} kernel: {' | '.join(tail)}")
        os.replace(tmp, target)  # atomic: a concurrent process sees the whole file or none
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"building the {what} kernel took over {BUILD_TIMEOUT_S} s") from exc
    finally:
        for p in (src, tmp):
            p.unlink(missing_ok=True)
    return target


def build_and_load(source: str, name: str, what: str) -> ctypes.CDLL:
    """Build ``csrc/<source>`` (once per machine, see ``_build``) and load it with ctypes; raises
    ``RuntimeError``/``OSError`` saying why not (``LONGATTN_NATIVE=0``, no compiler, a failed
    build). Shared by every native kernel's loader."""
    if os.environ.get("LONGATTN_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        raise RuntimeError("disabled by LONGATTN_NATIVE=0")
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc or clang on PATH, or $CC)")
    code = source_with_headers(source)
    return ctypes.CDLL(str(_build(code, cc, name=name, what=what)))


#: a kernel's own header: ``#include "name.h"`` on a line of its own, the name a file of ``csrc/``
_LOCAL_INCLUDE = re.compile(rb'^[ \t]*#[ \t]*include[ \t]+"([A-Za-z0-9_.-]+)"', re.M)


def source_with_headers(source: str) -> bytes:
    """``csrc/<source>`` with each of its own headers (``#include "vec8.h"``) pasted in place of the
    include: the build compiles one file in the cache folder, where the headers are not, and the
    build's key (a hash of the source) then changes with the headers too. One level: a header
    includes only system headers."""
    folder = resources.files("longattn.kernels").joinpath("csrc")
    return _LOCAL_INCLUDE.sub(lambda m: folder.joinpath(m.group(1).decode()).read_bytes(),
                              folder.joinpath(source).read_bytes())


class LazyKernel:
    """One C kernel of ``csrc/``, built and loaded on first use, once per process (thread-safe).

    ``unavailable_reason()`` builds it on the first call and then says None, or why not
    (``LONGATTN_NATIVE=0``, no compiler, a failed build, a wrong ABI); ``lib`` is the library,
    bound by ``bind`` (which checks its ABI version and declares its signatures), or None. Tests
    reset ``loaded`` / ``lib`` / ``reason`` to load it again under other conditions."""

    def __init__(self, source: str, name: str, what: str, bind: Callable[[ctypes.CDLL], ctypes.CDLL]) -> None:
        self.source, self.name, self.what, self.bind = source, name, what, bind
        self.lib: ctypes.CDLL | None = None
        self.reason: str | None = None
        self.loaded = False
        self._lock = threading.Lock()

    def unavailable_reason(self) -> str | None:
        with self._lock:
            if not self.loaded:
                try:
                    self.lib = self.bind(build_and_load(self.source, self.name, self.what))
                except (OSError, RuntimeError) as exc:
                    self.reason = str(exc)
                self.loaded = True
        return self.reason


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Check the ABI of a built ``decode_blocks`` library and declare its signature."""
    if lib.decode_blocks_abi_version() != ABI_VERSION:
        raise RuntimeError("the built decode kernel has an unexpected ABI version")
    fn = lib.decode_blocks
    p, i = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p] * 6 + [i] * 15 + [ctypes.c_float, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int  # 0, or 1 when a thread's scratch could not be allocated
    return lib


KERNEL = LazyKernel("decode_blocks.c", "decode_blocks", "decode", _bind)


def unavailable_reason() -> str | None:
    """None when the decode kernel is built and loaded (building it on the first call), else why
    not."""
    return KERNEL.unavailable_reason()


def decode_blocks_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int) -> bool:
    """Whether ``decode_blocks`` takes these tensors: on the CPU, q float32, bfloat16 or float16,
    k and v of one of those dtypes (read as stored), one query, last dimension contiguous, no
    autograd history wanted, sizes within the kernel's limits, and the kernel available."""
    ok = (q.device.type == k.device.type == v.device.type == "cpu"
          and q.dtype in DTYPE_CODES and k.dtype in DTYPE_CODES and v.dtype == k.dtype
          and q.dim() == 4 and q.shape[2] == 1 and q.shape[-1] <= MAX_HEAD_DIM and 0 < block <= MAX_BLOCK
          and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
          and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))
    return ok and unavailable_reason() is None


def decode_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, block: int,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of one query per head over whole key blocks, read in place.

    Args:
        q: ``[B, Hq, 1, D]`` (float32, bfloat16 or float16; widened to float32, it is small);
            k, v: ``[B, Hkv, T, D]`` float32, bfloat16 or float16, read as stored — a half cache
            is never converted, the kernel widens each element it reads (``Hq % Hkv == 0``), last
            dimension contiguous, any other strides (a view into a larger cache is fine).
        blocks: int ``[B, Hq, n_sel]``: key block indices per query head, ``-1`` for an unused
            slot; block ``j`` holds tokens ``[j·block, min((j+1)·block, T))``. Indices must be
            unique per row (a repeated block would be counted twice).
        block: tokens per block.
        scale: score scale.

    Returns:
        ``out [B, Hq, 1, D]`` and ``lse [B, Hq, 1]`` (float32); a row with no valid block, or whose
        every score is −inf, gives 0 and −inf; a NaN score makes the row NaN (out and lse).
    """
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the native decode kernel is unavailable: {reason}")
    if not decode_blocks_applies(q, k, v, block):
        raise ValueError(
            "decode_blocks takes CPU tensors (float32, bfloat16 or float16) q [B, Hq, 1, D], k and v "
            "[B, Hkv, T, D] of one dtype, with the last "
            f"dimension contiguous and 0 < block <= {MAX_BLOCK}; got q {tuple(q.shape)} {q.dtype}, "
            f"k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype}, block {block}")
    b, hq, _, d = q.shape
    bk, hk, t, dk = k.shape
    if (bk, dk) != (b, d) or v.shape != k.shape or hq % hk:
        raise ValueError(f"decode_blocks: q {tuple(q.shape)} does not fit k {tuple(k.shape)} / v {tuple(v.shape)} "
                         "(same batch and head_dim, Hq a multiple of Hkv)")
    if blocks.shape[:2] != (b, hq) or blocks.dim() != 3:
        raise ValueError(f"blocks must be [B, Hq, n_sel] = [{b}, {hq}, n], got {tuple(blocks.shape)}")
    n_blocks = -(-t // block)
    sel = blocks.to(torch.int64).contiguous()
    if sel.numel() and int(sel.max()) >= n_blocks:
        raise ValueError(f"blocks holds index {int(sel.max())}, but the cache has {n_blocks} blocks of {block}")
    out = torch.empty(b, hq, 1, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, 1, dtype=torch.float32, device=q.device)
    q = q.to(torch.float32)  # one row per head: the cache itself is read as stored
    assert KERNEL.lib is not None
    failed = KERNEL.lib.decode_blocks(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), sel.data_ptr(), out.data_ptr(), lse.data_ptr(),
        b, hq, hk, d, t, block, sel.shape[-1], q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), float(scale), max(1, torch.get_num_threads()), DTYPE_CODES[k.dtype])
    if failed:
        # per thread: the accumulator and the widened query (head_dim each), one block of scores
        scratch = (2 * d + (block + 7) // 8 * 8) * 4
        raise MemoryError(f"the native decode kernel could not allocate {scratch} bytes of scratch per thread")
    return out, lse
