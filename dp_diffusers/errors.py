"""One exception type for bad user input: scripts print its message on one line and exit with code 2."""


class UserInputError(ValueError):
    """Bad input that the user can fix; the message names the fix and fits on one line."""
