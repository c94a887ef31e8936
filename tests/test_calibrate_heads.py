"""Per-head KV budgets (longattn.calibrate.heads): RazorAttention / DuoAttention scores computed
through a Subject equal `longattn calibrate-heads` on the same model, MoA's allocation is the exact
knapsack optimum, a head map runs a model as the `heads` cache would keep its keys, and the
`heads` policy of LongattnCache takes per-head windows."""

from __future__ import annotations

import itertools

import pytest
import torch

from longattn.analysis import LanguageModelSubject
from longattn.calibrate.heads import (allocate_windows, check_head_map, head_scores, kept_keys, policy_attend,
                                      window_coverage)


def test_allocation_is_the_best_choice_within_the_total():
    g = torch.Generator().manual_seed(0)
    ws = [8, 16, 64, 256]
    cov = 0.5 + 0.1 * torch.rand(2, 2, 4, generator=g).sort(-1).values   # mass grows a little with the window
    cov[1, 0] = torch.tensor([0.0, 0.0, 0.0, 0.9])                       # a head that needs the far past
    total = 2 * 2 * 80
    got = allocate_windows(cov, ws, total)
    best = max((c for c in itertools.product(range(4), repeat=4) if sum(ws[i] for i in c) <= total),
               key=lambda c: sum(float(cov.view(4, 4)[h, i]) for h, i in enumerate(c)))
    assert got == [[ws[best[0]], ws[best[1]]], [ws[best[2]], ws[best[3]]]]
    assert got[1][0] == 256
    assert sum(map(sum, got)) <= total
    with pytest.raises(ValueError, match="below every head"):
        allocate_windows(cov, ws, 16)


def test_check_head_map_takes_bools_and_windows_and_names_what_is_wrong():
    assert check_head_map({"windows": [[16, True]]}, 1, 2) == [[16, True]]
    assert check_head_map({"retrieval": [[False, True]]}, 1, 2) == [[False, True]]
    with pytest.raises(ValueError, match="1 layers × 2 key heads"):
        check_head_map([[True]], 1, 2)
    with pytest.raises(ValueError, match="positive int window"):
        check_head_map([[0, True]], 1, 2)
    assert kept_keys([[16, True], [False, False]], 2, 2, 512, sinks=4, window=64) == 20 + 512 + 68 + 68


def _tiny_subject(seed=0):
    from longattn.train.model import LanguageModel, ModelConfig

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_train_length=128)
    return LanguageModelSubject(LanguageModel(cfg, seed=seed), "tiny")


def test_an_all_full_map_is_dense_attention_and_a_window_map_is_its_mask():
    subject = _tiny_subject()
    ids = torch.randint(3, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    dense = subject.run(ids)
    full = subject.run(ids, policy_attend([[True, True]] * 2, 2, 2))
    assert torch.allclose(full, dense, atol=1e-5)
    # a window as long as the input keeps everything too; a short one changes the output
    assert torch.allclose(subject.run(ids, policy_attend([[40, 40]] * 2, 2, 2, sinks=0)), dense, atol=1e-5)
    assert not torch.allclose(subject.run(ids, policy_attend([[4, True]] * 2, 2, 2, sinks=1)), dense, atol=1e-3)


def test_window_coverage_is_one_for_windows_covering_everything():
    subject = _tiny_subject()
    ids = torch.randint(3, 64, (1, 24), generator=torch.Generator().manual_seed(2))
    cov = window_coverage(subject, [ids], [1, 8, 24], sinks=0)
    assert torch.allclose(cov[..., 2], torch.ones(2, 2, dtype=torch.float64))
    assert bool((cov[..., 0] <= cov[..., 1] + 1e-12).all())
    rows = torch.tensor([[0, 5]])
    cov_rows = window_coverage(subject, [ids], [1, 8], sinks=0, rows=[rows])
    # row 0 sees only itself: a window of 1 already covers it; row 5 (6 keys) is covered by 8
    assert torch.allclose(cov_rows[..., 1], torch.ones(2, 2, dtype=torch.float64))


def test_razor_scores_through_a_subject_equal_calibrate_heads_on_stories260k():
    pytest.importorskip("transformers")
    from longattn.analysis import stories260k_subject
    from longattn.hf import load_llama2c
    from longattn.memory.calibrate import calibrate_heads

    model, _ = load_llama2c()
    ref = calibrate_heads(model, n_samples=2, length=128, span=8, seed=3, method="razor", window=32)
    got = head_scores(stories260k_subject(), "razor", n_samples=2, length=128, span=8, seed=3, window=32)
    assert torch.allclose(got, torch.tensor(ref["scores"], dtype=torch.float64), atol=1e-4)


def test_heads_policy_keeps_each_heads_own_window():
    pytest.importorskip("transformers")
    import longattn.hf as hf
    from longattn.hf import LongattnCache
    from test_hf import tiny

    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(0))
    cache = LongattnCache(model, "heads", head_map={"windows": [[8, True], [16, 20]]}, sinks=2)
    with torch.no_grad(), hf.apply(model, "dense"):
        model(input_ids=ids, past_key_values=cache)
    assert cache.stats()["tokens"] == [[10, 60], [18, 22]]
