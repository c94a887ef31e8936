"""Which dtype the kernels compute in: the one capability rule behind every path.

Half-precision inputs (bfloat16, float16) are computed in their own dtype where the hardware
multiplies them fast, and in float32 where it does not; softmax statistics, LSEs and merges are
float32 either way (as in flash attention). Measured on the development machines (2 cores, torch
2.13 CPU, 8 heads, head_dim 64):

* Intel Xeon with AVX-512, AVX512-BF16/FP16 and AMX-BF16: matmul 2048³ fp32 187 GFLOP/s, bf16 934,
  fp16 198; SDPA 8k causal fp32 0.50 s, bf16 0.19 s. bf16 is fast (AMX / AVX512-BF16), fp16 is not
  (AVX512-FP16 matmuls run at the fp32 rate), so fp16 is computed in float32 there unless the CPU
  has AMX-FP16 tiles.
* AMD EPYC Zen 3 (AVX2 + FMA): bf16 matmul ~100× slower than fp32: both half dtypes in float32.
* CUDA (and other accelerators): half dtypes in their own dtype (tensor cores).

float32 inputs compute in float32; float64 inputs also compute in float32 (the float64 reference,
``longattn.reference_attention``, is the path for float64 answers).

The rule can be forced per call (``attention(..., compute_dtype=...)``) or per process
(``LONGATTN_COMPUTE_DTYPE``): ``"auto"`` (the rule above), ``"float32"`` (always float32, the
behaviour of earlier versions) or ``"input"`` (half dtypes in their own dtype even where slow).
"""

from __future__ import annotations

import functools
import os

import torch

#: accepted values of ``compute_dtype`` / ``LONGATTN_COMPUTE_DTYPE``
CHOICES = ("auto", "float32", "input")
ENV = "LONGATTN_COMPUTE_DTYPE"
HALF = (torch.bfloat16, torch.float16)
#: the dtypes kernels read (float64 inputs are converted to float32 first)
KERNEL_DTYPES = (torch.float32, *HALF)


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """The CPU's vector-unit flags that matter here, as torch's CPU-info reports them (names like
    ``avx2``, ``avx512_f``, ``avx512_bf16``, ``avx512_fp16``, ``amx_bf16``, ``amx_fp16``), falling back
    to ``/proc/cpuinfo`` where that private torch query is absent."""
    try:
        info = torch._C._cpu._get_cpu_capability()  # a dict of flag -> bool in torch >= 2.4
        return frozenset(name for name, on in info.items() if on is True)
    except (AttributeError, RuntimeError, TypeError):
        pass
    names = {"avx512f": "avx512_f", "avx512_bf16": "avx512_bf16", "avx512_fp16": "avx512_fp16",
             "amx_bf16": "amx_bf16", "amx_fp16": "amx_fp16", "avx2": "avx2", "fma": "fma3"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return frozenset(ours for theirs, ours in names.items() if theirs in flags)
    except OSError:
        pass
    return frozenset()


def cpu_isa() -> str:
    """The widest matmul unit of this CPU, for benchmark records: ``"AMX"`` (AMX-BF16 tiles),
    ``"AVX-512"`` (with ``+BF16`` when it has AVX512-BF16), ``"AVX2"`` or ``"baseline"``."""
    f = cpu_features()
    if "amx_bf16" in f:
        return "AMX"
    if "avx512_f" in f:
        return "AVX-512+BF16" if "avx512_bf16" in f else "AVX-512"
    if "avx2" in f:
        return "AVX2"
    return "baseline"


def fast_on_cpu(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` at least as fast as float32 (see the module docstring
    for the measurements behind the rule)."""
    f = cpu_features()
    if dtype == torch.bfloat16:
        return bool(f & {"avx512_bf16", "amx_bf16"})
    if dtype == torch.float16:
        return "amx_fp16" in f
    return dtype == torch.float32


def check_choice(compute_dtype: object) -> str | torch.dtype | None:
    """Validate a ``compute_dtype`` argument: None, one of ``CHOICES``, or a torch dtype
    (``torch.float32``, or a half dtype meaning "compute half inputs in their own dtype")."""
    if compute_dtype is None or compute_dtype in CHOICES:
        return compute_dtype  # type: ignore[return-value]
    if isinstance(compute_dtype, torch.dtype) and compute_dtype in (torch.float32, *HALF):
        return compute_dtype
    raise ValueError(f"compute_dtype must be one of {', '.join(map(repr, CHOICES))}, torch.float32, torch.bfloat16 "
                     f"or torch.float16 (or None: ${ENV}, default 'auto'), got {compute_dtype!r}")


def _env_choice() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"${ENV} must be one of {', '.join(CHOICES)}, got {value!r}")
    return value


def compute_dtype(dtype: torch.dtype, device: torch.device | str, choice: object = None) -> torch.dtype:
    """The dtype the kernels read q, k, v in, for inputs of ``dtype`` on ``device``.

    Args:
        dtype: the inputs' dtype.
        device: the inputs' device.
        choice: None (``$LONGATTN_COMPUTE_DTYPE``, default ``"auto"``), ``"auto"``, ``"float32"``,
            ``"input"`` or a torch dtype (``torch.float32`` = ``"float32"``; a half dtype =
            ``"input"`` for inputs of that dtype, float32 compute for others).
    """
    choice = check_choice(choice)
    if choice is None:
        choice = _env_choice()
    if dtype not in HALF:
        return torch.float32
    if isinstance(choice, torch.dtype):
        return dtype if choice == dtype else torch.float32
    if choice == "float32":
        return torch.float32
    if choice == "input":
        return dtype
    device_type = torch.device(device).type
    if device_type != "cpu":
        return dtype  # GPUs (and other accelerators) multiply half dtypes natively
    return dtype if fast_on_cpu(dtype) else torch.float32
