"""The errors a user can meet: bad input (exit 2) and a numerical failure (exit 1)."""
from __future__ import annotations

__all__ = ["BadInputError", "Terminated", "PROG"]


class BadInputError(ValueError):
    """Bad input or usage: the message is one clear line for the user (CLI exit code 2)."""


class Terminated(BaseException):
    """Raised from the SIGTERM handler, so clean-up runs as for Ctrl-C (exit code 143)."""


# The program's name in messages.
PROG = "sande-fast"
