"""Train the tiny retrieval model (``longattn.models.retrieval``) on the synthetic task mixture
at <= 512 tokens, on the CPU, in minutes.

    python -m longattn.models.train_retrieval --out DIR --seed 0 --steps 3000

Schedule: first ``copy_steps`` steps of the copy task alone at 32–64 tokens (the induction circuit
forms there), then the mixture of passkey / needle / MQAR / copy at random depths
(``longattn.tasks.mixture``) with the longest length growing to 512. Each step draws one length
(a multiple of 16) and a batch of ``tokens_per_step // length`` samples; the loss is the
cross-entropy of the answer tokens only (filler is unpredictable, or a fixed passage that teaches
n-grams). AdamW with linear warm-up and cosine decay. Everything is seeded: the same seed, steps
and thread count give the same weights. The checkpoint (safetensors + config.json with the seed,
the settings, the wall time and the final accuracies at <= 512 tokens) is written to ``--out``.

The shipped ``weights/retrieval-tiny`` is ``--seed 0 --steps 3000`` with the defaults below
(about 8 minutes on the project's 2-core CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from longattn.models import retrieval
from longattn.models.retrieval import RetrievalConfig, RetrievalModel
from longattn.tasks import synthetic


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Training hyper-parameters (all recorded in config.json).

    Args:
        seed: seeds the initial weights and every batch.
        steps: optimiser steps.
        lr: peak learning rate; warmup: linear warm-up steps; final_lr_ratio: cosine floor.
        tokens_per_step: batch size in tokens (samples = tokens_per_step // length, at least 2).
        min_length, max_length: training lengths (max_length is the model's trained length).
        weight_decay, clip: AdamW decay on matrices, gradient-norm clip.
        mixture_weights: probabilities of passkey, needle, MQAR, copy.
        lm_weight: weight of an extra next-token loss on every token (0: answers only; filler
            is unpredictable or a fixed passage, so it mostly teaches n-grams).
        copy_steps: the first steps train on the copy task alone (``synthetic.copy``) at
            ``min_length … start_length`` tokens. Every copied token needs the induction circuit,
            and with many short samples per step it forms in a few hundred steps (measured here:
            ~190 steps at 32 tokens × 128 samples, ~740 at 128 × 32, none within 1,500 at
            128 × 16); the retrieval tasks alone, with their few answers, stayed on the plateau
            for 1,500 steps.
        start_length, ramp: after the copy steps, the longest length drawn grows linearly from
            ``start_length`` to ``max_length`` over the next ``ramp`` share of the steps.
    """

    seed: int = 0
    steps: int = 3000
    lr: float = 3e-3
    warmup: int = 100
    final_lr_ratio: float = 0.05
    tokens_per_step: int = 4096
    min_length: int = 32
    start_length: int = 64
    copy_steps: int = 300
    max_length: int = 512
    weight_decay: float = 0.01
    clip: float = 1.0
    mixture_weights: tuple[float, float, float, float] = (0.3, 0.2, 0.2, 0.3)
    lm_weight: float = 0.0
    ramp: float = 0.4


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr · final_lr_ratio``."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    frac = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (s.final_lr_ratio + (1 - s.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def training_loss(model: RetrievalModel, batch: synthetic.TaskBatch, lm_weight: float):
    """Answer cross-entropy + ``lm_weight`` × next-token cross-entropy of all tokens; and the
    per-answer hits ``[n, m]``."""
    if lm_weight == 0:
        return retrieval.answer_loss(model, batch)
    logits = retrieval.forward(model, batch.tokens)  # [B, T, V]
    lm = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch.tokens[:, 1:].flatten())
    at = logits.gather(1, (batch.answer_pos - 1)[..., None].expand(-1, -1, logits.shape[-1]))
    targets, mask = batch.targets, batch.answer_mask
    ce = torch.nn.functional.cross_entropy(at.transpose(1, 2), targets, reduction="none")
    hits = (at.argmax(-1) == targets) | ~mask
    return (ce * mask).sum() / mask.sum() + lm_weight * lm, hits


def final_evaluation(model: RetrievalModel, *, seed: int = 12345, n: int = 32) -> dict[str, Any]:
    """Dense accuracies at the trained lengths: passkey at 256/512 over depths 0/0.25/0.5/0.75/1,
    needle (2 distractors) and MQAR (8 pairs) at 512. Seeds differ from every training batch."""
    out: dict[str, Any] = {"method": "dense", "n_per_cell": n, "seed": seed}
    for length in (256, 512):
        for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
            acc = retrieval.evaluate(model, synthetic.passkey(length, depth, n, seed), batch_size=n)
            out[f"passkey@{length}/depth{depth:g}"] = acc.accuracy
        out[f"needle@{length}/depth0.5"] = retrieval.evaluate(
            model, synthetic.needle(length, 0.5, n, seed), batch_size=n).accuracy
    out["mqar@512/8pairs"] = retrieval.evaluate(model, synthetic.mqar(512, 8, n, seed), batch_size=n).accuracy
    return out


def train(settings: TrainSettings = TrainSettings(), config: RetrievalConfig = RetrievalConfig(), *,
          log: Callable[[str], None] | None = print, log_every: int = 50) -> tuple[RetrievalModel, dict[str, Any]]:
    """Train a fresh model; returns it and the training record (settings, wall time, last losses)."""
    if settings.max_length > config.max_train_length:
        raise ValueError(f"max_length={settings.max_length} exceeds the config's max_train_length="
                         f"{config.max_train_length}")
    if not 32 <= settings.min_length <= settings.start_length <= settings.max_length:
        raise ValueError(f"need 32 <= min_length <= start_length <= max_length, got {settings.min_length}, "
                         f"{settings.start_length} and {settings.max_length}")
    model = RetrievalModel(config, seed=settings.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(settings.seed)
    lengths = torch.arange(settings.min_length // 16, settings.max_length // 16 + 1) * 16
    t0 = time.perf_counter()
    run_loss = run_acc = 0.0
    history = []
    model.train()
    for step in range(settings.steps):
        warm = step < settings.copy_steps
        frac = 0.0 if warm else min(1.0, (step - settings.copy_steps) / max(1.0, settings.ramp * settings.steps))
        top = settings.start_length + (settings.max_length - settings.start_length) * frac
        allowed = lengths[lengths <= max(top, lengths[0])]
        length = int(allowed[torch.randint(len(allowed), (1,), generator=gen, device=gen.device)])
        n = max(2, settings.tokens_per_step // length)
        weights = (0.0, 0.0, 0.0, 1.0) if warm else settings.mixture_weights
        batch = synthetic.mixture(length, n, seed=settings.seed * 1_000_003 + step, weights=weights)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, settings)
        loss, hits = training_loss(model, batch, settings.lm_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
        opt.step()
        run_loss += float(loss.detach())
        run_acc += float(hits.all(-1).float().mean())
        if (step + 1) % log_every == 0 or step + 1 == settings.steps:
            k = (step % log_every) + 1
            row = {"step": step + 1, "loss": round(run_loss / k, 4), "sample_acc": round(run_acc / k, 4),
                   "elapsed_s": round(time.perf_counter() - t0, 1)}
            history.append(row)
            if log is not None:
                log(f"step {row['step']:5d}  loss {row['loss']:.4f}  exact {row['sample_acc']:.3f}  "
                    f"lr {lr_at(step, settings):.2e}  {row['elapsed_s']:.0f}s")
            run_loss = run_acc = 0.0
    model.eval()
    record = {
        **dataclasses.asdict(settings),
        "loss": "cross-entropy of answer tokens + lm_weight x next-token cross-entropy of all tokens",
        "data": "first copy_steps steps: longattn.tasks.copy only (via mixture weights 0,0,0,1); then longattn.tasks.mixture; one length per step, batch seed = seed * 1000003 + step",
        "optimizer": "AdamW betas (0.9, 0.98), linear warm-up, cosine decay",
        "wall_s": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "history": history,
    }
    return model, record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m longattn.models.train_retrieval", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=TrainSettings.seed)
    p.add_argument("--steps", type=int, default=TrainSettings.steps)
    p.add_argument("--lr", type=float, default=TrainSettings.lr)
    p.add_argument("--lm-weight", type=float, default=TrainSettings.lm_weight)
    p.add_argument("--tokens-per-step", type=int, default=TrainSettings.tokens_per_step)
    p.add_argument("--max-length", type=int, default=TrainSettings.max_length)
    p.add_argument("--dim", type=int, default=RetrievalConfig.dim)
    p.add_argument("--layers", type=int, default=RetrievalConfig.n_layers)
    p.add_argument("--heads", type=int, default=RetrievalConfig.n_heads)
    p.add_argument("--kv-heads", type=int, default=RetrievalConfig.n_kv_heads)
    p.add_argument("--hidden", type=int, default=RetrievalConfig.hidden_dim)
    p.add_argument("--theta", type=float, default=RetrievalConfig.rope_theta)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    settings = TrainSettings(seed=a.seed, steps=a.steps, lr=a.lr, tokens_per_step=a.tokens_per_step,
                             max_length=a.max_length, lm_weight=a.lm_weight)
    config = RetrievalConfig(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads,
                             hidden_dim=a.hidden, rope_theta=a.theta, max_train_length=a.max_length)
    print(f"training {config} ({RetrievalModel(config).n_params():,} parameters), {settings.steps} steps",
          flush=True)
    model, record = train(settings, config, log=lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    evaluation = final_evaluation(model)
    evaluation["wall_s"] = round(time.perf_counter() - t0, 1)
    retrieval.save(model, a.out, training=record, evaluation=evaluation)
    print(f"trained in {record['wall_s']:.0f}s; dense accuracies at <= {settings.max_length} tokens:")
    for key, value in evaluation.items():
        if "@" in key:
            print(f"  {key:28s} {value:.3f}")
    print(f"wrote {a.out}/model.safetensors and config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
