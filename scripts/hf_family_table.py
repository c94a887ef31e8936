"""Print the README's transformers family table: every family transformers builds from a tiny
config (random weights, the configs of tests/test_hf_families.py), run on a left-padded batch with
``hf.apply(model, method)`` against the model's own eager attention. A cell is the largest
|logit| difference on real tokens, or the reason longattn refused (a clear error, never a silent
wrong answer). Families with a sliding window run twice: a window that cuts the context (the layer
gets a 4-D mask) and one that does not.

    .venv/bin/python scripts/hf_family_table.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import longattn  # noqa: E402
from test_hf_families import FAMILIES, build, max_error  # noqa: E402

#: what each family hands the attention function besides q, k, v
EXERCISES = {
    "mistral": "sliding window", "gemma2": "softcap 1.0, sliding window", "gemma3_text": "sliding window",
    "phi3": "sliding window", "starcoder2": "sliding window", "cohere2": "sliding window", "gemma": "head_dim 16",
    "gpt_oss": "sinks (s_aux), sliding window", "bert": "bidirectional encoder", "gpt_neox": "MHA, partial RoPE",
    "qwen3": "q/k norm", "olmo2": "q/k norm",
}

METHODS = {
    "dense_chunked": lambda: longattn.method("dense_chunked", chunk=4),
    "window": lambda: longattn.method("window", window=64),
    "streaming": lambda: longattn.method("streaming", sinks=4, window=64),
    "landmark": lambda: longattn.method("landmark", budget=64, block=4, q_block=4, sinks=4, window=4),
    "tokenselect": lambda: longattn.method("tokenselect", budget=64),
}


#: the start of each refusal longattn gives here -> the short reason the table shows
REASONS = {
    "attends with its own pattern and cannot also follow": "refused: 4-D mask",
    "supports only causal attention": "refused: causal only",
    "cannot apply logit soft-capping": "refused: softcap",
}


def cell(model, method) -> str:
    try:
        return f"{max_error(model, method):.1e}"
    except (ValueError, NotImplementedError) as exc:
        for start, reason in REASONS.items():
            if start in str(exc):
                return reason
        raise


def main() -> None:
    import transformers

    print(f"transformers {transformers.__version__}, torch {torch.__version__}; max |Δ logits| vs eager, "
          "left-padded batch of 12 and 7 tokens\n")
    print("| family | exercises | dense | " + " | ".join(METHODS) + " |")
    print("|---" * (3 + len(METHODS)) + "|")
    for family in FAMILIES:
        windows = [None]
        if "sliding_window" in FAMILIES[family][2]:
            windows = [5, 64]  # one that cuts the 12 tokens (a 4-D mask) and one that does not
        for window in windows:
            model = build(family, **({} if window is None else {"sliding_window": window}))
            name = family if window is None else f"{family} (window {window})"
            row = [name, EXERCISES.get(family, "—"), cell(model, "dense")]
            row += [cell(model, make()) for make in METHODS.values()]
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
