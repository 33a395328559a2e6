"""User-facing errors: one line saying what is wrong, where, and how to fix it.

The CLI prints `error: <message>` and exits non-zero without a traceback for these;
anything else is a bug and keeps its traceback.
"""


class KdcacheError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2
