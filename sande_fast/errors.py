"""The errors a user can meet: bad input (exit 2) and a numerical failure (exit 1)."""
from __future__ import annotations

import signal

__all__ = ["BadInputError", "Terminated", "PROG"]


class BadInputError(ValueError):
    """Bad input or usage: the message is one clear line for the user (CLI exit code 2)."""


class Terminated(BaseException):
    """Raised from the SIGTERM / SIGHUP handler so clean-up runs as for Ctrl-C.

    Attributes:
        signum: the signal received (the exit code is ``128 + signum``).
    """

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = int(signum)


# The program's name in messages.
PROG = "sande-fast"
