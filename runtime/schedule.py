"""Learning-rate schedules: a pure function of the step count, so a resumed run gets the same rates.

constant, warmup (linear warmup, then constant), cosine (to min_lr over total_steps) and step
(multiply by gamma every step_size steps). Every schedule takes an optional linear warmup.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

NAMES = ("constant", "warmup", "cosine", "step")


@dataclass(frozen=True)
class Schedule:
    """lr(step) for step = number of accepted training steps taken before this one."""

    name: str = "constant"
    base_lr: float = 0.01
    total_steps: int = 0  # cosine: the step at which lr reaches min_lr
    warmup_steps: int = 0
    step_size: int = 0  # step: decay every step_size steps
    gamma: float = 0.1
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"unknown schedule {self.name!r}; choose one of {', '.join(NAMES)}")
        if not (math.isfinite(self.base_lr) and self.base_lr >= 0):
            raise ValueError(f"learning rate must be a finite number >= 0, got {self.base_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.name == "warmup" and self.warmup_steps == 0:
            raise ValueError("the warmup schedule needs warmup_steps > 0")
        if self.name == "cosine" and self.total_steps <= self.warmup_steps:
            raise ValueError(f"cosine needs total_steps ({self.total_steps}) > warmup_steps ({self.warmup_steps})")
        if self.name == "step" and self.step_size <= 0:
            raise ValueError(f"the step schedule needs step_size > 0, got {self.step_size}")

    def lr(self, step: int) -> float:
        """The learning rate for the step that follows `step` accepted steps."""
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        t = step - self.warmup_steps
        if self.name == "cosine":
            span = self.total_steps - self.warmup_steps
            progress = min(t / span, 1.0)
            return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
        if self.name == "step":
            return self.base_lr * self.gamma ** (t // self.step_size)
        return self.base_lr

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Schedule":
        return cls(**d)
