"""The bundled llama2.c checkpoint (stories260K), read and run directly."""

import pytest
import torch

from longattn.models import stories260k
from longattn.models.llama2c import Tokenizer, forward, generate, load_checkpoint, sample_windows

pytestmark = pytest.mark.cpu_only(reason="the llama2.c reader's float64 model lives on the CPU")

MODEL_DIR = stories260k()


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(MODEL_DIR / "stories260K.bin")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(MODEL_DIR / "tok512.bin")


def test_greedy_text_from_bos_matches_the_published_behaviour(model, tok):
    text = tok.decode([1] + generate(model, 45, temperature=0))
    assert text.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
                           "park. One day, she saw a big, red ball.")


def test_tokenizer_round_trip_and_byte_fallback(tok):
    for s in ("Once upon a time, Lily saw a big dog.", "naïve café ☃"):
        ids = tok.encode(s)
        assert ids[0] == 1 and tok.decode(ids) == s


def test_low_loss_on_a_tinystories_sentence_and_float32_matches_float64(model, tok):
    ids = torch.tensor([tok.encode("Once upon a time, there was a little girl named Lily. She loved to play "
                                   "outside in the park with her friends.")])
    l64 = forward(model, ids)
    loss = torch.nn.functional.cross_entropy(l64[0, :-1], ids[0, 1:])
    assert loss < 1.0  # uniform guessing: ln 512 = 6.24
    l32 = forward(model, ids, dtype=torch.float32)
    torch.testing.assert_close(l32.double(), l64, atol=2e-4, rtol=1e-4)


def test_cached_decoding_equals_full_forward(model):
    ids = generate(model, 30, seed=3, temperature=1.0)
    seq = torch.tensor([[1] + ids[:29]])
    full = forward(model, seq).argmax(-1)[0]
    greedy = generate(model, 1, temperature=0, prompt=[1] + ids[:29])
    assert int(full[-1]) == greedy[0]


def test_capture_gives_post_rope_qkv_per_layer(model):
    cap = []
    forward(model, torch.tensor([[1, 403, 407, 261]]), capture=cap)
    assert len(cap) == 5
    q, k, v = cap[0]
    assert q.shape == (1, 8, 4, 8) and k.shape == (1, 4, 4, 8) and v.shape == (1, 4, 4, 8)


def test_truncated_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes((MODEL_DIR / "stories260K.bin").read_bytes()[:5000])
    with pytest.raises(ValueError, match="ends inside"):
        load_checkpoint(bad)


def test_sampled_windows_are_the_models_own_and_repeat_at_a_seed(model):
    """Batched sampling: each row starts at BOS, is what the model samples (greedy rows equal
    ``generate``'s first story), and a seed repeats it."""
    greedy = sample_windows(model, 2, length=40, temperature=0.0, batch=2)
    story = generate(model, 39, temperature=0.0)
    cut = story.index(1) if 1 in story else 39  # generate restarts its cache at a story's end
    assert greedy[:, 0].tolist() == [1, 1] and greedy[0, 1:1 + cut].tolist() == story[:cut]
    a = sample_windows(model, 5, length=24, seed=3, batch=5)
    assert a.shape == (5, 24) and a.dtype == torch.int64
    assert torch.equal(a, sample_windows(model, 5, length=24, seed=3, batch=5))
    with pytest.raises(ValueError, match="exceeds the model's trained context"):
        sample_windows(model, 1, length=10_000)
    with pytest.raises(ValueError, match="batch"):
        sample_windows(model, 1, length=8, batch=0)
