"""Content-addressed caches: traced programs, calibration statistics and built libraries.

Everything lives under `tcc.store.cache_dir()` ($TCC_CACHE, default ~/.cache/tcc), one directory
per entry, named by a sha256 key over everything the cached value depends on. Each cache lives in the
layer that uses it, on the store (tcc/store.py: entries, switches, eviction, tensors): programs in
tcc.frontends.trace_cache, stats in tcc.compress.stats_cache, libs here; this module also gives
the other two (and the store's switches) under their old names.

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

import functools
import os
import shutil
import subprocess
from pathlib import Path

# the store and the program / statistics caches, by their old names here (tcc.cache is the driver's
# view of all three caches)
from .store import (KINDS, DEPENDS, _read, _write, cache_dir, enabled, events, feeds_hash, file_sha256,  # noqa: F401
                    key, source_hash, use, _state)
from .frontends.trace_cache import load_trace, save_trace, trace_key  # noqa: F401
from .compress.stats_cache import load_stats, save_stats, stats_key  # noqa: F401


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
