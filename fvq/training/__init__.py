"""Training: schedules, configuration, the trainer."""

from fvq.training.lr_schedule import AnnealingSchedule, annealing_factor

__all__ = ["AnnealingSchedule", "annealing_factor"]
