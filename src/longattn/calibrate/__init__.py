"""Training-free attention calibration: change how a model attends without touching its weights,
through the same door as ``longattn.analysis`` (a ``Subject`` whose attention layers call a
function we give).

* ``act`` — ACT (Yu et al. 2024): scale down attention on non-initial sink tokens in the heads a
  calibration set picks, and hand the mass to the other tokens.
"""

from longattn.calibrate.act import ACT, ACT_FACTOR, calibrated_attention, select_heads

__all__ = ["ACT", "ACT_FACTOR", "calibrated_attention", "select_heads"]
