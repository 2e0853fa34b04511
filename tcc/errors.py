"""Errors tcc reports to people.

`UserError` is a problem with what the user gave us (a path, a model, an option): the CLI prints its
one-line message and hint and exits with code 2, no traceback. `InternalError` is tcc's own fault
(exit 1). Anything else escaping is an internal error too; `--debug` shows the traceback.
"""
from __future__ import annotations


class TccError(Exception):
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UserError(TccError):
    """Bad input: missing or corrupt model, unknown target/pass/option, wrong input shapes..."""

    exit_code = 2


class InternalError(TccError):
    exit_code = 1


class AccuracyBudgetError(TccError):
    """The compressed program misses the accuracy budget the user set."""

    exit_code = 3
