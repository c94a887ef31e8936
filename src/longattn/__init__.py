"""longattn: long-context attention — one API over exact, sparse, retrieval, approximate, linear
and distributed attention.

    >>> import torch, longattn
    >>> q = k = v = torch.randn(1, 8, 1024, 64)
    >>> out = longattn.attention(q, k, v, causal=True, method="window")
"""

from longattn import methods as _methods  # noqa: F401  registers the built-in methods
from longattn.api import AttentionStats, attention
from longattn.core import masks, positions
from longattn.core.merge import merge_partials
from longattn.core.reference import reference_attention
from longattn.methods.base import MethodSpec, build as method, specs as methods
from longattn.varlen import varlen_attention

__version__ = "0.2.0"

__all__ = [
    "AttentionStats",
    "MethodSpec",
    "attention",
    "masks",
    "merge_partials",
    "method",
    "methods",
    "positions",
    "reference_attention",
    "varlen_attention",
]
