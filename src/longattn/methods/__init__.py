"""Registered attention methods; importing this package registers them all."""

from longattn.methods import block_topk, dense, local, loki, pattern, tokenselect  # noqa: F401  (registration side effect)
from longattn.methods.base import Capabilities, Method, MethodSpec, register

__all__ = ["Capabilities", "Method", "MethodSpec", "register"]
