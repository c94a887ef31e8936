"""Registered attention methods; importing this package registers them all."""

# one import per line (registration side effect), so adding a method is a one-line change
from longattn.methods import anchor  # noqa: F401
from longattn.methods import block_topk  # noqa: F401
from longattn.methods import cca  # noqa: F401
from longattn.methods import dense  # noqa: F401
from longattn.methods import dsa  # noqa: F401
from longattn.methods import flexprefill  # noqa: F401
from longattn.methods import hyper  # noqa: F401
from longattn.methods import hip  # noqa: F401
from longattn.methods import infllm  # noqa: F401
from longattn.methods import landmark_trained  # noqa: F401
from longattn.methods import linformer  # noqa: F401
from longattn.methods import local  # noqa: F401
from longattn.methods import loki  # noqa: F401
from longattn.methods import minference  # noqa: F401
from longattn.methods import moba  # noqa: F401
from longattn.methods import nsa  # noqa: F401
from longattn.methods import longheads  # noqa: F401
from longattn.methods import pattern  # noqa: F401
from longattn.methods import pbs  # noqa: F401
from longattn.methods import recurrent  # noqa: F401
from longattn.methods import routing  # noqa: F401
from longattn.methods import recycled  # noqa: F401
from longattn.methods import relative  # noqa: F401
from longattn.methods import tokenselect  # noqa: F401
from longattn.methods import xattention  # noqa: F401
from longattn.methods.base import Capabilities, Method, MethodSpec, register

__all__ = ["Capabilities", "Method", "MethodSpec", "register"]
