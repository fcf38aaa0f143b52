"""The one exception type of the data package."""

from __future__ import annotations

from internevo.errors import InternEvoError


class DataError(InternEvoError, ValueError):
    """Bad data input: the message names the file (and line) and says what is wrong."""

    kind = "data error"
