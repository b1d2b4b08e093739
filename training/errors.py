"""Bad input ending in one line, ``error: ...``, and exit status 1 instead of a traceback: for
train.py and every script.

A command's ``main`` raises ``ValueError`` (``UsageError``, ``CheckpointError``,
``DataSourceError`` ... are ones) or ``FileNotFoundError`` with a message that says what was wrong
and how to fix it; ``sys.exit(exit_code(main))`` turns that into the line. ``MINIGPT_TRACEBACK=1``
shows the traceback instead, for bug reports.
"""

import os
import sys
from collections.abc import Callable


class UsageError(ValueError):
    """Bad input to a command, with a message that says what to do."""


def exit_code(main: Callable[[], object]) -> int:
    """The exit status of ``main()``: 0, or 1 after printing the message of a bad-input error."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("MINIGPT_TRACEBACK"):
            raise
        print(f"error: {e}\n(set MINIGPT_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        return 1
    return 0
