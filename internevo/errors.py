"""One-line errors at the entry points.

Every problem with the user's input (config, data, checkpoint, conversion) raises a subclass of
:class:`InternEvoError` whose message is one line naming the file / key / rank and what would be
valid; the command line prints :func:`one_line` of it and exits with status 2, and shows the
traceback only with ``--debug``.
"""

from __future__ import annotations


class InternEvoError(Exception):
    """A problem with the user's input, told in one line (no traceback needed)."""

    kind = "error"
    """What the command line prints before the message (``config error`` ...)."""


def one_line(err: BaseException) -> str:
    """``<kind>: <message>`` on one line (a multi-line message is joined)."""
    kind = getattr(err, "kind", "error")
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{kind}: {text or type(err).__name__}"
