"""Resident memory (RSS) of a compile: the process's peak overall and per step.

`recording()` (compile wraps its work in it) turns recording on; while it is on, every
`progress.status` step and every `stage(name)` block records its seconds, the peak RSS reached
inside it and the RSS when it ended, and its depth (0: no other step contains it; `top_level` lists
those, which add up to the wall time with an "other" row). Linux keeps the peak (VmHWM in /proc/self/status); it is reset
at the start of each step (writing 5 to /proc/self/clear_refs) so each step gets its own peak, and
folded into every step still open, so nested steps are right too. Where the reset is not allowed
a step's peak is the process's peak so far (ru_maxrss), still exact for the whole compile.
Child processes (the C compiler, the linker) are not counted.
"""
from __future__ import annotations

import contextlib
import resource
import time

GB = 1e9
_steps: dict | None = None  # name -> {"seconds", "peak_gb", "end_gb", "calls"} while recording
_open: list[list] = []  # [name, peak bytes] of the steps now running, outermost first
_peak = 0  # the whole recording's peak (bytes)
_can_reset: bool | None = None
_listeners: list = []  # watching(): called with the open steps' names when a step begins


def _status() -> tuple[int, int]:
    """(peak RSS since the last reset, RSS now) in bytes."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmHWM", "VmRSS")))
        return int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import psutil
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
        return peak, psutil.Process().memory_info().rss


def _fold() -> int:
    """Fold the peak since the last reset into the open steps and the whole; reset it. Returns RSS now."""
    global _peak, _can_reset
    hwm, rss = _status()
    _peak = max(_peak, hwm)
    for step in _open:
        step[1] = max(step[1], hwm)
    if _can_reset is not False:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _can_reset = True
        except OSError:
            _can_reset = False
    return rss


def peak_bytes() -> int:
    """The process's peak RSS: since recording() began while it is on, else since the process started
    (or the last reset)."""
    if _steps is None:
        return max(_status()[0], _peak)
    _fold()
    return _peak


@contextlib.contextmanager
def recording():
    """Record steps for the block; yields the {step: figures} dict it fills (GB, rounded)."""
    global _steps, _peak
    outer = _steps
    if outer is not None:  # nested (a compile inside a search): the outer recording goes on
        yield outer
        return
    _steps, _peak = {}, 0
    return_freed_blocks()
    _fold()
    _peak = _status()[1]
    try:
        yield _steps
    finally:
        _fold()
        _steps = None


@contextlib.contextmanager
def stage(name: str):
    """Record the block as step `name` (a no-op unless recording); repeated names add up."""
    if _steps is None:
        yield
        return
    _fold()
    _steps.setdefault(name, None)  # steps in the order they began
    depth = len(_open)
    step = [name, 0]
    _open.append(step)
    for listener in list(_listeners):
        listener([s[0] for s in _open])
    t0 = time.perf_counter()
    try:
        yield
    finally:
        rss = _fold()
        _open.remove(step)
        if _steps is not None:
            old = _steps.get(name) or {"seconds": 0.0, "peak_gb": 0.0, "calls": 0, "depth": depth}
            _steps[name] = {"seconds": round(old["seconds"] + time.perf_counter() - t0, 2),
                            "peak_gb": max(old["peak_gb"], round(step[1] / GB, 3)), "end_gb": round(rss / GB, 3),
                            "calls": old["calls"] + 1, "depth": min(old["depth"], depth)}


def top_level(steps: dict, total: float) -> list[list]:
    """[[step, seconds]] of the steps no other step contains (depth 0: they never overlap), in the
    order they began, then ["other", what `total` seconds leaves]: they add up to `total`."""
    rows = [[name, v["seconds"]] for name, v in steps.items() if v and v.get("depth", 0) == 0]
    return rows + [["other", round(max(total - sum(s for _, s in rows), 0.0), 2)]]


@contextlib.contextmanager
def watching(listener):
    """Call `listener([names of the open steps, outermost first])` whenever a step begins, in the block
    (a compile's progress file: where a compile killed by SIGKILL was)."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def recorded(name: str) -> dict | None:
    """The figures recorded so far for step `name` ({"seconds", "peak_gb", "end_gb", "calls"}); None
    when not recording or no such step ran."""
    return (_steps or {}).get(name)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
BIG_BLOCK = 256 << 10  # bytes: blocks at least this big are mapped and unmapped on their own


def return_freed_blocks() -> bool:
    """Make glibc's malloc give blocks of BIG_BLOCK bytes or more their own mapping, returned to the
    system when freed. By default glibc raises that threshold to the size of the largest block freed
    so far (up to 32 MiB), after which weight-sized temporaries (a |W| or W * s of one layer) come
    from the heap and stay in RSS once freed: on the Qwen2.5-0.5B shape, taking |W|.amax(0) of every
    weight kept 1.2 GB of freed blocks resident (0.0 GB with a fixed threshold), and the SmoothQuant
    compile of the Llama-3.2-1B shape peaked at 11.9 GB for 4.7 GB of weights. mallopt with a fixed
    value also turns glibc's adjustment off. 256 KiB, not a few MiB: a freed block under the threshold
    goes back to the heap, where a small allocation made meanwhile can split it, so the next block of
    that size extends the heap instead (a 4 MiB threshold left 77 MB of 3.2 MB |W| blocks resident in
    one run of three in test_freed_weight_sized_temporaries_leave_rss, 1 MiB 11 MB of 0.46 MB blocks
    in one of six; 256 KiB 0.6 MB in every run). Process-wide; True where it took effect (glibc)."""
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, BIG_BLOCK))


MADV_PAGEOUT = 21  # Linux >= 5.4 (Python's mmap module has no name for it before 3.12)


def page_out(tensors) -> None:
    """Hint the kernel to reclaim the pages under `tensors` (torch tensors on the CPU) now: madvise
    MADV_PAGEOUT, which never changes what the memory reads (a file-backed page is read again from
    its file when touched, an anonymous one swapped or kept). For weights mapped from a safetensors
    file (transformers maps checkpoints) whose values moved to new memory: their pages would stay
    in this process's RSS as long as any tensor of the file is alive. A no-op where not supported."""
    import ctypes
    import mmap
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = mmap.PAGESIZE
    for t in tensors:
        start, nbytes = t.data_ptr(), t.numel() * t.element_size()
        lo, hi = -(-start // page) * page, (start + nbytes) // page * page  # whole pages inside the tensor
        if hi > lo:
            madvise(lo, hi - lo, MADV_PAGEOUT)
