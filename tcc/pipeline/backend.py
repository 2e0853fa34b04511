"""Backends: how tcc's core reaches a code generator, by name, through a registry.

A backend turns a Program into an artifact's files and runs them. It is an object with this
`Backend` protocol (tcc's own: `tvm` in backends/tvm/backend.py, `onnxruntime` in
backends/onnxruntime/__init__.py):

  name                                    "tvm", "onnxruntime", ...
  check_toolchain(target)                 UserError when a compiler the target needs is missing
  build(program, target, dir, functions)  the artifact's files in `dir`; returns {"params": [names in
                                          call order], "weight_bytes", "sparsity", "functions": {...}}
  session(dir, manifest)                  a callable feeds -> {output name: array} running the files
                                          (with function(name, signature, state) / new_state(specs)
                                          where the artifact has generation entry points)
  cost_model(program)                     the program as the backend will execute it (its kernels),
                                          for the accuracy-budget search's latency model
  identity()                              versions that decide whether a cached build is still good
and optionally:
  check_pipeline(pipeline, target)        UserError for what `build` would refuse for this target in the
                                          Pipeline's passes (e.g. a format with no kernel there), raised
                                          before the passes run
and, for a backend that defines targets (tvm):
  targets()                               [(name, one-line description)] (`tcc targets`)
  aliases()                               {other name: target name}
  target(name)                            the Target: name, arch, device, is_host, runs_here, to_json()

Backends register with `register_backend(backend)`: tcc's own when tcc.backends is imported (the
registry imports it by name, as tcc.pipeline imports tcc.passes), others through the entry-point
group "tcc.backends" (`[project.entry-points."tcc.backends"] name = "module:object"`), loaded the
first time a name is looked up that no built-in has. Core modules never import tcc.backends.*
themselves (.ci/lint-imports checks it).
"""
from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

from ..errors import UserError
from ..plugins import instance, load_entry_points

ENTRY_POINT_GROUP = "tcc.backends"
DEFAULT = "tvm"


@runtime_checkable
class Backend(Protocol):
    name: str

    def check_toolchain(self, target) -> None: ...

    def build(self, program, target, dir, functions: dict | None = None) -> dict: ...

    def session(self, dir, manifest: dict) -> Any: ...

    def cost_model(self, program) -> Any: ...

    def identity(self) -> list: ...


_REGISTRY: dict[str, Backend] = {}
_loaded = False


def register_backend(backend: Backend) -> Backend:
    """Make `backend` findable by its name (returns it, so it can decorate a class's instance)."""
    methods = ("check_toolchain", "build", "session", "cost_model", "identity")
    missing = [m for m in ("name",) + (() if getattr(backend, "lazy", False) else methods) if not hasattr(backend, m)]
    if missing:
        raise TypeError(f"backend {backend!r} lacks {', '.join(missing)} (tcc.pipeline.backend.Backend)")
    _REGISTRY[backend.name] = backend
    return backend


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("tcc.backends")  # tcc's own backends register themselves
    load_entry_points(ENTRY_POINT_GROUP, "backend", lambda obj: register_backend(instance(obj)),
                      skip=lambda name: name in _REGISTRY)


def get_backend(name: str = DEFAULT) -> Backend:
    """The backend registered as `name`; UserError listing the others when there is none."""
    _load()
    if name not in _REGISTRY:
        raise UserError(f"unknown backend '{name}'", f"choose one of: {', '.join(names())}")
    return _REGISTRY[name]


def names() -> list[str]:
    _load()
    return list(_REGISTRY)


def _target_backends() -> list:
    _load()
    return [b for b in _REGISTRY.values() if hasattr(b, "target")]


def get_target(name: str):
    """The Target called `name` (or an alias of it), from the backends that define targets (the
    default backend first); the first one's UserError (naming its targets) when none knows it."""
    error = None
    for b in sorted(_target_backends(), key=lambda b: b.name != DEFAULT):
        try:
            return b.target(name)
        except UserError as e:
            error = error or e
    raise error or UserError(f"unknown target '{name}'", "no backend that defines targets is installed")


def targets() -> list[tuple[str, str]]:
    """[(target name, one-line description)] of every backend that defines targets."""
    return [t for b in sorted(_target_backends(), key=lambda b: b.name != DEFAULT) for t in b.targets()]


def target_aliases() -> dict[str, str]:
    return {a: n for b in _target_backends() for a, n in b.aliases().items()}
