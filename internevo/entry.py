"""Process entry points (the ``internevo`` command, ``train.py``, ``tools/*.py``).

They run before torch is imported, so that c10d's C++ warnings (a backtrace whenever a peer's
socket closes) can be kept out of the one-line errors; ``--debug`` or an explicit
``TORCH_CPP_LOG_LEVEL`` keeps them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Optional


def main(argv: Optional[Sequence[str]] = None, prefix: Sequence[str] = ()) -> int:
    """``internevo [prefix...] argv...`` (``argv`` defaults to the process's arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" not in argv:
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    from internevo.cli import main as cli_main

    return cli_main([*prefix, *argv])
