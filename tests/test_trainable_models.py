"""Trainable sparse attention in models: learned parts held by the model's attention blocks, the
training harness with method options and landmark data, the CLI, DSA's indexer distillation and
mass recall, the bundled landmark model and the trainable benchmark suite."""

from __future__ import annotations

import json
import math

import pytest
import torch

import longattn
from longattn.calibrate.indexer import LayerQK, distill_indexer, dsa_for, indexer_kl, kept_keys, recall_of
from longattn.methods.dsa import DSAIndexer
from longattn.methods.nsa import NSAParams
from longattn.train import LanguageModel, ModelConfig, RetrievalCurriculum, TrainSettings, load_model, save_model, train
from longattn.train.landmarks import LANDMARK_ID, WithLandmarks

SMALL = dict(vocab_size=LANDMARK_ID + 1, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
             max_train_length=140)


def test_learned_parts_live_in_the_blocks_and_bind_to_the_method(tmp_path):
    cfg = ModelConfig(**SMALL, learned_attention="nsa", learned_options={"compress_block": 8})
    model = LanguageModel(cfg)
    assert all(isinstance(b.learned, NSAParams) for b in model.layers)
    # built zero (φ = mean, gates at ½), not overwritten by the model's N(0, 0.02) init
    assert float(model.layers[0].learned.mix_k.abs().sum()) == 0.0
    tokens = torch.randint(0, 100, (2, 48))
    m = longattn.method("nsa", block=8, top_n=3, local=1, compress_block=8, compress_stride=4, window=8, q_block=8)
    logits = model(tokens, method=m)
    logits.square().mean().backward()
    assert float(model.layers[1].learned.gate_w.grad.abs().sum()) > 0
    save_model(model, tmp_path / "m")
    again = load_model(tmp_path / "m")
    torch.testing.assert_close(again(tokens, method=m), logits.detach())
    with pytest.raises(ValueError, match="learned_attention"):
        ModelConfig(**SMALL, learned_attention="nope")
    with pytest.raises(ValueError, match="without learned_attention"):
        ModelConfig(**SMALL, learned_options={"index_heads": 2})
    with pytest.raises(TypeError, match="index_heads"):
        ModelConfig(**SMALL, learned_attention="dsa_indexer", learned_options={"index_heads": 2.5})


def test_training_runs_with_each_trainable_method():
    """A few steps of the harness with every trainable method: finite losses that fall, and the
    learned parts move."""
    setups = [
        (dict(), "moba", {"block": 16, "top_k": 3, "q_block": 16}, None),
        (dict(learned_attention="nsa", learned_options={"compress_block": 8}), "nsa",
         {"block": 16, "top_n": 3, "local": 1, "compress_block": 8, "compress_stride": 4, "window": 16, "q_block": 16},
         None),
        (dict(), "landmark_trained", {"block": 16}, 16),
    ]
    for extra, method, options, landmarks in setups:
        recipe = RetrievalCurriculum(steps=12, max_length=128, copy_steps=4)
        if landmarks:
            recipe = WithLandmarks(recipe.to_dict(), block=landmarks)
        cfg = ModelConfig(**{**SMALL, "max_train_length": recipe.longest}, **extra)
        settings = TrainSettings(steps=12, warmup=2, tokens_per_step=512, method=method, method_options=options,
                                 log_every=6)
        model, record = train(cfg, recipe, settings, log=None)
        losses = record["losses"]
        assert all(math.isfinite(x) for x in losses) and min(losses[-4:]) < losses[0], (method, losses)
        if extra:
            assert float(model.layers[0].learned.mix_k.abs().sum()) > 0
    with pytest.raises(TypeError, match="top_k"):
        TrainSettings(method="moba", method_options={"top_k": "3"})


def test_cli_trains_a_landmark_model(tmp_path):
    from typer.testing import CliRunner

    from longattn.cli import app

    out = tmp_path / "lm"
    res = CliRunner().invoke(app, ["train", "--task", "retrieval", "--landmarks", "16", "--length", "64", "--dim", "16",
                                   "--heads", "2", "--steps", "3", "--tokens-per-step", "256", "--out", str(out)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["vocab_size"] == LANDMARK_ID + 1 and cfg["training"]["method"] == "landmark_trained"
    assert cfg["training"]["method_options"] == {"block": 16}
    assert cfg["training"]["task"]["name"] == "landmarks" and "passkey@512/depth0.5" in cfg["evaluation"]
    res = CliRunner().invoke(app, ["train", "--landmarks", "16", "--mixer", "gla", "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "landmark_trained" in res.output


# ----------------------------------------------------------------------------- indexer distillation

def _captured(seed: int, n: int = 3, t: int = 96) -> list[LayerQK]:
    """The retrieval model's q/k on a few passkey samples."""
    from longattn.models import retrieval
    from longattn.tasks import synthetic

    model = retrieval.load()
    cap: list = []
    with torch.no_grad():
        model(synthetic.passkey(t, 0.5, n, seed).tokens, capture=cap)
    return [LayerQK(q, k, q.shape[-1] ** -0.5) for q, k, _ in cap]


def test_distillation_fits_the_indexer_and_raises_its_recall():
    train_qk, held = _captured(0), _captured(1)
    hq, hk, d = train_qk[0].q.shape[1], train_qk[0].k.shape[1], train_qk[0].q.shape[-1]
    indexers = [DSAIndexer(d, hq, hk, index_heads=2, index_dim=8, seed=i) for i in range(len(train_qk))]
    before = [recall_of(dsa_for(ix, 16), [qk], 16) for ix, qk in zip(indexers, held)]
    fit = distill_indexer(train_qk, indexers, steps=60, batch=2)
    after = [recall_of(dsa_for(ix, 16), [qk], 16) for ix, qk in zip(indexers, held)]
    for f in fit:
        assert f["kl_after"] < 0.5 * f["kl_before"], f
    assert sum(after) > sum(before)
    with pytest.raises(ValueError, match="indexers"):
        distill_indexer(train_qk, indexers[:1] * 2 + indexers, steps=1)


def test_kept_keys_are_the_methods_own_selection():
    qk = _captured(2, n=1, t=64)[1]
    q, k = qk.q, qk.k
    # tokenselect: every query keeps its own top-budget keys by exact score (ties aside), causal
    keep = kept_keys(longattn.method("tokenselect", budget=8), q, k, qk.scale)
    assert keep.shape == (1, q.shape[1], 64, 64)
    assert bool((keep.sum(-1) == torch.clamp(torch.arange(64) + 1, max=8)).all())
    assert not bool((keep & ~torch.ones(64, 64, dtype=torch.bool).tril()).any())
    # the identity indexer's ranking is shared by the query heads of a group
    keep = kept_keys(dsa_for(None, 8), q, k, qk.scale)
    assert torch.equal(keep[:, 0], keep[:, 1])
    # a block selector: whole blocks per query block, the same as the method's stats
    m = longattn.method("quest", budget=24, block=8, q_block=8, sinks=0, window=0)
    keep = kept_keys(m, q, k, qk.scale)
    _, st = longattn.attention(q, k, qk.q.new_zeros(k.shape), causal=True, method=m, return_stats=True)
    assert float(keep.sum()) / (q.shape[1]) == pytest.approx(st.density * 64 * 65 / 2)


def test_indexer_kl_is_zero_only_for_the_target():
    qk = _captured(3, n=1, t=32)[0]
    ix = DSAIndexer(qk.q.shape[-1], qk.q.shape[1], qk.k.shape[1], index_heads=1, index_dim=4)
    assert float(indexer_kl(ix, qk.q, qk.k, qk.scale)) > 0.0


# ---------------------------------------------------------------------------- the bundled model

def test_the_bundled_landmark_model_retrieves_past_its_trained_length():
    """Landmark retrieval at 4× the trained length: the passkey is found at every depth tried."""
    from longattn.models import landmark_tiny
    from longattn.tasks import synthetic
    from longattn.train import read_config
    from longattn.train.data import evaluate
    from longattn.train.landmarks import with_landmarks

    folder = landmark_tiny()
    cfg = read_config(folder)
    assert cfg["training"]["method"] == "landmark_trained" and cfg["model"]["max_train_length"] <= 520
    model = load_model(folder)
    m = longattn.method("landmark_trained", block=64, top_k=4)
    for depth in (0.1, 0.5, 0.9):
        batch = with_landmarks(synthetic.passkey(2048, depth, 2, seed=7), block=64)
        assert evaluate(model, batch, m, batch_size=2).accuracy == 1.0, depth


def test_trainable_suite_runs_tiny(tmp_path):
    from rich.console import Console

    from longattn.bench import get_suite
    from longattn.bench.suite import run_suite

    con = Console(file=open(tmp_path / "console.txt", "w"), width=100)
    res = run_suite(get_suite("trainable"), tmp_path / "out", console=con, lengths=[512], depths=[0.5], n=1,
                    retrofit_train=1, retrofit_eval=1, retrofit_steps=2, budget=64, train_steps=2, train_eval=[128],
                    train_n=1, stories_steps=2, stories_corpus=512, stories_held_out=512, stories_eval=[256],
                    methods=["landmark_trained (top-4)", "dense", "moba"])
    assert res["status"] == "ok", [r for r in res["records"] if r["status"] != "ok"][:3]
    parts = {r["part"] for r in res["records"]}
    assert parts == {"landmark", "memory", "retrofit", "stories", "trained", "throughput", "prefill"}
    prefill = {r["method"]: r for r in res["records"] if r["part"] == "prefill"}
    assert set(prefill) == {"sdpa", "moba"} and prefill["moba"]["ratio_to_sdpa"] > 0
    assert 0 < prefill["moba"]["density"] < 1 and prefill["moba"]["rel_err"] < 1
    stories = {r["method"]: r for r in res["records"] if r["part"] == "stories"}
    assert set(stories) == {"dense", "moba"}
    # two fine-tuning steps barely move a pretrained model: its NLL stays near where it started
    assert all(abs(r["nll@256"] - r["nll_before@256"]) < 0.5 and r["tokens_per_s"] > 0 for r in stories.values())
    # the memory reads a block per step and retrieves what the method over the whole sequence does
    (mem,) = [r for r in res["records"] if r["part"] == "memory"]
    (whole,) = [r for r in res["records"] if r["part"] == "landmark" and r["method"] == "landmark_trained (top-4)"]
    assert mem["accuracy"] == whole["accuracy"] and 0 < mem["peak_hot_tokens"] < mem["context_tokens"]
    retro = {r["method"]: r for r in res["records"] if r["part"] == "retrofit"}
    assert 0.0 < retro["tokenselect (exact per-head top-k)"]["recall"] <= 1.0
    assert retro["dense"]["nll"] > 0 and retro["dsa_indexer, distilled"]["nll"] > 0
    trained = {r["method"]: r for r in res["records"] if r["part"] == "trained"}
    assert set(trained) == {"dense", "moba"} and 0.0 < trained["moba"]["density@512"] < 1.0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "DSA indexer retrofit" in report and "Trained from scratch" in report and "LandmarkMemory" in report
    page = (tmp_path / "out" / "report.html").read_text()  # a suite run on its own gets its page
    assert "Trained from scratch" in page and "LandmarkMemory" in page and "Suites not run" not in page
