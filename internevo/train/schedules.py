"""Learning-rate and beta2 schedules and the dynamic loss scaler (spec §3.5, §3.12).

All three advance only on successful optimizer updates and keep their whole state in a few
numbers, so a resumed run continues exactly where it stopped (InternEvo's resumed LR schedule is
one step ahead; this one is not).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from internevo.config import TrainConfig


def warmup_cosine_lr(updates_done: int, base_lr: float, total_steps: int, warmup_ratio: float,
                     init_steps: int = 0, eta_min: float = 1e-5) -> float:
    """LR of the next update after ``updates_done`` successful updates.

    0 during ``init_steps``, then linear warm-up over ``int(total_steps * warmup_ratio)`` updates
    (the first warm-up update already uses ``base/Wm``), then cosine decay to ``eta_min``.
    """
    e, start = updates_done, init_steps
    warmup = int(total_steps * warmup_ratio)
    if e < start:
        return 0.0
    if e < start + warmup:
        return base_lr * (e + 1 - start) / warmup
    decay = max(total_steps - start - warmup, 1)
    progress = min((e - start - warmup) / decay, 1.0)
    return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * progress)) / 2


def beta2_at(updates_done: int, init_beta2: float, c: float) -> float:
    """``max(init_beta2, 1 - t**-c)`` with ``t`` the updates done (constant when ``c <= 0``)."""
    if c <= 0 or updates_done == 0:
        return init_beta2
    return max(init_beta2, 1.0 - updates_done ** (-c))


class Schedules:
    """LR and beta2 of the next update, from the number of successful updates so far."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.updates_done = 0

    def lr(self) -> float:
        """LR the next update uses."""
        s = self.cfg.lr_scheduler
        return warmup_cosine_lr(self.updates_done, self.cfg.adam.lr, self.cfg.lr_total_steps,
                                s.warmup_ratio, s.init_steps, s.eta_min)

    def beta2(self) -> float:
        """beta2 the next update uses."""
        return beta2_at(self.updates_done, self.cfg.init_beta2, self.cfg.beta2_scheduler.c)

    def step(self) -> None:
        """Advance after a successful update."""
        self.updates_done += 1

    def state_dict(self) -> dict:
        """Checkpointable state."""
        return {"updates_done": self.updates_done}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (the configured base LR is kept, as InternEvo does)."""
        self.updates_done = int(state["updates_done"])


@dataclass
class LossScaler:
    """Dynamic loss scale with hysteresis, as InternEvo's scaler (spec §3.5).

    ``enabled=False`` (fp32/bf16 training) keeps the scale at 1; overflow still skips the step.
    """

    scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 1000
    hysteresis: int = 2
    min_scale: float = 1.0
    max_scale: float = 2.0**24
    enabled: bool = True
    growth_step: int = 0
    hysteresis_step: int = 0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> LossScaler:
        """Dynamic scaling for fp16 only; bf16 and fp32 have the range to need none."""
        gs = cfg.grad_scaler
        enabled = cfg.model.dtype == "torch.float16"
        return cls(scale=gs.fp16.initial_scale if enabled else 1.0, growth_factor=gs.growth_factor,
                   backoff_factor=gs.backoff_factor, growth_interval=gs.fp16.growth_interval,
                   hysteresis=gs.hysteresis, min_scale=gs.fp16.min_scale, max_scale=gs.max_scale,
                   enabled=enabled)

    def update(self, overflow: bool) -> None:
        """Back off after ``hysteresis`` overflows; grow after ``growth_interval`` good steps."""
        if not self.enabled:
            return
        if overflow:
            self.hysteresis_step += 1
            self.growth_step = 0
            if self.hysteresis_step >= self.hysteresis:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            return
        self.growth_step += 1
        if self.growth_step >= self.growth_interval:
            self.scale = min(self.scale * self.growth_factor, self.max_scale)
            self.growth_step = 0
            self.hysteresis_step = 0

    def state_dict(self) -> dict:
        """Checkpointable state."""
        return {"scale": self.scale, "growth_step": self.growth_step,
                "hysteresis_step": self.hysteresis_step}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`."""
        self.scale = float(state["scale"])
        self.growth_step = int(state["growth_step"])
        self.hysteresis_step = int(state["hysteresis_step"])

    def describe(self) -> dict:
        """All fields (for logs)."""
        return asdict(self)
