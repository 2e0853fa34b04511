"""Frontends by the kind of model they read: a registry, as backends and passes have.

A frontend is `Frontend(kind, detect, load)`:
  kind                 its name ("huggingface", "gguf", "onnx", "module", "exported-program", "alias")
  detect(model)        whether it reads `model` (what the user gave: a path, an alias, an object);
                       cheap (no file is parsed, torch is not imported)
  load(model, **options) -> Program
                       options: tcc.frontends.frontend.trace's keywords (task, seq_len, batch,
                       max_seq_len, weights, example_inputs, output_names) and `shown`, the name the
                       user typed (an alias) for Program.source
  config(model)        optional: the transformers config of a model that can be compiled with
                       generation entry points (Hugging Face causal LMs), else None
  follow(model)        optional, for a name that stands for another model (an alias): that model
  what                 the kind in words, for messages ("an ONNX file")

`find(model)` returns the frontend that reads `model`: the latest registered first, so a frontend
registered later (a plugin) wins for its files; a path nothing reads is the same UserError as before
(not found / not a model folder). tcc's own register below (their modules load on first use);
others with `register_frontend(...)` or through the entry-point group "tcc.frontends"
(`[project.entry-points."tcc.frontends"] name = "module:object"`, the object a Frontend), loaded the
first time a model is looked up.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..plugins import instance, load_entry_points
from . import models

ENTRY_POINT_GROUP = "tcc.frontends"


@dataclasses.dataclass(frozen=True)
class Frontend:
    kind: str
    detect: Callable[[Any], bool]
    load: Callable[..., Any]
    config: Callable[[Any], Any] | None = None
    follow: Callable[[Any], Any] | None = None
    what: str = ""


_REGISTRY: dict[str, Frontend] = {}
_loaded = False


def register_frontend(kind: str | Frontend, detect: Callable[[Any], bool] | None = None,
                      load: Callable[..., Any] | None = None, **fields) -> Frontend:
    """Make a frontend findable for the models its `detect` accepts (a kind registered again is
    replaced, and tried first). Takes a Frontend, or its fields."""
    fe = kind if isinstance(kind, Frontend) else Frontend(kind, detect, load, **fields)
    if not (isinstance(fe.kind, str) and callable(fe.detect) and callable(fe.load)):
        raise TypeError(f"frontend {fe!r} needs a kind (str), detect(model) and load(model, **options)")
    _REGISTRY.pop(fe.kind, None)
    _REGISTRY[fe.kind] = fe
    return fe


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    load_entry_points(ENTRY_POINT_GROUP, "frontend", lambda obj: register_frontend(instance(obj)))


def kinds() -> list[str]:
    _load_plugins()
    return list(_REGISTRY)


def find(model) -> Frontend:
    """The frontend that reads `model`; UserError when none does."""
    _load_plugins()
    for fe in reversed(list(_REGISTRY.values())):
        if fe.detect(model):
            return fe
    if isinstance(model, (str, os.PathLike)):
        models.resolve(model)  # a path that does not exist: "model '...' not found"
        raise UserError(f"{model} is not a model folder or a file tcc reads (.gguf, .onnx)",
                        "give a Hugging Face folder with config.json and *.safetensors, a .gguf or .onnx file, "
                        f"or an alias: {', '.join(models.ALIASES)}")
    raise UserError(f"tcc cannot trace a {type(model).__qualname__}",
                    "give a model path or alias, an nn.Module or a torch.export.ExportedProgram")


def resolve(model) -> tuple[Frontend, Any]:
    """(the frontend, the model it reads), following names that stand for other models (aliases)."""
    fe = find(model)
    while fe.follow is not None:
        model = fe.follow(model)
        fe = find(model)
    return fe, model


def config(model):
    """The transformers config of `model` when its frontend can give generation entry points, else None."""
    fe, model = resolve(model)
    return fe.config(model) if fe.config else None


def what(model) -> str:
    """The kind of `model` in words ("an ONNX file"), aliases followed."""
    fe = resolve(model)[0]
    return fe.what or fe.kind


# -- tcc's own ------------------------------------------------------------------------------------

def _file(model, suffix: str) -> bool:
    return isinstance(model, (str, os.PathLike)) and str(model) not in models.ALIASES and Path(model).suffix == suffix \
        and Path(model).expanduser().is_file()


def _torch_instance(model, *path: str) -> bool:
    """isinstance(model, torch.<path>) without importing torch (if torch is not loaded, it is not one)."""
    obj = sys.modules.get("torch")
    for name in path:
        obj = getattr(obj, name, None)
    return isinstance(obj, type) and isinstance(model, obj)


def _load_hf(model, **options):
    from .frontend import trace_hf
    return trace_hf(models.resolve(model), **options)


def _load_onnx(model, *, max_seq_len=None, shown=None, task=None, seq_len=128, batch=1, **_):
    if max_seq_len is not None:
        raise UserError("--max-seq-len is not supported for ONNX models yet", "leave it out for a static length")
    from .onnx_frontend import trace_onnx
    return trace_onnx(models.resolve(model), task=task, seq_len=seq_len, batch=batch, source_name=shown)


def _load_module(model, **options):
    from .frontend import trace_module
    return trace_module(model, **options)


def _load_exported(model, **options):
    from .frontend import trace_exported
    return trace_exported(model, **options)


def _hf_config(model):
    return models.load_config(models.resolve(model))


def _alias_load(model, **options):
    fe, path = resolve(model)
    return fe.load(path, **{**options, "shown": str(model)})


register_frontend("module", lambda m: _torch_instance(m, "nn", "Module"), _load_module, what="a PyTorch module")
register_frontend("exported-program", lambda m: _torch_instance(m, "export", "ExportedProgram"), _load_exported,
                  what="a torch.export.ExportedProgram")
register_frontend("huggingface", lambda m: isinstance(m, (str, os.PathLike)) and str(m) not in models.ALIASES
                  and Path(m).expanduser().is_dir(), _load_hf, config=_hf_config, what="a Hugging Face folder")
register_frontend("gguf", lambda m: _file(m, ".gguf"), _load_hf, config=_hf_config, what="a GGUF file")
register_frontend("onnx", lambda m: _file(m, ".onnx"), _load_onnx, what="an ONNX file")
register_frontend("alias", lambda m: isinstance(m, str) and m in models.ALIASES, _alias_load, follow=models.resolve,
                  what="a built-in model alias")
