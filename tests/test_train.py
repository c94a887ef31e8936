"""The training harness (longattn.train): one model class for every mixer, determinism, exact
resumption, checkpoints, and state carried across calls."""

import json

import pytest
import torch

from longattn.recurrent.layers import LAYERS
from longattn.tasks import VOCAB, mqar
from longattn.train import (
    LanguageModel,
    ModelConfig,
    MQARTask,
    RetrievalCurriculum,
    TrainSettings,
    load_model,
    read_config,
    train,
)
from longattn.train import checkpoint

pytestmark = pytest.mark.cpu_only(reason="training runs on the CPU")

TINY = ModelConfig(vocab_size=VOCAB.size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48,
                   max_train_length=64)
TASK = MQARTask(length=64, pairs=(2, 4, 8))
FAST = TrainSettings(seed=3, steps=6, lr=3e-3, warmup=2, tokens_per_step=512, log_every=2)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_same_seed_same_threads_gives_the_same_loss_curve_bit_for_bit():
    m1, r1 = train(TINY, TASK, FAST, log=None)
    m2, r2 = train(TINY, TASK, FAST, log=None)
    assert len(r1["losses"]) == FAST.steps and r1["losses"] == r2["losses"]
    _same_weights(m1, m2)
    _, r3 = train(TINY, TASK, TrainSettings(**{**FAST.__dict__, "seed": 4}), log=None)
    assert r3["losses"] != r1["losses"]


def test_resume_from_a_checkpoint_continues_exactly(tmp_path):
    full, rec_full = train(TINY, TASK, FAST, log=None)
    settings = TrainSettings(**{**FAST.__dict__, "checkpoint_every": 2})
    _, part = train(TINY, TASK, settings, out=tmp_path, until=3, log=None)  # stops mid log window
    assert part["steps_done"] == 3 and not (tmp_path / "model.safetensors").exists()
    resumed, rec = train(TINY, TASK, settings, out=tmp_path, resume=True, log=None)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert rec["losses"] == rec_full["losses"] and strip(rec["history"]) == strip(rec_full["history"])
    _same_weights(resumed, full)
    back = load_model(tmp_path)
    _same_weights(back, full)
    meta = read_config(tmp_path)
    assert meta["training"]["seed"] == 3 and meta["training"]["task"]["name"] == "mqar"
    assert meta["model"]["dim"] == 32 and meta["training"]["threads"] == torch.get_num_threads()


def test_resume_refuses_other_settings_or_a_missing_checkpoint(tmp_path):
    train(TINY, TASK, FAST, out=tmp_path, until=2, log=None)
    with pytest.raises(ValueError, match="other settings"):
        train(TINY, TASK, TrainSettings(**{**FAST.__dict__, "lr": 1e-3}), out=tmp_path, resume=True, log=None)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(TINY, TASK, FAST, out=tmp_path / "empty", resume=True, log=None)
    with pytest.raises(ValueError, match="resume=True needs out"):
        train(TINY, TASK, FAST, resume=True, log=None)


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    settings = TrainSettings(**{**FAST.__dict__, "checkpoint_every": 2})
    train(TINY, TASK, settings, out=tmp_path, until=2, log=None)
    before = (tmp_path / checkpoint.TRAINER_FILE).read_bytes()
    import safetensors.torch

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="training checkpoint"):
        train(TINY, TASK, settings, out=tmp_path, resume=True, until=4, log=None)
    assert (tmp_path / checkpoint.TRAINER_FILE).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_progress_lines_name_step_loss_and_speed():
    lines: list[str] = []
    train(TINY, TASK, FAST, log=lines.append)
    assert len(lines) == 3 and lines[-1].startswith("step     6/6") and "tok/s" in lines[-1]


@pytest.mark.parametrize("short_conv", [0, 4])
@pytest.mark.parametrize("mixer", ["attention", *sorted(LAYERS)])
def test_every_mixer_trains_and_carries_its_state_across_calls(mixer, short_conv):
    """One optimiser step moves every parameter; prefill in two pieces and one-token decoding equal
    one pass over the whole sequence."""
    # RAT attends across chunks only: short chunks, so that q and k matter within 64 tokens
    options = {"rat": {"chunk_size": 16}}.get(mixer, {})
    cfg = ModelConfig(**{**TINY.to_dict(), "mixer": mixer, "mixer_options": options, "short_conv": short_conv})
    model = LanguageModel(cfg, seed=1)
    if short_conv:  # trained taps, not the identity it starts as
        with torch.no_grad():
            for block in model.layers:
                block.conv.add_(0.3 * torch.randn(block.conv.shape, generator=torch.Generator().manual_seed(2)))
    batch = mqar(64, 4, 2, seed=0)
    logits = model(batch.tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch.tokens[:, 1:].flatten())
    loss.backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
              or p.grad.abs().max() == 0]
    assert not silent, silent
    with torch.no_grad():
        full = model(batch.tokens)
        a, state = model(batch.tokens[:, :37], return_state=True)
        b, state = model(batch.tokens[:, 37:63], state=state, return_state=True)
        c, _ = model(batch.tokens[:, 63:], state=state, return_state=True)
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, atol=2e-5, rtol=2e-5)


def test_short_conv_starts_as_the_identity_and_counts_in_the_state():
    plain = LanguageModel(ModelConfig(**{**TINY.to_dict(), "mixer": "gla"}), seed=5)
    conv = LanguageModel(ModelConfig(**{**TINY.to_dict(), "mixer": "gla", "short_conv": 4}), seed=5)
    tokens = mqar(64, 4, 2, seed=1).tokens
    with torch.no_grad():
        torch.testing.assert_close(conv(tokens), plain(tokens), atol=1e-6, rtol=1e-6)
    assert conv.state_size() == plain.state_size() + 2 * 3 * TINY.dim * 4
    with pytest.raises(ValueError, match="short_conv must be"):
        ModelConfig(short_conv=-1)


def test_model_state_size_grows_with_tokens_only_for_attention():
    att = LanguageModel(TINY)
    gla = LanguageModel(ModelConfig(**{**TINY.to_dict(), "mixer": "gla"}))
    assert att.state_size(0) == 0 and att.state_size(1000) == 2 * att.state_size(500) > 0
    assert gla.state_size(0) == gla.state_size(100_000) > 0


def test_bad_configs_and_settings_are_named():
    with pytest.raises(ValueError, match="mixer must be"):
        ModelConfig(mixer="nope")
    with pytest.raises(ValueError, match="mixer_options apply to recurrent"):
        ModelConfig(mixer_options={"chunk": 16})
    with pytest.raises(ValueError, match="unknown model config field"):
        ModelConfig.from_dict({"dim": 32, "colour": "red"})
    with pytest.raises(ValueError, match="steps must be a positive int"):
        TrainSettings(steps=0)
    with pytest.raises(ValueError, match="max_train_length"):
        train(TINY, MQARTask(length=256), FAST, log=None)
    with pytest.raises(ValueError, match="until must be"):
        train(TINY, TASK, FAST, until=99, log=None)
    with pytest.raises(ValueError, match="too short"):
        MQARTask(length=64, pairs=(32,))
    model = LanguageModel(TINY)
    with pytest.raises(ValueError, match="state must be the list"):
        model(torch.zeros(1, 4, dtype=torch.int64), state=[None])


def test_batches_depend_on_seed_and_step_only():
    cur = RetrievalCurriculum(steps=100, copy_steps=10, max_length=128)
    a, b = cur.batch(50, 7, 1024), cur.batch(50, 7, 1024)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, cur.batch(51, 7, 1024).tokens)
    assert cur.batch(3, 7, 1024).task == "mixture" and cur.batch(3, 7, 1024).length <= 64
    assert json.loads(json.dumps(cur.to_dict()))["name"] == "retrieval"


class _HalfRight(torch.nn.Module):
    """Answers every MQAR query of a sample right except the last one (a test double of the model's
    ``logits_at`` call)."""

    def forward(self, tokens, method=None, logits_at=None):
        b, m = logits_at.shape
        logits = torch.zeros(b, m, VOCAB.size)
        nxt = tokens.gather(1, logits_at + 1)  # the value after each query position
        logits.scatter_(2, nxt[..., None], 1.0)
        logits[:, -1].zero_()
        logits[:, -1, 0] = 1.0  # the last query of each sample: a wrong id
        return logits


def test_mqar_accuracy_per_query_and_per_sample():
    from longattn.train.data import mqar_accuracy

    task = MQARTask(length=64, pairs=(2, 4))
    per_query = mqar_accuracy(_HalfRight(), task, n=8)
    assert per_query == {"mqar@64/2pairs": 0.5, "mqar@64/4pairs": 0.75}
    assert mqar_accuracy(_HalfRight(), task, n=8, per="sample") == {"mqar@64/2pairs": 0.0, "mqar@64/4pairs": 0.0}
    with pytest.raises(ValueError, match="per must be"):
        mqar_accuracy(_HalfRight(), task, per="token")


def test_mqar_pairs_ramp_grows_from_the_easiest_count():
    task = MQARTask(length=64, pairs=(8, 2, 12, 4), copy_steps=10, pairs_ramp=30)
    assert task.pairs_at(0) == task.pairs_at(10) == (2,)
    assert task.pairs_at(20) == (2, 4) and task.pairs_at(30) == (2, 4, 8)
    assert task.pairs_at(40) == task.pairs_at(10_000) == (2, 4, 8, 12)
    drawn = {task.batch(s, 0, 640).answer_mask.sum(-1)[0].item() for s in range(10, 15)}
    assert drawn == {2}
    assert MQARTask(length=64, pairs=(8, 2)).pairs_at(0) == (8, 2)  # no ramp: as given
    with pytest.raises(ValueError, match="pairs_ramp"):
        MQARTask(length=64, pairs=(2,), pairs_ramp=-1)
