"""The tasks suite: perplexity past the trained length inside stories260K, and the llama2c
forward that lets any method (LongHeads included) replace the model's attention."""

import math

import pytest
import torch

import longattn
from longattn.models.llama2c import forward, load_checkpoint, stories260k_dir

pytestmark = pytest.mark.skipif(stories260k_dir() is None, reason="stories260K checkpoint not found")


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(stories260k_dir() / "stories260K.bin")


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
    recs = tasks.run_perplexity(1024, methods=methods, seed=1)
    assert [r["method"] for r in recs] == ["dense", "window"]
    for r in recs:
        assert r["task"] == "perplexity" and r["length"] == 1024 and r["status"] == "ok"
        assert 1 < r["perplexity"] < 1000 and r["ratio_to_in_length"] == pytest.approx(r["perplexity"] / r["in_length_perplexity"])
    # twice the trained length: dense reads positions it never trained on, the window does not
    assert recs[1]["perplexity"] < recs[0]["perplexity"]
    assert math.isfinite(recs[0]["in_length_perplexity"])
