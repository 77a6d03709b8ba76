"""Training: the shared engine (:mod:`fvq.training.engine`), one task per model kind, schedules, configuration."""

from fvq.training.lr_schedule import AnnealingSchedule, annealing_factor

__all__ = ["AnnealingSchedule", "annealing_factor"]
