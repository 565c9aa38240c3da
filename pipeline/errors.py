"""Errors the user can fix, and the guard that reports them as one line.

Every message names the input and what is wrong with it, e.g.
``params.yaml: train.lr: expected a number > 0, got -1`` or
``data/models/vlap/model.safetensors: trained bridge not found (run the train stage first)``.
"""
from __future__ import annotations

import errno
import sys
import unicodedata
from typing import Callable, TypeVar

LINE_BREAKING = ("Cc", "Zl", "Zp")  # control characters, line and paragraph separators


def one_line(text: str) -> str:
    """`text` with control characters and line separators written as escapes (`\\n`, `\\x00`): names
    read from a file cannot break a message over lines or send codes to the terminal."""
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in LINE_BREAKING else c
                   for c in text)


class UserError(Exception):
    """Bad input the user can fix; the message is one line naming the input."""

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(str(message)))


class ConfigError(UserError, ValueError):
    """A bad params value or command-line choice; the message names the key."""


class DatasetError(UserError, ValueError):
    """Input data in the wrong format or without what a step needs; the message names the file."""


class MissingInputError(UserError, FileNotFoundError):
    """An upstream output is not there (a stage that should have run first)."""


class CacheError(UserError):
    """A cache file exists but cannot be read, or is corrupt."""


class MismatchError(UserError):
    """Inputs that do not belong together (a bridge and features of another encoder, ...)."""


class DiskFullError(UserError):
    """The disk filled while an output was written; nothing partial was kept in its place."""


class LockTimeoutError(UserError):
    """Another run kept an output folder locked for longer than we were asked to wait."""


# What a command reports in one line (exit code 2) instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

T = TypeVar("T")


def report_user_errors(body: Callable[[], T]) -> int:
    """Run `body`; a user error becomes `error: <message>` on stderr and exit code 2."""
    try:
        body()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        print(f"error: {err.filename or 'an output'}: no space left on device; free space and run again "
              "(finished work is kept)", file=sys.stderr)
        return 2
    return 0
