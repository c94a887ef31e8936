"""Synthetic retrieval tasks, generated locally and seeded: passkey, needle-in-a-haystack, MQAR,
copy and multi-document retrieval."""

from longattn.tasks.synthetic import (
    VOCAB,
    DocumentsBatch,
    TaskBatch,
    Vocab,
    copy,
    documents,
    mixture,
    mqar,
    needle,
    passkey,
)

__all__ = ["VOCAB", "DocumentsBatch", "TaskBatch", "Vocab", "copy", "documents", "mixture", "mqar", "needle", "passkey"]
