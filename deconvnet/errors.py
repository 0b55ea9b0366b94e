"""The one exception type for mistakes a user can fix (bad path, unknown layer, wrong weights...).

The CLI prints its message on one line and exits with status 2; anything else is a bug and keeps
its traceback.
"""


class DeconvnetError(Exception):
    """A user-facing error: the message says what was wrong and how to fix it."""
