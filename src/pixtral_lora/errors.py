"""The errors that mean "the user asked for something impossible": commands print them in one line.

`UserError` is the base of every such error; the entry points (`pixtral-lora`, `train.py`,
`scripts/convert_to_mistral.py`) catch it and nothing else, so a bug (a `KeyError`, a bare
`FileNotFoundError`) stays a traceback instead of passing for a user's mistake. The errors shared by
the data modules live here too, below every module that raises them.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with what the user gave (file, option, config): the message names where and what to do."""


class DataError(UserError):
    """A problem in user data, with file/line/field in the message."""


class RunDirError(UserError):
    """The run directory holds a different run, or is not (yet) what the command needs."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is the whole story (what the entry points catch)."""
    return (UserError,)
