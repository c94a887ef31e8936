"""Small models readable top to bottom, and the ones that ship with the package.

``stories260k()`` returns the folder of the bundled stories260K checkpoint (a real Llama trained on
TinyStories, llama2.c format, checked by SHA-256); ``retrieval_tiny()`` the folder of the tiny
retrieval model trained here; ``landmark_tiny()`` the same model trained with landmark tokens. ``llama2c`` reads and runs llama2.c checkpoints, ``retrieval`` is the
retrieval model.
"""

from longattn.models.bundled import landmark_tiny, retrieval_tiny, stories260k

__all__ = ["landmark_tiny", "retrieval_tiny", "stories260k"]
