"""One handler for how train.py and every script end: bad input, storage that cannot be written,
Ctrl-C and signals each end in one line and a non-zero exit status, never a traceback.

A command's ``main`` raises, with a message that says what was wrong and how to fix it:

- ``ValueError`` (``UsageError``, ``CheckpointError``, ``DataSourceError`` ... are ones), or an
  argument parser's ``ArgumentError``: ``error: ...``, exit status 1;
- ``OSError`` (a missing file, a read-only folder, a full disk): the file and the reason, exit 1;
- ``Stopped`` (a run that stopped on a signal, after saving a checkpoint or before it had
  one, SIGTERM included): its message, exit 128 + the signal's number;
- ``KeyboardInterrupt`` (Ctrl-C anywhere else): exit 130.

``sys.exit(exit_code(main))`` turns each into its line. ``MINIGPT_TRACEBACK=1`` shows the traceback
instead, for bug reports. Any other exception is a bug and keeps its traceback.

Entry points import it first and call ``exit_at_once_on_ctrl_c``, so that Ctrl-C while their
libraries load (seconds, before ``main`` runs) ends in one line too. It imports only the standard
library.
"""

import argparse
import errno
import os
import signal
import sys
import threading
from collections.abc import Callable

CTRL_C_STATUS = 128 + signal.SIGINT  # what a shell reports for a process stopped by Ctrl-C


class UsageError(ValueError):
    """Bad input to a command, with a message that says what to do."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser for the scripts, whose errors raise a UsageError (one line through
    ``exit_code``) where argparse prints the usage and exits with status 2, and which takes no
    abbreviated options (a typo such as --max-new-token would be taken silently)."""

    def __init__(self, *args, allow_abbrev: bool = False, **kwargs):
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)

    def error(self, message):
        raise UsageError(f"{message} (--help lists the options)")


class Stopped(BaseException):
    """A command stopped on a signal: after saving a checkpoint to resume from, or before it had
    anything to save (its message says which). A BaseException, as KeyboardInterrupt is: raised
    from a signal handler at any point, it must not end in a library's ``except Exception``
    (wandb's start-up has one, which swallowed a SIGTERM and trained on)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# what to do about storage that cannot be written, by errno
_STORAGE_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space, or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free some space, or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "no permission: make it writable, or write elsewhere",
    errno.EPERM: "no permission: make it writable, or write elsewhere",
    errno.ENOTDIR: "a file stands where a folder should be: give a folder",
    errno.EISDIR: "a folder stands where a file should be: give a file",
}


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (argument parsers and YAML spread theirs over
    several)."""
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) \
            and error.errno in _STORAGE_ADVICE and len(error.args) == 2:  # the OS's own error
        where = f"cannot write {error.filename}" if error.filename else "cannot write"
        message = f"{where}: {error.strerror}; {_STORAGE_ADVICE[error.errno]}"
    elif isinstance(error, argparse.ArgumentError):
        message = f"{error.message} (--help lists the options)"
    else:
        message = str(error) or type(error).__name__
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def exit_at_once_on_ctrl_c() -> None:
    """Ctrl-C ends the process at once, in one line, until ``exit_code`` runs ``main``: while the
    libraries load, a KeyboardInterrupt can end in a library's bare ``except`` (it did, and the
    command went on to train)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _exit_at_once)


def _exit_at_once(signum, frame):
    print("stopped by Ctrl-C", file=sys.stderr, flush=True)
    os._exit(CTRL_C_STATUS)  # (nothing to save or clean up yet)


def exit_code(main: Callable[[], object]) -> int:
    """The exit status of ``main()``: 0, or that of one of the errors above, after printing its
    line."""
    if signal.getsignal(signal.SIGINT) is _exit_at_once:  # main() handles it: KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous = _on_sigterm(_stop_on_sigterm)  # (training has its own, which saves first)
    try:
        main()
    except KeyboardInterrupt as e:  # (pressed again while a stop was being reported: its message)
        stop = e.__context__ if isinstance(e.__context__, Stopped) else None
        print(stop or "stopped by Ctrl-C", file=sys.stderr)
        return CTRL_C_STATUS
    except Stopped as e:
        print(e, file=sys.stderr)
        return 128 + e.signum
    except (ValueError, OSError, argparse.ArgumentError) as e:
        if os.environ.get("MINIGPT_TRACEBACK"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    finally:
        _on_sigterm(previous)
    return 0


def _stop_on_sigterm(signum, frame):
    raise Stopped("stopped by SIGTERM", signum)


def _on_sigterm(handler):
    """Handle SIGTERM with ``handler`` (where Python delivers signals); the previous handler."""
    if threading.current_thread() is not threading.main_thread() or handler is None:
        return None
    return signal.signal(signal.SIGTERM, handler)

