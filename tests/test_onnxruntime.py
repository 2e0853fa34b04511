"""The ONNX Runtime backend: export of Programs (aten + tcc custom ops) and ORT sessions.

Measured: MiniLM (seq 16) ORT vs Program max abs err 2.9e-6 (bound 1e-4); the hand-built tcc-op
model and the quantize-weights MLP agree to ~1e-5 of their output range (bound 1e-4 relative).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from tcc.backends.onnxruntime import OrtSession, export_onnx, reference_session
from tcc.errors import UserError
from tcc.ir.program import Program, TensorSpec
from tcc.passes.quantize_weights import quantize_per_channel  # noqa: E402  (imports tcc.pipeline)
from tcc.pipeline import PassContext, Pipeline


def program_of(module: torch.nn.Module, feeds: dict[str, np.ndarray], out: str = "y") -> Program:
    args = tuple(torch.from_numpy(v) for v in feeds.values())
    gm = torch.export.export(module.eval(), args).module()
    y = gm(*args)
    return Program(gm, [TensorSpec(k, str(v.dtype), v.shape) for k, v in feeds.items()],
                   [TensorSpec(out, "float32", tuple(y.shape))], task="custom")


def initializers(path) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in onnx.load(str(path)).graph.initializer}


class TccOps(torch.nn.Module):
    """dense_w8 (with and without bias) -> dense q/k/v -> grouped-KV causal sdpa with a mask."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        q1, s1 = quantize_per_channel(torch.randn(64, 32, generator=g))
        q2, s2 = quantize_per_channel(torch.randn(16, 64, generator=g))
        self.register_buffer("q1", q1)
        self.register_buffer("s1", s1)
        self.register_buffer("q2", q2)
        self.register_buffer("s2", s2)
        self.b1 = torch.nn.Parameter(torch.randn(64, generator=g))
        self.wq = torch.nn.Parameter(torch.randn(64, 64, generator=g) / 8)
        self.wk = torch.nn.Parameter(torch.randn(32, 64, generator=g) / 8)
        self.wv = torch.nn.Parameter(torch.randn(32, 64, generator=g) / 8)
        self.bv = torch.nn.Parameter(torch.randn(32, generator=g))

    def forward(self, x, mask):
        h = torch.ops.tcc.dense_w8(x, self.q1, self.s1, self.b1)
        b, s, _ = h.shape
        q = torch.ops.tcc.dense(h, self.wq, None).view(b, s, 4, 16).transpose(1, 2)
        k = torch.ops.tcc.dense(h, self.wk, None).view(b, s, 2, 16).transpose(1, 2)
        v = torch.ops.tcc.dense(h, self.wv, self.bv).view(b, s, 2, 16).transpose(1, 2)
        a = torch.ops.tcc.sdpa(q, k, v, mask, 0.25, True).transpose(1, 2).reshape(b, s, 64)
        return torch.ops.tcc.dense_w8(a, self.q2, self.s2, None)


def test_tcc_ops_match_and_int8_weights_stay_int8(tmp_path):
    rng = np.random.default_rng(0)
    mask = np.zeros((1, 1, 8, 8), np.float32)
    mask[..., :2] = -1e4  # the first two keys masked out
    feeds = {"x": rng.standard_normal((1, 8, 32)).astype(np.float32), "mask": mask}
    program = program_of(TccOps(), feeds)
    path = tmp_path / "tiny.onnx"
    export_onnx(program, path)

    inits = initializers(path)
    assert inits["q1"].data_type == onnx.TensorProto.INT8 and list(inits["q1"].dims) == [64, 32]
    assert inits["q2"].data_type == onnx.TensorProto.INT8 and list(inits["q2"].dims) == [16, 64]
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("DequantizeLinear") == 2 and "Softmax" in ops
    assert not any(n.startswith("tcc") for n in ops)

    session = OrtSession(path)
    assert [s.name for s in session.inputs] == ["x", "mask"] and [s.name for s in session.outputs] == ["y"]
    want, got = program(feeds)["y"], session(feeds)["y"]
    assert got.shape == want.shape == (1, 8, 16)
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


def test_quantize_weights_pipeline_exports_int8(tmp_path):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    feeds = {"x": np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)}
    program = Pipeline.parse("quantize-weights(min_size=1024)").run(program_of(mlp, feeds), PassContext())
    session = reference_session(program)
    int8 = [t for t in initializers(session.path).values() if t.data_type == onnx.TensorProto.INT8]
    assert sorted(tuple(t.dims) for t in int8) == [(64, 128), (128, 128)]
    want, got = program(feeds)["y"], session(feeds)["y"]
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


def test_unsupported_custom_op_is_a_user_error(tmp_path):
    @torch.library.custom_op("tcctest::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    twice.register_fake(lambda x: torch.empty_like(x))

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.ops.tcctest.twice(x) + 1

    program = program_of(M(), {"x": np.ones((2, 3), np.float32)})
    with pytest.raises(UserError, match="tcctest.twice"):
        export_onnx(program, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_session_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        OrtSession(tmp_path / "none.onnx")
    program = program_of(torch.nn.Linear(4, 2), {"x": np.ones((1, 4), np.float32)})
    session = reference_session(program, threads=1)
    with pytest.raises(UserError, match="missing inputs"):
        session({})
    with pytest.raises(UserError, match="shape"):
        session({"x": np.ones((2, 4), np.float32)})


@pytest.mark.slow
def test_minilm_matches_program():
    from tcc.frontends.frontend import trace
    program = trace("minilm", seq_len=16)
    session = reference_session(program)
    assert [s.name for s in session.inputs] == ["input_ids", "attention_mask"]
    for seed in (0, 1):
        feeds = program.example_inputs(seed=seed)
        feeds["attention_mask"][0, 12:] = 0  # padded tail
        want, got = program(feeds)["last_hidden_state"], session(feeds)["last_hidden_state"]
        assert got.shape == (1, 16, 384)
        assert np.max(np.abs(got - want)) <= 1e-4
