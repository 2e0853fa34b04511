"""Frontends by file kind (tcc.frontends.registry): a third-party frontend registered for its own file
kind is the one `tcc.trace` picks for such a file (and one declared through the entry-point group
"tcc.frontends" likewise); an ExportedProgram is a kind of its own; a file no frontend reads is the
same UserError as before. Outputs are checked against the PyTorch modules the frontends build."""
from __future__ import annotations

import importlib.metadata
import json

import numpy as np
import pytest
import torch

import tcc
from tcc.errors import UserError
from tcc.frontends import registry


def _tiny_linear(path) -> torch.nn.Module:
    """What a `.tinylin` file describes ({"in", "out", "seed"}): a seeded Linear followed by GELU."""
    spec = json.loads(open(path).read())
    torch.manual_seed(spec["seed"])
    return torch.nn.Sequential(torch.nn.Linear(spec["in"], spec["out"]), torch.nn.GELU()).eval()


def _load_tiny_linear(path, **options):
    module = _tiny_linear(path)
    return tcc.trace(module, example_inputs={"x": torch.randn(2, module[0].in_features)}, output_names=["y"],
                     task=options.get("task"))


TINY_LINEAR = registry.Frontend("tiny-linear", lambda m: isinstance(m, (str,)) and m.endswith(".tinylin"),
                                _load_tiny_linear, what="a tiny-linear file")


@pytest.fixture
def restore_registry():
    saved, loaded = dict(registry._REGISTRY), registry._loaded
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)
    registry._loaded = loaded


def _tinylin(tmp_path, seed=3):
    path = tmp_path / "model.tinylin"
    path.write_text(json.dumps({"in": 6, "out": 5, "seed": seed}))
    return str(path)


def _assert_runs_like(program, module, x):
    got = program({program.inputs[0].name: x.numpy()})
    (name, y), = got.items()
    with torch.no_grad():
        want = module(x).numpy()
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
    assert y.shape == want.shape


def test_a_registered_frontend_is_picked_for_its_file_kind(tmp_path, restore_registry):
    path = _tinylin(tmp_path)
    with pytest.raises(UserError, match="is not a model folder"):  # before it is registered: nothing reads it
        tcc.trace(path)
    registry.register_frontend(TINY_LINEAR)
    assert registry.find(path) is TINY_LINEAR and registry.find(str(tmp_path)).kind == "huggingface"
    program = tcc.trace(path)
    assert [s.name for s in program.outputs] == ["y"]
    _assert_runs_like(program, _tiny_linear(path), torch.randn(2, 6, generator=torch.Generator().manual_seed(1)))
    # the driver asks the registry, not the suffix, whether the model can have generation entry points
    from tcc.compiler import _generation_context
    from tcc.pipeline.backend import get_target
    with pytest.raises(UserError, match="generation .* cannot be built.*not a tiny-linear file"):
        _generation_context(path, None, get_target("x86"), "tvm", True, None, 8, None)
    assert _generation_context(path, None, get_target("x86"), "tvm", None, None, 8, None) is None


def test_an_entry_point_frontend_is_loaded(tmp_path, restore_registry, monkeypatch):
    ep = importlib.metadata.EntryPoint(name="tiny-linear", value=f"{__name__}:TINY_LINEAR", group="tcc.frontends")
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: [ep] if kw.get("group") == "tcc.frontends" else real(**kw))
    registry._loaded = False
    assert "tiny-linear" in registry.kinds()
    path = _tinylin(tmp_path, seed=4)
    _assert_runs_like(tcc.trace(path), _tiny_linear(path), torch.randn(2, 6))


def test_an_exported_program_is_traced_as_it_was_exported():
    module = _tiny_linear_from(seed=5)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(2))
    ep = torch.export.export(module, (x,))
    assert registry.find(ep).kind == "exported-program"
    program = tcc.trace(ep)
    assert [s.name for s in program.inputs] == ["input"] and program.inputs[0].shape == (2, 6)  # Sequential's argument
    assert program.source["kind"] == "exported-program"
    _assert_runs_like(program, module, torch.randn(2, 6))


def _tiny_linear_from(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU()).eval()


def test_unknown_files_and_objects_are_user_errors(tmp_path):
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0" * 8)
    with pytest.raises(UserError, match="is not a model folder"):
        tcc.trace(weights)
    with pytest.raises(UserError, match="not found"):
        tcc.trace(tmp_path / "missing.onnx")
    with pytest.raises(UserError, match="cannot trace a dict"):
        tcc.trace({"not": "a model"})
