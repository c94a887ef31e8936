"""Fine-tuning on a token stream and held-out NLL (``longattn.train.text``)."""

from __future__ import annotations

import pytest
import torch

import longattn
from longattn.train import LanguageModel, ModelConfig
from longattn.train.text import finetune_text, text_nll

CFG = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_train_length=64)


def _stream(n: int, seed: int = 0) -> torch.Tensor:
    """A learnable stream: a repeating pattern of 16 ids with 1 in 8 tokens random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.arange(n) % 16
    noise = torch.rand(n, generator=g) < 0.125
    return torch.where(noise, torch.randint(0, 64, (n,), generator=g), x)[None].to(torch.get_default_device())


def test_text_nll_is_the_mean_over_windows():
    model = LanguageModel(ModelConfig(**CFG), seed=0)
    tokens = _stream(100)
    want = []
    with torch.no_grad():
        for w in tokens[0, :96].view(3, 32):
            logits = model(w[None])
            want.append(float(torch.nn.functional.cross_entropy(logits[0, :-1], w[1:])))
    assert text_nll(model, tokens, length=32) == pytest.approx(sum(want) / 3, rel=1e-6)
    # rows: each row's windows, the row's tail dropped
    assert text_nll(model, tokens[:, :96].reshape(3, 32), length=32) == pytest.approx(sum(want) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="no window"):
        text_nll(model, tokens, length=128)
    with pytest.raises(ValueError, match="int64 tensor"):
        text_nll(model, tokens[0], length=32)


def test_finetune_lowers_the_nll_and_repeats_exactly():
    corpus, held = _stream(2048, 1), _stream(256, 2)
    runs = []
    for _ in range(2):
        model = LanguageModel(ModelConfig(**CFG), seed=0)
        before = text_nll(model, held, "dense", length=64)
        fit = finetune_text(model, corpus, "dense", steps=30, length=64, tokens_per_step=512, lr=3e-3, seed=4)
        runs.append((before, text_nll(model, held, "dense", length=64), fit["losses"]))
    (before, after, losses), (_, after2, losses2) = runs
    assert after < before - 0.5
    assert losses == losses2 and after == after2  # same seed, same threads: the same run
    assert not any(p.requires_grad for p in model.parameters())  # left in eval mode, frozen


def test_finetune_trains_a_sparse_method_and_its_learned_parts():
    cfg = ModelConfig(**CFG, learned_attention="nsa", learned_options={"compress_block": 8})
    model = LanguageModel(cfg, seed=0)
    learned = {k: v.clone() for k, v in model.state_dict().items() if ".learned." in k}
    method = longattn.method("nsa", block=16, top_n=2, local=1, compress_block=8, compress_stride=4, window=16,
                             q_block=16)
    finetune_text(model, _stream(1024), method, steps=3, length=64, tokens_per_step=256, seed=0)
    moved = [k for k, v in model.state_dict().items() if ".learned." in k and not torch.equal(v, learned[k])]
    assert moved, "NSA's learned parts did not train"
    with pytest.raises(ValueError, match="corpus rows hold"):
        finetune_text(model, _stream(63), method, steps=1, length=64)
