"""The one exception type for mistakes a user can make (paths, data, flags, names), and the
wrapper every command line uses.

The command-line entry points are wrapped in `command_line`: a `JaxresError` or an `OSError`
(an unreadable file, a read-only or full disk) is printed as one `error: ...` line without a
traceback and the command exits with status 2; library callers get an ordinary exception
whose message names the culprit.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from pathlib import Path
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


def figure_output_path(path, flag: str = "--out") -> Path:
    """`path` checked, before any work, as a file a matplotlib figure can be saved to: a suffix
    savefig knows (.png, .pdf, .svg, ...; the format comes from it; .pgf only with its TeX
    system installed), not an existing folder, and a folder that exists or can be created, and
    can be written. Returns it as a Path: the very file `Figure.savefig` writes. Raises
    JaxresError naming `flag` and the path."""
    import matplotlib
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path).expanduser()
    if path.is_dir():
        raise JaxresError(f"{flag} {path} is a folder; name the image file to write, e.g. {path / 'figure.png'}")
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    suffix = path.suffix.lower()
    if suffix[1:] not in formats:
        has = f"has the suffix {suffix}" if suffix else "has no suffix"
        raise JaxresError(f"{flag} {path} {has}; name an image file ending in one of {', '.join('.' + f for f in formats)}")
    if suffix == ".pgf":  # written through a TeX system, found missing only when saving
        texsystem = matplotlib.rcParams["pgf.texsystem"]
        if shutil.which(texsystem) is None:
            raise JaxresError(f"{flag} {path}: the .pgf format needs {texsystem}, which is not installed; use .pdf or .svg")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the nearest existing folder, where the missing ones will be made
    if not folder.is_dir():
        raise JaxresError(f"{flag} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise JaxresError(f"{flag} {path}: cannot write into the folder {folder} (no permission, or read-only)")
    if path.exists() and not os.access(path, os.W_OK):
        raise JaxresError(f"{flag} {path}: the file exists and cannot be overwritten (no permission)")
    return path
