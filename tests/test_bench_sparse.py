"""The sparse suite's accuracy-on-real-attention part, on a short capture."""

import json

import pytest
import torch

import longattn
from longattn.bench import sparse
from longattn.models.llama2c import stories260k_dir


pytestmark = pytest.mark.skipif(stories260k_dir() is None, reason="stories260K not present")


def test_recall_is_exp_lse_gap_and_oracle_is_the_upper_bound():
    layers, tokens = sparse.capture_real_qkv(n_tokens=768, seed=1)
    assert len(layers) == 5 and len(tokens) == 768 and tokens[0] == 1
    methods = sparse.accuracy_methods(block=32, blocks=4)
    records = sparse.evaluate_accuracy(layers, methods)
    rows = sparse.summarise(records)
    for name, row in rows.items():
        assert 0.0 < row["recall"] <= 1.0 and 0.0 < row["density"] < 0.5, (name, row)
    assert rows["block_oracle"]["recall"] >= max(rows["landmark"]["recall"], rows["quest"]["recall"]) - 1e-6
    # recall from the LSE gap equals the true mass inside the selection, computed directly
    q, k, v = layers[2]
    m = methods["streaming"]
    _, st = longattn.attention(q, k, v, causal=True, method=m, return_stats=True)
    _, ref_st = longattn.attention(q, k, v, causal=True, return_stats=True)
    vm = m.visible_mask(768, 768, True).dense(1, 8, 768, 768)
    scores = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) / q.shape[-1] ** 0.5
    causal = torch.ones(768, 768, dtype=torch.bool).tril()
    p = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)  # the true attention
    direct = (p * vm).sum(-1)  # its mass inside the streaming mask
    torch.testing.assert_close(torch.exp(st.lse - ref_st.lse).double(), direct, atol=1e-4, rtol=1e-4)


def test_suite_writes_results_and_report(tmp_path, monkeypatch):
    res = sparse.run_sparse_suite(tmp_path, lengths=[512], methods=["block_oracle", "streaming"], seed=2)
    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in data["records"]} == {"block_oracle", "streaming"}
    assert "| block_oracle |" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="unknown method"):
        sparse.run_sparse_suite(tmp_path, lengths=[512], methods=["nope"])
    assert res["tokens"] == 512
