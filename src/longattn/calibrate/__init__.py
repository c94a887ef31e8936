"""Training-free attention calibration: change how a model attends, or what it keeps, without
touching its weights, through the same door as ``longattn.analysis`` (a ``Subject`` whose attention
layers call a function we give).

* ``act`` — ACT (Yu et al. 2024): scale down attention on non-initial sink tokens in the heads a
  calibration set picks, and hand the mass to the other tokens.
* ``middle`` — Found in the Middle (Hsieh et al. 2024): measure the positional attention bias
  over document slots and subtract it (for ranking, and as an attention calibration).
* ``sorting`` — attention sorting (Peysakhovich & Lerer 2023): re-order documents by the attention
  they receive, most attended last.
* ``heads`` — per-head KV budgets: Razor / Duo / retrieval-score head maps, MoA-style elastic
  windows, and running a model as the ``heads`` cache would keep its keys.
"""

from longattn.calibrate.act import ACT, ACT_FACTOR, calibrated_attention, select_heads
from longattn.calibrate.heads import (allocate_windows, check_head_map, head_scores, kept_keys, moa_windows,
                                      policy_attend, top_share, window_coverage)
from longattn.calibrate.middle import PositionCalibration, calibrated_relevance, positional_bias
from longattn.calibrate.sorting import attention_sort, document_attention

__all__ = ["ACT", "ACT_FACTOR", "PositionCalibration", "allocate_windows", "attention_sort", "calibrated_attention",
           "calibrated_relevance", "check_head_map", "document_attention", "head_scores", "kept_keys", "moa_windows",
           "policy_attend", "positional_bias", "select_heads", "top_share", "window_coverage"]
