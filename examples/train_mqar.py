"""Train a small Gated DeltaNet language model on associative recall (MQAR) with the harness, stop it
half-way, resume it, and check the resumed run equals the uninterrupted one (longattn.train)."""

import tempfile

from longattn.tasks import VOCAB
from longattn.train import ModelConfig, MQARTask, TrainSettings, load_model, train

config = ModelConfig(vocab_size=VOCAB.size, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, hidden_dim=64,
                     max_train_length=64, mixer="gated_deltanet")
task = MQARTask(length=64, pairs=(2, 4))
settings = TrainSettings(seed=0, steps=8, tokens_per_step=512, warmup=2, checkpoint_every=4, log_every=4)

with tempfile.TemporaryDirectory() as out:
    _, whole = train(config, task, settings, log=None)
    train(config, task, settings, out=out, until=4, log=None)  # stopped after 4 steps ...
    _, resumed = train(config, task, settings, out=out, resume=True, log=None)  # ... and resumed
    print("resumed == uninterrupted:", resumed["losses"] == whole["losses"])
    model = load_model(out)  # model.safetensors + config.json
print("mixer:", model.config.mixer, "| state bytes per sequence:", model.state_size())
