"""The one exception type for mistakes a user can make (a bad path, a wrong flag, a broken file)."""


class MegrezError(Exception):
    """A user-facing error: the message names the problem and the fix, and the CLI prints it as one line."""
