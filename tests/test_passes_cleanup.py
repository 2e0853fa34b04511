"""`dce` and `fold-constants` on tiny exported models: what they remove/fold, and that outputs stay."""
from __future__ import annotations

import torch

from tcc.pipeline import PassContext, Pipeline, get_pass
from tcc.ir.program import Program, TensorSpec


def make_program(module, *args) -> Program:
    gm = torch.export.export(module.eval(), args).module()
    outs = gm(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return Program(gm, [TensorSpec(f"in{i}", str(a.numpy().dtype), tuple(a.shape)) for i, a in enumerate(args)],
                   [TensorSpec(f"out{i}", str(o.detach().numpy().dtype), tuple(o.shape)) for i, o in enumerate(outs)],
                   task="custom")


def run(text: str, program: Program, feeds: list[dict] | None = None) -> tuple[Program, dict]:
    ctx = PassContext(calibration=feeds or [])
    program = Pipeline.parse(text).run(program, ctx)
    return program, ctx.records[-1]


def ops(program: Program) -> list[str]:
    return [str(n.target) for n in program.gm.graph.nodes if n.op == "call_function"]


class WithDeadParts(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.unused = torch.nn.Linear(4, 4)
        self.register_buffer("stale", torch.ones(10))

    def forward(self, x):
        y = self.a(x)
        _ = y * 2  # dead
        return torch.relu(y)


def test_dce_removes_dead_nodes_parameters_and_modules():
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    program = make_program(WithDeadParts(), x)
    ref = program.gm(x)
    program, record = run("dce", program)
    details = record["details"]
    assert "mul" in details["removed_nodes"]
    assert sorted(details["removed_attributes"]) == ["stale", "unused.bias", "unused.weight"]
    assert details["bytes_freed"] == 4 * (16 + 4 + 10)
    assert record["param_bytes"]["after"] == 4 * (8 * 16 + 16)
    assert not hasattr(program.gm, "unused") and not hasattr(program.gm, "stale")
    assert torch.equal(program.gm(x), ref)
    assert any(n.op == "call_module" for n in program.gm.graph.nodes)  # torch.export's input guard stays
    _, again = run("dce", program)
    assert again["details"] == {"removed_nodes": [], "removed_attributes": [], "bytes_freed": 0}


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)
        self.lm_head = torch.nn.Linear(8, 20, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, ids):
        return self.lm_head(self.emb(ids))


def test_dce_keeps_tied_weights():
    ids = torch.tensor([[1, 2, 3]])
    program = make_program(Tied(), ids)
    ref = program.gm(ids)
    program, record = run("dce", program, [{"in0": ids.numpy()}])
    assert record["details"]["bytes_freed"] == 0  # at most an alias name goes, never the shared tensor
    assert record["param_bytes"]["after"] == 20 * 8 * 4
    assert torch.equal(program.gm(ids), ref)


def test_fold_constants_folds_a_weight_transpose():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(16, 32))
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.lin(x @ self.w.t() * 2.0)

    torch.manual_seed(0)
    x = torch.randn(4, 32)
    m = M()
    program = make_program(m, x)
    ref = program.gm(x)
    program, record = run("fold-constants", program)
    (folded,) = record["details"]["folded"]
    assert folded["node"] == "t" and folded["from"] == ["w"] and folded["shape"] == [32, 16]
    assert "aten.t.default" not in ops(program)
    assert torch.equal(getattr(program.gm, folded["into"]), m.w.detach().t().contiguous())
    assert not hasattr(program.gm, "w")  # the source parameter went with the folded subgraph
    assert "w" in record["details"]["removed_attributes"]
    assert torch.allclose(program.gm(x), ref, rtol=0, atol=1e-6)
    assert record["drift"]["rel"] < 1e-6
    assert record["param_bytes"]["before"] == record["param_bytes"]["after"]


class Masked(torch.nn.Module):
    """A causal mask from arange (constant), a bias expanded to the batch (constant, large), and a
    ones_like of the input (not constant)."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.randn(16))

    def forward(self, x):  # x [64, 16]
        i = torch.arange(16)
        mask = (i[None, :] <= i[:, None]).float()
        y = x @ mask + self.bias.expand(64, 16)
        return y * torch.ones_like(x)


def test_fold_constants_size_limit_and_user_inputs():
    torch.manual_seed(0)
    x, m = torch.randn(64, 16), Masked()
    program = make_program(m, x)
    ref = program.gm(x)
    program, record = run("fold-constants(size_limit=512)", program)
    details = record["details"]
    folded = {f["node"]: f for f in details["folded"]}
    assert len(folded) == 1
    (mask,) = folded.values()
    assert mask["shape"] == [16, 16] and mask["from"] == []  # arange -> compare -> float, no inputs
    assert torch.equal(getattr(program.gm, mask["into"]), torch.ones(16, 16).tril())
    (skip,) = details["skipped"]
    assert skip["node"] == "expand" and "1024 elements computed from 16 (size_limit=512)" in skip["reason"]
    assert details["checked"] == ["_assert_tensor_metadata_default"]  # export's dtype check on the mask
    assert "aten.expand.default" in ops(program) and "aten.ones_like.default" in ops(program)
    assert "aten.arange.start_step" not in ops(program) and "aten.arange.default" not in ops(program)
    assert torch.equal(program.gm(x), ref)

    # with the default limit the expanded bias is folded as well
    program = make_program(m, x)
    program, record = run("fold-constants", program)
    assert sorted(f["shape"] for f in record["details"]["folded"]) == [[16, 16], [64, 16]]
    assert "aten.ones_like.default" in ops(program)
    assert torch.equal(program.gm(x), ref)


def test_cleanup_passes_are_registered_as_cleanup():
    assert get_pass("dce").kind == get_pass("fold-constants").kind == "cleanup"
