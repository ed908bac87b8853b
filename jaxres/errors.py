"""The one exception type for mistakes a user can make (paths, data, flags, names), and the
wrapper every command line uses.

The command-line entry points are wrapped in `command_line`: a `JaxresError` or an `OSError`
(an unreadable file, a read-only or full disk) is printed as one `error: ...` line without a
traceback and the command exits with status 2; library callers get an ordinary exception
whose message names the culprit.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable


class JaxresError(ValueError):
    """A problem with the user's input: a path, a file, a flag, a name."""


def describe_os_error(error: OSError) -> str:
    """One line for an I/O failure that names the file, e.g. 'cannot write runs/x/config.json:
    Read-only file system'."""
    reason = error.strerror or str(error) or type(error).__name__
    if error.filename is not None:
        target = f"{error.filename} -> {error.filename2}" if error.filename2 is not None else error.filename
        return f"{target}: {reason}"
    return reason


def command_line(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command's `main(argv) -> exit status`: JaxresError and OSError become one
    `error: ...` line on stderr and exit status 2 (argparse's own usage errors exit 2 too)."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except JaxresError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except OSError as error:
            print(f"error: {describe_os_error(error)}", file=sys.stderr)
            return 2

    return wrapped
