"""User-facing errors: the CLI prints these as one line, without a traceback."""


class UserError(Exception):
    """Bad input or configuration that the user can fix; the message names the file and the fix."""
