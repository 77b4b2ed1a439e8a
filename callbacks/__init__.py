"""Reliability diagnostics as Lightning callbacks (``aropd.callbacks``): docs/diagnostics.md, README
"Reading the diagnostics". Turn them all on with ``--config configs/diagnostics.yaml``."""

from .layout import DiagnosticsLayout
from .long_rollout import LongRolloutAccuracy
from .reliability import TeacherReliability
from .shortcut import ShortcutEvents
from .support import SupportMismatch
from .validate_first import ValidateBeforeTraining

__all__ = [
    "DiagnosticsLayout", "LongRolloutAccuracy", "ShortcutEvents", "SupportMismatch", "TeacherReliability",
    "ValidateBeforeTraining",
]
