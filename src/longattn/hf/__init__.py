"""Hugging Face integration: any longattn method inside a transformers model, through the
library's own extension points (``AttentionInterface`` and ``AttentionMaskInterface``).

    >>> import longattn.hf
    >>> model, tok = longattn.hf.load_llama2c()          # the bundled stories260K
    >>> with longattn.hf.apply(model, "landmark", budget=256, block=32, q_block=32):
    ...     out = model.generate(**tok(["Once upon a time"], return_tensors="pt"), max_new_tokens=20)

transformers is an optional dependency (``pip install "longattn[hf]"``); it is imported only
when this package is, never by ``import longattn``.
"""

from __future__ import annotations


def require_transformers():
    """The ``transformers`` module, or an ImportError that says how to install it."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "longattn.hf needs the 'transformers' package (supported: >=5.2,<5.24): "
            'pip install "longattn[hf]"'
        ) from e
    return transformers


require_transformers()

from longattn.hf.attention import ATTN_IMPLEMENTATION, Applied, Intercepted, apply, apply_head_map, intercept  # noqa: E402
from longattn.hf.cache import LongattnCache  # noqa: E402
from longattn.hf.llama2c import Llama2cTokenizer, load_llama2c  # noqa: E402

__all__ = ["ATTN_IMPLEMENTATION", "Applied", "Intercepted", "Llama2cTokenizer", "LongattnCache", "apply",
           "apply_head_map", "intercept", "load_llama2c"]
