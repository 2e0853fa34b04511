"""Progress on the terminal (stderr, so stdout stays for --json), via rich; quiet when not a TTY
except for one line per step, so CI logs still show what happened.

library_output(path): inside the block, whatever else reaches the process's stderr (file
descriptor 2: TVM's C++ log, Python warnings, other libraries' progress bars) goes to the file
`path`; tcc's own console keeps the terminal. show_library_output(True) (tcc --debug) leaves
stderr alone.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)  # "n:m" is text, not an emoji code
_quiet = False
_show_libraries = False
_terminal = None  # while library_output is active: the terminal's stderr, where the console writes


def set_quiet(q: bool) -> None:
    global _quiet
    _quiet = q


def show_library_output(show: bool) -> None:
    global _show_libraries
    _show_libraries = show


@contextlib.contextmanager
def library_output(path):
    """Redirect fd 2 to `path` (appended) for the block, keeping the console on the terminal.
    Nests: an inner block's file takes the output until it ends."""
    global _terminal
    if _show_libraries:
        yield
        return
    for f in (sys.stderr, sys.__stderr__):
        if f is not None:
            f.flush()
    outer, saved = _terminal, os.dup(2)
    if outer is None:
        try:
            on_fd2 = sys.stderr.fileno() == 2
        except (AttributeError, OSError, ValueError):  # e.g. a test's captured stream: the console keeps it
            on_fd2 = False
        _terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace") if on_fd2 else sys.stderr
        console.file = _terminal
    try:
        with open(path, "ab") as log:
            log.write(b"# what the libraries tcc called (TVM, PyTorch, transformers) printed; tcc --debug shows it "
                      b"on the terminal instead\n")
            log.flush()
            os.dup2(log.fileno(), 2)
        yield
    finally:
        for f in (sys.stderr, sys.__stderr__):
            if f is not None:
                f.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if outer is None:
            console.file = None  # back to sys.stderr
            if _terminal is not sys.stderr:
                _terminal.close()
            _terminal = None


def info(msg: str) -> None:
    if not _quiet:
        console.print(msg)


@contextlib.contextmanager
def status(msg: str):
    """A spinner while the block runs; prints the time taken when it ends. A compile records the
    step's memory (tcc.memory)."""
    from .memory import stage
    t0 = time.perf_counter()
    with stage(msg):
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


@contextlib.contextmanager
def work(description: str, total: float):
    """Progress over `total` units of work with an estimate of the time left. Yields advance(units):
    a bar with the time elapsed and left on a terminal; elsewhere (a log) one line at most every 30 s,
    e.g. "analyze-redundancy: 40% (12 s, about 18 s left)"."""
    if _quiet or total <= 0:
        yield lambda units=1.0: None
        return
    if console.is_terminal:
        from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                      TextColumn("left"), TimeRemainingColumn(), console=console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda units=1.0: bar.advance(task, units)
        return
    t0 = time.perf_counter()
    state = {"done": 0.0, "shown": t0}

    def advance(units: float = 1.0) -> None:
        state["done"] += units
        now = time.perf_counter()
        if now - state["shown"] >= 30 and state["done"] < total:
            state["shown"] = now
            left = (now - t0) * (total - state["done"]) / state["done"]
            console.print(f"{description}: {state['done'] / total:.0%} ({now - t0:.0f} s, about {left:.0f} s left)")
    yield advance
