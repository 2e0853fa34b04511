"""Progress on the terminal (stderr, so stdout stays for --json), via rich; quiet when not a TTY
except for one line per step, so CI logs still show what happened."""
from __future__ import annotations

import contextlib
import time

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)  # "n:m" is text, not an emoji code
_quiet = False


def set_quiet(q: bool) -> None:
    global _quiet
    _quiet = q


def info(msg: str) -> None:
    if not _quiet:
        console.print(msg)


@contextlib.contextmanager
def status(msg: str):
    """A spinner while the block runs; prints the time taken when it ends."""
    t0 = time.perf_counter()
    if _quiet:
        yield
        return
    if console.is_terminal:
        with console.status(msg):
            yield
    else:
        console.print(f"{msg} ...")
        yield
    console.print(f"[dim]{msg}: {time.perf_counter() - t0:.1f} s[/dim]")


def track(seq, description: str, total: int | None = None):
    """A progress bar over an iterable."""
    if _quiet:
        yield from seq
        return
    from rich.progress import track as rtrack
    yield from rtrack(seq, description=description, total=total, console=console, transient=not console.is_terminal)
