"""Content-addressed caches: traced programs, calibration statistics and built libraries.

Everything lives under `tcc.frontends.models.cache_dir()` ($TCC_CACHE, default ~/.cache/tcc), one directory
per entry, named by a sha256 key over everything the cached value depends on:

  programs/<key>  a traced model before canonicalisation: torch.export's JSON serialisation of the
                  ExportedProgram, its tensors (safetensors) and what the frontend needs to finish
                  the Program. key = the model files' hash (tcc.frontends.models.model_hash) and resolved path,
                  requested task, seq_len, batch, tcc, torch and transformers versions, the source
                  of tcc's frontend (frontend.py, models.py).
                  The frontend re-runs canonicalize and structure recovery on a hit.
  stats/<key>     calibration statistics (tcc.compress.quantization.InputStats) of named graph nodes.
                  key = the Program's fingerprint, a hash of the calibration feeds, what is
                  collected (node names and each InputStats' configuration), the source of
                  quantization.py and calibration.py.
  libs/<key>      a built model.so and weights.safetensors with the parameter order and the sparse
                  lowering report. key = the Program's fingerprint, its annotations and input/output
                  specs, the target, the C compiler's identity, TVM/tvm-ffi/OpenBLAS versions, the
                  source of tcc's backends (every file in tcc.backends, and the tcc modules they
                  import: ops.py, program.py, graph.py, artifact.py).

The source files in a key (DEPENDS) are what the cached value is computed by, so editing them
invalidates it; a backend or frontend that starts using another tcc module must list it there.

Safety: nothing is unpickled. Tensors are safetensors, the rest JSON; a program's graph is read with
torch's ExportedProgramDeserializer given the tensors directly (torch.export.load is not used: it
unpickles tensor subclasses, custom objects and, on a fallback, the sample inputs). A graph that
needs pickling (non-tensor constants) is not cached. The directory is the user's own and trusted
like their home directory, but each file's sha256 is checked against the entry's meta.json anyway.

Robustness: entries are written into a temporary sibling directory and renamed into place; a
missing, corrupt or unreadable entry is a miss (removed, rebuilt), and a failure to write an entry
only skips caching - the cache never makes a compile fail. Least recently used entries are removed
once the caches together exceed $TCC_CACHE_MAX_GB (default 8).

Off: TCC_NO_CACHE=1, `tcc compile --no-cache`, or `with cache.use(False):`. `events()` lists what
the caches did in this process ({"kind", "outcome": "hit" | "miss" | "stored"}), for reports.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .frontends.models import cache_dir, file_sha256

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
    "programs": {"tcc.frontends": ["frontend.py", "models.py"]},
    "stats": {"tcc.compress": ["quantization.py", "calibration.py"]},
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


# -- traced programs -------------------------------------------------------------------------------------

def trace_key(model_sha: str, path: Path, task: str | None, seq_len: int, batch: int) -> str:
    import torch
    import transformers
    return key("program", model_sha, str(Path(path).resolve()), task, seq_len, batch, torch.__version__,
               transformers.__version__, source_hash("programs"))


def save_trace(k: str, ep, example_inputs: dict, meta: dict) -> None:
    """Store an ExportedProgram with its example inputs (by name) and JSON-able `meta`."""
    def save(d: Path) -> dict:
        from torch._export.serde.serialize import ExportedProgramSerializer, _to_json_bytes
        serialized = ExportedProgramSerializer().serialize(ep, serialize_state_dict=False, serialize_constants=False,
                                                           serialize_example_inputs=False)
        layout = _save_tensors(d / "tensors.safetensors", {"state": dict(ep.state_dict), "constants": dict(ep.constants),
                                                           "inputs": dict(example_inputs)})
        (d / "export.json").write_bytes(_to_json_bytes(serialized.exported_program))
        return {"layout": layout, "inputs": list(example_inputs), "frontend": meta}
    _write("programs", k, save)


def load_trace(k: str):
    """(ExportedProgram, example inputs by name, meta) for key `k`, or None."""
    def load(d: Path, meta: dict):
        from torch._export.serde import schema
        from torch._export.serde.serialize import ExportedProgramDeserializer
        groups = _load_tensors(d / "tensors.safetensors", meta["layout"])
        inputs = {n: groups["inputs"][n] for n in meta["inputs"]}
        serialized = _to_dataclass(schema.ExportedProgram, json.loads((d / "export.json").read_bytes()))
        ep = ExportedProgramDeserializer().deserialize(serialized, groups.get("state", {}), groups.get("constants", {}),
                                                       (tuple(inputs.values()), {}))
        return ep, inputs, meta["frontend"]
    return _read("programs", k, load)


def _to_dataclass(cls, data):
    """torch._export.serde.serialize._dict_to_dataclass with each class's type hints looked up once
    (torch's looks them up per object: 2.5 of SmolLM2's 4 s to read a cached program)."""
    import dataclasses
    import types
    import typing

    from torch._export.serde import schema
    if isinstance(cls, str):
        cls = getattr(schema, cls)
    if isinstance(cls, typing.ForwardRef):
        cls = getattr(schema, cls.__forward_arg__)
    origin, args = typing.get_origin(cls), typing.get_args(cls)
    if origin is typing.Annotated:
        return _to_dataclass(cls.__origin__, data)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        return None if data is None else _to_dataclass(args[0], data)
    if isinstance(cls, type) and issubclass(cls, schema._Union):
        (name, value), = data.items()
        return cls.create(**{name: _to_dataclass(_hints(cls)[name], value)})
    if dataclasses.is_dataclass(cls):
        hints = _hints(cls)
        return cls(**{f.name: _to_dataclass(hints[f.name], data[f.name]) for f in dataclasses.fields(cls) if f.name in data})
    if isinstance(data, list):
        return [_to_dataclass(args[0], d) for d in data] if data else data
    if isinstance(data, dict):
        return {k: _to_dataclass(args[1], v) for k, v in data.items()}
    return float(data) if cls is float else data


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    import typing

    from torch._export.serde import schema
    return typing.get_type_hints(cls, globalns=vars(schema))


# -- calibration statistics ---------------------------------------------------------------------------------

_STAT_FIELDS = ("abs_sum", "abs_max", "sq_sum", "H", "H_blocks", "top", "bottom")


def stats_key(program, feeds: list[dict], stats: dict) -> str:
    spec = {name: [st.k, st.H is not None, st.blocks, st.percentile, st.signed, st.feeds] for name, st in stats.items()}
    return key("stats", program.fingerprint(), feeds_hash(feeds), spec, source_hash("stats"))


def load_stats(program, feeds: list[dict], stats: dict) -> bool:
    """Fill `stats` ({node name: InputStats}, freshly made) from the cache; True on a hit."""
    if not enabled():
        return False

    def load(d: Path, meta: dict) -> bool:
        groups = _load_tensors(d / "stats.safetensors", meta["layout"])
        for name, st in stats.items():
            for field in _STAT_FIELDS:
                if f"{name}.{field}" in groups.get("stats", {}):
                    setattr(st, field, groups["stats"][f"{name}.{field}"])
            st.tokens, st.topk = meta["counts"][name]
        return True
    return bool(_read("stats", stats_key(program, feeds, stats), load))


def save_stats(program, feeds: list[dict], stats: dict) -> None:
    """Store `stats` after they were collected on `feeds` with `program`."""
    if not enabled():
        return

    def save(d: Path) -> dict:
        tensors = {f"{name}.{field}": getattr(st, field) for name, st in stats.items() for field in _STAT_FIELDS
                   if getattr(st, field) is not None}
        layout = _save_tensors(d / "stats.safetensors", {"stats": tensors})
        return {"layout": layout, "counts": {name: [st.tokens, st.topk] for name, st in stats.items()}}
    _write("stats", stats_key(program, feeds, stats), save)


# -- built libraries ---------------------------------------------------------------------------------------

def library_key(program, target, extra=None, backend_identity: list = ()) -> str:
    """`backend_identity`: the backend's versions (tcc.pipeline.backend.Backend.identity: TVM, tvm-ffi, OpenBLAS)."""
    return key("library", program.fingerprint(), program.annotations, [s.to_json() for s in program.inputs],
               [s.to_json() for s in program.outputs], target.to_json(), _compiler_identity(target.cc),
               *backend_identity, source_hash("libs"), extra)


@functools.lru_cache(maxsize=4)
def _compiler_identity(cc: str) -> str:
    path = shutil.which(cc)
    if path is None:
        return cc
    version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    return f"{os.path.realpath(path)}\n{version}"


LIB_FILES = ("model.so", "weights.safetensors")


def load_library(k: str, dest: Path) -> dict | None:
    """Copy a cached model.so and weights.safetensors into `dest`; returns {"params": [names],
    "weight_bytes": int, "sparsity": [...]} or None."""
    def load(d: Path, meta: dict) -> dict:
        for name in LIB_FILES:
            shutil.copyfile(d / name, dest / name)
        return meta["library"]
    return _read("libs", k, load)


def save_library(k: str, src: Path, library: dict) -> None:
    """Store `src`'s model.so and weights.safetensors with `library` (see load_library)."""
    def save(d: Path) -> dict:
        for name in LIB_FILES:
            shutil.copyfile(src / name, d / name)
        return {"library": library}
    _write("libs", k, save)
