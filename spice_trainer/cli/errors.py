"""`CliError`: a user error a ``spice-trainer`` command reports as one line (exit status 2), not a traceback."""


class CliError(Exception):
    """A user error the command reports as one line (exit status 2) instead of a traceback."""
