"""The one exception type that the command line turns into a one-line error with exit code 2."""

import difflib
import os
import traceback


class UsageError(Exception):
    """Bad input from the user: the message says what was wrong and how to fix it. `option` names the
    option it concerns (e.g. "budget"), so a suite file can point at that key's line."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


class WriteFailed(UsageError):
    """Writing results or reports failed while the run went on (a full disk, a folder removed): still one
    line naming the path, but a failure of the run (exit 1), not bad input."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be, so a terminated run ends as an interrupted one does."""


class UserCodeError(Exception):
    """A user's factory failed while a configuration was being built: the message names what it did and its
    file:line. Inside a configuration it becomes that configuration's error record; anywhere else (weights
    checked while planning) the command line says it in one line, exit 2."""


def unknown_name(kind: str, name: str, choices, list_command: str) -> UsageError:
    """An error for a misspelled name, with the closest matches and the command that lists all."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return UsageError(f"unknown {kind} '{name}': {hint}`{list_command}` lists them all")


def describe(exc: BaseException) -> str:
    """An exception as text: its type, its message and the innermost frame that raised it."""
    try:
        message = str(exc)
    except Exception as inner:  # an exception whose __str__ fails still gets named
        message = f"<message not printable: {type(inner).__name__}>"
    text = f"{type(exc).__name__}: {message}"
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        module = os.path.splitext(os.path.basename(last.filename))[0]
        text += f" (at {module}:{last.lineno} in {last.name})"
    return text
