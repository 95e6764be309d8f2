"""Errors that the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user: the CLI prints the one-line message and exits with code 2."""
