"""SIGTERM and SIGINT during training: finish the step, save, leave with one line.

What cluster schedulers send before killing a job (SIGTERM) and Ctrl-C (SIGINT) only set a flag;
the loop looks at it between steps (all ranks agree through one collective, since a signal may
reach one rank first), saves a checkpoint when saving is configured and ends with
:class:`~internevo.errors.Interrupted` (exit code 128 + signal number).  A second signal ends
the process at once.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """The stop request of SIGTERM / SIGINT (installed while training runs in the main thread)."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        """The first signal's number (None: none yet)."""
        self._previous: dict[int, Any] = {}

    def install(self) -> StopSignals:
        """Catch the signals (a no-op outside the main thread, where Python cannot)."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:  # the second one: no clean-up, leave now
            os.write(2, f"interrupted: second {name}: exiting at once, without "
                        "saving\n".encode())
            os._exit(128 + signum)
        self.received = signum
        os.write(2, f"[internevo] received {name}: finishing the current step, then saving "
                    "if configured (send it again to exit at once)\n".encode())

    @property
    def name(self) -> str:
        """The received signal's name (``SIGTERM``)."""
        return signal.Signals(self.received).name if self.received else ""
