"""The training loop: a :class:`~longattn.train.model.LanguageModel` with any mixer, trained on a
task recipe on the CPU, with progress lines, checkpoints and exact resumption.

    model, record = train(ModelConfig(mixer="gla"), MQARTask(), TrainSettings(steps=500), out="run/")

Determinism: the initial weights come from ``settings.seed``, the batch of step ``s`` from
``(seed, s)`` alone (``longattn.train.data``), and nothing else draws random numbers; with the
same thread count (``torch.set_num_threads``) two runs give the same loss at every step, bit for
bit. A run stopped after any step (``until=``, a crash after a checkpoint) and resumed
(``resume=True``) continues exactly as the uninterrupted run: the resume file holds the weights,
the AdamW state and the running log sums of that step.

Objective: cross-entropy of the answer tokens (``data.answer_loss``), optionally plus
``lm_weight`` × next-token cross-entropy of every token. AdamW (decoupled weight decay on matrices
only), linear warm-up then cosine decay to ``final_lr_ratio · lr``, gradient-norm clipping.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longattn.train import checkpoint
from longattn.train.data import MQARTask, RetrievalCurriculum, answer_loss
from longattn.train.model import LanguageModel, ModelConfig

Recipe = RetrievalCurriculum | MQARTask


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings (all recorded in config.json).

    Args:
        seed: seeds the initial weights and every batch.
        steps: optimiser steps.
        lr: peak learning rate; warmup: linear warm-up steps; final_lr_ratio: cosine floor.
        tokens_per_step: batch size in tokens (samples = tokens_per_step // length, at least 2).
        weight_decay, clip: AdamW decay on matrices, gradient-norm clip.
        betas: AdamW's betas.
        lm_weight: weight of a next-token loss on every token (0: answers only).
        method: the attention method of attention mixers during training (must be
            differentiable; recurrent mixers ignore it). None: "dense".
        method_options: the method's parameters (``longattn.method(method, **method_options)``),
            e.g. ``{"block": 64}`` for ``landmark_trained``.
        checkpoint_every: write the resume file every this many steps (0: only at the end).
        log_every: a progress line (and a history row) every this many steps.
    """

    seed: int = 0
    steps: int = 3000
    lr: float = 3e-3
    warmup: int = 100
    final_lr_ratio: float = 0.05
    tokens_per_step: int = 4096
    weight_decay: float = 0.01
    clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    lm_weight: float = 0.0
    method: str | None = None
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint_every: int = 0
    log_every: int = 50

    def __post_init__(self):
        for name in ("steps", "tokens_per_step", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("warmup", "checkpoint_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not isinstance(self.method_options, dict):
            raise TypeError(f"method_options must be a dict, got {type(self.method_options).__name__}")
        if self.method_options:
            self.training_method()  # a bad option is named now, not at the first step

    def training_method(self):
        """The method attention mixers train with: a name, or the method built with its options."""
        if not self.method_options:
            return self.method
        import longattn

        return longattn.method(self.method or "dense", **self.method_options)

    def lr_at(self, step: int) -> float:
        """Linear warm-up to ``lr``, then cosine decay to ``lr · final_lr_ratio``."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        frac = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.final_lr_ratio + (1 - self.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def make_optimizer(model: LanguageModel, s: TrainSettings) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (``dim >= 2``) only; ``foreach=False`` keeps the update
    order, and so the bits, independent of how torch groups the tensors."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=s.lr, betas=s.betas, foreach=False)


def optimizer_step(model: LanguageModel, opt: torch.optim.Optimizer, loss: torch.Tensor, s: TrainSettings,
                   step: int) -> float:
    """One update from ``loss`` at ``step`` (0-based): the schedule's learning rate, gradients
    clipped to ``s.clip``; returns the loss value. A non-finite loss raises ``FloatingPointError``
    before anything is updated."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"the loss became {value} at step {step + 1}; lower lr (now {s.lr}) or raise clip")
    for g in opt.param_groups:
        g["lr"] = s.lr_at(step)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip, foreach=False)
    opt.step()
    return value


def _plain(x: Any) -> Any:
    """``x`` as it comes back from JSON (tuples become lists), for comparing with a checkpoint."""
    return json.loads(json.dumps(x))


def _machine() -> dict[str, Any]:
    from longattn.bench.harness import _cpu_model

    return {"threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpu_model": _cpu_model()}


def train(config: ModelConfig, task: Recipe, settings: TrainSettings = TrainSettings(), *,
          out: str | Path | None = None, resume: bool = False, until: int | None = None,
          log: Callable[[str], None] | None = print,
          evaluate: Callable[[LanguageModel], dict[str, Any]] | None = None,
          model_cls: type[LanguageModel] = LanguageModel) -> tuple[LanguageModel, dict[str, Any]]:
    """Train a fresh model (or resume one) and return it with its training record.

    Args:
        config: the architecture (its ``max_train_length`` must cover the task's longest batch).
        task: the recipe (``RetrievalCurriculum``, ``MQARTask``).
        settings: optimisation settings.
        out: checkpoint directory: ``trainer.safetensors`` every ``checkpoint_every`` steps and at
            the end, ``model.safetensors`` + ``config.json`` at the end. None: nothing is written.
        resume: continue from ``out/trainer.safetensors`` (its settings must match).
        until: stop after this many steps (a checkpoint is written when ``out`` is given) — a
            planned interruption; ``resume=True`` later continues to ``settings.steps``.
        log: receives one progress line every ``log_every`` steps (None: silent).
        evaluate: called on the final model; its dict goes into config.json's ``evaluation``.
        model_cls: the model class to build (a subclass of ``LanguageModel``).

    Returns:
        ``(model in eval mode, record)``; the record holds the settings, the task, the loss of
        every step (``losses``), history rows, the wall time and tokens per second.
    """
    if task.longest > config.max_train_length:
        raise ValueError(f"the task's longest sequence ({task.longest}) exceeds the config's "
                         f"max_train_length={config.max_train_length}")
    if resume and out is None:
        raise ValueError("resume=True needs out= (the folder holding trainer.safetensors)")
    if until is not None and (isinstance(until, bool) or not isinstance(until, int) or not 0 < until <= settings.steps):
        raise ValueError(f"until must be an int in [1, steps={settings.steps}], got {until!r}")
    stop = settings.steps if until is None else until
    settings_rec = {**dataclasses.asdict(settings), "betas": list(settings.betas)}
    model = model_cls(config, seed=settings.seed)
    opt = make_optimizer(model, settings)
    progress: dict[str, Any] = {"step": 0, "losses": [], "history": [], "window": [0.0, 0.0], "elapsed_s": 0.0,
                                "tokens": 0}
    if resume:
        progress = checkpoint.load_trainer_state(out, model, opt)
        if progress.get("settings") != _plain(settings_rec) or progress.get("task") != _plain(task.to_dict()) \
                or progress.get("model") != _plain(config.to_dict()):
            raise ValueError(f"{Path(out) / checkpoint.TRAINER_FILE} was written by a run with other settings, "
                             "task or model; resume it with the same ones")
    progress.update(settings=_plain(settings_rec), task=_plain(task.to_dict()), model=_plain(config.to_dict()))
    method = settings.training_method()
    t0 = time.perf_counter() - float(progress["elapsed_s"])
    run_loss, run_acc = progress["window"]
    model.train()
    step = int(progress["step"])
    while step < stop:
        batch = task.batch(step, settings.seed, settings.tokens_per_step)
        loss, hits = answer_loss(model, batch, method, lm_weight=settings.lm_weight)
        value = optimizer_step(model, opt, loss, settings, step)
        progress["losses"].append(value)
        progress["tokens"] += batch.tokens.numel()
        run_loss += value
        run_acc += float(hits.all(-1).float().mean())
        step += 1
        if step % settings.log_every == 0 or step == settings.steps:
            k = (step - 1) % settings.log_every + 1
            elapsed = time.perf_counter() - t0
            row = {"step": step, "loss": round(run_loss / k, 4), "sample_acc": round(run_acc / k, 4),
                   "elapsed_s": round(elapsed, 1)}
            progress["history"].append(row)
            if log is not None:
                eta = elapsed / step * (settings.steps - step)
                log(f"step {step:5d}/{settings.steps}  loss {row['loss']:.4f}  exact {row['sample_acc']:.3f}  "
                    f"lr {settings.lr_at(step - 1):.2e}  {progress['tokens'] / max(elapsed, 1e-9):,.0f} tok/s  "
                    f"{elapsed:.0f}s (eta {eta:.0f}s)")
            run_loss = run_acc = 0.0
        progress["step"] = step
        if out is not None and settings.checkpoint_every and step % settings.checkpoint_every == 0 and step < stop:
            progress.update(window=[run_loss, run_acc], elapsed_s=time.perf_counter() - t0)
            checkpoint.save_trainer_state(out, model, opt, progress)
    elapsed = time.perf_counter() - t0
    progress.update(window=[run_loss, run_acc], elapsed_s=elapsed)
    model.eval()
    record = {
        **settings_rec,
        "task": task.to_dict(),
        "max_length": task.longest,
        "loss": "cross-entropy of answer tokens + lm_weight x next-token cross-entropy of all tokens",
        "data": "longattn.train.data: the batch of step s depends on (seed, s) only",
        "optimizer": "AdamW, linear warm-up, cosine decay",
        "steps_done": step,
        "wall_s": round(elapsed, 1),
        "tokens_per_s": round(progress["tokens"] / max(elapsed, 1e-9), 1),
        **_machine(),
        "history": progress["history"],
        "losses": progress["losses"],
    }
    if out is not None:
        checkpoint.save_trainer_state(out, model, opt, progress)
        if step == settings.steps:
            evaluation = evaluate(model) if evaluate is not None else {}
            checkpoint.save_model(model, out, training=record, evaluation=evaluation)
    return model, record
