"""The one exception type for mistakes a user can fix.

The CLI prints a ``UserError`` as a single line (no traceback) and exits with status 2.
Everything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input the user can fix: the message says what is wrong and how to fix it.

    A subclass of ``ValueError`` so library callers can catch it the usual way.
    """
