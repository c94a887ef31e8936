"""The tasks suite: perplexity past the trained length inside stories260K, and the llama2c
forward that lets any method (LongHeads included) replace the model's attention."""

import math

import pytest
import torch

import longattn
from longattn.bench.suite import render_markdown
from longattn.models import stories260k
from longattn.models.llama2c import forward, load_checkpoint

pytestmark = pytest.mark.cpu_only(reason="the benchmark is a CPU program, and the llama2.c reader's model lives on the CPU")


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(stories260k() / "stories260K.bin")


def test_forward_with_a_method_equals_the_checkpoint_forward(model):
    tokens = torch.randint(0, model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0))
    ref = forward(model, tokens)  # float64, RoPE on adjacent pairs
    for m in ("dense", longattn.method("landmark", budget=320, block=32, q_block=32, sinks=0, window=0),
              longattn.method("longheads", window=320, chunk=32)):
        got = forward(model, tokens, dtype=torch.float32, method=m)
        torch.testing.assert_close(got.double(), ref, atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="either method= or attention="):
        forward(model, tokens, method="dense", capture=[])


def test_perplexity_part_records_and_in_length_reference(tmp_path):
    from longattn.bench import tasks

    methods = {"dense": longattn.method("dense"), "window": longattn.method("window", window=256)}
    recs = list(tasks.run_perplexity(1024, methods=methods, seed=1))
    assert [r["method"] for r in recs] == ["dense", "window"]
    for r in recs:
        assert r["task"] == "perplexity" and r["length"] == 1024 and r["status"] == "ok"
        assert 1 < r["perplexity"] < 1000 and r["ratio_to_in_length"] == pytest.approx(r["perplexity"] / r["in_length_perplexity"])
    # twice the trained length: dense reads positions it never trained on, the window does not
    assert recs[1]["perplexity"] < recs[0]["perplexity"]
    assert math.isfinite(recs[0]["in_length_perplexity"])


def test_retrieval_part_inside_the_shipped_model_records_every_cell(tmp_path):
    from longattn.bench import tasks

    settings = {"lengths": (256, 1024), "depths": (0.2, 0.8), "n": 2, "needle_lengths": (256,),
                "mqar_lengths": (256,), "mqar_pairs": 4}
    methods = {k: v for k, v in tasks.retrieval_methods().items() if k in ("dense", "longheads")}
    recs = list(tasks.run_retrieval(settings, methods=methods, seed=3))
    cells = [(r["task"], r["length"], r["depth"], r["method"]) for r in recs]
    assert len(cells) == len(set(cells)) == (2 * 2 + 1 + 1) * 2
    for r in recs:
        assert r["status"] == "ok" and 0.0 <= r["accuracy"] <= 1.0 and r["n"] == 2 and r["trained_length"] == 512
    # within the trained length the model retrieves with dense attention
    assert all(r["accuracy"] == 1.0 for r in recs if r["length"] == 256 and r["method"] == "dense")
    for r in recs:
        r["part"] = "retrieval"
    text = render_markdown(tasks.SUITE, {"records": recs, "config": {"seed": 3, "retrieval": settings,
                                                                     "perplexity_tokens": 0}, "parts": {}})
    assert "| passkey · longheads |" in text and "depth 0.2" in text
