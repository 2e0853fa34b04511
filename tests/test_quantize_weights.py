"""`quantize-weights`: int8 per-channel weights via tcc::dense_w8 on tiny exported models.

Measured on MLP below (3 x Linear(256, 256) + Linear(256, 4), seeds 0-4, 4 random feeds each):
output drift max|y_q - y| / max|y| between 0.47% and 0.82%; the test bound is 2%.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tcc.errors import UserError
from tcc.frontends.frontend import reexport
from tcc.pipeline import PassContext, Pipeline
from tcc.ir.program import Program, TensorSpec
from tcc.passes.quantize_weights import quantize_per_channel  # noqa: E402  (after tcc.pipeline loads tcc.passes)


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = (torch.nn.Linear(256, 256) for _ in range(3))
        self.head = torch.nn.Linear(256, 4)  # 1024 weights < min_size: stays fp32

    def forward(self, x):
        return self.head(torch.relu(self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))))


def make_program(module, x) -> Program:
    gm = torch.export.export(module.eval(), (x,)).module()
    out = gm(x)
    return Program(gm, [TensorSpec("x", str(x.numpy().dtype), tuple(x.shape))],
                   [TensorSpec("y", "float32", tuple(out.shape))], task="custom")


def quantize(program: Program, text: str = "quantize-weights", feeds=None) -> tuple[Program, dict]:
    ctx = PassContext(calibration=feeds or [])
    program = Pipeline.parse(text).run(program, ctx)
    return program, ctx.records[-1]


def count(program: Program, target) -> int:
    return sum(1 for n in program.gm.graph.nodes if n.target == target)


def test_mlp_int8_accuracy_bytes_and_buffers():
    torch.manual_seed(0)
    x = torch.randn(8, 256)
    program = make_program(MLP(), x)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((8, 256)).astype(np.float32)} for _ in range(4)]
    refs = [program(f)["y"] for f in feeds]
    program, record = quantize(program, feeds=feeds)

    assert count(program, torch.ops.tcc.dense_w8.default) == 3
    assert count(program, torch.ops.aten.linear.default) == 1  # the small head
    buffers = dict(program.gm.named_buffers())
    for name in ("l1", "l2", "l3"):
        assert buffers[f"{name}.weight_int8"].dtype == torch.int8 and buffers[f"{name}.weight_int8"].shape == (256, 256)
        assert buffers[f"{name}.weight_scale"].dtype == torch.float32 and buffers[f"{name}.weight_scale"].shape == (256,)
        assert not hasattr(getattr(program.gm, name), "weight")
    assert program.gm.head.weight.dtype == torch.float32

    ratio = record["param_bytes"]["after"] / record["param_bytes"]["before"]
    assert ratio <= 0.3
    assert record["param_bytes"]["after"] == 3 * (256 * 256 + 256 * 4 + 256 * 4) + 4 * (256 * 4 + 4)
    max_abs = max(np.abs(program(f)["y"] - r).max() for f, r in zip(feeds, refs))
    rel = max_abs / max(np.abs(r).max() for r in refs)  # the record's definition: pooled over the feeds
    assert 1e-4 < rel < 0.02
    assert record["drift"]["rel"] == pytest.approx(rel, rel=1e-6)
    assert record["drift"]["max_abs"] == pytest.approx(max_abs, rel=1e-6)
    assert record["flops"]["before"] == record["flops"]["after"] == 3 * 2 * 8 * 256 * 256 + 2 * 8 * 256 * 4
    details = record["details"]
    assert [q["modules"] for q in details["quantized"]] == [["l1"], ["l2"], ["l3"]]
    assert details["skipped"] == [{"module": "head", "node": "linear_3", "reason": "1024 weights < min_size=4096"}]


def test_per_channel_rounding_error_is_at_most_half_a_step():
    torch.manual_seed(1)
    w = torch.randn(64, 100) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scale
    w[5] = 0
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and scale[5] == 1
    err = (q.float() * scale[:, None] - w).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-7 * w.abs())


class Nested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU()) for _ in range(3))
        self.lm_head = torch.nn.Linear(64, 100)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.lm_head(x)


@pytest.mark.parametrize("skip, kept", [
    ("[]", []),
    ("[lm_head]", ["lm_head"]),
    ("[blocks.1.*]", ["blocks.1.0"]),
    ("['0']", ["blocks.0.0", "blocks.1.0", "blocks.2.0"]),  # a glob matches any dotted suffix
    ("[blocks.?.0,lm_*]", ["blocks.0.0", "blocks.1.0", "blocks.2.0", "lm_head"]),
])
def test_skip_globs_match_module_paths(skip, kept):
    program = make_program(Nested(), torch.randn(2, 64))
    program, record = quantize(program, f"quantize-weights(skip={skip})")
    skipped = sorted(s["module"] for s in record["details"]["skipped"] if s["reason"] == "matches skip")
    assert skipped == kept
    assert count(program, torch.ops.tcc.dense_w8.default) == 4 - len(kept)


def test_tied_embedding_weight_is_left_alone():
    class TiedLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(128, 64)
            self.proj = torch.nn.Linear(64, 64)
            self.lm_head = torch.nn.Linear(64, 128, bias=False)
            self.lm_head.weight = self.emb.weight

        def forward(self, ids):
            return self.lm_head(self.proj(self.emb(ids)))

    ids = torch.tensor([[1, 5, 9, 127]])
    program = make_program(TiedLM(), ids)
    program, record = quantize(program, feeds=[{"x": ids.numpy()}])
    (skip,) = record["details"]["skipped"]
    assert skip["module"] == "lm_head" and "also read by ['embedding']" in skip["reason"]
    assert [q["weight"] for q in record["details"]["quantized"]] == ["proj.weight"]
    assert record["param_bytes"]["after"] < record["param_bytes"]["before"]


def test_tcc_dense_nodes_are_quantized_and_the_graph_reexports():
    class Dense(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(96, 64) * 0.1)
            self.b = torch.nn.Parameter(torch.randn(96))

        def forward(self, x):
            return torch.ops.tcc.dense(x, self.w, self.b)

    x = torch.randn(3, 64)
    program = make_program(Dense(), x)
    ref = program.gm(x)
    program, record = quantize(program)
    assert count(program, torch.ops.tcc.dense.default) == 0 and count(program, torch.ops.tcc.dense_w8.default) == 1
    assert {"w_int8", "w_scale", "b"} == {k for k, _ in program.gm.named_buffers()} | {k for k, _ in program.gm.named_parameters()}
    assert (program.gm(x) - ref).abs().max() / ref.abs().max() < 0.02
    ep = reexport(program)  # what the backends consume
    assert "tcc.dense_w8.default" in str(ep.graph)


def test_only_8_bits():
    with pytest.raises(UserError, match=r"option 'bits' must be one of \[8\], got 4"):
        Pipeline.parse("quantize-weights(bits=4)")
