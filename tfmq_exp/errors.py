"""User-facing errors: one line naming the problem and the fix, exit code 2."""


class UserError(Exception):
    """Bad input from the user. The app prints ``str(err)`` alone and exits with 2."""

    exit_code = 2
