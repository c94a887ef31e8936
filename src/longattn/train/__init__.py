"""Train small language models with any mixer on the CPU: the project's one small-model
implementation (:mod:`longattn.train.model`), task recipes (:mod:`longattn.train.data`), the loop
with checkpoints and exact resumption (:mod:`longattn.train.loop`) and the checkpoint files
(:mod:`longattn.train.checkpoint`). ``longattn train`` is its command line."""

from longattn.train.checkpoint import load_model, read_config, save_model
from longattn.train.data import Accuracy, MQARTask, RetrievalCurriculum, answer_loss, evaluate
from longattn.train.loop import TrainSettings, train
from longattn.train.model import ATTENTION, ConvState, KVState, LanguageModel, ModelConfig

__all__ = [
    "ATTENTION",
    "Accuracy",
    "ConvState",
    "KVState",
    "LanguageModel",
    "MQARTask",
    "ModelConfig",
    "RetrievalCurriculum",
    "TrainSettings",
    "answer_loss",
    "evaluate",
    "load_model",
    "read_config",
    "save_model",
    "train",
]
