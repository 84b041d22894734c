"""Errors the user can fix - a config value, a data folder, a file, the network, a run's state.

The command-line entry points report them as one message and exit code 2; a traceback is kept
for bugs. Each subclasses the built-in type it replaces, so callers that catch ValueError or
FileNotFoundError still do.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with what the user asked for, explained in its message."""


class ConfigError(UserError, ValueError):
    """A config key's value is unknown, out of range or inconsistent with another."""


class DataError(UserError, ValueError):
    """The images, their folders or their file names cannot be used as they are."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the config names does not exist."""


class NotOursError(UserError, FileExistsError):
    """A folder the framework would write into holds something else."""


class ServerError(UserError, ConnectionError):
    """The tracking server does not answer."""


class AccessError(UserError, PermissionError):
    """A guarded tracking server refused the credentials, or the user may not do this."""


class WeightsError(UserError, RuntimeError):
    """Pretrained weights are neither cached nor downloadable."""


class RunStateError(UserError, ValueError):
    """A run cannot be resumed or used as asked (finished, still running, state gone)."""


def exit_with(error: UserError) -> None:
    """Print the message (no traceback) and exit with code 2."""
    print(f"Error: {error}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USER_ERROR) from None


F = TypeVar("F", bound=Callable)


def report_user_errors(main: F) -> F:
    """Decorate a command's `main`: a UserError becomes one message and exit code 2."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            exit_with(error)
    return wrapper  # type: ignore[return-value]
