"""Learning-rate and beta2 schedules (spec §3.12; the loss scaler is ``parallel/scaler.py``).

Both advance only on successful optimizer updates and keep their whole state in a few
numbers, so a resumed run continues exactly where it stopped (InternEvo's resumed LR schedule is
one step ahead; this one is not).
"""

from __future__ import annotations

import math

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
