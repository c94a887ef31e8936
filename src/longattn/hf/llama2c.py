"""A llama2.c checkpoint (e.g. the bundled stories260K) as a transformers
``LlamaForCausalLM``, with a tokenizer for its ``tok512.bin``.

The weights map one-to-one except the query and key projections: llama2.c rotates adjacent
channel pairs ``(2i, 2i+1)``, transformers rotates ``(i, i + head_dim/2)`` ("rotate half"), so
each head's q/k rows are reordered ``(0, 2, 4, …, 1, 3, 5, …)``. The same reordering of q and k
leaves every score ``q·k`` unchanged (``tests/test_hf_llama2c.py`` checks the logits against the
float64 llama2.c forward of ``longattn.models.llama2c``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from longattn.models import llama2c as l2c


class Llama2cTokenizer:
    """The llama2.c tokenizer (``tok512.bin``) with the calls a transformers user makes:
    ``tok(texts, return_tensors="pt")`` (left padding by default, for generation),
    ``decode`` / ``batch_decode`` and the special token ids. BOS = 1, EOS = 2, padding uses 0
    (``<unk>``), which the attention mask hides.

    Args:
        path: ``tok512.bin``.
        padding_side: "left" (default, what ``generate`` needs for a batch) or "right".
    """

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0

    def __init__(self, path: str | Path, padding_side: str = "left"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.padding_side = padding_side
        self._tok = l2c.Tokenizer(path)
        self.vocab_size = len(self._tok.pieces)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text`` (BOS first unless ``add_bos=False``)."""
        return self._tok.encode(text, bos=add_bos)

    def __call__(self, texts: str | Sequence[str], *, return_tensors: str | None = "pt", add_bos: bool = True,
                 padding_side: str | None = None):
        """``{"input_ids": [B, T], "attention_mask": [B, T]}`` (int64, 1 = real token), padded to
        the longest text on ``padding_side`` (default: the tokenizer's)."""
        from transformers import BatchEncoding

        if isinstance(texts, str):
            texts = [texts]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a str or a non-empty sequence of str, got {texts!r}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        ids = [self.encode(t, add_bos) for t in texts]
        n = max(len(x) for x in ids)
        rows, masks = [], []
        for x in ids:
            pad = [self.pad_token_id] * (n - len(x))
            rows.append(pad + x if side == "left" else x + pad)
            m = [0] * len(pad)
            masks.append(m + [1] * len(x) if side == "left" else [1] * len(x) + m)
        data = {"input_ids": rows, "attention_mask": masks}
        if return_tensors == "pt":
            data = {k: torch.tensor(v, dtype=torch.long) for k, v in data.items()}
        return BatchEncoding(data)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (a list or a 1-D tensor). Padding, BOS and EOS never appear in the text
        (they have no surface form); ``skip_special_tokens`` is accepted for transformers'
        signature and changes nothing."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode([i for i in ids if i != self.pad_token_id])

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(r, skip_special_tokens) for r in rows]


def _resolve(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.is_dir():
        bins = sorted(x for x in p.glob("*.bin") if not x.name.startswith("tok"))
        if not bins:
            raise FileNotFoundError(f"path={str(p)!r} holds no llama2.c checkpoint (*.bin besides tok*.bin)")
        ckpt = bins[0]
    elif p.is_file():
        ckpt = p
    else:
        raise FileNotFoundError(f"path={str(p)!r}: no such file or directory (expected a llama2.c .bin or its folder)")
    toks = sorted(ckpt.parent.glob("tok*.bin"))
    if not toks:
        raise FileNotFoundError(f"no tokenizer (tok*.bin) beside {ckpt}")
    return ckpt, toks[0]


def to_llama_config(cfg: l2c.Llama2cConfig, **overrides):
    """The ``transformers.LlamaConfig`` of a llama2.c header (float32, RoPE θ, RMSNorm ε)."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        max_position_embeddings=cfg.seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.shared_classifier,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attention_bias=False, mlp_bias=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def rotate_half_order(head_dim: int, device=None) -> torch.Tensor:
    """Channel order that moves llama2.c's pair ``(2i, 2i+1)`` to ``(i, i + head_dim/2)``."""
    return torch.cat([torch.arange(0, head_dim, 2, device=device), torch.arange(1, head_dim, 2, device=device)])


def load_llama2c(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """``(model, tokenizer)``: a llama2.c checkpoint as ``transformers.LlamaForCausalLM`` (eval
    mode, ``dtype``) and its ``Llama2cTokenizer``.

    Args:
        path: the checkpoint ``.bin`` or its folder (the tokenizer ``tok*.bin`` sits beside it);
            default: the bundled stories260K (``longattn.models.stories260k()``, SHA-256 checked).
        dtype: parameter dtype (float32 default: bf16 matmul is ~100× slower on these CPUs).
        attn_implementation: the model's attention before any ``longattn.hf.apply``.
    """
    from transformers import LlamaForCausalLM

    if path is None:
        from longattn.models import stories260k

        path = stories260k()
    ckpt, tok_path = _resolve(path)
    src = l2c.load_checkpoint(ckpt)
    cfg, w = src.config, src.weights
    config = to_llama_config(cfg)
    config._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    hd = cfg.head_dim
    order = rotate_half_order(hd, device=w["wq"].device)

    def qk_rows(m: torch.Tensor, heads: int) -> torch.Tensor:
        return m.view(heads, hd, -1)[:, order].reshape(heads * hd, -1)

    state = {"model.embed_tokens.weight": w["tok_embeddings"], "model.norm.weight": w["rms_final"]}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        state.update({
            p + "input_layernorm.weight": w["rms_att"][i],
            p + "self_attn.q_proj.weight": qk_rows(w["wq"][i], cfg.n_heads),
            p + "self_attn.k_proj.weight": qk_rows(w["wk"][i], cfg.n_kv_heads),
            p + "self_attn.v_proj.weight": w["wv"][i],
            p + "self_attn.o_proj.weight": w["wo"][i],
            p + "post_attention_layernorm.weight": w["rms_ffn"][i],
            p + "mlp.gate_proj.weight": w["w1"][i],
            p + "mlp.down_proj.weight": w["w2"][i],
            p + "mlp.up_proj.weight": w["w3"][i],
        })
    state["lm_head.weight"] = w["tok_embeddings"] if cfg.shared_classifier else w["output"]
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:  # pragma: no cover - a transformers layout change
        raise RuntimeError(f"llama2c → LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    if cfg.shared_classifier:
        model.tie_weights()
    # buffers computed at init (RoPE inverse frequencies) were created on meta: rebuild them for real
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(w["wq"].device)
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 2
    return model, Llama2cTokenizer(tok_path)
