"""User-facing errors.

Anything raised as `UserError` is the user's to fix (a bad path, a bad config, a prompt that is too
long). The CLI prints its message as one line and exits with code 2; the server maps it to a 4xx.
Everything else is a bug in unmask and is allowed to surface as a traceback.
"""


class UserError(Exception):
    """An error the user can fix. The message must say what was wrong, where, and what to do."""
