"""Train the tiny retrieval model (``longattn.models.retrieval``) on the synthetic task mixture
at <= 512 tokens, on the CPU, in minutes, through the training harness ``longattn.train``.

    python -m longattn.models.train_retrieval --out DIR --seed 0 --steps 3000
    longattn train-retrieval --out DIR        # the same
    longattn train --task retrieval --out DIR  # the harness's general command, same recipe

The recipe is ``longattn.train.RetrievalCurriculum``: first ``copy_steps`` steps of the copy task
alone at 32–64 tokens (the induction circuit forms there), then the mixture of passkey / needle /
MQAR / copy at random depths (``longattn.tasks.mixture``) with the longest length growing to 512.
Each step draws one length (a multiple of 16) and a batch of ``tokens_per_step // length``
samples; the loss is the cross-entropy of the answer tokens only. AdamW with linear warm-up and
cosine decay (``longattn.train.TrainSettings``). Everything is seeded: the same seed, steps and
thread count give the same weights. The checkpoint (safetensors + config.json with the seed, the
settings, the wall time and the final accuracies at <= 512 tokens) is written to ``--out``.

The shipped ``weights/retrieval-tiny`` is ``--seed 0 --steps 3000`` with these defaults (about 8
minutes on the project's 2-core CPU), trained by this recipe before it moved into the harness;
``docs/training.md`` reports the harness retraining it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

from longattn.models import retrieval
from longattn.models.retrieval import RetrievalConfig, RetrievalModel
from longattn.tasks import synthetic
from longattn.train import RetrievalCurriculum, TrainSettings, train

#: the shipped model's optimisation settings: the harness's defaults (peak lr 3e-3, 4,096 tokens
#: per step, 3,000 steps, AdamW betas (0.9, 0.98)), with a resume file every 250 steps
SHIPPED_SETTINGS = TrainSettings(checkpoint_every=250)


def final_evaluation(model: RetrievalModel, *, seed: int = 12345, n: int = 32) -> dict[str, Any]:
    """Dense accuracies at the trained lengths: passkey at 256/512 over depths 0/0.25/0.5/0.75/1,
    needle (2 distractors) and MQAR (8 pairs) at 512. Seeds differ from every training batch."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {"method": "dense", "n_per_cell": n, "seed": seed}
    for length in (256, 512):
        for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
            acc = retrieval.evaluate(model, synthetic.passkey(length, depth, n, seed), batch_size=n)
            out[f"passkey@{length}/depth{depth:g}"] = acc.accuracy
        out[f"needle@{length}/depth0.5"] = retrieval.evaluate(
            model, synthetic.needle(length, 0.5, n, seed), batch_size=n).accuracy
    out["mqar@512/8pairs"] = retrieval.evaluate(model, synthetic.mqar(512, 8, n, seed), batch_size=n).accuracy
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m longattn.models.train_retrieval", description=__doc__.split("\n\n")[0])
    d = SHIPPED_SETTINGS
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lm-weight", type=float, default=d.lm_weight)
    p.add_argument("--tokens-per-step", type=int, default=d.tokens_per_step)
    p.add_argument("--max-length", type=int, default=RetrievalCurriculum.max_length)
    p.add_argument("--dim", type=int, default=RetrievalConfig.dim)
    p.add_argument("--layers", type=int, default=RetrievalConfig.n_layers)
    p.add_argument("--heads", type=int, default=RetrievalConfig.n_heads)
    p.add_argument("--kv-heads", type=int, default=RetrievalConfig.n_kv_heads)
    p.add_argument("--hidden", type=int, default=RetrievalConfig.hidden_dim)
    p.add_argument("--theta", type=float, default=RetrievalConfig.rope_theta)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    settings = dataclasses.replace(d, seed=a.seed, steps=a.steps, lr=a.lr, tokens_per_step=a.tokens_per_step,
                                   lm_weight=a.lm_weight)
    task = RetrievalCurriculum(steps=a.steps, max_length=a.max_length)
    config = RetrievalConfig(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads,
                             hidden_dim=a.hidden, rope_theta=a.theta, max_train_length=a.max_length)
    print(f"training {config} ({RetrievalModel(config).n_params():,} parameters), {settings.steps} steps",
          flush=True)
    model, record = train(config, task, settings, out=a.out, resume=a.resume, model_cls=RetrievalModel,
                          log=lambda s: print(s, flush=True), evaluate=lambda m: final_evaluation(m))
    evaluation = retrieval.read_config(a.out)["evaluation"]
    print(f"trained in {record['wall_s']:.0f}s; dense accuracies at <= {a.max_length} tokens:")
    for key, value in evaluation.items():
        if "@" in key:
            print(f"  {key:28s} {value:.3f}")
    print(f"wrote {a.out}/model.safetensors and config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
