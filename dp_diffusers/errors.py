"""One exception type for bad user input: scripts print its message on one line and exit with code 2."""


class UserInputError(ValueError):
    """Bad input that the user can fix; the message names the fix and fits on one line."""


def first_line(error: BaseException, *, limit: int = 200) -> str:
    """An exception as one short line: its type and the first non-empty line of its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def looks_local(path: str) -> bool:
    """A path the user means as a local file or folder (it exists, starts like a path, or has several '/'), not a
    Hub id ``owner/name``."""
    import os

    path = os.fspath(path)
    return os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1
