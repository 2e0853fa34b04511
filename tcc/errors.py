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


class deferred_interrupts:
    """Ctrl-C (SIGINT) inside a TVM build lands in Python code TVM calls back (schedule rules, module
    passes), where the FFI boundary swallows the KeyboardInterrupt and the build goes on. Within this
    context SIGINT only sets a flag; KeyboardInterrupt is raised when the context exits (after the TVM
    call returns). A no-op off the main thread, where signals cannot be handled."""

    def __enter__(self):
        import signal
        import threading
        self.hit, self.old = False, None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, *_):
        self.hit = True

    def __exit__(self, exc_type, exc, tb):
        import signal
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        if self.hit and exc_type is None:
            raise KeyboardInterrupt
        return False
