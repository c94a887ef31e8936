"""Checkpoints of :class:`longattn.train.model.LanguageModel`: the model folder and the resume file.

A checkpoint directory holds

* ``model.safetensors`` — the weights in float32;
* ``config.json`` — ``{"format", "model": ModelConfig, "vocab", "training", "evaluation"}``: the
  architecture, the vocabulary it was trained on, the training settings and record (seed, task,
  thread count, wall time, loss history) and measured accuracies;
* ``trainer.safetensors`` (while and after training) — everything a resumed run needs in ONE file:
  the weights (``model.<name>``), the optimiser state (``optim.<index>.<key>``) and, in the
  metadata, the step reached, the optimiser's hyper-parameters and the losses so far. One file
  written atomically (``longattn.files.save_safetensors``) means a crash mid-write leaves the
  previous checkpoint whole, and weights and optimiser state can never come from different steps.

Every file is written atomically; readers check the format tag and name what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from longattn.files import atomic_write_json, save_safetensors
from longattn.train.model import LanguageModel, ModelConfig

#: the format tag of a checkpoint folder; ``LEGACY_FORMATS`` are read too
FORMAT = "longattn-model"
LEGACY_FORMATS = ("longattn-retrieval",)
TRAINER_FORMAT = "longattn-trainer"

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINER_FILE = "trainer.safetensors"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("checkpoints need the 'safetensors' package: pip install safetensors") from e
    return safetensors.torch


def _vocab_record(vocab_size: int) -> dict[str, Any]:
    from longattn.tasks.synthetic import VOCAB

    if vocab_size == VOCAB.size:
        return {**dataclasses.asdict(VOCAB), "size": VOCAB.size, "module": "longattn.tasks.synthetic"}
    return {"size": vocab_size}


def save_model(model: LanguageModel, directory: str | Path, *, training: dict[str, Any] | None = None,
               evaluation: dict[str, Any] | None = None, format: str = FORMAT) -> Path:
    """Write ``model.safetensors`` (float32) and ``config.json`` into ``directory``."""
    directory = Path(directory)
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_safetensors(directory / MODEL_FILE, tensors, metadata={"format": format}, what="the model weights")
    meta = {
        "format": format,
        "model": model.config.to_dict(),
        "vocab": _vocab_record(model.config.vocab_size),
        "training": training or {},
        "evaluation": evaluation or {},
    }
    atomic_write_json(directory / CONFIG_FILE, meta, indent=2)
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: a checkpoint is a directory with {CONFIG_FILE} and {MODEL_FILE}")
    meta = json.loads(path.read_text())
    if meta.get("format") not in (FORMAT, *LEGACY_FORMATS):
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_model(directory: str | Path, *, cls: type[LanguageModel] = LanguageModel,
               config_cls: type[ModelConfig] = ModelConfig) -> LanguageModel:
    """Load a checkpoint directory into ``cls(config_cls(...))``, in eval mode."""
    directory = Path(directory)
    meta = read_config(directory)
    model = cls(config_cls.from_dict(meta["model"]))
    weights = directory / MODEL_FILE
    if not weights.exists():
        raise FileNotFoundError(f"{weights} not found: the checkpoint has its {CONFIG_FILE} but no weights")
    model.load_state_dict(_safetensors().load_file(str(weights)), strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# the resume file


def save_trainer_state(directory: str | Path, model: LanguageModel, optimizer: torch.optim.Optimizer,
                       progress: dict[str, Any]) -> Path:
    """Write weights + optimiser state + ``progress`` (JSON-able: step, losses, …) as one file."""
    sd = optimizer.state_dict()
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[key] = value
    meta = {
        "format": TRAINER_FORMAT,
        "progress": json.dumps(progress),
        "param_groups": json.dumps(sd["param_groups"]),
        "optim_scalars": json.dumps(scalars),
    }
    return save_safetensors(Path(directory) / TRAINER_FILE, tensors, metadata=meta, what="the training checkpoint")


def load_trainer_state(directory: str | Path, model: LanguageModel,
                       optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights and optimiser state from ``trainer.safetensors``; returns the progress."""
    path = Path(directory) / TRAINER_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: nothing to resume from (train without resume first)")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != TRAINER_FORMAT:
            raise ValueError(f"{path} has format {meta.get('format')!r}, expected {TRAINER_FORMAT!r}")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=True)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, extra in json.loads(meta["optim_scalars"]).items():
        state.setdefault(int(index), {}).update(extra)
    groups = json.loads(meta["param_groups"])
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return json.loads(meta["progress"])
