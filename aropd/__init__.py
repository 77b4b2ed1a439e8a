"""aropd: privileged on-policy distillation with anchored residual guidance (AR-OPD)."""

__version__ = "0.1.0"
