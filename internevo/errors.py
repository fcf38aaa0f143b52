"""One line per failure at every entry point (``train.py``, ``internevo …``, ``tools/*.py``).

Every problem with the user's input (config, data, checkpoint, conversion) raises a subclass of
:class:`InternEvoError` whose message is one line naming the file / key / rank and what would be
valid; the command line prints :func:`one_line` of it and exits with its ``exit_code`` (2).
Known library failures become one line too (:func:`describe`): ``OSError`` (naming the file;
``ENOSPC`` as "no space left on the device"), safetensors' errors, torch's zip writer running out
of space, and gloo / NCCL peer loss (a rank that stopped answering or died).  A traceback is
printed only with ``--debug`` (:func:`run_entry` strips that flag).

No project imports here: every package may import this module (it is the bottom layer).
"""

from __future__ import annotations

import errno
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Optional

EXIT_USAGE = 2
"""Exit code of a refused input (config, data, checkpoint, command line)."""
EXIT_FAILURE = 1
"""Exit code of a failure while running (a lost peer, a full disk, an unexpected error)."""


class InternEvoError(Exception):
    """A problem with the user's input, told in one line (no traceback needed)."""

    kind = "error"
    """What the command line prints before the message (``config error`` ...)."""
    exit_code = EXIT_USAGE
    """Process exit code when this error ends a command."""


def one_line(err: BaseException) -> str:
    """``<kind>: <message>`` on one line (a multi-line message is joined)."""
    kind = getattr(err, "kind", "error")
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{kind}: {text or type(err).__name__}"


class PeerError(InternEvoError, RuntimeError):
    """A collective failed because another rank stopped answering or died (names the ranks)."""

    kind = "peer lost"
    exit_code = EXIT_FAILURE


class Interrupted(InternEvoError):
    """Training stopped on SIGTERM / SIGINT (after saving when saving is configured)."""

    kind = "interrupted"

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


_PEER_LOSS = re.compile(r"Connection closed by peer|Connection reset by peer|Broken pipe|"
                        r"Timed out waiting \d+ms|remote process exited|NCCL communicator was "
                        r"aborted|DistNetworkError|Socket Timeout")
_GLOO_TIMEOUT = re.compile(r"Timed out waiting (\d+)ms for (\w+) operation")
_PEER_ADDR = re.compile(r"\[([\w.:-]+)\]:(\d+)")


def is_peer_loss(err: BaseException) -> bool:
    """``err`` is a collective failing because a peer stopped answering or went away."""
    return isinstance(err, RuntimeError) and bool(_PEER_LOSS.search(str(err)))


def peer_loss_reason(err: BaseException) -> str:
    """What gloo / NCCL said, shortened: ``timed out after 10s`` or ``connection closed by the
    peer at 127.0.0.1:4242``."""
    text = str(err)
    timeout = _GLOO_TIMEOUT.search(text)
    if timeout:
        return f"timed out after {int(timeout.group(1)) / 1000:g}s (gloo {timeout.group(2)})"
    addr = _PEER_ADDR.search(text)
    if addr:
        return f"lost its connection to the peer at {addr.group(1)}:{addr.group(2)}"
    return last_line(text)


def last_line(text: str) -> str:
    """The last non-empty line of a message (library errors often carry a trace inside)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _os_error(err: OSError) -> str:
    where = f"{err.filename}: " if err.filename else ""
    if err.errno == errno.ENOSPC:
        return f"{where}no space left on the device; free space or choose another folder"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"{where}permission denied; choose a folder this user can write"
    if err.errno in (errno.ENOTDIR, errno.EEXIST) and err.filename:
        return f"{where}{err.strerror}: a regular file stands where a folder is needed"
    return f"{where}{err.strerror or last_line(str(err))}"


def describe(err: BaseException) -> tuple[str, int]:
    """``(one line, exit code)`` for any error that ends a command."""
    if isinstance(err, InternEvoError):
        return one_line(err), err.exit_code
    if isinstance(err, OSError):
        return f"OS error: {_os_error(err)}", EXIT_FAILURE
    text = str(err)
    name = type(err).__name__
    if name == "SafetensorError":
        return f"safetensors error: {last_line(text)} (a truncated or damaged file)", EXIT_USAGE
    if "unexpected pos" in text or "file write failed" in text:
        return ("write failed: the file came out shorter than written, most likely no space "
                f"left on the device ({last_line(text)})"), EXIT_FAILURE
    if "clients joined" in text or name == "DistStoreError":
        return (f"launch error: the rendezvous failed ({last_line(text)}): every rank must start "
                "and reach MASTER_ADDR:MASTER_PORT within --timeout"), EXIT_FAILURE
    if is_peer_loss(err):
        return f"peer lost: a collective failed: {peer_loss_reason(err)}", EXIT_FAILURE
    if isinstance(err, UnicodeDecodeError):
        return f"input is not UTF-8 text: {err}", EXIT_USAGE
    return f"unexpected {name}: {last_line(text)} (rerun with --debug for the traceback)", \
        EXIT_FAILURE


def _ends_the_process(err: BaseException) -> bool:
    """A lost peer leaves process groups that may block at interpreter exit: leave at once."""
    return isinstance(err, PeerError) or is_peer_loss(err)


def run_entry(fn: Callable[[list[str]], Optional[int]], argv: Sequence[str]) -> int:
    """Run a command's ``fn(argv)``; any failure becomes one line on stderr and an exit code.

    ``--debug`` anywhere in ``argv`` is removed and makes failures print their traceback too.
    """
    argv = list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return fn(argv) or 0
    except KeyboardInterrupt:  # Ctrl-C before (or outside) the training loop's handler
        print("interrupted: Ctrl-C", file=sys.stderr, flush=True)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place every failure is turned into a line
        if debug:
            traceback.print_exc()
        line, code = describe(err)
        print(line, file=sys.stderr, flush=True)
        if _ends_the_process(err):
            sys.stdout.flush()
            os._exit(code)
        return code
