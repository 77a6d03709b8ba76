"""Learning annealing: the LR factor as a pure function of the step.

FVQ (appendix G, Table 6): warmup(0.1) from 0.005 to 1, then of the remaining steps the first 30 % at the base LR
and the rest decaying linearly (or with a cosine) to 0.01. Generation recipes use warmup 0 / constant 0.05.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DECAYS = ("linear", "cosine", "none")


@dataclass(frozen=True)
class AnnealingSchedule:
    """Warmup -> constant -> decay, as fractions of the total number of steps.

    Args:
        total_steps: Length of training in optimizer steps.
        warmup_fraction: Fraction of ``total_steps`` spent warming up (0.1).
        warmup_start: LR factor at step 0 (0.005); rises linearly to 1 at the end of warmup.
        constant_fraction: Fraction of the *remaining* (post-warmup) steps held at factor 1 (0.3).
        final_factor: Factor reached at the last step (0.01).
        decay: ``"linear"``, ``"cosine"`` or ``"none"`` (constant after warmup).
    """

    total_steps: int
    warmup_fraction: float = 0.1
    warmup_start: float = 0.005
    constant_fraction: float = 0.3
    final_factor: float = 0.01
    decay: str = "linear"

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        for name in ("warmup_fraction", "constant_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {self.decay!r}")
        if self.warmup_start < 0 or self.final_factor < 0:
            raise ValueError("warmup_start and final_factor must be >= 0")

    @property
    def warmup_steps(self) -> int:
        return int(round(self.total_steps * self.warmup_fraction))

    @property
    def constant_steps(self) -> int:
        return int(round((self.total_steps - self.warmup_steps) * self.constant_fraction))

    def __call__(self, step: int) -> float:
        return annealing_factor(
            step,
            self.total_steps,
            warmup_fraction=self.warmup_fraction,
            warmup_start=self.warmup_start,
            constant_fraction=self.constant_fraction,
            final_factor=self.final_factor,
            decay=self.decay,
        )


def annealing_factor(
    step: int,
    total_steps: int,
    *,
    warmup_fraction: float = 0.1,
    warmup_start: float = 0.005,
    constant_fraction: float = 0.3,
    final_factor: float = 0.01,
    decay: str = "linear",
) -> float:
    """LR multiplier at ``step`` (0-based) of ``total_steps``.

    * ``step < W`` (``W = round(total * warmup_fraction)``): ``warmup_start + (1 - warmup_start) * step / W``.
    * next ``C = round((total - W) * constant_fraction)`` steps: 1.
    * then decay over the ``total - W - C`` last steps from 1 to ``final_factor`` (reached at ``total_steps``);
      ``final_factor`` beyond the end.
    """
    warmup = int(round(total_steps * warmup_fraction))
    constant = int(round((total_steps - warmup) * constant_fraction))
    if step < warmup:
        return warmup_start + (1.0 - warmup_start) * step / warmup
    if decay == "none" or step < warmup + constant:
        return 1.0
    decay_steps = total_steps - warmup - constant
    if decay_steps <= 0 or step >= total_steps:
        return final_factor
    progress = (step - warmup - constant) / decay_steps
    if decay == "linear":
        return 1.0 + (final_factor - 1.0) * progress
    if decay == "cosine":
        return final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
