"""Explain a model's attention: per-head statistics (sinks, entropy, locality, Clark et al.'s
token shares), retrieval heads (Wu et al. 2024), attention rollout and flow (Abnar & Zuidema
2020), all computed from q/k captured from the model's own forward one layer and one query tile at
a time (``longattn.analysis.subject``). ``longattn analyze`` writes them as a report.

    >>> from longattn.analysis import load_subject, capture, head_statistics
    >>> subject = load_subject("stories260K")
"""

from longattn.analysis.capture import Captured, Recorder, ablate, capture, check_heads
from longattn.analysis.flow import attention_flow, relevance, rollout
from longattn.analysis.retrieval_heads import RETRIEVAL_THRESHOLD, CopyProbe, RetrievalScores, retrieval_scores
from longattn.analysis.stats import (ACT_ALPHA, HeadStats, attention_distance, attention_tiles, entropy,
                                     first_token_mass, head_average, head_statistics, offset_share, row_max,
                                     token_share)
from longattn.analysis.subject import (HFSubject, LanguageModelSubject, Site, Subject, dense_attend, load_subject,
                                       minilm_path, minilm_subject, retrieval_subject, stories260k_subject)

__all__ = ["ACT_ALPHA", "RETRIEVAL_THRESHOLD", "Captured", "CopyProbe", "HFSubject", "HeadStats", "LanguageModelSubject",
           "Recorder", "RetrievalScores", "Site", "Subject", "ablate", "attention_distance", "attention_flow",
           "attention_tiles", "capture", "check_heads", "dense_attend", "entropy", "first_token_mass", "head_average",
           "head_statistics", "load_subject", "minilm_path", "minilm_subject", "offset_share", "relevance",
           "retrieval_scores", "retrieval_subject", "rollout", "row_max", "stories260k_subject", "token_share"]
