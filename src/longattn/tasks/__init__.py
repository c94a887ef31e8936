"""Synthetic retrieval tasks, generated locally and seeded: passkey, needle-in-a-haystack, MQAR."""

from longattn.tasks.synthetic import (
    VOCAB,
    TaskBatch,
    Vocab,
    copy,
    mixture,
    mqar,
    needle,
    passkey,
)

__all__ = ["VOCAB", "TaskBatch", "Vocab", "copy", "mixture", "mqar", "needle", "passkey"]
