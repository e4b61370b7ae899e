"""One exception type for bad user input: scripts print its message on one line and exit with code 2."""

from __future__ import annotations

import re
from collections.abc import Mapping


class UserInputError(ValueError):
    """Bad input that the user can fix; the message names the fix and fits on one line.

    Library code names a parameter in backticks (`max_grad_norm`); a script shows its own spelling of it with
    :func:`cli_message` (the library knows nothing of command lines)."""


def parser_flags(parser, **renamed: str) -> dict[str, str]:
    """How an ``argparse`` parser spells each parameter: every option's ``dest`` -> its first flag, plus ``renamed``
    (library parameter -> flag) for parameters whose flag has another name (``target_epsilon="--epsilon"``)."""
    # argparse has no public list of a parser's actions; ``_actions`` is what its own help formatter reads.
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}
    return {**flags, **renamed}


def cli_message(error: BaseException, flags: Mapping[str, str]) -> str:
    """``error``'s message with each backticked parameter that ``flags`` knows replaced by its command-line flag
    (`max_grad_norm` -> --max_grad_norm); other backticked text is kept as it is."""
    return re.sub(r"`(\w+)`", lambda m: flags.get(m.group(1), m.group(0)), str(error))


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
