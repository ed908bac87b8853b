"""The one exception type for mistakes a user can make (paths, data, flags, names).

The command-line entry points catch `JaxresError`, print its message without a
traceback and exit with status 2; library callers get an ordinary exception
whose message names the culprit.
"""


class JaxresError(ValueError):
    """A problem with the user's input: a path, a file, a flag, a name."""
