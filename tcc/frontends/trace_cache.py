"""The traced-program cache (tcc.cache describes its key): an ExportedProgram stored as torch.export's
JSON serialisation and its tensors in safetensors, read back without unpickling. The frontend
(tcc.frontends.frontend.trace_hf) asks it before tracing a Hugging Face model.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from ..store import _load_tensors, _read, _save_tensors, _write, enabled, key, source_hash  # noqa: F401  (enabled: the frontend asks it)


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
