"""Dynamic loss scaling (fp16), as InternEvo's gradient scaler: below the optimizers that use it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from internevo.config import TrainConfig


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
