"""The on-disk store the caches build on (tcc.cache describes the caches and their keys): one
directory per entry under `cache_dir()` ($TCC_CACHE, default ~/.cache/tcc), written whole or not at
all, checked against its sha256s when read, least recently used entries evicted; tensors in
safetensors, the rest JSON, nothing pickled. A utility every layer may use: the trace cache
(tcc.frontends.trace_cache), the calibration-statistics cache (tcc.compress.stats_cache) and the
library cache (tcc.cache) are written with it. Imports only the standard library and numpy.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .version import __version__


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("TCC_CACHE", Path.home() / ".cache" / "tcc"))
    d = root.joinpath(*parts)
    d.mkdir(parents=True, exist_ok=True)
    return d


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


KINDS = ("programs", "stats", "libs")
log = logging.getLogger("tcc.cache")
_state = {"enabled": os.environ.get("TCC_NO_CACHE", "") in ("", "0")}
_events: list[dict] = []


# -- switches and bookkeeping --------------------------------------------------------------------------

def enabled() -> bool:
    return _state["enabled"]


@contextlib.contextmanager
def use(on: bool):
    """Turn the caches on or off for the duration of a `with` block."""
    before = _state["enabled"]
    _state["enabled"] = bool(on) and before
    try:
        yield
    finally:
        _state["enabled"] = before


def events() -> list[dict]:
    return list(_events)


def key(*parts: Any) -> str:
    """sha256 of JSON-able parts (other values by str)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


DEPENDS = {  # package -> the files (globs) a cached value is computed by
    "programs": {"tcc.frontends": ["frontend.py", "models.py", "trace_cache.py"]},
    "stats": {"tcc.compress": ["quantization.py", "calibration.py", "stats_cache.py"]},
    "libs": {"tcc.ir": ["ops.py", "program.py", "graph.py"], "tcc": ["generation.py", "artifact.py"],
             "tcc.backends": ["**/*.py", "**/*.cc", "**/*.h", "**/*.cu", "**/*.cuh"]},
}


@functools.lru_cache(maxsize=None)
def source_hash(kind: str) -> str:
    """Hash of the tcc source files DEPENDS lists for `kind`, computed once per process."""
    import importlib
    h = hashlib.sha256(__version__.encode())
    for package, globs in DEPENDS[kind].items():
        root = Path(importlib.import_module(package).__file__).parent
        for f in sorted({p for g in globs for p in root.glob(g) if p.is_file()}):
            h.update(f"{package}/{f.relative_to(root).as_posix()}".encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _read(kind: str, k: str, load: Callable[[Path, dict], Any]) -> Any:
    """load(entry dir, meta) for a valid entry, else None (a bad entry is removed)."""
    if not enabled():
        return None
    entry = cache_dir(kind) / k
    if not entry.is_dir():
        _events.append({"kind": kind, "outcome": "miss"})
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        for name, digest in meta["files"].items():
            if file_sha256(entry / name) != digest:
                raise ValueError(f"{name} does not match its sha256")
        value = load(entry, meta)
    except Exception as e:  # corrupt or from an incompatible version: rebuild
        log.warning("tcc: ignoring cache entry %s: %s: %s", entry, type(e).__name__, e)
        shutil.rmtree(entry, ignore_errors=True)
        _events.append({"kind": kind, "outcome": "miss"})
        return None
    os.utime(entry / "meta.json")  # recently used
    _events.append({"kind": kind, "outcome": "hit"})
    return value


def _write(kind: str, k: str, save: Callable[[Path], dict]) -> None:
    """save(temp dir) writes the files and returns the meta; the entry appears whole or not at all."""
    if not enabled():
        return
    parent = cache_dir(kind)
    tmp = Path(tempfile.mkdtemp(prefix=f".{k[:16]}.tmp-", dir=parent))
    try:
        meta = save(tmp)
        meta["files"] = {f.name: file_sha256(f) for f in sorted(tmp.iterdir())}
        (tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True) + "\n")
        os.replace(tmp, parent / k)
        _events.append({"kind": kind, "outcome": "stored"})
    except _Uncacheable as e:
        log.info("tcc: not caching %s: %s", kind, e)
    except Exception as e:  # e.g. a full disk, or another process stored the same entry first
        log.warning("tcc: could not write a %s cache entry: %s: %s", kind, type(e).__name__, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _evict()


class _Uncacheable(Exception):
    """The value cannot be stored without pickling."""


def _evict() -> None:
    limit = float(os.environ.get("TCC_CACHE_MAX_GB", "8")) * 1e9
    entries = []
    for kind in KINDS:
        for entry in cache_dir(kind).iterdir():
            meta = entry / "meta.json"
            if entry.is_dir() and meta.exists():
                size = sum(f.stat().st_size for f in entry.iterdir())
                entries.append((meta.stat().st_mtime, size, entry))
    total = sum(size for _, size, _ in entries)
    for _, size, entry in sorted(entries):  # oldest use first
        if total <= limit:
            break
        shutil.rmtree(entry, ignore_errors=True)
        total -= size


# -- tensors ------------------------------------------------------------------------------------------

def _save_tensors(path: Path, groups: dict[str, dict]) -> dict:
    """Write {group: {name: tensor}} to one safetensors file; returns the layout to load it back:
    tensors that are the same view of the same storage (tied weights) are stored once."""
    import torch
    from safetensors.torch import save_file
    flat, layout, seen, storages = {}, {}, {}, set()
    for group, tensors in groups.items():
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or type(t) not in (torch.Tensor, torch.nn.Parameter):
                raise _Uncacheable(f"{group} '{name}' is a {type(t).__name__}, not a plain tensor")
            full = f"{group}/{name}"
            view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), str(t.dtype))
            layout[full] = {"stored": seen.setdefault(view, full), "param": isinstance(t, torch.nn.Parameter),
                            "requires_grad": t.requires_grad}
            if seen[view] == full:
                shared = view[0] in storages and t.numel() > 0
                storages.add(view[0])
                flat[full] = t.detach().clone() if shared else t.detach().contiguous()
    save_file(flat, str(path))
    return layout


def _load_tensors(path: Path, layout: dict) -> dict[str, dict]:
    import torch
    from safetensors.torch import load_file
    stored = load_file(str(path))
    made: dict[str, Any] = {}
    groups: dict[str, dict] = {}
    for full, how in layout.items():
        group, name = full.split("/", 1)
        src = how["stored"]
        if src not in made:
            t = stored[src]
            made[src] = torch.nn.Parameter(t, requires_grad=how["requires_grad"]) if how["param"] else t
        groups.setdefault(group, {})[name] = made[src]
    return groups


def feeds_hash(feeds: list[dict]) -> str:
    h = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            a = np.ascontiguousarray(feed[name])
            h.update(f"{name}:{a.dtype}:{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()
