"""Checkpoints: saving cadence, auto-resume and the stop file (being extended to DCP)."""

from __future__ import annotations


class CheckpointManager:
    """Decides when to save and resume for one :class:`~internevo.train.trainer.Trainer`."""

    def __init__(self, trainer):
        self.trainer = trainer

    def maybe_resume(self) -> bool:
        """Load the newest complete checkpoint (or ``load_ckpt_info``); True when something loaded."""
        return False

    def after_step(self) -> bool:
        """Save when the cadence or the stop file asks; True when training should stop."""
        return False

    def finish(self) -> None:
        """Wait for pending asynchronous saves."""
